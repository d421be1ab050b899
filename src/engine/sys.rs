// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Thin, safe wrappers of the few system calls the other layers need
//! beyond `std`: file locks, `SEEK_DATA`/`SEEK_HOLE`, signals, listening
//! sockets. The `unsafe` stays here (and in the rest of `engine` and in
//! `vhost`); callers get `io::Result`s.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Who holds a conflicting whole-file lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockHolder {
    /// A POSIX (`fcntl` `F_SETLK`) lock of this process id (UML takes one).
    Posix(libc::pid_t),
    /// An OFD lock of some open file description (another vhost-user-ubd).
    Ofd,
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(kind).unwrap_or(libc::F_WRLCK as libc::c_short);
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Takes a whole-file OFD lock (shared, or exclusive with `write`) without
/// waiting. `Ok(Err(holder))` when someone else holds a conflicting one.
pub fn ofd_lock(file: &File, write: bool) -> io::Result<Result<(), LockHolder>> {
    let kind = if write { libc::F_WRLCK } else { libc::F_RDLCK };
    let mut fl = whole_file(kind);
    // SAFETY: `fcntl` with F_OFD_SETLK reads the `flock` we pass and does not
    // keep the pointer; the fd is valid for the duration of the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &raw mut fl) };
    if rc == 0 {
        return Ok(Ok(()));
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(err);
    }
    let mut probe = whole_file(kind);
    // SAFETY: as above; F_OFD_GETLK fills in the struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &raw mut probe) };
    Ok(Err(if rc == 0 && probe.l_pid > 0 {
        LockHolder::Posix(probe.l_pid)
    } else {
        LockHolder::Ofd
    }))
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another holds it.
pub fn flock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `lseek(SEEK_DATA or SEEK_HOLE)` from `pos`: `Ok(None)` past the last
/// data (ENXIO) or for a position `off_t` cannot hold.
pub fn seek_data_or_hole(file: &File, pos: u64, data: bool) -> io::Result<Option<u64>> {
    let Ok(p) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), p, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(u64::try_from(r).ok())
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: bytes `[pos, pos + len)` of `file`
/// read as zeros and take no space (where the file system can).
pub fn punch_hole(file: &File, pos: u64, len: u64) -> io::Result<()> {
    let (Ok(p), Ok(l)) = (libc::off_t::try_from(pos), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, p, l) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A set of signals blocked in every thread, received by [`Signals::wait`].
#[derive(Clone, Copy)]
pub struct Signals(libc::sigset_t);

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signals")
    }
}

impl Signals {
    /// Blocks `signals` in this thread and every thread it starts later
    /// (call before starting any), and ignores SIGPIPE.
    pub fn block(signals: &[libc::c_int]) -> io::Result<Self> {
        // SAFETY: sigset manipulation on a local, zero-initialised set; plain
        // syscalls without retained pointers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            for &s in signals {
                libc::sigaddset(&raw mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            Ok(Self(set))
        }
    }

    /// Waits for one of the signals; returns its number.
    pub fn wait(&self) -> io::Result<libc::c_int> {
        let mut sig: libc::c_int = 0;
        // SAFETY: `self.0` is a valid signal set; sigwait writes the number.
        let rc = unsafe { libc::sigwait(&raw const self.0, &raw mut sig) };
        if rc == 0 {
            Ok(sig)
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}

/// True when `fd` is a listening socket.
pub fn is_listening_socket(fd: RawFd) -> io::Result<bool> {
    let mut val: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut val).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val != 0)
}

/// Takes ownership of an inherited listening socket (`--fd`, systemd
/// socket activation), after checking that it is one. Call once per
/// descriptor: the process owns what it was handed at exec.
pub fn adopt_listening_socket(fd: RawFd) -> io::Result<OwnedFd> {
    if !is_listening_socket(fd)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket is not listening",
        ));
    }
    // SAFETY: an open socket (getsockopt succeeded) inherited for this
    // process to own; the caller adopts it once, nothing else closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The user id of the process at the other end of a UNIX socket
/// (`SO_PEERCRED`, taken when it connected).
pub fn peer_uid(fd: RawFd) -> io::Result<u32> {
    peer_cred(fd).map(|(uid, _)| uid)
}

/// The user and process ids of the process at the other end of a UNIX
/// socket (`SO_PEERCRED`, taken when it connected).
pub fn peer_cred(fd: RawFd) -> io::Result<(u32, u32)> {
    // SAFETY: `ucred` is a plain C struct for which all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, u32::try_from(cred.pid).unwrap_or(0)))
}

/// A new anonymous memory file (`memfd_create`, close-on-exec).
pub fn memfd(name: &str) -> io::Result<File> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's
    // duration; the result is checked before it is owned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created for this process, owned once.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Waits up to `timeout_ms` (-1: no limit) until one of `fds` is readable;
/// returns which are (all false on a timeout or EINTR).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(pfds.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
    // SAFETY: `pfds` is a valid array of `n` pollfd structs that poll may
    // write `revents` into, alive for the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// A descriptor that becomes readable when process `pid` exits
/// (`pidfd_open`, Linux 5.3): unlike `kill(pid, 0)` it tells a process that
/// died (a zombie not yet reaped) from one that runs, and a reused pid
/// from the process it was opened for.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid"))?;
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or
    // -1; no memory is involved.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: a descriptor just created for this process, owned once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to `timeout_ms` for the process of `pidfd` to exit; true once
/// it has.
pub fn process_exited(pidfd: &OwnedFd, timeout_ms: i32) -> bool {
    poll_readable(&[pidfd.as_raw_fd()], timeout_ms).is_ok_and(|r| r.first() == Some(&true))
}

/// Largest number of descriptors [`send_fds`] / [`recv_fds`] carry in one
/// message.
pub const MAX_PASSED_FDS: usize = 16;

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`) on a UNIX stream
/// socket; the receiver gets new descriptors of the same open file
/// descriptions (their locks and offsets included).
pub fn send_fds(
    stream: &std::os::unix::net::UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = loop {
        match stream.send_with_fds(&[bytes], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    // The descriptors went with the first bytes; the rest is plain data.
    let rest = bytes.get(sent..).unwrap_or_default();
    io::Write::write_all(&mut &*stream, rest)
}

/// Receives up to `buf.len()` bytes and the descriptors attached to them
/// (owned, close-on-exec). `Ok((0, _))` is the end of the stream.
pub fn recv_fds(
    stream: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut raw = [-1 as RawFd; MAX_PASSED_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, writable for its length and
    // borrowed mutably for the call; `raw` has room for MAX_PASSED_FDS.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut owned = Vec::new();
    for &fd in raw.iter().take(nfds) {
        if fd < 0 {
            continue;
        }
        // SAFETY: the kernel installed `fd` in this process for this
        // message (SCM_RIGHTS); nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl on a descriptor we own; no memory involved.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        owned.push(fd);
    }
    Ok((n, owned))
}

/// `struct __user_cap_header_struct` (capget/capset).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`, two of them for version 3.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the process: the bounding and ambient sets
/// (where it may), then effective, permitted and inheritable. A process
/// without CAP_SETPCAP has nothing to drop from the bounding set.
pub fn drop_capabilities() -> io::Result<()> {
    let last: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capset reads a header and two data structs, valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            (&raw mut header).cast::<libc::c_void>(),
            data.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
