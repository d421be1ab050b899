// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The COW disk: routing of reads and the write path (R7).
//!
//! - A sector whose bit is set, or whose write completed and awaits its bit
//!   (`unpersisted`, R5), is read from the COW data area; any other sector
//!   from the backing file, zeros past the backing file's end.
//! - A read whose backing part overlaps a pending or waiting bitmap write is
//!   handed back with [`Submitted::Again`] (R4, decided by
//!   `bitmap_writeback`); the caller parks it and retries it when `poll`
//!   says so. Reads whose sectors all have their bit set take no lock.
//! - A write goes to the COW data area. Its bits are set later, by the
//!   durability thread (R2, R5); a rewrite of sectors whose bits are set
//!   needs no bitmap work at all.
//! - DISCARD and WRITE_ZEROES punch the COW data range and then count as a
//!   write of those sectors, so their bits get set and they read as zeros
//!   (R7: bits are never cleared).
//! - The backing file is only ever read (R6).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::Instant,
};

mod backing_watch;
pub mod bitmap_writeback;
pub mod channel;
pub mod durability;
pub mod gate;
pub mod jobs;
pub mod journal;
mod queue;
pub mod state;

use channel::{Channel, Cmd, Mailbox};
use journal::Journal;
use queue::CowQueue;
pub use state::{CowShared, CowState, Stats};

use crate::{
    cow::{CowFile, OpenCow},
    disk::{file_id, Disk, DiskError, DiskInfo, DiskOptions, DiskQueue, DiskStats},
    engine::{Engine, EventFd},
};

/// A COW file over a read-only backing file.
#[derive(Debug)]
pub struct CowDisk {
    shared: Arc<CowShared>,
    /// The block job running or last run (`jobs`).
    job: jobs::JobSlot,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CowDisk {
    /// Opens (checks, locks, loads the bitmap) and starts the durability
    /// thread.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Self, DiskError> {
        let file = CowFile::open(
            path,
            &OpenCow {
                readonly: opts.readonly,
                backing: opts.backing.clone(),
                direct: opts.direct,
                no_lock: false,
                lock_wait: opts.lock_wait,
                backing_check: opts.backing_check,
            },
        )?;
        Self::from_file(file, opts)
    }

    /// Serves a COW file already open, checked and locked, with its
    /// bitmap loaded (by `open`, or passed by the instance that handed it
    /// over), and starts the durability thread.
    pub fn from_file(file: CowFile, opts: &DiskOptions) -> Result<Self, DiskError> {
        let path = file.path.clone();
        let path = path.as_path();
        let setup = |e| DiskError::Setup {
            path: path.to_path_buf(),
            source: e,
        };
        match file.backing_check {
            crate::cow::BackingCheck::SizeMtime => {}
            c => log::warn!(
                "{}: backing file {} checked for {} only (--backing-check {}): a changed base \
                 {} goes unnoticed",
                path.display(),
                file.backing_path.display(),
                if c == crate::cow::BackingCheck::Size {
                    "its size"
                } else {
                    "nothing"
                },
                c.name(),
                if c == crate::cow::BackingCheck::Size {
                    "of the same size"
                } else {
                    "of any size"
                }
            ),
        }
        let meta = file.meta_fd.metadata().map_err(setup)?;
        if file.geometry.data_offset > crate::cow::header::UML_MAX_DATA_OFFSET {
            log::warn!(
                "COW file {}: data offset {} exceeds 2^31; UML and uml_moo cannot open it",
                path.display(),
                file.geometry.data_offset
            );
        }
        let info = DiskInfo {
            size: crate::disk::DiskSize::new(file.geometry.disk_sectors()),
            readonly: opts.readonly,
            path: path.to_path_buf(),
            id: file_id(&meta),
            kind: "cow",
            direct: file.direct,
        };
        let event = Arc::new(EventFd::new().map_err(setup)?);
        let mut state = CowState::default();
        let journal = match &opts.journal_dir {
            None => None,
            Some(dir) => match Journal::open(dir, &file, opts.readonly) {
                Ok(opened) => {
                    if !opened.recovered.is_empty() {
                        for r in opened.recovered {
                            state.unpersisted.insert(r);
                        }
                        // A checkpoint gives them their bits soon (a
                        // read-only disk writes none: no clock to wait on).
                        if !opts.readonly {
                            state.since = Some(Instant::now());
                        }
                    }
                    opened.journal
                }
                Err(e) => {
                    log::warn!(
                        "{e}; serving without a crash journal: if this daemon dies, writes \
                         completed since the last flush may read back as the base's data \
                         (use --crash-journal DIR on a file system that has birth times, \
                         e.g. tmpfs or ext4)"
                    );
                    None
                }
            },
        };
        let shared = Arc::new(CowShared {
            info,
            state: Mutex::new(state),
            writeback: AtomicBool::new(opts.writeback),
            closed: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            opts: opts.clone(),
            channel: Channel::new(event.clone()),
            writes_since_sync: AtomicU64::new(0),
            backing_changed: AtomicBool::new(false),
            stats: Stats::default(),
            journal,
            gated: std::sync::atomic::AtomicU8::new(0),
            unregistered: state::Unregistered::default(),
            job_cv: std::sync::Condvar::new(),
            file,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ubd-durability".into())
            .spawn(move || durability::run(thread_shared, event))
            .map_err(setup)?;
        Ok(Self {
            shared,
            job: jobs::JobSlot::default(),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The shared state (for tests and `info`).
    pub fn shared(&self) -> &Arc<CowShared> {
        &self.shared
    }
}

impl Drop for CowDisk {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("{e}");
        }
    }
}

impl Disk for CowDisk {
    fn info(&self) -> &DiskInfo {
        &self.shared.info
    }

    fn new_queue_on(&self, event: Arc<EventFd>) -> Result<Box<dyn DiskQueue>, DiskError> {
        let s = &self.shared;
        let setup = |e| DiskError::Setup {
            path: s.info.path.clone(),
            source: e,
        };
        let mailbox = Arc::new(Mailbox::new(event.clone()));
        s.channel.register(&mailbox);
        let mut engine = Engine::new(s.opts.ring_entries, event).map_err(setup)?;
        engine.set_observer(s.opts.observer.as_ref().map(|o| o.0.clone()));
        Ok(Box::new(CowQueue::new(s.clone(), engine, mailbox)))
    }

    fn set_writeback(&self, writeback: bool) {
        self.shared.writeback.store(writeback, Ordering::Release);
    }

    fn writeback(&self) -> bool {
        self.shared.writeback.load(Ordering::Acquire)
    }

    fn stats(&self) -> DiskStats {
        let s = &self.shared.stats;
        DiskStats {
            reads_parked: s.reads_parked.load(Ordering::Relaxed),
            bitmap_writes: s.bitmap_writes.load(Ordering::Relaxed),
            bitmap_writes_waited: s.bitmap_writes_waited.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            epochs: s.epochs.load(Ordering::Relaxed),
            copy_ups: s.copy_ups.load(Ordering::Relaxed),
            writes_held: s.gate_parked.load(Ordering::Relaxed),
        }
    }

    fn start_job(&self, job: crate::disk::job::JobRequest) -> Result<(), DiskError> {
        jobs::start(&self.shared, &self.job, job)
    }

    fn job(&self) -> Option<crate::disk::job::JobStatus> {
        jobs::status(&self.job)
    }

    fn cancel_job(&self) -> Result<crate::disk::job::JobStatus, DiskError> {
        jobs::cancel(&self.shared, &self.job)
    }

    fn resize(&self, _sectors: u64, _force: bool, _drain: &dyn Fn()) -> Result<(), DiskError> {
        Err(DiskError::Resize {
            path: self.shared.info.path.clone(),
            reason: format!(
                "a UML COW file has the size of its backing file ({}): the header records that \
                 size and the backing's mtime, and uml_moo and UML rely on both. To grow the \
                 disk, merge it (uml_moo), resize the merged image and serve it as --raw, or \
                 make a new COW over a resized copy of the base",
                self.shared.file.backing_path.display()
            ),
        })
    }

    fn export(&self) -> Result<crate::disk::passed::DiskExport, DiskError> {
        let f = &self.shared.file;
        let err = |e| DiskError::Setup {
            path: f.path.clone(),
            source: e,
        };
        let dup = |file: &std::fs::File| file.try_clone().map(std::os::fd::OwnedFd::from);
        let bitmap = f.bitmap.memfd().ok_or_else(|| {
            err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the bitmap is not in shared memory",
            ))
        })?;
        Ok(crate::disk::passed::DiskExport {
            meta: crate::disk::passed::DiskMeta::Cow {
                path: f.path.clone(),
                backing: f.backing_path.clone(),
                direct: f.direct,
                backing_direct: f.backing_direct,
            },
            fds: vec![
                ("cow-meta", dup(&f.meta_fd).map_err(err)?),
                ("cow-data", dup(&f.data_fd).map_err(err)?),
                ("backing", dup(&f.backing_fd).map_err(err)?),
                ("bitmap", dup(bitmap).map_err(err)?),
            ],
        })
    }

    fn retire(&self, retired: bool) {
        self.shared.retired.store(retired, Ordering::Release);
        self.shared.closed.store(retired, Ordering::Release);
    }

    fn shutdown(&self) -> Result<(), DiskError> {
        let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) else {
            return Ok(());
        };
        // A flatten stops where it is (the bitmap keeps what it copied),
        // an export is abandoned.
        jobs::stop(&self.shared, &self.job);
        self.shared.closed.store(true, Ordering::Release);
        let (tx, rx) = mpsc::channel();
        self.shared.channel.send(Cmd::Shutdown(tx));
        let result = rx.recv_timeout(durability::SHUTDOWN_TIMEOUT);
        let _ = thread.join();
        let persist = |errno: i32| DiskError::Persist {
            path: self.shared.info.path.clone(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        match result {
            Ok(Ok(())) => {
                // Every completed write is durable with its bits (a retired
                // disk's journal is its successor's).
                if let Some(j) = &self.shared.journal {
                    if !self.shared.retired.load(Ordering::Acquire) {
                        j.remove();
                    }
                }
                Ok(())
            }
            Ok(Err(errno)) => Err(persist(errno)),
            Err(_) => Err(persist(libc::ETIMEDOUT)),
        }
    }
}
