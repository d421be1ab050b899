// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: one listening socket for its whole life (`--socket`
//! or an inherited `--fd`, claimed in `socket.rs`), one frontend at a time
//! (each connection is `vhost::connection`'s), and SIGTERM/SIGINT
//! (`signals.rs`): stop taking requests, let those in flight complete,
//! persist the disk, exit 0. The control socket of the life-cycle work
//! (suspend, hand over, resize) will live here too.

use std::{
    os::fd::RawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use thiserror::Error;

use crate::{
    disk::DiskError,
    engine::sys::Signals,
    vhost::{
        connection::{serve_one, ConnectionError, Disconnect, Listener},
        BlkBackend,
    },
};

pub mod control;
mod signals;
mod socket;

pub use signals::block_signals;
pub use socket::SocketClaim;

/// How long SIGTERM waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenOn {
    /// Bind this path (an existing socket file is replaced).
    Path(PathBuf),
    /// An inherited, already listening socket (systemd socket activation).
    Fd(RawFd),
}

/// Daemon errors.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// Listening or serving a connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// The inherited descriptor is not a listening socket.
    #[error("--fd {fd} is not a listening UNIX socket: {reason}")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        reason: String,
    },
    /// Persisting the disk at exit failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// Another daemon serves this socket.
    #[error(
        "socket {socket} is served by another vhost-user-ubd ({holder}; lock file {lock}): a \
         second daemon would take the path over from it, and the next VM to connect would get \
         this daemon's disk. Stop that daemon first, or give another --socket"
    )]
    SocketInUse {
        /// The socket path.
        socket: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Who holds it ("pid N", as far as the lock file says).
        holder: String,
    },
    /// The control socket cannot be served.
    #[error("control socket {path}: {reason}")]
    Control {
        /// The socket path.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The socket's lock file cannot be used.
    #[error("cannot lock {lock} (the lock file of socket {socket}): {source}")]
    SocketLock {
        /// The socket path.
        socket: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Serves `backend` until SIGTERM/SIGINT; then drains and persists.
pub fn run(
    backend: Arc<BlkBackend>,
    listen: &ListenOn,
    control: Option<&std::path::Path>,
    signals: Signals,
) -> Result<(), DaemonError> {
    let mut listener = match listen {
        ListenOn::Path(p) => Listener::bind(p)?,
        ListenOn::Fd(fd) => Listener::from_owned(socket::adopt_listening_fd(*fd)?),
    };
    let _control = control
        .map(|p| control::Control::start(p, backend.clone()))
        .transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let disconnect = Disconnect::default();
    {
        let (stop, disconnect, backend) = (stop.clone(), disconnect.clone(), backend.clone());
        let listen_fd = listener.fd();
        std::thread::Builder::new()
            .name("ubd-signals".into())
            .spawn(move || {
                signals::wait_and_stop(&signals, &stop, &disconnect, &backend, listen_fd);
            })
            .map_err(DaemonError::Signals)?;
    }
    let info = backend.disk().info().clone();
    match listen {
        ListenOn::Path(p) => log::info!(
            "serving {} ({} disk, {} sectors) on {}",
            info.path.display(),
            info.kind,
            info.sectors(),
            p.display()
        ),
        ListenOn::Fd(fd) => log::info!(
            "serving {} ({} disk, {} sectors) on inherited fd {fd}",
            info.path.display(),
            info.kind,
            info.sectors()
        ),
    }
    while !stop.load(Ordering::Acquire) {
        if !serve_one(&backend, &mut listener, &stop, &disconnect, DRAIN_TIMEOUT)? {
            break;
        }
        log_stats(&backend);
    }
    log::info!("stopping: persisting {}", info.path.display());
    backend.disk().shutdown()?;
    log_stats(&backend);
    log::info!("stopped cleanly");
    Ok(())
}

fn log_stats(backend: &BlkBackend) {
    let d = backend.disk().stats();
    log::info!(
        "stats since start: requests completed {}, bad requests {}, reads parked (R4) {}, bitmap writes {} \
         (waited R3: {}), syncs {}, durability epochs {}",
        backend.stats.completed.load(Ordering::Relaxed),
        backend.stats.bad_requests.load(Ordering::Relaxed),
        d.reads_parked,
        d.bitmap_writes,
        d.bitmap_writes_waited,
        d.syncs,
        d.epochs
    );
}
