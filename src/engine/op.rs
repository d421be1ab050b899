// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One I/O operation: what it does, the memory it owns until it is reaped
//! (its [`IoVecs`] and owner, or a bounce buffer for misaligned `O_DIRECT`
//! transfers), and how a short transfer continues.

use std::{io, os::fd::RawFd, time::Instant};

use io_uring::{opcode, squeue, types};

use super::buffers::{AlignedBuf, IoVecs, DIRECT_ALIGN};

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
    pub(super) kind: IoKind,
    pub(super) fd: RawFd,
    pub(super) offset: u64,
    /// What the kernel sees: the caller's iovecs (advanced past what a short
    /// transfer did), or one into `bounce`.
    pub(super) iov: Vec<libc::iovec>,
    /// The caller's memory and what keeps it valid: held until the op is
    /// reaped (see `engine::buffers`).
    pub(super) mem: IoVecs,
    pub(super) bounce: Option<AlignedBuf>,
    pub(super) total: usize,
    pub(super) done: usize,
    pub(super) tag: u64,
    /// Observer token of an fsync.
    pub(super) sync_token: u64,
    /// Submit through Linux AIO (allocating `O_DIRECT` writes).
    pub(super) prefer_aio: bool,
    /// The AIO control block while submitted through AIO.
    pub(super) iocb: Option<Box<super::aio::Iocb>>,
    /// Test hook: not handed to the kernel before this instant.
    pub(super) hold_until: Option<Instant>,
}

// SAFETY: the raw pointers in `iov` point into `mem` (valid while it and its
// owner live, by `IoVecs`' constructors) or into `bounce`, both owned by
// the op, whichever thread reaps it.
unsafe impl Send for IoOp {}

pub(super) fn iov_total(iov: &[libc::iovec]) -> usize {
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
    pub(super) fn new(kind: IoKind, fd: RawFd, offset: u64, mut mem: IoVecs, tag: u64) -> Self {
        // The kernel-side array is the caller's, moved (no copy per op);
        // `mem` keeps the owner, and gets the array back if a bounce
        // buffer stands in for it.
        let iov = mem.take_iov();
        Self {
            kind,
            fd,
            offset,
            total: iov_total(&iov),
            iov,
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
            // The caller's array goes back to `mem` (the bounce buffer
            // stands in for it; `finish` copies a read back through it).
            let caller = std::mem::take(&mut op.iov);
            op.mem.put_iov(caller);
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
    pub(super) fn head_bytes(&self, n: usize) -> Vec<u8> {
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

    pub(super) fn sqe(&self, key: u64) -> squeue::Entry {
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
    pub(super) fn advance(&mut self, mut n: usize) {
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
    pub(super) fn zero_rest(&mut self) {
        for v in &self.iov {
            // SAFETY: a read's iovecs are valid for writes until completion
            // (writable `IoVecs` held by `self.mem`, or our bounce buffer).
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        self.iov.clear();
    }

    pub(super) fn finish(&mut self) {
        if let (IoKind::Read, Some(buf)) = (self.kind, &self.bounce) {
            // SAFETY: a read's memory is writable (checked in `rw`) and valid
            // while `self.mem` lives; the bounce buffer holds its total.
            unsafe { copy_iov(buf.as_mut_ptr(), self.mem.as_slice(), true) };
        }
    }
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
