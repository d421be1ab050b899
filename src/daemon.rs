// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's life: one listening socket for its whole life (`--socket`
//! or an inherited `--fd`), one frontend at a time, a fresh vhost-user
//! daemon per connection, and SIGTERM/SIGINT handling: stop taking
//! requests, let those in flight complete, persist the disk, exit 0.

use std::{
    os::fd::{AsRawFd, FromRawFd, RawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::{disk::DiskError, vhost::BlkBackend};

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
    /// Binding the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The inherited descriptor is not a listening socket.
    #[error("--fd {fd} is not a listening UNIX socket: {reason}")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        reason: String,
    },
    /// Creating the vhost-user daemon failed.
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
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
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err(e));
            }
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

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread it
/// starts later, so that only the signal thread receives them. Call first.
pub fn block_signals() -> Result<libc::sigset_t, DaemonError> {
    // SAFETY: sigset manipulation on a local, zero-initialised set; plain
    // syscalls without retained pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        if rc != 0 {
            return Err(DaemonError::Signals(std::io::Error::from_raw_os_error(rc)));
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        Ok(set)
    }
}

fn validate_listening_fd(fd: RawFd) -> Result<(), DaemonError> {
    let bad = |reason: String| DaemonError::BadFd { fd, reason };
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
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
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    if val == 0 {
        return Err(bad("the socket is not listening".into()));
    }
    Ok(())
}

/// Serves `backend` until SIGTERM/SIGINT; then drains and persists.
pub fn run(
    backend: Arc<BlkBackend>,
    listen: &ListenOn,
    signals: libc::sigset_t,
) -> Result<(), DaemonError> {
    let mut listener = match listen {
        ListenOn::Path(p) => Listener::new(p, true).map_err(|e| DaemonError::Listen {
            path: p.clone(),
            source: e,
        })?,
        ListenOn::Fd(fd) => {
            validate_listening_fd(*fd)?;
            // SAFETY: the descriptor was inherited for us to own (checked
            // above to be a listening socket); nothing else uses it.
            unsafe { Listener::from_raw_fd(*fd) }
        }
    };
    let listen_fd = listener.as_raw_fd();
    let stop = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
    {
        let (stop, current, backend) = (stop.clone(), current.clone(), backend.clone());
        std::thread::Builder::new()
            .name("ubd-signals".into())
            .spawn(move || signal_thread(&signals, &stop, &current, &backend, listen_fd))
            .map_err(DaemonError::Signals)?;
    }
    let info = backend.disk().info().clone();
    match listen {
        ListenOn::Path(p) => log::info!(
            "serving {} ({} disk, {} sectors) on {}",
            info.path.display(),
            info.kind,
            info.sectors,
            p.display()
        ),
        ListenOn::Fd(fd) => log::info!(
            "serving {} ({} disk, {} sectors) on inherited fd {fd}",
            info.path.display(),
            info.kind,
            info.sectors
        ),
    }
    while !stop.load(Ordering::Acquire) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("ubd-vhost".into(), backend.clone(), mem)
            .map_err(|e| DaemonError::Daemon(e.to_string()))?;
        for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            for (fd, id) in backend.disk_event_fds(thread) {
                handler
                    .register_listener(fd, EventSet::IN, id)
                    .map_err(|e| DaemonError::Daemon(format!("epoll registration: {e}")))?;
            }
        }
        log::info!("waiting for a vhost-user frontend");
        if let Err(e) = daemon.start(&mut listener) {
            if stop.load(Ordering::Acquire) {
                break;
            }
            log::error!("accept failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        log::info!("frontend connected");
        *current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = daemon.shutdown_handle();
        if stop.load(Ordering::Acquire) {
            backend.drain(DRAIN_TIMEOUT);
            daemon.request_shutdown();
        }
        let watch = WorkerWatch::start(daemon.get_epoll_handlers().len(), daemon.shutdown_handle());
        let result = daemon.wait();
        drop(watch);
        *current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::InvalidParam,
            )) => {
                log::warn!(
                    "frontend disconnected after an invalid request (a queue index beyond --queues {}? \
                     raise --queues to the frontend's num-queues)",
                    vhost_user_backend::VhostUserBackend::num_queues(backend.as_ref())
                );
            }
            Err(e) => log::warn!("frontend disconnected: {e}"),
        }
        drop(daemon);
        backend.disconnected();
        log_stats(&backend);
    }
    log::info!("stopping: persisting {}", info.path.display());
    backend.disk().shutdown()?;
    log_stats(&backend);
    log::info!("stopped cleanly");
    Ok(())
}

/// Name vhost-user-backend gives its queue worker threads.
const WORKER_THREAD_NAME: &str = "vring_worker";
/// How often the worker threads are counted (a daemon wakes for it only
/// while a frontend is connected; once a second keeps a host of a thousand
/// daemons quiet).
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// Notices a queue worker thread that ended while the frontend is
/// connected. vhost-user-backend ends a worker's thread when reading a kick
/// descriptor fails (a frontend can pass a pipe that reaches EOF, or a
/// file), without a word: the requests of its queues would never be
/// answered. The watch logs it and drops the connection, so the frontend
/// can reconnect and set its rings up again.
struct WorkerWatch {
    /// Dropping it ends the watch at once (no sleep to sit out).
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerWatch {
    fn start(expected: usize, handle: Option<ShutdownHandle>) -> Option<Self> {
        let handle = handle?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ubd-watch".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(WATCH_PERIOD)
                {
                    let alive = count_threads(WORKER_THREAD_NAME);
                    if alive.is_some_and(|n| n < expected) {
                        log::error!(
                            "a queue worker thread ended ({} of {expected} left): the frontend's \
                             kick descriptor failed (it reached EOF or is not an eventfd). \
                             Dropping the connection so that the frontend can reconnect",
                            alive.unwrap_or(0)
                        );
                        handle.shutdown();
                        return;
                    }
                }
            })
            .map_err(|e| log::warn!("cannot start the worker watch: {e}"))
            .ok()?;
        Some(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for WorkerWatch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Threads of this process named `name` (`None` if /proc cannot tell).
fn count_threads(name: &str) -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        tasks
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
            .count(),
    )
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

fn signal_thread(
    set: &libc::sigset_t,
    stop: &AtomicBool,
    current: &Mutex<Option<ShutdownHandle>>,
    backend: &BlkBackend,
    listen_fd: RawFd,
) {
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: `set` is a valid signal set; sigwait writes the signal number.
        let rc = unsafe { libc::sigwait(set, &raw mut sig) };
        if rc == 0 && (sig == libc::SIGTERM || sig == libc::SIGINT) {
            break;
        }
        if rc == 0 && sig == libc::SIGHUP {
            log::info!("SIGHUP ignored");
        }
    }
    log::info!("signal {sig}: draining requests in flight");
    stop.store(true, Ordering::Release);
    // Wake `accept` if no frontend is connected.
    // SAFETY: shutting down our own listening socket; accept returns EINVAL.
    unsafe { libc::shutdown(listen_fd, libc::SHUT_RDWR) };
    let handle = current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(h) = handle {
        if !backend.drain(DRAIN_TIMEOUT) {
            log::error!("requests still in flight after {DRAIN_TIMEOUT:?}; disconnecting anyway");
        }
        h.shutdown();
    }
}
