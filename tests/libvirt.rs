// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! libvirt (issue 16): a domain whose `<disk type='vhostuser'>` points at
//! the daemon's socket, defined and started by a real libvirt QEMU driver,
//! boots the test guest of `vm-images/` (TCG, `<domain type='qemu'>`).
//! docs/libvirt.md has the how-to and what was found running libvirt here.
//!
//! libvirt runs as a *session* daemon of the test's own: `virtqemud` if
//! installed, else `libvirtd` (Debian 12 ships only the latter), in the
//! foreground, with `HOME` and `XDG_RUNTIME_DIR`/`XDG_CONFIG_HOME`/
//! `XDG_CACHE_HOME` in a new temporary directory, reached with
//! `virsh -c qemu+unix:///session?socket=...`. No systemd is needed, and
//! libvirt writes nothing outside that directory. libvirtd run as root is the
//! privileged (system) daemon, which needs the libvirt-qemu user, /run/libvirt
//! and /etc/libvirt; so as root the session daemon, every virsh and so QEMU
//! run as uid/gid 65534 (nobody, `setpriv`). The vhost-user daemon runs as
//! the test's user; its socket is made connectable by anyone (mode 0666)
//! in a directory QEMU can reach, and the kernel and initramfs are copied
//! there too. `qemu.conf` says `stdio_handler = "file"`, so no virtlogd is
//! spawned.
//!
//! * `a_libvirt_domain_boots_the_guest_from_the_daemons_socket`: the
//!   README's libvirt XML is accepted by `virsh define`; a domain with
//!   shared memfd memory and the vhostuser disk (1 queue, `<reconnect
//!   enabled='yes' timeout='1'/>`), serial console to a file, boots `rw`;
//!   the daemon stops with SIGTERM (exit 0), a new one serves the same
//!   COW, the same domain boots `verify`; `vhost-user-ubd check`, the COW
//!   holds exactly the guest's 5 MiB, `uml_moo` of the COW is the base plus
//!   the guest's writes with the md5s the guest printed, base unchanged.
//! * `a_libvirt_guest_keeps_its_disk_across_a_live_upgrade`: the guest's
//!   `reconnect` loop (write 1 MiB, fsync, read back) runs while the host
//!   hands the daemon over to a new instance (`serve --takeover`): the old
//!   one exits 0, QEMU reconnects (libvirt's whole-second reconnect) and
//!   every iteration passes; the stall is printed; the merged COW holds
//!   every iteration's write.
//! * `the_libvirt_xml_of_the_docs_is_valid`: every `xml` code block of the
//!   README's "### libvirt", docs/live-upgrade.md and docs/libvirt.md,
//!   completed into a domain where it is a fragment, passes
//!   `virt-xml-validate FILE domain` (libvirt's RNG schema); a disk with
//!   `queues='two'` must not (negative control).
//!
//! Without virsh, a libvirt daemon or its QEMU driver (packages
//! libvirt-clients, libvirt-daemon, libvirt-daemon-driver-qemu), or for the
//! last test virt-xml-validate's xmllint (libxml2-utils), the tests print
//! why and pass. Missing QEMU or guest images fail, as in `tests/boot.rs`.
//! Work dirs are removed on success and kept (and printed) on failure.

mod common;
#[path = "common/boot.rs"]
mod kit;

use std::{
    fs::{self, File},
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::daemon::{die_with_parent, listening, Daemon, DaemonBuilder};
use kit::{
    note, pattern, secs, send_signal, sigterm, tail, wait_timeout, which, Boot, RwMd5, Scenario,
    BASE_SIZE, BOOT_TIMEOUT_S, MIB,
};

/// The unprivileged user the session daemon runs as when the test is root.
const NOBODY: u32 = 65534;
/// How long the libvirt daemon may take to listen.
const LIBVIRT_START: Duration = Duration::from_secs(30);
/// How long one virsh command may take.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take after its result to power off.
const SHUTOFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Iterations of the guest's reconnect loop in the live-upgrade test, and
/// the one after which the daemon is handed over.
const UPGRADE_ITERS: u64 = 12;
const UPGRADE_AFTER: u64 = 3;

/// Prints why a test does not run (it then passes).
fn skip(test: &str, why: &str) {
    note(&format!("[libvirt] {test}: skipped: {why}"));
}

/// A program in `PATH` or in the sbin directories (not in a user's `PATH`).
fn find_program(name: &str) -> Option<PathBuf> {
    which(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What running libvirt takes.
#[derive(Clone, Debug)]
struct Tools {
    virsh: PathBuf,
    /// virtqemud or libvirtd.
    daemon: PathBuf,
    /// The daemon's socket in `$XDG_RUNTIME_DIR/libvirt/`.
    socket_name: &'static str,
    /// `setpriv`, to run libvirt as [`NOBODY`] when the test is root.
    setpriv: Option<PathBuf>,
}

/// The libvirt tools, or why they are not there.
fn libvirt_tools() -> Result<Tools, String> {
    let virsh =
        find_program("virsh").ok_or("virsh is not installed (apt-get install libvirt-clients)")?;
    let (daemon, socket_name) = if let Some(d) = find_program("virtqemud") {
        (d, "virtqemud-sock")
    } else if let Some(d) = find_program("libvirtd") {
        (d, "libvirt-sock")
    } else {
        return Err(
            "neither virtqemud nor libvirtd is installed (apt-get install \
                    libvirt-daemon libvirt-daemon-driver-qemu)"
                .into(),
        );
    };
    if !qemu_driver_installed() {
        return Err(
            "libvirt's QEMU driver is not installed (apt-get install libvirt-daemon-driver-qemu)"
                .into(),
        );
    }
    let setpriv = if is_root() {
        Some(find_program("setpriv").ok_or(
            "the test runs as root, and setpriv (util-linux), needed to run the libvirt \
             session daemon as nobody, is missing",
        )?)
    } else {
        None
    };
    Ok(Tools {
        virsh,
        daemon,
        socket_name,
        setpriv,
    })
}

/// Whether `libvirt_driver_qemu.so` is in one of libvirt's module dirs.
fn qemu_driver_installed() -> bool {
    let mut dirs = vec![PathBuf::from("/usr/lib64/libvirt/connection-driver")];
    if let Ok(rd) = fs::read_dir("/usr/lib") {
        dirs.extend(
            rd.flatten()
                .map(|e| e.path().join("libvirt/connection-driver")),
        );
    }
    dirs.push(PathBuf::from("/usr/lib/libvirt/connection-driver"));
    dirs.iter()
        .any(|d| d.join("libvirt_driver_qemu.so").is_file())
}

/// `&`, `<`, `>`, `'` and `"` as XML entities.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn xml_path(p: &Path) -> String {
    xml_escape(&p.display().to_string())
}

/// One guest boot's domain.
struct DomainSpec<'a> {
    name: &'a str,
    kernel: &'a Path,
    initrd: &'a Path,
    cmdline: &'a str,
    socket: &'a Path,
    queues: u32,
    serial: &'a Path,
}

/// The test guest's domain: TCG, 512 MiB of shared memfd memory (which
/// vhost-user needs), the vhostuser disk as in the README, the console to
/// a file, and nothing else. `<acpi/>`: without it libvirt 9.0 passes
/// `-no-acpi`, which QEMU 9+ no longer has.
fn domain_xml(d: &DomainSpec) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='{queues}'/>
      <source type='unix' path='{socket}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        name = xml_escape(d.name),
        kernel = xml_path(d.kernel),
        initrd = xml_path(d.initrd),
        cmdline = xml_escape(d.cmdline),
        queues = d.queues,
        socket = xml_path(d.socket),
        serial = xml_path(d.serial),
    )
}

/// A libvirt session daemon of the test's own, in a temporary directory:
/// `run/` (`XDG_RUNTIME_DIR`), `config/`, `cache/` (QEMU's log is
/// `cache/libvirt/qemu/log/NAME.log`), `home/`, `out/` (serial consoles),
/// `disk/` (the vhost-user daemon's socket, log and crash journal), the
/// guest's kernel and initramfs, and the domain XML files.
struct Session {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    tools: Tools,
    /// The domain this session defines.
    domain: String,
    child: Option<Child>,
    uri: String,
    kernel: PathBuf,
    initrd: PathBuf,
    start: Instant,
}

impl Session {
    fn start(tools: Tools, domain: &str) -> Self {
        let start = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("vub-lv.")
            .tempdir()
            .expect("temporary directory");
        let path = dir.path().to_path_buf();
        for sub in ["run", "config/libvirt", "cache", "home", "out", "disk"] {
            fs::create_dir_all(path.join(sub)).unwrap();
        }
        fs::set_permissions(path.join("run"), fs::Permissions::from_mode(0o700)).unwrap();
        // QEMU's stdout/stderr straight to a file: no virtlogd to spawn
        // (and to stop afterwards).
        fs::write(
            path.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )
        .unwrap();
        let images = kit::images();
        let kernel = path.join("vmlinuz");
        let initrd = path.join("initrd.cpio.gz");
        fs::copy(&images.kernel, &kernel).unwrap();
        fs::copy(&images.initrd, &initrd).unwrap();
        if tools.setpriv.is_some() {
            // Everything but disk/ (the vhost-user daemon's, which runs as
            // the test's user) belongs to nobody; disk/ is 0755 and its
            // socket 0666, so QEMU can reach and connect to it.
            for p in [
                "",
                "run",
                "config",
                "config/libvirt",
                "config/libvirt/qemu.conf",
                "cache",
                "home",
                "out",
            ] {
                std::os::unix::fs::chown(path.join(p), Some(NOBODY), Some(NOBODY)).unwrap();
            }
            fs::set_permissions(path.join("disk"), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let socket = path.join("run/libvirt").join(tools.socket_name);
        let uri = format!("qemu+unix:///session?socket={}", socket.display());
        let mut s = Session {
            dir: Some(dir),
            path,
            tools,
            domain: domain.to_owned(),
            child: None,
            uri,
            kernel,
            initrd,
            start,
        };
        let log = File::create(s.path.join("libvirtd.log")).unwrap();
        let mut cmd = s.command(&s.tools.daemon.clone());
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        if s.tools.setpriv.is_none() {
            die_with_parent(&mut cmd, libc::SIGTERM);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", s.tools.daemon.display()));
        s.child = Some(child);
        let t = Instant::now();
        while !listening(&socket) {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited ({st}) before it listened on {}\n{}",
                    s.tools.daemon.display(),
                    socket.display(),
                    tail(&s.path.join("libvirtd.log"), 40)
                );
            }
            assert!(
                t.elapsed() < LIBVIRT_START,
                "{} does not listen on {} after {LIBVIRT_START:?}\n{}",
                s.tools.daemon.display(),
                socket.display(),
                tail(&s.path.join("libvirtd.log"), 40)
            );
            thread::sleep(Duration::from_millis(20));
        }
        let version = s.virsh_ok(&["version"]);
        s.note(&format!(
            "{} (pid {}) listening after {}, {}; {}",
            s.tools.daemon.display(),
            s.child.as_ref().unwrap().id(),
            secs(t.elapsed()),
            if s.tools.setpriv.is_some() {
                "as uid 65534"
            } else {
                "as the test's user"
            },
            version
                .lines()
                .filter(|l| l.contains("libvirt") || l.contains("hypervisor"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s
    }

    fn note(&self, msg: &str) {
        note(&format!(
            "[libvirt:{} +{}] {msg}",
            self.domain,
            secs(self.start.elapsed())
        ));
    }

    /// `prog` with the session's environment, as nobody when root.
    fn command(&self, prog: &Path) -> Command {
        let mut cmd = match &self.tools.setpriv {
            Some(sp) => {
                let mut c = Command::new(sp);
                c.arg(format!("--reuid={NOBODY}"))
                    .arg(format!("--regid={NOBODY}"))
                    .arg("--clear-groups")
                    // setuid clears a parent-death signal set before exec
                    .args(["--pdeathsig", "TERM"])
                    .arg(prog);
                c
            }
            None => Command::new(prog),
        };
        cmd.env("HOME", self.path.join("home"))
            .env("XDG_RUNTIME_DIR", self.path.join("run"))
            .env("XDG_CONFIG_HOME", self.path.join("config"))
            .env("XDG_CACHE_HOME", self.path.join("cache"))
            .env_remove("LIBVIRT_DEFAULT_URI")
            .env_remove("VIRSH_DEFAULT_CONNECT_URI")
            .current_dir(&self.path)
            .stdin(Stdio::null());
        cmd
    }

    /// `virsh -q -c URI ARGS...`, at most [`VIRSH_TIMEOUT`]: its stdout,
    /// or its stdout and stderr as the error.
    fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = self.path.join("virsh.out");
        let err = self.path.join("virsh.err");
        let mut cmd = self.command(&self.tools.virsh);
        cmd.arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run virsh: {e}"))?;
        let st = wait_timeout(&mut child, VIRSH_TIMEOUT);
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let stdout = fs::read_to_string(&out).unwrap_or_default();
        let stderr = fs::read_to_string(&err).unwrap_or_default();
        match st {
            Some(st) if st.success() => Ok(stdout),
            Some(st) => Err(format!("virsh {args:?} failed ({st}): {stdout}{stderr}")),
            None => Err(format!(
                "virsh {args:?} still running after {VIRSH_TIMEOUT:?}: {stdout}{stderr}"
            )),
        }
    }

    fn virsh_ok(&self, args: &[&str]) -> String {
        self.virsh(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn qemu_log(&self) -> PathBuf {
        self.path
            .join("cache/libvirt/qemu/log")
            .join(format!("{}.log", self.domain))
    }

    /// The tails of QEMU's and the libvirt daemon's logs.
    fn logs(&self) -> String {
        format!(
            "{}{}",
            tail(&self.qemu_log(), 15),
            tail(&self.path.join("libvirtd.log"), 15)
        )
    }

    fn disk_dir(&self) -> PathBuf {
        self.path.join("disk")
    }

    fn domstate(&self) -> String {
        self.virsh(&["domstate", &self.domain])
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Defines the domain for one boot of guest test `test` and starts it.
    fn start_guest(&self, sc: &Scenario, d: &Daemon, test: &str, append: &str) -> Started {
        let serial = self.path.join("out").join(format!("{test}.serial"));
        let _ = fs::remove_file(&serial);
        let cmdline = format!(
            "console=ttyS0 panic=-1 quiet vub.test={test} vub.queues=1 vub.seed={} {append}",
            sc.seed
        );
        let xml = domain_xml(&DomainSpec {
            name: &self.domain,
            kernel: &self.kernel,
            initrd: &self.initrd,
            cmdline: cmdline.trim_end(),
            socket: d.socket(),
            queues: 1,
            serial: &serial,
        });
        let file = self.path.join(format!("{}-{test}.xml", self.domain));
        fs::write(&file, xml).unwrap();
        if let Some(err) = validate(&file) {
            panic!("the test's own domain XML is not valid: {err}");
        }
        let t = Instant::now();
        let file_s = file.display().to_string();
        self.virsh_ok(&["define", &file_s]);
        let defined = t.elapsed();
        self.virsh(&["start", &self.domain])
            .unwrap_or_else(|e| panic!("{e}\n{}{}", self.logs(), tail(d.log_path(), 20)));
        let started = t.elapsed();
        self.note(&format!(
            "domain `{}` ({test}) defined in {}, `virsh start` returned after {}",
            self.domain,
            secs(defined),
            secs(started - defined)
        ));
        Started {
            test: test.to_owned(),
            serial,
            t: Instant::now(),
            start: started - defined,
        }
    }

    /// Waits for `VUB: test-end` on the guest's console, then for the
    /// domain to shut off (the guest powers off; `on_poweroff` destroy),
    /// `virsh destroy` if it does not, and undefines it. Panics with the
    /// logs if the guest does not finish in time or fails.
    fn finish_guest(&self, st: Started, daemon: &Daemon) -> LvBoot {
        let limit = Duration::from_secs(u64::from(BOOT_TIMEOUT_S));
        let mut last_state = Instant::now();
        let fail = |why: &str| -> ! {
            panic!(
                "libvirt boot `{}`: {why}\n{}{}{}",
                st.test,
                tail(&st.serial, 40),
                self.logs(),
                tail(daemon.log_path(), 30)
            )
        };
        let result = loop {
            let serial = fs::read_to_string(&st.serial).unwrap_or_default();
            if serial.contains("VUB: test-end") {
                break st.t.elapsed();
            }
            if st.t.elapsed() > limit {
                fail(&format!("no `VUB: test-end` after {limit:?}"));
            }
            if last_state.elapsed() > Duration::from_secs(1) {
                last_state = Instant::now();
                let state = self.domstate();
                if state == "shut off" || state == "crashed" {
                    let serial = fs::read_to_string(&st.serial).unwrap_or_default();
                    if !serial.contains("VUB: test-end") {
                        let aborted = fs::read_to_string(self.qemu_log())
                            .is_ok_and(|l| l.contains("Assertion") && l.contains("failed"));
                        if aborted && !serial.contains("VUB: test-start") {
                            let _ = self.virsh(&["undefine", &self.domain]);
                            return LvBoot::QemuAborted;
                        }
                        fail(&format!("the domain is {state} without a result"));
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        };
        let mut destroyed = false;
        let shutoff = loop {
            if self.domstate() == "shut off" {
                break st.t.elapsed();
            }
            if st.t.elapsed() > result + SHUTOFF_TIMEOUT {
                self.virsh_ok(&["destroy", &self.domain]);
                destroyed = true;
                break st.t.elapsed();
            }
            thread::sleep(Duration::from_millis(100));
        };
        self.virsh_ok(&["undefine", &self.domain]);
        let serial = fs::read_to_string(&st.serial).unwrap_or_default();
        let vub: Vec<&str> = serial
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| l.starts_with("VUB:"))
            .collect();
        // judged as run-vm.sh judges a boot
        let end = format!("VUB: test-end name={} rc=0", st.test);
        let pass = vub.iter().any(|l| {
            l.starts_with(&end) && matches!(l.as_bytes().get(end.len()), None | Some(b' '))
        }) && !vub
            .iter()
            .any(|l| l.contains("MISMATCH") || l.contains("failed") || l.contains("error"));
        if !pass {
            fail("the guest test failed");
        }
        let summary = format!(
            "run-vm: libvirt test={} result=pass start={} result_after={} shutoff_after={}{}",
            st.test,
            secs(st.start),
            secs(result),
            secs(shutoff),
            if destroyed { " (virsh destroy)" } else { "" }
        );
        LvBoot::Done(Boot {
            status: ExitStatus::from_raw(0),
            out: format!("{}\n{summary}\n", vub.join("\n")),
            serial,
            wall: st.start + result,
        })
    }

    /// One boot of `test`; once more if QEMU aborted on its own TCG
    /// assertion before the guest ran (see `Scenario::boot_with`).
    fn boot(&self, sc: &mut Scenario, daemon: &Daemon, test: &str, append: &str) -> Boot {
        for attempt in 0..2 {
            let st = self.start_guest(sc, daemon, test, append);
            match self.finish_guest(st, daemon) {
                LvBoot::Done(boot) => {
                    sc.check_boot(&boot, test, Some(daemon));
                    return boot;
                }
                LvBoot::QemuAborted if attempt == 0 => self.note(&format!(
                    "QEMU aborted on its own assertion before the guest ran ({}); booting \
                     once more",
                    tail(&self.qemu_log(), 1).trim()
                )),
                LvBoot::QemuAborted => panic!("QEMU aborted twice\n{}", self.logs()),
            }
        }
        unreachable!()
    }
}

/// A guest started by [`Session::start_guest`].
struct Started {
    test: String,
    serial: PathBuf,
    /// When `virsh start` returned.
    t: Instant,
    /// How long `virsh start` took.
    start: Duration,
}

enum LvBoot {
    Done(Boot),
    /// QEMU's TCG assertion before the guest printed anything.
    QemuAborted,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let state = self.domstate();
                if state == "running" || state == "paused" {
                    let _ = self.virsh(&["destroy", &self.domain]);
                }
                let _ = self.virsh(&["undefine", &self.domain]);
                let _ = send_signal(child.id(), libc::SIGTERM);
                if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        self.kill_leftover_qemu();
        if let Some(d) = self.dir.take() {
            if thread::panicking() || std::env::var_os("KEEP").is_some_and(|v| v == "1") {
                note(&format!(
                    "[libvirt:{}] work dir kept: {}",
                    self.domain,
                    d.keep().display()
                ));
            } else {
                let _ = d.close();
            }
        }
    }
}

impl Session {
    /// A QEMU of this session still running once the libvirt daemon is
    /// gone (libvirt leaves domains running when it stops): SIGKILL, if the
    /// pid in libvirt's pid file is a QEMU whose command line names this
    /// session's directory.
    fn kill_leftover_qemu(&self) {
        let pidfile = self
            .path
            .join("run/libvirt/qemu/run")
            .join(format!("{}.pid", self.domain));
        let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        else {
            return;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline);
        if ours.contains("qemu-system") && ours.contains(&self.path.display().to_string()) {
            note(&format!(
                "[libvirt:{}] QEMU pid {pid} outlived libvirt: SIGKILL",
                self.domain
            ));
            // SAFETY: kill(2) has no memory-safety preconditions; the pid
            // was checked just above to be this session's QEMU.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Starts `serve` on the scenario's COW with its socket in the session's
/// `disk/` directory, and lets QEMU (another user when the test is root)
/// connect to it.
fn start_daemon(sc: &mut Scenario, lv: &Session) -> Daemon {
    let t = Instant::now();
    sc.starts += 1;
    let d = DaemonBuilder::new(&lv.disk_dir())
        .name("vub")
        .cow(&sc.cow, None)
        .args(&sc.serve_args)
        .queues(1)
        .default_rust_log("debug")
        .append_log()
        .no_deadline()
        .die_with_parent()
        .spawn();
    fs::set_permissions(d.socket(), fs::Permissions::from_mode(0o666)).unwrap();
    sc.note(&format!(
        "daemon #{} pid {} listening on {} after {}",
        sc.starts,
        d.pid(),
        d.socket().display(),
        secs(t.elapsed())
    ));
    d
}

/// `virt-xml-validate FILE domain`: `None` if valid, else its output.
fn validate(file: &Path) -> Option<String> {
    let validator = find_program("virt-xml-validate")?;
    find_program("xmllint")?;
    let out = Command::new(validator)
        .arg(file)
        .arg("domain")
        .stdin(Stdio::null())
        .output()
        .expect("run virt-xml-validate");
    if out.status.success() {
        None
    } else {
        Some(format!(
            "virt-xml-validate {} domain ({}): {}{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The ```xml blocks of a markdown file, or of one section of it (from
/// the heading line `section` to the next heading of the same level).
fn xml_blocks(markdown: &str, section: Option<&str>) -> Vec<String> {
    let mut lines: Vec<&str> = markdown.lines().collect();
    if let Some(heading) = section {
        let level = heading.split(' ').next().unwrap_or("#");
        let start = lines
            .iter()
            .position(|l| l.trim_end() == heading)
            .unwrap_or_else(|| panic!("no `{heading}` heading"));
        let end = lines[start + 1..]
            .iter()
            .position(|l| {
                l.split(' ').next().is_some_and(|h| {
                    h.len() <= level.len() && !h.is_empty() && h.chars().all(|c| c == '#')
                })
            })
            .map_or(lines.len(), |i| start + 1 + i);
        lines = lines[start..end].to_vec();
    }
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for l in lines {
        match &mut cur {
            None if l.trim() == "```xml" => cur = Some(Vec::new()),
            Some(b) if l.trim() == "```" => {
                blocks.push(b.join("\n"));
                cur = None;
            }
            Some(b) => b.push(l),
            None => {}
        }
    }
    blocks
}

/// A complete domain around an XML fragment of the docs: a `<domain>` as
/// it is; else the lines before a `...` line are domain elements and the
/// rest devices (the README's shape), or all devices without a `...`.
fn complete_domain(block: &str, name: &str) -> String {
    if block.trim_start().starts_with("<domain") {
        return block.to_owned();
    }
    let lines: Vec<&str> = block.lines().collect();
    let (top, devices) = match lines.iter().position(|l| l.trim() == "...") {
        Some(i) => (lines[..i].join("\n"), lines[i + 1..].join("\n")),
        None => (String::new(), block.to_owned()),
    };
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
{top}
  <devices>
{devices}
  </devices>
</domain>
"
    )
}

/// The docs' libvirt XML blocks, each as a complete domain: (where, XML).
fn docs_domains() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for (file, section) in [
        ("README.md", Some("### libvirt")),
        ("docs/live-upgrade.md", Some("## libvirt")),
        ("docs/libvirt.md", None),
    ] {
        let text = fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let blocks = xml_blocks(&text, section);
        assert!(
            !blocks.is_empty(),
            "{file}{}: no ```xml block",
            section.map(|s| format!(" `{s}`")).unwrap_or_default()
        );
        for (i, b) in blocks.iter().enumerate() {
            let name = format!("doc-{}-{i}", file.replace(['/', '.'], "-"));
            out.push((format!("{file} block {}", i + 1), complete_domain(b, &name)));
        }
    }
    out
}

#[test]
fn the_libvirt_xml_of_the_docs_is_valid() {
    const TEST: &str = "the_libvirt_xml_of_the_docs_is_valid";
    let Some(validator) = find_program("virt-xml-validate") else {
        return skip(
            TEST,
            "virt-xml-validate is not installed (apt-get install libvirt-clients)",
        );
    };
    if find_program("xmllint").is_none() {
        return skip(
            TEST,
            "xmllint, which virt-xml-validate runs, is not installed (apt-get install \
             libxml2-utils)",
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("vub-lv-xml.")
        .tempdir()
        .unwrap();
    let domains = docs_domains();
    for (i, (what, xml)) in domains.iter().enumerate() {
        let file = dir.path().join(format!("{i}.xml"));
        fs::write(&file, xml).unwrap();
        if let Some(err) = validate(&file) {
            panic!("{what} is not a valid libvirt domain:\n{xml}\n{err}");
        }
    }
    // Negative control: the validator does check the vhostuser disk.
    let bad = complete_domain(
        "<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw' queues='two'/>
  <source type='unix' path='/run/vm1.sock'/>
  <target dev='vda' bus='virtio'/>
</disk>",
        "bad",
    );
    let file = dir.path().join("bad.xml");
    fs::write(&file, bad).unwrap();
    assert!(
        validate(&file).is_some(),
        "{} accepted queues='two': the check above proves nothing",
        validator.display()
    );
    note(&format!(
        "[libvirt] {} libvirt XML blocks of README.md, docs/live-upgrade.md and \
         docs/libvirt.md validate with {}; queues='two' does not",
        domains.len(),
        validator.display()
    ));
}

/// The README's XML (a domain around it) is accepted by libvirt's QEMU
/// driver, which checks more than the schema (shared memory for a
/// vhostuser disk, for one); defined and undefined again.
fn define_readme_domain(lv: &Session) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = xml_blocks(&readme, Some("### libvirt"));
    let xml = complete_domain(&blocks[0], &lv.domain);
    let file = lv.path.join("readme.xml");
    fs::write(&file, &xml).unwrap();
    let file_s = file.display().to_string();
    lv.virsh(&["define", &file_s])
        .unwrap_or_else(|e| panic!("libvirt refuses the README's XML:\n{xml}\n{e}"));
    lv.virsh_ok(&["undefine", &lv.domain]);
    lv.note("`virsh define` accepts the README's libvirt XML (in a domain)");
}

#[test]
fn a_libvirt_domain_boots_the_guest_from_the_daemons_socket() {
    const TEST: &str = "a_libvirt_domain_boots_the_guest_from_the_daemons_socket";
    let tools = match libvirt_tools() {
        Ok(t) => t,
        Err(why) => return skip(TEST, &why),
    };
    let mut sc = Scenario::new("libvirt");
    let lv = Session::start(tools, "vub-lv-rw");
    define_readme_domain(&lv);
    let daemon = start_daemon(&mut sc, &lv);
    let rw = RwMd5::of(&lv.boot(&mut sc, &daemon, "rw", ""), BASE_SIZE);
    let d = sigterm(daemon);
    sc.note(&format!(
        "daemon stopped with SIGTERM (exit 0) in {}",
        secs(d)
    ));
    sc.step("SIGTERM", d);

    let daemon = start_daemon(&mut sc, &lv);
    let verify = lv.boot(&mut sc, &daemon, "verify", "");
    assert!(verify.has("VUB: verify-ok"), "{}", verify.out);
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();
    sc.check_cow(5 * MIB / 512);

    // As in tests/boot.rs: the merged image holds the host pattern and
    // exactly the guest's writes, with the md5s the guest printed.
    sc.check_rw_image(&rw);
    sc.note("uml_moo of the COW == base + the guest's writes (md5s as the guest printed)");
    drop(lv);
    sc.finish();
}

#[test]
fn a_libvirt_guest_keeps_its_disk_across_a_live_upgrade() {
    const TEST: &str = "a_libvirt_guest_keeps_its_disk_across_a_live_upgrade";
    let tools = match libvirt_tools() {
        Ok(t) => t,
        Err(why) => return skip(TEST, &why),
    };
    let mut sc = Scenario::new("libvirt-upgrade");
    let lv = Session::start(tools, "vub-lv-upgrade");
    let ctl = lv.disk_dir().join("vub.ctl");
    sc.serve_args = vec!["--control".into(), ctl.display().to_string()];
    let old = start_daemon(&mut sc, &lv);
    let append = format!("vub.iters={UPGRADE_ITERS} vub.sleep=0.2");
    let st = lv.start_guest(&sc, &old, "reconnect", &append);

    // After a few iterations: `serve --takeover`.
    let want = format!("VUB: iter {UPGRADE_AFTER} ok");
    let deadline = Instant::now() + Duration::from_secs(u64::from(BOOT_TIMEOUT_S));
    while !fs::read_to_string(&st.serial)
        .unwrap_or_default()
        .contains(&want)
    {
        assert!(
            Instant::now() < deadline,
            "no `{want}` on the guest's console\n{}{}",
            tail(&st.serial, 30),
            lv.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let new = DaemonBuilder::new(&lv.disk_dir())
        .name("vub-2")
        .takeover(&ctl, old.socket())
        .default_rust_log("debug")
        .no_deadline()
        .die_with_parent()
        .spawn();
    let context = || {
        format!(
            "{}{}{}{}",
            tail(old.log_path(), 30),
            tail(new.log_path(), 30),
            tail(&st.serial, 20),
            lv.logs()
        )
    };
    assert!(
        new.wait_for_log("handover: live", Duration::from_secs(30)),
        "the new instance is not live\n{}",
        context()
    );
    let live = t.elapsed();
    let status = old
        .wait_timeout(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the old instance still runs\n{}", context()));
    assert_eq!(
        status.code(),
        Some(0),
        "the old instance: {status}\n{}",
        context()
    );
    assert!(
        new.wait_for_log("frontend connected", Duration::from_secs(15)),
        "QEMU did not reconnect to the new instance\n{}",
        context()
    );
    let connected = t.elapsed();
    sc.note(&format!(
        "handover: new instance live after {}, QEMU reconnected after {}",
        secs(live),
        secs(connected)
    ));

    let boot = match lv.finish_guest(st, &new) {
        LvBoot::Done(b) => b,
        LvBoot::QemuAborted => panic!("QEMU aborted during the reconnect loop\n{}", lv.logs()),
    };
    sc.check_boot(&boot, "reconnect", Some(&new));
    let max_dt = boot.check_reconnect(UPGRADE_ITERS);
    sc.note(&format!(
        "{UPGRADE_ITERS}/{UPGRADE_ITERS} iterations ok across the handover; longest \
         iteration {max_dt:.2}s (libvirt's reconnect timeout is whole seconds)"
    ));
    sc.step("SIGTERM", sigterm(new));
    sc.check_base_unchanged();
    sc.check_cow(UPGRADE_ITERS * MIB / 512);
    let merged = sc.merged();
    let writes: Vec<(u64, Vec<u8>)> = (0..UPGRADE_ITERS)
        .map(|i| ((8 + i) * MIB, pattern(&format!("ITER{i}-{}", sc.seed), MIB)))
        .collect();
    sc.check_merged(&merged, &writes);
    sc.note("uml_moo of the COW == base + every iteration's write");
    drop(lv);
    sc.finish();
}
