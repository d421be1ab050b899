// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The booted-guest kit of `tests/boot.rs`, `tests/boot_handover.rs`,
//! `tests/boot_migration.rs` and `tests/libvirt.rs`: guest images
//! (`vm-images/images.sh`), a [`Scenario`] (work dir under
//! `vm-images/cache/`, base image, COW, daemon, `run-vm.sh` command lines,
//! boot checks, `uml_moo`, base-image checks), the checks of the guest
//! tests' results (`rw`, `reconnect`, the fio loop) and small host helpers.
//! Included with `#[path = "common/boot.rs"] mod kit;` next to `mod common;`
//! (not a module of `common`, so the other test binaries do not build it).
#![allow(dead_code)]

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write},
    os::unix::{fs::MetadataExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::common::{
    daemon::{die_with_parent, Daemon, DaemonBuilder},
    BINARY,
};

pub const MIB: u64 = 1 << 20;
/// Size of every base image (rw needs 6 MiB, reconnect 10 MiB, mq 18 MiB).
pub const BASE_SIZE: u64 = 64 * MIB;
/// Guest CPUs where one queue is enough: two TCG guests with one vCPU each
/// fit this 2-core machine better (boot time is the same as with 2).
pub const SMP_1Q: u32 = 1;
/// Host timeout of one ordinary boot (`run-vm.sh --timeout`).
pub const BOOT_TIMEOUT_S: u32 = 90;

pub fn vm_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-images")
}

/// Progress line on the real stderr (not captured by the test harness).
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// A whole number from the environment, or `default`.
pub fn env_u64(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v}: expected a whole number")),
        Err(_) => default,
    }
}

/// The guest's fio write/verify loop, `vm-images/guest/tests/fio-loop.sh`,
/// which `tests/boot_handover.rs` and `tests/boot_migration.rs` pass as
/// the fw_cfg script `opt/vub/script` (so the file runs as it is, whatever
/// initramfs is cached).
pub fn fio_loop_script() -> PathBuf {
    let p = vm_images().join("guest/tests/fio-loop.sh");
    assert!(p.is_file(), "{} missing", p.display());
    p
}

/// Rounds the fio loop has reported as verified so far on the guest
/// console `serial`.
pub fn rounds_ok(serial: &str) -> usize {
    serial
        .lines()
        .filter(|l| l.starts_with("VUB: round ") && l.contains(" ok seed="))
        .count()
}

/// Absolute path of a program found in `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Fails (never skips) when a host tool is missing.
pub fn require_tools() {
    for (tool, fix) in [
        (
            "qemu-system-x86_64",
            "`make deps` (apt-get install qemu-system-x86)",
        ),
        ("uml_moo", "`make deps` (apt-get install uml-utilities)"),
        ("busybox", "`make deps` (apt-get install busybox-static)"),
        ("sha256sum", "coreutils"),
        ("md5sum", "coreutils"),
    ] {
        assert!(
            which(tool).is_some(),
            "{tool} is not installed: the boot tests need it; run {fix}, then `make images`"
        );
    }
}

/// Guest kernel and initramfs, built (or found in the cache) once per test
/// process by `vm-images/images.sh`.
pub struct Images {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    match IMAGES.get_or_init(build_images) {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    }
}

pub fn build_images() -> Result<Images, String> {
    let t = Instant::now();
    let out = Command::new(vm_images().join("images.sh"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run vm-images/images.sh ({e}): run `make images`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "vm-images/images.sh failed ({}): the boot tests need the guest kernel and \
             initramfs; run `make deps images`\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let get = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                format!("vm-images/images.sh gave no usable {key}: run `make images`\n{stdout}")
            })
    };
    let images = Images {
        kernel: get("KERNEL=")?,
        initrd: get("INITRD=")?,
    };
    note(&format!(
        "[boot] guest images ready in {}",
        secs(t.elapsed())
    ));
    Ok(images)
}

/// Runs a command to completion; panics with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// First field of `sha256sum FILE` / `md5sum FILE`.
pub fn hash_file(tool: &str, path: &Path) -> String {
    let out = run(Command::new(tool).arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// md5 of a buffer, by the same `md5sum` the guest's busybox mirrors.
pub fn md5_of(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn md5sum");
    let mut stdin = child.stdin.take().unwrap();
    thread::scope(|s| {
        s.spawn(move || stdin.write_all(data).expect("write to md5sum"));
    });
    let out = child.wait_with_output().expect("md5sum");
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `yes WORD | head -c LEN`: the guest kit's patterns.
pub fn pattern(word: &str, len: u64) -> Vec<u8> {
    let line = format!("{word}\n");
    line.bytes().cycle().take(len as usize).collect()
}

/// A seed unique to this run, so a stale image cannot pass a second boot.
pub fn fresh_seed() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}{:03}", t.as_secs() % 1_000_000, t.subsec_millis())
}

/// Sends `signal` to `pid`, one of our children that has not been reaped.
pub fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child
    // of this process that has not been reaped yet, so it cannot be reused.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits for `child` for at most `limit`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if t.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Last `n` lines of a file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(n);
    format!(
        "--- {} (last {} lines) ---\n{}\n",
        path.display(),
        lines.len() - from,
        lines[from..].join("\n")
    )
}

/// A guest booting in the background (`run-vm.sh`): stopped if the test
/// panics (run-vm.sh forwards SIGTERM to QEMU).
pub struct Vm(pub Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = send_signal(self.0.id(), libc::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

/// SIGTERM; the daemon must drain, persist and exit 0 within 20 s.
pub fn sigterm(daemon: Daemon) -> Duration {
    let t = Instant::now();
    let st = daemon.terminate_within(Duration::from_secs(20));
    assert!(
        st.success(),
        "daemon (pid {}) exited with {st} after SIGTERM\n{}",
        daemon.pid(),
        tail(daemon.log_path(), 30)
    );
    t.elapsed()
}

/// SIGKILL, as a crash.
pub fn sigkill(daemon: Daemon) {
    let st = daemon.kill();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "daemon: {st}");
}

/// Result of one `run-vm.sh` boot.
pub struct Boot {
    pub status: ExitStatus,
    /// run-vm.sh's stdout and stderr (the `VUB:` lines and its summary).
    pub out: String,
    /// The whole guest console.
    pub serial: String,
    pub wall: Duration,
}

impl Boot {
    pub fn vub_lines(&self) -> impl Iterator<Item = &str> {
        self.serial
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| l.starts_with("VUB:"))
    }

    pub fn has(&self, prefix: &str) -> bool {
        self.vub_lines().any(|l| l.starts_with(prefix))
    }

    /// `key=value` fields of the first `VUB:` line starting with `prefix`.
    pub fn fields(&self, prefix: &str) -> HashMap<String, String> {
        let line = self
            .vub_lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in the guest console:\n{}", self.out));
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// No `VUB:` line reports a kernel I/O error (`dmesg-error`), a
    /// MISMATCH, `failed` or `error`.
    pub fn assert_no_errors(&self) {
        let bad: Vec<&str> = self
            .vub_lines()
            .filter(|l| {
                l.contains("dmesg-error")
                    || l.contains("MISMATCH")
                    || l.contains("failed")
                    || l.contains("error")
            })
            .collect();
        assert!(bad.is_empty(), "errors in the guest: {bad:#?}");
    }

    /// The result of the `reconnect` test run with `vub.iters=ITERS`:
    /// every iteration `0..iters` ok and `VUB: reconnect-done iters=ITERS
    /// bad=0`. Returns the longest iteration (its `dt=`, seconds).
    pub fn check_reconnect(&self, iters: u64) -> f64 {
        let ok: Vec<u64> = self
            .vub_lines()
            .filter_map(|l| l.strip_prefix("VUB: iter "))
            .filter(|l| l.split_whitespace().nth(1) == Some("ok"))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(
            ok,
            (0..iters).collect::<Vec<_>>(),
            "not every iteration passed:\n{}",
            self.out
        );
        let done = format!("VUB: reconnect-done iters={iters} bad=0");
        assert!(self.has(&done), "no `{done}`:\n{}", self.out);
        self.vub_lines()
            .filter_map(|l| l.split("dt=").nth(1)?.parse::<f64>().ok())
            .fold(0.0, f64::max)
    }

    /// The result of the fio loop ([`fio_loop_script`]): no error in the
    /// guest, `VUB: loop-done` with `bad=0` and as many rounds as `round R
    /// ok` lines, more than `rounds_before` (the rounds verified before the
    /// last `disturbance`, "handover" or "migration step": one must have
    /// completed after it).
    pub fn check_fio_loop(&self, rounds_before: usize, disturbance: &str) -> FioLoop {
        self.assert_no_errors();
        let done = self.fields("VUB: loop-done ");
        assert_eq!(
            done.get("bad").map(String::as_str),
            Some("0"),
            "{done:?}\n{}",
            self.out
        );
        let rounds: usize = done
            .get("rounds")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("loop-done without rounds: {done:?}"));
        assert_eq!(
            rounds,
            rounds_ok(&self.serial),
            "rounds reported against `round R ok` lines\n{}",
            self.out
        );
        assert!(
            rounds > rounds_before,
            "no guest round completed after the last {disturbance} ({rounds} rounds, all before it)"
        );
        let last_seed = done
            .get("last_seed")
            .cloned()
            .unwrap_or_else(|| panic!("loop-done without last_seed: {done:?}"));
        FioLoop {
            rounds,
            last_seed,
            done,
        }
    }
}

/// What the fio loop reported ([`Boot::check_fio_loop`]).
pub struct FioLoop {
    /// Rounds written and verified.
    pub rounds: usize,
    /// The seed of the last round (its data is on the disk).
    pub last_seed: String,
    /// The fields of `VUB: loop-done`.
    pub done: HashMap<String, String>,
}

/// The `rw` test's `VUB: rw-md5` line: where the guest wrote what, and the
/// md5s of the three ranges as the guest read them back.
pub struct RwMd5(HashMap<String, String>);

impl RwMd5 {
    /// The line of the `rw` boot `rw`, which must have passed (`VUB:
    /// rw-ok`) on a disk of `size` bytes.
    pub fn of(rw: &Boot, size: u64) -> Self {
        assert!(rw.has("VUB: rw-ok"), "{}", rw.out);
        let f = Self(rw.fields("VUB: rw-md5 "));
        assert_eq!(f.num("size_bytes"), size, "guest disk size");
        f
    }

    /// A numeric field (`guest_offset`, `tail_len`, ...).
    pub fn num(&self, k: &str) -> u64 {
        self.0
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("rw-md5 line without a numeric {k}: {:?}", self.0))
    }
}

/// One test's world: a work dir with a base image, a COW over it and the
/// daemon's socket.
pub struct Scenario {
    pub name: &'static str,
    pub dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
    pub base: PathBuf,
    pub cow: PathBuf,
    pub sock: PathBuf,
    pub base_sha: String,
    pub base_mtime: i64,
    pub seed: String,
    pub start: Instant,
    pub starts: u32,
    pub steps: Vec<(String, Duration)>,
    /// Extra `serve` arguments.
    pub serve_args: Vec<String>,
    /// Leave `--queues` out (the daemon's default).
    pub default_queues: bool,
    /// Serve the base image itself as a raw disk instead of the COW.
    pub raw: bool,
    /// Environment of every daemon (test hooks).
    pub serve_env: Vec<(String, String)>,
}

impl Scenario {
    pub fn new(name: &'static str) -> Self {
        Self::sized(name, BASE_SIZE)
    }

    /// A scenario whose base image (and so the guest's disk) is `size`.
    pub fn sized(name: &'static str, size: u64) -> Self {
        let start = Instant::now();
        require_tools();
        let images = images();
        assert!(images.kernel.is_file() && images.initrd.is_file());
        let cache = vm_images().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("boot-{name}."))
            .tempdir_in(&cache)
            .unwrap();
        // unix socket paths are limited to 107 bytes
        if dir.path().join("vub.sock").as_os_str().len() > 100 {
            dir = tempfile::Builder::new()
                .prefix(&format!("vub-boot-{name}."))
                .tempdir()
                .unwrap();
        }
        let path = dir.path().to_path_buf();
        let base = path.join("base.raw");
        let cow = path.join("disk.cow");
        let sock = path.join("vub.sock");
        run(Command::new(vm_images().join("make-base.sh"))
            .arg(&base)
            .arg(size.to_string()));
        let base_sha = hash_file("sha256sum", &base);
        let base_mtime = std::fs::metadata(&base).unwrap().mtime();
        run(Command::new(BINARY).arg("create").arg(&cow).arg(&base));
        let sc = Scenario {
            name,
            dir: Some(dir),
            path,
            base,
            cow,
            sock,
            base_sha,
            base_mtime,
            seed: fresh_seed(),
            start,
            starts: 0,
            steps: Vec::new(),
            serve_args: Vec::new(),
            default_queues: false,
            raw: false,
            serve_env: Vec::new(),
        };
        sc.note(&format!(
            "work dir {}, seed {}, setup {}",
            sc.path.display(),
            sc.seed,
            secs(start.elapsed())
        ));
        sc
    }

    pub fn note(&self, msg: &str) {
        note(&format!(
            "[boot:{} +{}] {msg}",
            self.name,
            secs(self.start.elapsed())
        ));
    }

    pub fn step(&mut self, what: &str, d: Duration) {
        self.steps.push((what.to_owned(), d));
    }

    /// Starts `serve` on the COW and waits until the socket listens (the
    /// common launcher removes a leftover socket file, after SIGKILL,
    /// first, so QEMU's reconnect attempts fail until the new daemon really
    /// listens). Every daemon of the scenario appends to `vub.log`.
    pub fn start_daemon(&mut self, queues: u32) -> Daemon {
        let t = Instant::now();
        self.starts += 1;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(self.path.join("vub.log"))
            .unwrap();
        writeln!(log, "===== start {} (queues {queues})", self.starts).unwrap();
        let b = DaemonBuilder::new(&self.path).name("vub");
        let b = if self.raw {
            b.raw(&self.base)
        } else {
            b.cow(&self.cow, None)
        };
        let b = self.serve_env.iter().fold(b, |b, (k, v)| b.env(k, v));
        let mut b = b
            .args(&self.serve_args)
            .default_rust_log("debug")
            .append_log()
            .no_deadline()
            .die_with_parent();
        if !self.default_queues {
            b = b.queues(queues as usize);
        }
        let d = b.spawn();
        assert_eq!(d.socket(), self.sock, "the socket QEMU connects to");
        self.note(&format!(
            "daemon #{} pid {} listening after {}",
            self.starts,
            d.pid(),
            secs(t.elapsed())
        ));
        d
    }

    /// The `run-vm.sh` command for one boot of guest test `test`.
    pub fn vm_cmd(&self, test: &str, queues: u32, extra: &[&str], append: &str) -> Command {
        // the mq test needs a CPU per queue; the others are fine with one
        let smp = if queues > 1 { queues } else { SMP_1Q };
        let img = images();
        let mut cmd = Command::new(vm_images().join("run-vm.sh"));
        cmd.arg("--socket")
            .arg(&self.sock)
            .arg("--test")
            .arg(test)
            .arg("--queues")
            .arg(queues.to_string())
            .arg("--smp")
            .arg(smp.to_string())
            .arg("--serial-log")
            .arg(self.serial_log(test))
            .arg("--kernel")
            .arg(&img.kernel)
            .arg("--initrd")
            .arg(&img.initrd)
            .arg("--append")
            .arg(format!("vub.seed={} {append}", self.seed))
            .args(extra)
            .stdin(Stdio::null());
        // run-vm.sh stops QEMU when it gets SIGTERM
        die_with_parent(&mut cmd, libc::SIGTERM);
        cmd
    }

    pub fn serial_log(&self, test: &str) -> PathBuf {
        self.path.join(format!("{test}.serial"))
    }

    /// One boot; panics with the console and daemon log unless it passes.
    pub fn boot(&mut self, daemon: &Daemon, test: &str, queues: u32) -> Boot {
        self.boot_with(daemon, test, queues, &[])
    }

    /// One boot with more `run-vm.sh` arguments (later ones win).
    pub fn boot_with(&mut self, daemon: &Daemon, test: &str, queues: u32, more: &[&str]) -> Boot {
        let t = Instant::now();
        let timeout = BOOT_TIMEOUT_S.to_string();
        let mut extra = vec!["--timeout", timeout.as_str()];
        extra.extend_from_slice(more);
        let mut out = self
            .vm_cmd(test, queues, &extra, "")
            .output()
            .expect("run vm-images/run-vm.sh");
        // QEMU 10's multi-threaded TCG sometimes aborts on its own
        // assertion (`iotlb_to_section: Assertion section_index <
        // d->map.sections_nb`) while the guest boots, before the guest
        // printed anything: a QEMU bug, not a finding. One retry then.
        let qemu_log = format!("{}.qemu", self.serial_log(test).display());
        let qemu_aborted = std::fs::read_to_string(&qemu_log)
            .is_ok_and(|l| l.contains("Assertion") && l.contains("failed"));
        let guest_silent = std::fs::read_to_string(self.serial_log(test))
            .map_or(true, |s| !s.contains("VUB: test-start"));
        if !out.status.success() && qemu_aborted && guest_silent {
            self.note(&format!(
                "QEMU aborted on its own assertion before the guest ran ({}); booting once more",
                tail(Path::new(&qemu_log), 1).trim()
            ));
            out = self
                .vm_cmd(test, queues, &extra, "")
                .output()
                .expect("run vm-images/run-vm.sh");
        }
        let boot = Boot {
            status: out.status,
            out: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            serial: std::fs::read_to_string(self.serial_log(test)).unwrap_or_default(),
            wall: t.elapsed(),
        };
        self.check_boot(&boot, test, Some(daemon));
        boot
    }

    pub fn check_boot(&mut self, boot: &Boot, test: &str, daemon: Option<&Daemon>) {
        let daemon_log = daemon.map(|d| tail(d.log_path(), 40)).unwrap_or_default();
        assert!(
            boot.status.success(),
            "boot `{test}` failed ({}):\n{}\n{}{daemon_log}",
            boot.status,
            boot.out,
            tail(&self.serial_log(test), 60)
        );
        let end = format!("VUB: test-end name={test} rc=0");
        assert!(boot.has(&end), "no `{end}` line:\n{}", boot.out);
        let summary = boot
            .out
            .lines()
            .rfind(|l| l.starts_with("run-vm:"))
            .unwrap_or("");
        self.note(&format!(
            "boot `{test}` passed in {} ({summary})",
            secs(boot.wall)
        ));
        self.step(&format!("boot {test}"), boot.wall);
    }

    /// `uml_moo` the COW into a new image (`merged.raw`); returns its path.
    pub fn merge(&mut self) -> PathBuf {
        let t = Instant::now();
        let out = self.path.join("merged.raw");
        let _ = std::fs::remove_file(&out);
        run(Command::new("uml_moo").arg(&self.cow).arg(&out));
        let len = std::fs::metadata(&out).unwrap().len();
        let size = std::fs::metadata(&self.base).unwrap().len();
        assert_eq!(len, size, "size of the uml_moo-merged image");
        self.step("uml_moo", t.elapsed());
        out
    }

    /// The merged image's bytes.
    pub fn merged(&mut self) -> Vec<u8> {
        let path = self.merge();
        std::fs::read(path).unwrap()
    }

    /// After the daemon stopped: `vhost-user-ubd check` accepts the COW
    /// (header, backing, no lock left) and `info --json` counts exactly
    /// `sectors` sectors in the COW (the guest's writes are 4 KiB aligned,
    /// so nothing else should be allocated).
    pub fn check_cow(&self, sectors: u64) {
        let out = run(Command::new(BINARY).arg("check").arg(&self.cow));
        self.note(&format!("vhost-user-ubd check: {}", out.trim()));
        let info = run(Command::new(BINARY)
            .arg("info")
            .arg("--json")
            .arg(&self.cow));
        let v: serde_json::Value = serde_json::from_str(&info).expect("info --json");
        assert_eq!(
            v["sectors_in_cow"].as_u64(),
            Some(sectors),
            "sectors in the COW after the guest's writes:\n{info}"
        );
        assert_eq!(v["backing"]["status"], "ok", "{info}");
    }

    /// The base image must be exactly what make-base.sh wrote.
    pub fn check_base_unchanged(&self) {
        let sha = hash_file("sha256sum", &self.base);
        assert_eq!(
            sha, self.base_sha,
            "the base image changed (sha256 {} -> {sha})",
            self.base_sha
        );
        let mtime = std::fs::metadata(&self.base).unwrap().mtime();
        assert_eq!(mtime, self.base_mtime, "the base image's mtime changed");
        self.note(&format!("base image sha256 unchanged: {sha}"));
    }

    /// After `rw` (its `rw-md5` line `rw`) and `verify`: the uml_moo-merged COW
    /// holds the host pattern and exactly the guest's writes, at the
    /// offsets and with the md5s the guest printed, byte for byte.
    pub fn check_rw_image(&mut self, rw: &RwMd5) {
        let merged = self.merged();
        let ranges = [
            ("host", 0, MIB, "HOSTPATTERN".to_owned()),
            (
                "guest",
                rw.num("guest_offset"),
                rw.num("guest_len"),
                format!("GUESTPATTERN-{}", self.seed),
            ),
            (
                "tail",
                rw.num("tail_offset"),
                rw.num("tail_len"),
                format!("GUESTTAIL-{}", self.seed),
            ),
        ];
        let mut writes = Vec::new();
        for (name, off, len, word) in ranges {
            let got = &merged[off as usize..(off + len) as usize];
            let got_md5 = md5_of(got);
            assert_eq!(
                Some(&got_md5),
                rw.0.get(name),
                "{name} range (offset {off}, {len} bytes) of the merged image: md5 differs from \
                 the guest's"
            );
            let want = pattern(&word, len);
            assert!(got == want.as_slice(), "{name} range is not `yes {word}`");
            self.note(&format!(
                "merged image: {name} range at {off} (+{len}) md5 {got_md5} matches the guest"
            ));
            writes.push((off, want));
        }
        self.check_merged(&merged, &writes[1..]);
    }

    /// Compares `merged` with the base plus `writes` (offset, bytes): the
    /// whole image, so a write landing at a wrong offset is caught too.
    pub fn check_merged(&self, merged: &[u8], writes: &[(u64, Vec<u8>)]) {
        let mut want = std::fs::read(&self.base).unwrap();
        for (off, data) in writes {
            let off = *off as usize;
            want[off..off + data.len()].copy_from_slice(data);
        }
        if merged != want.as_slice() {
            let bad: Vec<usize> = (0..want.len() / 512)
                .filter(|s| merged[s * 512..(s + 1) * 512] != want[s * 512..(s + 1) * 512])
                .collect();
            panic!(
                "merged image differs from base + guest writes in {} sectors; first sectors {:?} \
                 (byte offsets {:?})",
                bad.len(),
                &bad[..bad.len().min(8)],
                bad.iter().take(8).map(|s| s * 512).collect::<Vec<_>>()
            );
        }
    }

    /// The uml_moo-merged image at `merged_path` holds what the guest's
    /// `fio-verify` (random 4 KiB writes over the first `size` bytes, seed
    /// `seed`, pattern `FIOPATTERN-SEED`) wrote: the same fio verifies it on
    /// the host (`--verify_only`), and every block holds the pattern after
    /// fio's 44-byte header.
    pub fn check_fio_image(&mut self, merged_path: &Path, size: u64, seed: &str) {
        let word = format!("FIOPATTERN-{seed}");
        let hex: String = format!("{word}\n")
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        let t = Instant::now();
        let out = Command::new(host_fio())
            .arg("--name=v")
            .arg(format!("--filename={}", merged_path.display()))
            .args([
                "--rw=randwrite",
                "--bs=4k",
                "--ioengine=psync",
                "--verify=crc32c",
            ])
            .arg(format!("--size={}M", size / MIB))
            .arg(format!("--verify_pattern=0x{hex}"))
            .args(["--verify_only", "--verify_fatal=1", "--randrepeat=1"])
            .arg(format!("--randseed={seed}"))
            .args(["--verify_state_save=0", "--eta=never"])
            .stdin(Stdio::null())
            .output()
            .expect("run the host fio");
        assert!(
            out.status.success(),
            "host fio --verify_only of the uml_moo-merged COW failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.step("host fio verify", t.elapsed());
        let merged = std::fs::read(merged_path).unwrap();
        let want = pattern(&word, 4096);
        let bad_blocks: Vec<u64> = (0..size / 4096)
            .filter(|b| {
                let o = (*b * 4096) as usize;
                merged[o + 44..o + 4096] != want[44..]
            })
            .collect();
        assert!(
            bad_blocks.is_empty(),
            "{} blocks of the merged image do not hold the guest's pattern, first {:?}",
            bad_blocks.len(),
            &bad_blocks[..bad_blocks.len().min(8)]
        );
    }

    /// After the fio loop over the first `size` bytes: SIGTERM to `daemon`
    /// (exit 0), the base unchanged, `vhost-user-ubd check` accepts the COW
    /// (`size` bytes of it written), and its uml_moo merge holds the loop's
    /// last round (seed `last_seed`; [`Scenario::check_fio_image`]) and
    /// the base's bytes after it.
    pub fn stop_and_check_fio_loop(&mut self, daemon: Daemon, size: u64, last_seed: &str) {
        let d = sigterm(daemon);
        self.step("SIGTERM", d);
        self.check_base_unchanged();
        self.check_cow(size / 512);
        let merged_path = self.merge();
        self.check_fio_image(&merged_path, size, last_seed);
        let merged = std::fs::read(&merged_path).unwrap();
        let base = std::fs::read(&self.base).unwrap();
        assert!(
            merged[size as usize..] == base[size as usize..],
            "the merged image differs from the base after the guest's {} MiB",
            size / MIB
        );
        self.note(&format!(
            "uml_moo of the COW == the guest's last round (seed {last_seed}) + the base"
        ));
    }

    pub fn finish(mut self) {
        let total = self.start.elapsed();
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(w, d)| format!("{w} {}", secs(*d)))
            .collect();
        self.note(&format!("PASS in {} ({})", secs(total), steps.join(", ")));
        if std::env::var_os("KEEP").is_some_and(|v| v == "1") {
            if let Some(d) = self.dir.take() {
                note(&format!("[boot:{}] kept {}", self.name, d.keep().display()));
            }
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if thread::panicking() {
            if let Some(d) = self.dir.take() {
                note(&format!(
                    "[boot:{}] FAILED; work dir kept: {}",
                    self.name,
                    d.keep().display()
                ));
            }
        } else if let Some(d) = self.dir.take() {
            // images are large: remove them, keep nothing else either
            let _ = d.close();
        }
    }
}

/// The static fio the guest runs (built by images.sh), for the host check.
pub fn host_fio() -> PathBuf {
    let p = vm_images().join("cache/fio/fio");
    assert!(p.is_file(), "{} missing: run `make images`", p.display());
    p
}
