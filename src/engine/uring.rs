// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring engine: many operations in flight, completions signalled on
//! an eventfd that the owner polls together with its other descriptors.
//!
//! Invariant: an operation owns its iovec array, its bounce buffer and the
//! memory its iovecs point to (an [`IoVecs`] and its owner) from
//! [`Engine::push`] until its [`IoDone`] is returned by [`Engine::reap`],
//! and an engine is only dropped once every operation was reaped: the
//! kernel never sees freed or unmapped memory. Short reads and writes are continued here;
//! a read that reaches end of file zero-fills the rest of its buffers.

use std::{
    io,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use io_uring::{opcode, squeue, IoUring};
use slab::Slab;

use super::op::{iov_total, IoDone, IoKind, IoOp};
pub use super::{
    buffers::{AlignedBuf, DIRECT_ALIGN},
    eventfd::EventFd,
    observer::IoObserver,
};

/// One io_uring with its operations in flight.
pub struct Engine {
    ring: IoUring,
    /// Linux AIO context, made on first use. Declared before `ops`: dropped
    /// (waiting for its requests) before the ops it points into.
    aio: Option<super::aio::Aio>,
    ops: Slab<IoOp>,
    event: Arc<EventFd>,
    queued: usize,
    observer: Option<Arc<dyn IoObserver>>,
    /// Completions taken off the ring while it was full, not yet handled.
    stash: Vec<(u64, i32)>,
    /// Linux AIO could not be set up: never try again.
    aio_failed: bool,
    /// Ops the write-hold test hook keeps from the kernel for now.
    held: Vec<usize>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("in_flight", &self.ops.len())
            .finish()
    }
}

impl Engine {
    /// A ring with `entries` submission slots whose completions signal
    /// `event`.
    pub fn new(entries: u32, event: Arc<EventFd>) -> io::Result<Self> {
        // Created disabled, so that it can be restricted to the operations
        // the engine submits before it runs anything: a ring is the one
        // kernel interface seccomp cannot see into (the sandbox).
        let ring = match IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_r_disabled()
            .build(entries)
        {
            Ok(r) => r,
            // Kernels before 5.10 have no disabled rings: unrestricted.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_cqsize(entries.saturating_mul(4))
                .build(entries)?,
            Err(e) => return Err(e),
        };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        restrict(&ring)?;
        Ok(Self {
            ring,
            aio: None,
            ops: Slab::with_capacity(entries as usize),
            event,
            queued: 0,
            observer: None,
            stash: Vec::new(),
            aio_failed: false,
            held: Vec::new(),
        })
    }

    /// Reports every write, zeroing and sync to `observer` from now on.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn IoObserver>>) {
        self.observer = observer;
    }

    /// The eventfd signalled on completions.
    pub fn event(&self) -> &Arc<EventFd> {
        &self.event
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    fn push_sqe(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the SQE's pointers (iovec array, memory) stay valid
            // until completion: both are owned by the op in `self.ops`.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.queued = self.queued.saturating_add(1);
                return Ok(());
            }
            self.submit()?;
            if self.ring.submission().is_full() {
                // The kernel refused (EBUSY: completion backlog). Move the
                // completions aside so it can make progress; `reap` handles
                // them first.
                let cqes: Vec<(u64, i32)> = self
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result()))
                    .collect();
                if cqes.is_empty() {
                    std::thread::yield_now();
                }
                self.stash.extend(cqes);
            }
        }
    }

    /// Queues an operation (it reaches the kernel at the next
    /// [`Self::submit`], or earlier if the ring is full). The op owns its
    /// memory (see `engine::buffers`) until [`Self::reap`] returns it.
    pub fn push(&mut self, mut op: IoOp) -> io::Result<()> {
        if let (IoKind::Fsync, Some(obs)) = (op.kind, &self.observer) {
            op.sync_token = obs.on_sync_start(op.fd);
        }
        let hold = match op.kind {
            IoKind::Write { .. } if op.total > 0 => super::hooks::hold_write(),
            _ => None,
        };
        op.hold_until = hold.and_then(|h| Instant::now().checked_add(h));
        let entry = self.ops.vacant_entry();
        let key = entry.key();
        entry.insert(op);
        if let Some(h) = hold {
            self.held.push(key);
            let event = self.event.clone();
            std::thread::spawn(move || {
                std::thread::sleep(h);
                event.signal();
            });
            return Ok(());
        }
        self.start(key)
    }

    /// Hands op `key` (in `self.ops`) to the kernel.
    fn start(&mut self, key: usize) -> io::Result<()> {
        let Some(op) = self.ops.get_mut(key) else {
            return Ok(());
        };
        let tag = key as u64;
        if matches!(op.kind, IoKind::Read | IoKind::Write { .. }) && op.total == 0 {
            // A zero-length transfer completes at once through a no-op.
            return self.push_sqe(&opcode::Nop::new().build().user_data(tag));
        }
        if op.prefer_aio && self.aio_ready() {
            if let (Some(op), Some(aio)) = (self.ops.get_mut(key), self.aio.as_mut()) {
                let mut iocb = Box::new(super::aio::Iocb::pwritev(
                    op.fd,
                    &op.iov,
                    op.offset,
                    tag,
                    self.event.as_raw_fd(),
                ));
                let ptr: *mut super::aio::Iocb = &raw mut *iocb;
                op.iocb = Some(iocb);
                // SAFETY: the iocb is boxed in the op, which stays in
                // `self.ops` until its completion is reaped; so do its iovec
                // array and the memory it points to (owned by the op).
                unsafe { aio.push(ptr) };
                return Ok(());
            }
        }
        let Some(op) = self.ops.get(key) else {
            return Ok(());
        };
        let sqe = op.sqe(tag);
        if let Err(e) = self.push_sqe(&sqe) {
            self.ops.try_remove(key);
            return Err(e);
        }
        Ok(())
    }

    /// Starts held ops whose time came (test hook).
    fn release_held(&mut self) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let (due, later): (Vec<usize>, Vec<usize>) =
            std::mem::take(&mut self.held).into_iter().partition(|k| {
                self.ops
                    .get(*k)
                    .and_then(|op| op.hold_until)
                    .is_none_or(|t| t <= now)
            });
        self.held = later;
        for key in due {
            self.start(key)?;
        }
        Ok(())
    }

    fn aio_ready(&mut self) -> bool {
        if self.aio.is_none() {
            match super::aio::Aio::new(1024) {
                Ok(a) => self.aio = Some(a),
                Err(e) => {
                    log::warn!("Linux AIO unavailable ({e}); using io_uring for every write");
                    self.aio_failed = true;
                }
            }
        }
        !self.aio_failed && self.aio.is_some()
    }

    /// Submits queued AIO requests; those the kernel refuses go through
    /// io_uring instead.
    fn submit_aio(&mut self) -> io::Result<()> {
        let refused = match &mut self.aio {
            Some(a) => a.submit(),
            None => return Ok(()),
        };
        for (key, errno) in refused {
            log::debug!("io_submit refused a write ({errno}); using io_uring");
            let sqe = match self.ops.get_mut(key as usize) {
                Some(op) => {
                    op.iocb = None;
                    op.prefer_aio = false;
                    op.sqe(key)
                }
                None => continue,
            };
            self.push_sqe(&sqe)?;
        }
        Ok(())
    }

    /// Hands queued submissions to the kernel, and brings completions the
    /// kernel kept aside while the completion queue was full back into it.
    pub fn submit(&mut self) -> io::Result<()> {
        self.release_held()?;
        self.submit_aio()?;
        if self.queued == 0 && !self.ring_needs_enter() {
            return Ok(());
        }
        self.submit_ring_now()
    }

    /// Entries in the submission queue the kernel has not consumed, or
    /// completions in the kernel's overflow list: with `IORING_FEAT_NODROP`
    /// the kernel keeps completions that did not fit the completion queue
    /// and moves them into it only during `io_uring_enter`, so without an
    /// enter they would wait forever.
    fn ring_needs_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.cq_overflow()
    }

    /// One `io_uring_enter` (submits what is queued, flushes overflowed
    /// completions).
    fn submit_ring_now(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue backlog: the caller reaps, then retries
                // (`ring_needs_enter` sees the entries still queued).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until at least one completion is ready (after submitting).
    pub fn wait(&mut self) -> io::Result<()> {
        if self.ops.is_empty() || !self.stash.is_empty() {
            return Ok(());
        }
        if !self.held.is_empty() {
            // Held ops are not in the kernel: their timer signals the event.
            self.submit()?;
            self.event.wait(100);
            return Ok(());
        }
        if self.aio.as_ref().is_some_and(|a| a.in_flight() > 0) {
            // AIO completions only signal the eventfd.
            self.submit()?;
            self.event.wait(100);
            return Ok(());
        }
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                self.queued = 0;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Collects finished operations; continues short transfers.
    pub fn reap(&mut self, out: &mut Vec<IoDone>) -> io::Result<()> {
        self.event.drain();
        self.release_held()?;
        loop {
            let mut batch: Vec<(u64, i32)> = std::mem::take(&mut self.stash);
            batch.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if let Some(aio) = &mut self.aio {
                let mut ev = Vec::new();
                aio.reap(&mut ev);
                batch.extend(
                    ev.into_iter()
                        .map(|(k, r)| (k, i32::try_from(r).unwrap_or(-libc::EIO))),
                );
            }
            if batch.is_empty() {
                if !self.ring.submission().cq_overflow() {
                    break;
                }
                // Completions the kernel kept aside while the queue was
                // full: an enter moves them in.
                self.submit_ring_now()?;
                continue;
            }
            for (key, res) in batch {
                self.on_cqe(key, res, out)?;
            }
        }
        self.submit()
    }

    fn on_cqe(&mut self, key: u64, res: i32, out: &mut Vec<IoDone>) -> io::Result<()> {
        let Some(op) = self.ops.get_mut(key as usize) else {
            log::error!("io_uring completion for unknown operation {key}");
            return Ok(());
        };
        if let Some(obs) = &self.observer {
            match op.kind {
                IoKind::Write { .. } if res > 0 => {
                    let n = (res as usize).min(iov_total(&op.iov));
                    let off = op.offset.saturating_add(op.done as u64);
                    obs.on_write(op.fd, off, &op.head_bytes(n));
                }
                IoKind::Fallocate { len, .. } if res == 0 => obs.on_zero(op.fd, op.offset, len),
                IoKind::Fsync => obs.on_sync_done(op.sync_token, res == 0),
                _ => {}
            }
        }
        let finished = if res < 0 {
            Some(i64::from(res))
        } else {
            match op.kind {
                IoKind::Read | IoKind::Write { .. } => {
                    let n = res as usize;
                    let left = op.total.saturating_sub(op.done);
                    let kernel_left = iov_total(&op.iov);
                    if op.total == 0
                        || n >= kernel_left
                        || (op.bounce.is_some() && op.done.saturating_add(n) >= op.total)
                    {
                        op.done = op.total;
                        Some(i64::try_from(op.total).unwrap_or(i64::MAX))
                    } else if n == 0 || (op.kind == IoKind::Read && n % DIRECT_ALIGN != 0) {
                        // n == 0 or a partial sector: end of file.
                        if op.kind == IoKind::Read {
                            op.advance(n);
                            op.zero_rest();
                            op.done = op.total;
                            Some(i64::try_from(op.total).unwrap_or(i64::MAX))
                        } else {
                            Some(i64::from(-libc::ENOSPC))
                        }
                    } else {
                        let _ = left;
                        op.advance(n);
                        let sqe = op.sqe(key);
                        self.push_sqe(&sqe)?;
                        None
                    }
                }
                IoKind::Fsync | IoKind::Fallocate { .. } => Some(i64::from(res)),
            }
        };
        if let Some(result) = finished {
            if let Some(mut op) = self.ops.try_remove(key as usize) {
                if result >= 0 {
                    op.finish();
                }
                out.push(IoDone {
                    tag: op.tag,
                    result,
                });
            }
        }
        Ok(())
    }

    /// Waits for every operation in flight and returns their completions.
    pub fn drain_all(&mut self, out: &mut Vec<IoDone>) -> io::Result<()> {
        while !self.ops.is_empty() {
            self.wait()?;
            self.reap(out)?;
        }
        Ok(())
    }
}

impl Drop for Engine {
    /// Never frees an op the kernel may still use: waits for every one (a
    /// stuck one is logged every minute and waited for); when waiting itself
    /// fails, the ops and their memory are leaked instead of freed.
    fn drop(&mut self) {
        let start = Instant::now();
        let mut report = Duration::from_secs(60);
        let mut out = Vec::new();
        while !self.ops.is_empty() {
            if let Err(e) = self.wait().and_then(|()| self.reap(&mut out)) {
                log::error!(
                    "dropping an I/O engine with {} operations in flight: cannot wait for them \
                     ({e}); leaking their memory rather than freeing what the kernel may use",
                    self.ops.len()
                );
                std::mem::forget(std::mem::take(&mut self.ops));
                std::mem::forget(self.aio.take());
                return;
            }
            out.clear();
            if !self.ops.is_empty() && start.elapsed() >= report {
                log::error!(
                    "an I/O engine waits for {} operations still in flight after {} s",
                    self.ops.len(),
                    start.elapsed().as_secs()
                );
                report = report.saturating_add(Duration::from_secs(60));
            }
        }
    }
}

/// Restricts a disabled ring to the operations the engine submits
/// (IORING_REGISTER_RESTRICTIONS: nothing else can be registered either)
/// and enables it. A ring that was not created disabled is left as it is.
fn restrict(ring: &IoUring) -> io::Result<()> {
    use io_uring::register::Restriction;
    let mut allowed = [
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::Fallocate::CODE),
        Restriction::sqe_op(opcode::Nop::CODE),
    ];
    match ring.submitter().register_restrictions(&mut allowed) {
        Ok(()) => ring.submitter().register_enable_rings(),
        // Not disabled (an old kernel): restrictions cannot be set.
        Err(e) if e.raw_os_error() == Some(libc::EBADFD) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;
