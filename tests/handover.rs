// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live handover (issue 13) through the real binary: an old instance A
//! (`serve --control C`) hands its disk, its listening socket and its
//! control socket over to a new instance B (`serve --takeover C`), and B
//! serves what A served. Every test checks the data against a model: the
//! flushed writes (and, for a clean handover, every completed write) read
//! back through a fresh libblkio client on B, and, offline after B stopped,
//! in the merge of the real `uml_moo` (COW) or the image itself (raw); the
//! COW's base never changes.
//!
//! - A COW and a raw disk are handed over; B holds the COW's lock after A
//!   exited.
//! - A third instance is refused while a handover is pending, and a client
//!   still connected to A afterwards gets no service from A's files.
//! - Disk arguments given to B must equal A's.
//! - kill -9 of A or of B at each of the nine steps of the protocol (test
//!   hook `VHOST_USER_UBD_TEST_HANDOVER_PAUSE`): exactly one instance is
//!   left serving every flushed byte (or, where the spec says so, B refuses
//!   and a plain `serve` on the files serves them).
//! - A write in flight when the handover starts (`..._HOLD_WRITES`) is
//!   waited for and on disk after B is live.
//! - `status` shows the handover on both sides.
//!
//! Negative controls: a run where the mechanism is off, in the same test
//! or a test of its own (a free COW passes `check` once B stopped; the
//! same arguments with changed settings are accepted where different disk
//! arguments are refused; a takeover is accepted once nothing is pending;
//! `VHOST_USER_UBD_TEST_HANDOVER_NO_DRAIN` loses the held write; a kill
//! before the suspend loses the unflushed writes the suspend persists).
//! Where a test's documentation names a mutation, it was run by hand on a
//! copy of the tree and made that test fail as described.

mod common;

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use common::{
    client::{self, Client, ReqFlags},
    daemon::{listening, Daemon, DaemonBuilder},
    handover::{handover_of, paused_at, status, wait_until, ABORTED, LIVE, PAUSE},
};

const MIB: u64 = 1 << 20;
/// Size of every disk here.
const DISK: u64 = 4 * MIB;
/// Its sectors.
const NSECT: u64 = DISK / SECTOR as u64;
/// The hook that passes the files without waiting for requests in flight.
const NO_DRAIN: &str = "VHOST_USER_UBD_TEST_HANDOVER_NO_DRAIN";
/// The hook that holds writes before they reach the kernel.
const HOLD: &str = "VHOST_USER_UBD_TEST_HOLD_WRITES";
/// How long a handover, a refusal or an exit may take.
const SOON: Duration = Duration::from_secs(20);
/// How long the kill -9 cases pause at their step.
const KILL_PAUSE_MS: u64 = 1500;

// ---------------------------------------------------------------- model --

/// The base's content of `sector` (the COW's backing, and the raw images
/// start as the same pattern).
fn base_sector(sector: u64) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    let first = sector * SECTOR as u64;
    for (i, b) in out.iter_mut().enumerate() {
        *b = backing_byte(first + i as u64);
    }
    out
}

/// What a sector holds, in words, for failure messages.
fn describe(sector: u64, data: &[u8]) -> String {
    if data == base_sector(sector) {
        return "the base's data".into();
    }
    if data.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    match stamp_of(data) {
        Some((id, s)) if s == sector => format!("write {id}"),
        Some((id, s)) => format!("write {id} of sector {s}"),
        None => format!("garbage (header {:?})", stamp_header(data)),
    }
}

/// What every sector of the disk may hold. A sector not in the map holds
/// the base's data; one entry: exactly that; several: any of them (a write
/// that completed but was never flushed, across a kill -9). A read settles
/// a sector to what it found.
#[derive(Debug, Default)]
struct Model {
    sectors: BTreeMap<u64, Vec<[u8; SECTOR]>>,
    last_id: u64,
}

impl Model {
    fn allowed(&self, s: u64) -> Vec<[u8; SECTOR]> {
        self.sectors
            .get(&s)
            .cloned()
            .unwrap_or_else(|| vec![base_sector(s)])
    }

    /// The next write's id.
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Records write `id` of `n` sectors at `sector`: it must be there from
    /// now on (`must_survive`), or it may also be lost.
    fn record(&mut self, id: u64, sector: u64, n: u64, must_survive: bool) {
        for s in sector..sector + n {
            let new = stamp(id, s);
            let v = if must_survive {
                vec![new]
            } else {
                let mut v = self.allowed(s);
                v.push(new);
                v
            };
            self.sectors.insert(s, v);
        }
    }

    /// Writes `n` sectors at `sector` through `c`, which must succeed.
    fn write(&mut self, c: &mut Client, sector: u64, n: u64, must_survive: bool) -> u64 {
        let id = self.next_id();
        let mem = c.mem;
        let ret = client::write_at(
            c.q(0),
            mem,
            0,
            sector * SECTOR as u64,
            &stamps(id, sector, n),
        );
        assert_eq!(ret, 0, "write {id} ({n} sectors at {sector}) failed");
        self.record(id, sector, n, must_survive);
        id
    }

    /// `count` writes of 1 to 64 sectors at random places; returns their
    /// `(id, sector, n)`.
    fn scatter(
        &mut self,
        c: &mut Client,
        rng: &mut Rng,
        count: usize,
        must_survive: bool,
    ) -> Vec<(u64, u64, u64)> {
        (0..count)
            .map(|_| {
                let n = rng.range(1, 64);
                let sector = rng.below(NSECT - n + 1);
                (self.write(c, sector, n, must_survive), sector, n)
            })
            .collect()
    }

    /// Compares sectors `first..` with `data`; settles what it found.
    fn compare(&mut self, first: u64, data: &[u8], bad: &mut Vec<String>) {
        for (i, got) in data.chunks_exact(SECTOR).enumerate() {
            let s = first + i as u64;
            let allowed = self.allowed(s);
            if allowed.iter().any(|a| a[..] == *got) {
                if allowed.len() > 1 {
                    let mut one = [0u8; SECTOR];
                    one.copy_from_slice(got);
                    self.sectors.insert(s, vec![one]);
                }
            } else if bad.len() < 20 {
                let want: Vec<String> = allowed.iter().map(|a| describe(s, a)).collect();
                bad.push(format!(
                    "sector {s}: {} (allowed: {})",
                    describe(s, got),
                    want.join(" or ")
                ));
            }
        }
    }

    /// Reads the whole disk through `c` and compares it with the model.
    fn check_client(&mut self, c: &mut Client, what: &str) {
        assert_eq!(c.capacity, DISK, "{what}: capacity");
        let mem = c.mem;
        let chunk = MIB as usize;
        let mut bad = Vec::new();
        for pos in (0..DISK).step_by(chunk) {
            let data = client::read_at(c.q(0), mem, 0, pos, chunk)
                .unwrap_or_else(|r| panic!("{what}: read of {chunk} bytes at {pos} failed: {r}"));
            self.compare(pos / SECTOR as u64, &data, &mut bad);
        }
        assert!(
            bad.is_empty(),
            "{what}: the disk differs from the model:\n{}",
            bad.join("\n")
        );
    }

    /// Compares a whole image (a merge, a raw file) with the model.
    fn check_bytes(&mut self, image: &[u8], what: &str) {
        assert_eq!(image.len() as u64, DISK, "{what}: length");
        let mut bad = Vec::new();
        self.compare(0, image, &mut bad);
        assert!(
            bad.is_empty(),
            "{what}: the image differs from the model:\n{}",
            bad.join("\n")
        );
    }
}

// ---------------------------------------------------------------- files --

/// One test's disk: a COW over a base (or a raw image), a control socket,
/// in a fresh temporary directory.
struct Files {
    dir: tempfile::TempDir,
    /// The COW's backing (never written), or the raw image.
    base: PathBuf,
    /// The COW; `None`: a raw disk.
    cow: Option<PathBuf>,
    /// Whether A is given `--backing` (else the COW exists already).
    backing_arg: bool,
    /// A's control socket.
    control: PathBuf,
    /// The base as written.
    base_before: Vec<u8>,
    merges: std::cell::Cell<u32>,
}

impl Files {
    fn new(cow: bool, backing_arg: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(if cow { "base.img" } else { "disk.raw" });
        make_backing(&base, DISK);
        let base_before = std::fs::read(&base).unwrap();
        let control = dir.path().join("control.sock");
        let cow = cow.then(|| dir.path().join("vm.cow"));
        Self {
            dir,
            base,
            cow,
            backing_arg,
            control,
            base_before,
            merges: std::cell::Cell::new(0),
        }
    }

    /// A COW that A creates (`serve --cow COW --backing BASE`).
    fn cow() -> Self {
        Self::new(true, true)
    }

    /// A raw image with the base pattern.
    fn raw() -> Self {
        Self::new(false, false)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn cow_path(&self) -> &Path {
        self.cow.as_deref().expect("a COW disk")
    }

    /// `serve` on the files with A's disk arguments and control socket.
    fn builder(&self, name: &str) -> DaemonBuilder {
        let b = DaemonBuilder::new(self.dir()).name(name);
        let b = match &self.cow {
            Some(cow) => b.cow(cow, self.backing_arg.then_some(self.base.as_path())),
            None => b.raw(&self.base),
        };
        b.arg("--control").arg(&self.control)
    }

    /// Starts A with the environment `envs`.
    fn a(&self, envs: &[(&str, &str)]) -> Daemon {
        self.a_with(envs, &[])
    }

    /// Starts A with the environment `envs` and more arguments `args`.
    fn a_with(&self, envs: &[(&str, &str)], args: &[&str]) -> Daemon {
        let mut b = self.builder("ubd").args(args);
        for (k, v) in envs {
            b = b.env(k, v);
        }
        b.spawn()
    }

    /// Starts `serve --takeover C` named `name` (its log `DIR/NAME.log`),
    /// with the environment `envs` and more arguments `args`.
    fn b(&self, name: &str, envs: &[(&str, &str)], args: &[&str]) -> Daemon {
        let mut b = DaemonBuilder::new(self.dir())
            .name(name)
            .takeover(&self.control, &self.socket())
            .args(args);
        for (k, v) in envs {
            b = b.env(k, v);
        }
        b.spawn()
    }

    /// The vhost-user socket (A's, which every takeover serves).
    fn socket(&self) -> PathBuf {
        self.dir().join("ubd.sock")
    }

    /// The disk as the files hold it: `uml_moo`'s merge of the COW, or the
    /// raw image.
    fn on_disk(&self) -> Vec<u8> {
        match &self.cow {
            Some(cow) => {
                let n = self.merges.get() + 1;
                self.merges.set(n);
                let out = self.dir().join(format!("merged-{n}.img"));
                let merged = uml_moo(cow, &out);
                let _ = std::fs::remove_file(&out);
                merged
            }
            None => std::fs::read(&self.base).unwrap(),
        }
    }

    /// The COW's base is byte for byte what it was, mtime included.
    fn assert_base_unchanged(&self) {
        if self.cow.is_some() {
            handover::assert_base_unchanged(&self.base, &self.base_before);
        }
    }

    /// `vhost-user-ubd check` of the COW: (usable, its output).
    fn check(&self) -> (bool, String) {
        outcome(
            Command::new(BINARY)
                .arg("check")
                .arg("--crash-journal")
                .arg(self.dir().join("journal"))
                .arg(self.cow_path()),
        )
    }
}

// --------------------------------------------------------------- control --

/// Every command on `control` (a retired A's) fails, naming B's pid.
fn assert_handed_over(control: &Path, b: &Daemon, what: &str) {
    for args in [&["status", "--json"][..], &["status"][..]] {
        let (ok, out) = control_cli(args, control);
        assert!(!ok, "{what}: {args:?} on A still succeeds: {out}");
        // The spec says "handed over to pid B"; the implementation's
        // refusal says "handed its disk over to pid B".
        let want = format!("handed its disk over to pid {}", b.pid());
        assert!(
            out.contains(&want),
            "{what}: {args:?} does not say {want:?}: {out}"
        );
    }
}

// ------------------------------------------------------------ lifecycle --

/// B says `handover: live` (once), A exits with status 0, B still runs.
fn completes(a: &Daemon, b: &Daemon) {
    assert!(
        b.wait_for_log(LIVE, SOON),
        "B (pid {}) did not say {LIVE:?} within {SOON:?}",
        b.pid()
    );
    let st = a
        .wait_timeout(SOON)
        .unwrap_or_else(|| panic!("A (pid {}) still runs {SOON:?} after B went live", a.pid()));
    assert_eq!(st.code(), Some(0), "A's exit after the handover: {st}");
    b.assert_running();
    assert_eq!(b.log_count(LIVE), 1, "B said {LIVE:?} more than once");
    assert!(
        listening(b.socket()),
        "nothing listens on {} after the handover",
        b.socket().display()
    );
}

/// A fresh client on `d`'s socket reads the whole disk against the model,
/// writes and flushes a few more extents and reads the disk again.
fn serve_check(d: &Daemon, model: &mut Model, rng: &mut Rng, what: &str) {
    // A daemon that never answers is killed: the client then fails
    // instead of hanging.
    let _wd = d.watchdog(Duration::from_secs(40));
    let mut c = client::connect_one_queue(d.socket());
    model.check_client(&mut c, &format!("{what}: first read"));
    model.scatter(&mut c, rng, 4, true);
    assert_eq!(client::flush(c.q(0)), 0, "{what}: flush");
    model.check_client(&mut c, &format!("{what}: after its writes"));
    drop(c);
    d.assert_running();
}

/// SIGTERM, exit 0; then the files hold the model and the base is
/// unchanged.
fn stop_and_check(d: &Daemon, f: &Files, model: &mut Model, what: &str) {
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "{what}: exit after SIGTERM: {st}");
    model.check_bytes(&f.on_disk(), &format!("{what}: on disk after the stop"));
    f.assert_base_unchanged();
}

/// A client of A writes `flushed` extents and flushes, then `more`
/// extents it does not flush (which must survive too when `more_survive`).
fn fill(
    d: &Daemon,
    model: &mut Model,
    rng: &mut Rng,
    flushed: usize,
    more: usize,
    more_survive: bool,
) -> Client {
    fill_unflushed(d, model, rng, flushed, more, more_survive).0
}

/// [`fill`], also returning the unflushed writes' `(id, sector, n)`.
fn fill_unflushed(
    d: &Daemon,
    model: &mut Model,
    rng: &mut Rng,
    flushed: usize,
    more: usize,
    more_survive: bool,
) -> (Client, Vec<(u64, u64, u64)>) {
    let mut c = client::connect_one_queue(d.socket());
    model.scatter(&mut c, rng, flushed, true);
    assert_eq!(client::flush(c.q(0)), 0, "flush");
    let unflushed = model.scatter(&mut c, rng, more, more_survive);
    (c, unflushed)
}

/// Of the sectors the writes `writes` (in this order) cover, how many hold
/// the last of them through a fresh client on `d`: (found, sectors).
fn writes_found(d: &Daemon, writes: &[(u64, u64, u64)]) -> (usize, usize) {
    let mut last = BTreeMap::new();
    for &(id, sector, n) in writes {
        for s in sector..sector + n {
            last.insert(s, stamp(id, s));
        }
    }
    let _wd = d.watchdog(Duration::from_secs(40));
    let mut c = client::connect_one_queue(d.socket());
    let mem = c.mem;
    let mut disk = Vec::with_capacity(DISK as usize);
    for pos in (0..DISK).step_by(MIB as usize) {
        disk.extend(
            client::read_at(c.q(0), mem, 0, pos, MIB as usize)
                .unwrap_or_else(|r| panic!("read at {pos}: {r}")),
        );
    }
    let found = last
        .iter()
        .filter(|(&s, want)| {
            let at = (s * SECTOR as u64) as usize;
            disk[at..at + SECTOR] == want[..]
        })
        .count();
    (found, last.len())
}

// ----------------------------------------------------------------- tests --

/// A COW made by `vhost-user-ubd create` is served by A; a client writes a
/// model, flushes, writes more that it never flushes (a clean handover
/// persists every completed write: A suspends with data sync, bitmap,
/// sync) and disconnects. B `--takeover` goes live, A exits 0, `status` on
/// A's control path reaches B, and B holds the COW's OFD lock although
/// every descriptor A had is closed. A new client reads the whole model
/// back through B and writes more; after B's SIGTERM, `uml_moo`'s merge
/// equals the model and the base is unchanged.
///
/// Negative control: once B stopped, `check` finds the COW usable (so its
/// "locked" while B served was the lock that travelled with the
/// descriptors). The persist at suspend is not visible here (B shares A's
/// page cache and bitmap memfd): `the_suspend_persists_...` tests it.
#[test]
fn a_cow_is_handed_over_and_the_new_instance_serves_its_data() {
    let f = Files::new(true, false);
    run(Command::new(BINARY)
        .arg("create")
        .arg(f.cow_path())
        .arg(&f.base));
    let a = f.a(&[]);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0001);
    let c = fill(&a, &mut model, &mut rng, 24, 8, true);
    drop(c);
    let h = handover_of(&f.control);
    assert_eq!(h["role"], "none", "A before any handover: {h}");
    assert_eq!(h["state"], "idle", "A before any handover: {h}");
    assert!(h["peer_pid"].is_null(), "A before any handover: {h}");
    let b = f.b("b", &[], &[]);
    completes(&a, &b);
    assert!(
        b.log().contains(&format!("{}", a.pid())),
        "B's log does not name A's pid {}",
        a.pid()
    );
    let (usable, out) = f.check();
    assert!(
        !usable && out.contains("locked"),
        "while B serves, check finds the COW unlocked: {out}"
    );
    // Without --control, B took A's control socket over: the same path
    // reaches B.
    let v = status(&f.control);
    assert_eq!(v["pid"], b.pid(), "status on A's control path: {v}");
    assert_eq!(v["disk"]["kind"], "cow", "{v}");
    assert_eq!(v["handover"]["role"], "destination", "{v}");
    assert_eq!(v["handover"]["state"], "live", "{v}");
    assert_eq!(v["handover"]["peer_pid"], a.pid(), "{v}");
    serve_check(&b, &mut model, &mut rng, "through B");
    stop_and_check(&b, &f, &mut model, "B");
    let (usable, out) = f.check();
    assert!(usable, "once B stopped, check still refuses the COW: {out}");
}

/// The same for a raw image: completed (flushed and unflushed) writes
/// through A read back through B, B's writes land, and after B's SIGTERM
/// the image file equals the model.
///
/// What is raw-specific is only the passed image descriptor, which B
/// opening the image by its path would replace unnoticed (the same file);
/// the negative controls of the handover itself are the COW tests'.
#[test]
fn a_raw_disk_is_handed_over() {
    let f = Files::raw();
    let a = f.a(&[]);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0002);
    let c = fill(&a, &mut model, &mut rng, 24, 8, true);
    drop(c);
    let b = f.b("b", &[], &[]);
    completes(&a, &b);
    let v = status(&f.control);
    assert_eq!(v["disk"]["kind"], "raw", "{v}");
    assert_eq!(v["handover"]["role"], "destination", "{v}");
    serve_check(&b, &mut model, &mut rng, "through B");
    stop_and_check(&b, &f, &mut model, "B");
}

/// While B is paused at `dst-built` (disk built from A's descriptors, the
/// commit not sent), a third instance C `--takeover` on the same control
/// socket exits non-zero at once with a message that names A's and B's
/// pids; B then finishes, A exits 0, and B alone serves the model.
///
/// Negative control: once B is live nothing is pending, and a fourth
/// instance D `--takeover` of B's control socket (A's path, taken over) is
/// accepted: B hands over like A did, and D serves the model.
#[test]
fn a_third_instance_is_refused_while_a_handover_is_pending() {
    let f = Files::cow();
    let a = f.a(&[]);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0003);
    drop(fill(&a, &mut model, &mut rng, 16, 0, true));
    let b = f.b("b", &[(PAUSE, "dst-built:8000")], &[]);
    assert!(
        b.wait_for_log(&paused_at("dst-built"), SOON),
        "B never paused at dst-built"
    );
    let c = f.b("c", &[], &[]);
    let st = c
        .wait_timeout(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("C still runs 5 s after it started: not refused at once"));
    assert!(!st.success(), "C: {st}\n{}", c.log());
    let log = c.log();
    let want = format!(
        "pid {} is handing its disk over to pid {}",
        a.pid(),
        b.pid()
    );
    assert!(
        log.contains("a handover is pending") && log.contains(&want),
        "C's message does not say {want:?}:\n{log}"
    );
    assert!(log.contains("vhost-user-ubd: "), "C's error line:\n{log}");
    assert!(
        !b.log().contains(LIVE),
        "B went live before C was refused: the test did not test a pending handover"
    );
    a.assert_running();
    b.assert_running();
    completes(&a, &b);
    assert!(c.try_status().is_some());
    serve_check(&b, &mut model, &mut rng, "through B");
    let d = f.b("d", &[], &[]);
    completes(&b, &d);
    serve_check(&d, &mut model, &mut rng, "through D");
    stop_and_check(&d, &f, &mut model, "D");
}

/// A write to A through a client still connected to A's old frontend
/// connection: submitted with a fresh id, waited for `timeout`. Returns
/// the completions seen (none: no answer), or the `do_io` error.
fn late_write(
    c: &mut Client,
    model: &mut Model,
    sector: u64,
    tag: usize,
    timeout: Duration,
) -> Result<Vec<client::Done>, client::Error> {
    let id = model.next_id();
    let data = stamps(id, sector, 8);
    let mem = c.mem;
    let off = tag * 64 * 1024;
    mem.write(off, &data);
    let p = mem.ptr(off, data.len());
    c.q(0)
        .write(sector * 512, p, data.len(), tag, ReqFlags::empty());
    client::wait(c.q(0), 1, timeout)
}

/// A client connected to A across the handover gets no service from A
/// afterwards: with B (on its own `--control C2`, so that C stays A's)
/// paused at `dst-committed`, A has released its frontend connection and
/// the disk (status on C: role source, state `released`); a write the
/// client submits then fails (an error, or no completion within 2 s). Once
/// B is live and A, retired, is paused at `src-retired`, every command on
/// C fails with `handed its disk over to pid <B>`, and another write fails
/// the same way. Neither write is ever on disk: B's view and the merge
/// after B stopped hold the model, which has no entry for them. A exits 0,
/// C disappears with it, and C2 shows B live.
///
/// Mutations: with A's release resuming the device instead of retiring
/// the disk and closing the frontend connection, late write 1 completes
/// with success (and the model checks would find it); without the retired
/// check in the control socket's answer, status on A succeeds during the
/// second pause.
#[test]
fn the_old_instance_answers_errors_after_the_handover() {
    let f = Files::cow();
    let a = f.a(&[(PAUSE, "src-retired:2500")]);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0004);
    let mut c = fill(&a, &mut model, &mut rng, 16, 0, true);
    let c2 = f.dir().join("control2.sock");
    let b = f.b(
        "b",
        &[(PAUSE, "dst-committed:2500")],
        &["--control", c2.to_str().unwrap()],
    );
    assert!(
        b.wait_for_log(&paused_at("dst-committed"), SOON),
        "B never paused at dst-committed"
    );
    let h = handover_of(&f.control);
    assert_eq!(h["role"], "source", "A once B committed: {h}");
    assert_eq!(h["state"], "released", "A once B committed: {h}");
    // The late writes go to sectors the model says hold the base's data.
    let t = Instant::now();
    let got = late_write(&mut c, &mut model, 7000, 1, Duration::from_secs(2));
    eprintln!("late write 1 (A released): {got:?} after {:?}", t.elapsed());
    assert!(
        got.as_ref().map_or(true, |d| d.iter().all(|d| d.ret != 0)),
        "a write to A after it released the frontend succeeded: {got:?}"
    );
    assert!(
        a.wait_for_log(&paused_at("src-retired"), SOON),
        "A never paused at src-retired"
    );
    assert_handed_over(&f.control, &b, "A paused at src-retired");
    let t = Instant::now();
    let got = late_write(&mut c, &mut model, 7100, 2, Duration::from_secs(1));
    eprintln!("late write 2 (A retired): {got:?} after {:?}", t.elapsed());
    assert!(
        got.as_ref().map_or(true, |d| d.iter().all(|d| d.ret != 0)),
        "a write to A after it retired succeeded: {got:?}"
    );
    assert!(
        a.is_running(),
        "A exited before its pause at src-retired ended: the test did not test a retired A"
    );
    completes(&a, &b);
    drop(c);
    assert!(
        !f.control.exists(),
        "A's control socket {} is left after A exited",
        f.control.display()
    );
    let v = status(&c2);
    assert_eq!(v["pid"], b.pid(), "{v}");
    assert_eq!(v["handover"]["role"], "destination", "{v}");
    assert_eq!(v["handover"]["state"], "live", "{v}");
    // The model has no entry for the late writes: the checks fail if one
    // landed.
    serve_check(&b, &mut model, &mut rng, "through B");
    stop_and_check(&b, &f, &mut model, "B");
}

/// B given disk arguments that differ from A's is refused with a message
/// naming the difference (`--queues 2 differs from the running instance's
/// 4`; `--readonly`; another `--cow`, which B must not create), and A goes
/// on serving: the client connected to A all along does verified I/O after
/// each refusal, and status on A shows the handover idle.
///
/// Negative control: B given the same disk arguments (`--queues 4`) with
/// changed settings (`--threads 1 --checkpoint-ms 500`) is accepted and
/// serves the model.
#[test]
fn given_disk_arguments_must_match() {
    let f = Files::cow();
    let a = f.builder("ubd").queues(4).spawn();
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0005);
    let mut c = fill(&a, &mut model, &mut rng, 8, 0, true);
    let other = f.dir().join("other.cow");
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "b-queues",
            vec!["--queues", "2"],
            "--queues 2 differs from the running instance's 4",
        ),
        ("b-readonly", vec!["--readonly"], "--readonly"),
        ("b-cow", vec!["--cow", other.to_str().unwrap()], "--cow"),
    ];
    for (name, args, want) in cases {
        let b = f.b(name, &[], &args);
        let st = b
            .wait_timeout(SOON)
            .unwrap_or_else(|| panic!("{name}: B {args:?} still runs after {SOON:?}"));
        assert!(!st.success(), "{name}: B {args:?} was accepted: {st}");
        let log = b.log();
        assert!(
            log.contains(want) && log.contains("differs"),
            "{name}: B's message does not name the difference {want:?}:\n{log}"
        );
        a.assert_running();
        let h = handover_of(&f.control);
        assert_eq!(h["state"], "idle", "{name}: A after the refusal: {h}");
        // The connected client is still served.
        model.scatter(&mut c, &mut rng, 2, true);
        assert_eq!(client::flush(c.q(0)), 0);
        model.check_client(&mut c, &format!("{name}: A after the refusal"));
    }
    assert!(!other.exists(), "a refused B created {}", other.display());
    drop(c);
    serve_check(&a, &mut model, &mut rng, "A after the refusals");
    let b = f.b(
        "b",
        &[],
        &["--queues", "4", "--threads", "1", "--checkpoint-ms", "500"],
    );
    completes(&a, &b);
    serve_check(&b, &mut model, &mut rng, "through B");
    stop_and_check(&b, &f, &mut model, "B");
}

/// With A paused at `src-passed` and B at `dst-committed`, `status` shows
/// the handover on both sides: A before (`idle`, no peer), A at
/// `src-passed` (role `source`, state `passed`, peer B; the text status
/// has a `handover:` line), B on its `--control C2` at `dst-committed`
/// (role `destination`, state `committed`, peer A) while A shows
/// `released`, and B once live (state `live`).
///
/// (Its negative control is built in: the same status calls before the
/// handover show `idle`.)
#[test]
fn status_shows_the_handover_state_on_both_sides() {
    let f = Files::cow();
    let a = f.a(&[(PAUSE, "src-passed:2500")]);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0007);
    drop(fill(&a, &mut model, &mut rng, 8, 0, true));
    let h = handover_of(&f.control);
    assert_eq!(h["state"], "idle", "A before: {h}");
    assert!(h["peer_pid"].is_null(), "A before: {h}");
    let c2 = f.dir().join("control2.sock");
    let b = f.b(
        "b",
        &[(PAUSE, "dst-committed:2500")],
        &["--control", c2.to_str().unwrap()],
    );
    assert!(
        a.wait_for_log(&paused_at("src-passed"), SOON),
        "A never paused at src-passed"
    );
    let h = handover_of(&f.control);
    assert_eq!(h["role"], "source", "A at src-passed: {h}");
    assert_eq!(h["state"], "passed", "A at src-passed: {h}");
    assert_eq!(h["peer_pid"], b.pid(), "A at src-passed: {h}");
    let (ok, text) = control_cli(&["status"], &f.control);
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("handover:"))
        .unwrap_or_else(|| panic!("no handover: line in the text status:\n{text}"));
    // The implementation's line: "handover:   passed (handing over to pid B)".
    assert!(
        line.contains("passed") && line.contains(&format!("handing over to pid {}", b.pid())),
        "A's handover line: {line}"
    );
    assert!(
        b.wait_for_log(&paused_at("dst-committed"), SOON),
        "B never paused at dst-committed"
    );
    let h = handover_of(&c2);
    assert_eq!(h["role"], "destination", "B at dst-committed: {h}");
    assert_eq!(h["state"], "committed", "B at dst-committed: {h}");
    assert_eq!(h["peer_pid"], a.pid(), "B at dst-committed: {h}");
    let h = handover_of(&f.control);
    assert_eq!(h["role"], "source", "A once B committed: {h}");
    assert_eq!(h["state"], "released", "A once B committed: {h}");
    assert_eq!(h["peer_pid"], b.pid(), "A once B committed: {h}");
    completes(&a, &b);
    let h = handover_of(&c2);
    assert_eq!(h["role"], "destination", "B live: {h}");
    assert_eq!(h["state"], "live", "B live: {h}");
    let (ok, text) = control_cli(&["status"], &c2);
    let took = format!("took over from pid {}", a.pid());
    assert!(
        ok && text
            .lines()
            .any(|l| l.starts_with("handover:") && l.contains("live") && l.contains(&took)),
        "B's text status:\n{text}"
    );
    serve_check(&b, &mut model, &mut rng, "through B");
    stop_and_check(&b, &f, &mut model, "B");
}

/// What became of a write held in A while the handover ran.
#[derive(Debug)]
struct Held {
    /// From its submission to B's `handover: live`.
    live_after: Duration,
    /// A's exit code after the handover.
    a_exit: Option<i32>,
    /// Its completion to the client connected to A (`None`: none came).
    ret: Option<i32>,
    /// Whether B served its data (and the merge after B stopped held it).
    on_disk: bool,
}

/// A's first write (16 sectors) is held 2 s before it reaches the kernel
/// (`VHOST_USER_UBD_TEST_HOLD_WRITES=1:2000`); B `--takeover` starts while
/// it is held. With `no_drain`, A runs with the hook that passes the files
/// without waiting for the requests in flight. The disk is checked through
/// B and in the merge after B stopped, against a model where the held
/// write must be there (`no_drain`: may be).
fn held_write(no_drain: bool) -> Held {
    let f = Files::cow();
    let mut envs = vec![(HOLD, "1:2000")];
    if no_drain {
        envs.push((NO_DRAIN, "1"));
    }
    let a = f.a(&envs);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0008);
    let mut c = client::connect_one_queue(a.socket());
    let (sector, n) = (1000, 16);
    let id = model.next_id();
    let data = stamps(id, sector, n);
    let mem = c.mem;
    mem.write(0, &data);
    let t = Instant::now();
    c.q(0).write(
        sector * 512,
        mem.ptr(0, data.len()),
        data.len(),
        0x4e1d,
        ReqFlags::empty(),
    );
    // Submit without waiting for the completion.
    let early = client::wait(c.q(0), 0, Duration::ZERO).unwrap();
    assert!(
        early.is_empty(),
        "the held write completed at once: {early:?}"
    );
    assert!(
        a.wait_for_log("test hook: writes held", SOON),
        "the write never reached A's hold"
    );
    let b = f.b("b", &[], &[]);
    assert!(b.wait_for_log(LIVE, SOON), "B did not go live");
    let live_after = t.elapsed();
    let a_exit = a
        .wait_timeout(SOON)
        .unwrap_or_else(|| panic!("A still runs after B went live"))
        .code();
    let done = client::wait(c.q(0), 1, Duration::from_secs(3)).unwrap_or_default();
    assert!(done.iter().all(|d| d.user_data == 0x4e1d), "{done:?}");
    let ret = done.first().map(|d| d.ret);
    drop(c);
    model.record(id, sector, n, !no_drain);
    serve_check(&b, &mut model, &mut rng, "through B");
    stop_and_check(&b, &f, &mut model, "B");
    // The model settled to what was read.
    let on_disk = model.allowed(sector) == vec![stamp(id, sector)];
    Held {
        live_after,
        a_exit,
        ret,
        on_disk,
    }
}

/// A write in flight when the handover starts is waited for: it completes
/// to the client connected to A with success, B goes live only after it
/// (2 s after its submission), and it is on disk through B and in the
/// merge after B stopped.
///
/// Negative control: `the_drain_is_what_waits_for_a_held_write`.
#[test]
fn a_write_in_flight_when_the_handover_starts_is_waited_for() {
    let h = held_write(false);
    assert_eq!(h.a_exit, Some(0), "A's exit after the handover: {h:?}");
    assert_eq!(h.ret, Some(0), "the held write's completion: {h:?}");
    assert!(
        h.live_after >= Duration::from_millis(1900),
        "B was live {:?} after the held (2 s) write was submitted: the suspend did not wait \
         for it",
        h.live_after
    );
    assert!(h.on_disk, "the held write is not on disk: {h:?}");
}

/// The negative control of the test above: with the drain turned off
/// (`VHOST_USER_UBD_TEST_HANDOVER_NO_DRAIN` on A) the same run has B live
/// before the held write could land, and the write is lost (not on disk,
/// or failed to its client) or A cannot persist it and exits non-zero: so
/// the other test's checks see the drain.
#[test]
fn the_drain_is_what_waits_for_a_held_write() {
    let h = held_write(true);
    eprintln!("without the drain: {h:?}");
    assert!(
        h.live_after < Duration::from_millis(1900),
        "B went live only after the held write, without the drain: {h:?}"
    );
    assert!(
        !h.on_disk || h.ret != Some(0) || h.a_exit != Some(0),
        "without the drain the held write still completed and landed, and A exited 0: {h:?}"
    );
}

/// B is paused at `dst-built` longer than the source waits for a step
/// (10 s): A gives the handover up and serves on. B, whose commit then
/// finds A's connection closed, must not serve too (A is alive: it did
/// not die after passing its files): B exits non-zero without saying
/// live, and A alone serves the model; its status is idle again.
///
/// This is the split brain the kill -9 cases cannot show: with B taking a
/// closed connection for A's death, B goes live beside a resumed A, both
/// serving one COW and one listening socket (seen with the first
/// implementation, where A also gave up early on an EINTR).
#[test]
fn a_destination_the_source_gave_up_on_does_not_serve() {
    let f = Files::cow();
    let a = f.a(&[]);
    let mut model = Model::default();
    let mut rng = Rng::new(0x4a11_0009);
    drop(fill(&a, &mut model, &mut rng, 8, 0, true));
    let b = f.b("b", &[(PAUSE, "dst-built:11500")], &[]);
    assert!(
        b.wait_for_log(&paused_at("dst-built"), SOON),
        "B never paused at dst-built"
    );
    assert!(
        a.wait_for_log(ABORTED, SOON),
        "A did not give up on a destination silent for 11.5 s"
    );
    let st = b
        .wait_timeout(SOON)
        .unwrap_or_else(|| panic!("B still runs after A gave the handover up"));
    assert!(
        !st.success() && !b.log().contains(LIVE),
        "B, given up on by a live A, served: {st}\n{}",
        b.log_tail(10)
    );
    a.assert_running();
    let h = handover_of(&f.control);
    assert_eq!(h["state"], "idle", "A after giving up: {h}");
    serve_check(&a, &mut model, &mut rng, "A after giving up");
    stop_and_check(&a, &f, &mut model, "A");
}

// -------------------------------------------------------- kill -9 matrix --

/// Who is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// What the spec says follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// A died before answering register: B refuses (exit != 0, "start
    /// without --takeover"); a plain `serve` on the files then serves them.
    BRefuses,
    /// B died before it said live: A resumes serving.
    AResumes,
    /// A died after register, before passing the descriptors: B opens the
    /// disk from the files with A's arguments and binds the socket itself.
    BFromFiles,
    /// A died after passing the descriptors: B goes live with them.
    BLive,
}

/// One kill -9 case. A serves a COW (created by `serve --cow --backing`);
/// a client connected to A has written and flushed a model, then written
/// more without a flush (those may be lost or not, never garbled), and
/// stays connected. B `--takeover` starts, the process paused at `step`
/// says so, `victim` is killed with -9, and `expect` must follow: exactly
/// one instance running, a fresh client reads every flushed byte from it
/// and writes, its SIGTERM exits 0, and the merge holds the model.
fn kill_at(step: &str, victim: Side, expect: Outcome) {
    kill_at_with(step, victim, expect, &[], false);
}

/// [`kill_at`] with more arguments for A (and the plain start after a
/// refusal), and the unflushed writes required to survive when
/// `unflushed_survive`. Returns how many sectors of the unflushed writes
/// the survivor served: (found, sectors).
fn kill_at_with(
    step: &str,
    victim: Side,
    expect: Outcome,
    a_args: &[&str],
    unflushed_survive: bool,
) -> (usize, usize) {
    let started = Instant::now();
    let f = Files::cow();
    let pause = format!("{step}:{KILL_PAUSE_MS}");
    let on_a = step.starts_with("src-");
    let (env_a, env_b) = if on_a {
        (vec![(PAUSE, pause.as_str())], vec![])
    } else {
        (vec![], vec![(PAUSE, pause.as_str())])
    };
    let a = f.a_with(&env_a, a_args);
    let mut model = Model::default();
    let seed = step
        .bytes()
        .fold(victim as u64, |h, c| splitmix(h ^ u64::from(c)));
    let mut rng = Rng::new(seed);
    let (old, unflushed) = fill_unflushed(&a, &mut model, &mut rng, 16, 6, unflushed_survive);
    let b = f.b("b", &env_b, &[]);
    let paused = if on_a { &a } else { &b };
    assert!(
        paused.wait_for_log(&paused_at(step), SOON),
        "{step}: the pause was never reached"
    );
    // The handover is still under way when the victim dies (a source
    // that already gave up would make every outcome trivial).
    for (who, d) in [("A", &a), ("B", &b)] {
        assert!(
            !d.log().contains(ABORTED),
            "{step}: {who} had aborted the handover before the kill:\n{}",
            d.log_tail(6)
        );
    }
    let dead = match victim {
        Side::A => &a,
        Side::B => &b,
    };
    let st = dead.kill();
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "{step}: {victim:?} had exited before the kill: {st}"
    );
    drop(old);
    let what = format!("kill -9 of {victim:?} at {step}");
    let fresh: Daemon;
    let survivor = match expect {
        Outcome::BRefuses => {
            let st = b
                .wait_timeout(SOON)
                .unwrap_or_else(|| panic!("{what}: B neither refused nor exited"));
            assert!(!st.success(), "{what}: B exited {st}");
            let log = b.log();
            assert!(
                log.contains("without --takeover"),
                "{what}: B's message does not say to start without --takeover:\n{log}"
            );
            assert!(!b.log().contains(LIVE), "{what}: B said live");
            assert!(
                !listening(&f.socket()),
                "{what}: something listens on the socket"
            );
            // What B's message advises: a plain serve on the files (with
            // A's crash journal).
            fresh = f.builder("fresh").args(a_args).spawn();
            &fresh
        }
        Outcome::AResumes => {
            assert!(
                !b.log().contains(LIVE),
                "{what}: B said live before its kill"
            );
            // A new client connects once A noticed (a client that connected
            // during the pause may still be cut off by a release A undoes).
            assert!(
                a.wait_for_log(ABORTED, SOON),
                "{what}: A never noticed B's death (no {ABORTED:?} within {SOON:?})"
            );
            a.assert_running();
            &a
        }
        Outcome::BFromFiles => {
            // The implementation's from-files start logs no "handover:
            // live" (the spec says B logs it once it serves): it says why
            // and then serves as a fresh start does.
            assert!(
                b.wait_for_log("went away before it passed its files", SOON),
                "{what}: B did not notice A's death before the files were passed"
            );
            assert!(
                wait_until(SOON, || listening(&f.socket())),
                "{what}: B does not listen on the socket"
            );
            b.assert_running();
            &b
        }
        Outcome::BLive => {
            assert!(
                b.wait_for_log(LIVE, SOON),
                "{what}: B did not go live within {SOON:?}"
            );
            b.assert_running();
            &b
        }
    };
    assert!(
        [&a, &b].iter().filter(|d| d.is_running()).count()
            == usize::from(expect != Outcome::BRefuses),
        "{what}: A running {}, B running {}",
        a.is_running(),
        b.is_running()
    );
    let found = writes_found(survivor, &unflushed);
    eprintln!(
        "{what}: {} of {} sectors of the unflushed writes survived",
        found.0, found.1
    );
    serve_check(survivor, &mut model, &mut rng, &what);
    assert!(!dead.is_running());
    // The control socket's path reaches the survivor, which tells what it
    // went through.
    let v = status(&f.control);
    assert_eq!(
        v["pid"],
        survivor.pid(),
        "{what}: status on the control socket answered by another process: {v}"
    );
    // (A B that started from the files is no destination in the
    // implementation's status.)
    let (role, state) = match expect {
        Outcome::BRefuses | Outcome::AResumes | Outcome::BFromFiles => ("none", "idle"),
        Outcome::BLive => ("destination", "live"),
    };
    assert_eq!(
        (
            v["handover"]["role"].as_str(),
            v["handover"]["state"].as_str()
        ),
        (Some(role), Some(state)),
        "{what}: {v}"
    );
    let last = if expect == Outcome::AResumes {
        // A resumed in full: a new handover goes through.
        let b2 = f.b("b2", &[], &[]);
        completes(&a, &b2);
        serve_check(&b2, &mut model, &mut rng, &format!("{what}, then B2"));
        Some(b2)
    } else {
        None
    };
    stop_and_check(last.as_ref().unwrap_or(survivor), &f, &mut model, &what);
    eprintln!("{what}: {expect:?} as expected, {:?}", started.elapsed());
    found
}

/// kill -9 at `src-registered` (A has B's register, not answered): A's
/// death makes B refuse, and a plain `serve` serves every flushed byte;
/// B's death leaves A serving (A's reply fails; A stays idle).

#[test]
fn kill9_at_src_registered() {
    kill_at("src-registered", Side::A, Outcome::BRefuses);
    kill_at("src-registered", Side::B, Outcome::AResumes);
}

/// kill -9 at `src-suspended` (drained and persisted, the descriptors not
/// sent): A's death makes B open the files and bind the socket; B's death
/// makes A resume.
///
/// Mutation: with the abort's undo not resuming the device, the fresh
/// client's first read times out.
#[test]
fn kill9_at_src_suspended() {
    kill_at("src-suspended", Side::A, Outcome::BFromFiles);
    kill_at("src-suspended", Side::B, Outcome::AResumes);
}

/// kill -9 at `src-passed` (descriptors sent, commit not read): B goes
/// live with what it got, or A resumes.
#[test]
fn kill9_at_src_passed() {
    kill_at("src-passed", Side::A, Outcome::BLive);
    kill_at("src-passed", Side::B, Outcome::AResumes);
}

/// kill -9 at `src-released` (A's frontend closed, A retired, commit not
/// answered): B goes live, or A un-retires and serves again.
///
/// Mutation: with the undo of a release not resuming the listener, the
/// fresh client's connect is reset.
#[test]
fn kill9_at_src_released() {
    kill_at("src-released", Side::A, Outcome::BLive);
    kill_at("src-released", Side::B, Outcome::AResumes);
}

/// kill -9 of A at `src-retired` (B live, A not yet exited): B serves on.
/// (B's death after it said live is no handover failure: not a case.)
#[test]
fn kill9_at_src_retired() {
    kill_at("src-retired", Side::A, Outcome::BLive);
}

/// kill -9 at `dst-registered` (B has A's register reply): A's death makes
/// B open the files with A's arguments from that reply; B's death makes A
/// resume.
#[test]
fn kill9_at_dst_registered() {
    kill_at("dst-registered", Side::A, Outcome::BFromFiles);
    kill_at("dst-registered", Side::B, Outcome::AResumes);
}

/// kill -9 at `dst-received` (B has the descriptors, its disk not built).
#[test]
fn kill9_at_dst_received() {
    kill_at("dst-received", Side::A, Outcome::BLive);
    kill_at("dst-received", Side::B, Outcome::AResumes);
}

/// kill -9 at `dst-built` (B's disk built from the descriptors, commit not
/// sent).
#[test]
fn kill9_at_dst_built() {
    kill_at("dst-built", Side::A, Outcome::BLive);
    kill_at("dst-built", Side::B, Outcome::AResumes);
}

/// kill -9 at `dst-committed` (commit answered, live not sent): B goes
/// live without A, or A, released but not told live, resumes.
#[test]
fn kill9_at_dst_committed() {
    kill_at("dst-committed", Side::A, Outcome::BLive);
    kill_at("dst-committed", Side::B, Outcome::AResumes);
}

/// A's arguments that leave the suspend's persist the only way bits reach
/// the COW file before a flush: no crash journal, no checkpoint within a
/// test's time.
const ONLY_THE_SUSPEND_PERSISTS: &[&str] = &[
    "--crash-journal",
    "off",
    "--checkpoint-ms",
    "600000",
    "--checkpoint-extents",
    "1000000",
];

/// The suspend persists (data sync, bitmap, sync) before the files are
/// passed: with no crash journal and no checkpoint, A killed at
/// `src-suspended` leaves B to open the files from disk, and every write
/// A completed, flushed or not, is there.
///
/// Negative control: `without_a_suspend_unflushed_writes_die_with_the_source`.
/// Mutation: with `disk::persist` left out of the suspend, 3 of 155
/// unflushed sectors survive and the first read fails.
#[test]
fn the_suspend_persists_completed_writes_before_the_files_are_passed() {
    let (found, total) = kill_at_with(
        "src-suspended",
        Side::A,
        Outcome::BFromFiles,
        ONLY_THE_SUSPEND_PERSISTS,
        true,
    );
    assert_eq!(found, total, "unflushed sectors that survived the suspend");
}

/// The negative control of the test above: the same, with A killed at
/// `src-registered` (before any suspend). B refuses, a plain start on the
/// files serves every flushed byte, and some unflushed writes are lost:
/// their bits died with A. So what the test above finds is the suspend's
/// persist, not the page cache or a checkpoint.
#[test]
fn without_a_suspend_unflushed_writes_die_with_the_source() {
    let (found, total) = kill_at_with(
        "src-registered",
        Side::A,
        Outcome::BRefuses,
        ONLY_THE_SUSPEND_PERSISTS,
        false,
    );
    assert!(
        found < total,
        "all {total} unflushed sectors survived a kill before the suspend: the test above \
         does not see the suspend's persist"
    );
}
