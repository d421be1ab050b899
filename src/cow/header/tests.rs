// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of `header`.

use super::*;

fn v3_bytes(path: &str, size: u64, align: u32) -> Vec<u8> {
    CowHeader::new_v3(Path::new(path), 1_700_000_000, size, align, 512)
        .and_then(|h| h.to_v3_bytes())
        .unwrap()
}

#[test]
fn v3_round_trip_matches_the_documented_layout() {
    let b = v3_bytes("/images/base.img", 8 << 20, 4096);
    assert_eq!(b.len(), V3_HEADER_LEN);
    assert_eq!(&b[0..4], b"OOOM");
    assert_eq!(&b[4..8], &[0, 0, 0, 3]);
    assert_eq!(&b[8..12], &1_700_000_000u32.to_be_bytes());
    assert_eq!(&b[12..20], &(8u64 << 20).to_be_bytes());
    assert_eq!(&b[20..24], &[0, 0, 2, 0]);
    assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
    assert_eq!(&b[28..32], &[0, 0, 0, 0]);
    assert_eq!(&b[32..48], b"/images/base.img");
    assert!(b[48..].iter().all(|&c| c == 0));
    let h = CowHeader::parse(&b).unwrap();
    assert_eq!(h.version, CowVersion::V3);
    assert_eq!(h.backing_file, Path::new("/images/base.img"));
    assert_eq!(h.size, 8 << 20);
}

#[test]
fn v3_geometry_of_documented_examples() {
    let g = CowHeader::parse(&v3_bytes("/b", 1 << 30, 4096))
        .unwrap()
        .geometry()
        .unwrap();
    assert_eq!(
        (g.nsect, g.bitmap_offset, g.bitmap_len, g.data_offset),
        (2_097_152, 8192, 262_144, 270_336)
    );
    assert_eq!(g.initial_file_len(), 1_074_012_160);
    let g = CowHeader::parse(&v3_bytes("/b", 1 << 30, 512))
        .unwrap()
        .geometry()
        .unwrap();
    assert_eq!((g.bitmap_offset, g.data_offset), (4608, 266_752));
    assert_eq!(g.initial_file_len(), 1_074_008_576);
    let g = CowHeader::parse(&v3_bytes("/b", 8 << 20, 4096))
        .unwrap()
        .geometry()
        .unwrap();
    assert_eq!((g.bitmap_len, g.data_offset), (2048, 12_288));
    assert_eq!(g.initial_file_len(), 8_400_896);
    let g = CowHeader::parse(&v3_bytes("/b", (8 << 20) + 100, 4096))
        .unwrap()
        .geometry()
        .unwrap();
    assert_eq!(
        (g.nsect, g.bitmap_len, g.data_offset),
        (16_385, 2049, 12_288)
    );
    assert_eq!(g.initial_file_len(), 8_400_996);
}

fn v3b_bytes(path: &str, size: u64, align: u32) -> Vec<u8> {
    let mut b = vec![0u8; V3B_HEADER_LEN];
    b[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[8..12].copy_from_slice(&1234u32.to_be_bytes());
    b[16..24].copy_from_slice(&size.to_be_bytes());
    b[24..28].copy_from_slice(&512u32.to_be_bytes());
    b[28..32].copy_from_slice(&align.to_be_bytes());
    b[36..36 + path.len()].copy_from_slice(path.as_bytes());
    b
}

#[test]
fn v3_broken_layout_is_detected_by_the_zero_word() {
    let h = CowHeader::parse(&v3b_bytes("/base", 1 << 20, 512)).unwrap();
    assert_eq!(h.version, CowVersion::V3Broken);
    assert_eq!((h.mtime, h.size, h.alignment), (1234, 1 << 20, 512));
    assert_eq!(h.backing_file, Path::new("/base"));
    let g = h.geometry().unwrap();
    assert_eq!((g.bitmap_offset, g.bitmap_len), (4608, 256));
}

fn v2_bytes(path: &str, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; V2_HEADER_LEN];
    b[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&2u32.to_be_bytes());
    b[8..8 + path.len()].copy_from_slice(path.as_bytes());
    b[4104..4108].copy_from_slice(&99u32.to_be_bytes());
    b[4108..4116].copy_from_slice(&size.to_be_bytes());
    b[4116..4120].copy_from_slice(&512u32.to_be_bytes());
    b
}

#[test]
fn v2_uses_the_rounding_bug_geometry() {
    let h = CowHeader::parse(&v2_bytes("/base", 1 << 30)).unwrap();
    assert_eq!((h.version, h.mtime, h.alignment), (CowVersion::V2, 99, 512));
    let g = h.geometry().unwrap();
    assert_eq!(
        (g.bitmap_offset, g.bitmap_len, g.data_offset),
        (4120, 262_144, 266_752)
    );
    // 13 sectors: the V2 bitmap holds only 8 of them.
    let g = CowHeader::parse(&v2_bytes("/base", 13 * 512))
        .unwrap()
        .geometry()
        .unwrap();
    assert_eq!((g.nsect, g.bitmap_len, g.bitmap_sectors()), (13, 1, 8));
}

fn v1_bytes(path: &str, size: u64, swapped_magic: bool) -> Vec<u8> {
    let mut b = vec![0u8; V1_HEADER_LEN];
    let magic = if swapped_magic {
        COW_MAGIC.swap_bytes()
    } else {
        COW_MAGIC
    };
    let version = if swapped_magic { 1u32.swap_bytes() } else { 1 };
    b[0..4].copy_from_slice(&magic.to_ne_bytes());
    b[4..8].copy_from_slice(&version.to_ne_bytes());
    b[8..8 + path.len()].copy_from_slice(path.as_bytes());
    b[264..268].copy_from_slice(&7u32.to_ne_bytes());
    b[268..276].copy_from_slice(&size.to_ne_bytes());
    b[276..280].copy_from_slice(&512u32.to_ne_bytes());
    b
}

#[test]
fn v1_reads_host_order_fields_with_magic_in_either_order() {
    for swapped in [false, true] {
        let h = CowHeader::parse(&v1_bytes("/old", 64 << 10, swapped)).unwrap();
        assert_eq!((h.version, h.mtime, h.size), (CowVersion::V1, 7, 64 << 10));
        let g = h.geometry().unwrap();
        assert_eq!(
            (g.bitmap_offset, g.bitmap_len, g.data_offset),
            (280, 16, 512)
        );
    }
}

#[test]
fn corrupt_headers_name_the_field() {
    let good = v3_bytes("/b", 1 << 20, 4096);
    assert!(matches!(
        CowHeader::parse(&good[..100]),
        Err(HeaderError::Truncated {
            needed: 4128,
            got: 100,
            ..
        })
    ));
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        CowHeader::parse(&b),
        Err(HeaderError::BadMagic { .. })
    ));
    let mut b = good.clone();
    b[7] = 9;
    assert_eq!(CowHeader::parse(&b), Err(HeaderError::BadVersion(9)));
    let mut b = good.clone();
    b[24..28].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(CowHeader::parse(&b), Err(HeaderError::BadAlignment(0)));
    let mut b = good.clone();
    b[20..24].copy_from_slice(&4096u32.to_be_bytes());
    let h = CowHeader::parse(&b).unwrap();
    assert_eq!(h.sectorsize, 4096);
    let g = h.geometry().unwrap();
    assert_eq!(g.shift(), 3);
    assert_eq!(g.nsect, h.size.div_ceil(4096));
    assert_eq!(g.disk_sectors(), h.size.div_ceil(512));
    assert_eq!(g.bits_of(7..9), 0..2);
    assert_eq!(g.bits_of(8..16), 1..2);
    for bad in [0u32, 256, 1000, 3 * 512, 128 * 1024] {
        b[20..24].copy_from_slice(&bad.to_be_bytes());
        assert_eq!(CowHeader::parse(&b), Err(HeaderError::BadSectorSize(bad)));
    }
    let mut b = good.clone();
    b[32..].fill(b'a');
    assert_eq!(
        CowHeader::parse(&b),
        Err(HeaderError::PathNotTerminated(4096))
    );
    let mut b = good;
    b[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        CowHeader::parse(&b),
        Err(HeaderError::SizeOverflow(u64::MAX))
    );
    assert!(CowHeader::parse(&[]).is_err());
}

#[test]
fn garbage_after_the_path_nul_is_ignored() {
    let mut b = v3_bytes("/b", 1 << 20, 4096);
    b[4097..4100].copy_from_slice(&[1, 2, 3]);
    assert_eq!(CowHeader::parse(&b).unwrap().backing_file, Path::new("/b"));
}

#[test]
fn path_too_long_is_refused_on_write() {
    let long = format!("/{}", "a".repeat(4095));
    assert_eq!(
        CowHeader::new_v3(Path::new(&long), 0, 512, 4096, 512),
        Err(HeaderError::PathTooLong(4096))
    );
}
