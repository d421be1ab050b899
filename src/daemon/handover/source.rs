// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The running instance's side of a handover: the control client thread
//! of the destination's connection drives it, step by step, through the
//! state machine (`state.rs`), and undoes what was done when the
//! destination goes away before it serves.

use std::{
    io::{self, Write},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use serde_json::{json, Value};

use super::{
    pause,
    state::{Action, Source, SourceState, Step},
    Counters, PassedMeta, Spec, STEP_TIMEOUT, SUSPEND_DRAIN,
};
use crate::{
    disk,
    engine::sys,
    vhost::{
        connection::{Disconnect, Listener},
        BlkBackend,
    },
};

/// What a source needs to hand its disk over.
#[derive(Debug)]
pub struct SourceCtx {
    /// What this instance serves, as its arguments say.
    pub spec: Spec,
    /// The device.
    pub backend: Arc<BlkBackend>,
    /// The listening socket (passed on, paused at release).
    pub listener: Listener,
    /// Closes the frontend connection at release.
    pub disconnect: Disconnect,
    /// Set when the destination serves: the main loop ends.
    pub stop: Arc<AtomicBool>,
    /// The socket path's lock file (passed on, so the path stays claimed).
    pub claim: Option<OwnedFd>,
    /// The control socket's listener, passed on when the destination has
    /// no control socket of its own.
    pub control: Option<OwnedFd>,
}

/// The handover state of an instance, shared by its control threads.
#[derive(Debug)]
pub struct SourceShared {
    machine: Mutex<Source>,
    /// This instance came from a takeover: its state there and the pid of
    /// its predecessor (status only).
    destination: Mutex<Option<(&'static str, u32)>>,
    conns: AtomicU64,
    /// The destination serves this instance's control socket.
    control_given: AtomicBool,
    /// The handover is a live migration's switch-over: the frontend stays
    /// connected (a source VM resumed by mistake gets errors, not the disk).
    migration: AtomicBool,
    ctx: SourceCtx,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SourceShared {
    /// The handover state of an instance serving `ctx`.
    pub fn new(ctx: SourceCtx) -> Self {
        Self {
            machine: Mutex::new(Source::new(std::process::id())),
            destination: Mutex::new(None),
            conns: AtomicU64::new(1),
            control_given: AtomicBool::new(false),
            migration: AtomicBool::new(false),
            ctx,
        }
    }

    /// Records this instance's state as a destination (status only).
    pub fn set_destination(&self, state: &'static str, source_pid: u32) {
        *lock(&self.destination) = Some((state, source_pid));
    }

    /// Why a control command is refused (a retired source refuses all).
    pub fn refusal(&self) -> Option<String> {
        lock(&self.machine).refusal()
    }

    /// True when the files belong to the destination, or may by now: an
    /// exit must leave them as they are (not even the crash journal goes).
    pub fn passing(&self) -> bool {
        lock(&self.machine).passing()
    }

    /// True when the control socket's path is (or may be) the successor's
    /// at exit: it must stay.
    pub fn keeps_control_path(&self) -> bool {
        let m = lock(&self.machine);
        m.passing()
            && (m.state() != SourceState::Retired || self.control_given.load(Ordering::Acquire))
    }

    /// True when no handover is under way.
    pub fn idle(&self) -> bool {
        lock(&self.machine).state() == SourceState::Idle
    }

    /// True once retired (the control socket path then is the successor's).
    pub fn retired(&self) -> bool {
        lock(&self.machine).state() == SourceState::Retired
    }

    /// The `handover` object of a status reply.
    pub fn status(&self) -> Value {
        let m = lock(&self.machine);
        if m.state() != SourceState::Idle {
            return json!({"role": "source", "state": m.state().name(), "peer_pid": m.peer_pid()});
        }
        drop(m);
        match *lock(&self.destination) {
            Some((state, pid)) => json!({"role": "destination", "state": state, "peer_pid": pid}),
            None => json!({"role": "none", "state": "idle", "peer_pid": null}),
        }
    }

    /// Serves a destination that sent `register` (from process `pid`) on
    /// `stream`, until the handover ends one way or the other. Returns once
    /// the connection is done with.
    pub fn drive(&self, stream: &UnixStream, pid: u32) -> io::Result<()> {
        let conn = self.conns.fetch_add(1, Ordering::Relaxed);
        let pid = sys::peer_cred(std::os::fd::AsRawFd::as_raw_fd(stream)).map_or(pid, |(_, p)| {
            if p == 0 {
                pid
            } else {
                p
            }
        });
        if let Some(job) = self
            .ctx
            .backend
            .disk()
            .job()
            .filter(|j| j.state == crate::disk::job::JobState::Running)
        {
            return reply(
                stream,
                &error(format!(
                    "a {} job is running on this disk: wait for it, or cancel it                      (vhost-user-ubd cancel --control CTL), then hand over; a flatten started                      again on the new instance goes on where it stopped",
                    job.kind
                )),
            );
        }
        match self.step(conn, Step::Register { pid }) {
            Ok(_) => {}
            Err(why) => return reply(stream, &error(why)),
        }
        log::info!("handover: pid {pid} registered as the destination of this instance");
        pause("src-registered");
        let answered = reply(
            stream,
            &json!({"v": 1, "ok": true, "pid": std::process::id(), "spec": self.ctx.spec}),
        )
        // No deadline before the suspend (this instance serves on; a
        // migration's switch-over may come minutes later), then one per step.
        .and_then(|()| stream.set_read_timeout(None));
        if let Err(e) = answered {
            self.abort(conn, &format!("the destination is gone ({e})"));
            return Ok(());
        }
        // While the destination prepares (and the guest runs on), flush
        // once: the flush at suspend, which the guest waits for, then only
        // has what was written since (a writeback cache can hold tens of
        // milliseconds of syncing).
        let t0 = std::time::Instant::now();
        match disk::persist(self.ctx.backend.disk().as_ref()) {
            Ok(()) => log::info!("handover: pre-flushed in {:?}", t0.elapsed()),
            Err(e) => log::warn!("handover: pre-flush failed ({e}); the suspend flushes"),
        }
        loop {
            let step = match read_step(stream) {
                Ok(Some((s, flags))) => {
                    let flag = |f: &str| flags.get(f) == Some(&Value::Bool(true));
                    match s {
                        Step::Live => {
                            self.control_given
                                .store(flag("control_adopted"), Ordering::Release);
                        }
                        Step::Suspend => {
                            let migration = flag("migration");
                            if !migration && self.ctx.backend.migrating() {
                                let why = "a live migration of this VM is running (the frontend \
                                           logs dirty pages): hand the disk over after it, or to \
                                           the migration's destination (serve --takeover CTL \
                                           --socket DST_SOCK)";
                                self.abort(conn, why);
                                let _ = reply(stream, &error(why.into()));
                                return Ok(());
                            }
                            self.migration.store(migration, Ordering::Release);
                            if migration {
                                log::info!("handover: the switch-over of a live migration");
                            }
                        }
                        _ => {}
                    }
                    s
                }
                Ok(None) => {
                    self.abort(conn, "the destination closed its connection");
                    return Ok(());
                }
                Err(e) => {
                    let why = if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        format!("the destination sent nothing for {STEP_TIMEOUT:?}")
                    } else {
                        format!("reading the destination's next step: {e}")
                    };
                    self.abort(conn, &why);
                    return Ok(());
                }
            };
            let action = match self.step(conn, step) {
                Ok(a) => a,
                Err(why) => {
                    self.abort(conn, &why);
                    let _ = reply(stream, &error(why));
                    return Ok(());
                }
            };
            match action {
                Action::SuspendAndPass => {
                    if let Err(why) = self.suspend_and_pass(stream) {
                        self.abort(conn, &why);
                        let _ = reply(stream, &error(why));
                        return Ok(());
                    }
                    lock(&self.machine).passed();
                    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
                    log::info!("handover: files passed to pid {pid}; waiting for its commit");
                    pause("src-passed");
                }
                Action::Release => {
                    self.release();
                    pause("src-released");
                    if reply(stream, &json!({"v": 1, "ok": true})).is_err() {
                        self.abort(conn, "the destination is gone (commit unanswered)");
                        return Ok(());
                    }
                }
                Action::Retire => {
                    log::info!(
                        "handover: pid {pid} serves the disk now; this instance (pid {}) exits",
                        std::process::id()
                    );
                    let _ = reply(stream, &json!({"v": 1, "ok": true}));
                    crate::daemon::notify::notify(&format!(
                        "STOPPING=1\nSTATUS=handed over to pid {pid}"
                    ));
                    pause("src-retired");
                    if self.migration.load(Ordering::Acquire) {
                        self.ctx.disconnect.now();
                    }
                    self.ctx.stop.store(true, Ordering::Release);
                    self.ctx.listener.wake();
                    return Ok(());
                }
                Action::Resume { .. } | Action::Nothing => {
                    // An explicit abort: undone by `step`'s caller below.
                    self.undo(action, "the destination aborted");
                    let _ = reply(stream, &json!({"v": 1, "ok": true}));
                    return Ok(());
                }
                Action::Register => {}
            }
        }
    }

    fn step(&self, conn: u64, step: Step) -> Result<Action, String> {
        lock(&self.machine).on(conn, step)
    }

    fn abort(&self, conn: u64, why: &str) {
        match self.step(conn, Step::Abort) {
            Ok(action) => self.undo(action, why),
            Err(e) => log::warn!("handover: {why}; {e}"),
        }
    }

    fn undo(&self, action: Action, why: &str) {
        let Action::Resume { released } = action else {
            log::info!("handover aborted: {why}; nothing was changed");
            return;
        };
        let c = &self.ctx;
        if released {
            c.backend.disk().retire(false);
            c.listener.resume();
        }
        c.backend.resume();
        log::warn!("handover aborted: {why}; this instance serves on");
    }

    /// Suspends the device, persists the disk and sends the suspend reply
    /// with the descriptors.
    fn suspend_and_pass(&self, stream: &UnixStream) -> Result<(), String> {
        let c = &self.ctx;
        let t0 = std::time::Instant::now();
        // Test hook (negative control only): pass the files without waiting
        // for the requests in flight, which a held write then punishes.
        let drain = if std::env::var_os("VHOST_USER_UBD_TEST_HANDOVER_NO_DRAIN").is_some() {
            log::warn!("handover: test hook: not waiting for the requests in flight");
            std::time::Duration::ZERO
        } else {
            SUSPEND_DRAIN
        };
        if !c.backend.suspend(drain) && !drain.is_zero() {
            return Err(format!(
                "requests still in flight after {SUSPEND_DRAIN:?}; not handing over"
            ));
        }
        let drained = t0.elapsed();
        disk::persist(c.backend.disk().as_ref())
            .map_err(|e| format!("cannot persist the disk before handing it over: {e}"))?;
        log::info!(
            "handover: suspended (requests drained in {drained:?}, disk persisted in {:?})",
            t0.elapsed().saturating_sub(drained)
        );
        pause("src-suspended");
        let export = c
            .backend
            .disk()
            .export()
            .map_err(|e| format!("cannot pass the disk: {e}"))?;
        let listen = c
            .listener
            .dup()
            .map_err(|e| format!("cannot pass the listening socket: {e}"))?;
        let mut named: Vec<(&str, BorrowedFd<'_>)> = vec![("listen", listen.as_fd())];
        if let Some(f) = &c.claim {
            named.push(("claim", f.as_fd()));
        }
        if let Some(f) = &c.control {
            named.push(("control", f.as_fd()));
        }
        for (n, f) in &export.fds {
            named.push((n, f.as_fd()));
        }
        let (completed, bad_requests, resized) = c.backend.counters();
        let meta = PassedMeta {
            disk: export.meta.clone(),
            fds: named.iter().map(|(n, _)| (*n).to_owned()).collect(),
            counters: Counters {
                completed,
                bad_requests,
                resized,
            },
        };
        let mut line = json!({"v": 1, "ok": true, "passed": meta}).to_string();
        line.push('\n');
        let fds: Vec<BorrowedFd<'_>> = named.iter().map(|(_, f)| *f).collect();
        sys::send_fds(stream, line.as_bytes(), &fds)
            .map_err(|e| format!("cannot send the descriptors: {e}"))
    }

    /// The destination has its disk: let go of the frontend and the disk.
    fn release(&self) {
        let c = &self.ctx;
        c.listener.pause();
        c.backend.disk().retire(true);
        if self.migration.load(Ordering::Acquire) {
            // The source VM stays connected; should it run again, each of
            // its requests is answered IOERR (the disk is retired).
            c.backend.resume();
            log::info!("handover: released the disk; the source frontend gets errors from now on");
        } else {
            c.disconnect.now();
            log::info!("handover: released the frontend connection and the disk");
        }
    }
}

fn error(msg: String) -> Value {
    json!({"v": 1, "ok": false, "error": msg})
}

fn reply(mut stream: &UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// The destination's next step (`None` at the end of the stream).
/// With it: the message (its flags).
fn read_step(stream: &UnixStream) -> io::Result<Option<(Step, Value)>> {
    let Some((line, _)) = super::read_line_with_fds(stream, 4096)? else {
        return Ok(None);
    };
    let v: Value =
        serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let step = match (
        v.get("cmd").and_then(Value::as_str),
        v.get("step").and_then(Value::as_str),
    ) {
        (Some("handover"), Some("suspend")) => Step::Suspend,
        (Some("handover"), Some("commit")) => Step::Commit,
        (Some("handover"), Some("live")) => Step::Live,
        (Some("handover"), Some("abort")) => Step::Abort,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a handover step: {v}"),
            ))
        }
    };
    Ok(Some((step, v)))
}
