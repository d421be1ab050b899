// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A queue of a COW disk: routing of reads (R4 parking included) and the
//! write path (R7); completed writes are recorded for the durability
//! thread (R5) and the crash journal.

use std::{
    io,
    ops::Range,
    os::fd::{AsRawFd, RawFd},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use super::{
    channel::{Cmd, Mailbox, Reply},
    state::CowShared,
};
use crate::{
    disk::queue_core::{eio, QueueCore, ZeroFallback},
    disk::{
        check_request, extents::ExtentSet, sectors_to_bytes, Completion, DiskQueue, IoVecs, Op,
        Request, Submitted, SECTOR,
    },
    engine::{Engine, IoKind, IoOp},
};

/// What a request in flight on a queue is waiting for.
#[derive(Debug)]
enum Stage {
    /// Reads: all parts must land.
    Read,
    /// Data of a write (or a punch) is being written; then the sectors
    /// `bits` need their bits (empty for rewrites).
    Data { bits: Range<u64> },
}

pub(super) struct CowQueue {
    core: QueueCore<Stage>,
    data_fd: RawFd,
    backing_fd: RawFd,
    /// Keeps the files (`data_fd`, `backing_fd`), the bitmap and the zero
    /// buffer alive while operations are in flight.
    shared: Arc<CowShared>,
    mailbox: Arc<Mailbox>,
    /// Requests handed to the durability thread.
    at_meta: usize,
}

impl CowQueue {
    /// A queue of `shared` with its own engine and mailbox.
    pub(super) fn new(shared: Arc<CowShared>, engine: Engine, mailbox: Arc<Mailbox>) -> Self {
        Self {
            core: QueueCore::new(engine, shared.info.path.clone()),
            data_fd: shared.file.data_fd.as_raw_fd(),
            backing_fd: shared.file.backing_fd.as_raw_fd(),
            shared,
            mailbox,
            at_meta: 0,
        }
    }

    fn push(&mut self, key: usize, op: std::io::Result<IoOp>) {
        self.core.push(key, op);
    }

    fn new_slot(&mut self, tag: u64, stage: Stage) -> usize {
        self.core.open(tag, stage)
    }

    fn fail(&mut self, tag: u64, errno: i32) {
        self.core.complete(tag, Err(errno));
    }

    /// Splits a read into COW, backing runs (R4 check included).
    fn read(&mut self, tag: u64, sector: u64, iov: IoVecs) -> Submitted {
        let nsect = iov.len() / SECTOR;
        let Some(end) = sector.checked_add(nsect) else {
            self.fail(tag, libc::EIO);
            return Submitted::Queued;
        };
        let range = sector..end;
        let shared = self.shared.clone();
        let file = &shared.file;
        let key;
        if file.bitmap.all_set(range.clone()) {
            key = self.new_slot(tag, Stage::Read);
            let op = IoOp::rw(
                IoKind::Read,
                self.data_fd,
                file.geometry.data_pos(sector),
                iov,
                file.direct,
                key as u64,
            );
            self.push(key, op);
        } else {
            let runs = {
                let Ok(state) = shared.state.lock() else {
                    self.fail(tag, libc::EIO);
                    return Submitted::Queued;
                };
                let runs = route(&file.bitmap, &state.unpersisted, range);
                let backing: Vec<Range<u64>> =
                    runs.iter().filter(|r| !r.2).map(|r| r.0..r.1).collect();
                if !backing.is_empty() && shared.backing_changed.load(Ordering::Acquire) {
                    drop(state);
                    self.fail(tag, libc::EIO);
                    return Submitted::Queued;
                }
                if state.wb.check_read(&backing).is_err() {
                    self.mailbox.park();
                    shared.stats.reads_parked.fetch_add(1, Ordering::Relaxed);
                    drop(state);
                    return Submitted::Again(Request {
                        op: Op::Read { sector, iov },
                        tag,
                    });
                }
                runs
            };
            key = self.new_slot(tag, Stage::Read);
            for (start, end, cow) in runs {
                let op = run_part(&iov, sector, start..end).and_then(|part| {
                    if cow {
                        IoOp::rw(
                            IoKind::Read,
                            self.data_fd,
                            file.geometry.data_pos(start),
                            part,
                            file.direct,
                            key as u64,
                        )
                    } else {
                        IoOp::rw(
                            IoKind::Read,
                            self.backing_fd,
                            sectors_to_bytes(start).ok_or_else(eio)?,
                            part,
                            file.backing_direct,
                            key as u64,
                        )
                    }
                });
                self.push(key, op);
            }
        }
        self.settle(key);
        Submitted::Queued
    }

    fn write(&mut self, tag: u64, sector: u64, iov: IoVecs) {
        let nsect = iov.len() / SECTOR;
        let Some(end) = sector.checked_add(nsect) else {
            self.fail(tag, libc::EIO);
            return;
        };
        let range = sector..end;
        let shared = self.shared.clone();
        let file = &shared.file;
        let bits = if file.bitmap.all_set(range.clone()) {
            sector..sector
        } else {
            range
        };
        // Data writes go through Linux AIO with `--aio native` (see
        // `AioMode`): a first write lands in a hole of the COW file and
        // must allocate; a rewrite completes sooner than through io_uring.
        let aio = file.direct && shared.opts.aio == crate::disk::AioMode::Native;
        let key = self.new_slot(tag, Stage::Data { bits });
        let op = IoOp::rw(
            IoKind::Write { dsync: false },
            self.data_fd,
            file.geometry.data_pos(sector),
            iov,
            file.direct,
            key as u64,
        )
        .map(|op| if aio { op.via_aio() } else { op });
        self.push(key, op);
        self.settle(key);
    }

    fn punch(&mut self, tag: u64, sector: u64, nsect: u64) {
        let (Some(end), Some(len)) = (sector.checked_add(nsect), sectors_to_bytes(nsect)) else {
            self.fail(tag, libc::EIO);
            return;
        };
        let key = self.new_slot(tag, Stage::Data { bits: sector..end });
        let pos = self.shared.file.geometry.data_pos(sector);
        self.core.set_zero_fallback(
            key,
            ZeroFallback {
                fd: self.data_fd,
                pos,
                len,
                direct: self.shared.file.direct,
                dsync: false,
            },
        );
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.push(
            key,
            Ok(IoOp::fallocate(self.data_fd, pos, len, mode, key as u64)),
        );
        self.settle(key);
    }

    /// A request whose operations all landed moves on.
    fn settle(&mut self, key: usize) {
        let Some(l) = self.core.close(key) else {
            return;
        };
        match (l.err, l.stage) {
            (Some(errno), _) => self.fail(l.tag, errno),
            (None, Stage::Read) => self.core.complete(l.tag, Ok(())),
            (None, Stage::Data { bits }) => self.data_done(l.tag, bits),
        }
    }

    /// The data of a write is in the COW file: record it (R5).
    fn data_done(&mut self, tag: u64, bits: Range<u64>) {
        let shared = &self.shared;
        shared.writes_since_sync.fetch_add(1, Ordering::AcqRel);
        if !shared.writeback.load(Ordering::Acquire) {
            self.at_meta = self.at_meta.saturating_add(1);
            let ranges = if bits.is_empty() {
                Vec::new()
            } else {
                vec![bits]
            };
            shared.channel.send(Cmd::Persist(
                ranges,
                Reply {
                    mailbox: self.mailbox.clone(),
                    tag,
                },
            ));
            return;
        }
        if !bits.is_empty() {
            // Before the completion is posted: a daemon crash from here on
            // must not lose this write (see `journal`).
            if let Some(j) = &shared.journal {
                j.record(bits.clone());
            }
            let mut kick = false;
            if let Ok(mut s) = shared.state.lock() {
                s.unpersisted.insert(bits);
                if s.since.is_none() {
                    s.since = Some(Instant::now());
                    kick = true;
                }
                if s.unpersisted.len() >= shared.opts.max_pending_extents && !s.checkpoint_requested
                {
                    s.checkpoint_requested = true;
                    kick = true;
                }
            }
            if kick {
                shared.channel.send(Cmd::Kick);
            }
        }
        self.core.complete(tag, Ok(()));
    }
}

/// Runs `(start, end, in_cow)` of a sector range: a sector is in the COW
/// when its bit is set or its completed write awaits its bit.
fn route(
    bitmap: &crate::cow::Bitmap,
    unpersisted: &ExtentSet,
    range: Range<u64>,
) -> Vec<(u64, u64, bool)> {
    let extents: Vec<(u64, u64)> = unpersisted.overlapping(range.clone()).collect();
    let mut ext = extents.iter().peekable();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for s in range.clone() {
        while ext.peek().is_some_and(|e| e.1 <= s) {
            ext.next();
        }
        let cow = bitmap.test(s) || ext.peek().is_some_and(|e| e.0 <= s);
        // A run lasts until the next one starts, the last one to the end.
        if out.last().is_none_or(|last| last.2 != cow) {
            if let Some(last) = out.last_mut() {
                last.1 = s;
            }
            out.push((s, range.end, cow));
        }
    }
    out
}

/// The memory of sectors `run` of a read of `iov` at `sector`.
fn run_part(iov: &IoVecs, sector: u64, run: Range<u64>) -> io::Result<IoVecs> {
    let from = run.start.checked_sub(sector).and_then(sectors_to_bytes);
    let len = run.end.checked_sub(run.start).and_then(sectors_to_bytes);
    match (from, len) {
        (Some(from), Some(len)) => Ok(iov.slice(from, len)),
        _ => Err(eio()),
    }
}

impl DiskQueue for CowQueue {
    fn submit(&mut self, req: Request) -> Submitted {
        if self.shared.closed.load(Ordering::Acquire) {
            self.fail(req.tag, libc::ESHUTDOWN);
            return Submitted::Queued;
        }
        if let Err(e) = check_request(&req.op, &self.shared.info) {
            self.fail(req.tag, e);
            return Submitted::Queued;
        }
        if req.op.is_write() {
            if let Some((sector, nsect)) = req.op.sectors() {
                let limit = self.shared.file.geometry.bitmap_sectors();
                if sector.checked_add(nsect).is_none_or(|end| end > limit) {
                    log::warn!(
                        "{}: sectors from {limit} on have no bit in this {} bitmap; write refused",
                        self.shared.info.path.display(),
                        self.shared.file.header.version.name()
                    );
                    self.fail(req.tag, libc::EIO);
                    return Submitted::Queued;
                }
            }
        }
        match req.op {
            Op::Read { sector, iov } => return self.read(req.tag, sector, iov),
            Op::Write { sector, iov } => self.write(req.tag, sector, iov),
            Op::Flush => {
                self.at_meta = self.at_meta.saturating_add(1);
                self.shared.channel.send(Cmd::Flush(Reply {
                    mailbox: self.mailbox.clone(),
                    tag: req.tag,
                }));
            }
            Op::Discard { sector, nsect } | Op::WriteZeroes { sector, nsect, .. } => {
                if nsect == 0 {
                    self.core.complete(req.tag, Ok(()));
                } else {
                    self.punch(req.tag, sector, nsect);
                }
            }
        }
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
        let n = self.mailbox.take(out);
        self.at_meta = self.at_meta.saturating_sub(n);
        self.mailbox.take_retry()
    }

    fn event_fd(&self) -> RawFd {
        self.core.event_fd()
    }

    fn wait(&self, timeout: Option<Duration>) {
        self.core.wait(timeout);
    }

    fn in_flight(&self) -> usize {
        self.core.len().saturating_add(self.at_meta)
    }
}
