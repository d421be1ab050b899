// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The booted-guest kit of `tests/boot.rs` and `tests/boot_handover.rs`:
//! guest images (`vm-images/images.sh`), a [`Scenario`] (work dir under
//! `vm-images/cache/`, base image, COW, daemon, `run-vm.sh` command lines,
//! boot checks, `uml_moo`, base-image checks) and small host helpers.
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
