// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `Disk` interface: 512-byte sectors, asynchronous requests whose
//! iovecs point at caller memory, one [`DiskQueue`] per worker thread.
//!
//! Two implementations: [`raw::RawDisk`] (a plain file) and
//! [`cow::CowDisk`] (a UML COW file over a read-only backing file). The COW
//! rules live in their own modules: [`bitmap_writeback`] (R1-R4) and
//! [`durability`] (R5). Nothing here knows about virtio.
//!
//! Usage: `submit` requests, `commit` to hand them to the kernel, wait for
//! [`DiskQueue::event_fd`] to become readable, `poll` completions. A read
//! that `submit` hands back ([`Submitted::Again`]) must wait (R4): keep it
//! and submit it again once `poll` reports `retry`.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod cow;
pub mod extents;
pub mod job;
pub mod lazy;
mod queue_core;
pub mod raw;

pub use queue_core::punch_unsupported;

use std::{
    io,
    os::fd::RawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use thiserror::Error;

use crate::{
    cow::{file::read_header_bytes, header::has_cow_magic, CowFileError},
    engine::{AlignedBuf, EventFd},
};

/// Bytes per sector.
pub const SECTOR: u64 = 512;

/// Largest write of zeros in one operation (the write-zeroes fallback).
pub(crate) const ZERO_OP_MAX: u64 = 32 << 20;

/// Bytes in `sectors` sectors, which is also the byte offset of sector
/// `sectors`; `None` when that does not fit in a `u64`. [`check_range`]
/// passes no request whose end does not fit, so for the sectors of such a
/// request this is never `None`.
pub(crate) fn sectors_to_bytes(sectors: u64) -> Option<u64> {
    sectors.checked_mul(SECTOR)
}

/// Why a disk could not be opened or used.
#[derive(Debug, Error)]
pub enum DiskError {
    /// A COW file problem (open, header, backing, lock).
    #[error(transparent)]
    Cow(#[from] CowFileError),
    /// Opening a raw image failed.
    #[error("cannot open raw image {path}: {source}")]
    OpenRaw {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up io_uring or a thread failed.
    #[error("cannot set up I/O for {path}: {source}")]
    Setup {
        /// The disk's file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A resize that this disk refuses, or that failed.
    #[error("cannot resize {path}: {reason}")]
    Resize {
        /// The disk's file.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A block job that this disk refuses, or that failed to start.
    #[error("block job on {path}: {reason}")]
    Job {
        /// The disk's file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Persisting state at shutdown failed.
    #[error("cannot persist {path}: {source}")]
    Persist {
        /// The disk's file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

pub use crate::engine::IoVecs;

/// An operation on the disk.
#[derive(Debug)]
pub enum Op {
    /// Read `iov.len()` bytes (a multiple of 512) at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Destination.
        iov: IoVecs,
    },
    /// Write `iov.len()` bytes (a multiple of 512) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Source.
        iov: IoVecs,
    },
    /// Make every write completed before this one durable.
    Flush,
    /// Discard sectors (COW: they read as zeros afterwards, R7).
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        nsect: u64,
    },
    /// Zero sectors (`unmap`: may deallocate).
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        nsect: u64,
        /// Deallocation allowed.
        unmap: bool,
    },
}

impl Op {
    /// Sector range touched, if any.
    pub fn sectors(&self) -> Option<(u64, u64)> {
        match self {
            Self::Read { sector, iov } | Self::Write { sector, iov } => {
                Some((*sector, iov.len() / SECTOR))
            }
            Self::Discard { sector, nsect } | Self::WriteZeroes { sector, nsect, .. } => {
                Some((*sector, *nsect))
            }
            Self::Flush => None,
        }
    }

    /// True for operations that modify the disk.
    pub fn is_write(&self) -> bool {
        !matches!(self, Self::Read { .. } | Self::Flush)
    }
}

/// A request: an operation and the caller's tag.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Returned in the completion.
    pub tag: u64,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// `Ok` or a positive errno.
    pub result: Result<(), i32>,
}

/// What `submit` did with a request.
#[derive(Debug)]
pub enum Submitted {
    /// Accepted: a completion will follow.
    Queued,
    /// R4: the read must wait for a bitmap write; retry it after `poll`
    /// reports `retry`. It was not started.
    Again(Request),
}

/// The device size in sectors: one live value that every range check and
/// the config space read (clones share it), so that a resize changes it in
/// one place. Read it once per request.
#[derive(Clone, Debug, Default)]
pub struct DiskSize(Arc<AtomicU64>);

impl DiskSize {
    /// A size of `sectors`.
    pub fn new(sectors: u64) -> Self {
        Self(Arc::new(AtomicU64::new(sectors)))
    }

    /// The size now.
    pub fn sectors(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Changes the size (a resize, once the file has it).
    pub fn set(&self, sectors: u64) {
        self.0.store(sectors, Ordering::Release);
    }
}

impl PartialEq for DiskSize {
    fn eq(&self, other: &Self) -> bool {
        self.sectors() == other.sectors()
    }
}

impl Eq for DiskSize {}

/// What a disk offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Device size, live.
    pub size: DiskSize,
    /// Writes refused.
    pub readonly: bool,
    /// Human name for logs (the file).
    pub path: PathBuf,
    /// A stable identifier derived from the file (for the virtio serial).
    pub id: String,
    /// "raw" or "cow".
    pub kind: &'static str,
    /// Data descriptors use `O_DIRECT`.
    pub direct: bool,
}

impl DiskInfo {
    /// Device size in sectors, now.
    pub fn sectors(&self) -> u64 {
        self.size.sectors()
    }
}

/// A disk shared by every queue worker.
pub trait Disk: Send + Sync + std::fmt::Debug {
    /// Size and capabilities.
    fn info(&self) -> &DiskInfo;
    /// A queue for one worker thread (its own io_uring).
    fn new_queue(&self) -> Result<Box<dyn DiskQueue>, DiskError> {
        let event = EventFd::new().map_err(|e| DiskError::Setup {
            path: self.info().path.clone(),
            source: e,
        })?;
        self.new_queue_on(Arc::new(event))
    }
    /// A queue whose completions signal `event` (see `lazy`).
    fn new_queue_on(&self, event: Arc<EventFd>) -> Result<Box<dyn DiskQueue>, DiskError>;
    /// Switches between writeback (FLUSH needed) and writethrough (every
    /// write durable when it completes).
    fn set_writeback(&self, writeback: bool);
    /// Current cache mode.
    fn writeback(&self) -> bool;
    /// Makes everything durable and stops background work; further
    /// requests fail. Idempotent.
    fn shutdown(&self) -> Result<(), DiskError>;
    /// Counters.
    fn stats(&self) -> DiskStats {
        DiskStats::default()
    }
    /// Changes the device size to `sectors`: the file first, then the live
    /// size ([`DiskSize`]). Shrinking takes `force` (the guest may still
    /// address what is cut off); `drain` is called between lowering the
    /// live size and cutting the file, so that no request admitted under
    /// the old size is still in flight when the file is cut.
    fn resize(&self, sectors: u64, force: bool, drain: &dyn Fn()) -> Result<(), DiskError> {
        let _ = (sectors, force, drain);
        Err(DiskError::Resize {
            path: self.info().path.clone(),
            reason: format!("a {} disk cannot be resized", self.info().kind),
        })
    }
    /// What a new daemon instance needs to serve this disk without
    /// reopening anything (a live handover): new descriptors of the open
    /// files (their open file descriptions, so the locks go with them)
    /// and what is known about them. Call on a persisted, idle disk.
    fn export(&self) -> Result<passed::DiskExport, DiskError>;

    /// Starts a block job (flatten, export) on the running disk.
    fn start_job(&self, _job: job::JobRequest) -> Result<(), DiskError> {
        Err(DiskError::Job {
            path: self.info().path.clone(),
            reason: format!(
                "a {} disk has no block jobs: flatten and export work on a COW disk (for a \
                 raw image, copy it with the guest stopped, or use `vhost-user-ubd create` \
                 to put a COW over it)",
                self.info().kind
            ),
        })
    }

    /// The block job running or last run.
    fn job(&self) -> Option<job::JobStatus> {
        None
    }

    /// Stops the running block job; returns its final status.
    fn cancel_job(&self) -> Result<job::JobStatus, DiskError> {
        Err(DiskError::Job {
            path: self.info().path.clone(),
            reason: "no job has run on this disk".into(),
        })
    }
    /// Handed over (`true`): every later request fails with EIO, and
    /// shutdown writes nothing and leaves the files (the crash journal
    /// included) to the new instance. `false` takes the disk back (the
    /// new instance died before it served).
    fn retire(&self, retired: bool);
}

pub mod handover;
pub mod passed;

/// Makes every completed write durable (with its COW bits): a FLUSH, for
/// a disk that takes no more requests (a live handover's suspend).
pub fn persist(disk: &dyn Disk) -> Result<(), DiskError> {
    let setup = |errno: i32| DiskError::Persist {
        path: disk.info().path.clone(),
        source: io::Error::from_raw_os_error(errno),
    };
    Blocking::new(disk)?.flush().map_err(setup)
}

/// Counters of a disk, for tests, logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskStats {
    /// Reads handed back with `Again` (R4).
    pub reads_parked: u64,
    /// Bitmap writes completed.
    pub bitmap_writes: u64,
    /// Bitmap writes that had to wait for an overlapping one (R3).
    pub bitmap_writes_waited: u64,
    /// `fdatasync` calls of the durability thread.
    pub syncs: u64,
    /// Durability epochs completed.
    pub epochs: u64,
    /// COW sectors copied up from the backing for a write smaller than a
    /// COW sector (`create --sectorsize`).
    pub copy_ups: u64,
    /// Writes and reads parked until a copy of their sectors completed
    /// (copy-up, flatten, export).
    pub writes_held: u64,
}

/// One worker's view of a disk.
pub trait DiskQueue: Send {
    /// Starts a request (it reaches the kernel at the next `commit`).
    /// Invalid requests complete with an error through `poll`.
    fn submit(&mut self, req: Request) -> Submitted;
    /// Hands submitted work to the kernel.
    fn commit(&mut self) -> io::Result<()>;
    /// Collects completions without blocking; returns true when parked
    /// (`Again`) reads should be submitted again.
    fn poll(&mut self, out: &mut Vec<Completion>) -> bool;
    /// Readable when `poll` has something to do.
    fn event_fd(&self) -> RawFd;
    /// Blocks until the event fd is readable or the timeout passes.
    fn wait(&self, timeout: Option<Duration>);
    /// Requests accepted and not yet completed.
    fn in_flight(&self) -> usize;
    /// Makes the event fd readable (the owner then looks for work of its
    /// own, e.g. rings to pop after a suspend). Queues that do not own
    /// their event fd do nothing.
    fn wake(&self) {}
}

/// Options for opening a disk.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Serve read-only.
    pub readonly: bool,
    /// `O_DIRECT` for data (`--cache none`).
    pub direct: bool,
    /// Start in writeback mode (WCE=1).
    pub writeback: bool,
    /// Backing file override for a COW file.
    pub backing: Option<PathBuf>,
    /// Checkpoint when this many completed-write extents await their bits.
    pub max_pending_extents: usize,
    /// Checkpoint when the oldest such write is this old.
    pub max_pending_age: Duration,
    /// io_uring entries per queue.
    pub ring_entries: u32,
    /// Test hook: hold every bitmap write's completion this long, so that
    /// the R3/R4 windows (overlapping bitmap writes wait, reads park) can
    /// be observed. Zero in production.
    pub bitmap_write_delay: Duration,
    /// Which interface carries `O_DIRECT` data writes (see `AioMode`).
    pub aio: AioMode,
    /// Recording layer: sees every write and sync of the disk's files
    /// (crash-state exploration). `None` in production.
    pub observer: Option<Observer>,
    /// Directory of the COW crash journal (see `journal`); `None`: no
    /// journal, so a process crash loses the bits of completed writes that
    /// were not flushed yet.
    pub journal_dir: Option<PathBuf>,
    /// How long opening a COW waits for a lock held by another open file
    /// description (a daemon killed a moment ago whose in-flight I/O is
    /// still draining); see `OpenCow::lock_wait`.
    pub lock_wait: Duration,
    /// What a COW's backing file is checked for (`--backing-check`).
    pub backing_check: crate::cow::BackingCheck,
    /// Bytes a block job (flatten, export) copies at a time: the unit that
    /// guest writes wait for.
    pub job_chunk: u64,
}

/// Which interface carries `O_DIRECT` data writes (`--cache none`; not the
/// `RWF_DSYNC` writes of writethrough mode). io_uring hands writes into
/// holes (COW first writes, sparse raw images) to io-wq worker threads,
/// because the block allocation may block; Linux AIO allocates inside
/// `io_submit`, in the queue's own thread, like QEMU's `aio=native`. Reads,
/// flushes and the rest always go through io_uring.
///
/// Measured on a fresh 16 GiB COW (2 CPUs, ext4, 5 s x 4-5 alternated
/// runs, medians), Linux AIO against io_uring: 2 queues x qd32 +31% IOPS and
/// -38% CPU per write; qd1 p50 144 vs 152 us (1 queue), 181 vs 207 us
/// (2 queues); one queue x qd32 37.0k vs 35.0k IOPS at 17 vs 27 us of CPU.
/// Rewrites of allocated COW data, 2 queues x qd32 (`make bench` harness, 3
/// alternated runs): 121.7k vs 104.7k IOPS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioMode {
    /// Linux AIO.
    #[default]
    Native,
    /// io_uring.
    IoUring,
}

/// An [`IoObserver`](crate::engine::IoObserver) attached to a disk.
#[derive(Clone)]
pub struct Observer(pub Arc<dyn crate::engine::IoObserver>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Default for DiskOptions {
    fn default() -> Self {
        Self {
            readonly: false,
            direct: false,
            writeback: true,
            backing: None,
            max_pending_extents: 16384,
            max_pending_age: Duration::from_secs(1),
            ring_entries: 256,
            bitmap_write_delay: Duration::ZERO,
            aio: AioMode::Native,
            observer: None,
            journal_dir: None,
            lock_wait: Duration::ZERO,
            backing_check: crate::cow::BackingCheck::SizeMtime,
            job_chunk: cow::jobs::CHUNK_BYTES,
        }
    }
}

/// True when the file starts with the COW magic.
pub fn is_cow_file(path: &Path) -> io::Result<bool> {
    let f = std::fs::File::open(path)?;
    Ok(has_cow_magic(&read_header_bytes(&f)?))
}

/// Opens a raw image.
pub fn open_raw(path: &Path, opts: &DiskOptions) -> Result<Arc<dyn Disk>, DiskError> {
    Ok(Arc::new(raw::RawDisk::open(path, opts)?))
}

/// Opens a COW file (creating it over `opts.backing` when missing, as UML
/// does).
pub fn open_cow(path: &Path, opts: &DiskOptions) -> Result<Arc<dyn Disk>, DiskError> {
    if !path.exists() {
        if let Some(backing) = &opts.backing {
            log::info!(
                "creating {} as COW file for {}",
                path.display(),
                backing.display()
            );
            crate::cow::create_cow(path, backing, crate::cow::header::DEFAULT_ALIGNMENT)?;
        }
    }
    Ok(Arc::new(cow::CowDisk::open(path, opts)?))
}

/// A stable short identifier for a file (device and inode in hex), used as
/// the default virtio serial.
pub fn file_id(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("ubd-{:x}-{:x}", meta.dev(), meta.ino())
}

/// A sector range outside the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("sectors {sector}+{nsect} beyond the end ({sectors} sectors)")]
pub struct OutOfRange {
    /// First sector asked for.
    pub sector: u64,
    /// Sectors asked for.
    pub nsect: u64,
    /// Sectors of the device.
    pub sectors: u64,
}

/// The one range check of a request: `[sector, sector + nsect)` inside a
/// device of `sectors` sectors, its byte offset representable (every layer
/// asks this function: the vhost layer to answer the guest with a precise
/// log line, the disks to refuse any caller).
pub fn check_range(sector: u64, nsect: u64, sectors: u64) -> Result<(), OutOfRange> {
    let inside = sector
        .checked_add(nsect)
        .is_some_and(|end| end <= sectors && sectors_to_bytes(end).is_some());
    if inside {
        Ok(())
    } else {
        Err(OutOfRange {
            sector,
            nsect,
            sectors,
        })
    }
}

/// Validates a request against the device; returns an errno on failure.
pub fn check_request(op: &Op, info: &DiskInfo) -> Result<(), i32> {
    if info.readonly && op.is_write() {
        return Err(libc::EROFS);
    }
    if let Op::Read { iov, .. } | Op::Write { iov, .. } = op {
        if iov.len() % SECTOR != 0 {
            return Err(libc::EINVAL);
        }
    }
    if let Some((sector, nsect)) = op.sectors() {
        check_range(sector, nsect, info.sectors()).map_err(|_| libc::EIO)?;
    }
    Ok(())
}

/// A simple blocking front end over a queue: submit one request and wait
/// for it, retrying reads that must wait. For tools and tests.
pub struct Blocking {
    queue: Box<dyn DiskQueue>,
    next_tag: u64,
}

impl std::fmt::Debug for Blocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocking").finish_non_exhaustive()
    }
}

impl Blocking {
    /// Wraps a new queue of `disk`.
    pub fn new(disk: &dyn Disk) -> Result<Self, DiskError> {
        Ok(Self {
            queue: disk.new_queue()?,
            next_tag: 1,
        })
    }

    /// Runs one operation to completion.
    pub fn run(&mut self, op: Op) -> Result<(), i32> {
        let tag = self.next_tag;
        // Wrapping on purpose: a tag only has to differ from the tags in
        // flight, and here one request is in flight at a time.
        self.next_tag = self.next_tag.wrapping_add(1);
        let mut req = Request { op, tag };
        let mut out = Vec::new();
        loop {
            match self.queue.submit(req) {
                Submitted::Queued => break,
                Submitted::Again(r) => {
                    req = r;
                    let _ = self.queue.commit();
                    self.queue.wait(Some(Duration::from_millis(10)));
                    self.queue.poll(&mut out);
                }
            }
        }
        self.queue
            .commit()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        loop {
            self.queue.poll(&mut out);
            if let Some(pos) = out.iter().position(|c| c.tag == tag) {
                return out.swap_remove(pos).result;
            }
            self.queue.wait(Some(Duration::from_millis(100)));
        }
    }

    /// Reads into `buf` at `sector` (through a buffer the op owns).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), i32> {
        let owned = AlignedBuf::new(buf.len()).map_err(|_| libc::ENOMEM)?;
        let (iov, back) = IoVecs::from_buf(owned, buf.len());
        self.run(Op::Read { sector, iov })?;
        let owned = back.take().ok_or(libc::EIO)?;
        let src = owned.as_slice().get(..buf.len()).ok_or(libc::EIO)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// Writes `buf` at `sector` (through a buffer the op owns).
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), i32> {
        let mut owned = AlignedBuf::new(buf.len()).map_err(|_| libc::ENOMEM)?;
        owned
            .as_mut_slice()
            .get_mut(..buf.len())
            .ok_or(libc::EIO)?
            .copy_from_slice(buf);
        let (iov, _back) = IoVecs::from_buf(owned, buf.len());
        self.run(Op::Write { sector, iov })
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<(), i32> {
        self.run(Op::Flush)
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

    #[test]
    fn the_range_check_takes_the_whole_device_and_nothing_past_it() {
        assert!(check_range(0, 100, 100).is_ok());
        assert!(check_range(99, 1, 100).is_ok());
        assert!(check_range(100, 0, 100).is_ok());
        let e = check_range(99, 2, 100).unwrap_err();
        assert_eq!(e.to_string(), "sectors 99+2 beyond the end (100 sectors)");
        assert!(check_range(101, 0, 100).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err(), "end overflows");
        // Inside a huge device, but the byte offset does not fit in u64.
        assert!(check_range(u64::MAX / 512 + 1, 1, u64::MAX).is_err());
        assert!(check_range(u64::MAX / 512 - 1, 1, u64::MAX).is_ok());
    }

    #[test]
    fn both_disks_fall_back_to_zero_writes_for_the_same_errnos() {
        assert!(punch_unsupported(libc::EOPNOTSUPP));
        assert!(punch_unsupported(libc::EINVAL));
        assert!(!punch_unsupported(libc::EIO));
        assert!(!punch_unsupported(libc::ENOSPC));
    }

    #[test]
    fn the_size_is_one_live_value_shared_by_every_copy_of_the_info() {
        let info = DiskInfo {
            size: DiskSize::new(100),
            readonly: false,
            path: "/d".into(),
            id: "id".into(),
            kind: "raw",
            direct: false,
        };
        let queue_copy = info.clone();
        let op = Op::Discard {
            sector: 100,
            nsect: 8,
        };
        assert_eq!(check_request(&op, &queue_copy), Err(libc::EIO));
        info.size.set(108);
        assert_eq!(queue_copy.sectors(), 108);
        assert_eq!(check_request(&op, &queue_copy), Ok(()));
        info.size.set(50);
        assert_eq!(check_request(&op, &queue_copy), Err(libc::EIO));
    }
}
