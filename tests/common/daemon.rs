// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Runs the real `vhost-user-ubd serve` binary for an integration test: the
//! one launcher of every test that needs a serving daemon.
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
//!   temporary directory: no fixed paths, no clashes between tests. A
//!   leftover socket file is removed before the start, and
//!   [`DaemonBuilder::spawn`] returns only once the socket is in the
//!   listening state (a frontend connecting then is not refused).
//!   [`DaemonBuilder::append_log`] keeps the log of an earlier daemon of
//!   the same name (a restart).
//! - The crash journal goes to `DIR/journal` unless the arguments name one
//!   (never the shared /dev/shm).
//! - `RUST_LOG` is passed through from the test's environment (default
//!   `info`, see [`DaemonBuilder::default_rust_log`]);
//!   [`DaemonBuilder::rust_log`] overrides it.
//! - A watchdog kills the daemon with SIGKILL once [`DaemonBuilder::deadline`]
//!   passes (default [`DEFAULT_DEADLINE`]; none with
//!   [`DaemonBuilder::no_deadline`]), and [`Daemon::watchdog`] arms one for
//!   a part of a test. A frontend blocked on a hung daemon then sees the
//!   socket close, so the test fails with a message instead of hanging.
//!   [`Daemon::watchdog_fired`] and [`Watchdog::fired`] tell afterwards.
//! - Dropping a [`Daemon`] that still runs kills it (SIGKILL). If the test
//!   is panicking, the tail of the daemon's log is printed to stderr.
//!   [`DaemonBuilder::die_with_parent`] also kills it when the test process
//!   dies.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use super::BINARY;

/// How long [`DaemonBuilder::spawn`] waits for the socket to listen.
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
    default_rust_log: String,
    deadline: Option<Duration>,
    append_log: bool,
    die_with_parent: bool,
    envs: Vec<(String, String)>,
    /// `serve --takeover CTL`, serving the socket of the instance behind it.
    takeover: Option<(PathBuf, PathBuf)>,
}

impl DaemonBuilder {
    /// A daemon whose socket and log live in `dir` (a test's tempdir).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name: "ubd".into(),
            args: Vec::new(),
            rust_log: None,
            default_rust_log: "info".into(),
            deadline: Some(DEFAULT_DEADLINE),
            append_log: false,
            die_with_parent: false,
            envs: Vec::new(),
            takeover: None,
        }
    }

    /// `serve --takeover CTL`: a new instance that takes the disk and the
    /// listening socket `socket` over from the daemon whose control socket
    /// is `ctl` (no `--socket`, no default `--crash-journal`: both are taken
    /// over). [`DaemonBuilder::spawn`] then returns at once, without
    /// waiting for a socket (the old instance's listens already); wait for
    /// the log line `handover: live` or the old instance's exit.
    pub fn takeover(mut self, ctl: &Path, socket: &Path) -> Self {
        self.takeover = Some((ctl.to_path_buf(), socket.to_path_buf()));
        self
    }

    /// An environment variable for the daemon (the test hooks of
    /// `engine::hooks`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
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
    /// N <= 512, see `MAX_DAEMON_QUEUE_SIZE` in `common/client.rs`.
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

    /// `RUST_LOG` for the daemon (e.g. `"debug"`), whatever the test's
    /// environment says.
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = Some(filter.into());
        self
    }

    /// `RUST_LOG` for the daemon when the test's environment has none.
    pub fn default_rust_log(mut self, filter: &str) -> Self {
        self.default_rust_log = filter.into();
        self
    }

    /// Kill the daemon (SIGKILL) this long after it was started.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// No lifetime watchdog (for runs whose length the test bounds some
    /// other way, such as a guest boot with its own timeout).
    pub fn no_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// Append to the log instead of starting it afresh (a daemon restarted
    /// under the same name keeps the earlier daemons' lines).
    pub fn append_log(mut self) -> Self {
        self.append_log = true;
        self
    }

    /// SIGKILL the daemon when the thread that spawned it dies (see
    /// [`die_with_parent`]), so an interrupted test leaves nothing behind.
    pub fn die_with_parent(mut self) -> Self {
        self.die_with_parent = true;
        self
    }

    /// Starts the daemon and waits until its socket listens; panics (with
    /// the log) if it exits first or the socket does not listen in time.
    pub fn spawn(self) -> Daemon {
        let socket = match &self.takeover {
            Some((_, s)) => s.clone(),
            None => self.dir.join(format!("{}.sock", self.name)),
        };
        let log = self.dir.join(format!("{}.log", self.name));
        if self.takeover.is_none() {
            let _ = std::fs::remove_file(&socket);
        }
        let out = File::options()
            .create(true)
            .write(true)
            .append(self.append_log)
            .truncate(!self.append_log)
            .open(&log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().expect("dup log file");
        let rust_log = self
            .rust_log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| self.default_rust_log.clone());
        let mut cmd = Command::new(BINARY);
        cmd.arg("serve");
        match &self.takeover {
            Some((ctl, _)) => cmd.arg("--takeover").arg(ctl),
            None => cmd.arg("--socket").arg(&socket),
        };
        cmd.args(&self.args);
        // The crash journal goes in the test's own directory (never the
        // shared /dev/shm), the same for every daemon of one test.
        if self.takeover.is_none() && !self.args.iter().any(|a| a == "--crash-journal") {
            let j = self.dir.join("journal");
            std::fs::create_dir_all(&j).unwrap_or_else(|e| panic!("{}: {e}", j.display()));
            cmd.arg("--crash-journal").arg(&j);
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd.env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if self.die_with_parent {
            die_with_parent(&mut cmd, libc::SIGKILL);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BINARY}: {e}"));
        let pid = child.id();
        let state = Arc::new(Mutex::new(Some(child)));
        let deadline = self.deadline.map(|d| arm(&state, pid, d));
        let d = Daemon {
            state,
            deadline,
            pid,
            socket,
            log,
            command: format!("{cmd:?}"),
        };
        if self.takeover.is_none() {
            d.wait_for_socket();
        }
        d
    }
}

/// Makes `cmd`'s process get `signal` if the thread that spawned it dies,
/// so a panicking or interrupted test leaves nothing behind.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2),
    // which is async-signal-safe, and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let sig = libc::c_ulong::try_from(signal).unwrap_or(9);
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether a unix socket bound to `path` is in the listening state
/// (`/proc/net/unix`: flag `__SO_ACCEPTCON` = 0x10000). Does not connect,
/// so the daemon sees no spurious frontend.
pub fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.as_os_str();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && OsStr::new(f[7]) == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x1_0000 != 0)
    })
}

/// A watchdog: kills the daemon (SIGKILL) when its time is up, unless it
/// was dropped first. See [`Daemon::watchdog`].
#[derive(Debug)]
pub struct Watchdog {
    /// Dropping it disconnects the watchdog thread's receiver: disarmed.
    _disarm: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    /// Whether it killed the daemon.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

/// Kills the child once `limit` passes, unless the returned guard was
/// dropped or the child reaped first. The child is only signalled while
/// the lock is held and the child is not reaped, so the pid cannot have
/// been reused by another process.
fn arm(state: &Arc<Mutex<Option<Child>>>, pid: u32, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    let fired = Arc::new(AtomicBool::new(false));
    let weak = Arc::downgrade(state);
    let f = fired.clone();
    let end = Instant::now() + limit;
    std::thread::Builder::new()
        .name(format!("watchdog-{pid}"))
        .spawn(move || loop {
            let left = end.saturating_duration_since(Instant::now());
            let wait = left.min(Duration::from_millis(100));
            if rx.recv_timeout(wait) != Err(mpsc::RecvTimeoutError::Timeout) {
                return; // disarmed
            }
            let Some(state) = weak.upgrade() else {
                return;
            };
            let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(child) = guard.as_mut() else {
                return;
            };
            if Instant::now() >= end {
                if matches!(child.try_wait(), Ok(None)) {
                    f.store(true, Ordering::SeqCst);
                    let _ = writeln!(
                        std::io::stderr(),
                        "watchdog: vhost-user-ubd (pid {pid}) still running after {limit:?}: SIGKILL"
                    );
                    let _ = child.kill();
                }
                return;
            }
        })
        .expect("spawn watchdog thread");
    Watchdog { _disarm: tx, fired }
}

/// A running (or exited) daemon.
#[derive(Debug)]
pub struct Daemon {
    /// `None` once the child has been reaped.
    state: Arc<Mutex<Option<Child>>>,
    /// The lifetime watchdog ([`DaemonBuilder::deadline`]).
    deadline: Option<Watchdog>,
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

    /// How many lines of the log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when the lifetime watchdog had to kill the daemon.
    pub fn watchdog_fired(&self) -> bool {
        self.deadline.as_ref().is_some_and(Watchdog::fired)
    }

    /// Kills the daemon (SIGKILL) unless the returned guard is dropped
    /// within `limit`: turns a hung daemon into failing frontend calls
    /// instead of a hung test (the vhost crate retries timed-out socket
    /// reads forever, so socket timeouts do not help).
    pub fn watchdog(&self, limit: Duration) -> Watchdog {
        arm(&self.state, self.pid, limit)
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

    /// CPU time (user + system, all threads) the running daemon used so
    /// far.
    pub fn cpu_time(&self) -> Duration {
        self.assert_running();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("stat");
        // Fields after the command name (which is in parentheses).
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis((f.iter().sum::<u64>()) * 1000 / hz)
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
        self.terminate_within(STOP_TIMEOUT)
    }

    /// [`Daemon::terminate`] with the exit due within `timeout`.
    pub fn terminate_within(&self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(timeout) {
            Some(st) => st,
            None => {
                self.signal(libc::SIGKILL);
                let _ = self.wait_timeout(Duration::from_secs(5));
                panic!(
                    "vhost-user-ubd (pid {}) did not exit within {timeout:?} of SIGTERM; log tail:\n{}",
                    self.pid,
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

    fn wait_for_socket(&self) {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if listening(&self.socket) {
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
                    "{}: not listening after {START_TIMEOUT:?}; log:\n{}",
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
