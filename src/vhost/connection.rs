// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One frontend connection at a time on a listening socket: a fresh
//! vhost-user daemon (vhost-user-backend's) per connection, the disk
//! eventfds on its worker threads' epolls, a watch for worker threads that
//! die, and the end of the connection sorted into "disconnected" and why.

use std::{
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use thiserror::Error;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{lock, BlkBackend};

/// Connection errors.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// Binding the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// Creating the vhost-user daemon failed.
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
}

/// The listening socket, for the daemon's whole life (or until a live
/// handover passes it on). Accepting waits in `poll` on the socket and a
/// wake-up event, so that a signal or a handover can stop it without
/// touching the socket (which a new instance may be serving), and it
/// accepts only while the gate is open ([`ListenHandle::pause`]).
#[derive(Clone)]
pub struct Listener(Arc<ListenInner>);

struct ListenInner {
    sock: std::os::unix::net::UnixListener,
    wake: crate::engine::EventFd,
    /// Accepting allowed; taken around every accept.
    open: Mutex<bool>,
}

/// Another thread's hold on the listener: wake it, pause it, lend its
/// descriptor.
pub type ListenHandle = Listener;

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Listener").field(&self.fd()).finish()
    }
}

impl Listener {
    /// Binds `path` (an existing socket file is replaced). The file is not
    /// removed when the listener goes: a new instance may serve it.
    pub fn bind(path: &Path) -> Result<Self, ConnectionError> {
        let err = |e: std::io::Error| ConnectionError::Listen {
            path: path.to_path_buf(),
            source: vhost::vhost_user::Error::SocketError(e),
        };
        let _ = std::fs::remove_file(path);
        let sock = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
        Self::new(sock).map_err(err)
    }

    /// Serves on a listening socket the process owns.
    pub fn from_owned(fd: OwnedFd) -> Result<Self, ConnectionError> {
        Self::new(std::os::unix::net::UnixListener::from(fd)).map_err(|e| ConnectionError::Listen {
            path: PathBuf::from("(inherited socket)"),
            source: vhost::vhost_user::Error::SocketError(e),
        })
    }

    fn new(sock: std::os::unix::net::UnixListener) -> std::io::Result<Self> {
        // Non-blocking: another process may take a connection between the
        // poll and the accept.
        sock.set_nonblocking(true)?;
        Ok(Self(Arc::new(ListenInner {
            sock,
            wake: crate::engine::EventFd::new()?,
            open: Mutex::new(true),
        })))
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> RawFd {
        self.0.sock.as_raw_fd()
    }

    /// A new descriptor of the socket (to pass to another process).
    pub fn dup(&self) -> std::io::Result<OwnedFd> {
        self.0.sock.as_fd().try_clone_to_owned()
    }

    /// Wakes a thread waiting to accept (it then looks at its stop flag).
    pub fn wake(&self) {
        self.0.wake.signal();
    }

    /// Stops accepting: once this returns, no connection is accepted
    /// until [`Listener::resume`].
    pub fn pause(&self) {
        *lock(&self.0.open) = false;
        self.wake();
    }

    /// Accepts again after [`Listener::pause`].
    pub fn resume(&self) {
        *lock(&self.0.open) = true;
        self.wake();
    }

    /// Waits for a connection; `None` when woken (or `stop` was set).
    fn accept(&self, stop: &AtomicBool) -> std::io::Result<Option<UnixStream>> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            let open = *lock(&self.0.open);
            let fds = if open {
                vec![self.0.wake.as_raw_fd(), self.fd()]
            } else {
                vec![self.0.wake.as_raw_fd()]
            };
            let ready = crate::engine::sys::poll_readable(&fds, 1000)?;
            if ready.first() == Some(&true) {
                self.0.wake.drain();
                return Ok(None);
            }
            if ready.get(1) != Some(&true) {
                continue;
            }
            let gate = lock(&self.0.open);
            if !*gate {
                continue;
            }
            match self.0.sock.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    return Ok(Some(s));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Ends the current connection from another thread.
#[derive(Clone, Default)]
pub struct Disconnect(Arc<Mutex<Option<ShutdownHandle>>>);

impl std::fmt::Debug for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disconnect")
            .field("connected", &self.connected())
            .finish()
    }
}

impl Disconnect {
    fn set(&self, h: Option<ShutdownHandle>) {
        *lock(&self.0) = h;
    }

    /// True while a frontend is connected.
    pub fn connected(&self) -> bool {
        lock(&self.0).is_some()
    }

    /// Drops the current connection, if any.
    pub fn now(&self) {
        let h = lock(&self.0).clone();
        if let Some(h) = h {
            h.shutdown();
        }
    }
}

/// Serves one frontend on `listener`, from accept to disconnect, then
/// resets the backend for the next one. Returns `Ok(false)` when `stop`
/// was set before a frontend connected.
pub fn serve_one(
    backend: &Arc<BlkBackend>,
    listener: &Listener,
    stop: &AtomicBool,
    disconnect: &Disconnect,
    drain_timeout: Duration,
) -> Result<bool, ConnectionError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("ubd-vhost".into(), backend.clone(), mem)
        .map_err(|e| ConnectionError::Daemon(e.to_string()))?;
    for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        for (fd, id) in backend.disk_event_fds(thread) {
            handler
                .register_listener(fd, EventSet::IN, id)
                .map_err(|e| ConnectionError::Daemon(format!("epoll registration: {e}")))?;
        }
    }
    log::info!("waiting for a vhost-user frontend");
    let stream = loop {
        match listener.accept(stop) {
            Ok(Some(s)) => break s,
            Ok(None) if stop.load(Ordering::Acquire) => return Ok(false),
            Ok(None) => {}
            Err(e) => {
                log::error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    if let Err(e) = daemon.start_stream(stream) {
        log::error!("cannot serve the connection: {e}");
        return Ok(true);
    }
    log::info!("frontend connected");
    disconnect.set(daemon.shutdown_handle());
    if stop.load(Ordering::Acquire) {
        backend.drain(drain_timeout);
        daemon.request_shutdown();
    }
    let watch = WorkerWatch::start(daemon.get_epoll_handlers().len(), daemon.shutdown_handle());
    let result = daemon.wait();
    drop(watch);
    disconnect.set(None);
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => log::info!("frontend disconnected"),
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::InvalidParam)) => {
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
    Ok(true)
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
