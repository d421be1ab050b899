// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The queue core the raw and the COW disk share: one engine, requests
//! split into operations (a slot counts its operations in flight), the
//! write-zeroes fallback, completions. What a request does when all its
//! operations landed (a raw writethrough sync, a COW write's bits) is the
//! disk's; everything up to there is here, once.

use std::{io, os::fd::RawFd, path::PathBuf, time::Duration};

use slab::Slab;

use super::{Completion, ZERO_OP_MAX};
use crate::engine::{Engine, IoDone, IoKind, IoOp, IoVecs};

/// Where to write zeros when a punch or zero-range is not supported.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ZeroFallback {
    /// File written.
    pub fd: RawFd,
    /// Byte offset.
    pub pos: u64,
    /// Bytes.
    pub len: u64,
    /// `O_DIRECT` file.
    pub direct: bool,
    /// Writes carry `RWF_DSYNC`.
    pub dsync: bool,
}

/// Whether a failed `fallocate` (hole punch or zero range) means "not
/// here": the file system cannot do it (EOPNOTSUPP), or not for this range
/// or descriptor (EINVAL, e.g. some file systems with `O_DIRECT`). Both the
/// raw and the COW disk then write zeros instead (one rule, here).
pub fn punch_unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::EINVAL)
}

/// The error of an operation that cannot be built: an I/O error (EIO).
pub(crate) fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

#[derive(Debug)]
struct Slot<S> {
    tag: u64,
    remaining: u32,
    err: Option<i32>,
    zero_fallback: Option<ZeroFallback>,
    stage: S,
}

/// A request whose operations all landed.
#[derive(Debug)]
pub(crate) struct Landed<S> {
    /// The request's tag.
    pub tag: u64,
    /// The first error of its operations.
    pub err: Option<i32>,
    /// The disk's state of the request.
    pub stage: S,
}

/// An engine and the requests in flight on it; `S` is the disk's
/// per-request state.
#[derive(Debug)]
pub(crate) struct QueueCore<S> {
    engine: Engine,
    slots: Slab<Slot<S>>,
    done: Vec<Completion>,
    io: Vec<IoDone>,
    /// Keys handed out by `reap` and given back by `recycle` (no
    /// allocation per poll).
    keys: Vec<usize>,
    /// The disk's file, for logs.
    path: PathBuf,
}

impl<S> QueueCore<S> {
    /// A core over `engine` for the disk at `path`.
    pub fn new(engine: Engine, path: PathBuf) -> Self {
        Self {
            engine,
            slots: Slab::new(),
            done: Vec::new(),
            io: Vec::new(),
            keys: Vec::new(),
            path,
        }
    }

    /// A new request; its operations are pushed under the returned key.
    pub fn open(&mut self, tag: u64, stage: S) -> usize {
        self.slots.insert(Slot {
            tag,
            remaining: 0,
            err: None,
            zero_fallback: None,
            stage,
        })
    }

    /// Hands an operation of request `key` to the engine (a failure to
    /// build or queue it becomes the request's error). An operation of no
    /// request is not pushed: nothing would count its completion.
    pub fn push(&mut self, key: usize, op: io::Result<IoOp>) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        // The count must cover every operation in flight, or the request
        // would close before its last one lands: one it cannot count is
        // refused, not pushed.
        let r = slot
            .remaining
            .checked_add(1)
            .ok_or_else(eio)
            .and_then(|n| op.and_then(|op| self.engine.push(op)).map(|()| n));
        match r {
            Ok(n) => slot.remaining = n,
            Err(e) => slot.err = Some(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    /// Request `key`'s next operation is a punch or zero-range that falls
    /// back to writing zeros (see [`punch_unsupported`]).
    pub fn set_zero_fallback(&mut self, key: usize, fb: ZeroFallback) {
        if let Some(s) = self.slots.get_mut(key) {
            s.zero_fallback = Some(fb);
        }
    }

    fn zero_write(&mut self, key: usize, fb: ZeroFallback) {
        let (mut pos, mut len) = (fb.pos, fb.len);
        while len > 0 {
            // `n` bytes now, `rest` in the next operations.
            let (n, rest) = len
                .checked_sub(ZERO_OP_MAX)
                .map_or((len, 0), |rest| (ZERO_OP_MAX, rest));
            let op = IoVecs::zeros(n).and_then(|iov| {
                IoOp::rw(
                    IoKind::Write { dsync: fb.dsync },
                    fb.fd,
                    pos,
                    iov,
                    fb.direct,
                    key as u64,
                )
            });
            self.push(key, op);
            if rest == 0 {
                return;
            }
            let Some(next) = pos.checked_add(n) else {
                // Zeros past the largest byte offset (no request that
                // `check_range` passed reaches it): the request fails.
                self.push(key, Err(eio()));
                return;
            };
            (pos, len) = (next, rest);
        }
    }

    /// True when request `key` exists and has no operation in flight.
    pub fn idle(&self, key: usize) -> bool {
        self.slots.get(key).is_some_and(|s| s.remaining == 0)
    }

    /// Request `key`'s state.
    pub fn stage_mut(&mut self, key: usize) -> Option<&mut S> {
        self.slots.get_mut(key).map(|s| &mut s.stage)
    }

    /// Request `key`'s first error so far.
    pub fn err(&self, key: usize) -> Option<i32> {
        self.slots.get(key).and_then(|s| s.err)
    }

    /// Removes request `key` once it has no operation in flight.
    pub fn close(&mut self, key: usize) -> Option<Landed<S>> {
        if !self.idle(key) {
            return None;
        }
        self.slots.try_remove(key).map(|s| Landed {
            tag: s.tag,
            err: s.err,
            stage: s.stage,
        })
    }

    /// Reports request `tag` complete.
    pub fn complete(&mut self, tag: u64, result: Result<(), i32>) {
        self.done.push(Completion { tag, result });
    }

    /// Reaps the engine: counts each finished operation against its
    /// request, records errors, starts zero-write fallbacks. Returns the
    /// requests to look at (those whose operations may all have landed).
    pub fn reap(&mut self) -> Vec<usize> {
        let mut io = std::mem::take(&mut self.io);
        if let Err(e) = self.engine.reap(&mut io) {
            log::error!("{}: io_uring: {e}", self.path.display());
        }
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        for d in io.drain(..) {
            let key = usize::try_from(d.tag).unwrap_or(usize::MAX);
            let mut fallback = None;
            if let Some(slot) = self.slots.get_mut(key) {
                slot.remaining = slot.remaining.saturating_sub(1);
                if d.result < 0 {
                    let errno = i32::try_from(d.result.saturating_neg()).unwrap_or(libc::EIO);
                    match slot.zero_fallback.take() {
                        Some(fb) if punch_unsupported(errno) => fallback = Some(fb),
                        _ => slot.err = Some(errno),
                    }
                } else {
                    slot.zero_fallback = None;
                }
            }
            if let Some(fb) = fallback {
                self.zero_write(key, fb);
            }
            keys.push(key);
        }
        self.io = io;
        keys
    }

    /// Gives back the vector `reap` returned, for the next poll.
    pub fn recycle(&mut self, keys: Vec<usize>) {
        self.keys = keys;
    }

    /// Moves the completions so far to `out`, and submits what the
    /// callers queued meanwhile.
    pub fn drain_done(&mut self, out: &mut Vec<Completion>) {
        if let Err(e) = self.engine.submit() {
            log::error!("{}: io_uring submit: {e}", self.path.display());
        }
        out.append(&mut self.done);
    }

    /// Hands queued operations to the kernel.
    pub fn commit(&mut self) -> io::Result<()> {
        self.engine.submit()
    }

    /// The eventfd completions signal.
    pub fn event_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.engine.event().as_raw_fd()
    }

    /// Blocks until a completion may be ready, or `timeout`.
    pub fn wait(&self, timeout: Option<Duration>) {
        self.engine.event().wait_for(timeout);
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}
