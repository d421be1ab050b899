// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A queue of a COW disk: routing of reads (R4 parking included) and the
//! write path (R7); completed writes are recorded for the durability
//! thread (R5) and the crash journal.

use std::{
    ops::Range,
    os::fd::{AsRawFd, RawFd},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use slab::Slab;

use super::{
    channel::{Cmd, Mailbox, Reply},
    state::CowShared,
};
use crate::{
    disk::{
        check_request, extents::ExtentSet, Completion, DiskQueue, IoVecs, Op, Request, Submitted,
        SECTOR,
    },
    engine::{Engine, IoDone, IoKind, IoOp},
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

#[derive(Debug)]
struct Slot {
    tag: u64,
    remaining: u32,
    err: Option<i32>,
    stage: Stage,
    /// Punch fallback: zero-write this data range instead.
    zero_fallback: Option<(u64, u64)>,
}

pub(super) struct CowQueue {
    engine: Engine,
    data_fd: RawFd,
    backing_fd: RawFd,
    /// Keeps the files (`data_fd`, `backing_fd`), the bitmap and the zero
    /// buffer alive while operations are in flight.
    shared: Arc<CowShared>,
    mailbox: Arc<Mailbox>,
    slots: Slab<Slot>,
    done: Vec<Completion>,
    io: Vec<IoDone>,
    /// Requests handed to the durability thread.
    at_meta: usize,
}

impl CowQueue {
    /// A queue of `shared` with its own engine and mailbox.
    pub(super) fn new(shared: Arc<CowShared>, engine: Engine, mailbox: Arc<Mailbox>) -> Self {
        Self {
            engine,
            data_fd: shared.file.data_fd.as_raw_fd(),
            backing_fd: shared.file.backing_fd.as_raw_fd(),
            shared,
            mailbox,
            slots: Slab::new(),
            done: Vec::new(),
            io: Vec::new(),
            at_meta: 0,
        }
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

    fn new_slot(&mut self, tag: u64, stage: Stage) -> usize {
        self.slots.insert(Slot {
            tag,
            remaining: 0,
            err: None,
            stage,
            zero_fallback: None,
        })
    }

    /// Splits a read into COW, backing runs (R4 check included).
    fn read(&mut self, tag: u64, sector: u64, iov: IoVecs) -> Submitted {
        let nsect = iov.len() / SECTOR;
        let range = sector..sector + nsect;
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
                    self.done.push(Completion {
                        tag,
                        result: Err(libc::EIO),
                    });
                    return Submitted::Queued;
                };
                let runs = route(&file.bitmap, &state.unpersisted, range);
                let backing: Vec<Range<u64>> =
                    runs.iter().filter(|r| !r.2).map(|r| r.0..r.1).collect();
                if !backing.is_empty() && shared.backing_changed.load(Ordering::Acquire) {
                    drop(state);
                    self.done.push(Completion {
                        tag,
                        result: Err(libc::EIO),
                    });
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
                let part = iov.slice((start - sector) * SECTOR, (end - start) * SECTOR);
                let op = if cow {
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
                        start * SECTOR,
                        part,
                        file.backing_direct,
                        key as u64,
                    )
                };
                self.push(key, op);
            }
        }
        self.settle(key);
        Submitted::Queued
    }

    fn write(&mut self, tag: u64, sector: u64, iov: IoVecs) {
        let nsect = iov.len() / SECTOR;
        let range = sector..sector + nsect;
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
        let range = sector..sector + nsect;
        let key = self.new_slot(tag, Stage::Data { bits: range });
        let pos = self.shared.file.geometry.data_pos(sector);
        let len = nsect * SECTOR;
        if let Some(s) = self.slots.get_mut(key) {
            s.zero_fallback = Some((pos, len));
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.push(
            key,
            Ok(IoOp::fallocate(self.data_fd, pos, len, mode, key as u64)),
        );
        self.settle(key);
    }

    fn zero_write(&mut self, key: usize, mut pos: u64, mut len: u64) {
        while len > 0 {
            let n = len.min(crate::disk::ZERO_OP_MAX);
            let op = IoVecs::zeros(n).and_then(|iov| {
                IoOp::rw(
                    IoKind::Write { dsync: false },
                    self.data_fd,
                    pos,
                    iov,
                    self.shared.file.direct,
                    key as u64,
                )
            });
            self.push(key, op);
            pos += n;
            len -= n;
        }
    }

    /// A slot whose operations all finished moves on.
    fn settle(&mut self, key: usize) {
        if self.slots.get(key).is_none_or(|s| s.remaining > 0) {
            return;
        }
        let Some(slot) = self.slots.try_remove(key) else {
            return;
        };
        if let Some(errno) = slot.err {
            self.done.push(Completion {
                tag: slot.tag,
                result: Err(errno),
            });
            return;
        }
        match slot.stage {
            Stage::Read => self.done.push(Completion {
                tag: slot.tag,
                result: Ok(()),
            }),
            Stage::Data { bits } => self.data_done(slot.tag, bits),
        }
    }

    /// The data of a write is in the COW file: record it (R5).
    fn data_done(&mut self, tag: u64, bits: Range<u64>) {
        let shared = &self.shared;
        shared.writes_since_sync.fetch_add(1, Ordering::AcqRel);
        if !shared.writeback.load(Ordering::Acquire) {
            self.at_meta += 1;
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
        self.done.push(Completion {
            tag,
            result: Ok(()),
        });
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
    for s in range {
        while ext.peek().is_some_and(|e| e.1 <= s) {
            ext.next();
        }
        let cow = bitmap.test(s) || ext.peek().is_some_and(|e| e.0 <= s);
        match out.last_mut() {
            Some(last) if last.2 == cow => last.1 = s + 1,
            _ => out.push((s, s + 1, cow)),
        }
    }
    out
}

impl DiskQueue for CowQueue {
    fn submit(&mut self, req: Request) -> Submitted {
        if self.shared.closed.load(Ordering::Acquire) {
            self.done.push(Completion {
                tag: req.tag,
                result: Err(libc::ESHUTDOWN),
            });
            return Submitted::Queued;
        }
        if let Err(e) = check_request(&req.op, &self.shared.info) {
            self.done.push(Completion {
                tag: req.tag,
                result: Err(e),
            });
            return Submitted::Queued;
        }
        if req.op.is_write() {
            if let Some((sector, nsect)) = req.op.sectors() {
                let limit = self.shared.file.geometry.bitmap_sectors();
                if sector + nsect > limit {
                    log::warn!(
                        "{}: sectors from {limit} on have no bit in this {} bitmap; write refused",
                        self.shared.info.path.display(),
                        self.shared.file.header.version.name()
                    );
                    self.done.push(Completion {
                        tag: req.tag,
                        result: Err(libc::EIO),
                    });
                    return Submitted::Queued;
                }
            }
        }
        match req.op {
            Op::Read { sector, iov } => return self.read(req.tag, sector, iov),
            Op::Write { sector, iov } => self.write(req.tag, sector, iov),
            Op::Flush => {
                self.at_meta += 1;
                self.shared.channel.send(Cmd::Flush(Reply {
                    mailbox: self.mailbox.clone(),
                    tag: req.tag,
                }));
            }
            Op::Discard { sector, nsect } | Op::WriteZeroes { sector, nsect, .. } => {
                if nsect == 0 {
                    self.done.push(Completion {
                        tag: req.tag,
                        result: Ok(()),
                    });
                } else {
                    self.punch(req.tag, sector, nsect);
                }
            }
        }
        Submitted::Queued
    }

    fn commit(&mut self) -> std::io::Result<()> {
        self.engine.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        let mut io = std::mem::take(&mut self.io);
        if let Err(e) = self.engine.reap(&mut io) {
            log::error!("{}: io_uring: {e}", self.shared.info.path.display());
        }
        for d in io.drain(..) {
            let key = d.tag as usize;
            let mut fallback = None;
            if let Some(slot) = self.slots.get_mut(key) {
                slot.remaining = slot.remaining.saturating_sub(1);
                if d.result < 0 {
                    let errno = i32::try_from(-d.result).unwrap_or(libc::EIO);
                    match slot.zero_fallback.take() {
                        Some(r) if crate::disk::punch_unsupported(errno) => fallback = Some(r),
                        _ => slot.err = Some(errno),
                    }
                } else {
                    slot.zero_fallback = None;
                }
            }
            if let Some((pos, len)) = fallback {
                self.zero_write(key, pos, len);
            }
            self.settle(key);
        }
        self.io = io;
        if let Err(e) = self.engine.submit() {
            log::error!("{}: io_uring submit: {e}", self.shared.info.path.display());
        }
        let n = self.mailbox.take(&mut self.done);
        self.at_meta = self.at_meta.saturating_sub(n);
        out.append(&mut self.done);
        self.mailbox.take_retry()
    }

    fn event_fd(&self) -> RawFd {
        self.engine.event().as_raw_fd()
    }

    fn wait(&self, timeout: Option<Duration>) {
        self.engine.event().wait_for(timeout);
    }

    fn in_flight(&self) -> usize {
        self.slots.len() + self.at_meta
    }
}
