// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A raw image: sector N at byte N*512 of one file.
//!
//! Writethrough writes use `RWF_DSYNC`; FLUSH is an `fdatasync`; DISCARD
//! punches a hole; WRITE_ZEROES zeroes a range (punching when allowed to
//! unmap), falling back to writing zeros where the filesystem cannot.

use std::{
    fs::{File, OpenOptions},
    io::{Seek, SeekFrom},
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use super::{
    check_request, file_id,
    queue_core::{eio, QueueCore, ZeroFallback},
    sectors_to_bytes, AioMode, Completion, Disk, DiskError, DiskInfo, DiskOptions, DiskQueue, Op,
    Request, Submitted, SECTOR,
};
use crate::{
    cow::file::ofd_lock,
    engine::{Engine, EventFd, IoKind, IoOp},
};

/// A raw image file.
#[derive(Debug)]
pub struct RawDisk {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    file: File,
    info: DiskInfo,
    writeback: AtomicBool,
    closed: AtomicBool,
    /// Handed over to another instance: nothing more is written.
    retired: AtomicBool,
    ring_entries: u32,
    observer: Option<super::Observer>,
    /// `O_DIRECT` writes go through Linux AIO (`--aio native`).
    aio_writes: bool,
}

impl RawDisk {
    /// Opens and locks a raw image.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Self, DiskError> {
        let open_err = |e| DiskError::OpenRaw {
            path: path.to_path_buf(),
            source: e,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.readonly);
        let mut direct = false;
        let file = if opts.direct {
            match oo.clone().custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => {
                    direct = true;
                    f
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "{}: O_DIRECT not supported here; using the page cache",
                        path.display()
                    );
                    oo.open(path).map_err(open_err)?
                }
                Err(e) => return Err(open_err(e)),
            }
        } else {
            oo.open(path).map_err(open_err)?
        };
        ofd_lock(&file, path, !opts.readonly, "raw image")?;
        Self::adopt(path, file, direct, opts)
    }

    /// Serves an image already open and locked (by this process, or by the
    /// instance that handed it over).
    pub fn adopt(
        path: &Path,
        file: File,
        direct: bool,
        opts: &DiskOptions,
    ) -> Result<Self, DiskError> {
        let open_err = |e| DiskError::OpenRaw {
            path: path.to_path_buf(),
            source: e,
        };
        let meta = file.metadata().map_err(open_err)?;
        let len = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
        if len % SECTOR != 0 {
            log::warn!(
                "raw image {}: size {len} is not a multiple of 512; the last {} bytes are not served",
                path.display(),
                len % SECTOR
            );
        }
        let shared = Arc::new(Shared {
            info: DiskInfo {
                size: super::DiskSize::new(len / SECTOR),
                readonly: opts.readonly,
                path: path.to_path_buf(),
                id: file_id(&meta),
                kind: "raw",
                direct,
            },
            file,
            writeback: AtomicBool::new(opts.writeback),
            closed: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            ring_entries: opts.ring_entries,
            observer: opts.observer.clone(),
            aio_writes: opts.aio == AioMode::Native,
        });
        Ok(Self { shared })
    }
}

impl Disk for RawDisk {
    fn info(&self) -> &DiskInfo {
        &self.shared.info
    }

    fn new_queue_on(&self, event: Arc<EventFd>) -> Result<Box<dyn DiskQueue>, DiskError> {
        let s = &self.shared;
        let setup = |e| DiskError::Setup {
            path: s.info.path.clone(),
            source: e,
        };
        let mut engine = Engine::new(s.ring_entries, event).map_err(setup)?;
        engine.set_observer(s.observer.as_ref().map(|o| o.0.clone()));
        Ok(Box::new(RawQueue {
            core: QueueCore::new(engine, s.info.path.clone()),
            fd: s.file.as_raw_fd(),
            info: s.info.clone(),
            writeback: s.writeback.load(Ordering::Relaxed),
            shared: s.clone(),
        }))
    }

    fn set_writeback(&self, writeback: bool) {
        self.shared.writeback.store(writeback, Ordering::Relaxed);
    }

    fn writeback(&self) -> bool {
        self.shared.writeback.load(Ordering::Relaxed)
    }

    fn resize(&self, sectors: u64, force: bool, drain: &dyn Fn()) -> Result<(), DiskError> {
        let s = &self.shared;
        let err = |reason: String| DiskError::Resize {
            path: s.info.path.clone(),
            reason,
        };
        if s.info.readonly {
            return Err(err("it is served read-only".into()));
        }
        let old = s.info.sectors();
        let bytes = super::sectors_to_bytes(sectors)
            .filter(|_| sectors > 0)
            .ok_or_else(|| err(format!("{sectors} sectors is not a size")))?;
        if sectors < old && !force {
            return Err(err(format!(
                "shrinking from {old} to {sectors} sectors cuts off data the guest may still \
                 address (a partition or file system reaching the end); shrink the guest's use \
                 first and pass --force"
            )));
        }
        let set_len = |b: u64| {
            s.file
                .set_len(b)
                .and_then(|()| s.file.sync_all())
                .map_err(|e| err(format!("cannot set the file's length to {b}: {e}")))
        };
        if sectors >= old {
            set_len(bytes)?;
            s.info.size.set(sectors);
        } else {
            // New requests past the new end are refused from here on; the
            // ones admitted before land before the file is cut.
            s.info.size.set(sectors);
            drain();
            if let Err(e) = set_len(bytes) {
                s.info.size.set(old);
                return Err(e);
            }
        }
        log::info!(
            "{}: resized from {old} to {sectors} sectors ({bytes} bytes)",
            s.info.path.display()
        );
        Ok(())
    }

    fn export(&self) -> Result<super::passed::DiskExport, DiskError> {
        let s = &self.shared;
        let fd = s.file.try_clone().map_err(|e| DiskError::Setup {
            path: s.info.path.clone(),
            source: e,
        })?;
        Ok(super::passed::DiskExport {
            meta: super::passed::DiskMeta::Raw {
                path: s.info.path.clone(),
                direct: s.info.direct,
            },
            fds: vec![("image", fd.into())],
        })
    }

    fn retire(&self, retired: bool) {
        let s = &self.shared;
        s.retired.store(retired, Ordering::Release);
        s.closed.store(retired, Ordering::Release);
    }

    fn shutdown(&self) -> Result<(), DiskError> {
        let s = &self.shared;
        s.closed.store(true, Ordering::Relaxed);
        if s.info.readonly || s.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        s.file.sync_data().map_err(|e| DiskError::Persist {
            path: s.info.path.clone(),
            source: e,
        })
    }
}

/// A raw request's state while its operations are in flight.
#[derive(Debug)]
struct Stage {
    /// Sync after the operation (writethrough discard/write-zeroes).
    sync_after: bool,
}

struct RawQueue {
    core: QueueCore<Stage>,
    fd: RawFd,
    info: DiskInfo,
    writeback: bool,
    /// Keeps the file (and its descriptor `fd`) alive.
    shared: Arc<Shared>,
}

impl RawQueue {
    fn flags(&self) -> (bool, bool) {
        (
            self.shared.writeback.load(Ordering::Relaxed),
            self.shared.closed.load(Ordering::Acquire),
        )
    }

    /// `None` for sectors past the largest byte offset (`check_range`
    /// refuses them).
    fn zero_fallback(&self, sector: u64, nsect: u64) -> Option<ZeroFallback> {
        Some(ZeroFallback {
            fd: self.fd,
            pos: sectors_to_bytes(sector)?,
            len: sectors_to_bytes(nsect)?,
            direct: self.info.direct,
            dsync: !self.writeback,
        })
    }

    fn settle(&mut self, key: usize) {
        if !self.core.idle(key) {
            return;
        }
        let sync = self.core.err(key).is_none()
            && self
                .core
                .stage_mut(key)
                .is_some_and(|s| std::mem::take(&mut s.sync_after));
        if sync {
            self.core.push(key, Ok(IoOp::fsync(self.fd, key as u64)));
            if !self.core.idle(key) {
                return;
            }
        }
        if let Some(l) = self.core.close(key) {
            self.core.complete(l.tag, l.err.map_or(Ok(()), Err));
        }
    }
}

impl DiskQueue for RawQueue {
    fn submit(&mut self, req: Request) -> Submitted {
        let (writeback, closed) = self.flags();
        self.writeback = writeback;
        if closed {
            self.core.complete(req.tag, Err(libc::ESHUTDOWN));
            return Submitted::Queued;
        }
        if let Err(e) = check_request(&req.op, &self.info) {
            self.core.complete(req.tag, Err(e));
            return Submitted::Queued;
        }
        let key = self.core.open(req.tag, Stage { sync_after: false });
        let direct = self.info.direct;
        // The byte offset of a sector `check_range` passed always fits.
        let byte_pos = |sector| sectors_to_bytes(sector).ok_or_else(eio);
        match req.op {
            Op::Read { sector, iov } => {
                let op = byte_pos(sector)
                    .and_then(|pos| IoOp::rw(IoKind::Read, self.fd, pos, iov, direct, key as u64));
                self.core.push(key, op);
            }
            Op::Write { sector, iov } => {
                let kind = IoKind::Write { dsync: !writeback };
                // O_DIRECT writes go through Linux AIO: writes into holes
                // allocate inside io_submit instead of being handed to
                // io-wq threads, and overwrites complete sooner too (see
                // `AioMode`).
                let aio = direct && self.shared.aio_writes;
                let op = byte_pos(sector)
                    .and_then(|pos| IoOp::rw(kind, self.fd, pos, iov, direct, key as u64))
                    .map(|op| if aio { op.via_aio() } else { op });
                self.core.push(key, op);
            }
            Op::Flush => self.core.push(key, Ok(IoOp::fsync(self.fd, key as u64))),
            Op::Discard { sector, nsect } | Op::WriteZeroes { sector, nsect, .. } => {
                let unmap = match req.op {
                    Op::WriteZeroes { unmap, .. } => unmap,
                    _ => true,
                };
                if let Some(s) = self.core.stage_mut(key) {
                    s.sync_after = !writeback;
                }
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                match self.zero_fallback(sector, nsect) {
                    Some(fb) => {
                        self.core.set_zero_fallback(key, fb);
                        let op = IoOp::fallocate(self.fd, fb.pos, fb.len, mode, key as u64);
                        self.core.push(key, Ok(op));
                    }
                    None => self.core.push(key, Err(eio())),
                }
            }
        }
        self.settle(key);
        Submitted::Queued
    }

    fn commit(&mut self) -> std::io::Result<()> {
        self.core.commit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        let keys = self.core.reap();
        for &key in &keys {
            self.settle(key);
        }
        self.core.recycle(keys);
        self.core.drain_done(out);
        false
    }

    fn event_fd(&self) -> RawFd {
        self.core.event_fd()
    }

    fn wait(&self, timeout: Option<Duration>) {
        self.core.wait(timeout);
    }

    fn in_flight(&self) -> usize {
        self.core.len()
    }
}
