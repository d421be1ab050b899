// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket (`serve --control PATH`): one JSON object per line
//! in each direction, protocol version 1 (README, "Control socket").
//!
//! ```text
//! -> {"v":1,"cmd":"status"}
//! <- {"v":1,"ok":true,"disk":{...},"device":{...},"stats":{...}}
//! -> {"v":1,"cmd":"flatten","rate":50000000}
//! <- {"v":1,"ok":true,"job":{"kind":"flatten","state":"running",...}}
//! -> {"v":1,"cmd":"export","path":"/abs/out.img","force":false}
//! -> {"v":1,"cmd":"cancel"}
//! -> {"v":1,"cmd":"resize","size":2147483648,"force":false}
//! <- {"v":1,"ok":true,"sectors":4194304,"bytes":2147483648,"notified":true}
//! <- {"v":1,"ok":false,"error":"..."}
//! ```
//!
//! Only the daemon's own user may connect: the socket is mode 0600 and the
//! peer's credentials are checked. Each client has its own thread (at most
//! [`MAX_CLIENTS`] at once; resizes run one at a time) and
//! [`CLIENT_TIMEOUT`] per line. A malformed line, an unknown command or a
//! line longer than [`MAX_LINE`] gets an error reply (the last one closes
//! the connection); the daemon and its guest never notice.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::{
        fd::AsRawFd,
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{handover::SourceShared, DaemonError};
use crate::{disk::SECTOR, engine::sys, vhost::BlkBackend};

/// Protocol version spoken.
pub const VERSION: u64 = 1;
/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send a line.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a shrink waits for requests admitted under the old size.
const SHRINK_DRAIN: Duration = Duration::from_secs(10);

/// A request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    /// The disk and the device.
    Status {
        /// Protocol version.
        v: u64,
    },
    /// A live handover step (`daemon::handover`).
    Handover {
        /// Protocol version.
        v: u64,
        /// register, suspend, commit, live, abort.
        step: String,
        /// The destination's process id.
        #[serde(default)]
        pid: u32,
        /// With `live`: the destination serves this control socket now.
        #[serde(default)]
        #[allow(dead_code)]
        control_adopted: bool,
        /// With `suspend`: the destination is a live migration's (it has
        /// its own socket and takes over at the switch-over).
        #[serde(default)]
        #[allow(dead_code)]
        migration: bool,
    },
    /// Start a flatten job (README "Block jobs").
    Flatten {
        /// Protocol version.
        v: u64,
        /// Bytes per second at most.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Start a point-in-time export to a new raw image.
    Export {
        /// Protocol version.
        v: u64,
        /// The image (an absolute path; must not exist unless `force`).
        path: PathBuf,
        /// Replace an existing image.
        #[serde(default)]
        force: bool,
        /// Bytes per second at most.
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Stop the running job.
    Cancel {
        /// Protocol version.
        v: u64,
    },
    /// Change the disk's size.
    Resize {
        /// Protocol version.
        v: u64,
        /// New size in bytes (a multiple of 512).
        size: u64,
        /// Allow shrinking.
        #[serde(default)]
        force: bool,
    },
}

/// The control socket's listener: bound here, or passed by the instance
/// this one took over from.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (a stale socket file is replaced, a live one refused).
    pub fn bind(path: &Path) -> Result<Self, DaemonError> {
        let err = |reason: String| DaemonError::Control {
            path: path.to_path_buf(),
            reason,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(err(
                    "another process serves it (another vhost-user-ubd?); give another --control"
                        .into(),
                ));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("cannot replace it: {e}")))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("cannot make it private: {e}")))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves a listener the previous instance passed (same path).
    pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> Self {
        Self {
            listener: UnixListener::from(fd),
            path: path.to_path_buf(),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new descriptor of the listener (a handover passes it on).
    pub fn dup(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }
}

/// The control socket, served by its own thread for the daemon's life.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    handover: Arc<SourceShared>,
}

impl Control {
    /// Serves `socket` on a thread.
    pub fn start(
        socket: ControlSocket,
        backend: Arc<BlkBackend>,
        handover: Arc<SourceShared>,
    ) -> Result<Self, DaemonError> {
        let path = socket.path.clone();
        let shared = Arc::new(Shared {
            backend,
            clients: AtomicUsize::new(0),
            resizing: Mutex::new(()),
            handover: handover.clone(),
        });
        let listener = socket.listener;
        std::thread::Builder::new()
            .name("ubd-control".into())
            .spawn(move || serve(&listener, &shared))
            .map_err(|e| DaemonError::Control {
                path: path.clone(),
                reason: format!("cannot start its thread: {e}"),
            })?;
        log::info!("control socket on {}", path.display());
        Ok(Self { path, handover })
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // After a handover the path may reach the successor.
        if !self.handover.keeps_control_path() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What the client threads share.
struct Shared {
    backend: Arc<BlkBackend>,
    clients: AtomicUsize,
    /// Resizes run one at a time.
    resizing: Mutex<()>,
    /// Handover state (this instance as a source, or where it came from).
    handover: Arc<SourceShared>,
}

fn serve(listener: &UnixListener, shared: &Arc<Shared>) {
    let owner = sys::euid();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match sys::peer_uid(stream.as_raw_fd()) {
            Ok(uid) if uid == owner => {}
            Ok(uid) => {
                log::warn!("control socket: refused a client of user {uid} (only {owner} may)");
                let _ = reply(
                    &stream,
                    &error(format!(
                        "permission denied: only user {owner} may use this socket"
                    )),
                );
                continue;
            }
            Err(e) => {
                log::warn!("control socket: cannot read the client's credentials: {e}");
                continue;
            }
        }
        if shared.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            let _ = reply(
                &stream,
                &error(format!("busy: {MAX_CLIENTS} control clients are connected")),
            );
            continue;
        }
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ubd-control-client".into())
            .spawn(move || {
                if let Err(e) = client(&stream, &sh) {
                    log::debug!("control socket: client: {e}");
                }
                sh.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

fn error(msg: impl Into<String>) -> Value {
    json!({"v": VERSION, "ok": false, "error": msg.into()})
}

fn reply(mut stream: &UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// Serves one client until it closes, times out or sends an overlong line.
fn client(stream: &UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let limit = u64::try_from(MAX_LINE)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader).take(limit).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let msg = if line.len() > MAX_LINE {
                format!("request longer than {MAX_LINE} bytes; closing")
            } else {
                "request not terminated by a newline; closing".into()
            };
            return reply(stream, &error(msg));
        }
        match answer(&line, shared) {
            Answer::Reply(v) => reply(stream, &v)?,
            // The connection is the handover's from here on.
            Answer::Handover(pid) => return shared.handover.drive(stream, pid),
        }
    }
}

/// What to do with a request.
enum Answer {
    /// Send this reply.
    Reply(Value),
    /// A destination registered (its pid): drive the handover.
    Handover(u32),
}

/// The reply to one request line.
fn answer(line: &[u8], shared: &Shared) -> Answer {
    let backend = shared.backend.as_ref();
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return Answer::Reply(error(format!(
            "bad request ({e}); send one JSON object per line, e.g. {{\"v\":1,\"cmd\":\"status\"}}"
        )))
        }
    };
    let v = match req {
        Request::Status { v }
        | Request::Resize { v, .. }
        | Request::Handover { v, .. }
        | Request::Flatten { v, .. }
        | Request::Export { v, .. }
        | Request::Cancel { v } => v,
    };
    if v != VERSION {
        return Answer::Reply(error(format!(
            "protocol version {v} is not spoken here (this daemon speaks {VERSION})"
        )));
    }
    if let Some(why) = shared.handover.refusal() {
        return Answer::Reply(error(why));
    }
    Answer::Reply(match req {
        Request::Status { .. } => status(backend, &shared.handover),
        Request::Handover { step, pid, .. } if step == "register" => return Answer::Handover(pid),
        Request::Handover { step, .. } => error(format!(
            "handover step {step:?} on a connection that did not register; a destination \
             sends register first, then every step on the same connection"
        )),
        Request::Flatten { .. } | Request::Export { .. } if !shared.handover.idle() => error(
            "a live handover is in progress; start the job once it has finished (on the \
             instance that serves then)",
        ),
        Request::Flatten { rate, .. } => job_reply(
            backend,
            backend
                .disk()
                .start_job(crate::disk::job::JobRequest::Flatten { rate }),
        ),
        Request::Export {
            path, force, rate, ..
        } => job_reply(
            backend,
            backend
                .disk()
                .start_job(crate::disk::job::JobRequest::Export { path, force, rate }),
        ),
        Request::Cancel { .. } => match backend.disk().cancel_job() {
            Ok(job) => json!({"v": VERSION, "ok": true, "job": job}),
            Err(e) => error(e.to_string()),
        },
        Request::Resize { .. } if !shared.handover.idle() => error(
            "a live handover is in progress; resize once it has finished (on the instance \
             that serves then)",
        ),
        Request::Resize { size, force, .. } => {
            let _one = shared
                .resizing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            resize(backend, size, force)
        }
    })
}

fn status(backend: &BlkBackend, handover: &SourceShared) -> Value {
    let disk = backend.disk();
    let info = disk.info();
    let sectors = info.sectors();
    json!({
        "v": VERSION,
        "ok": true,
        "disk": {
            "path": info.path,
            "kind": info.kind,
            "sectors": sectors,
            "bytes": sectors.saturating_mul(SECTOR),
            "readonly": info.readonly,
            "direct": info.direct,
            "writeback": disk.writeback(),
        },
        "device": backend.status(),
        "stats": disk.stats(),
        "job": disk.job(),
        "handover": handover.status(),
        "pid": std::process::id(),
    })
}

fn job_reply(backend: &BlkBackend, started: Result<(), crate::disk::DiskError>) -> Value {
    match started {
        Ok(()) => json!({"v": VERSION, "ok": true, "job": backend.disk().job()}),
        Err(e) => error(e.to_string()),
    }
}

fn resize(backend: &BlkBackend, size: u64, force: bool) -> Value {
    if size == 0 || size % SECTOR != 0 {
        return error(format!(
            "size {size} is not a positive multiple of {SECTOR} bytes"
        ));
    }
    let sectors = size / SECTOR;
    let drain = || {
        if !backend.wait_idle(SHRINK_DRAIN) {
            log::warn!(
                "resize: requests still in flight after {SHRINK_DRAIN:?}; cutting the file anyway \
                 (a late write past the new end may grow it again)"
            );
        }
    };
    match backend.disk().resize(sectors, force, &drain) {
        Ok(()) => {
            let notified = backend.config_changed();
            json!({
                "v": VERSION,
                "ok": true,
                "sectors": sectors,
                "bytes": size,
                "notified": notified,
            })
        }
        Err(e) => error(e.to_string()),
    }
}

/// Sends one request to the control socket at `path`; returns the reply.
/// An error reply (`"ok": false`) is returned as `Err` with its message.
pub fn call(path: &Path, request: &Value) -> Result<Value, DaemonError> {
    let err = |reason: String| DaemonError::Control {
        path: path.to_path_buf(),
        reason,
    };
    let stream = UnixStream::connect(path).map_err(|e| {
        err(format!(
            "cannot connect ({e}); is a daemon running with --control {}?",
            path.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| err(e.to_string()))?;
    let mut line = request.to_string();
    line.push('\n');
    // A daemon that refuses the client answers at once and closes: the
    // send may fail while its answer waits to be read.
    let sent = (&stream).write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream)
        .take(16 << 20)
        .read_line(&mut answer);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(err(format!("cannot send: {e}"))),
        (Ok(()), Err(e)) => return Err(err(format!("no reply: {e}"))),
        (Ok(()), Ok(_)) => return Err(err("the daemon closed without a reply".into())),
    }
    let v: Value = serde_json::from_str(&answer)
        .map_err(|e| err(format!("unreadable reply ({e}): {answer:?}")))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v)
    } else {
        Err(err(v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the daemon refused the request")
            .to_owned()))
    }
}
