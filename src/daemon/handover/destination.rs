// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The new instance's side of a handover (`serve --takeover CTL`): it
//! registers with the running instance, asks it to suspend and receives
//! its files, commits once its own disk is built, and says when it serves.
//! Whatever happens to the running instance, the caller learns what it
//! may do: serve the passed files, open them from disk (the source died
//! before passing them), or refuse.

use std::{
    io::Write,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{json, Value};

use super::{pause, read_line_with_fds, PassedMeta, Spec};
use crate::{daemon::DaemonError, disk::handover::Received, engine::sys};

/// How long the destination waits for an answer (a suspend waits for the
/// requests in flight and a persist).
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);

/// A registered destination.
#[derive(Debug)]
pub struct Takeover {
    stream: UnixStream,
    ctl: PathBuf,
    spec: Spec,
    source_pid: u32,
    control_adopted: bool,
    /// A live migration's destination (told to the source with suspend).
    migration: bool,
    /// Readable once the source process has exited (see `source_exited`).
    pidfd: Option<OwnedFd>,
}

/// What the source handed over.
#[derive(Debug)]
pub enum Handed {
    /// Its files, ready to serve.
    Passed {
        /// What they are, and the counters.
        meta: PassedMeta,
        /// The descriptors, by name.
        fds: Received,
    },
    /// The source died after registering and before it passed anything:
    /// the files are as its last persist left them (R5), unlocked once the
    /// kernel has finished its I/O; open them as a fresh start would.
    SourceGone(String),
}

impl Takeover {
    /// Connects to the control socket `ctl` and registers as the running
    /// instance's destination; returns what it serves.
    pub fn register(ctl: &Path) -> Result<Self, DaemonError> {
        let err = |reason: String| DaemonError::Handover {
            ctl: ctl.to_path_buf(),
            reason,
        };
        let stream = UnixStream::connect(ctl).map_err(|e| {
            err(format!(
                "cannot connect ({e}); is a vhost-user-ubd running with --control {}?",
                ctl.display()
            ))
        })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| err(e.to_string()))?;
        let mut t = Self {
            stream,
            ctl: ctl.to_path_buf(),
            spec: Spec::default(),
            source_pid: 0,
            control_adopted: false,
            migration: false,
            pidfd: None,
        };
        // The process at the other end, from the kernel: a connection that
        // ends tells nothing of whether it lives (it may have given up and
        // serve on), its pidfd does.
        match sys::peer_cred(t.stream.as_raw_fd()).and_then(|(_, pid)| sys::pidfd_open(pid)) {
            Ok(fd) => t.pidfd = Some(fd),
            Err(e) => log::warn!(
                "handover: cannot watch the running instance's process ({e}); if it goes \
                 away halfway, this instance will not serve"
            ),
        }
        let v = t
            .call("register")
            .map_err(|why| match why {
                Call::Refused(r) => err(r),
                Call::Gone(g) => err(format!(
                    "the running instance went away before it answered ({g}); nothing was \
                     handed over. Start vhost-user-ubd without --takeover"
                )),
            })?
            .0;
        t.spec = serde_json::from_value(v.get("spec").cloned().unwrap_or(Value::Null))
            .map_err(|e| err(format!("unreadable answer to register: {e}")))?;
        t.source_pid = v
            .get("pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        log::info!(
            "handover: registered with pid {} on {}",
            t.source_pid,
            ctl.display()
        );
        pause("dst-registered");
        Ok(t)
    }

    /// What the running instance serves.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The running instance's process id.
    pub fn source_pid(&self) -> u32 {
        self.source_pid
    }

    /// The control socket it was reached on.
    pub fn ctl(&self) -> &Path {
        &self.ctl
    }

    /// Gives up: the source serves on. Best effort (closing the connection
    /// does the same).
    pub fn abort(mut self, why: &str) {
        log::warn!(
            "handover: aborting ({why}); pid {} serves on",
            self.source_pid
        );
        let _ = self.send("abort");
    }

    /// This instance is a live migration's destination: the source keeps
    /// its frontend connected at the release (it answers it with errors).
    pub fn set_migration(&mut self) {
        self.migration = true;
    }

    /// Asks the source to suspend; returns its files.
    pub fn suspend(&mut self) -> Result<Handed, DaemonError> {
        let (v, fds) = match self.call("suspend") {
            Ok(r) => r,
            Err(Call::Gone(g)) => {
                self.require_exited(&g)?;
                return Ok(Handed::SourceGone(g));
            }
            Err(Call::Refused(r)) => {
                return Err(DaemonError::Handover {
                    ctl: self.ctl.clone(),
                    reason: format!("the running instance refused to suspend: {r}"),
                })
            }
        };
        let meta: PassedMeta = serde_json::from_value(
            v.get("passed").cloned().unwrap_or(Value::Null),
        )
        .map_err(|e| DaemonError::Handover {
            ctl: self.ctl.clone(),
            reason: format!("unreadable answer to suspend: {e}"),
        })?;
        if meta.fds.len() != fds.len() {
            return Err(DaemonError::Handover {
                ctl: self.ctl.clone(),
                reason: format!(
                    "{} descriptors announced, {} received",
                    meta.fds.len(),
                    fds.len()
                ),
            });
        }
        let fds = Received(meta.fds.iter().cloned().zip(fds).collect());
        log::info!(
            "handover: received {} descriptors from pid {}",
            meta.fds.len(),
            self.source_pid
        );
        pause("dst-received");
        Ok(Handed::Passed { meta, fds })
    }

    /// The disk is built: asks the source to let go. `Ok(false)` when the
    /// source is gone (after passing its files, so they are this
    /// instance's now).
    pub fn commit(&mut self) -> Result<bool, DaemonError> {
        pause("dst-built");
        match self.call("commit") {
            Ok(_) => Ok(true),
            Err(Call::Gone(g)) => {
                self.require_exited(&g)?;
                log::warn!(
                    "handover: pid {} went away after passing its files ({g}); serving them",
                    self.source_pid
                );
                Ok(false)
            }
            Err(Call::Refused(r)) => Err(DaemonError::Handover {
                ctl: self.ctl.clone(),
                reason: format!("the running instance refused to commit: {r}"),
            }),
        }
    }

    /// Tells the source that this instance serves now (it exits). Call
    /// right before serving: once it is sent, the source will not serve
    /// again.
    /// `control_adopted`: this instance serves the source's control socket
    /// (its path stays when the source exits). An error means the source
    /// gave the handover up and serves on: this instance must not serve.
    pub fn live(mut self, control_adopted: bool) -> Result<(), DaemonError> {
        self.control_adopted = control_adopted;
        match self.call("live") {
            Ok(_) => Ok(()),
            Err(Call::Gone(g)) => self.require_exited(&g),
            Err(Call::Refused(r)) => Err(DaemonError::Handover {
                ctl: self.ctl.clone(),
                reason: format!("the running instance refused to let go: {r}; it serves on"),
            }),
        }
    }

    /// The source's connection ended (`why`): fine only if its process is
    /// gone too. A source that is alive gave the handover up (it waited
    /// [`STEP_TIMEOUT`](super::STEP_TIMEOUT) for this instance, or failed)
    /// and serves on; two instances must never serve one disk.
    fn require_exited(&self, why: &str) -> Result<(), DaemonError> {
        let exited = self
            .pidfd
            .as_ref()
            .is_some_and(|fd| sys::process_exited(fd, 5000));
        if exited {
            return Ok(());
        }
        Err(DaemonError::Handover {
            ctl: self.ctl.clone(),
            reason: format!(
                "the running instance (pid {}) ended the handover ({why}) but did not exit: it \
                 gave up (this instance was too slow, or it failed) and serves on; this instance \
                 does not serve",
                self.source_pid
            ),
        })
    }

    fn send(&mut self, step: &str) -> std::io::Result<()> {
        let mut line = json!({
            "v": 1,
            "cmd": "handover",
            "step": step,
            "pid": std::process::id(),
            "control_adopted": self.control_adopted,
            "migration": self.migration,
        })
        .to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes())
    }

    fn call(&mut self, step: &str) -> Result<(Value, Vec<OwnedFd>), Call> {
        self.send(step).map_err(|e| Call::Gone(e.to_string()))?;
        let (line, fds) = match read_line_with_fds(&self.stream, 1 << 20) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Call::Gone("its control connection closed".into())),
            Err(e) => return Err(Call::Gone(e.to_string())),
        };
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| Call::Refused(format!("unreadable answer: {e}")))?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            Ok((v, fds))
        } else {
            Err(Call::Refused(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("refused")
                    .to_owned(),
            ))
        }
    }
}

/// Why a step got no positive answer.
enum Call {
    /// The source answered with an error.
    Refused(String),
    /// The source is gone (closed, died, silent).
    Gone(String),
}
