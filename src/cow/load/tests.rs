// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of `load`.

use super::*;
use crate::cow::{create_cow, file::read_layout};

/// The bit count taken at open is the bitmap's, whatever lies past the
/// last sector (garbage there does not count) and with holes in between.
#[test]
fn bits_at_open_count_the_device_sectors_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    for sectors in [1000u64, 1003, 4096 * 8 + 5] {
        std::fs::write(&base, vec![7u8; (sectors * 512) as usize]).unwrap();
        let cow = dir.path().join(format!("c{sectors}.cow"));
        create_cow(&cow, &base, 4096).unwrap();
        let f = File::options().read(true).write(true).open(&cow).unwrap();
        let (_, g, _) = read_layout(&f, &cow).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes = vec![0u8; g.bitmap_len as usize];
        for (i, b) in bytes.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // a hole in the middle, data elsewhere, garbage at the end
            if !(100..3000).contains(&i) {
                *b = x as u8;
            }
        }
        f.write_all_at(&bytes[..100], g.bitmap_offset).unwrap();
        f.write_all_at(&bytes[3000.min(bytes.len())..], g.bitmap_offset + 3000)
            .unwrap();
        let (bm, bits) = load_bitmap(&f, &g).unwrap();
        assert_eq!(bits, bm.count_set(), "{sectors} sectors");
    }
}

/// Reading only the data ranges gives the bytes a plain read gives, for
/// windows that start and end in holes, in data, and past the end.
#[test]
fn reading_data_regions_matches_a_full_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(4 << 20).unwrap();
    let chunks: [(u64, usize, u8); 4] = [
        (100, 50, 0x11),
        (300_000, 9000, 0x22),
        (2_000_001, 3, 0x33),
        ((4 << 20) - 10, 10, 0x44),
    ];
    for (off, len, b) in chunks {
        f.write_all_at(&vec![b; len], off).unwrap();
    }
    let size = 4u64 << 20;
    for (off, len) in [
        (0u64, size as usize),
        (90, 70),
        (4096, 1 << 20),
        (150, 299_900),
        (305_000, 2_000_000),
        (2_000_002, 100_000),
        (size - 5, 5),
        (size - 100, 100),
        (1_000_000, 4096),
    ] {
        let mut want = vec![0u8; len];
        let n = f.read_at(&mut want, off).unwrap();
        assert_eq!(n, len, "window {off}+{len}");
        let mut got = vec![0u8; len];
        read_data_regions(&f, &mut got, off).unwrap();
        assert!(got == want, "window {off}+{len} differs");
    }
}
