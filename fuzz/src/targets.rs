// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target bodies, shared by the libFuzzer binaries (`fuzz/fuzz_targets`)
//! and the regression replay in `tests/fuzz_replay.rs` (which runs every
//! committed corpus file through them in `make test`).
#![allow(dead_code)]

use std::{os::unix::fs::FileExt, time::Duration};

use vhost_user_ubd::{
    blk::request::{self, RequestType, SECTOR},
    cow::{create_cow, CowHeader, CowVersion},
    disk::{open_cow, Blocking, DiskOptions, Op},
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_BASE: u64 = 0x1000;
const MEM_LEN: usize = 0x10000;

/// Descriptor chains (any layout, any address, any length) parsed into
/// requests; the result must be self-consistent and its buffers mappable.
pub fn request(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MEM_BASE), MEM_LEN)]) else {
        return;
    };
    // The first 256 bytes seed guest memory (headers, discard ranges).
    let (seed, rest) = data.split_at(data.len().min(256));
    let _ = mem.write_slice(seed, GuestAddress(MEM_BASE));
    let _ = mem.write_slice(seed, GuestAddress(MEM_BASE + 0x100));
    let descs: Vec<(GuestAddress, u32, bool)> = rest
        .chunks_exact(9)
        .take(64)
        .map(|c| {
            let a = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let l = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            // Mostly addresses near guest memory, sometimes anywhere.
            let addr = if c[8] & 0x80 != 0 {
                u64::from(a) << (c[8] & 0x1f)
            } else {
                MEM_BASE + u64::from(a % 0x11000)
            };
            let len = if c[8] & 0x40 != 0 { l } else { l % 0x3000 };
            (GuestAddress(addr), len, c[8] & 1 != 0)
        })
        .collect();
    match request::parse(descs.iter().copied(), &mem) {
        Ok(r) => {
            let total: u64 = r.data.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(total, r.data_len, "data_len disagrees with the buffers");
            if matches!(r.rtype, RequestType::In | RequestType::Out) {
                assert_eq!(r.data_len % SECTOR, 0);
            }
            assert!(mem.check_range(r.status, 1), "status byte outside memory");
            for s in &r.data {
                // What the backend does to build iovecs: must not panic.
                for slice in mem.get_slices(s.addr, s.len as usize) {
                    if slice.is_err() {
                        break;
                    }
                }
            }
        }
        Err(bad) => {
            if let Some(st) = bad.status {
                assert!(mem.check_range(st, 1), "status byte outside memory");
            }
        }
    }
}

/// COW header parsing: never panics; a header that parses has a sane
/// geometry, and V3 headers survive a write/parse round trip.
pub fn cow_header(data: &[u8]) {
    let Ok(h) = CowHeader::parse(data) else {
        return;
    };
    let g = h.geometry().expect("a parsed header has a geometry");
    assert!(g.data_offset >= g.bitmap_offset + g.bitmap_len);
    assert!(g.bitmap_offset >= h.version.header_len() as u64);
    if matches!(h.version, CowVersion::V3 | CowVersion::V3Broken) {
        assert!(g.bitmap_len * 8 >= g.nsect);
    }
    if h.version == CowVersion::V3 {
        let bytes = h.to_v3_bytes().expect("serialises");
        let again = CowHeader::parse(&bytes).expect("own output parses");
        assert_eq!(again, h);
    }
}

/// Request sequences on a small COW disk against a model of its content,
/// with clean reopen cycles.
pub fn disk_ops(data: &[u8]) {
    const SECTORS: u64 = 64;
    let Some((&mode, ops)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.img");
    let backing: Vec<u8> = (0..SECTORS * SECTOR)
        .map(|i| (i / SECTOR) as u8 ^ (i as u8) | 1)
        .collect();
    std::fs::write(&base, &backing).expect("backing");
    let cow = dir.path().join("d.cow");
    create_cow(&cow, &base, if mode & 1 != 0 { 512 } else { 4096 }).expect("create");
    let opts = DiskOptions {
        writeback: mode & 2 == 0,
        max_pending_extents: 1 + usize::from(mode >> 4),
        max_pending_age: Duration::from_secs(3600),
        ..DiskOptions::default()
    };
    let mut model = backing.clone();
    let mut disk = open_cow(&cow, &opts).expect("open");
    let mut q = Blocking::new(disk.as_ref()).expect("queue");
    for op in ops.chunks_exact(4).take(200) {
        let sector = u64::from(op[1]) % (SECTORS + 4);
        let n = u64::from(op[2] % 9);
        let in_range = sector + n <= SECTORS;
        let range = (sector * SECTOR) as usize..((sector + n) * SECTOR) as usize;
        match op[0] % 6 {
            0 => {
                let mut buf = vec![0u8; (n * SECTOR) as usize];
                let r = q.read(sector, &mut buf);
                if in_range {
                    assert_eq!(r, Ok(()));
                    assert!(
                        buf == model[range],
                        "read {sector}+{n} differs from the model"
                    );
                } else {
                    assert!(r.is_err(), "out-of-range read succeeded");
                }
            }
            1 => {
                let buf: Vec<u8> = (0..n * SECTOR).map(|i| op[3] ^ (i as u8)).collect();
                let r = q.write(sector, &buf);
                if in_range {
                    assert_eq!(r, Ok(()));
                    model[range].copy_from_slice(&buf);
                } else {
                    assert!(r.is_err(), "out-of-range write succeeded");
                }
            }
            2 | 3 => {
                let o = if op[0] % 6 == 2 {
                    Op::Discard { sector, nsect: n }
                } else {
                    Op::WriteZeroes {
                        sector,
                        nsect: n,
                        unmap: op[3] & 1 != 0,
                    }
                };
                let r = q.run(o);
                if in_range {
                    assert_eq!(r, Ok(()));
                    model[range].fill(0);
                } else {
                    assert!(r.is_err(), "out-of-range zeroing succeeded");
                }
            }
            4 => assert_eq!(q.flush(), Ok(())),
            _ => {
                // Clean close and reopen: everything persists.
                drop(q);
                disk.shutdown().expect("shutdown");
                drop(disk);
                disk = open_cow(&cow, &opts).expect("reopen");
                q = Blocking::new(disk.as_ref()).expect("queue");
            }
        }
    }
    let mut all = vec![0u8; model.len()];
    assert_eq!(q.read(0, &mut all), Ok(()));
    assert!(all == model, "final content differs from the model");
    drop(q);
    disk.shutdown().expect("shutdown");
    // The backing file is never written (R6).
    let f = std::fs::File::open(&base).expect("backing");
    let mut now = vec![0u8; backing.len()];
    f.read_exact_at(&mut now, 0).expect("read backing");
    assert!(now == backing, "the backing file changed");
}
