// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of `uring`.

use super::*;
use crate::engine::{IoDone, IoKind, IoOp, IoVecs};
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

/// A restricted ring runs the operations the engine submits and refuses
/// any other with EACCES; an unrestricted ring runs it (negative control).
#[test]
fn a_restricted_ring_refuses_operations_the_engine_does_not_submit() {
    use io_uring::{opcode, types, IoUring};
    let file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut &file, &[7u8; 512]).unwrap();
    let run = |ring: &mut IoUring, sqe: io_uring::squeue::Entry| -> i32 {
        // SAFETY: the SQE's buffer (if any) outlives the wait below.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        ring.completion().next().unwrap().result()
    };
    let mut buf = [0u8; 512];
    let read = |buf: &mut [u8; 512]| {
        opcode::Read::new(
            types::Fd(std::os::fd::AsRawFd::as_raw_fd(&file)),
            buf.as_mut_ptr(),
            512,
        )
        .offset(0)
        .build()
    };
    let mut restricted = IoUring::builder().setup_r_disabled().build(8).unwrap();
    super::restrict(&restricted).unwrap();
    assert_eq!(run(&mut restricted, opcode::Nop::new().build()), 0);
    assert_eq!(run(&mut restricted, read(&mut buf)), -libc::EACCES);
    let mut open = IoUring::new(8).unwrap();
    assert_eq!(run(&mut open, read(&mut buf)), 512, "negative control");
    assert_eq!(buf, [7u8; 512]);
}
