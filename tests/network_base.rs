// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A base image on a network store (issue 16, item 6): CI farms keep one
//! base for hundreds of VMs on many hosts, each host its thin COWs locally.
//! docs/fleets.md has the how-to and what was found here.
//!
//! The "storage host" is a network namespace of the test's own, reached
//! over a veth pair (addresses in 198.18.0.0/16, of the benchmarking range,
//! one /30 per test picked from the pid). In it `qemu-nbd --read-only`
//! exports the base over TCP; on the "compute host" side (the test's own
//! namespace) `nbdfuse -r` mounts the export as a read-only file, whose
//! mtime is the mount's. The daemon keeps its plain file I/O on that file.
//!
//! * `a_cow_over_an_nbd_base_serves_reads_and_writes`: the mounted file
//!   reads the base's bytes and refuses writes; `vhost-user-ubd create COW
//!   MOUNTED`; the base is mounted again (a compute host restarting), so
//!   its mtime is no longer the one in the COW header: the default
//!   `--backing-check size+mtime` refuses to serve, `--backing-check size`
//!   serves and says so; while served, the daemon's OFD read lock on the
//!   mounted file shows in /proc/locks (FUSE without a lock handler: the
//!   kernel keeps the lock, on this host only). A libblkio client reads
//!   base data through the daemon (the known pattern of
//!   `common::make_backing`), writes to the COW (sector, block, 1 MiB,
//!   last block), flushes and reads every byte of the disk back against
//!   the model. After a clean stop `uml_moo` of the COW over the mounted
//!   base equals the model, and the base on the storage host is unchanged
//!   (bytes and mtime). Then the storage host's NBD server dies under a
//!   serving daemon: a base read fails with an error (no hang, no wrong
//!   data), COW data is still served, and the daemon still stops with 0.
//! * `a_guest_boots_and_verifies_on_a_cow_over_an_nbd_base`: the booted
//!   test guest of `tests/boot.rs` (`rw`, then `verify` after a daemon
//!   restart) on a COW over the vm-images base exported by the storage
//!   host; between the two boots the base is unmounted and mounted again.
//!   Afterwards `uml_moo` of the COW is the base plus exactly the guest's
//!   writes with the md5s the guest printed, the COW holds exactly the
//!   guest's 5 MiB, and the base (sha256, mtime) is unchanged.
//!
//! Without root, `ip`, `qemu-nbd`, `nbdfuse`, `fusermount3` (packages
//! iproute2, qemu-utils, libnbd-bin, fuse3; `make deps`), /dev/fuse, or when
//! no network namespace or veth pair can be made, the tests print why and
//! pass. Missing QEMU or guest images fail the second test, as in
//! `tests/boot.rs`. Everything is undone on drop, also when a test fails:
//! the mount (`fusermount3 -u`), the NBD server, the veth pair and the
//! namespace.

mod common;
#[path = "common/boot.rs"]
mod kit;

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{
    backing_byte,
    client::{self, Client},
    daemon::{die_with_parent, DaemonBuilder},
    make_backing, stamps, BACKING_MTIME, BINARY, SECTOR,
};
use kit::{md5_of, note, pattern, secs, sigterm, Scenario, BASE_SIZE, MIB};

/// The NBD port inside the storage host's namespace.
const NBD_PORT: u16 = 10809;
/// How long the NBD server and the mount get to come up.
const UP_TIMEOUT: Duration = Duration::from_secs(15);

/// A program in `PATH` or in the sbin directories (`ip`).
fn find_tool(name: &str) -> Option<PathBuf> {
    kit::which(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("{name} disappeared"))
}

/// Why these tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some(format!(
            "not root (effective uid {euid}): the network namespace, the veth pair and the FUSE \
             mount need root"
        ));
    }
    for (name, pkg) in [
        ("ip", "iproute2"),
        ("qemu-nbd", "qemu-utils"),
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("uml_moo", "uml-utilities"),
    ] {
        if find_tool(name).is_none() {
            return Some(format!(
                "{name} is not installed: run `make deps` (apt-get install {pkg})"
            ));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse: FUSE is not available".into());
    }
    None
}

/// Runs `cmd`; `Err(output)` unless it succeeds.
fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Waits for `child` up to `limit`; true once it exited (and is reaped).
fn reaped_within(child: &mut Child, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The storage host (a network namespace with `qemu-nbd` exporting the
/// base read-only, behind a veth pair) and the compute host's `nbdfuse`
/// mount of it. Dropping it unmounts, stops the server and removes the
/// veth pair and the namespace.
struct Store {
    ns: String,
    host_if: String,
    store_ip: Ipv4Addr,
    dir: PathBuf,
    tag: u32,
    size: u64,
    server: Option<Child>,
    fuse: Option<Child>,
    /// The mount point (a directory) and the file in it.
    mnt: PathBuf,
    file: PathBuf,
    mounts: u32,
}

impl Store {
    /// Exports `base` from a new storage host and mounts it; `Err(why)`
    /// when this machine cannot make the namespace or the veth pair (a
    /// skip). Later failures panic.
    fn start(tag: u32, base: &Path, dir: &Path) -> Result<Store, String> {
        let pid = std::process::id();
        let ns = format!("vub-netbase-{pid}-{tag}");
        let host_if = format!("vnbh{pid}{tag}");
        let store_if = format!("vnbs{pid}{tag}");
        assert!(host_if.len() <= 15, "interface name {host_if} too long");
        // One /30 of 198.18.0.0/16 per (pid, tag) (bench/network_base.py
        // takes 198.19.0.0/16).
        let block = pid.wrapping_mul(4).wrapping_add(tag) % (1 << 14);
        let net = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
        let host_ip = Ipv4Addr::from(net + 1);
        let store_ip = Ipv4Addr::from(net + 2);
        try_run(Command::new(tool("ip")).args(["netns", "add", &ns]))
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        let mnt = dir.join(format!("mnt-{tag}"));
        let mut s = Store {
            ns,
            host_if,
            store_ip,
            dir: dir.to_path_buf(),
            tag,
            size: fs::metadata(base).unwrap().len(),
            server: None,
            fuse: None,
            file: mnt.join("base"),
            mnt,
            mounts: 0,
        };
        // From here on, dropping `s` undoes what was done.
        try_run(Command::new(tool("ip")).args([
            "link", "add", &s.host_if, "type", "veth", "peer", "name", &store_if,
        ]))
        .map_err(|e| format!("cannot create a veth pair: {e}"))?;
        let ns = s.ns.clone();
        let host_if = s.host_if.clone();
        for args in [
            vec!["link", "set", &store_if, "netns", &ns],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec![
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{store_ip}/30"),
                "dev",
                &store_if,
            ],
            vec!["-n", &ns, "link", "set", &store_if, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ] {
            try_run(Command::new(tool("ip")).args(&args)).unwrap_or_else(|e| panic!("{e}"));
        }
        s.start_server(base);
        s.mount();
        note(&format!(
            "[network_base] storage host: netns {} at {store_ip} (veth {host_ip} <-> {store_ip}), \
             qemu-nbd --read-only exporting {}; mounted at {}",
            s.ns,
            base.display(),
            s.file.display()
        ));
        Ok(s)
    }

    fn uri(&self) -> String {
        format!("nbd://{}:{NBD_PORT}", self.store_ip)
    }

    /// `qemu-nbd --read-only` in the storage host's namespace (`ip netns
    /// exec` execs it: the child is qemu-nbd itself); returns once it
    /// accepts TCP connections over the veth.
    fn start_server(&mut self, base: &Path) {
        let log = File::create(self.dir.join(format!("qemu-nbd-{}.log", self.tag))).unwrap();
        let mut cmd = Command::new(tool("ip"));
        cmd.args(["netns", "exec", &self.ns])
            .arg(tool("qemu-nbd"))
            .args(["--read-only", "--persistent", "--shared=8", "--format=raw"])
            .arg(format!("--bind={}", self.store_ip))
            .arg(format!("--port={NBD_PORT}"))
            .arg(base)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd, libc::SIGKILL);
        self.server = Some(cmd.spawn().expect("start qemu-nbd"));
        let addr = SocketAddr::from((self.store_ip, NBD_PORT));
        let end = Instant::now() + UP_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < end,
                "qemu-nbd does not listen on {addr} ({exited:?}):\n{}",
                kit::tail(&self.dir.join(format!("qemu-nbd-{}.log", self.tag)), 20)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The storage host's NBD server dies (SIGKILL).
    fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `nbdfuse -r MNT/base URI`; returns once the file is there with the
    /// base's size.
    fn mount(&mut self) {
        self.mounts += 1;
        fs::create_dir_all(&self.mnt).unwrap();
        let pidfile = self.dir.join(format!("nbdfuse-{}.pid", self.tag));
        let _ = fs::remove_file(&pidfile);
        let logp = self
            .dir
            .join(format!("nbdfuse-{}-{}.log", self.tag, self.mounts));
        let log = File::create(&logp).unwrap();
        let mut cmd = Command::new(tool("nbdfuse"));
        cmd.arg("-r")
            .arg("-P")
            .arg(&pidfile)
            .arg(&self.file)
            .arg(self.uri())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // nbdfuse unmounts on SIGTERM.
        die_with_parent(&mut cmd, libc::SIGTERM);
        let mut child = cmd.spawn().expect("start nbdfuse");
        let end = Instant::now() + UP_TIMEOUT;
        loop {
            let up = pidfile.exists()
                && fs::metadata(&self.file).is_ok_and(|m| m.is_file() && m.len() == self.size);
            if up {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < end,
                "nbdfuse did not mount {} ({exited:?}):\n{}",
                self.file.display(),
                kit::tail(&logp, 20)
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.fuse = Some(child);
    }

    /// `fusermount3 -u`, retried while the file is busy, then lazily; the
    /// nbdfuse process exits (or is killed).
    fn unmount(&mut self) {
        let Some(mut child) = self.fuse.take() else {
            return;
        };
        let Some(fusermount) = find_tool("fusermount3") else {
            let _ = child.kill();
            let _ = child.wait();
            return;
        };
        let quiet = |args: &[&str]| {
            Command::new(&fusermount)
                .args(args)
                .arg(&self.mnt)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let end = Instant::now() + Duration::from_secs(5);
        while !quiet(&["-u"]) {
            if Instant::now() >= end {
                let _ = quiet(&["-u", "-z"]);
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if !reaped_within(&mut child, Duration::from_secs(5)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Unmounts and mounts again (a compute host restarting): the file's
    /// mtime is the new mount's, at least a second later.
    fn remount(&mut self) {
        let before = self.mtime();
        self.unmount();
        while SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            <= before.unsigned_abs()
        {
            thread::sleep(Duration::from_millis(50));
        }
        self.mount();
    }

    fn mtime(&self) -> i64 {
        fs::metadata(&self.file).unwrap().mtime()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.unmount();
        self.kill_server();
        if let Some(ip) = find_tool("ip") {
            let quiet = |args: &[&str]| {
                let _ = Command::new(&ip)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            };
            // Deleting the namespace destroys the storage end, which takes
            // the pair with it; the host end is deleted in case it is not.
            quiet(&["netns", "del", &self.ns]);
            quiet(&["link", "del", &self.host_if]);
        }
        let _ = fs::remove_dir(&self.mnt);
    }
}

/// The OFD locks /proc/locks lists for `path` ("READ", "WRITE").
fn ofd_locks(path: &Path) -> Vec<String> {
    let m = fs::metadata(path).unwrap();
    let dev = m.dev();
    // glibc's major()/minor() of a dev_t, as /proc/locks prints them.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", m.ino());
    fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[1] == "OFDLCK" && f[5] == id).then(|| f[3].to_owned())
        })
        .collect()
}

/// `uml_moo -b COPY COW OUT`, COPY a local copy of the base carrying the
/// COW header's mtime: uml_moo compares the backing file's size and mtime
/// with the header (it has no `--backing-check`), so over a base mounted
/// again since `create` it refuses ("mtime mismatch").
fn merge_over_copy(cow: &Path, base: &Path, dir: &Path) -> Vec<u8> {
    let info = common::run(Command::new(BINARY).arg("info").arg("--json").arg(cow));
    let v: serde_json::Value = serde_json::from_str(&info).expect("info --json");
    let mtime = v["mtime"].as_u64().expect("info --json: mtime");
    let copy = dir.join("base-copy.img");
    fs::copy(base, &copy).unwrap();
    common::set_mtime(&copy, mtime);
    let out = dir.join("merged.img");
    let _ = fs::remove_file(&out);
    common::run(
        Command::new(tool("uml_moo"))
            .arg("-b")
            .arg(&copy)
            .arg(cow)
            .arg(&out),
    );
    let merged = fs::read(&out).unwrap();
    let _ = fs::remove_file(&copy);
    let _ = fs::remove_file(&out);
    merged
}

/// Reads `len` bytes at `pos` through the daemon and compares them with
/// the model.
fn expect_read(c: &mut Client, model: &[u8], pos: u64, len: usize, what: &str) {
    let mem = c.mem;
    let got = client::read_at(c.q(0), mem, 0, pos, len)
        .unwrap_or_else(|e| panic!("{what}: read {len} at {pos} failed: {e}"));
    let want = &model[pos as usize..pos as usize + len];
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: read {len} at {pos} differs from the model, first at byte {}",
            pos as usize + first
        );
    }
}

#[test]
fn a_cow_over_an_nbd_base_serves_reads_and_writes() {
    if let Some(why) = missing_prerequisite() {
        note(&format!("[network_base] skipped: {why}"));
        return;
    }
    let t0 = Instant::now();
    const BASE_LEN: u64 = 8 * MIB;
    let dir = tempfile::Builder::new()
        .prefix("vub-netbase.")
        .tempdir()
        .unwrap();
    let storage = dir.path().join("storage");
    fs::create_dir(&storage).unwrap();
    let base = storage.join("base.img");
    make_backing(&base, BASE_LEN);
    let original = fs::read(&base).unwrap();
    let mut store = match Store::start(0, &base, dir.path()) {
        Ok(s) => s,
        Err(why) => {
            note(&format!("[network_base] skipped: {why}"));
            return;
        }
    };

    // The mounted file: the base's bytes, read-only, the mount's mtime.
    let m = fs::metadata(&store.file).unwrap();
    assert_eq!(m.len(), BASE_LEN);
    assert_ne!(
        m.mtime(),
        i64::try_from(BACKING_MTIME).unwrap(),
        "nbdfuse's file has the mount's mtime, not the base's"
    );
    assert!(
        fs::read(&store.file).unwrap() == original,
        "the mounted file reads other bytes than the base"
    );
    let w = fs::OpenOptions::new().write(true).open(&store.file);
    assert!(w.is_err(), "the read-only mount opened for writing");

    let cow = dir.path().join("disk.cow");
    common::run(
        Command::new(BINARY)
            .arg("create")
            .arg(&cow)
            .arg(&store.file),
    );
    let mtime_at_create = store.mtime();

    // The compute host mounts the base again: another mtime.
    store.remount();
    assert_ne!(store.mtime(), mtime_at_create, "remount kept the mtime");
    let out = Command::new(BINARY)
        .args(["serve", "--crash-journal", "off", "--socket"])
        .arg(dir.path().join("refused.sock"))
        .arg("--cow")
        .arg(&cow)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mtime"),
        "the default --backing-check size+mtime must refuse the remounted base: {}\n{err}",
        out.status
    );
    note(&format!(
        "[network_base] default size+mtime after the remount: refused: {}",
        err.lines().next_back().unwrap_or_default()
    ));

    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, None)
        .queue_size(256)
        .args(["--backing-check", "size"])
        .spawn();
    assert!(
        d.log()
            .contains("checked for its size only (--backing-check size)"),
        "{}",
        d.log()
    );
    let locks = ofd_locks(&store.file);
    assert_eq!(
        locks,
        ["READ"],
        "the daemon's OFD read lock on the mounted base (/proc/locks)"
    );

    let mut model = original.clone();
    let nsect = BASE_LEN / SECTOR as u64;
    let mut c = client::connect_one_queue(d.socket());
    assert_eq!(c.capacity, BASE_LEN);
    // Base data, before any write: first sector, unaligned spans, the end.
    for (pos, len) in [
        (0, 512),
        (7 * 4096 + 512, 3 * 512),
        (MIB - 4096, 64 << 10),
        (BASE_LEN - 512, 512),
        (3 * MIB, MIB as usize),
    ] {
        expect_read(&mut c, &model, pos, len, "base data");
    }
    assert!(
        model[..4096]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == backing_byte(i as u64)),
        "the model is the known pattern"
    );
    // Writes into the COW: one sector inside a block, two blocks, 1 MiB,
    // the last block.
    let writes = [(1, 5, 1), (2, 2048, 16), (3, 8192, 2048), (4, nsect - 8, 8)];
    for (id, first, n) in writes {
        let data = stamps(id, first, n);
        let mem = c.mem;
        let ret = client::write_at(c.q(0), mem, 0, first * 512, &data);
        assert_eq!(ret, 0, "write {id} ({n} sectors at {first})");
        let at = (first * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    }
    assert_eq!(client::flush(c.q(0)), 0);
    // Every byte of the disk, and the writes' edges, against the model.
    for pos in (0..BASE_LEN).step_by(2 * MIB as usize) {
        expect_read(&mut c, &model, pos, 2 * MIB as usize, "whole disk");
    }
    for (pos, len) in [(0, 16 * 512), (MIB - 512, 9 * 1024), (4 * MIB - 512, 1024)] {
        expect_read(&mut c, &model, pos, len, "edges of the writes");
    }
    drop(c);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());

    // uml_moo over the mount named in the COW header refuses its mtime;
    // over a copy of the base with the header's mtime it merges.
    let out = Command::new(tool("uml_moo"))
        .arg(&cow)
        .arg(dir.path().join("refused.img"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mtime mismatch"),
        "uml_moo over the remounted base: {}\n{err}",
        out.status
    );
    let merged = merge_over_copy(&cow, &base, dir.path());
    assert!(merged == model, "uml_moo of the COW differs from the model");
    assert!(
        fs::read(&base).unwrap() == original,
        "the base on the storage host changed"
    );
    assert_eq!(
        fs::metadata(&base).unwrap().mtime(),
        i64::try_from(BACKING_MTIME).unwrap()
    );
    note("[network_base] daemon reads/writes, uml_moo merge == model, base unchanged");

    // The storage host's NBD server dies under a serving daemon.
    let d = DaemonBuilder::new(dir.path())
        .name("outage")
        .cow(&cow, None)
        .queue_size(256)
        .args(["--backing-check", "size"])
        .spawn();
    let mut c = client::connect_one_queue(d.socket());
    expect_read(&mut c, &model, 0, 4096, "before the outage");
    store.kill_server();
    let t = Instant::now();
    let mem = c.mem;
    let r = client::read_at(c.q(0), mem, 0, 6 * MIB, 4096);
    assert!(
        r.is_err(),
        "a base read after the NBD server died returned data"
    );
    note(&format!(
        "[network_base] NBD server killed: a base read fails in {} ({r:?}); daemon log: {}",
        secs(t.elapsed()),
        d.log()
            .lines()
            .rfind(|l| l.contains("WARN") || l.contains("ERROR"))
            .unwrap_or("(nothing)")
    ));
    expect_read(
        &mut c,
        &model,
        4 * MIB,
        MIB as usize,
        "COW data in the outage",
    );
    d.assert_running();
    drop(c);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());
    drop(store);
    note(&format!("[network_base] PASS in {}", secs(t0.elapsed())));
}

#[test]
fn a_guest_boots_and_verifies_on_a_cow_over_an_nbd_base() {
    if let Some(why) = missing_prerequisite() {
        note(&format!("[network_base] guest: skipped: {why}"));
        return;
    }
    let mut sc = Scenario::new("netbase");
    let dir = tempfile::Builder::new()
        .prefix("vub-netbase.")
        .tempdir()
        .unwrap();
    let mut store = match Store::start(1, &sc.base, dir.path()) {
        Ok(s) => s,
        Err(why) => {
            note(&format!("[network_base] guest: skipped: {why}"));
            return;
        }
    };
    // The scenario's COW over the local base is replaced by one over the
    // mounted export of it.
    fs::remove_file(&sc.cow).unwrap();
    common::run(
        Command::new(BINARY)
            .arg("create")
            .arg(&sc.cow)
            .arg(&store.file),
    );
    sc.serve_args = vec!["--backing-check".into(), "size".into()];
    sc.note(&format!("COW over {}", store.file.display()));

    let daemon = sc.start_daemon(1);
    let rw = sc.boot(&daemon, "rw", 1);
    assert!(rw.has("VUB: rw-ok"), "{}", rw.out);
    let f = rw.fields("VUB: rw-md5 ");
    let num = |k: &str| -> u64 {
        f.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("rw-md5 line without a numeric {k}: {f:?}"))
    };
    assert_eq!(num("size_bytes"), BASE_SIZE, "guest disk size");
    let t = sigterm(daemon);
    sc.step("SIGTERM", t);

    // The compute host mounts the base again before the second boot.
    store.remount();
    sc.note("base unmounted and mounted again (new mtime)");
    let daemon = sc.start_daemon(1);
    let verify = sc.boot(&daemon, "verify", 1);
    assert!(verify.has("VUB: verify-ok"), "{}", verify.out);
    let t = sigterm(daemon);
    sc.step("SIGTERM", t);
    sc.check_base_unchanged();

    // `check` compares size and mtime (no --backing-check), so the COW
    // over the remounted base is reported, not used: `info` for the count.
    let info = common::run(Command::new(BINARY).arg("info").arg("--json").arg(&sc.cow));
    let v: serde_json::Value = serde_json::from_str(&info).expect("info --json");
    assert_eq!(
        v["sectors_in_cow"].as_u64(),
        Some(5 * MIB / 512),
        "sectors in the COW after the guest's writes:\n{info}"
    );

    let merged = merge_over_copy(&sc.cow, &sc.base, dir.path());
    assert_eq!(merged.len() as u64, BASE_SIZE, "size of the merged image");
    let ranges = [
        ("host", 0, MIB, "HOSTPATTERN".to_owned()),
        (
            "guest",
            num("guest_offset"),
            num("guest_len"),
            format!("GUESTPATTERN-{}", sc.seed),
        ),
        (
            "tail",
            num("tail_offset"),
            num("tail_len"),
            format!("GUESTTAIL-{}", sc.seed),
        ),
    ];
    let mut writes = Vec::new();
    for (name, off, len, word) in ranges {
        let got = &merged[off as usize..(off + len) as usize];
        assert_eq!(
            Some(&md5_of(got)),
            f.get(name),
            "{name} range (offset {off}, {len} bytes) of the merged image: md5 differs from \
             the guest's"
        );
        let want = pattern(&word, len);
        assert!(got == want.as_slice(), "{name} range is not `yes {word}`");
        writes.push((off, want));
    }
    sc.check_merged(&merged, &writes[1..]);
    sc.note("merged image == base + guest writes, byte for byte");
    drop(store);
    sc.finish();
}
