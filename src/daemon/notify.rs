// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! systemd's service notification protocol (`sd_notify(3)`), without
//! libsystemd: a datagram to the socket in `NOTIFY_SOCKET` (a path, or an
//! abstract name written `@name`). `READY=1` once the socket accepts,
//! `STOPPING=1` at SIGTERM or a handover. Without `NOTIFY_SOCKET` nothing
//! is sent; a failure is logged, never fatal.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1\nSTATUS=...`) to systemd, if it listens.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| {
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(state.as_bytes(), &addr)
        } else {
            s.send_to(state.as_bytes(), &target)
        }
    });
    match sent {
        Ok(_) => log::debug!("told systemd {state:?}"),
        Err(e) => log::warn!(
            "cannot notify systemd at {} ({e}); it may consider the service not started",
            target.to_string_lossy()
        ),
    }
}

/// The listening socket systemd passed (`LISTEN_FDS`/`LISTEN_PID`,
/// `sd_listen_fds(3)`): descriptor 3 when it is meant for this process.
/// The variables are removed, as `sd_listen_fds(unset=1)` does.
pub fn listen_fd() -> Option<std::os::fd::RawFd> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?;
    if pid.trim() != std::process::id().to_string() {
        return None;
    }
    let n: u32 = fds.trim().parse().ok()?;
    // Called before any thread starts (nothing reads the environment
    // concurrently).
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    match n {
        0 => None,
        1 => Some(3),
        n => {
            log::warn!("systemd passed {n} sockets; serving the first (fd 3)");
            Some(3)
        }
    }
}
