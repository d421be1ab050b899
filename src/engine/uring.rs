// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring engine: many operations in flight, completions signalled on
//! an eventfd that the owner polls together with its other descriptors.
//!
//! Invariant: an operation owns its iovec array (and bounce buffer) from
//! [`Engine::push`] until its [`IoDone`] is returned by [`Engine::reap`],
//! so the kernel never sees a freed iovec. The memory the iovecs point to
//! belongs to the caller, who promises (the safety contract of `push`) to
//! keep it valid until then. Short reads and writes are continued here;
//! a read that reaches end of file zero-fills the rest of its buffers.

use std::{
    alloc::Layout,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::Arc,
};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

/// Alignment used for `O_DIRECT` bounce buffers and the alignment checks.
pub const DIRECT_ALIGN: usize = 512;
const BOUNCE_ALIGN: usize = 4096;

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

/// A heap buffer aligned for `O_DIRECT`.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only hands out a raw pointer; every access through
// it is an `unsafe` operation whose caller answers for data races.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment).
    pub fn new(len: usize) -> io::Result<Self> {
        let size = len.max(1).div_ceil(BOUNCE_ALIGN) * BOUNCE_ALIGN;
        let layout = Layout::from_size_align(size, BOUNCE_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self { ptr, layout })
    }

    /// Start of the buffer.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
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
    /// What the kernel sees (the caller's iovecs, or one into `bounce`).
    iov: Vec<libc::iovec>,
    /// The caller's iovecs when a bounce buffer stands in for them.
    caller_iov: Vec<libc::iovec>,
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
}

// SAFETY: the raw pointers in the iovecs refer to memory that the submitter
// promised (the contract of `Engine::push`) stays valid and unaliased until
// completion, whichever thread reaps it.
unsafe impl Send for IoOp {}

fn iov_total(iov: &[libc::iovec]) -> usize {
    iov.iter()
        .map(|v| v.iov_len)
        .fold(0usize, usize::saturating_add)
}

fn aligned(iov: &[libc::iovec], offset: u64) -> bool {
    offset % DIRECT_ALIGN as u64 == 0
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
        off += v.iov_len;
    }
}

impl IoOp {
    /// A vectored read or write. With `direct`, misaligned requests go
    /// through a bounce buffer.
    pub fn rw(
        kind: IoKind,
        fd: RawFd,
        offset: u64,
        iov: Vec<libc::iovec>,
        direct: bool,
        tag: u64,
    ) -> io::Result<Self> {
        let total = iov_total(&iov);
        let mut op = Self {
            kind,
            fd,
            offset,
            iov,
            caller_iov: Vec::new(),
            bounce: None,
            total,
            done: 0,
            tag,
            sync_token: 0,
            prefer_aio: false,
            iocb: None,
        };
        if direct && !aligned(&op.iov, offset) {
            let buf = AlignedBuf::new(total)?;
            if matches!(kind, IoKind::Write { .. }) {
                // SAFETY: the caller's iovecs are valid for reads (contract of
                // `Engine::push`, which this op is built for) and the buffer
                // holds `total` bytes.
                unsafe { copy_iov(buf.as_mut_ptr(), &op.iov, false) };
            }
            op.caller_iov = std::mem::replace(
                &mut op.iov,
                vec![libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: total.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN,
                }],
            );
            op.bounce = Some(buf);
        }
        Ok(op)
    }

    /// An `fdatasync`.
    pub fn fsync(fd: RawFd, tag: u64) -> Self {
        Self {
            kind: IoKind::Fsync,
            fd,
            offset: 0,
            iov: Vec::new(),
            caller_iov: Vec::new(),
            bounce: None,
            total: 0,
            done: 0,
            tag,
            sync_token: 0,
            prefer_aio: false,
            iocb: None,
        }
    }

    /// An `fallocate`.
    pub fn fallocate(fd: RawFd, offset: u64, len: u64, mode: i32, tag: u64) -> Self {
        Self {
            kind: IoKind::Fallocate { mode, len },
            fd,
            offset,
            iov: Vec::new(),
            caller_iov: Vec::new(),
            bounce: None,
            total: 0,
            done: 0,
            tag,
            sync_token: 0,
            prefer_aio: false,
            iocb: None,
        }
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
            let take = v.iov_len.min(n - out.len());
            // SAFETY: the iovecs are valid for reads until completion
            // (contract of `Engine::push`); we read `take <= iov_len` bytes.
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
        self.done += n;
        let mut drop_count = 0;
        for v in &mut self.iov {
            if n == 0 {
                break;
            }
            if n >= v.iov_len {
                n -= v.iov_len;
                drop_count += 1;
            } else {
                // SAFETY: stays inside the same buffer (n < iov_len).
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        self.iov.drain(..drop_count);
    }

    /// End of file: zero what is left of the kernel-side buffers.
    fn zero_rest(&mut self) {
        for v in &self.iov {
            // SAFETY: the iovecs are valid for writes until completion
            // (contract of `Engine::push`, or our own bounce buffer).
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        self.iov.clear();
    }

    fn finish(&mut self) {
        if let (IoKind::Read, Some(buf)) = (self.kind, &self.bounce) {
            // SAFETY: the caller's iovecs are valid for writes (contract of
            // `Engine::push`) and the bounce buffer holds their total.
            unsafe { copy_iov(buf.as_mut_ptr(), &self.caller_iov, true) };
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
            // SAFETY: the SQE's pointers (iovec array, buffers) stay valid
            // until completion: the array lives in the op owned by `self.ops`
            // and the buffers are covered by the contract of `push`.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.queued += 1;
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
    /// [`Self::submit`], or earlier if the ring is full).
    ///
    /// # Safety
    /// The memory described by the op's iovecs must stay valid (writable for
    /// reads, readable for writes) and must not be accessed by anyone else
    /// until the op's [`IoDone`] has been returned by [`Self::reap`].
    pub unsafe fn push(&mut self, mut op: IoOp) -> io::Result<()> {
        if let (IoKind::Fsync, Some(obs)) = (op.kind, &self.observer) {
            op.sync_token = obs.on_sync_start(op.fd);
        }
        if matches!(op.kind, IoKind::Read | IoKind::Write { .. }) && op.total == 0 {
            let entry = self.ops.vacant_entry();
            let key = entry.key() as u64;
            entry.insert(op);
            // A zero-length transfer completes at once through a no-op.
            return self.push_sqe(&opcode::Nop::new().build().user_data(key));
        }
        if op.prefer_aio && self.aio_ready() {
            let entry = self.ops.vacant_entry();
            let key = entry.key() as u64;
            let mut iocb = Box::new(super::aio::Iocb::pwritev(
                op.fd,
                &op.iov,
                op.offset,
                key,
                self.event.as_raw_fd(),
            ));
            let ptr: *mut super::aio::Iocb = &raw mut *iocb;
            op.iocb = Some(iocb);
            entry.insert(op);
            if let Some(aio) = &mut self.aio {
                // SAFETY: the iocb is boxed in the op, which stays in
                // `self.ops` until its completion is reaped; its iovec array
                // and buffers are covered by this function's contract.
                unsafe { aio.push(ptr) };
            }
            return Ok(());
        }
        let entry = self.ops.vacant_entry();
        let key = entry.key() as u64;
        let sqe = op.sqe(key);
        entry.insert(op);
        if let Err(e) = self.push_sqe(&sqe) {
            self.ops.try_remove(key as usize);
            return Err(e);
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
                        || (op.bounce.is_some() && op.done + n >= op.total)
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
                            Some(-i64::from(libc::ENOSPC))
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

#[cfg(test)]
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
            iov,
            true,
            9,
        )
        .unwrap()
        .via_aio();
        // SAFETY: `buf` outlives the drain below.
        unsafe { e.push(op).unwrap() };
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
                iov,
                true,
                100 + i as u64,
            )
            .unwrap()
            .via_aio();
            // SAFETY: `buf` outlives the drain below.
            unsafe { e.push(op).unwrap() };
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
                vec![iov(b)],
                false,
                i as u64,
            )
            .unwrap();
            // SAFETY: `bufs` outlives every completion (collected below or
            // leaked with the engine on failure).
            unsafe { e.push(op).unwrap() };
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
            vec![iov(&mut buf)],
            false,
            5,
        )
        .unwrap();
        // SAFETY: `buf` outlives the drain below.
        unsafe { e.push(op).unwrap() };
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
            vec![iov(&mut a), iov(&mut b)],
            true,
            1,
        )
        .unwrap();
        // SAFETY: buffers outlive the drain.
        unsafe { e.push(op).unwrap() };
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
            vec![iov(&mut c), iov(&mut d)],
            true,
            2,
        )
        .unwrap();
        // SAFETY: buffers outlive the drain.
        unsafe { e.push(op).unwrap() };
        out.clear();
        e.drain_all(&mut out).unwrap();
        assert_eq!(out[0].result, 512);
        assert_eq!([c, d].concat(), back);
    }
}
