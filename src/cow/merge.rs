// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-ubd merge`: a COW file merged offline with its backing into
//! a raw image, or with `--in-place` into the backing file itself.
//!
//! What comes out is what `uml_moo` makes, byte for byte
//! (`docs/merge.md`; the tool's source and the checks in `tests/merge.rs`):
//!
//! - Only *complete* COW sectors (of the header's `sectorsize`) are merged:
//!   the image is `floor(size / sectorsize) * sectorsize` bytes long and a
//!   trailing partial COW sector is dropped, even when its bit is set.
//! - A set bit takes the sector from the COW's data area (byte-linear at
//!   `data_offset`), a clear one from the backing at the same offset. Bits
//!   past the on-disk bitmap of a V1/V2 header do not exist: those sectors
//!   come from the backing (`uml_moo` reads past its buffer there and finds
//!   zeros).
//! - In place (`uml_moo -d`): only the sectors whose bit is set are written
//!   into the backing; a zero sector only where the backing is not zero
//!   already. The backing keeps its size; its mtime changes with the first
//!   write, so this COW, and every other COW made over that backing, no
//!   longer matches it.
//!
//! How, unlike `uml_moo`'s pread/pwrite pair per sector: the image is
//! walked in windows of [`WINDOW`] bytes; each window's bitmap bits are
//! split into runs of one value, each run is read with large `pread`s into
//! one reused buffer from the COW (set) or the backing (clear), and the
//! sources' holes (`SEEK_DATA`/`SEEK_HOLE`, remembered per file) are
//! skipped without reading. Only the non-zero [`GRANULE`]s are written: the
//! image is sized first and stays sparse wherever the data is zero.
//!
//! Safety of the files: the COW carries an OFD read lock (write lock in
//! place) and the backing a read lock (write lock in place), which conflict
//! with a daemon serving the COW (write lock on it, read lock on its
//! backing) and with UML's POSIX locks. The image is written under a
//! temporary name beside the target, synced and renamed: a failed or
//! interrupted merge leaves no half image behind.

use std::{
    fs::{File, OpenOptions},
    io::{self, IsTerminal, Write},
    ops::Range,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use thiserror::Error;

use super::{
    bitmap::Bitmap,
    file::{
        backing_size, bitmap_read, check_backing_with, ofd_lock, read_layout, BackingCheck,
        CowFileError,
    },
    header::{CowHeader, Geometry},
    load::load_bitmap,
};

/// Bytes of the image handled per step: the read buffer's size and the
/// largest `pread`/`pwrite`.
pub const WINDOW: usize = 4 << 20;
/// Bytes of the image tested for zeros as one: an all-zero granule is not
/// written (it stays a hole).
pub const GRANULE: usize = 4096;
const GRANULE_U64: u64 = 4096;

/// Where the merge goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A new raw image (`uml_moo COW OUT`).
    File {
        /// The image to write.
        path: PathBuf,
        /// Replace it if it exists.
        force: bool,
    },
    /// Into the backing file itself (`uml_moo -d COW`).
    InPlace,
}

/// What to merge.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// The COW file.
    pub cow: PathBuf,
    /// The image to write, or the backing in place.
    pub target: Target,
    /// Backing file to use instead of the header's path (`uml_moo -b`).
    pub backing: Option<PathBuf>,
    /// What the backing is checked for against the header.
    pub backing_check: BackingCheck,
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// A progress bar on stderr when it is a terminal, nothing otherwise.
    Text,
    /// One JSON line a second on stdout, and a last one with `"done": true`.
    Json,
}

/// Why a merge failed. Every message names the file and what to do.
#[derive(Debug, Error)]
pub enum MergeError {
    /// Opening, reading or checking the COW or its backing failed.
    #[error(transparent)]
    Cow(#[from] CowFileError),
    /// The COW or the backing is in use.
    #[error("cannot merge: {role} {path} is in use: locked by {holder}. {fix}")]
    InUse {
        /// "COW file" or "backing file".
        role: &'static str,
        /// The locked file.
        path: PathBuf,
        /// Who holds the lock, as far as the kernel says.
        holder: String,
        /// What to do.
        fix: &'static str,
    },
    /// The target exists and `--force` was not given.
    #[error("{path} exists: give --force to replace it, or name another file")]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// The target is one of the merge's inputs.
    #[error(
        "{path} is the {what} of the merge: writing it would destroy what is merged. Name \
         another file (or merge into the backing with --in-place)"
    )]
    TargetIsInput {
        /// The target.
        path: PathBuf,
        /// "COW file" or "backing file".
        what: &'static str,
    },
    /// The target exists and is not a regular file.
    #[error("{path} exists and is not a regular file: merge into a new file")]
    TargetNotFile {
        /// The target.
        path: PathBuf,
    },
    /// `--in-place` without any backing check.
    #[error(
        "--in-place writes into backing file {path}: it is only done with --backing-check \
         size+mtime or size, so that it is the file the COW was made over"
    )]
    InPlaceUnchecked {
        /// The backing file.
        path: PathBuf,
    },
    /// A daemon that died left completed writes in its crash journal.
    #[error(
        "COW file {cow}: crash journal {journal} holds {sectors} sectors a daemon wrote and \
         completed before it died, not in the bitmap yet: the merge would read them from the \
         backing. Serve the COW once (the daemon applies them; a clean stop writes their bits), \
         then merge"
    )]
    PendingJournal {
        /// The COW file.
        cow: PathBuf,
        /// The journal file.
        journal: PathBuf,
        /// Sectors the journal holds.
        sectors: u64,
    },
    /// Reading or writing failed.
    #[error("merge of {cow}: cannot {what} {path}: {source}")]
    Io {
        /// The COW file.
        cow: PathBuf,
        /// What was done.
        what: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A signal stopped a merge into a new file; nothing was left behind.
    #[error("merge of {cow} interrupted by signal {signal}: {path} was not written")]
    Interrupted {
        /// The COW file.
        cow: PathBuf,
        /// The image that was not made.
        path: PathBuf,
        /// The signal.
        signal: i32,
    },
    /// A signal stopped an in-place merge half-way.
    #[error(
        "in-place merge of {cow} interrupted by signal {signal}: backing file {path} is partly \
         merged (only sectors the COW holds were written, so the COW still reads the same, but \
         the backing's mtime may have changed). Finish it with `vhost-user-ubd merge --in-place \
         --backing-check size {cow}`"
    )]
    InterruptedInPlace {
        /// The COW file.
        cow: PathBuf,
        /// The backing file.
        path: PathBuf,
        /// The signal.
        signal: i32,
    },
    /// The progress output could not be written.
    #[error("cannot write the progress output: {0}")]
    Output(#[source] io::Error),
}

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the image that were merged (all of it; in place, the
    /// sectors whose bit is set).
    pub bytes_total: u64,
    /// Bytes read from the sources.
    pub bytes_read: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Bytes of source holes skipped without reading.
    pub hole_bytes: u64,
    /// Bytes read that were zero and not written.
    pub zero_bytes: u64,
    /// Runs of one bit value merged.
    pub runs: u64,
}

/// The result of [`merge`].
#[derive(Clone, Debug)]
pub struct Summary {
    /// The file written (the image, or the backing in place).
    pub target: PathBuf,
    /// What was done.
    pub stats: Stats,
    /// How long it took.
    pub elapsed: Duration,
    /// Bytes at the end of the disk (a partial COW sector) that are not
    /// merged, as `uml_moo` drops them.
    pub dropped_tail: u64,
    /// Of `elapsed`, the time spent making the target durable (fsync).
    pub sync: Duration,
}

fn io_err(cow: &Path, what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MergeError {
    let (cow, path) = (cow.to_path_buf(), path.to_path_buf());
    move |source| MergeError::Io {
        cow,
        what,
        path,
        source,
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_owned())
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| invalid("offset beyond the address space"))
}

/// The COW and its backing, opened, locked and checked.
struct Sources {
    cow: File,
    backing: File,
    backing_path: PathBuf,
    header: CowHeader,
    geometry: Geometry,
    bitmap: Bitmap,
}

fn lock(
    file: &File,
    path: &Path,
    write: bool,
    role: &'static str,
    in_place: bool,
) -> Result<(), MergeError> {
    match ofd_lock(file, path, write, role) {
        Ok(()) => Ok(()),
        Err(CowFileError::Locked {
            role, path, holder, ..
        }) => {
            let fix = match (role, in_place) {
                ("COW file", _) => {
                    "Stop the vhost-user-ubd daemon or UML guest serving it first (a served COW's \
                     newest bits may be in memory only), then merge again"
                }
                (_, true) => {
                    "Every daemon or UML guest serving a COW over it reads it: stop them first. \
                     Note that merging into a backing file invalidates every other COW made over \
                     it; merge into a new file (without --in-place) to keep them"
                }
                (_, false) => {
                    "Another tool is writing it (an in-place merge?): wait until it has finished"
                }
            };
            Err(MergeError::InUse {
                role,
                path,
                holder,
                fix,
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn open_sources(opts: &MergeOptions) -> Result<Sources, MergeError> {
    let in_place = opts.target == Target::InPlace;
    let cow_path = &opts.cow;
    let cow = OpenOptions::new()
        .read(true)
        .write(in_place)
        .open(cow_path)
        .map_err(|source| CowFileError::Open {
            path: cow_path.clone(),
            source,
        })?;
    lock(&cow, cow_path, in_place, "COW file", in_place)?;
    let (header, geometry, _) = read_layout(&cow, cow_path)?;
    let backing_path = opts
        .backing
        .clone()
        .unwrap_or_else(|| header.backing_file.clone());
    if in_place && opts.backing_check == BackingCheck::None {
        return Err(MergeError::InPlaceUnchecked { path: backing_path });
    }
    let backing_err = |source| CowFileError::OpenBacking {
        cow: cow_path.clone(),
        backing: backing_path.clone(),
        source,
    };
    let backing = OpenOptions::new()
        .read(true)
        .write(in_place)
        .open(&backing_path)
        .map_err(backing_err)?;
    lock(&backing, &backing_path, in_place, "backing file", in_place)?;
    let meta = backing.metadata().map_err(backing_err)?;
    let size = backing_size(&backing, &meta).map_err(backing_err)?;
    check_backing_with(
        cow_path,
        &backing_path,
        &header,
        &meta,
        size,
        opts.backing_check,
    )?;
    let (bitmap, _) = load_bitmap(&cow, &geometry).map_err(|e| bitmap_read(cow_path, e))?;
    Ok(Sources {
        cow,
        backing,
        backing_path,
        header,
        geometry,
        bitmap,
    })
}

/// What [`merge_files`] merges: the complete COW sectors of a geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Bytes one bit covers.
    pub sectorsize: u64,
    /// Complete COW sectors (what `uml_moo` merges).
    pub sectors: u64,
    /// File offset of the COW's data area.
    pub data_offset: u64,
}

impl Plan {
    /// The plan of a COW's geometry.
    pub fn of(g: &Geometry) -> Self {
        let sectorsize = u64::from(g.sectorsize).max(1);
        Self {
            sectorsize,
            sectors: g.size.checked_div(sectorsize).unwrap_or(0),
            data_offset: g.data_offset,
        }
    }

    /// Length of the merged image: `sectors * sectorsize`.
    pub fn image_len(&self) -> u64 {
        self.sectors.saturating_mul(self.sectorsize)
    }
}

/// Where a file holds data, learnt with `SEEK_DATA`/`SEEK_HOLE` and
/// remembered: consecutive reads of one extent cost no system call.
struct Extents<'a> {
    file: &'a File,
    /// `(start, end, data)` of the extent learnt last.
    known: Option<(u64, u64, bool)>,
    /// False once the file system could not tell (then all is data).
    seekable: bool,
}

impl<'a> Extents<'a> {
    fn new(file: &'a File) -> Self {
        Self {
            file,
            known: None,
            seekable: true,
        }
    }

    /// Whether `pos` holds data, and where that extent ends (at most `limit`).
    fn at(&mut self, pos: u64, limit: u64) -> (bool, u64) {
        if let Some((start, end, data)) = self.known {
            if start <= pos && pos < end {
                return (data, end.min(limit));
            }
        }
        if !self.seekable {
            return (true, limit);
        }
        let extent = match crate::engine::sys::seek_data_or_hole(self.file, pos, true) {
            // No data at or after `pos` (EOF included): a hole to the end.
            Ok(None) => (pos, u64::MAX, false),
            Ok(Some(d)) if d > pos => (pos, d, false),
            Ok(Some(_)) => {
                let end = crate::engine::sys::seek_data_or_hole(self.file, pos, false)
                    .ok()
                    .flatten()
                    .filter(|&h| h > pos)
                    .unwrap_or(u64::MAX);
                (pos, end, true)
            }
            Err(_) => {
                self.seekable = false;
                return (true, limit);
            }
        };
        self.known = Some(extent);
        (extent.2, extent.1.min(limit))
    }
}

/// Reads `buf.len()` bytes at `pos` (zeros past the end of the file).
fn read_full(file: &File, buf: &mut [u8], pos: u64) -> io::Result<()> {
    let mut got = 0usize;
    while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
        let at = pos.saturating_add(got as u64);
        match file.read_at(rest, at) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => got = got.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Ranges of one buffer, kept sorted and merged where they touch.
#[derive(Default)]
struct Spans(Vec<Range<usize>>);

impl Spans {
    fn push(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => self.0.push(r),
        }
    }
}

/// True when every byte is zero (64 bytes at a time, which vectorises).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Sorts `buf[piece]` into non-zero and zero granules: granule boundaries
/// lie at multiples of [`GRANULE`] of the image, `origin` being the image
/// offset of `buf[0]`.
fn classify(
    buf: &[u8],
    piece: Range<usize>,
    origin: u64,
    nonzero: &mut Spans,
    mut zero: Option<&mut Spans>,
    stats: &mut Stats,
) {
    let mut i = piece.start;
    while i < piece.end {
        let at = origin.saturating_add(i as u64);
        let to_boundary = GRANULE.saturating_sub(to_usize(at % GRANULE_U64).unwrap_or(0));
        let end = i.saturating_add(to_boundary).min(piece.end);
        let Some(bytes) = buf.get(i..end) else { break };
        if is_zero(bytes) {
            stats.zero_bytes = stats.zero_bytes.saturating_add(bytes.len() as u64);
            if let Some(z) = zero.as_deref_mut() {
                z.push(i..end);
            }
        } else {
            nonzero.push(i..end);
        }
        i = end;
    }
}

/// Fills `buf` from `src` at `pos` where the file holds data; records the
/// parts read in `pieces` (offset by `at` in the window's buffer). Holes
/// are zero-filled only with `zero_holes`.
fn read_extents(
    src: &mut Extents<'_>,
    pos: u64,
    buf: &mut [u8],
    at: usize,
    zero_holes: bool,
    pieces: &mut Spans,
    stats: &mut Stats,
) -> io::Result<()> {
    let mut done = 0usize;
    let end = pos.saturating_add(buf.len() as u64);
    while done < buf.len() {
        let p = pos.saturating_add(done as u64);
        let (data, ext_end) = src.at(p, end);
        let n = to_usize(ext_end.saturating_sub(p))?
            .max(1)
            .min(buf.len().saturating_sub(done));
        let next = done.saturating_add(n);
        let part = buf
            .get_mut(done..next)
            .ok_or_else(|| invalid("read range"))?;
        if data {
            read_full(src.file, part, p)?;
            stats.bytes_read = stats.bytes_read.saturating_add(n as u64);
            pieces.push(at.saturating_add(done)..at.saturating_add(next));
        } else {
            stats.hole_bytes = stats.hole_bytes.saturating_add(n as u64);
            if zero_holes {
                part.fill(0);
            }
        }
        done = next;
    }
    Ok(())
}

/// Runs `(bits, set)` of one bit value over `bits`, from a snapshot of the
/// bitmap bytes that starts at bit `first` (a multiple of 8).
pub fn bit_runs(snap: &[u8], first: u64, bits: Range<u64>) -> Vec<(Range<u64>, bool)> {
    let bit = |s: u64| -> bool {
        let idx = s.saturating_sub(first) / 8;
        usize::try_from(idx)
            .ok()
            .and_then(|i| snap.get(i))
            .is_some_and(|&b| b & (1u8 << (s % 8)) != 0)
    };
    let byte = |s: u64| -> Option<u8> {
        usize::try_from(s.saturating_sub(first) / 8)
            .ok()
            .and_then(|i| snap.get(i).copied())
    };
    let mut out = Vec::new();
    let mut s = bits.start;
    while s < bits.end {
        let v = bit(s);
        let full = if v { 0xff } else { 0 };
        let mut e = s.saturating_add(1);
        while e < bits.end {
            // Whole bytes of the same value at once.
            if e % 8 == 0 && bits.end.saturating_sub(e) >= 8 && byte(e) == Some(full) {
                e = e.saturating_add(8);
                continue;
            }
            if bit(e) != v {
                break;
            }
            e = e.saturating_add(1);
        }
        out.push((s..e, v));
        s = e;
    }
    out
}

/// What [`merge_files`] reads and writes.
pub struct Files<'a> {
    /// The COW file (its data area is read).
    pub cow: &'a File,
    /// The backing file (read; written in place).
    pub backing: &'a File,
    /// The image to write: a new file sized to the image, or the backing
    /// itself for an in-place merge.
    pub out: &'a File,
    /// Write only the set sectors into `backing` (`out` must be it).
    pub in_place: bool,
}

/// Merges the complete sectors of `plan` from `files` (see the module
/// documentation), [`THREADS`] windows at a time. `progress(done, total)`
/// is called after each window; `stop` is looked at as often.
pub fn merge_files(
    plan: &Plan,
    bitmap: &Bitmap,
    files: &Files<'_>,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<Stats> {
    let ss = plan.sectorsize;
    let image_len = plan.image_len();
    let window = WINDOW as u64;
    if window.checked_rem(ss) != Some(0) {
        return Err(invalid("sector size does not divide the merge window"));
    }
    let total = if files.in_place {
        set_bits(bitmap, 0..plan.sectors).saturating_mul(ss)
    } else {
        image_len
    };
    if stop() {
        return Err(io::Error::from(io::ErrorKind::Interrupted));
    }
    let windows = image_len.div_ceil(window);
    let next = AtomicU64::new(0);
    let halt = AtomicBool::new(false);
    let shared = Shared {
        plan,
        bitmap,
        files,
        next: &next,
        halt: &halt,
        windows,
    };
    let threads = u64::try_from(THREADS).unwrap_or(1).min(windows).max(1);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let tx = tx.clone();
                let shared = &shared;
                scope.spawn(move || {
                    let r = shared.work(&tx);
                    if r.is_err() {
                        shared.halt.store(true, Ordering::Release);
                    }
                    r
                })
            })
            .collect();
        drop(tx);
        let (mut done, mut synced, mut stopped) = (0u64, 0u64, false);
        let mut sync_err = None;
        for bytes in rx {
            done = done.saturating_add(bytes);
            progress(done, total);
            if !stopped && stop() {
                stopped = true;
                halt.store(true, Ordering::Release);
            }
            // Start the target's writeback early, while the workers go on:
            // the last sync then has little left to write.
            if done.saturating_sub(synced) >= SYNC_EVERY && sync_err.is_none() {
                synced = done;
                if let Err(e) = files.out.sync_data() {
                    halt.store(true, Ordering::Release);
                    sync_err = Some(e);
                }
            }
        }
        let mut stats = Stats {
            bytes_total: total,
            ..Stats::default()
        };
        let mut first_err = sync_err;
        for w in workers {
            match w.join() {
                Ok(Ok(s)) => stats.add(&s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert_with(|| io::Error::other("a merge thread panicked"));
                }
            }
        }
        if stopped {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    })
}

/// Threads merging windows at once: the random reads of a cold COW and
/// the copies overlap.
pub const THREADS: usize = 4;
/// Bytes of the image between two `fdatasync`s of the target while the
/// merge runs.
const SYNC_EVERY: u64 = 256 << 20;

/// What the workers of [`merge_files`] share.
struct Shared<'a> {
    plan: &'a Plan,
    bitmap: &'a Bitmap,
    files: &'a Files<'a>,
    /// The next window to take.
    next: &'a AtomicU64,
    /// Set on a stop request or an error: workers stop at the next window.
    halt: &'a AtomicBool,
    windows: u64,
}

/// One worker's buffers and what it learnt of the files' extents.
struct Worker<'a> {
    buf: Vec<u8>,
    check: Vec<u8>,
    zeros: Vec<u8>,
    cow: Extents<'a>,
    backing: Extents<'a>,
    stats: Stats,
}

impl Stats {
    fn add(&mut self, o: &Self) {
        self.bytes_read = self.bytes_read.saturating_add(o.bytes_read);
        self.bytes_written = self.bytes_written.saturating_add(o.bytes_written);
        self.hole_bytes = self.hole_bytes.saturating_add(o.hole_bytes);
        self.zero_bytes = self.zero_bytes.saturating_add(o.zero_bytes);
        self.runs = self.runs.saturating_add(o.runs);
    }
}

impl Shared<'_> {
    /// Takes windows until none is left (or a halt); sends the bytes each
    /// one merged.
    fn work(&self, tx: &std::sync::mpsc::Sender<u64>) -> io::Result<Stats> {
        let mut w = Worker {
            buf: vec![0u8; WINDOW],
            check: Vec::new(),
            zeros: Vec::new(),
            cow: Extents::new(self.files.cow),
            backing: Extents::new(self.files.backing),
            stats: Stats::default(),
        };
        while !self.halt.load(Ordering::Acquire) {
            let k = self.next.fetch_add(1, Ordering::AcqRel);
            if k >= self.windows {
                break;
            }
            let bytes = self.window(&mut w, k.saturating_mul(WINDOW as u64))?;
            // The receiver only goes away once every worker has ended.
            let _ = tx.send(bytes);
        }
        Ok(w.stats)
    }

    /// Merges the window at image offset `o`; returns the bytes it merged.
    fn window(&self, w: &mut Worker<'_>, o: u64) -> io::Result<u64> {
        let (plan, files) = (self.plan, self.files);
        let ss = plan.sectorsize;
        let w_end = o.saturating_add(WINDOW as u64).min(plan.image_len());
        let bits = o.checked_div(ss).unwrap_or(0)..w_end.checked_div(ss).unwrap_or(0);
        let first_byte = bits.start / 8;
        let snap = self.bitmap.snapshot(first_byte..bits.end.div_ceil(8));
        let (mut pieces, mut nonzero, mut zero) =
            (Spans::default(), Spans::default(), Spans::default());
        let mut done = 0u64;
        let stats = &mut w.stats;
        for (run, set) in bit_runs(&snap, first_byte.saturating_mul(8), bits) {
            stats.runs = stats.runs.saturating_add(1);
            if files.in_place && !set {
                continue;
            }
            let off = run.start.saturating_mul(ss);
            let len = to_usize(run.end.saturating_sub(run.start).saturating_mul(ss))?;
            let at = to_usize(off.saturating_sub(o))?;
            let dst = w
                .buf
                .get_mut(at..at.saturating_add(len))
                .ok_or_else(|| invalid("window range"))?;
            if set {
                let pos = plan.data_offset.saturating_add(off);
                read_extents(&mut w.cow, pos, dst, at, files.in_place, &mut pieces, stats)?;
            } else {
                read_extents(&mut w.backing, off, dst, at, false, &mut pieces, stats)?;
            }
            if files.in_place {
                // A set run is all to be written: its holes read as zeros.
                done = done.saturating_add(len as u64);
                let run_bytes = at..at.saturating_add(len);
                classify(&w.buf, run_bytes, o, &mut nonzero, Some(&mut zero), stats);
            }
        }
        if !files.in_place {
            done = w_end.saturating_sub(o);
            for p in &pieces.0 {
                classify(&w.buf, p.clone(), o, &mut nonzero, None, stats);
            }
        }
        for span in &nonzero.0 {
            let bytes = w.buf.get(span.clone()).ok_or_else(|| invalid("span"))?;
            files
                .out
                .write_all_at(bytes, o.saturating_add(span.start as u64))?;
            stats.bytes_written = stats.bytes_written.saturating_add(bytes.len() as u64);
        }
        // In place, a zero sector of the COW is written only where the
        // backing is not zero already (as uml_moo does).
        for span in &zero.0 {
            let pos = o.saturating_add(span.start as u64);
            let len = span.len();
            w.check.resize(len.max(w.check.len()), 0);
            let dst = w.check.get_mut(..len).ok_or_else(|| invalid("span"))?;
            let (mut read, mut dirty) = (Spans::default(), Spans::default());
            let mut scratch = Stats::default();
            read_extents(&mut w.backing, pos, dst, 0, false, &mut read, stats)?;
            for p in read.0 {
                classify(dst, p, pos, &mut dirty, None, &mut scratch);
            }
            for d in dirty.0 {
                w.zeros.resize(d.len().max(w.zeros.len()), 0);
                let z = w.zeros.get(..d.len()).ok_or_else(|| invalid("span"))?;
                files
                    .out
                    .write_all_at(z, pos.saturating_add(d.start as u64))?;
                stats.bytes_written = stats.bytes_written.saturating_add(z.len() as u64);
            }
        }
        Ok(done)
    }
}

/// Bits set among `bits`.
fn set_bits(bitmap: &Bitmap, bits: Range<u64>) -> u64 {
    let mut n = 0u64;
    let mut s = bits.start;
    while s < bits.end {
        let e = s.saturating_add(1 << 20).min(bits.end);
        let first = s / 8;
        let snap = bitmap.snapshot(first..e.div_ceil(8));
        for (r, set) in bit_runs(&snap, first.saturating_mul(8), s..e) {
            if set {
                n = n.saturating_add(r.end.saturating_sub(r.start));
            }
        }
        s = e;
    }
    n
}

/// The temporary name of an image being written: beside it, hidden.
fn temp_name(out: &Path) -> Result<PathBuf, MergeError> {
    let name = out.file_name().ok_or_else(|| MergeError::TargetNotFile {
        path: out.to_path_buf(),
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".merge-{}", std::process::id()));
    Ok(out.with_file_name(tmp))
}

/// Refuses a target that exists (without `force`), is not a regular file,
/// or is one of the inputs.
fn check_target(path: &Path, force: bool, src: &Sources, cow: &Path) -> Result<(), MergeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(cow, "look at", path)(e)),
    };
    let target = std::fs::metadata(path).unwrap_or_else(|_| meta.clone());
    for (file, what) in [(&src.cow, "COW file"), (&src.backing, "backing file")] {
        if let Ok(m) = file.metadata() {
            if m.dev() == target.dev() && m.ino() == target.ino() {
                return Err(MergeError::TargetIsInput {
                    path: path.to_path_buf(),
                    what,
                });
            }
        }
    }
    if !meta.is_file() {
        return Err(MergeError::TargetNotFile {
            path: path.to_path_buf(),
        });
    }
    if !force {
        return Err(MergeError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Merges as `opts` says. `stop` is looked at between windows (a signal
/// sets it: [`run`]); `progress(done, total)` after each.
pub fn merge(
    opts: &MergeOptions,
    stop: &dyn Fn() -> Option<i32>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, MergeError> {
    let start = Instant::now();
    let src = open_sources(opts)?;
    let plan = Plan::of(&src.geometry);
    let dropped_tail = src.geometry.size.saturating_sub(plan.image_len());
    let cow = &opts.cow;
    let target = match &opts.target {
        Target::File { path, force } => {
            check_target(path, *force, &src, cow)?;
            path.clone()
        }
        Target::InPlace => src.backing_path.clone(),
    };
    log::info!(
        "merging COW file {} ({} header, {} bytes, {}-byte sectors, {} set) over {} {}",
        cow.display(),
        src.header.version.name(),
        src.geometry.size,
        src.geometry.sectorsize,
        src.bitmap.count_set(),
        src.backing_path.display(),
        if opts.target == Target::InPlace {
            "in place".to_owned()
        } else {
            format!("into {}", target.display())
        }
    );
    if dropped_tail > 0 {
        let tail_set = src.bitmap.test(plan.sectors);
        log::warn!(
            "the last {dropped_tail} bytes of {} are a partial {}-byte COW sector: they are not \
             merged ({}), as uml_moo does not merge them",
            cow.display(),
            plan.sectorsize,
            match (opts.target == Target::InPlace, tail_set) {
                (true, true) => "the backing keeps its own bytes there, not the COW's",
                (true, false) => "the backing keeps its own bytes there",
                (false, _) => "the image is that much shorter than the disk",
            }
        );
    }
    let stopped = || stop().is_some();
    let mut sync = Duration::ZERO;
    let stats = match &opts.target {
        Target::InPlace => {
            let files = Files {
                cow: &src.cow,
                backing: &src.backing,
                out: &src.backing,
                in_place: true,
            };
            let r = merge_files(&plan, &src.bitmap, &files, &stopped, progress);
            let t = Instant::now();
            let synced = src.backing.sync_all();
            sync = t.elapsed();
            match (r, stop()) {
                (Err(e), Some(signal)) if e.kind() == io::ErrorKind::Interrupted => {
                    return Err(MergeError::InterruptedInPlace {
                        cow: cow.clone(),
                        path: target,
                        signal,
                    })
                }
                (r, _) => {
                    let stats = r.map_err(io_err(cow, "merge into", &target))?;
                    synced.map_err(io_err(cow, "sync", &target))?;
                    stats
                }
            }
        }
        Target::File { .. } => {
            let tmp = temp_name(&target)?;
            let made = (|| {
                let out = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&tmp)
                    .map_err(io_err(cow, "create", &tmp))?;
                out.set_len(plan.image_len())
                    .map_err(io_err(cow, "size", &tmp))?;
                let files = Files {
                    cow: &src.cow,
                    backing: &src.backing,
                    out: &out,
                    in_place: false,
                };
                let stats = merge_files(&plan, &src.bitmap, &files, &stopped, progress)
                    .map_err(io_err(cow, "merge into", &tmp))?;
                let t = Instant::now();
                out.sync_all().map_err(io_err(cow, "sync", &tmp))?;
                sync = t.elapsed();
                std::fs::rename(&tmp, &target).map_err(io_err(cow, "rename to", &target))?;
                Ok(stats)
            })();
            match made {
                Ok(stats) => {
                    // The rename is durable once the directory is.
                    let dir = target
                        .parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(Path::new("."));
                    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(
                        cow,
                        "sync the directory of",
                        &target,
                    ))?;
                    stats
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    if let Some(signal) = stop() {
                        return Err(MergeError::Interrupted {
                            cow: cow.clone(),
                            path: target,
                            signal,
                        });
                    }
                    return Err(e);
                }
            }
        }
    };
    let elapsed = start.elapsed();
    log::info!(
        "merged {} into {}: {} bytes in {:.2} s ({:.0} MiB/s), {} bytes written, {} read, {} of \
         holes skipped",
        cow.display(),
        target.display(),
        stats.bytes_total,
        elapsed.as_secs_f64(),
        rate(stats.bytes_total, elapsed) / f64::from(1u32 << 20),
        stats.bytes_written,
        stats.bytes_read,
        stats.hole_bytes
    );
    if opts.target == Target::InPlace {
        if stats.bytes_written > 0 {
            log::warn!(
                "backing file {} was written: its mtime changed, so COW file {} (and every other \
                 COW made over it) no longer matches it; the merged backing is the disk now",
                target.display(),
                cow.display()
            );
        } else {
            log::info!(
                "backing file {} needed no write: it is unchanged",
                target.display()
            );
        }
    }
    Ok(Summary {
        target,
        stats,
        elapsed,
        dropped_tail,
        sync,
    })
}

fn rate(bytes: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / s
    } else {
        0.0
    }
}

/// Shows progress: an indicatif bar on a terminal, or JSON lines.
struct Reporter {
    output: Output,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    last: Option<Instant>,
}

impl Reporter {
    fn new(output: Output) -> Self {
        let bar = (output == Output::Text && io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "merge {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            output,
            bar,
            start: Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
        if self.output != Output::Json {
            return;
        }
        // The first line after the first window, then one a second.
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(now);
        let r = rate(done, self.start.elapsed());
        let eta = (r > 0.0).then(|| total.saturating_sub(done) as f64 / r);
        let line = serde_json::json!({
            "bytes_done": done,
            "bytes_total": total,
            "rate_bps": r.round(),
            "eta_s": eta.map(|e| (e * 10.0).round() / 10.0),
        });
        // A reader that went away does not stop the merge.
        let _ = writeln!(io::stdout().lock(), "{line}");
    }

    fn finish(&mut self, s: &Summary) -> Result<(), MergeError> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.output != Output::Json {
            return Ok(());
        }
        let line = serde_json::json!({
            "done": true,
            "bytes_done": s.stats.bytes_total,
            "bytes_total": s.stats.bytes_total,
            "bytes_written": s.stats.bytes_written,
            "bytes_read": s.stats.bytes_read,
            "rate_bps": rate(s.stats.bytes_total, s.elapsed).round(),
            "elapsed_s": s.elapsed.as_secs_f64(),
            "sync_s": s.sync.as_secs_f64(),
            "target": s.target,
            "dropped_tail_bytes": s.dropped_tail,
        });
        let mut out = io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(MergeError::Output)
    }
}

/// `vhost-user-ubd merge`: [`merge`] with progress shown as `output` says,
/// and SIGINT/SIGTERM stopping it cleanly (no half image; an in-place
/// merge synced and told how to finish). Call before starting threads.
pub fn run(opts: &MergeOptions, output: Output) -> Result<Summary, MergeError> {
    let signal = Arc::new(AtomicI32::new(0));
    let io_signals = |e| io_err(&opts.cow, "block the signals of", &opts.cow)(e);
    let signals =
        crate::engine::sys::Signals::block(&[libc::SIGINT, libc::SIGTERM]).map_err(io_signals)?;
    {
        let signal = signal.clone();
        let twice = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("ubd-merge-signals".into())
            .spawn(move || {
                while let Ok(s) = signals.wait() {
                    if twice.swap(true, Ordering::AcqRel) {
                        // A second signal: stop now, whatever is left.
                        std::process::exit(128_i32.saturating_add(s));
                    }
                    log::info!("signal {s}: stopping the merge");
                    signal.store(s, Ordering::Release);
                }
            })
            .map_err(io_signals)?;
    }
    let stop = || Some(signal.load(Ordering::Acquire)).filter(|&s| s != 0);
    let mut reporter = Reporter::new(output);
    let summary = merge(opts, &stop, &mut |done, total| reporter.update(done, total));
    match summary {
        Ok(s) => {
            reporter.finish(&s)?;
            Ok(s)
        }
        Err(e) => {
            if let Some(bar) = reporter.bar.take() {
                bar.abandon();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    const SS: u64 = 512;
    /// Sectors of one merge window.
    const WIN: u64 = WINDOW as u64 / SS;

    fn pattern(pos: u64, salt: u8) -> u8 {
        ((pos / 512) as u8).wrapping_mul(31) ^ (pos as u8) ^ salt | 1
    }

    /// A backing of `len` non-zero bytes, a COW file whose data area at
    /// `data_offset` holds other non-zero bytes in `cow_data` (the rest a
    /// hole), and the bitmap `bits`.
    struct Case {
        _dir: tempfile::TempDir,
        dir: PathBuf,
        backing: File,
        cow: File,
        plan: Plan,
        bitmap: Bitmap,
    }

    fn case(len: u64, bits: &[Range<u64>], cow_data: &[Range<u64>], sparse_backing: bool) -> Case {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("base"))
            .unwrap();
        backing.set_len(len).unwrap();
        if !sparse_backing {
            let data: Vec<u8> = (0..len).map(|p| pattern(p, 0)).collect();
            backing.write_all_at(&data, 0).unwrap();
        }
        let data_offset = 8192;
        let cow = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("cow"))
            .unwrap();
        cow.set_len(data_offset + len).unwrap();
        for r in cow_data {
            let data: Vec<u8> = (r.start * SS..r.end * SS)
                .map(|p| pattern(p, 0x80))
                .collect();
            cow.write_all_at(&data, data_offset + r.start * SS).unwrap();
        }
        let nsect = len / SS;
        let bitmap = Bitmap::from_bytes(vec![], nsect);
        for r in bits {
            bitmap.set_range(r.clone());
        }
        Case {
            _dir: d,
            dir,
            backing,
            cow,
            plan: Plan {
                sectorsize: SS,
                sectors: nsect,
                data_offset,
            },
            bitmap,
        }
    }

    fn merged(c: &Case, bitmap: &Bitmap) -> (Vec<u8>, Stats, u64) {
        let out_path = c.dir.join("out");
        let _ = std::fs::remove_file(&out_path);
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&out_path)
            .unwrap();
        out.set_len(c.plan.image_len()).unwrap();
        let files = Files {
            cow: &c.cow,
            backing: &c.backing,
            out: &out,
            in_place: false,
        };
        let stats = merge_files(&c.plan, bitmap, &files, &|| false, &mut |_, _| {}).unwrap();
        out.sync_all().unwrap();
        let blocks = out.metadata().unwrap().blocks() * 512;
        (std::fs::read(&out_path).unwrap(), stats, blocks)
    }

    /// The image a sector-by-sector merge makes (uml_moo's loop).
    fn model(c: &Case, cow_data: &[Range<u64>], sparse_backing: bool) -> Vec<u8> {
        let mut out = vec![0u8; c.plan.image_len() as usize];
        for (s, sector) in out.chunks_mut(SS as usize).enumerate() {
            let s = s as u64;
            let salt = match (c.bitmap.test(s), sparse_backing) {
                (true, _) if cow_data.iter().any(|r| r.contains(&s)) => 0x80,
                (false, false) => 0,
                _ => continue,
            };
            for (i, b) in sector.iter_mut().enumerate() {
                *b = pattern(s * SS + i as u64, salt);
            }
        }
        out
    }

    #[test]
    fn bit_runs_split_by_value_and_take_whole_bytes_at_once() {
        let snap = [0x00, 0xff, 0x0f, 0x00, 0x80];
        assert_eq!(
            bit_runs(&snap, 0, 0..40),
            vec![
                (0..8, false),
                (8..20, true),
                (20..39, false),
                (39..40, true)
            ]
        );
        // A snapshot starting at bit 16, a range starting inside a byte.
        assert_eq!(
            bit_runs(&snap[2..], 16, 18..22),
            vec![(18..20, true), (20..22, false)]
        );
        assert_eq!(bit_runs(&snap, 0, 5..5), vec![]);
    }

    #[test]
    fn zero_granules_are_told_from_data_at_image_offsets() {
        let mut buf = vec![0u8; 3 * GRANULE];
        buf[GRANULE + 7] = 1;
        let (mut nz, mut z, mut st) = (Spans::default(), Spans::default(), Stats::default());
        // buf[0] is image offset 512: granule edges at buf 3584, 7680.
        classify(&buf, 0..buf.len(), 512, &mut nz, Some(&mut z), &mut st);
        assert_eq!(nz.0, vec![3584..7680]);
        assert_eq!(z.0, vec![0..3584, 7680..3 * GRANULE]);
        assert!(is_zero(&buf[..GRANULE]) && !is_zero(&buf[GRANULE..]));
    }

    /// Negative control: the merge follows the bits. The same files merged
    /// with no bit set give the backing; with the bits, every set sector
    /// (runs across window edges, single sectors, zeros written over data)
    /// comes from the COW, so ignoring bits (or reading the wrong source)
    /// fails the comparison with the model.
    #[test]
    fn set_sectors_come_from_the_cow_and_clear_ones_from_the_backing() {
        let len = 2 * WINDOW as u64 + 5 * 4096;
        let bits = [
            0..1,
            7..9,
            WIN - 3..WIN + 5,
            WIN + 100..WIN + 300,
            2 * WIN - 1..2 * WIN + 10,
            len / SS - 1..len / SS,
        ];
        // Sectors WIN+100..WIN+300 are set but hold no data: zeros over a
        // non-zero backing.
        let data = [
            0..1,
            7..9,
            WIN - 3..WIN + 5,
            2 * WIN - 1..2 * WIN + 10,
            len / SS - 1..len / SS,
        ];
        let c = case(len, &bits, &data, false);
        let (got, stats, _) = merged(&c, &c.bitmap);
        let want = model(&c, &data, false);
        assert!(got == want, "merge differs from the sector-by-sector model");
        assert_eq!(stats.bytes_total, len);
        assert!(stats.runs >= bits.len() as u64 * 2, "{stats:?}");
        // The zero run reads as zeros, and was not written.
        assert!(
            got[((WIN + 100) * SS) as usize..((WIN + 300) * SS) as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(stats.bytes_written < len, "{stats:?}");

        let none = Bitmap::from_bytes(vec![], len / SS);
        let (base, _, _) = merged(&c, &none);
        assert!(base == (0..len).map(|p| pattern(p, 0)).collect::<Vec<_>>());
        assert!(
            base != got,
            "bits ignored: the merge would equal the backing"
        );
    }

    #[test]
    fn holes_of_the_sources_are_skipped_without_reading_and_stay_holes() {
        let len = 64 << 20;
        let data = [1000..1008, 40000..40001];
        let c = case(len, &data, &data, true);
        let (got, stats, blocks) = merged(&c, &c.bitmap);
        assert!(got == model(&c, &data, true));
        // Only the COW's two data extents were read (one file system
        // block each at most), everything else was a hole.
        assert!(stats.bytes_read <= 2 * 4096 + 4096, "{stats:?}");
        assert_eq!(stats.bytes_read + stats.hole_bytes, len, "{stats:?}");
        assert!(blocks <= 64 << 10, "image takes {blocks} bytes");
    }

    #[test]
    fn in_place_writes_set_sectors_and_zeros_only_where_the_backing_has_data() {
        let len = WINDOW as u64 + 64 * 4096;
        // 3000..3008 set and zero over data: written as zeros. Sectors
        // WIN+16..WIN+24 set and zero over a hole of the backing: not written.
        let bits = [10..20, 3000..3008, WIN - 2..WIN + 2, WIN + 16..WIN + 24];
        let data = [10..20, WIN - 2..WIN + 2];
        let c = case(len, &bits, &data, false);
        c.backing
            .write_all_at(&[0u8; 8 * SS as usize], (WIN + 16) * SS)
            .unwrap();
        let files = Files {
            cow: &c.cow,
            backing: &c.backing,
            out: &c.backing,
            in_place: true,
        };
        let stats = merge_files(&c.plan, &c.bitmap, &files, &|| false, &mut |_, _| {}).unwrap();
        let got = std::fs::read(c.dir.join("base")).unwrap();
        let mut want = model(&c, &data, false);
        want[((WIN + 16) * SS) as usize..((WIN + 24) * SS) as usize].fill(0);
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got == want,
            "in-place merge differs from the model at {first:?} ({} vs {})",
            got.len(),
            want.len()
        );
        assert_eq!(stats.bytes_total, (10 + 8 + 4 + 8) * SS);
        assert_eq!(stats.bytes_written, (10 + 8 + 4) * SS, "{stats:?}");
    }

    #[test]
    fn a_stop_request_ends_the_merge_before_the_next_window() {
        let c = case(2 * WINDOW as u64, &[], &[], true);
        let out = File::create(c.dir.join("out")).unwrap();
        let files = Files {
            cow: &c.cow,
            backing: &c.backing,
            out: &out,
            in_place: false,
        };
        let mut windows = 0;
        let e = merge_files(&c.plan, &c.bitmap, &files, &|| true, &mut |_, _| {
            windows += 1;
        })
        .unwrap_err();
        assert_eq!((e.kind(), windows), (io::ErrorKind::Interrupted, 0));
    }
}
