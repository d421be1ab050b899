// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of `journal`.

use super::*;

fn id() -> Identity {
    let mut boot_id = [0u8; 40];
    boot_id[..36].copy_from_slice(b"0123456789abcdef0123456789abcdef0123");
    Identity {
        dev: 0x803,
        ino: 42,
        btime: (1_700_000_000, 123),
        header_hash: 0xfeed,
        nsect: 1000,
        boot_id,
    }
}

fn header(id: &Identity, min: u64, max: u64) -> Vec<u64> {
    let mut w = vec![0u64; HEADER_WORDS];
    w[W_MAGIC] = MAGIC;
    w[W_VERSION] = VERSION;
    w[W_HEADER_WORDS] = HEADER_WORDS as u64;
    w[W_DEV] = id.dev;
    w[W_INO] = id.ino;
    w[W_BTIME_S] = id.btime.0;
    w[W_BTIME_NS] = id.btime.1;
    w[W_HEADER_HASH] = id.header_hash;
    w[W_NSECT] = id.nsect;
    w[W_SHADOW_WORDS] = shadow_words(id.nsect);
    for (i, c) in id.boot_id.chunks(8).enumerate() {
        w[W_BOOT_ID + i] = le_word(c);
    }
    w[W_BITS_MIN] = min;
    w[W_BITS_MAX] = max;
    w
}

const FILE_WORDS: u64 = HEADER_WORDS as u64 + 16;

#[test]
fn a_journal_of_this_cow_is_accepted_within_its_bit_bounds() {
    let id = id();
    let h = header(&id, 10, 20);
    for bits in [10, 15, 20] {
        assert_eq!(judge(&h, FILE_WORDS, &id, bits), Ok(()), "bits {bits}");
    }
    assert!(matches!(
        judge(&h, FILE_WORDS, &id, 9),
        Err(Mismatch::BitmapChanged {
            bits: 9,
            min: 10,
            max: 20
        })
    ));
    assert!(matches!(
        judge(&h, FILE_WORDS, &id, 21),
        Err(Mismatch::BitmapChanged { .. })
    ));
}

#[test]
fn every_identity_field_is_checked() {
    let good = id();
    let h = header(&good, 0, 0);
    let mut other = good.clone();
    other.ino += 1;
    assert_eq!(judge(&h, FILE_WORDS, &other, 0), Err(Mismatch::OtherFile));
    let mut other = good.clone();
    other.dev += 1;
    assert_eq!(judge(&h, FILE_WORDS, &other, 0), Err(Mismatch::OtherFile));
    let mut other = good.clone();
    other.btime.1 += 1;
    assert_eq!(judge(&h, FILE_WORDS, &other, 0), Err(Mismatch::OtherFile));
    let mut other = good.clone();
    other.header_hash ^= 1;
    assert_eq!(
        judge(&h, FILE_WORDS, &other, 0),
        Err(Mismatch::HeaderChanged)
    );
    let mut other = good.clone();
    other.nsect += 64;
    assert_eq!(
        judge(&h, FILE_WORDS, &other, 0),
        Err(Mismatch::HeaderChanged)
    );
    let mut other = good.clone();
    other.boot_id[35] ^= 1;
    assert_eq!(judge(&h, FILE_WORDS, &other, 0), Err(Mismatch::OtherBoot));
}

#[test]
fn shadow_masks_mark_exactly_the_sectors_of_a_range() {
    let naive = |r: Range<u64>| {
        let mut words = std::collections::BTreeMap::<u64, u64>::new();
        for s in r {
            *words.entry(s / 64).or_default() |= 1 << (s % 64);
        }
        words.into_iter().collect::<Vec<_>>()
    };
    for start in 0..200 {
        for len in [0, 1, 2, 63, 64, 65, 127, 128, 129, 200] {
            let r = start..start + len;
            assert_eq!(
                word_masks(r.clone()).collect::<Vec<_>>(),
                naive(r.clone()),
                "{r:?}"
            );
        }
    }
    // The last word of the sector space: no boundary after it.
    let top = u64::MAX - 70..u64::MAX;
    assert_eq!(word_masks(top.clone()).collect::<Vec<_>>(), naive(top));
    for (a, b) in [(5, 3), (5, 5)] {
        assert_eq!(word_masks(a..b).count(), 0);
    }
}

#[test]
fn damaged_headers_are_not_journals() {
    let id = id();
    let mut h = header(&id, 0, 0);
    assert!(matches!(
        judge(&h, HEADER_WORDS as u64, &id, 0),
        Err(Mismatch::NotAJournal(_))
    ));
    h[W_VERSION] = 2;
    assert!(matches!(
        judge(&h, FILE_WORDS, &id, 0),
        Err(Mismatch::NotAJournal(_))
    ));
    h[W_MAGIC] = 0;
    assert!(matches!(
        judge(&h, FILE_WORDS, &id, 0),
        Err(Mismatch::NotAJournal(_))
    ));
    assert!(matches!(
        judge(&[], 0, &id, 0),
        Err(Mismatch::NotAJournal(_))
    ));
}
