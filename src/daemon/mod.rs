// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: one listening socket for its whole life (`--socket`
//! or an inherited `--fd`, claimed in `socket.rs`), one frontend at a time
//! (each connection is `vhost::connection`'s), and SIGTERM/SIGINT
//! (`signals.rs`): stop taking requests, let those in flight complete,
//! persist the disk, exit 0. The control socket (`control.rs`: status,
//! resize) and the live handover to a new instance (`handover/`).

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
    vhost::{
        connection::{serve_one, ConnectionError, Disconnect, Listener},
        BlkBackend,
    },
};

pub mod control;
pub mod handover;
pub mod notify;
pub mod sandbox;
mod signals;
mod socket;

pub use crate::engine::sys::Signals;
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
    /// The listening socket a predecessor passes (`--takeover` of an
    /// instance that served an inherited socket).
    Handed,
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
    /// The sandbox cannot be entered.
    #[error("sandbox: {reason}")]
    Sandbox {
        /// Why, and what to do.
        reason: String,
    },
    /// A live handover failed or was refused.
    #[error("handover from the instance at {ctl}: {reason}")]
    Handover {
        /// The old instance's control socket.
        ctl: PathBuf,
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

/// What the daemon serves on: its listening socket (bound, inherited or
/// passed by a predecessor), the socket path's claim, the control socket,
/// what its arguments say (for a successor), and the predecessor of a
/// takeover still waiting for this instance's commit.
#[derive(Debug)]
pub struct Serving {
    /// The listening socket.
    pub listener: Listener,
    /// Where it is, for logs.
    pub listen_desc: String,
    /// The socket path's claim (`--socket`).
    pub claim: Option<SocketClaim>,
    /// The control socket.
    pub control: Option<control::ControlSocket>,
    /// True when `control` was passed by the predecessor (it is served
    /// only once the predecessor has let go).
    pub control_adopted: bool,
    /// What this instance serves, as its arguments say.
    pub spec: handover::Spec,
    /// `--takeover`: the predecessor, with this instance's disk built (or,
    /// for a migration destination, to be taken over at the switch-over).
    pub takeover: Option<handover::Takeover>,
    /// A live migration's destination: how the disk arrives.
    pub switch: Option<Switch>,
    /// The sandbox entered before serving.
    pub sandbox: (sandbox::Sandbox, sandbox::OnViolation),
}

/// How a migration destination gets its disk at the switch-over.
pub struct Switch {
    /// The disk the backend serves, empty until then.
    pub pending: Arc<crate::disk::handover::PendingDisk>,
    /// Where the rings wait (the backend's).
    pub gate: Arc<crate::vhost::gate::SwitchGate>,
    /// Options for the passed disk.
    pub opts: crate::disk::DiskOptions,
    /// Opens the disk from its files (the source died before passing them).
    pub open: Box<dyn FnOnce() -> Result<Arc<dyn crate::disk::Disk>, DiskError> + Send>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

/// Why a switch-over did not bring the disk.
enum SwitchEnd {
    /// The frontend left before any ring started (a cancelled migration).
    Cancelled,
    /// It failed.
    Failed(DaemonError),
}

/// The switch-over of a migration destination: once a ring starts, the
/// handover runs (the source suspends, persists and passes its files; it
/// keeps its frontend, answering it with errors) and the disk is served.
fn switch_over(
    mut t: handover::Takeover,
    sw: Switch,
    backend: &BlkBackend,
) -> Result<(), SwitchEnd> {
    if !sw.gate.wait_trigger() {
        return Err(SwitchEnd::Cancelled);
    }
    let t0 = std::time::Instant::now();
    t.set_migration();
    let fail = SwitchEnd::Failed;
    match t.suspend().map_err(fail)? {
        handover::Handed::Passed { meta, mut fds } => {
            let disk = crate::disk::handover::adopt(&meta.disk, &mut fds, &sw.opts)
                .map_err(|e| fail(e.into()))?;
            sw.pending.set(disk);
            let c = meta.counters;
            backend.restore_counters(c.completed, c.bad_requests, c.resized);
            if t.commit().map_err(fail)? {
                handover::pause("dst-committed");
                t.live(false).map_err(fail)?;
            }
        }
        handover::Handed::SourceGone(why) => {
            log::warn!(
                "switch-over: pid {} went away before it passed its files ({why}); opening \
                 them from disk",
                t.source_pid()
            );
            sw.pending.set((sw.open)().map_err(|e| fail(e.into()))?);
        }
    }
    // Only now: the source has let go (or is gone), so it cannot serve
    // again while this instance does.
    sw.gate.open(true);
    log::info!(
        "handover: live (switch-over of a live migration in {:?})",
        t0.elapsed()
    );
    Ok(())
}

/// Binds (or adopts) the listening socket of `listen`.
pub fn listen(listen: &ListenOn) -> Result<(Listener, String), DaemonError> {
    Ok(match listen {
        ListenOn::Path(p) => (Listener::bind(p)?, p.display().to_string()),
        ListenOn::Fd(fd) => (
            Listener::from_owned(socket::adopt_listening_fd(*fd)?)?,
            format!("inherited fd {fd}"),
        ),
        ListenOn::Handed => {
            return Err(DaemonError::BadFd {
                fd: -1,
                reason: "the running instance served an inherited socket and did not pass it; \
                         start the new instance the way the old one was started (--fd)"
                    .into(),
            })
        }
    })
}

/// Serves `backend` until SIGTERM/SIGINT (then drains and persists) or a
/// handover to a new instance (then exits leaving the files to it).
pub fn run(
    backend: Arc<BlkBackend>,
    serving: Serving,
    signals: Signals,
) -> Result<(), DaemonError> {
    let Serving {
        listener,
        listen_desc,
        claim,
        control,
        control_adopted,
        spec,
        takeover,
        switch,
        sandbox: (sandbox_mode, on_violation),
    } = serving;
    let stop = Arc::new(AtomicBool::new(false));
    let disconnect = Disconnect::default();
    let handover = Arc::new(handover::SourceShared::new(handover::SourceCtx {
        spec,
        backend: backend.clone(),
        listener: listener.clone(),
        disconnect: disconnect.clone(),
        stop: stop.clone(),
        claim: claim.as_ref().and_then(|c| c.dup().ok()),
        control: control.as_ref().and_then(|c| c.dup().ok()),
    }));
    let start_control =
        |c: control::ControlSocket| control::Control::start(c, backend.clone(), handover.clone());
    let mut _control = None;
    let mut control = control;
    let failure: Arc<std::sync::Mutex<Option<DaemonError>>> = Arc::default();
    let gate = switch.as_ref().map(|s| s.gate.clone());
    let mut takeover = takeover;
    let migration = match switch {
        Some(sw) => takeover.take().map(|t| (sw, t)),
        None => None,
    };
    if let Some((sw, t)) = migration {
        let pid = t.source_pid();
        handover.set_destination("waiting", pid);
        let (backend, handover, failure, stop, listener, disconnect) = (
            backend.clone(),
            handover.clone(),
            failure.clone(),
            stop.clone(),
            listener.clone(),
            disconnect.clone(),
        );
        std::thread::Builder::new()
            .name("ubd-switch".into())
            .spawn(move || match switch_over(t, sw, &backend) {
                Ok(()) => handover.set_destination("live", pid),
                Err(SwitchEnd::Cancelled) => {}
                Err(SwitchEnd::Failed(e)) => {
                    log::error!("switch-over failed: {e}; this instance stops");
                    *failure
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                    backend.gate_failed();
                    stop.store(true, Ordering::Release);
                    listener.wake();
                    disconnect.now();
                }
            })
            .map_err(DaemonError::Signals)?;
    }
    if let Some(mut t) = takeover {
        let pid = t.source_pid();
        handover.set_destination("built", pid);
        if !control_adopted {
            _control = control.take().map(start_control).transpose()?;
        }
        let source_alive = t.commit()?;
        handover.set_destination("committed", pid);
        if source_alive {
            handover::pause("dst-committed");
            t.live(control_adopted)?;
        }
        handover.set_destination("live", pid);
        log::info!("handover: live (took over from pid {pid})");
    }
    if _control.is_none() {
        _control = control.take().map(start_control).transpose()?;
    }
    {
        let (stop, disconnect, backend, listener) = (
            stop.clone(),
            disconnect.clone(),
            backend.clone(),
            listener.clone(),
        );
        std::thread::Builder::new()
            .name("ubd-signals".into())
            .spawn(move || {
                signals::wait_and_stop(&signals, &stop, &disconnect, &backend, &listener);
            })
            .map_err(DaemonError::Signals)?;
    }
    let info = backend.disk().info().clone();
    log::info!(
        "serving {} ({} disk, {} sectors) on {listen_desc}",
        info.path.display(),
        info.kind,
        info.sectors()
    );
    // Everything is bound and open: from here on, only the serving paths.
    sandbox::enter(sandbox_mode, on_violation)?;
    notify::notify(&format!(
        "READY=1\nSTATUS=serving {} on {listen_desc}",
        info.path.display()
    ));
    while !stop.load(Ordering::Acquire) {
        if !serve_one(&backend, &listener, &stop, &disconnect, DRAIN_TIMEOUT)? {
            break;
        }
        log_stats(&backend);
        if let Some(g) = gate.as_ref().filter(|g| !g.triggered()) {
            log::info!(
                "the frontend left before the switch-over (a cancelled migration?): the \
                 running instance serves on; this one stops"
            );
            g.open(false);
            break;
        }
    }
    let failed = failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(e) = failed {
        return Err(e);
    }
    if handover.passing() {
        // The files are (or may be, if this instance is stopped halfway)
        // the successor's: nothing more is written, nothing removed.
        backend.disk().retire(true);
        backend.disk().shutdown()?;
        log_stats(&backend);
        log::info!("handed over; exiting");
        return Ok(());
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
