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
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use super::buffers::IoVecs;
pub use super::buffers::{AlignedBuf, DIRECT_ALIGN};

/// A non-blocking eventfd.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Creates a non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter (wakes pollers).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own fd. A full
        // counter (EAGAIN) still leaves the fd readable, which is all we need.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8);
        }
    }

    /// Resets the counter; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our own fd.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut v).cast(), 8) };
        n == 8 && v > 0
    }

    /// Blocks until the eventfd is readable or `timeout` passes (`None`:
    /// forever).
    pub fn wait_for(&self, timeout: Option<std::time::Duration>) -> bool {
        self.wait(timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX)))
    }

    /// Blocks until the eventfd is readable or `timeout_ms` passes (-1: forever).
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        n > 0
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// `preadv` into the iovecs.
    Read,
    /// `pwritev` from the iovecs; `dsync` adds `RWF_DSYNC`.
    Write {
        /// Complete only when the data is durable.
        dsync: bool,
    },
    /// `fdatasync` of the file.
    Fsync,
    /// `fallocate(mode)` of `len` bytes at the offset.
    Fallocate {
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Bytes.
        len: u64,
    },
}

/// One operation for the engine.
#[derive(Debug)]
pub struct IoOp {
    kind: IoKind,
    fd: RawFd,
    offset: u64,
    /// What the kernel sees: the caller's iovecs (advanced past what a short
    /// transfer did), or one into `bounce`.
    iov: Vec<libc::iovec>,
    /// The caller's memory and what keeps it valid: held until the op is
    /// reaped (see `engine::buffers`).
    mem: IoVecs,
    bounce: Option<AlignedBuf>,
    total: usize,
    done: usize,
    tag: u64,
    /// Observer token of an fsync.
    sync_token: u64,
    /// Submit through Linux AIO (allocating `O_DIRECT` writes).
    prefer_aio: bool,
    /// The AIO control block while submitted through AIO.
    iocb: Option<Box<super::aio::Iocb>>,
    /// Test hook: not handed to the kernel before this instant.
    hold_until: Option<Instant>,
}

// SAFETY: the raw pointers in `iov` point into `mem` (valid while it and its
// owner live, by `IoVecs`' constructors) or into `bounce`, both owned by
// the op, whichever thread reaps it.
unsafe impl Send for IoOp {}

fn iov_total(iov: &[libc::iovec]) -> usize {
    iov.iter()
        .map(|v| v.iov_len)
        .fold(0usize, usize::saturating_add)
}

fn aligned(iov: &[libc::iovec], offset: u64) -> bool {
    offset.checked_rem(DIRECT_ALIGN as u64) == Some(0)
        && iov
            .iter()
            .all(|v| (v.iov_base as usize) % DIRECT_ALIGN == 0 && v.iov_len % DIRECT_ALIGN == 0)
}

/// Copies between a bounce buffer and the caller's iovecs.
///
/// # Safety
/// `iov` must describe valid memory (writable when `to_iov`), and `buf`
/// must hold at least `iov_total(iov)` bytes.
unsafe fn copy_iov(buf: *mut u8, iov: &[libc::iovec], to_iov: bool) {
    let mut off = 0usize;
    for v in iov {
        // SAFETY: the caller guarantees both ranges are valid and disjoint.
        unsafe {
            let b = buf.add(off);
            if to_iov {
                std::ptr::copy_nonoverlapping(b, v.iov_base.cast::<u8>(), v.iov_len);
            } else {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), b, v.iov_len);
            }
        }
        off = off.saturating_add(v.iov_len);
    }
}

impl IoOp {
    fn new(kind: IoKind, fd: RawFd, offset: u64, mem: IoVecs, tag: u64) -> Self {
        Self {
            kind,
            fd,
            offset,
            iov: mem.as_slice().to_vec(),
            total: iov_total(mem.as_slice()),
            mem,
            bounce: None,
            done: 0,
            tag,
            sync_token: 0,
            prefer_aio: false,
            iocb: None,
            hold_until: None,
        }
    }

    /// A vectored read or write of `mem`, which the op owns until it is
    /// reaped. With `direct`, misaligned requests go through a bounce
    /// buffer. A read into write-only memory is refused (`EINVAL`).
    pub fn rw(
        kind: IoKind,
        fd: RawFd,
        offset: u64,
        mem: IoVecs,
        direct: bool,
        tag: u64,
    ) -> io::Result<Self> {
        if kind == IoKind::Read && !mem.writable() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut op = Self::new(kind, fd, offset, mem, tag);
        if direct && !aligned(&op.iov, offset) {
            let total = op.total;
            let buf = AlignedBuf::new(total)?;
            if matches!(kind, IoKind::Write { .. }) {
                // SAFETY: the caller's memory is valid for reads (`IoVecs`'
                // contract, held by `op.mem`) and the buffer holds `total`
                // bytes.
                unsafe { copy_iov(buf.as_mut_ptr(), op.mem.as_slice(), false) };
            }
            op.iov = vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                // Within the buffer, which `AlignedBuf::new` rounded up to
                // a multiple of a larger alignment.
                iov_len: total
                    .checked_next_multiple_of(DIRECT_ALIGN)
                    .unwrap_or(buf.capacity()),
            }];
            op.bounce = Some(buf);
        }
        Ok(op)
    }

    /// An `fdatasync`.
    pub fn fsync(fd: RawFd, tag: u64) -> Self {
        Self::new(IoKind::Fsync, fd, 0, IoVecs::default(), tag)
    }

    /// An `fallocate`.
    pub fn fallocate(fd: RawFd, offset: u64, len: u64, mode: i32, tag: u64) -> Self {
        Self::new(
            IoKind::Fallocate { mode, len },
            fd,
            offset,
            IoVecs::default(),
            tag,
        )
    }

    /// Submits a write through Linux AIO instead of io_uring: for
    /// `O_DIRECT` writes that will allocate blocks (see `engine::aio`).
    #[must_use]
    pub fn via_aio(mut self) -> Self {
        self.prefer_aio = matches!(self.kind, IoKind::Write { dsync: false });
        self
    }

    /// Copies the first `n` bytes the kernel was given (for observers).
    fn head_bytes(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        for v in &self.iov {
            let take = v.iov_len.min(n.saturating_sub(out.len()));
            // SAFETY: the iovecs are valid for reads until completion (held
            // by `self.mem` or `self.bounce`); we read `take <= iov_len` bytes.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), take) };
            out.extend_from_slice(src);
            if out.len() == n {
                break;
            }
        }
        out
    }

    fn sqe(&self, key: u64) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let off = self.offset.saturating_add(self.done as u64);
        match self.kind {
            IoKind::Read => opcode::Readv::new(fd, self.iov.as_ptr(), self.iov.len() as u32)
                .offset(off)
                .build(),
            IoKind::Write { dsync } => {
                opcode::Writev::new(fd, self.iov.as_ptr(), self.iov.len() as u32)
                    .offset(off)
                    .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            IoKind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(self.offset)
                .mode(mode)
                .build(),
        }
        .user_data(key)
    }

    /// Drops the first `n` bytes of the kernel-side iovecs.
    fn advance(&mut self, mut n: usize) {
        self.done = self.done.saturating_add(n);
        let mut drop_count = 0usize;
        for v in &mut self.iov {
            if n == 0 {
                break;
            }
            if n >= v.iov_len {
                n = n.saturating_sub(v.iov_len); // `n >= iov_len`
                drop_count = drop_count.saturating_add(1); // at most `iov.len()`
            } else {
                // SAFETY: stays inside the same buffer (n < iov_len).
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len = v.iov_len.saturating_sub(n); // `n < iov_len`
                n = 0;
            }
        }
        self.iov.drain(..drop_count);
    }

    /// End of file: zero what is left of the kernel-side buffers.
    fn zero_rest(&mut self) {
        for v in &self.iov {
            // SAFETY: a read's iovecs are valid for writes until completion
            // (writable `IoVecs` held by `self.mem`, or our bounce buffer).
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        self.iov.clear();
    }

    fn finish(&mut self) {
        if let (IoKind::Read, Some(buf)) = (self.kind, &self.bounce) {
            // SAFETY: a read's memory is writable (checked in `rw`) and valid
            // while `self.mem` lives; the bounce buffer holds its total.
            unsafe { copy_iov(buf.as_mut_ptr(), self.mem.as_slice(), true) };
        }
    }
}

/// Sees every write, punch and sync an engine completes (the recording
/// layer of the crash-state checker). Called on the thread that reaps.
pub trait IoObserver: Send + Sync {
    /// `data` was written at `offset` of `fd` (one completion; a short write
    /// reports only what reached the file).
    fn on_write(&self, fd: RawFd, offset: u64, data: &[u8]);
    /// `len` bytes at `offset` were deallocated or zeroed.
    fn on_zero(&self, fd: RawFd, offset: u64, len: u64);
    /// An `fdatasync` of `fd` is about to be submitted; returns a token.
    fn on_sync_start(&self, fd: RawFd) -> u64;
    /// That `fdatasync` completed (`ok` false: it failed).
    fn on_sync_done(&self, token: u64, ok: bool);
}

/// A finished operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoDone {
    /// The tag given at submission.
    pub tag: u64,
    /// Bytes transferred (reads include zero-filled bytes past EOF), or a
    /// negative errno.
    pub result: i64,
}

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
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .build(entries)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// For tests that submit through Linux AIO: the lock that runs them one
    /// at a time (they check the process-wide submission counter) and a
    /// 1 MiB `O_DIRECT` file `f` in a fresh directory.
    fn aio_test_file() -> (
        std::sync::MutexGuard<'static, ()>,
        tempfile::TempDir,
        std::fs::File,
    ) {
        use std::os::unix::fs::OpenOptionsExt;
        let serial = super::super::aio::tests::AIO_COUNTER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        (serial, dir, f)
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn aio_writes_land_and_complete_through_the_same_eventfd() {
        let (_serial, dir, f) = aio_test_file();
        let path = dir.path().join("f");
        let mut e = Engine::new(8, Arc::new(EventFd::new().unwrap())).unwrap();
        let buf = AlignedBuf::new(8192).unwrap();
        // SAFETY: 8192 bytes owned by `buf`.
        unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0x5a, 8192) };
        let before = super::super::aio::submitted();
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: 8192,
        }];
        let op = IoOp::rw(
            IoKind::Write { dsync: false },
            f.as_raw_fd(),
            65536,
            // SAFETY: the buffers outlive the engine (drained below).
            unsafe { IoVecs::new(iov) },
            true,
            9,
        )
        .unwrap()
        .via_aio();
        e.push(op).unwrap();
        e.submit().unwrap();
        assert!(e.event().wait(5000), "no completion signalled");
        let mut out = vec![];
        e.drain_all(&mut out).unwrap();
        assert_eq!(
            out,
            vec![IoDone {
                tag: 9,
                result: 8192
            }]
        );
        assert_eq!(super::super::aio::submitted(), before + 1);
        let mut back = vec![0u8; 8192];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut back, 65536)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }

    /// More AIO writes than one `io_submit` carries (`SUBMIT_BATCH`): all
    /// are submitted, complete with their own tags and land where asked.
    #[test]
    fn a_batch_of_aio_writes_larger_than_one_submit_all_lands() {
        const N: usize = 11;
        let (_serial, dir, f) = aio_test_file();
        let path = dir.path().join("f");
        let mut e = Engine::new(32, Arc::new(EventFd::new().unwrap())).unwrap();
        let buf = AlignedBuf::new(4096 * N).unwrap();
        let before = super::super::aio::submitted();
        for i in 0..N {
            // SAFETY: block `i` of the `4096 * N` bytes owned by `buf`.
            let p = unsafe { buf.as_mut_ptr().add(4096 * i) };
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(p, 0x10 + i as u8, 4096) };
            let iov = vec![libc::iovec {
                iov_base: p.cast(),
                iov_len: 4096,
            }];
            // Every other block, backwards: not one sequential stream.
            let off = 8192 * (N - i) as u64;
            let op = IoOp::rw(
                IoKind::Write { dsync: false },
                f.as_raw_fd(),
                off,
                // SAFETY: the buffers outlive the engine (drained below).
                unsafe { IoVecs::new(iov) },
                true,
                100 + i as u64,
            )
            .unwrap()
            .via_aio();
            e.push(op).unwrap();
        }
        e.submit().unwrap();
        let mut out = vec![];
        e.drain_all(&mut out).unwrap();
        out.sort_by_key(|d| d.tag);
        let want: Vec<IoDone> = (0..N)
            .map(|i| IoDone {
                tag: 100 + i as u64,
                result: 4096,
            })
            .collect();
        assert_eq!(out, want);
        assert_eq!(super::super::aio::submitted(), before + N as u64);
        let file = std::fs::File::open(&path).unwrap();
        for i in 0..N {
            let mut back = vec![0u8; 4096];
            file.read_exact_at(&mut back, 8192 * (N - i) as u64)
                .unwrap();
            assert!(back.iter().all(|&b| b == 0x10 + i as u8), "block {i}");
        }
    }

    /// More completions than the completion queue holds: the kernel keeps
    /// the rest in its overflow list and moves them in only during an
    /// enter. The owner's loop (wait on the eventfd, reap) must still get
    /// every one of them, with its data.
    #[test]
    fn completions_beyond_the_completion_queue_are_all_reaped() {
        const N: usize = 40;
        let f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..N * 512)
            .map(|i| (i / 512 * 7 + i % 251) as u8)
            .collect();
        f.write_all_at(&content, 0).unwrap();
        // 2 submission entries, 8 completion entries.
        let mut e = Engine::new(2, Arc::new(EventFd::new().unwrap())).unwrap();
        let mut bufs = vec![vec![0u8; 512]; N];
        for (i, b) in bufs.iter_mut().enumerate() {
            let op = IoOp::rw(
                IoKind::Read,
                f.as_raw_fd(),
                (i * 512) as u64,
                // SAFETY: the buffers outlive the engine (drained below).
                unsafe { IoVecs::new(vec![iov(b)]) },
                false,
                i as u64,
            )
            .unwrap();
            e.push(op).unwrap();
        }
        e.submit().unwrap();
        let mut out = vec![];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while out.len() < N && std::time::Instant::now() < deadline {
            e.event().wait(100);
            e.reap(&mut out).unwrap();
        }
        if out.len() < N {
            let got = out.len();
            std::mem::forget(e);
            std::mem::forget(bufs);
            panic!("{got} of {N} completions reaped; the rest stayed in the overflow list");
        }
        out.sort_by_key(|d| d.tag);
        for (i, d) in out.iter().enumerate() {
            assert_eq!(
                *d,
                IoDone {
                    tag: i as u64,
                    result: 512
                }
            );
            assert_eq!(bufs[i], content[i * 512..(i + 1) * 512], "read {i}");
        }
    }

    #[test]
    fn read_past_eof_zero_fills() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 700], 0).unwrap();
        let mut e = Engine::new(8, Arc::new(EventFd::new().unwrap())).unwrap();
        let mut buf = vec![0xAAu8; 1024];
        let op = IoOp::rw(
            IoKind::Read,
            f.as_raw_fd(),
            0,
            // SAFETY: the buffers outlive the engine (drained below).
            unsafe { IoVecs::new(vec![iov(&mut buf)]) },
            false,
            5,
        )
        .unwrap();
        e.push(op).unwrap();
        let mut out = vec![];
        e.drain_all(&mut out).unwrap();
        assert_eq!(
            out,
            vec![IoDone {
                tag: 5,
                result: 1024
            }]
        );
        assert!(buf[..700].iter().all(|&b| b == 7));
        assert!(buf[700..].iter().all(|&b| b == 0));
    }

    #[test]
    fn write_then_read_with_bounce_buffers() {
        let f = tempfile::tempfile().unwrap();
        let mut e = Engine::new(8, Arc::new(EventFd::new().unwrap())).unwrap();
        let mut a = vec![1u8; 300];
        let mut b = vec![2u8; 212];
        let op = IoOp::rw(
            IoKind::Write { dsync: true },
            f.as_raw_fd(),
            512,
            // SAFETY: the buffers outlive the engine (drained below).
            unsafe { IoVecs::new(vec![iov(&mut a), iov(&mut b)]) },
            true,
            1,
        )
        .unwrap();
        e.push(op).unwrap();
        let mut out = vec![];
        e.drain_all(&mut out).unwrap();
        assert_eq!(out[0].result, 512);
        let mut back = vec![0u8; 512];
        f.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(&back[..300], &a[..]);
        assert_eq!(&back[300..], &b[..]);
        let mut c = vec![0u8; 100];
        let mut d = vec![0u8; 412];
        let op = IoOp::rw(
            IoKind::Read,
            f.as_raw_fd(),
            512,
            // SAFETY: the buffers outlive the engine (drained below).
            unsafe { IoVecs::new(vec![iov(&mut c), iov(&mut d)]) },
            true,
            2,
        )
        .unwrap();
        e.push(op).unwrap();
        out.clear();
        e.drain_all(&mut out).unwrap();
        assert_eq!(out[0].result, 512);
        assert_eq!([c, d].concat(), back);
    }
}
