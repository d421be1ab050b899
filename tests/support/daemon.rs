// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Runs the real `vhost-user-ubd serve` binary for an integration test.
//!
//! ```ignore
//! let dir = tempfile::tempdir().unwrap();
//! let daemon = DaemonBuilder::new(dir.path())
//!     .raw(&image)
//!     .queues(4)
//!     .spawn();                       // returns once the socket listens
//! // ... connect a frontend to daemon.socket() ...
//! daemon.assert_running();
//! let status = daemon.terminate();    // SIGTERM, wait for the exit
//! assert_eq!(status.code(), Some(0), "{}", daemon.log());
//! ```
//!
//! - The socket is `DIR/NAME.sock` and the daemon's stderr (and stdout) go
//!   to `DIR/NAME.log`; `NAME` defaults to `ubd`. Always use a fresh
//!   temporary directory: no fixed paths, no clashes between tests.
//! - `RUST_LOG` is passed through from the test's environment (default
//!   `info`); [`DaemonBuilder::rust_log`] overrides it.
//! - A watchdog kills the daemon with SIGKILL once [`DaemonBuilder::deadline`]
//!   passes (default [`DEFAULT_DEADLINE`]). A frontend blocked on a hung
//!   daemon then sees the socket close, so the test fails with a message
//!   instead of hanging. [`Daemon::watchdog_fired`] tells afterwards.
//! - Dropping a [`Daemon`] that still runs kills it (SIGKILL). If the test
//!   is panicking, the tail of the daemon's log is printed to stderr.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::Write,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// The daemon binary built by cargo for this package.
pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-user-ubd");
/// How long [`DaemonBuilder::spawn`] waits for the socket to appear.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Daemon::terminate`] waits for the exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Default lifetime before the watchdog kills the daemon.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(180);
/// Lines of the log printed when a test panics.
const LOG_TAIL_LINES: usize = 60;

/// Options for one daemon; see the module documentation.
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    dir: PathBuf,
    name: String,
    args: Vec<OsString>,
    rust_log: Option<String>,
    deadline: Duration,
}

impl DaemonBuilder {
    /// A daemon whose socket and log live in `dir` (a test's tempdir).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name: "ubd".into(),
            args: Vec::new(),
            rust_log: None,
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// Base name of the socket and log files (for several daemons in one
    /// directory).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// `--raw IMAGE`.
    pub fn raw(self, image: &Path) -> Self {
        self.arg("--raw").arg(image)
    }

    /// `--cow COW [--backing BACKING]` (the daemon creates the COW over the
    /// backing when it does not exist).
    pub fn cow(self, cow: &Path, backing: Option<&Path>) -> Self {
        let s = self.arg("--cow").arg(cow);
        match backing {
            Some(b) => s.arg("--backing").arg(b),
            None => s,
        }
    }

    /// `--queues N`.
    pub fn queues(self, n: usize) -> Self {
        self.arg("--queues").arg(n.to_string())
    }

    /// `--queue-size N`: the largest virtqueue size accepted. It also sets
    /// the advertised seg_max (N - 2, at most 1022); libblkio clients need
    /// N <= 512, see `MAX_DAEMON_QUEUE_SIZE` in `support/client.rs`.
    pub fn queue_size(self, n: u32) -> Self {
        self.arg("--queue-size").arg(n.to_string())
    }

    /// Any other `serve` argument (`--readonly`, `--cache`, ...).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    /// Several `serve` arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// `RUST_LOG` for the daemon (e.g. `"debug"`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = Some(filter.into());
        self
    }

    /// Kill the daemon (SIGKILL) this long after it was started.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// Starts the daemon and waits until its socket exists; panics (with
    /// the log) if it exits first or the socket does not appear in time.
    pub fn spawn(self) -> Daemon {
        let socket = self.dir.join(format!("{}.sock", self.name));
        let log = self.dir.join(format!("{}.log", self.name));
        let _ = std::fs::remove_file(&socket);
        let out = File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().expect("dup log file");
        let rust_log = self
            .rust_log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        let mut cmd = Command::new(BINARY);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(&self.args);
        // The crash journal goes in the test's own directory (never the
        // shared /dev/shm), the same for every daemon of one test.
        if !self.args.iter().any(|a| a == "--crash-journal") {
            let j = self.dir.join("journal");
            std::fs::create_dir_all(&j).unwrap_or_else(|e| panic!("{}: {e}", j.display()));
            cmd.arg("--crash-journal").arg(&j);
        }
        cmd.env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BINARY}: {e}"));
        let pid = child.id();
        let state = Arc::new(Mutex::new(Some(child)));
        let fired = Arc::new(AtomicBool::new(false));
        spawn_watchdog(&state, &fired, self.deadline, pid);
        let mut d = Daemon {
            state,
            fired,
            pid,
            socket,
            log,
            command: format!("{cmd:?}"),
        };
        d.wait_for_socket();
        d
    }
}

/// Kills the child once `deadline` passes, unless it has been reaped.
/// The child is only signalled while the lock is held and the child is not
/// reaped, so the pid cannot have been reused by another process.
fn spawn_watchdog(
    state: &Arc<Mutex<Option<Child>>>,
    fired: &Arc<AtomicBool>,
    deadline: Duration,
    pid: u32,
) {
    let weak = Arc::downgrade(state);
    let fired = fired.clone();
    let end = Instant::now() + deadline;
    std::thread::Builder::new()
        .name(format!("watchdog-{pid}"))
        .spawn(move || loop {
            let Some(state) = weak.upgrade() else {
                return;
            };
            {
                let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
                let Some(child) = guard.as_mut() else {
                    return;
                };
                if Instant::now() >= end {
                    if matches!(child.try_wait(), Ok(None)) {
                        fired.store(true, Ordering::SeqCst);
                        let _ = writeln!(
                            std::io::stderr(),
                            "watchdog: vhost-user-ubd (pid {pid}) still running after {deadline:?}: SIGKILL"
                        );
                        let _ = child.kill();
                    }
                    return;
                }
            }
            drop(state);
            std::thread::sleep(Duration::from_millis(100));
        })
        .expect("spawn watchdog thread");
}

/// A running (or exited) daemon.
#[derive(Debug)]
pub struct Daemon {
    /// `None` once the child has been reaped.
    state: Arc<Mutex<Option<Child>>>,
    fired: Arc<AtomicBool>,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    command: String,
}

impl Daemon {
    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The file with the daemon's stderr and stdout.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when the watchdog had to kill the daemon.
    pub fn watchdog_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `None` while it runs, `Some(status)` once it exited (the child is
    /// reaped the first time; later calls return the same status).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut g = self.lock();
        let child = g.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st),
            Ok(None) => None,
            Err(e) => panic!("waitpid({}): {e}", self.pid),
        }
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        let mut g = self.lock();
        g.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Panics, with the log tail, if the daemon is no longer running.
    pub fn assert_running(&self) {
        if let Some(st) = self.try_status() {
            panic!(
                "vhost-user-ubd exited unexpectedly ({st}); log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Waits until `needle` appears in the log (true) or `timeout` passes
    /// (false). The log format is the daemon's, not an interface: prefer
    /// observable behaviour when there is one.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the daemon if it still runs.
    pub fn signal(&self, sig: libc::c_int) {
        let mut g = self.lock();
        if g.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
            let pid = libc::pid_t::try_from(self.pid).expect("pid fits pid_t");
            // SAFETY: plain syscall; the child is not reaped (checked just
            // now, and reaping needs the lock we hold), so the pid is ours.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Waits up to `timeout` for the exit; `None` if it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit (up to [`STOP_TIMEOUT`]; after
    /// that: SIGKILL and a panic with the log tail). Returns the status.
    pub fn terminate(&self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(STOP_TIMEOUT) {
            Some(st) => st,
            None => {
                self.signal(libc::SIGKILL);
                let _ = self.wait_timeout(Duration::from_secs(5));
                panic!(
                    "vhost-user-ubd did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
        }
    }

    /// SIGKILL and wait (a crash, for tests that want one).
    pub fn kill(&self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(10))
            .expect("a SIGKILLed process exits")
    }

    fn wait_for_socket(&mut self) {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            let listening =
                std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket());
            if listening {
                return;
            }
            if let Some(st) = self.try_status() {
                panic!(
                    "{} exited ({st}) before listening; log:\n{}",
                    self.command,
                    self.log()
                );
            }
            if Instant::now() >= end {
                panic!(
                    "{}: no socket after {START_TIMEOUT:?}; log:\n{}",
                    self.command,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let mut g = self.lock();
        if let Some(mut child) = g.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        drop(g);
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "---- vhost-user-ubd log ({}), last {LOG_TAIL_LINES} lines ----\n{}\n----",
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}
