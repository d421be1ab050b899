// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Block jobs (flatten, point-in-time export, cancel) and copy-up of COW
//! sectors larger than 512 bytes, through the real binary while a libblkio
//! client does verified random I/O on four queues (`common::load`: every
//! queue has its own 64 KiB stripes of the disk, so every read must equal
//! the model exactly).
//!
//! - flatten under load: the CLI exits 0, every read during and after it
//!   equals the model, writes landed in chunks before, in and after the one
//!   being copied and some waited at the gate; afterwards `info` says the
//!   COW no longer reads its backing, `uml_moo` gives the model's disk, and
//!   with the backing replaced by zeros (same size and mtime) every read is
//!   unchanged.
//! - flatten killed with -9 mid-way (load running): a daemon restarted on
//!   the COW (crash journal) serves every completed write, and a flatten
//!   started again completes copying only what the first one had not dealt
//!   with; the result is as above.
//! - export under load: OUT is the disk at the start instant (the load
//!   paused, the model snapshotted, the export started, the load resumed
//!   the moment the start reply arrives), byte for byte; and the same with
//!   the CLI. `cancel` of a running export removes OUT, the guest goes on.
//! - copy-up: four queues write four different 512-byte pieces of each of
//!   64 cold 4 KiB COW sectors at once while a fifth reads them: every
//!   read shows the base where nobody wrote (never zeros), `copy_ups` is
//!   64 (one copy per sector), a full-sector write copies nothing, and
//!   `uml_moo` agrees.
//! - refusals: a second job while one runs, a takeover while a job runs,
//!   jobs on a raw disk, an export over an existing file without --force,
//!   a relative export path.
//!
//! Negative controls (`VHOST_USER_UBD_TEST_GATE_OFF`, read by the daemon):
//! `flatten` (the copy lands over guest writes: reads see the base where a
//! completed write belongs), `export` (OUT gets data written after the
//! start instant), `copy-up` (the rest of a partly written COW sector
//! reads as zeros). Each asserts that the model mismatch shows.
//!
//! Known bug, test ignored until it is fixed:
//! `an_export_excludes_writes_submitted_after_its_start_reply` (the start
//! reply is sent before the job's thread takes the start instant, so
//! writes submitted right after the reply can land in the image). The
//! export tests above therefore resume the load at the logged start
//! instant, not at the reply.
//!
//! `JOBS_SEED` changes every seed.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use common::{
    client::{self, Client, ClientConfig, Errno, ReqFlags, IO_TIMEOUT},
    control_cli,
    daemon::{Daemon, DaemonBuilder},
    handover::{assert_base_unchanged, wait_until},
    load::{
        control, job_of, read_disk, status_of, wait_job_end, Follower, Load, LoadOptions, Model,
    },
    make_backing, run, set_mtime, stamp, uml_moo, BACKING_MTIME, BINARY, SECTOR,
};
use vhost_user_ubd::disk::cow::jobs::CHUNK_BYTES;

const MIB: u64 = 1 << 20;
/// The disk of the job tests: 32 chunks, so that a job at a few MB/s
/// overlaps the load for a second or two.
const DISK: u64 = 32 * MIB;
/// 512-byte sectors per job chunk.
const CHUNK_SECTORS: u64 = CHUNK_BYTES / SECTOR as u64;
/// Queues the daemon offers (the load uses 4, the copy-up test 5).
const QUEUES: usize = 5;
/// The test hook that switches a gate mechanism off.
const GATE_OFF: &str = "VHOST_USER_UBD_TEST_GATE_OFF";
/// How long a job may take here, at most.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the load runs before and after a job.
const AROUND: Duration = Duration::from_millis(300);

/// A seed, changed by `JOBS_SEED`.
fn seed(default: u64) -> u64 {
    match std::env::var("JOBS_SEED") {
        Ok(v) => v.parse::<u64>().expect("JOBS_SEED is a number") ^ default,
        Err(_) => default,
    }
}

/// Runs `f`, printing how long it took (the file must stay fast).
fn timed<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("[jobs] {name}: {:.2} s", t.elapsed().as_secs_f64());
    r
}

// ----------------------------------------------------------------- files --

/// One test's COW over a base, and a control socket, in a fresh directory.
struct Disk {
    dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
    control: PathBuf,
    base_bytes: Vec<u8>,
}

impl Disk {
    /// A base of `size` bytes (the `backing_byte` pattern) and a COW of
    /// `sectorsize`-byte COW sectors over it (`vhost-user-ubd create`).
    fn new(size: u64, sectorsize: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        make_backing(&base, size);
        let cow = dir.path().join("vm.cow");
        run(Command::new(BINARY)
            .arg("create")
            .arg("--sectorsize")
            .arg(sectorsize.to_string())
            .arg(&cow)
            .arg(&base));
        let control = dir.path().join("control.sock");
        let base_bytes = std::fs::read(&base).unwrap();
        Self {
            dir,
            base,
            cow,
            control,
            base_bytes,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `serve --cow COW --control CTL` named `name`, with `envs`.
    fn serve(&self, name: &str, envs: &[(&str, &str)]) -> Daemon {
        let mut b = DaemonBuilder::new(self.dir())
            .name(name)
            .cow(&self.cow, None)
            .queues(QUEUES)
            .queue_size(256)
            .arg("--control")
            .arg(&self.control);
        for (k, v) in envs {
            b = b.env(k, v);
        }
        b.spawn()
    }

    /// A fresh model of this disk.
    fn model(&self) -> Arc<Model> {
        Arc::new(Model::new(self.base_bytes.clone()))
    }
}

/// The load of these tests on `d`, with `hot_pct` and `seed`.
fn start_load(d: &Daemon, model: &Arc<Model>, hot_pct: u64, seed: u64) -> Load {
    let opts = load_options(hot_pct, seed);
    Load::start(opts.connect(d.socket()), model.clone(), opts)
}

fn load_options(hot_pct: u64, seed: u64) -> LoadOptions {
    LoadOptions {
        hot_pct,
        seed,
        ..LoadOptions::default()
    }
}

/// Where a stopped load's client may read (past every queue's buffers).
fn spare() -> usize {
    LoadOptions::default().spare_off()
}

/// The last JSON line of a job command's `--output json`.
fn last_json(out: &str) -> Value {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Stops the daemon with SIGTERM; it must exit 0.
fn terminate(d: &Daemon) {
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "exit status; log:\n{}", d.log_tail(30));
}

/// Asserts `bad` (from `read_disk`, `diff_image`) is empty.
/// Every read of the load equalled the model.
fn assert_load_clean(what: &str, report: &common::load::Report) {
    assert!(
        report.mismatches.is_empty(),
        "{what}: the load saw {} sectors differ from the model (and failures):\n{}",
        report.mismatched_sectors,
        report.mismatches.join("\n")
    );
}

fn assert_same(what: &str, bad: &(Vec<String>, usize)) {
    assert!(
        bad.0.is_empty(),
        "{what}: {} sectors differ from the model, the first:\n{}",
        bad.1,
        bad.0.join("\n")
    );
}

// --------------------------------------------------------------- flatten --

/// What a flatten run under load saw.
struct FlattenRun {
    job: Value,
    report: common::load::Report,
    writes_held: u64,
    disk_bad: (Vec<String>, usize),
}

/// Serves `disk` (with `envs`), runs the load (with `hot_pct` of it
/// chasing the job's next chunks) around `flatten --rate RATE` through the
/// CLI, stops the load and reads the whole disk back. Leaves the daemon
/// stopped (SIGTERM, exit 0).
fn flatten_under_load(
    disk: &Disk,
    model: &Arc<Model>,
    envs: &[(&str, &str)],
    rate_mb: &str,
    seed: u64,
) -> FlattenRun {
    let d = disk.serve("ubd", envs);
    let load = start_load(&d, model, 60, seed);
    thread::sleep(AROUND);
    let follower = Follower::start(&disk.control, &load, CHUNK_SECTORS, true);
    let (ok, out) = control_cli(
        &["flatten", "--rate", rate_mb, "--output", "json"],
        &disk.control,
    );
    drop(follower);
    assert!(ok, "flatten failed:\n{out}\nlog:\n{}", d.log_tail(20));
    let job = last_json(&out);
    let writes = load.writes();
    thread::sleep(AROUND);
    assert!(
        load.writes() > writes,
        "no write completed after the flatten: the gate stayed closed?"
    );
    let (mut c, report) = load.stop();
    let writes_held = u(&status_of(&disk.control)["stats"]["writes_held"]);
    let disk_bad = read_disk(&mut c, spare(), model, "after the flatten");
    drop(c);
    terminate(&d);
    FlattenRun {
        job,
        report,
        writes_held,
        disk_bad,
    }
}

/// After a completed flatten, with the daemon stopped: the COW no longer
/// reads its backing, `uml_moo` gives the model's disk, the base is
/// unchanged, and with the base replaced by zeros of the same size and
/// mtime a new daemon serves the model's disk.
fn assert_cow_stands_alone(disk: &Disk, model: &Arc<Model>) {
    let info: Value = serde_json::from_str(&run(Command::new(BINARY)
        .args(["info", "--json"])
        .arg(&disk.cow)))
    .unwrap();
    assert_eq!(
        info["reads_backing"], false,
        "info after the flatten: {info}"
    );
    assert_eq!(
        info["bits_set"], info["geometry"]["nsect"],
        "every bit set: {info}"
    );
    let ids = model.ids();
    let merged = uml_moo(&disk.cow, &disk.dir().join("merged.img"));
    assert_eq!(merged.len() as u64, model.bytes(), "uml_moo output length");
    assert_same("uml_moo of the COW", &model.diff_image(&merged, &ids));
    assert_base_unchanged(&disk.base, &disk.base_bytes);

    std::fs::write(&disk.base, vec![0u8; disk.base_bytes.len()]).unwrap();
    set_mtime(&disk.base, BACKING_MTIME);
    let d = disk.serve("zeros", &[]);
    let mut c = LoadOptions::default().connect(d.socket());
    assert_same(
        "served over a base of zeros",
        &read_disk(&mut c, 0, model, "over zeros"),
    );
    drop(c);
    terminate(&d);
}

/// The flatten of a COW while four queues read and write it: every read
/// equals the model during and after the job, writes went into chunks
/// already copied, the one being copied and ones not copied yet, some
/// waited at the gate, and the COW stands alone afterwards.
#[test]
fn flatten_under_load_leaves_a_cow_that_no_longer_needs_its_backing() {
    timed("flatten_under_load", || {
        let disk = Disk::new(DISK, 512);
        let model = disk.model();
        let r = flatten_under_load(&disk, &model, &[], "16", seed(0xF1A7));
        eprintln!("[jobs]   flatten under load: {:?}, job {}", r.report, r.job);
        assert_load_clean("the load", &r.report);
        assert_eq!(r.job["state"], "completed", "{}", r.job);
        assert_eq!(u(&r.job["bytes_done"]), DISK, "{}", r.job);
        assert_eq!(u(&r.job["bytes_total"]), DISK, "{}", r.job);
        assert!(
            u(&r.job["bytes_copied"]) < DISK,
            "the sectors the guest wrote first need no copy: {}",
            r.job
        );
        assert!(
            r.report.before > 0 && r.report.during > 0 && r.report.after > 0,
            "writes before/in/after the chunk being copied: {:?}",
            r.report
        );
        assert!(
            r.writes_held + u(&r.job["writes_waited"]) > 0,
            "no write was parked on a chunk being copied, and the job never waited for one \
             (writes_held {}, {}): the gate was not exercised",
            r.writes_held,
            r.job
        );
        assert_same("the disk after the flatten", &r.disk_bad);
        assert_cow_stands_alone(&disk, &model);
    });
}

/// A flatten of a COW of 4096-byte COW sectors under the same load: the
/// load's writes are mostly partial COW sectors, so copy-ups run in the
/// chunks the job copies (one gate for both).
#[test]
fn flatten_of_a_cow_with_4096_byte_sectors_under_load_copies_up_and_stands_alone() {
    timed("flatten_4096_under_load", || {
        let disk = Disk::new(DISK, 4096);
        let model = disk.model();
        let r = flatten_under_load(&disk, &model, &[], "16", seed(0xF4C0));
        eprintln!(
            "[jobs]   flatten 4096 under load: {:?}, job {}",
            r.report, r.job
        );
        assert_load_clean("the load", &r.report);
        assert_eq!(r.job["state"], "completed", "{}", r.job);
        assert_same("the disk after the flatten", &r.disk_bad);
        assert_cow_stands_alone(&disk, &model);
    });
}

/// kill -9 of the daemon in the middle of a flatten, with the load
/// running; a daemon restarted on the COW serves every completed write (the
/// crash journal), and a flatten started again completes, copying nothing
/// of what the first one had dealt with.
#[test]
fn a_flatten_killed_mid_way_goes_on_where_it_stopped() {
    timed("flatten_kill_9", || {
        let disk = Disk::new(DISK, 512);
        let model = disk.model();
        let d = disk.serve("ubd", &[]);
        let load = start_load(&d, &model, 0, seed(0x4B11));
        thread::sleep(AROUND);
        let (ok, out) = control_cli(&["flatten", "--detach", "--rate", "8"], &disk.control);
        assert!(ok, "flatten --detach: {out}");
        assert!(
            wait_until(JOB_TIMEOUT, || {
                u(&job_of(&disk.control)["bytes_done"]) >= DISK * 2 / 5
            }),
            "the flatten does not get to 40%"
        );
        let job = job_of(&disk.control);
        let done = u(&job["bytes_done"]);
        assert!(
            job["state"] == "running" && (DISK / 10..=DISK * 9 / 10).contains(&done),
            "killed between 10% and 90%: {job}"
        );
        let (c, first) = load.abandon();
        d.kill();
        drop(c);
        assert!(
            first.mismatches.is_empty(),
            "before the kill:\n{}",
            first.mismatches.join("\n")
        );

        let d = disk.serve("restarted", &[]);
        assert!(job_of(&disk.control).is_null(), "a new daemon has no job");
        let mut c = LoadOptions::default().connect(d.socket());
        assert_same(
            "after the kill -9 and the restart",
            &read_disk(&mut c, spare(), &model, "after the restart"),
        );
        let opts = load_options(0, seed(0x4B12));
        let load = Load::start(c, model.clone(), opts);
        thread::sleep(AROUND / 2);
        let (ok, out) = control_cli(&["flatten", "--output", "json"], &disk.control);
        assert!(ok, "the second flatten: {out}");
        let second = last_json(&out);
        thread::sleep(AROUND / 2);
        let (mut c, report) = load.stop();
        eprintln!(
            "[jobs]   killed at {done} bytes done; second flatten {second}; load {first:?} then \
             {report:?}"
        );
        assert_eq!(second["state"], "completed", "{second}");
        assert!(
            u(&second["bytes_copied"]) <= DISK - done,
            "the second flatten copied {} bytes: more than the {} the first had not dealt with \
             (it copied again what the first copied)",
            u(&second["bytes_copied"]),
            DISK - done
        );
        assert_load_clean("during the second flatten", &report);
        assert_same(
            "after the second flatten",
            &read_disk(&mut c, spare(), &model, "after the second flatten"),
        );
        drop(c);
        terminate(&d);
        assert_cow_stands_alone(&disk, &model);
    });
}

/// Negative control: with the flatten's gate off (its copy neither holds
/// its chunk nor waits for the guest's writes into it) the same run loses
/// guest writes under the copy: a read finds the base's data where a
/// completed write belongs. So the test above can fail.
#[test]
fn negative_control_a_flatten_without_its_gate_loses_guest_writes() {
    timed("negative_control_flatten", || {
        const ROUNDS: u64 = 3;
        let mut seen = Vec::new();
        for round in 0..ROUNDS {
            let disk = Disk::new(DISK, 512);
            let model = disk.model();
            let r = flatten_under_load(
                &disk,
                &model,
                &[(GATE_OFF, "flatten")],
                "16",
                seed(0x0FF0 + round),
            );
            let lost = r.report.mismatched_sectors as usize + r.disk_bad.1;
            eprintln!(
                "[jobs]   gate off, round {round}: {lost} sectors differ ({} seen by the load, \
                 {} at the end); {:?}",
                r.report.mismatched_sectors, r.disk_bad.1, r.report
            );
            seen.push(lost);
            if lost > 0 {
                break;
            }
        }
        assert!(
            seen.iter().any(|&n| n > 0),
            "with VHOST_USER_UBD_TEST_GATE_OFF=flatten no guest write was lost in {ROUNDS} \
             rounds ({seen:?}): the flatten test cannot fail"
        );
    });
}

// ---------------------------------------------------------------- export --

/// Starts an export to `out` (at most `rate` bytes/s, 0: no limit) through
/// the raw control socket between a pause and a resume of `load`:
/// returns the model's write ids at the start and the start reply.
fn start_export_paused(
    control_path: &Path,
    load: &Load,
    out: &Path,
    rate: u64,
) -> (Vec<u64>, Value) {
    load.pause();
    let ids = load.model().ids();
    let reply = control(
        control_path,
        &json!({"v": 1, "cmd": "export", "path": out, "rate": rate}),
    );
    // The contract: writes submitted after the reply are not in the image.
    load.resume();
    (ids, reply)
}

/// What an export under load saw.
struct ExportRun {
    job: Value,
    report: common::load::Report,
    /// The image's sectors that differ from the snapshot (described).
    diff: (Vec<String>, usize),
    image_len: u64,
    disk_bad: (Vec<String>, usize),
}

/// Serves `disk` (with `envs`) and runs the load around an export started
/// at a paused instant; stops the load and reads the disk back. Returns
/// the daemon, still running, and what was seen.
fn export_under_load(
    disk: &Disk,
    model: &Arc<Model>,
    envs: &[(&str, &str)],
    seed: u64,
) -> (Daemon, ExportRun) {
    let d = disk.serve("ubd", envs);
    let load = start_load(&d, model, 80, seed);
    thread::sleep(AROUND);
    let out = disk.dir().join("export.img");
    let (ids, reply) = start_export_paused(&disk.control, &load, &out, 16_000_000);
    let follower = Follower::start(&disk.control, &load, CHUNK_SECTORS, true);
    assert_eq!(reply["ok"], true, "export: {reply}");
    assert_eq!(reply["job"]["kind"], "export", "{reply}");
    assert_eq!(
        reply["job"]["target"].as_str(),
        out.to_str(),
        "the job's target: {reply}"
    );
    let job = wait_job_end(&disk.control, JOB_TIMEOUT);
    drop(follower);
    thread::sleep(AROUND);
    let (mut c, report) = load.stop();
    let image = std::fs::read(&out).unwrap_or_default();
    let image_len = image.len() as u64;
    let diff = if image_len == model.bytes() {
        model.diff_image(&image, &ids)
    } else {
        (Vec::new(), 0)
    };
    let disk_bad = read_disk(&mut c, spare(), model, "after the export");
    drop(c);
    (
        d,
        ExportRun {
            job,
            report,
            diff,
            image_len,
            disk_bad,
        },
    )
}

/// An export started while four queues write: the image is the disk at
/// the start instant byte for byte, while the writes went on (some waited
/// for their chunk's copy-before-write) and the live disk kept them. Then
/// the same through the CLI (`export OUT`, exit 0), the load resumed once
/// the daemon logs the start instant.
#[test]
fn an_export_under_load_is_the_disk_at_its_start_instant() {
    timed("export_under_load", || {
        let disk = Disk::new(DISK, 512);
        let model = disk.model();
        let (d, r) = export_under_load(&disk, &model, &[], seed(0xE4B0));
        eprintln!("[jobs]   export under load: {:?}, job {}", r.report, r.job);
        assert_load_clean("the load", &r.report);
        assert_eq!(r.job["state"], "completed", "{}", r.job);
        assert_eq!(r.image_len, DISK, "the image's size is the disk's");
        assert_same("the export against the disk at its start", &r.diff);
        assert!(
            u(&r.job["writes_waited"]) > 0,
            "no write waited for its chunk's copy: {}",
            r.job
        );
        assert!(
            r.report.before > 0 && r.report.during > 0 && r.report.after > 0,
            "writes before/in/after the chunk being saved: {:?}",
            r.report
        );
        assert_same("the disk after the export", &r.disk_bad);

        // Through the CLI, following the job to its end.
        let load = start_load(&d, &model, 80, seed(0xE4B1));
        thread::sleep(AROUND);
        let out = disk.dir().join("cli-export.img");
        load.pause();
        let ids = model.ids();
        let cli = Command::new(BINARY)
            .args(["export", "--rate", "32", "--output", "json", "--control"])
            .arg(&disk.control)
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let instant = format!("export to {}: start instant taken", out.display());
        let taken = d.wait_for_log(&instant, Duration::from_secs(20));
        load.resume();
        assert!(taken, "no log line {instant:?}:\n{}", d.log_tail(20));
        let writes = load.writes();
        let output = cli.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "export CLI: {}\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let (mut c, report) = load.stop();
        assert_load_clean("the load", &report);
        assert!(
            report.writes > writes,
            "writes went on during the CLI's export"
        );
        assert_eq!(last_json(&text)["state"], "completed", "{text}");
        let image = std::fs::read(&out).unwrap();
        assert_eq!(image.len() as u64, DISK, "the CLI's image's size");
        assert_same("the CLI's export", &model.diff_image(&image, &ids));
        assert_same(
            "the disk after both exports",
            &read_disk(&mut c, spare(), &model, "after both exports"),
        );
        drop(c);
        terminate(&d);
    });
}

/// Negative control: with the export's copy-before-write off, guest writes
/// after the start instant reach the image before the job saved their
/// chunk: the image differs from the disk at the start. So the test above
/// can fail.
#[test]
fn negative_control_an_export_without_copy_before_write_gets_later_writes() {
    timed("negative_control_export", || {
        let disk = Disk::new(DISK, 512);
        let model = disk.model();
        let (d, r) = export_under_load(&disk, &model, &[(GATE_OFF, "export")], seed(0xE0FF));
        terminate(&d);
        eprintln!(
            "[jobs]   export, gate off: {} sectors differ from the start instant; {:?}",
            r.diff.1, r.report
        );
        assert_eq!(r.job["state"], "completed", "{}", r.job);
        assert_eq!(r.image_len, DISK, "the image's size is the disk's");
        assert!(
            r.diff.1 > 0,
            "with VHOST_USER_UBD_TEST_GATE_OFF=export the image still equals the disk at its \
             start: the export test cannot fail"
        );
        assert_same(
            "the live disk (the gate is off for the image only)",
            &r.disk_bad,
        );
    });
}

/// `cancel` of a running export (`export --rate 1` through the CLI): the
/// command reports the job cancelled, the export command fails, the image
/// is removed, and the guest's I/O goes on, every read equal to the model.
#[test]
fn cancelling_an_export_removes_its_image_and_the_disk_serves_on() {
    timed("export_cancel", || {
        let disk = Disk::new(DISK, 512);
        let model = disk.model();
        let d = disk.serve("ubd", &[]);
        // All of the load in the first two chunks: they are saved at once
        // (writes wait for them), the rest crawls at 1 MB/s.
        let load = start_load(&d, &model, 100, seed(0xCA9C));
        load.set_hot(0, 2 * CHUNK_SECTORS);
        let out = disk.dir().join("cancelled.img");
        let mut cli = Command::new(BINARY)
            .args(["export", "--rate", "1", "--output", "json", "--control"])
            .arg(&disk.control)
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || {
                let j = job_of(&disk.control);
                j["state"] == "running" && u(&j["bytes_done"]) >= 2 * MIB
            }),
            "the export does not get going: {}",
            job_of(&disk.control)
        );
        assert!(out.exists(), "the export's image exists while it runs");
        let (ok, text) = control_cli(&["cancel", "--output", "json"], &disk.control);
        assert!(ok, "cancel: {text}");
        let job = last_json(&text);
        assert_eq!(job["state"], "cancelled", "{job}");
        assert!(
            u(&job["bytes_done"]) < DISK,
            "cancelled before the end: {job}"
        );
        let status = cli.wait().unwrap();
        assert!(
            !status.success(),
            "the export command succeeded on a cancelled job"
        );
        drop(cli);
        assert!(!out.exists(), "the cancelled export's image is still there");
        assert_eq!(job_of(&disk.control)["state"], "cancelled");
        load.set_hot(common::load::UNSET, 0);
        let writes = load.writes();
        thread::sleep(AROUND);
        assert!(
            load.writes() > writes,
            "no write completed after the cancel"
        );
        let (mut c, report) = load.stop();
        assert_load_clean("the load", &report);
        assert_same(
            "the disk after the cancel",
            &read_disk(&mut c, spare(), &model, "after the cancel"),
        );
        drop(c);
        d.assert_running();
        terminate(&d);
        assert_base_unchanged(&disk.base, &disk.base_bytes);
    });
}

// --------------------------------------------------------------- copy-up --

/// 4 KiB COW sectors, cold, that the copy-up test writes into.
const COLD: u64 = 64;
/// 512-byte sectors per 4 KiB COW sector.
const PER: u64 = 8;
/// Queues writing pieces of every cold sector at once.
const WRITERS: usize = 4;

/// The `i`-th cold COW sector.
fn cold(i: u64) -> u64 {
    3 + 5 * i
}

/// The 512-byte piece (0..8) writer `t` writes into cold sector `i`: the
/// four writers' pieces of one sector differ.
fn piece(t: usize, i: u64) -> u64 {
    (i + 2 * t as u64) % PER
}

/// What the copy-up case saw.
struct CopyUp {
    /// Reads during the writes that showed what nobody could have written.
    torn: Vec<String>,
    reads: u64,
    /// The disk read back afterwards, against the model.
    disk_bad: (Vec<String>, usize),
    copy_ups: u64,
    /// `copy_ups` after a full-sector write into another cold sector.
    copy_ups_after_full: u64,
}

/// Serves a COW of 4096-byte sectors (with `envs`): [`WRITERS`] queues
/// write their pieces of the [`COLD`] cold sectors, all submitted at once,
/// while another queue reads those sectors over and over; then one full
/// 4 KiB aligned write into another cold sector. Leaves the daemon stopped.
fn copy_up_case(disk: &Disk, model: &Arc<Model>, envs: &[(&str, &str)]) -> CopyUp {
    let d = disk.serve("ubd", envs);
    let slot = 4096usize;
    let mut c = Client::connect(
        d.socket(),
        &ClientConfig {
            num_queues: WRITERS + 1,
            read_only: false,
            mem_len: (WRITERS + 1) * COLD as usize * slot,
        },
    )
    .unwrap();
    let mem = c.mem;
    // ids[t][i]: writer t's write into cold sector i.
    let ids: Vec<Vec<u64>> = (0..WRITERS)
        .map(|_| (0..COLD).map(|_| model.new_id()).collect())
        .collect();
    let sector_of = |t: usize, i: u64| cold(i) * PER + piece(t, i);
    let barrier = Barrier::new(WRITERS + 1);
    let writing = std::sync::atomic::AtomicUsize::new(WRITERS);
    let (torn, reads) = thread::scope(|sc| {
        let (ids, barrier, writing) = (&ids, &barrier, &writing);
        let mut queues = c.queues.iter_mut();
        let reader_q = queues.next().expect("queue 0");
        for (t, q) in queues.enumerate() {
            sc.spawn(move || {
                let base = (t + 1) * COLD as usize * slot;
                for i in 0..COLD {
                    let off = base + i as usize * slot;
                    mem.write(off, &stamp(ids[t][i as usize], sector_of(t, i)));
                }
                barrier.wait();
                for i in 0..COLD {
                    let off = base + i as usize * slot;
                    let pos = sector_of(t, i) * SECTOR as u64;
                    q.write(
                        pos,
                        mem.ptr(off, SECTOR),
                        SECTOR,
                        i as usize,
                        ReqFlags::empty(),
                    );
                }
                let mut done = 0;
                while done < COLD as usize {
                    let got = client::wait(q, 1, IO_TIMEOUT)
                        .unwrap_or_else(|e| panic!("writer {t}: {e}"));
                    for d in got {
                        assert_eq!(
                            d.ret,
                            0,
                            "writer {t}: write into cold sector {}: {}",
                            d.user_data,
                            Errno::from_raw_os_error(-d.ret)
                        );
                        done += 1;
                    }
                }
                writing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // The reader: every cold sector, 8 reads in flight, until the
        // writers are done (and once more).
        barrier.wait();
        let mut torn = Vec::new();
        let mut reads = 0u64;
        loop {
            let finished = writing.load(std::sync::atomic::Ordering::SeqCst) == 0;
            for batch in 0..COLD / 8 {
                for k in 0..8 {
                    let i = batch * 8 + k;
                    let off = (k as usize) * slot;
                    mem.fill(off, slot, 0xEE);
                    reader_q.read(
                        cold(i) * PER * SECTOR as u64,
                        mem.ptr(off, slot),
                        slot,
                        k as usize,
                        ReqFlags::empty(),
                    );
                }
                let mut got = 0;
                while got < 8 {
                    for dn in client::wait(reader_q, 1, IO_TIMEOUT).expect("reader") {
                        assert_eq!(dn.ret, 0, "read of a cold sector failed");
                        got += 1;
                    }
                }
                for k in 0..8u64 {
                    let i = batch * 8 + k;
                    let data = mem.read(k as usize * slot, slot);
                    for p in 0..PER {
                        let s = cold(i) * PER + p;
                        let got = &data[(p * SECTOR as u64) as usize..][..SECTOR];
                        let writer = (0..WRITERS).find(|&t| piece(t, i) == p);
                        let ok = got == model.base_sector(s)
                            || writer.is_some_and(|t| got == stamp(ids[t][i as usize], s));
                        if !ok && torn.len() < 20 {
                            torn.push(format!(
                                "cold COW sector {} piece {p} (sector {s}): {} during the writes \
                                 ({})",
                                cold(i),
                                common::load::describe(model.base_sector(s), s, got),
                                match writer {
                                    Some(t) => format!("being written by writer {t}"),
                                    None => "nobody writes it".into(),
                                }
                            ));
                        }
                    }
                }
                reads += 8;
            }
            // This round started after the last write completed.
            if finished {
                break;
            }
        }
        (torn, reads)
    });
    for (t, row) in ids.iter().enumerate() {
        for (i, &id) in row.iter().enumerate() {
            model.record(id, sector_of(t, i as u64), 1);
        }
    }
    let copy_ups = u(&status_of(&disk.control)["stats"]["copy_ups"]);
    // A full, aligned 4 KiB write into another cold sector copies nothing.
    let full = 1000u64;
    let id = model.new_id();
    let data: Vec<u8> = (full * PER..(full + 1) * PER)
        .flat_map(|s| stamp(id, s))
        .collect();
    let ret = client::write_at(c.q(1), mem, 0, full * PER * SECTOR as u64, &data);
    assert_eq!(ret, 0, "full-sector write");
    model.record(id, full * PER, PER);
    let copy_ups_after_full = u(&status_of(&disk.control)["stats"]["copy_ups"]);
    let disk_bad = read_disk(&mut c, 0, model, "after the copy-ups");
    drop(c);
    terminate(&d);
    CopyUp {
        torn,
        reads,
        disk_bad,
        copy_ups,
        copy_ups_after_full,
    }
}

/// Four queues write four different 512-byte pieces of each of 64 cold
/// 4 KiB COW sectors at once, while a fifth reads them: one copy-up per
/// sector (`copy_ups` 64), the base's bytes where nobody wrote (in every
/// read, never zeros), the writes where they did; a full-sector write adds
/// no copy-up; `uml_moo` (which honours the sector size) agrees.
#[test]
fn concurrent_partial_writes_into_a_cold_4k_sector_copy_it_up_once() {
    timed("copy_up", || {
        let disk = Disk::new(8 * MIB, 4096);
        let model = disk.model();
        let r = copy_up_case(&disk, &model, &[]);
        eprintln!(
            "[jobs]   copy-up: {} reads during the writes, copy_ups {} then {}",
            r.reads, r.copy_ups, r.copy_ups_after_full
        );
        assert!(
            r.torn.is_empty(),
            "reads during the writes:\n{}",
            r.torn.join("\n")
        );
        assert_same("the disk after the copy-ups", &r.disk_bad);
        assert_eq!(r.copy_ups, COLD, "one copy-up per cold COW sector touched");
        assert_eq!(
            r.copy_ups_after_full, COLD,
            "a full-sector write copies nothing up"
        );
        let info: Value = serde_json::from_str(&run(Command::new(BINARY)
            .args(["info", "--json"])
            .arg(&disk.cow)))
        .unwrap();
        assert_eq!(u(&info["bits_set"]), COLD + 1, "{info}");
        let merged = uml_moo(&disk.cow, &disk.dir().join("merged.img"));
        assert_same(
            "uml_moo of the COW",
            &model.diff_image(&merged, &model.ids()),
        );
        assert_base_unchanged(&disk.base, &disk.base_bytes);
    });
}

/// Negative control: with copy-up off, the rest of a partly written cold
/// COW sector is not copied from the base: it reads as zeros. So the test
/// above can fail.
#[test]
fn negative_control_without_copy_up_the_rest_of_a_sector_reads_zeros() {
    timed("negative_control_copy_up", || {
        let disk = Disk::new(8 * MIB, 4096);
        let model = disk.model();
        let r = copy_up_case(&disk, &model, &[(GATE_OFF, "copy-up")]);
        eprintln!(
            "[jobs]   copy-up off: {} sectors differ, {} torn reads, copy_ups {}",
            r.disk_bad.1,
            r.torn.len(),
            r.copy_ups
        );
        assert!(
            r.disk_bad.1 > 0,
            "with VHOST_USER_UBD_TEST_GATE_OFF=copy-up the disk still equals the model: the \
             copy-up test cannot fail"
        );
        assert!(
            r.disk_bad.0.iter().any(|m| m.contains("holds zeros")),
            "the mismatch is zeros where the base belongs: {:?}",
            r.disk_bad.0
        );
    });
}

// -------------------------------------------------------------- refusals --

/// While a flatten runs (under load): a second flatten (CLI) and an export
/// are refused naming the running job, and so is a takeover; `cancel`
/// stops it. Then an export over an existing file without --force is
/// refused naming the file and --force (the file untouched), and a
/// relative export path is refused.
#[test]
fn a_second_job_a_takeover_an_existing_image_and_a_relative_path_are_refused() {
    timed("refusals_cow", || {
        let disk = Disk::new(DISK, 512);
        let model = disk.model();
        let d = disk.serve("ubd", &[]);
        let load = start_load(&d, &model, 0, seed(0x4EF0));
        let first = control(
            &disk.control,
            &json!({"v": 1, "cmd": "flatten", "rate": 1_000_000}),
        );
        assert_eq!(first["ok"], true, "{first}");
        assert_eq!(first["job"]["state"], "running", "{first}");

        let (ok, out) = control_cli(&["flatten", "--detach"], &disk.control);
        assert!(!ok, "a second flatten was accepted: {out}");
        assert!(
            out.contains("a flatten job is running"),
            "the refusal names the running job: {out}"
        );
        let export = disk.dir().join("x.img");
        let v = control(
            &disk.control,
            &json!({"v": 1, "cmd": "export", "path": export}),
        );
        assert_eq!(v["ok"], false, "an export during a flatten: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains("flatten"),
            "the refusal names the running job: {v}"
        );
        assert!(!export.exists(), "a refused export created its image");

        let b = DaemonBuilder::new(disk.dir())
            .name("takeover")
            .takeover(&disk.control, d.socket())
            .spawn();
        let st = b
            .wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the takeover still runs:\n{}", b.log_tail(20)));
        assert!(!st.success(), "a takeover during a job: {st}\n{}", b.log());
        assert!(
            b.log().contains("flatten job is running"),
            "the takeover's refusal names the job:\n{}",
            b.log()
        );
        d.assert_running();
        assert_eq!(job_of(&disk.control)["state"], "running");

        let (ok, out) = control_cli(&["cancel"], &disk.control);
        assert!(ok, "cancel: {out}");
        assert!(out.contains("cancelled"), "cancel's summary: {out}");
        assert_eq!(job_of(&disk.control)["state"], "cancelled");

        let existing = disk.dir().join("existing.img");
        std::fs::write(&existing, b"keep me").unwrap();
        let (ok, out) = control_cli(&["export", existing.to_str().unwrap()], &disk.control);
        assert!(
            !ok,
            "an export over an existing file without --force: {out}"
        );
        assert!(
            out.contains(existing.to_str().unwrap()) && out.contains("--force"),
            "the refusal names the file and --force: {out}"
        );
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
        let v = control(
            &disk.control,
            &json!({"v": 1, "cmd": "export", "path": "relative.img"}),
        );
        assert_eq!(v["ok"], false, "a relative export path: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains("absolute"),
            "the refusal asks for an absolute path: {v}"
        );
        assert!(!disk.dir().join("relative.img").exists());
        assert_eq!(job_of(&disk.control)["state"], "cancelled", "no new job");

        let (mut c, report) = load.stop();
        assert_load_clean("the load", &report);
        assert!(report.writes > 0, "the load wrote");
        assert_same(
            "the disk after the refusals",
            &read_disk(&mut c, spare(), &model, "after the refusals"),
        );
        drop(c);
        terminate(&d);
    });
}

/// A raw disk has no block jobs: flatten and export (CLI and raw control)
/// are refused saying they need a COW, and the guest's I/O goes on.
#[test]
fn jobs_on_a_raw_disk_are_refused_saying_they_need_a_cow() {
    timed("refusals_raw", || {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        make_backing(&raw, 8 * MIB);
        let model = Arc::new(Model::new(std::fs::read(&raw).unwrap()));
        let ctl = dir.path().join("control.sock");
        let d = DaemonBuilder::new(dir.path())
            .raw(&raw)
            .queues(QUEUES)
            .queue_size(256)
            .arg("--control")
            .arg(&ctl)
            .spawn();
        let load = start_load(&d, &model, 0, seed(0x4A30));
        let out = dir.path().join("out.img");
        for req in [
            json!({"v": 1, "cmd": "flatten"}),
            json!({"v": 1, "cmd": "export", "path": out}),
        ] {
            let v = control(&ctl, &req);
            assert_eq!(v["ok"], false, "{req} on a raw disk: {v}");
            assert!(
                v["error"].as_str().unwrap_or("").contains("COW"),
                "{req}: the refusal says jobs need a COW: {v}"
            );
        }
        let (ok, text) = control_cli(&["flatten"], &ctl);
        assert!(
            !ok && text.contains("COW"),
            "flatten CLI on a raw disk: {text}"
        );
        let (ok, text) = control_cli(&["export", out.to_str().unwrap()], &ctl);
        assert!(
            !ok && text.contains("COW"),
            "export CLI on a raw disk: {text}"
        );
        assert!(!out.exists(), "a refused export created its image");
        assert!(job_of(&ctl).is_null(), "no job ran");
        let (mut c, report) = load.stop();
        assert_load_clean("the load", &report);
        assert_same(
            "the raw disk",
            &read_disk(&mut c, spare(), &model, "the raw disk"),
        );
        drop(c);
        terminate(&d);
    });
}

/// The export's contract: writes submitted after the start reply are not
/// in the image. Busy threads in this process make the daemon's threads
/// late, as a loaded host does, and the load resumes the moment the reply
/// arrives. (It failed in 3-7 of 10 rounds while the daemon replied before
/// the job's thread had closed the gate; the start instant is now taken
/// before the reply.)
#[test]
fn an_export_excludes_writes_submitted_after_its_start_reply() {
    timed("export_start_reply", || {
        const ROUNDS: u64 = 10;
        let mut bad = Vec::new();
        for round in 0..ROUNDS {
            let disk = Disk::new(4 * MIB, 512);
            let model = disk.model();
            let d = disk.serve("ubd", &[]);
            let opts = LoadOptions {
                write_pct: 100,
                depth: 8,
                seed: seed(0x5EA1 + round),
                ..LoadOptions::default()
            };
            let load = Load::start(opts.connect(d.socket()), model.clone(), opts);
            thread::sleep(Duration::from_millis(50));
            let spin = std::sync::atomic::AtomicBool::new(true);
            let out = disk.dir().join("export.img");
            let (ids, reply) = thread::scope(|sc| {
                for _ in 0..4 {
                    sc.spawn(|| {
                        while spin.load(std::sync::atomic::Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    });
                }
                let r = start_export_paused(&disk.control, &load, &out, 0);
                thread::sleep(Duration::from_millis(50));
                spin.store(false, std::sync::atomic::Ordering::Relaxed);
                r
            });
            assert_eq!(reply["ok"], true, "{reply}");
            let job = wait_job_end(&disk.control, JOB_TIMEOUT);
            let (c, report) = load.stop();
            drop(c);
            assert_load_clean("the load", &report);
            assert_eq!(job["state"], "completed", "{job}");
            let image = std::fs::read(&out).unwrap();
            let (first, n) = model.diff_image(&image, &ids);
            if n > 0 {
                let newest = ids.iter().max().copied().unwrap_or(0);
                bad.push(format!(
                    "round {round}: {n} sectors differ from the disk at the start reply (the \
                     newest write before it is #{newest}), e.g. {}",
                    first[0]
                ));
            }
            terminate(&d);
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}
