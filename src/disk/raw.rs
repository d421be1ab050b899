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

use slab::Slab;

use super::{
    check_request, file_id, AioMode, Completion, Disk, DiskError, DiskInfo, DiskOptions, DiskQueue,
    Op, Request, Submitted, SECTOR,
};
use crate::{
    cow::file::ofd_lock,
    engine::{Engine, EventFd, IoDone, IoKind, IoOp, IoVecs},
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
                sectors: len / SECTOR,
                readonly: opts.readonly,
                path: path.to_path_buf(),
                id: file_id(&meta),
                kind: "raw",
                direct,
            },
            file,
            writeback: AtomicBool::new(opts.writeback),
            closed: AtomicBool::new(false),
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
            engine,
            fd: s.file.as_raw_fd(),
            info: s.info.clone(),
            writeback: s.writeback.load(Ordering::Relaxed),
            shared: s.clone(),
            slots: Slab::new(),
            done: Vec::new(),
            io: Vec::new(),
        }))
    }

    fn set_writeback(&self, writeback: bool) {
        self.shared.writeback.store(writeback, Ordering::Relaxed);
    }

    fn writeback(&self) -> bool {
        self.shared.writeback.load(Ordering::Relaxed)
    }

    fn shutdown(&self) -> Result<(), DiskError> {
        let s = &self.shared;
        s.closed.store(true, Ordering::Relaxed);
        if s.info.readonly {
            return Ok(());
        }
        s.file.sync_data().map_err(|e| DiskError::Persist {
            path: s.info.path.clone(),
            source: e,
        })
    }
}

#[derive(Debug)]
struct Slot {
    tag: u64,
    remaining: u32,
    err: Option<i32>,
    /// Sync after the operation (writethrough discard/write-zeroes).
    sync_after: bool,
    /// Fallback for write-zeroes when fallocate is unsupported.
    zero_fallback: Option<(u64, u64)>,
}

struct RawQueue {
    engine: Engine,
    fd: RawFd,
    info: DiskInfo,
    writeback: bool,
    /// Keeps the file (and its descriptor `fd`) and the zero buffer alive.
    shared: Arc<Shared>,
    slots: Slab<Slot>,
    done: Vec<Completion>,
    io: Vec<IoDone>,
}

impl RawQueue {
    fn flags(&self) -> (bool, bool) {
        (
            self.shared.writeback.load(Ordering::Relaxed),
            self.shared.closed.load(Ordering::Relaxed),
        )
    }

    fn fail(&mut self, tag: u64, errno: i32) {
        self.done.push(Completion {
            tag,
            result: Err(errno),
        });
    }

    fn push(&mut self, key: usize, op: std::io::Result<IoOp>) {
        let r = op.and_then(|op| self.engine.push(op));
        if let Some(slot) = self.slots.get_mut(key) {
            match r {
                Ok(()) => slot.remaining += 1,
                Err(e) => slot.err = Some(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
    }

    fn zero_ops(&mut self, key: usize, mut offset: u64, mut len: u64) {
        while len > 0 {
            let n = len.min(crate::disk::ZERO_OP_MAX);
            let dsync = !self.writeback;
            let op = IoVecs::zeros(n).and_then(|iov| {
                IoOp::rw(
                    IoKind::Write { dsync },
                    self.fd,
                    offset,
                    iov,
                    self.info.direct,
                    key as u64,
                )
            });
            self.push(key, op);
            offset += n;
            len -= n;
        }
    }

    fn settle(&mut self, key: usize) {
        let Some(slot) = self.slots.get(key) else {
            return;
        };
        if slot.remaining > 0 {
            return;
        }
        if slot.err.is_none() && slot.sync_after {
            if let Some(s) = self.slots.get_mut(key) {
                s.sync_after = false;
            }
            let op = IoOp::fsync(self.fd, key as u64);
            self.push(key, Ok(op));
            if self.slots.get(key).is_some_and(|s| s.remaining > 0) {
                return;
            }
        }
        if let Some(slot) = self.slots.try_remove(key) {
            self.done.push(Completion {
                tag: slot.tag,
                result: slot.err.map_or(Ok(()), Err),
            });
        }
    }
}

impl DiskQueue for RawQueue {
    fn submit(&mut self, req: Request) -> Submitted {
        let (writeback, closed) = self.flags();
        self.writeback = writeback;
        if closed {
            self.fail(req.tag, libc::ESHUTDOWN);
            return Submitted::Queued;
        }
        if let Err(e) = check_request(&req.op, &self.info) {
            self.fail(req.tag, e);
            return Submitted::Queued;
        }
        let key = self.slots.insert(Slot {
            tag: req.tag,
            remaining: 0,
            err: None,
            sync_after: false,
            zero_fallback: None,
        });
        let direct = self.info.direct;
        match req.op {
            Op::Read { sector, iov } => {
                let op = IoOp::rw(
                    IoKind::Read,
                    self.fd,
                    sector * SECTOR,
                    iov,
                    direct,
                    key as u64,
                );
                self.push(key, op);
            }
            Op::Write { sector, iov } => {
                let kind = IoKind::Write { dsync: !writeback };
                // O_DIRECT writes go through Linux AIO: writes into holes
                // allocate inside io_submit instead of being handed to
                // io-wq threads, and overwrites complete sooner too (see
                // `AioMode`).
                let aio = direct && self.shared.aio_writes;
                let op = IoOp::rw(kind, self.fd, sector * SECTOR, iov, direct, key as u64)
                    .map(|op| if aio { op.via_aio() } else { op });
                self.push(key, op);
            }
            Op::Flush => self.push(key, Ok(IoOp::fsync(self.fd, key as u64))),
            Op::Discard { sector, nsect }
            | Op::WriteZeroes {
                sector,
                nsect,
                unmap: true,
            } => {
                if let Some(s) = self.slots.get_mut(key) {
                    s.sync_after = !writeback;
                    s.zero_fallback = Some((sector * SECTOR, nsect * SECTOR));
                }
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                self.push(
                    key,
                    Ok(IoOp::fallocate(
                        self.fd,
                        sector * SECTOR,
                        nsect * SECTOR,
                        mode,
                        key as u64,
                    )),
                );
            }
            Op::WriteZeroes {
                sector,
                nsect,
                unmap: false,
            } => {
                if let Some(s) = self.slots.get_mut(key) {
                    s.sync_after = !writeback;
                    s.zero_fallback = Some((sector * SECTOR, nsect * SECTOR));
                }
                let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                self.push(
                    key,
                    Ok(IoOp::fallocate(
                        self.fd,
                        sector * SECTOR,
                        nsect * SECTOR,
                        mode,
                        key as u64,
                    )),
                );
            }
        }
        self.settle(key);
        Submitted::Queued
    }

    fn commit(&mut self) -> std::io::Result<()> {
        self.engine.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        let mut io = std::mem::take(&mut self.io);
        if let Err(e) = self.engine.reap(&mut io) {
            log::error!("{}: io_uring: {e}", self.info.path.display());
        }
        for d in io.drain(..) {
            let key = d.tag as usize;
            let mut fallback = None;
            if let Some(slot) = self.slots.get_mut(key) {
                slot.remaining = slot.remaining.saturating_sub(1);
                if d.result < 0 {
                    let errno = i32::try_from(-d.result).unwrap_or(libc::EIO);
                    match slot.zero_fallback.take() {
                        Some(range) if super::punch_unsupported(errno) => {
                            fallback = Some(range);
                        }
                        _ => slot.err = Some(errno),
                    }
                } else {
                    slot.zero_fallback = None;
                }
            }
            if let Some((off, len)) = fallback {
                self.zero_ops(key, off, len);
            }
            self.settle(key);
        }
        self.io = io;
        if let Err(e) = self.engine.submit() {
            log::error!("{}: io_uring submit: {e}", self.info.path.display());
        }
        out.append(&mut self.done);
        false
    }

    fn event_fd(&self) -> RawFd {
        self.engine.event().as_raw_fd()
    }

    fn wait(&self, timeout: Option<Duration>) {
        self.engine.event().wait_for(timeout);
    }

    fn in_flight(&self) -> usize {
        self.slots.len()
    }
}
