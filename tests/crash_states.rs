// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Crash-state exploration (in the spirit of dm-log-writes replay and
//! CrashMonkey) of the COW write path, invariant R5.
//!
//! A recording layer under the io_uring engine ([`IoObserver`]) logs every
//! write, punch and `fdatasync` that reaches the COW file while a workload
//! runs through the Disk API; the workload logs its own submissions and
//! completions into the same log. From that log we build crash states: at a
//! crash point, every write logged before the start of the last completed
//! sync is on disk; of the writes since, any subset, in any order, the last
//! one possibly torn at 512-byte granularity. Each state is opened with the
//! real format code (header, geometry, bitmap) and every sector must read as
//! its content at the last completed FLUSH, or newer content the guest
//! wrote; never zeros nobody wrote, never an unwritten COW block.
//!
//! `CRASH_STATES` (default 10000) and `CRASH_SEED` set the size and seed;
//! `make crash-sweep` runs a larger sweep.

mod common;

use std::{
    collections::HashMap,
    os::{fd::RawFd, unix::fs::MetadataExt},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use vhost_user_ubd::{
    cow::{create_cow_with, header::MAX_HEADER_LEN, Bitmap, CowHeader},
    disk::{
        job::{JobRequest, JobState},
        open_cow, Completion, DiskOptions, IoVecs, Observer, Op, Request, Submitted,
    },
    engine::IoObserver,
};

const SECTORS: u64 = 512; // 256 KiB backing: small images, many states
static ZEROS: [u8; SECTOR] = [0; SECTOR];

/// One logged event.
#[derive(Clone, Debug)]
#[allow(dead_code)] // guest event ids are for debugging output
enum Ev {
    Write { off: u64, data: Arc<Vec<u8>> },
    Zero { off: u64, len: u64 },
    SyncStart(u64),
    SyncDone(u64, bool),
    GuestSubmit(usize),
    GuestDone(usize),
}

struct Recorder {
    ino: (u64, u64),
    fds: Mutex<HashMap<RawFd, bool>>,
    log: Mutex<Vec<Ev>>,
    tokens: Mutex<u64>,
}

impl Recorder {
    fn is_cow(&self, fd: RawFd) -> bool {
        let mut fds = self.fds.lock().unwrap();
        *fds.entry(fd).or_insert_with(|| {
            let p = format!("/proc/self/fd/{fd}");
            std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == self.ino)
        })
    }

    fn push(&self, e: Ev) {
        self.log.lock().unwrap().push(e);
    }
}

impl IoObserver for Recorder {
    fn on_write(&self, fd: RawFd, offset: u64, data: &[u8]) {
        if self.is_cow(fd) {
            self.push(Ev::Write {
                off: offset,
                data: Arc::new(data.to_vec()),
            });
        }
    }

    fn on_zero(&self, fd: RawFd, offset: u64, len: u64) {
        if self.is_cow(fd) {
            self.push(Ev::Zero { off: offset, len });
        }
    }

    fn on_sync_start(&self, fd: RawFd) -> u64 {
        let mut t = self.tokens.lock().unwrap();
        *t += 1;
        if self.is_cow(fd) {
            self.push(Ev::SyncStart(*t));
        }
        *t
    }

    fn on_sync_done(&self, token: u64, ok: bool) {
        self.push(Ev::SyncDone(token, ok));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zero,
    Flush,
}

/// A guest operation of the workload.
struct GuestOp {
    kind: Kind,
    sector: u64,
    n: u64,
    data: Vec<u8>,
    submit: usize,
    done: usize,
}

struct Workload {
    name: &'static str,
    /// `--cache none`: data through `O_DIRECT`, first writes and rewrites
    /// through Linux AIO (`--aio native`, the default).
    direct: bool,
    writeback: bool,
    zero_ops: bool,
    checkpoint_extents: usize,
    ops: usize,
    max_len: u64,
    /// Bytes one bitmap bit covers (`create --sectorsize`; above 512 a
    /// partial write of a cold COW sector copies the rest up first).
    sectorsize: u32,
    /// A flatten runs (rate-limited, small chunks) during the workload.
    flatten: bool,
}

struct Run {
    log: Vec<Ev>,
    ops: Vec<GuestOp>,
    base_image: Vec<u8>,
    backing: Vec<u8>,
    header: CowHeader,
    writeback: bool,
}

fn run_workload(w: &Workload, seed: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, SECTORS * 512);
    let cow = dir.path().join("c.cow");
    let header = create_cow_with(&cow, &base, 4096, w.sectorsize).unwrap();
    let base_image = std::fs::read(&cow).unwrap();
    let meta = std::fs::metadata(&cow).unwrap();
    let rec = Arc::new(Recorder {
        ino: (meta.dev(), meta.ino()),
        fds: Mutex::new(HashMap::new()),
        log: Mutex::new(Vec::new()),
        tokens: Mutex::new(0),
    });
    let disk = open_cow(
        &cow,
        &DiskOptions {
            writeback: w.writeback,
            direct: w.direct,
            max_pending_extents: w.checkpoint_extents,
            max_pending_age: Duration::from_secs(3600),
            observer: Some(Observer(rec.clone())),
            // The crash journal is on, as in production: it must not change
            // what reaches the COW file (R5 is checked on that alone; a
            // power loss takes the journal's tmpfs with it).
            journal_dir: Some(dir.path().to_path_buf()),
            // 16 KiB chunks: the flatten's chunks and the guest's writes
            // interleave.
            job_chunk: 16 * 1024,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    disk.set_writeback(w.writeback);
    let mut flatten_started = false;
    let mut q = disk.new_queue().unwrap();
    let mut rng = Rng::new(seed);
    let mut ops: Vec<GuestOp> = Vec::new();
    let mut busy = vec![false; SECTORS as usize];
    let mut in_flight = 0usize;
    let mut parked: Vec<Request> = Vec::new();
    let mut out: Vec<Completion> = Vec::new();
    let finish = |c: &Completion, ops: &mut Vec<GuestOp>, busy: &mut Vec<bool>, rec: &Recorder| {
        assert_eq!(c.result, Ok(()), "guest op {} failed", c.tag);
        let op = &mut ops[c.tag as usize];
        rec.push(Ev::GuestDone(c.tag as usize));
        op.done = rec.log.lock().unwrap().len();
        if op.kind != Kind::Flush {
            busy[op.sector as usize..(op.sector + op.n) as usize].fill(false);
        }
    };
    let mut issued = 0;
    while issued < w.ops || in_flight > 0 {
        if w.flatten && !flatten_started && issued >= w.ops / 5 {
            // 256 KiB at 2 MB/s: the copy runs through the rest of the
            // workload, 16 chunks.
            disk.start_job(JobRequest::Flatten {
                rate: Some(2_000_000),
            })
            .unwrap();
            flatten_started = true;
        }
        if issued < w.ops && in_flight < 8 {
            let r = rng.below(100);
            let (kind, sector, n) = if r < 12 {
                (Kind::Flush, 0, 0)
            } else {
                let n = 1 + rng.below(w.max_len);
                let sector = rng.below(SECTORS - n + 1);
                let kind = if w.zero_ops && r < 25 {
                    Kind::Zero
                } else {
                    Kind::Write
                };
                (kind, sector, n)
            };
            let free = kind == Kind::Flush
                || !busy[sector as usize..(sector + n) as usize]
                    .iter()
                    .any(|&b| b);
            if free {
                let id = ops.len();
                let data = if kind == Kind::Write {
                    stamps(id as u64, sector, n)
                } else {
                    Vec::new()
                };
                if kind != Kind::Flush {
                    busy[sector as usize..(sector + n) as usize].fill(true);
                }
                rec.push(Ev::GuestSubmit(id));
                let submit = rec.log.lock().unwrap().len();
                ops.push(GuestOp {
                    kind,
                    sector,
                    n,
                    data,
                    submit,
                    done: usize::MAX,
                });
                let op = match kind {
                    Kind::Flush => Op::Flush,
                    Kind::Zero if rng.below(2) == 0 => Op::Discard { sector, nsect: n },
                    Kind::Zero => Op::WriteZeroes {
                        sector,
                        nsect: n,
                        unmap: rng.below(2) == 0,
                    },
                    Kind::Write => {
                        let buf = &ops[id].data;
                        let iov = vec![libc::iovec {
                            iov_base: buf.as_ptr().cast_mut().cast(),
                            iov_len: buf.len(),
                        }];
                        // SAFETY: `ops[id].data` is never touched again and
                        // `ops` is only pushed to (the Vec's heap buffer of
                        // this element does not move) until the run ends,
                        // after every completion.
                        let iov = unsafe { IoVecs::new(iov) };
                        Op::Write { sector, iov }
                    }
                };
                in_flight += 1;
                issued += 1;
                if let Submitted::Again(r) = q.submit(Request { op, tag: id as u64 }) {
                    parked.push(r);
                }
                q.commit().unwrap();
                continue;
            }
        }
        q.wait(Some(Duration::from_millis(20)));
        let retry = q.poll(&mut out);
        for c in out.drain(..) {
            finish(&c, &mut ops, &mut busy, &rec);
            in_flight -= 1;
        }
        if retry {
            for r in std::mem::take(&mut parked) {
                if let Submitted::Again(r) = q.submit(r) {
                    parked.push(r);
                }
            }
            q.commit().unwrap();
        }
    }
    drop(q);
    if w.flatten {
        while disk.job().is_some_and(|j| j.state == JobState::Running) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let job = disk.job().unwrap();
        assert_eq!(job.state, JobState::Completed, "{}: {job:?}", w.name);
        assert!(
            job.bytes_copied > 0,
            "{}: the flatten copied nothing",
            w.name
        );
    }
    let journals = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "journal"))
            })
            .count()
    };
    assert_eq!(
        journals(),
        1,
        "{}: the crash journal was not in place",
        w.name
    );
    disk.shutdown().unwrap();
    drop(disk);
    assert_eq!(
        journals(),
        0,
        "{}: a clean shutdown keeps the journal",
        w.name
    );
    let log = rec.log.lock().unwrap().clone();
    let backing = std::fs::read(&base).unwrap();
    let _ = w.name;
    Run {
        log,
        ops,
        base_image,
        backing,
        header,
        writeback: w.writeback,
    }
}

/// Content identity of a sector as found in a crash state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    Backing,
    Zero,
    Write(usize),
    Garbage,
}

fn apply(img: &mut Vec<u8>, e: &Ev, sectors: Option<&[bool]>) {
    match e {
        Ev::Write { off, data } => {
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            match sectors {
                None => img[*off as usize..end].copy_from_slice(data),
                Some(mask) => {
                    // Torn: only some 512-byte pieces reached the disk.
                    for (i, chunk) in data.chunks(SECTOR).enumerate() {
                        if mask.get(i).copied().unwrap_or(true) {
                            let o = *off as usize + i * SECTOR;
                            img[o..o + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                }
            }
        }
        Ev::Zero { off, len } => {
            let end = (*off + *len) as usize;
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].fill(0);
        }
        _ => {}
    }
}

struct Checker<'a> {
    run: &'a Run,
    /// Per sector, the guest ops touching it, in submission order.
    per_sector: Vec<Vec<usize>>,
}

impl<'a> Checker<'a> {
    fn new(run: &'a Run) -> Self {
        let mut per_sector = vec![Vec::new(); SECTORS as usize];
        for (id, op) in run.ops.iter().enumerate() {
            if op.kind != Kind::Flush {
                for s in op.sector..op.sector + op.n {
                    per_sector[s as usize].push(id);
                }
            }
        }
        Self { run, per_sector }
    }

    /// Contents a sector may hold after a crash at log index `p`.
    fn valid(&self, s: u64, p: usize) -> Vec<Found> {
        // Durable point: submission of the last flush completed before p.
        let flush_submit = self
            .run
            .ops
            .iter()
            .filter(|o| o.kind == Kind::Flush && o.done <= p)
            .map(|o| o.submit)
            .max();
        let ids = &self.per_sector[s as usize];
        let durable = ids.iter().rposition(|&id| {
            let o = &self.run.ops[id];
            flush_submit.is_some_and(|f| o.done <= f) || (!self.run.writeback && o.done <= p)
        });
        let found = |id: usize| match self.run.ops[id].kind {
            Kind::Write => Found::Write(id),
            _ => Found::Zero,
        };
        let mut v = vec![durable.map_or(Found::Backing, |i| found(ids[i]))];
        let from = durable.map_or(0, |i| i + 1);
        for &id in &ids[from..] {
            if self.run.ops[id].submit <= p {
                v.push(found(id));
            }
        }
        v
    }

    fn identify(&self, s: u64, bytes: &[u8]) -> Found {
        let off = (s as usize) * SECTOR;
        let back = &self.run.backing[off..(off + SECTOR).min(self.run.backing.len())];
        if bytes[..back.len()] == *back && bytes[back.len()..].iter().all(|&b| b == 0) {
            return Found::Backing;
        }
        if bytes == ZEROS.as_slice() {
            return Found::Zero;
        }
        if let Some((id, _)) = stamp_of(bytes) {
            let id = id as usize;
            if let Some(op) = self.run.ops.get(id) {
                if op.kind == Kind::Write && (op.sector..op.sector + op.n).contains(&s) {
                    let o = ((s - op.sector) as usize) * SECTOR;
                    if bytes == &op.data[o..o + SECTOR] {
                        return Found::Write(id);
                    }
                }
            }
        }
        Found::Garbage
    }

    /// `valid` for every sector at crash point `p`.
    fn valid_all(&self, p: usize) -> Vec<Vec<Found>> {
        (0..SECTORS).map(|s| self.valid(s, p)).collect()
    }

    /// Opens a crash-state image with the real format code and checks it.
    fn check(&self, img: &[u8], valid: &[Vec<Found>], what: &str) {
        let hdr = CowHeader::parse(&img[..MAX_HEADER_LEN.min(img.len())])
            .unwrap_or_else(|e| panic!("{what}: header unreadable after crash: {e}"));
        assert_eq!(hdr, self.run.header, "{what}: header changed");
        let g = hdr.geometry().unwrap();
        let bm_bytes =
            img[g.bitmap_offset as usize..(g.bitmap_offset + g.bitmap_len) as usize].to_vec();
        let bitmap = Bitmap::from_bytes(bm_bytes, g.nsect);
        let mut buf = [0u8; SECTOR];
        for s in 0..SECTORS {
            let bit = bitmap.test(s >> g.shift());
            let bytes: &[u8] = if bit {
                let o = g.data_pos(s) as usize;
                match img.get(o..o + SECTOR) {
                    Some(b) => b,
                    None => {
                        buf.fill(0);
                        let have = img.len().saturating_sub(o).min(SECTOR);
                        buf[..have].copy_from_slice(&img[o..o + have]);
                        &buf
                    }
                }
            } else {
                let o = s as usize * SECTOR;
                &self.run.backing[o..o + SECTOR]
            };
            let got = self.identify(s, bytes);
            let valid = &valid[s as usize];
            assert!(
                valid.contains(&got),
                "{what}: sector {s} reads {got:?} (bit {bit}), allowed {valid:?}"
            );
        }
    }
}

/// Builds and checks crash states of one run; returns how many.
fn explore(run: &Run, budget: usize, rng: &mut Rng, label: &str) -> usize {
    let checker = Checker::new(run);
    let log = &run.log;
    let mut points: Vec<usize> = Vec::new();
    for (i, e) in log.iter().enumerate() {
        if matches!(e, Ev::SyncDone(..) | Ev::SyncStart(_)) {
            points.push(i + 1);
        }
    }
    points.push(log.len());
    while points.len() < budget / 8 {
        points.push(rng.below(log.len() as u64 + 1) as usize);
    }
    points.sort_unstable();
    points.dedup();
    let per_point = budget.div_ceil(points.len()).max(1);
    let mut states = 0;
    for &p in &points {
        // The last completed sync before p and where it started.
        let mut start_of: HashMap<u64, usize> = HashMap::new();
        let mut durable_until = 0usize;
        for (i, e) in log[..p].iter().enumerate() {
            match e {
                Ev::SyncStart(t) => {
                    start_of.insert(*t, i);
                }
                Ev::SyncDone(t, true) => {
                    if let Some(&st) = start_of.get(t) {
                        durable_until = durable_until.max(st);
                    }
                }
                _ => {}
            }
        }
        let valid = checker.valid_all(p);
        let mut img = run.base_image.clone();
        let mut volatile = Vec::new();
        for (i, e) in log[..p].iter().enumerate() {
            if matches!(e, Ev::Write { .. } | Ev::Zero { .. }) {
                if i < durable_until {
                    apply(&mut img, e, None);
                } else {
                    volatile.push(e);
                }
            }
        }
        for k in 0..per_point {
            let mut state = img.clone();
            let what;
            if k == 0 {
                what = format!("{label}: crash at {p}, durable only");
            } else if k == 1 {
                for e in &volatile {
                    apply(&mut state, e, None);
                }
                what = format!(
                    "{label}: crash at {p}, all {} volatile writes",
                    volatile.len()
                );
            } else {
                // A random subset in a random order, the last one torn.
                let mut chosen: Vec<&Ev> = volatile
                    .iter()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                for i in (1..chosen.len()).rev() {
                    chosen.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let n = chosen.len();
                for (i, e) in chosen.iter().enumerate() {
                    if i + 1 == n {
                        let pieces = match e {
                            Ev::Write { data, .. } => data.len().div_ceil(SECTOR),
                            _ => 0,
                        };
                        let mask: Vec<bool> = (0..pieces).map(|_| rng.below(2) == 0).collect();
                        apply(&mut state, e, Some(&mask));
                    } else {
                        apply(&mut state, e, None);
                    }
                }
                what = format!(
                    "{label}: crash at {p}, {n} of {} volatile writes, last torn",
                    volatile.len()
                );
            }
            if std::env::var("CRASH_DEBUG").is_ok() {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    checker.check(&state, &valid, &what);
                }));
                if let Err(e) = r {
                    let g = run.header.geometry().unwrap();
                    for (i, e) in log[..p].iter().enumerate() {
                        let d = match e {
                            Ev::Write { off, data } if *off >= g.data_offset => {
                                format!(
                                    "data write sectors {}+{}",
                                    (off - g.data_offset) / 512,
                                    data.len() / 512
                                )
                            }
                            Ev::Write { off, data } => {
                                let b0 = (off - g.bitmap_offset) as usize;
                                let bytes: Vec<String> = data
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, &v)| v != 0)
                                    .map(|(i, v)| format!("{}:{v:02x}", b0 + i))
                                    .collect();
                                format!(
                                    "bitmap write byte {b0} len {} [{}]",
                                    data.len(),
                                    bytes.join(" ")
                                )
                            }
                            Ev::Zero { off, len } => format!(
                                "zero sectors {}+{}",
                                (off - g.data_offset) / 512,
                                len / 512
                            ),
                            Ev::GuestSubmit(id) => {
                                let o = &run.ops[*id];
                                format!("guest submit #{id} {:?} {}+{}", o.kind, o.sector, o.n)
                            }
                            other => format!("{other:?}"),
                        };
                        eprintln!(
                            "{i:4} {d}{}",
                            if i < durable_until { "  [durable]" } else { "" }
                        );
                    }
                    std::panic::resume_unwind(e);
                }
            }
            checker.check(&state, &valid, &what);
            states += 1;
        }
    }
    states
}

fn workloads(direct: bool) -> Vec<Workload> {
    let mut v = vec![
        Workload {
            direct: false,
            name: "random writes + flushes",
            writeback: true,
            zero_ops: false,
            checkpoint_extents: 1 << 20,
            ops: 300,
            max_len: 8,
            sectorsize: 512,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "overlapping long writes",
            writeback: true,
            zero_ops: false,
            checkpoint_extents: 1 << 20,
            ops: 200,
            max_len: 40,
            sectorsize: 512,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "discard and write-zeroes",
            writeback: true,
            zero_ops: true,
            checkpoint_extents: 1 << 20,
            ops: 300,
            max_len: 16,
            sectorsize: 512,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "writethrough",
            writeback: false,
            zero_ops: true,
            checkpoint_extents: 1 << 20,
            ops: 150,
            max_len: 8,
            sectorsize: 512,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "checkpoints mid-run",
            writeback: true,
            zero_ops: true,
            checkpoint_extents: 6,
            ops: 300,
            max_len: 8,
            sectorsize: 512,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "copy-ups (sectorsize 4096)",
            writeback: true,
            zero_ops: true,
            checkpoint_extents: 6,
            ops: 300,
            max_len: 6,
            sectorsize: 4096,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "copy-ups writethrough",
            writeback: false,
            zero_ops: true,
            checkpoint_extents: 1 << 20,
            ops: 150,
            max_len: 6,
            sectorsize: 4096,
            flatten: false,
        },
        Workload {
            direct: false,
            name: "flatten during writes",
            writeback: true,
            zero_ops: true,
            checkpoint_extents: 6,
            ops: 300,
            max_len: 8,
            sectorsize: 512,
            flatten: true,
        },
        Workload {
            direct: false,
            name: "flatten + copy-ups",
            writeback: true,
            zero_ops: true,
            checkpoint_extents: 1 << 20,
            ops: 300,
            max_len: 6,
            sectorsize: 4096,
            flatten: true,
        },
    ];
    for w in &mut v {
        w.direct = direct;
    }
    v
}

#[test]
fn every_crash_state_reads_flushed_or_newer_data() {
    explore_all(false);
}

/// The same with `--cache none`: data writes through `O_DIRECT` and Linux
/// AIO, which the recorder must see as well (it sits in the engine, where
/// every write and sync of the COW file passes, whatever the interface).
#[test]
fn every_crash_state_reads_flushed_or_newer_data_with_cache_none() {
    let aio_before = vhost_user_ubd::engine::aio::submitted();
    explore_all(true);
    assert!(
        vhost_user_ubd::engine::aio::submitted() > aio_before,
        "no write went through Linux AIO: the --cache none path was not explored"
    );
}

fn explore_all(direct: bool) {
    let total: usize = std::env::var("CRASH_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_c0ff_ee00_0001);
    println!(
        "crash states: {total}, seed {seed:#x} (CRASH_STATES / CRASH_SEED to change), \
         --cache {}",
        if direct { "none" } else { "writeback" }
    );
    let mut rng = Rng::new(seed);
    let ws = workloads(direct);
    let mut explored = 0;
    for w in &ws {
        let t = std::time::Instant::now();
        let run = run_workload(w, rng.next() | 1);
        let syncs = run
            .log
            .iter()
            .filter(|e| matches!(e, Ev::SyncDone(..)))
            .count();
        let n = explore(&run, total / ws.len(), &mut rng, w.name);
        println!(
            "{:28} {:5} log events, {:3} syncs, {n:5} states, {:?}",
            w.name,
            run.log.len(),
            syncs,
            t.elapsed()
        );
        assert!(syncs > 0, "{}: the workload never synced", w.name);
        let g = run.header.geometry().unwrap();
        let data_writes = run
            .log
            .iter()
            .filter(|e| matches!(e, Ev::Write { off, .. } if *off >= g.data_offset))
            .count();
        assert!(
            data_writes > 0,
            "{} (direct: {direct}): the recorder saw no data write",
            w.name
        );
        explored += n;
    }
    println!("explored {explored} crash states");
    assert!(
        explored >= total,
        "explored {explored} states, wanted {total}"
    );
}

/// Negative control for the copies: drop only the data writes that copy
/// the base into the COW (the flatten's chunks and the copy-ups), keep the
/// bitmap writes: the sectors whose bits they set read zeros, and the
/// checker must say so.
#[test]
fn the_checker_catches_a_copied_bit_without_its_copy() {
    let w = Workload {
        direct: false,
        name: "control: flatten + copy-ups",
        writeback: true,
        zero_ops: false,
        checkpoint_extents: 1 << 20,
        ops: 60,
        max_len: 4,
        sectorsize: 4096,
        flatten: true,
    };
    let mut run = run_workload(&w, 11);
    let g = run.header.geometry().unwrap();
    let backing = run.backing.clone();
    let before = run.log.len();
    run.log.retain(|e| match e {
        Ev::Write { off, data } if *off >= g.data_offset => {
            let at = (*off - g.data_offset) as usize;
            backing.get(at..at + data.len()) != Some(data.as_slice())
        }
        _ => true,
    });
    assert!(run.log.len() < before, "no copy of the base was recorded");
    assert!(
        !accepts_the_end_state(&run),
        "the checker accepted bits of copied sectors whose copy never arrived"
    );
}

/// Whether the checker accepts the state with every logged write applied.
fn accepts_the_end_state(run: &Run) -> bool {
    let checker = Checker::new(run);
    let mut img = run.base_image.clone();
    for e in &run.log {
        apply(&mut img, e, None);
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        checker.check(&img, &checker.valid_all(run.log.len()), "control");
    }))
    .is_ok()
}

#[test]
fn the_checker_catches_a_bit_without_its_data() {
    checker_catches_a_bit_without_its_data(false);
}

#[test]
fn the_checker_catches_a_bit_without_its_data_with_cache_none() {
    checker_catches_a_bit_without_its_data(true);
}

fn checker_catches_a_bit_without_its_data(direct: bool) {
    // Negative control: a bit set on disk whose data never arrived must
    // fail the check (the checker is not vacuous).
    let w = Workload {
        direct,
        name: "control",
        writeback: true,
        zero_ops: false,
        checkpoint_extents: 1 << 20,
        ops: 40,
        max_len: 4,
        sectorsize: 512,
        flatten: false,
    };
    let mut run = run_workload(&w, 7);
    // Drop every data write to the data area, keep the bitmap writes.
    let g = run.header.geometry().unwrap();
    run.log
        .retain(|e| !matches!(e, Ev::Write { off, .. } if *off >= g.data_offset));
    assert!(
        !accepts_the_end_state(&run),
        "the checker accepted bits pointing at missing data"
    );
    let _ = Path::new("");
}
