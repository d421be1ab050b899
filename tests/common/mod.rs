// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the integration tests: backing images with a known
//! pattern, the real UML tools, bitmap reading, a seeded random number
//! generator, stamped sectors to check data against a model, and:
//!
//! - [`daemon`]: the one launcher of `vhost-user-ubd serve` (a socket in a
//!   temporary directory, its log captured, a watchdog, killed on drop).
//! - [`client`]: a libblkio (`blkio` crate) vhost-user-blk client with the
//!   quirks of `docs/blkio-client.md` handled once.
//! - [`frontend`]: a raw vhost-user frontend (`vhost` crate) with
//!   hand-built split rings in memfd guest memory.
//! - [`handover`]: what the handover and migration tests share (the pause
//!   hook, `status --json`, a migration destination, the base check).
//!
//! Use it with `mod common;` in a test file. One-shot commands
//! (`vhost-user-ubd create`, `check`, ...) run [`BINARY`].
#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod frontend;
pub mod handover;
pub mod load;

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

/// The daemon binary built by cargo for this package.
pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-user-ubd");

/// The mtime every test backing file gets (2024-01-01 00:00:00 UTC).
pub const BACKING_MTIME: u64 = 1_704_067_200;

/// Content of backing byte `pos`: never zero for a whole sector, and
/// different in every sector.
pub fn backing_byte(pos: u64) -> u8 {
    let sector = pos / 512;
    let x = (sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24) as u8;
    x ^ (pos % 251) as u8 | 1
}

/// Writes a backing image of `size` bytes with the known pattern and the
/// fixed mtime.
pub fn make_backing(path: &Path, size: u64) {
    let data: Vec<u8> = (0..size).map(backing_byte).collect();
    std::fs::write(path, data).unwrap();
    set_mtime(path, BACKING_MTIME);
}

/// Sets a file's mtime (seconds since the epoch).
pub fn set_mtime(path: &Path, secs: u64) {
    let f = File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

/// Path of a required external tool; panics with the fix when missing.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run `make deps` (apt-get install uml-utilities)");
}

/// Runs a command, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command to completion: whether it succeeded, and its stdout and
/// stderr.
pub fn outcome(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `vhost-user-ubd ARGS --control PATH` (`status`, `resize`, ...): whether
/// it succeeded, and its stdout and stderr.
pub fn control_cli(args: &[&str], control: &Path) -> (bool, String) {
    outcome(
        Command::new(BINARY)
            .args(args)
            .arg("--control")
            .arg(control),
    )
}

/// `uml_moo COW OUT`: merges the COW over its backing into a new image.
pub fn uml_moo(cow: &Path, out: &Path) -> Vec<u8> {
    run(Command::new(tool("uml_moo")).arg(cow).arg(out));
    std::fs::read(out).unwrap()
}

/// The on-disk bitmap bytes of a V3 COW file (alignment from the header).
pub fn disk_bitmap(cow: &Path) -> Vec<u8> {
    let f = File::open(cow).unwrap();
    let bytes = vhost_user_ubd::cow::file::read_header_bytes(&f).unwrap();
    let h = vhost_user_ubd::cow::CowHeader::parse(&bytes).unwrap();
    let g = h.geometry().unwrap();
    let mut buf = vec![0u8; g.bitmap_len as usize];
    f.read_exact_at(&mut buf, g.bitmap_offset).unwrap();
    buf
}

/// Sectors whose bit is set in a bitmap of `nsect` sectors.
pub fn set_sectors(bitmap: &[u8], nsect: u64) -> Vec<u64> {
    (0..nsect)
        .filter(|&s| bitmap[(s / 8) as usize] & (1 << (s % 8)) != 0)
        .collect()
}

/// splitmix64: one well-mixed word from any `z` (seeds, stamps).
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded xorshift64* generator: tiny, deterministic, good enough for
/// choosing requests; failures reproduce from the printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// Bytes per sector.
pub const SECTOR: usize = 512;

/// The content of `sector` as written by write `id`: the sector number and
/// the id in the first 16 bytes (little endian), the rest 8-byte words of
/// a xorshift stream seeded from both. Never all zeros (the stream never
/// is), never the [`backing_byte`] pattern (whose bytes are all odd; byte 7,
/// the top of the sector number, is 0) and different for every
/// `(id, sector)`, so a read tells which write, and which sector of it,
/// it found ([`stamp_of`]).
pub fn stamp(id: u64, sector: u64) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    out[..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
    let mut x = splitmix(sector ^ id.rotate_left(32) ^ 0x5EED_5EED) | 1;
    for w in out[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// The stamps of write `id` for the `n` sectors from `first`, one after
/// the other (the data of one write request).
pub fn stamps(id: u64, first: u64, n: u64) -> Vec<u8> {
    (first..first + n).flat_map(|s| stamp(id, s)).collect()
}

/// The `(id, sector)` the first 16 bytes of `data` name, whether or not
/// the rest matches (for failure messages about garbage).
pub fn stamp_header(data: &[u8]) -> (u64, u64) {
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    (word(8), word(0))
}

/// `Some((id, sector))` when `data` is exactly [`stamp`]`(id, sector)`
/// (of any sector: compare it with the one read); `None` for anything else.
pub fn stamp_of(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() != SECTOR {
        return None;
    }
    let (id, sector) = stamp_header(data);
    (stamp(id, sector)[..] == *data).then_some((id, sector))
}
