// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crash journal of a COW disk: what a **process** crash must not lose.
//!
//! Invariant: **a write the guest saw complete is found again by the next
//! daemon on the same COW, flushed or not.** In writeback mode the bits of
//! completed first writes wait in memory (`unpersisted`, R5) until a FLUSH
//! or a checkpoint; their data is already in the kernel (page cache or
//! device), which a process crash does not touch. So before a completion is
//! posted, its sectors are marked in a shadow bitmap in a file mapped
//! `MAP_SHARED` (by default on tmpfs, `/dev/shm`): a store into the page
//! cache, no system call, and it outlives the process. The next daemon that
//! opens the COW replays the marked sectors whose bit is still clear into
//! `unpersisted`: they read from the COW again, and the next FLUSH (or
//! checkpoint) makes them durable with their bits (data sync -> bits ->
//! sync). Bits are never cleared (R7), so neither is the shadow: it is a
//! superset of the sectors this COW's daemons wrote, and it never needs
//! trimming.
//!
//! A power loss is R5's business, not this one's: the journal on tmpfs is
//! gone with the page cache, and a journal on a disk is refused after a
//! reboot (boot id).
//!
//! A journal is applied only to the COW it belongs to, never to another one
//! or a changed one (each mismatch is logged and the journal set aside):
//! - the same file: device, inode and birth time (a copy, or a new COW that
//!   reuses the inode number, is another file);
//! - the same header bytes (backing, size, mtime, layout) and geometry;
//! - the same host boot (`/proc/sys/kernel/random/boot_id`);
//! - a bitmap no daemon of this journal could have left: between the bits
//!   set when its session opened the COW (`bits_min`: bits are never
//!   cleared, so fewer means the COW was replaced) and every bit that
//!   session may have written (`bits_max`, raised before each bitmap write
//!   is issued). More bits mean another writer (UML, or a later session
//!   whose journal this is not: an older copy of the journal) changed the
//!   COW after it.

use std::{
    fs::{File, OpenOptions},
    io,
    ops::Range,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::UNIX_EPOCH,
};

use thiserror::Error;

use crate::{
    cow::{load::read_data_regions, CowFile},
    engine::shm::SharedWords,
};

/// "VUBJRNL1", little-endian.
const MAGIC: u64 = u64::from_le_bytes(*b"VUBJRNL1");
const VERSION: u64 = 1;
/// Header size in words (one page); the shadow bitmap follows it.
const HEADER_WORDS: usize = 512;
const HEADER_BYTES: u64 = HEADER_WORDS as u64 * 8;

// Header word indices.
const W_MAGIC: usize = 0;
const W_VERSION: usize = 1;
const W_HEADER_WORDS: usize = 2;
const W_DEV: usize = 3;
const W_INO: usize = 4;
const W_BTIME_S: usize = 5;
const W_BTIME_NS: usize = 6;
const W_HEADER_HASH: usize = 7;
const W_NSECT: usize = 8;
const W_SHADOW_WORDS: usize = 9;
/// Five words: the 36-byte boot id, zero-padded.
const W_BOOT_ID: usize = 10;
const BOOT_ID_WORDS: usize = 5;
const W_BITS_MIN: usize = 15;
const W_BITS_MAX: usize = 16;
const W_SESSIONS: usize = 17;

/// Why a journal could not be used (the disk is then served without one).
#[derive(Debug, Error)]
pub enum JournalError {
    /// Creating, reading or mapping the journal file failed.
    #[error("crash journal {path}: {what}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The COW file's identity cannot be established.
    #[error("crash journal for {cow}: {why}")]
    NoIdentity {
        /// The COW file.
        cow: PathBuf,
        /// Why.
        why: String,
    },
}

/// What ties a journal to one COW file in one host boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Device of the COW file.
    pub dev: u64,
    /// Inode of the COW file.
    pub ino: u64,
    /// Birth time of the inode (seconds, nanoseconds).
    pub btime: (u64, u64),
    /// FNV-1a of the COW header bytes (everything before the bitmap).
    pub header_hash: u64,
    /// Sectors of the device.
    pub nsect: u64,
    /// This boot's id.
    pub boot_id: [u8; 40],
}

impl Identity {
    /// The identity of an open COW file in this boot.
    pub fn of(cow: &CowFile) -> Result<Self, JournalError> {
        let no = |why: String| JournalError::NoIdentity {
            cow: cow.path.clone(),
            why,
        };
        let meta = cow
            .meta_fd
            .metadata()
            .map_err(|e| no(format!("cannot stat it: {e}")))?;
        let btime = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .ok_or_else(|| {
                no(
                    "its file system reports no birth time (statx btime), which tells a \
                    COW from a new one that reuses its inode number"
                        .into(),
                )
            })?;
        let head_len = usize::try_from(cow.geometry.bitmap_offset.min(64 * 1024))
            .map_err(|_| no("header too large".into()))?;
        let mut head = vec![0u8; head_len];
        cow.meta_fd
            .read_exact_at(&mut head, 0)
            .map_err(|e| no(format!("cannot read its header: {e}")))?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            btime: (btime.as_secs(), u64::from(btime.subsec_nanos())),
            header_hash: fnv1a(&head),
            nsect: cow.geometry.nsect,
            boot_id: boot_id().map_err(|e| no(format!("cannot read the boot id: {e}")))?,
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn boot_id() -> io::Result<[u8; 40]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let mut id = [0u8; 40];
    for (d, b) in id.iter_mut().zip(s.trim().bytes()) {
        *d = b;
    }
    Ok(id)
}

/// Why an existing journal was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Not a journal of this version (bad magic, version or size).
    NotAJournal(String),
    /// Written in another boot of the host.
    OtherBoot,
    /// Belongs to another file (device, inode or birth time differ).
    OtherFile,
    /// The COW header changed (backing, size, mtime or layout).
    HeaderChanged,
    /// The COW's bitmap holds bits no session of this journal wrote, or
    /// fewer than it started with.
    BitmapChanged {
        /// Bits set in the COW now.
        bits: u64,
        /// Bits when the journal's session opened it.
        min: u64,
        /// Bits that session may have written.
        max: u64,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAJournal(why) => write!(f, "not a journal of this version ({why})"),
            Self::OtherBoot => f.write_str("it was written before the host rebooted"),
            Self::OtherFile => f.write_str(
                "it belongs to another file (device, inode or birth time differ: a copy, \
                 or a new COW in the old one's place)",
            ),
            Self::HeaderChanged => f.write_str("the COW header changed since it was written"),
            Self::BitmapChanged { bits, min, max } => write!(
                f,
                "the COW's bitmap changed since it was written ({bits} bits set, the journal's \
                 daemon saw {min} and wrote at most {max}): another program wrote the COW, or \
                 this is an older copy of the journal"
            ),
        }
    }
}

/// Decides whether journal header `words` belongs to `id` whose bitmap
/// now has `bits` bits set. `file_words` is the journal file's length in
/// words.
pub fn judge(words: &[u64], file_words: u64, id: &Identity, bits: u64) -> Result<(), Mismatch> {
    let w = |i: usize| words.get(i).copied().unwrap_or(0);
    if w(W_MAGIC) != MAGIC {
        return Err(Mismatch::NotAJournal("bad magic".into()));
    }
    if w(W_VERSION) != VERSION || w(W_HEADER_WORDS) != HEADER_WORDS as u64 {
        return Err(Mismatch::NotAJournal(format!(
            "version {} with a header of {} words",
            w(W_VERSION),
            w(W_HEADER_WORDS)
        )));
    }
    let shadow = shadow_words(id.nsect);
    if w(W_NSECT) != id.nsect || w(W_SHADOW_WORDS) != shadow {
        return Err(Mismatch::HeaderChanged);
    }
    if file_words < (HEADER_WORDS as u64).saturating_add(shadow) {
        return Err(Mismatch::NotAJournal(format!(
            "{file_words} words long, {shadow} shadow words expected"
        )));
    }
    let boot = id.boot_id.chunks(8).map(le_word);
    if !(W_BOOT_ID..).zip(boot).all(|(i, b)| w(i) == b) {
        return Err(Mismatch::OtherBoot);
    }
    if w(W_DEV) != id.dev || w(W_INO) != id.ino || (w(W_BTIME_S), w(W_BTIME_NS)) != id.btime {
        return Err(Mismatch::OtherFile);
    }
    if w(W_HEADER_HASH) != id.header_hash {
        return Err(Mismatch::HeaderChanged);
    }
    let (min, max) = (w(W_BITS_MIN), w(W_BITS_MAX));
    if bits < min || bits > max {
        return Err(Mismatch::BitmapChanged { bits, min, max });
    }
    Ok(())
}

fn le_word(chunk: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(chunk) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

fn shadow_words(nsect: u64) -> u64 {
    nsect.div_ceil(64)
}

/// Sectors in `runs` (ordered, non-empty runs of one device: the sum
/// cannot overflow, so saturating never changes it).
fn run_sectors(runs: &[Range<u64>]) -> u64 {
    runs.iter()
        .map(|r| r.end.saturating_sub(r.start))
        .fold(0, u64::saturating_add)
}

/// The shadow bitmap words of `sectors` and the bits to set in each, in
/// order: `(word, mask)`, bit `s % 64` of word `s / 64` for sector `s`.
fn word_masks(sectors: Range<u64>) -> impl Iterator<Item = (u64, u64)> {
    let end = sectors.end;
    let mut s = sectors.start;
    std::iter::from_fn(move || {
        if s >= end {
            return None;
        }
        // This word's sectors end at the next word boundary or at `end`;
        // `s | 63` is the last sector of the word.
        let stop = (s | 63).checked_add(1).map_or(end, |next| next.min(end));
        let (first, last) = (s % 64, stop % 64);
        // Bits `first..last` (`last` 0: up to the word's end).
        let high = if last == 0 {
            u64::MAX
        } else {
            !(u64::MAX << last)
        };
        let item = (s / 64, (u64::MAX << first) & high);
        s = stop;
        Some(item)
    })
}

/// Where the journal of a COW lives in `dir`.
pub fn path_in(dir: &Path, id: &Identity) -> PathBuf {
    dir.join(format!("vhost-user-ubd-{:x}-{:x}.journal", id.dev, id.ino))
}

/// What is in `dir` for a COW, as `check` reports it.
#[derive(Debug)]
pub enum Pending {
    /// No journal.
    None,
    /// A journal of this COW: `serve` would recover `sectors` sectors.
    Applies {
        /// The journal file.
        path: PathBuf,
        /// Sectors completed but not in the bitmap.
        sectors: u64,
    },
    /// A journal that `serve` would set aside.
    Refused {
        /// The journal file.
        path: PathBuf,
        /// Why.
        why: Mismatch,
    },
}

/// Looks at the journal `serve` would find for `cow` in `dir`, changing
/// nothing.
pub fn pending(dir: &Path, cow: &CowFile) -> Result<Pending, JournalError> {
    let id = Identity::of(cow)?;
    let path = path_in(dir, &id);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Pending::None),
        Err(source) => {
            return Err(JournalError::Io {
                path,
                what: "opening",
                source,
            })
        }
    };
    if let Err(why) = Journal::check(&f, &id, cow.bits_at_open) {
        return Ok(Pending::Refused { path, why });
    }
    let runs = replay(&f, cow).map_err(|source| JournalError::Io {
        path: path.clone(),
        what: "reading the shadow bitmap",
        source,
    })?;
    Ok(Pending::Applies {
        path,
        sectors: run_sectors(&runs),
    })
}

/// What opening a journal found.
#[derive(Debug)]
pub struct Opened {
    /// The journal to record into (`None` for a read-only disk).
    pub journal: Option<Journal>,
    /// Sectors completed by an earlier daemon whose bit is still clear.
    pub recovered: Vec<Range<u64>>,
}

/// A COW's crash journal, mapped.
#[derive(Debug)]
pub struct Journal {
    map: SharedWords,
    path: PathBuf,
    nsect: u64,
}

impl Journal {
    /// Opens the journal of `cow` in `dir`: replays a journal that belongs
    /// to it (the sectors come back in [`Opened::recovered`]), sets aside
    /// one that does not (logged), and starts this session's journal (not
    /// for a read-only disk, which only replays).
    pub fn open(dir: &Path, cow: &CowFile, readonly: bool) -> Result<Opened, JournalError> {
        let id = Identity::of(cow)?;
        let path = path_in(dir, &id);
        let io_err = |what| {
            let path = path.clone();
            move |source| JournalError::Io { path, what, source }
        };
        let mut recovered = Vec::new();
        let mut reuse = false;
        match File::open(&path) {
            Ok(f) => match Self::check(&f, &id, cow.bits_at_open) {
                Ok(()) => {
                    recovered = replay(&f, cow).map_err(io_err("reading the shadow bitmap"))?;
                    let n = run_sectors(&recovered);
                    let level = if n == 0 {
                        log::Level::Debug
                    } else {
                        log::Level::Info
                    };
                    log::log!(
                        level,
                        "{}: crash journal {}: {n} sectors written and completed by the earlier \
                         daemon are not in the bitmap yet; they read from the COW and get their \
                         bits at the next flush",
                        cow.path.display(),
                        path.display()
                    );
                    reuse = true;
                }
                Err(why) => {
                    let aside = path.with_extension("journal.stale");
                    log::warn!(
                        "{}: crash journal {} not applied: {why}. Moved to {}; sectors it \
                         recorded read from the base until the guest writes them again",
                        cow.path.display(),
                        path.display(),
                        aside.display()
                    );
                    if !readonly {
                        std::fs::rename(&path, &aside).map_err(io_err("setting it aside"))?;
                    }
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("opening")(e)),
        }
        if readonly {
            return Ok(Opened {
                journal: None,
                recovered,
            });
        }
        let shadow = shadow_words(id.nsect);
        let too_large = || io_err("sizing")(io::Error::from(io::ErrorKind::OutOfMemory));
        let words =
            usize::try_from(shadow.saturating_add(HEADER_WORDS as u64)).map_err(|_| too_large())?;
        let bytes = (words as u64).checked_mul(8).ok_or_else(too_large)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("creating"))?;
        if !reuse {
            // A fresh journal: all zero, header written below, magic last.
            f.set_len(0).map_err(io_err("truncating"))?;
        }
        f.set_len(bytes).map_err(io_err("sizing"))?;
        let map = SharedWords::map(&f, words).map_err(io_err("mapping"))?;
        let j = Self {
            map,
            path,
            nsect: id.nsect,
        };
        // This session's bounds: the bits it found; raised as it writes bits.
        j.put(W_BITS_MIN, cow.bits_at_open);
        j.put(W_BITS_MAX, cow.bits_at_open);
        if reuse {
            j.put(W_SESSIONS, j.get(W_SESSIONS).saturating_add(1));
        } else {
            j.put(W_VERSION, VERSION);
            j.put(W_HEADER_WORDS, HEADER_WORDS as u64);
            j.put(W_DEV, id.dev);
            j.put(W_INO, id.ino);
            j.put(W_BTIME_S, id.btime.0);
            j.put(W_BTIME_NS, id.btime.1);
            j.put(W_HEADER_HASH, id.header_hash);
            j.put(W_NSECT, id.nsect);
            j.put(W_SHADOW_WORDS, shadow);
            for (i, c) in (W_BOOT_ID..).zip(id.boot_id.chunks(8)).take(BOOT_ID_WORDS) {
                j.put(i, le_word(c));
            }
            j.put(W_SESSIONS, 1);
            j.put(W_MAGIC, MAGIC);
        }
        Ok(Opened {
            journal: Some(j),
            recovered,
        })
    }

    fn check(f: &File, id: &Identity, bits: u64) -> Result<(), Mismatch> {
        let len = f.metadata().map_or(0, |m| m.len());
        let mut head = vec![0u8; HEADER_BYTES as usize];
        if len < HEADER_BYTES || f.read_exact_at(&mut head, 0).is_err() {
            return Err(Mismatch::NotAJournal(format!("{len} bytes long")));
        }
        let words: Vec<u64> = head.chunks(8).map(le_word).collect();
        judge(&words, len / 8, id, bits)
    }

    fn put(&self, i: usize, v: u64) {
        self.map.store(i, v.to_le());
    }

    fn get(&self, i: usize) -> u64 {
        u64::from_le(self.map.load(i))
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the writes of `sectors` completed (their data is in
    /// the kernel). Called before the completion is posted.
    pub fn record(&self, sectors: Range<u64>) {
        let end = sectors.end.min(self.nsect);
        for (word, mask) in word_masks(sectors.start..end) {
            if let Some(w) = usize::try_from(word)
                .ok()
                .and_then(|i| self.map.word(HEADER_WORDS.saturating_add(i)))
            {
                w.fetch_or(mask.to_le(), Ordering::Release);
            }
        }
    }

    /// Up to `n` more bits are about to be written to the COW's bitmap.
    /// Called before the bitmap write is issued.
    /// One thread (the durability thread) calls it.
    pub fn raise_max(&self, n: u64) {
        if n > 0 {
            self.put(W_BITS_MAX, self.get(W_BITS_MAX).saturating_add(n));
        }
    }

    /// Everything is durable (clean shutdown): the journal is not needed.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!(
                "crash journal {}: cannot remove it: {e}",
                self.path.display()
            );
        }
    }
}

/// Sectors marked in the shadow bitmap of journal `f` whose bit is clear in
/// `cow`, as ordered runs.
fn replay(f: &File, cow: &CowFile) -> io::Result<Vec<Range<u64>>> {
    let nsect = cow.geometry.nsect;
    let len = usize::try_from(shadow_words(nsect).saturating_mul(8))
        .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    let mut buf = vec![0u8; len];
    let spans = read_data_regions(f, &mut buf, HEADER_BYTES)?;
    let mut runs: Vec<Range<u64>> = Vec::new();
    for span in spans {
        // The whole words around the span's bytes, inside `buf`.
        let lo = span.start & !7;
        let hi = span
            .end
            .checked_next_multiple_of(8)
            .unwrap_or(usize::MAX)
            .min(buf.len() & !7);
        let Some(words) = buf.get(lo..hi) else {
            continue;
        };
        for (wi, chunk) in (lo / 8..).zip(words.chunks_exact(8)) {
            let mut v = le_word(chunk);
            // One set bit at a time, lowest first.
            while let Some(rest) = v.checked_sub(1) {
                let bit = u64::from(v.trailing_zeros());
                v &= rest;
                let Some(s) = (wi as u64).checked_mul(64).and_then(|b| b.checked_add(bit)) else {
                    break;
                };
                // Sectors of the device only: `s < nsect`, so `s + 1` fits.
                let Some(next) = s.checked_add(1).filter(|&next| next <= nsect) else {
                    continue;
                };
                if cow.bitmap.test(s) {
                    continue;
                }
                match runs.last_mut() {
                    Some(r) if r.end == s => r.end = next,
                    _ => runs.push(s..next),
                }
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;
