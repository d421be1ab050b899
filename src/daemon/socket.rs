// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listening socket's path, claimed for the process's life, and the
//! check of an inherited listening descriptor.

use std::{
    os::fd::{OwnedFd, RawFd},
    path::PathBuf,
};

use super::DaemonError;
use crate::engine::sys;

/// A socket path this process serves, claimed by an exclusive lock on
/// `<socket>.pid` (holding the daemon's pid, as virtiofsd does) for the
/// process's whole life: a second daemon on the same path is refused
/// instead of unlinking the live socket and taking the path over; a socket
/// file whose daemon is gone (no lock) is stale and replaced.
#[derive(Debug)]
pub struct SocketClaim {
    _file: std::fs::File,
}

impl SocketClaim {
    /// Claims `socket`.
    pub fn take(socket: &std::path::Path) -> Result<Self, DaemonError> {
        use std::io::{Read, Seek, Write};
        let mut name = socket.as_os_str().to_owned();
        name.push(".pid");
        let lock = PathBuf::from(name);
        let err = |source| DaemonError::SocketLock {
            socket: socket.to_path_buf(),
            lock: lock.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(err)?;
        if !sys::flock_exclusive(&f).map_err(err)? {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(DaemonError::SocketInUse {
                socket: socket.to_path_buf(),
                lock,
                holder: if pid.is_empty() {
                    "pid unknown".into()
                } else {
                    format!("pid {pid}")
                },
            });
        }
        f.set_len(0).map_err(err)?;
        f.rewind().map_err(err)?;
        writeln!(f, "{}", std::process::id()).map_err(err)?;
        Ok(Self { _file: f })
    }
}

impl SocketClaim {
    /// Claims `socket`, waiting up to `wait` while another process holds it
    /// (a daemon killed a moment ago holds its lock until the kernel has
    /// closed its files).
    pub fn take_waiting(
        socket: &std::path::Path,
        wait: std::time::Duration,
    ) -> Result<Self, DaemonError> {
        let end = std::time::Instant::now().checked_add(wait);
        loop {
            match Self::take(socket) {
                Err(DaemonError::SocketInUse { .. })
                    if end.is_some_and(|e| std::time::Instant::now() < e) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// A new descriptor of the lock file (a handover passes the claim on).
    pub fn dup(&self) -> std::io::Result<OwnedFd> {
        self._file.try_clone().map(OwnedFd::from)
    }

    /// Holds a claim the previous instance passed (its lock came with the
    /// open file description) and writes this process's pid into it.
    pub fn adopt(file: std::fs::File) -> std::io::Result<Self> {
        use std::io::{Seek, Write};
        let mut f = file;
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())?;
        Ok(Self { _file: f })
    }
}

/// Adopts an inherited listening socket; refuses any other descriptor.
pub(super) fn adopt_listening_fd(fd: RawFd) -> Result<OwnedFd, DaemonError> {
    sys::adopt_listening_socket(fd).map_err(|e| DaemonError::BadFd {
        fd,
        reason: e.to_string(),
    })
}
