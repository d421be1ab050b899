// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest load for the block-job tests (`tests/jobs.rs`): a libblkio client
//! doing verified random reads and writes on several queues, each queue on
//! its own thread with several requests in flight, while a job runs in the
//! daemon; and the byte model the reads are checked against.
//!
//! - The disk is cut into stripes of [`STRIPE_SECTORS`]; stripe `k` belongs
//!   to queue `k % queues`, and a request never leaves its stripe nor
//!   overlaps another request of its queue in flight. So no two requests in
//!   flight ever touch the same sector, and every read must equal the
//!   model exactly (no "any of the values in flight").
//! - The model holds, per 512-byte sector, the id of the last completed
//!   write ([`stamp`]`(id, sector)`), or 0 for the base's bytes. A write
//!   still in flight when the load was abandoned (before a kill -9) makes
//!   the sector "either": the first read settles it.
//! - [`Load::pause`] stops submissions and returns once every queue has no
//!   request in flight (the model is then the disk, e.g. for a
//!   point-in-time export); [`Load::resume`] lets them go again at once.
//! - A hot window ([`Load::set_hot`]) draws a share of the requests into
//!   a range of sectors (the chunk a job copies next, see [`Follower`]);
//!   a cursor ([`Load::set_cursor`]) sorts the completed writes into those
//!   before, in and after the job's current chunk.
//! - A read that differs from the model, a failed request or a stalled
//!   queue is recorded, never a panic: a negative control counts them, a
//!   positive test asserts there are none ([`Report::mismatches`]).
//!
//! Also: the raw control socket ([`control`], [`job_of`], [`wait_job_end`])
//! and whole-disk reads through a client ([`read_disk`]).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{
    client::{self, Blkioq, Client, ClientConfig, Errno, Mem, ReqFlags, IO_TIMEOUT},
    stamp, stamp_header, stamp_of, Rng, SECTOR,
};

/// Sectors per stripe (64 KiB): stripe `k` is queue `k % queues`'s.
pub const STRIPE_SECTORS: u64 = 128;
/// A value of the hot window and the cursor: not set.
pub const UNSET: u64 = u64::MAX;
/// Most mismatches kept in detail.
const MAX_KEPT: usize = 40;
/// Bytes read per request by [`read_disk`].
pub const READ_CHUNK: usize = 1 << 20;

// ------------------------------------------------------------- the model --

/// What every sector of the disk holds: see the module documentation.
#[derive(Debug)]
pub struct Model {
    nsect: u64,
    base: Vec<u8>,
    ids: Vec<AtomicU64>,
    /// Sector -> the other id it may hold (a write in flight when the load
    /// was abandoned).
    either: Mutex<BTreeMap<u64, u64>>,
    next_id: AtomicU64,
}

/// What one sector holds, in words, for failure messages.
pub fn describe(base: &[u8], sector: u64, data: &[u8]) -> String {
    if data == base {
        return "the base's data".into();
    }
    if data.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    match stamp_of(data) {
        Some((id, s)) if s == sector => format!("write #{id}"),
        Some((id, s)) => format!("write #{id} of ANOTHER sector ({s})"),
        None => {
            let same = data.iter().zip(base).filter(|(a, b)| a == b).count();
            format!(
                "garbage (header {:?}, {same} of 512 bytes equal to the base's)",
                stamp_header(data)
            )
        }
    }
}

impl Model {
    /// A disk of `base.len()` bytes (a multiple of 512) holding `base`.
    pub fn new(base: Vec<u8>) -> Self {
        assert_eq!(base.len() % SECTOR, 0, "the base is whole sectors");
        let nsect = (base.len() / SECTOR) as u64;
        Self {
            nsect,
            base,
            ids: (0..nsect).map(|_| AtomicU64::new(0)).collect(),
            either: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sectors of the disk.
    pub fn nsect(&self) -> u64 {
        self.nsect
    }

    /// Bytes of the disk.
    pub fn bytes(&self) -> u64 {
        self.nsect * SECTOR as u64
    }

    /// The base's bytes of `sector`.
    pub fn base_sector(&self, sector: u64) -> &[u8] {
        let at = sector as usize * SECTOR;
        &self.base[at..at + SECTOR]
    }

    /// A new write id.
    pub fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The content of `sector` when it holds write `id` (0: the base).
    fn content(&self, id: u64, sector: u64) -> Vec<u8> {
        if id == 0 {
            self.base_sector(sector).to_vec()
        } else {
            stamp(id, sector).to_vec()
        }
    }

    /// Write `id` of `n` sectors at `sector` completed.
    pub fn record(&self, id: u64, sector: u64, n: u64) {
        for s in sector..sector + n {
            self.ids[s as usize].store(id, Ordering::Release);
        }
    }

    /// Write `id` of `n` sectors at `sector` may or may not have landed
    /// (it was in flight when the daemon was killed).
    pub fn record_either(&self, id: u64, sector: u64, n: u64) {
        let mut e = self.either.lock().unwrap();
        for s in sector..sector + n {
            e.insert(s, id);
        }
    }

    /// The write ids of every sector now (for a point-in-time image; only
    /// meaningful while the load is paused).
    pub fn ids(&self) -> Vec<u64> {
        assert!(
            self.either.lock().unwrap().is_empty(),
            "the model has unsettled sectors: read the disk first"
        );
        self.ids.iter().map(|a| a.load(Ordering::Acquire)).collect()
    }

    /// The disk's bytes for the write ids `ids` (from [`Model::ids`]).
    pub fn image_of(&self, ids: &[u64]) -> Vec<u8> {
        let mut out = self.base.clone();
        for (s, &id) in ids.iter().enumerate() {
            if id != 0 {
                let at = s * SECTOR;
                out[at..at + SECTOR].copy_from_slice(&stamp(id, s as u64));
            }
        }
        out
    }

    /// The disk's bytes now (no sector may be unsettled).
    pub fn image(&self) -> Vec<u8> {
        self.image_of(&self.ids())
    }

    /// Compares `data`, the disk's bytes from sector `first` on, with the
    /// model (settling "either" sectors to what was found); appends what
    /// differs to `bad` (at most [`MAX_KEPT`] entries) and returns how many
    /// sectors differ.
    pub fn compare(&self, what: &str, first: u64, data: &[u8], bad: &mut Vec<String>) -> usize {
        let mut n = 0;
        let mut either = self.either.lock().unwrap();
        for (i, got) in data.chunks_exact(SECTOR).enumerate() {
            let s = first + i as u64;
            let id = self.ids[s as usize].load(Ordering::Acquire);
            let mut allowed = vec![id];
            if let Some(&alt) = either.get(&s) {
                allowed.push(alt);
            }
            match allowed.iter().find(|&&a| self.content(a, s) == got) {
                Some(&found) => {
                    if either.remove(&s).is_some() {
                        self.ids[s as usize].store(found, Ordering::Release);
                    }
                }
                None => {
                    n += 1;
                    if bad.len() < MAX_KEPT {
                        let want: Vec<String> = allowed
                            .iter()
                            .map(|&a| describe(self.base_sector(s), s, &self.content(a, s)))
                            .collect();
                        bad.push(format!(
                            "{what}: sector {s} (chunk {}) holds {}, the model says {}",
                            s / 2048,
                            describe(self.base_sector(s), s, got),
                            want.join(" or ")
                        ));
                    }
                }
            }
        }
        n
    }

    /// Compares a whole image (a merge, an export) with the write ids
    /// `ids`; returns the sectors that differ, described (at most
    /// [`MAX_KEPT`]), and how many there are.
    pub fn diff_image(&self, image: &[u8], ids: &[u64]) -> (Vec<String>, usize) {
        let mut bad = Vec::new();
        let mut n = 0;
        for (s, got) in image.chunks(SECTOR).enumerate() {
            let want = self.content(ids[s], s as u64);
            if got != want {
                n += 1;
                if bad.len() < MAX_KEPT {
                    bad.push(format!(
                        "sector {s} (chunk {}) holds {}, wanted {}",
                        s / 2048,
                        describe(self.base_sector(s as u64), s as u64, got),
                        describe(self.base_sector(s as u64), s as u64, &want)
                    ));
                }
            }
        }
        (bad, n)
    }
}

/// Reads the whole disk through queue 0 of `c` ([`READ_CHUNK`] at a time,
/// through region offset `mem_off`) and compares it with `model`;
/// returns what differs (empty: equal) and the number of sectors that do.
pub fn read_disk(
    c: &mut Client,
    mem_off: usize,
    model: &Model,
    what: &str,
) -> (Vec<String>, usize) {
    assert_eq!(c.capacity, model.bytes(), "{what}: capacity");
    let mem = c.mem;
    let mut bad = Vec::new();
    let mut n = 0;
    let mut pos = 0;
    while pos < model.bytes() {
        let len = READ_CHUNK.min((model.bytes() - pos) as usize);
        let data = client::read_at(c.q(0), mem, mem_off, pos, len).unwrap_or_else(|r| {
            panic!(
                "{what}: read of {len} bytes at {pos}: {}",
                Errno::from_raw_os_error(-r)
            )
        });
        n += model.compare(what, pos / SECTOR as u64, &data, &mut bad);
        pos += len as u64;
    }
    (bad, n)
}

// -------------------------------------------------------------- the load --

/// How the load behaves.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Queues, one thread each.
    pub queues: usize,
    /// Requests in flight per queue.
    pub depth: usize,
    /// Largest request, in sectors (at most [`STRIPE_SECTORS`]).
    pub max_sectors: u64,
    /// Share of writes, percent (the rest are reads).
    pub write_pct: u64,
    /// Share of requests drawn into the hot window when one is set,
    /// percent.
    pub hot_pct: u64,
    /// Seed of the first queue's generator (queue `i` gets `seed + i`).
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            queues: 4,
            depth: 4,
            max_sectors: 16,
            write_pct: 60,
            hot_pct: 0,
            seed: 1,
        }
    }
}

impl LoadOptions {
    /// The client's buffer region: every queue's slots, then
    /// [`READ_CHUNK`] for [`read_disk`] (at [`LoadOptions::spare_off`]).
    pub fn mem_len(&self) -> usize {
        self.spare_off() + READ_CHUNK
    }

    /// Where the region's part outside every queue's slots starts.
    pub fn spare_off(&self) -> usize {
        self.queues * self.depth * self.slot_len()
    }

    fn slot_len(&self) -> usize {
        self.max_sectors as usize * SECTOR
    }

    /// A client of `socket` with the queues and the region this load needs.
    pub fn connect(&self, socket: &Path) -> Client {
        Client::connect(
            socket,
            &ClientConfig {
                num_queues: self.queues,
                read_only: false,
                mem_len: self.mem_len(),
            },
        )
        .unwrap_or_else(|e| panic!("connect to {}: {e:?}", socket.display()))
    }
}

/// What the load did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Reads completed and checked.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Completed writes that ended before the cursor (a chunk the job had
    /// dealt with when they were submitted).
    pub before: u64,
    /// Completed writes into the job's current chunk (from the cursor on,
    /// one chunk).
    pub during: u64,
    /// Completed writes past it (a chunk not dealt with yet).
    pub after: u64,
    /// Sectors read that differed from the model.
    pub mismatched_sectors: u64,
    /// Failed requests, stalls, reads that differed (first ones).
    pub mismatches: Vec<String>,
    /// Most requests in flight on one queue at once.
    pub max_in_flight: usize,
}

impl Report {
    fn add(&mut self, o: &Report) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.before += o.before;
        self.during += o.during;
        self.after += o.after;
        self.mismatched_sectors += o.mismatched_sectors;
        for m in &o.mismatches {
            if self.mismatches.len() < MAX_KEPT {
                self.mismatches.push(m.clone());
            }
        }
        self.max_in_flight = self.max_in_flight.max(o.max_in_flight);
    }
}

#[derive(Debug, Default)]
struct Pause {
    paused: bool,
    /// Queues idle in the pause, or gone.
    idle: usize,
}

#[derive(Debug)]
struct Shared {
    model: Arc<Model>,
    opts: LoadOptions,
    mem: Mem,
    stop: AtomicBool,
    abandon: AtomicBool,
    paused: AtomicBool,
    pause: Mutex<Pause>,
    cv: Condvar,
    hot: AtomicU64,
    hot_len: AtomicU64,
    cursor: AtomicU64,
    cursor_len: AtomicU64,
    /// Writes completed so far, all queues (progress).
    writes: AtomicU64,
}

/// A running load; see the module documentation. Stop it with
/// [`Load::stop`] (or [`Load::abandon`] before a kill -9); dropping it
/// stops it too.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<(Blkioq, Report)>>,
    client: Option<Client>,
}

/// One request in flight.
#[derive(Debug)]
struct InFlight {
    write: bool,
    sector: u64,
    n: u64,
    id: u64,
    /// Before, during, after the cursor (writes): 0, 1, 2.
    class: u8,
}

impl Load {
    /// Starts `opts.queues` threads on the queues of `client` (which must
    /// have as many, and a region of [`LoadOptions::mem_len`]).
    pub fn start(mut client: Client, model: Arc<Model>, opts: LoadOptions) -> Load {
        assert_eq!(client.queues.len(), opts.queues, "queues of the client");
        assert!(client.mem.len() >= opts.mem_len(), "the client's region");
        assert!(opts.max_sectors >= 1 && opts.max_sectors <= STRIPE_SECTORS);
        assert_eq!(client.capacity, model.bytes(), "the disk's size");
        let shared = Arc::new(Shared {
            model,
            opts,
            mem: client.mem,
            stop: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            pause: Mutex::new(Pause::default()),
            cv: Condvar::new(),
            hot: AtomicU64::new(UNSET),
            hot_len: AtomicU64::new(0),
            cursor: AtomicU64::new(UNSET),
            cursor_len: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        let queues = std::mem::take(&mut client.queues);
        let threads = queues
            .into_iter()
            .enumerate()
            .map(|(qi, q)| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("load-q{qi}"))
                    .spawn(move || Worker::new(qi, &sh).run(q, &sh))
                    .expect("spawn a load thread")
            })
            .collect();
        Load {
            shared,
            threads,
            client: Some(client),
        }
    }

    /// The model the load keeps.
    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    /// Writes completed so far (all queues).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Draws [`LoadOptions::hot_pct`] percent of the requests into
    /// `len` sectors from `sector` ([`UNSET`]: nowhere).
    pub fn set_hot(&self, sector: u64, len: u64) {
        self.shared.hot_len.store(len, Ordering::Relaxed);
        self.shared.hot.store(sector, Ordering::Relaxed);
    }

    /// The job's current chunk: `len` sectors from `sector` ([`UNSET`]:
    /// no job).
    pub fn set_cursor(&self, sector: u64, len: u64) {
        self.shared.cursor_len.store(len, Ordering::Relaxed);
        self.shared.cursor.store(sector, Ordering::Relaxed);
    }

    /// Stops submitting and returns once no request is in flight on any
    /// queue: the model is the disk until [`Load::resume`].
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        let mut p = self.shared.pause.lock().unwrap();
        p.paused = true;
        let end = Instant::now() + IO_TIMEOUT;
        while p.idle < self.shared.opts.queues {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the load did not pause within {IO_TIMEOUT:?}"
            );
            p = self.shared.cv.wait_timeout(p, left).unwrap().0;
        }
    }

    /// Lets the queues submit again (at once).
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        let mut p = self.shared.pause.lock().unwrap();
        p.paused = false;
        self.shared.cv.notify_all();
    }

    fn join(&mut self) -> Report {
        let mut total = Report::default();
        let mut queues = Vec::new();
        for t in self.threads.drain(..) {
            let (q, r) = t.join().expect("a load thread panicked");
            queues.push(q);
            total.add(&r);
        }
        if let Some(c) = self.client.as_mut() {
            c.queues = queues;
        }
        total
    }

    /// Lets every request in flight complete, stops, and returns the
    /// client (with its queues) and what the load did.
    pub fn stop(mut self) -> (Client, Report) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        let r = self.join();
        (self.client.take().expect("the client"), r)
    }

    /// Stops at once, without waiting for the requests in flight (the
    /// daemon is about to be killed): their writes may or may not land.
    /// Returns the client, which still holds the connection; drop it
    /// after the kill.
    pub fn abandon(mut self) -> (Client, Report) {
        self.shared.abandon.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        let r = self.join();
        (self.client.take().expect("the client"), r)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.abandon.store(true, Ordering::SeqCst);
            self.shared.stop.store(true, Ordering::SeqCst);
            self.resume();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

struct Worker {
    qi: usize,
    rng: Rng,
    slots: Vec<Option<InFlight>>,
    report: Report,
}

impl Worker {
    fn new(qi: usize, sh: &Shared) -> Self {
        Self {
            qi,
            rng: Rng::new(sh.opts.seed.wrapping_add(qi as u64)),
            slots: (0..sh.opts.depth).map(|_| None).collect(),
            report: Report::default(),
        }
    }

    fn slot_off(&self, sh: &Shared, slot: usize) -> usize {
        (self.qi * sh.opts.depth + slot) * sh.opts.slot_len()
    }

    fn note(&mut self, what: String) {
        if self.report.mismatches.len() < MAX_KEPT {
            self.report.mismatches.push(what);
        }
    }

    /// A range of this queue's stripes not overlapping a request in
    /// flight, or `None`.
    fn pick(&mut self, sh: &Shared) -> Option<(u64, u64)> {
        let nsect = sh.model.nsect();
        let nq = sh.opts.queues as u64;
        let hot = sh.hot.load(Ordering::Relaxed);
        let s0 = if hot != UNSET && self.rng.pct(sh.opts.hot_pct) {
            (hot + self.rng.below(sh.hot_len.load(Ordering::Relaxed).max(1))).min(nsect - 1)
        } else {
            self.rng.below(nsect)
        };
        let stripes = nsect.div_ceil(STRIPE_SECTORS);
        let mut k = s0 / STRIPE_SECTORS - (s0 / STRIPE_SECTORS) % nq + self.qi as u64;
        if k >= stripes {
            k = k.checked_sub(nq)?;
        }
        let lo = k * STRIPE_SECTORS;
        let hi = (lo + STRIPE_SECTORS).min(nsect);
        let start = (lo + s0 % STRIPE_SECTORS).min(hi - 1);
        let n = self.rng.range(1, sh.opts.max_sectors).min(hi - start);
        let overlaps = self
            .slots
            .iter()
            .flatten()
            .any(|f| f.sector < start + n && start < f.sector + f.n);
        (!overlaps).then_some((start, n))
    }

    fn submit(&mut self, q: &mut Blkioq, sh: &Shared, slot: usize) -> bool {
        let Some((sector, n)) = self.pick(sh) else {
            return false;
        };
        let write = self.rng.pct(sh.opts.write_pct);
        let off = self.slot_off(sh, slot);
        let len = n as usize * SECTOR;
        let pos = sector * SECTOR as u64;
        let mut id = 0;
        let mut class = 0;
        if write {
            id = sh.model.new_id();
            let data: Vec<u8> = (sector..sector + n).flat_map(|s| stamp(id, s)).collect();
            sh.mem.write(off, &data);
            let c = sh.cursor.load(Ordering::Relaxed);
            let clen = sh.cursor_len.load(Ordering::Relaxed);
            class = if c == UNSET {
                3
            } else if sector + n <= c {
                0
            } else if sector < c + clen {
                1
            } else {
                2
            };
            q.write(pos, sh.mem.ptr(off, len), len, slot, ReqFlags::empty());
        } else {
            sh.mem.fill(off, len, 0xEE);
            q.read(pos, sh.mem.ptr(off, len), len, slot, ReqFlags::empty());
        }
        self.slots[slot] = Some(InFlight {
            write,
            sector,
            n,
            id,
            class,
        });
        true
    }

    fn complete(&mut self, sh: &Shared, slot: usize, ret: i32) {
        let Some(f) = self.slots.get_mut(slot).and_then(Option::take) else {
            self.note(format!(
                "queue {}: a completion of user_data {slot}, not in flight",
                self.qi
            ));
            return;
        };
        if ret != 0 {
            self.note(format!(
                "queue {}: {} of {} sectors at {} failed: {}",
                self.qi,
                if f.write { "write" } else { "read" },
                f.n,
                f.sector,
                Errno::from_raw_os_error(-ret)
            ));
            return;
        }
        if f.write {
            sh.model.record(f.id, f.sector, f.n);
            self.report.writes += 1;
            match f.class {
                0 => self.report.before += 1,
                1 => self.report.during += 1,
                2 => self.report.after += 1,
                _ => {}
            }
            sh.writes.fetch_add(1, Ordering::Relaxed);
        } else {
            let data = sh.mem.read(self.slot_off(sh, slot), f.n as usize * SECTOR);
            let mut bad = Vec::new();
            let what = format!("queue {}: read of {} sectors at {}", self.qi, f.n, f.sector);
            let n = sh.model.compare(&what, f.sector, &data, &mut bad);
            self.report.mismatched_sectors += n as u64;
            for b in bad {
                self.note(b);
            }
            self.report.reads += 1;
        }
    }

    /// Waits in the pause with nothing in flight.
    fn idle(&mut self, sh: &Shared) {
        let mut p = sh.pause.lock().unwrap();
        p.idle += 1;
        sh.cv.notify_all();
        while p.paused && !sh.stop.load(Ordering::SeqCst) {
            p = sh.cv.wait(p).unwrap();
        }
        p.idle -= 1;
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Leaves: the requests in flight may or may not land.
    fn leave(&mut self, sh: &Shared) {
        for f in self.slots.iter().flatten() {
            if f.write {
                sh.model.record_either(f.id, f.sector, f.n);
            }
        }
        let mut p = sh.pause.lock().unwrap();
        p.idle += 1;
        sh.cv.notify_all();
    }

    fn run(mut self, mut q: Blkioq, sh: &Shared) -> (Blkioq, Report) {
        let mut last = Instant::now();
        loop {
            if sh.abandon.load(Ordering::SeqCst) {
                self.leave(sh);
                return (q, self.report);
            }
            let stopping = sh.stop.load(Ordering::SeqCst);
            let pausing = sh.paused.load(Ordering::SeqCst);
            if !stopping && !pausing {
                for slot in 0..self.slots.len() {
                    if self.slots[slot].is_none() && !self.submit(&mut q, sh, slot) {
                        break;
                    }
                }
            }
            let n = self.in_flight();
            self.report.max_in_flight = self.report.max_in_flight.max(n);
            if n == 0 {
                if stopping {
                    self.leave(sh);
                    return (q, self.report);
                }
                if pausing {
                    self.idle(sh);
                    last = Instant::now();
                }
                continue;
            }
            match client::wait(&mut q, 1, Duration::from_millis(100)) {
                Ok(done) => {
                    if !done.is_empty() {
                        last = Instant::now();
                    }
                    for d in done {
                        self.complete(sh, d.user_data, d.ret);
                    }
                }
                Err(e) if e.errno() == Errno::TIME && last.elapsed() < IO_TIMEOUT => {}
                Err(e) => {
                    if !sh.abandon.load(Ordering::SeqCst) {
                        self.note(format!(
                            "queue {}: do_io with {n} requests in flight: {e} (no completion \
                             for {:?})",
                            self.qi,
                            last.elapsed()
                        ));
                    }
                    self.leave(sh);
                    return (q, self.report);
                }
            }
        }
    }
}

// ------------------------------------------------------ control socket --

/// Sends one request line to the control socket at `path` and returns the
/// reply, whether `"ok"` is true or not.
pub fn control(path: &Path, req: &Value) -> Value {
    try_control(path, req)
        .unwrap_or_else(|e| panic!("{req} on the control socket {}: {e}", path.display()))
}

/// [`control`], with an error instead of a panic.
pub fn try_control(path: &Path, req: &Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("reply: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("unreadable reply ({e}): {answer:?}"))
}

/// `status` on the control socket (must succeed).
pub fn status_of(path: &Path) -> Value {
    let v = control(path, &json!({"v": 1, "cmd": "status"}));
    assert_eq!(v["ok"], true, "status: {v}");
    v
}

/// The `job` object of `status` (`null`: no job has run).
pub fn job_of(path: &Path) -> Value {
    status_of(path)["job"].clone()
}

/// Polls `status` until the job is no longer running; returns its final
/// `job` object. Panics after `timeout`.
pub fn wait_job_end(path: &Path, timeout: Duration) -> Value {
    let end = Instant::now() + timeout;
    loop {
        let job = job_of(path);
        if job["state"] != "running" {
            return job;
        }
        assert!(
            Instant::now() < end,
            "the job still runs after {timeout:?}: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Follows a running job: every few milliseconds reads its `bytes_done`
/// and points the load's cursor (and, with `hot`, its hot window) at the
/// chunk the job deals with next. Stops when dropped.
#[derive(Debug)]
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Follower {
    /// Follows the job on `control` for `load`, whose chunks are
    /// `chunk_sectors` long; `hot`: also draw the hot share of requests
    /// into the next two chunks.
    pub fn start(control: &Path, load: &Load, chunk_sectors: u64, hot: bool) -> Follower {
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sh, path) = (stop.clone(), load.shared.clone(), control.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("job-follower".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Ok(v) = try_control(&path, &json!({"v": 1, "cmd": "status"})) else {
                        // The daemon is gone (a kill -9 test): nothing to follow.
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let job = &v["job"];
                    let running = job["state"] == "running";
                    let done = job["bytes_done"].as_u64().unwrap_or(0) / SECTOR as u64;
                    let c = if running { done } else { UNSET };
                    sh.cursor_len.store(chunk_sectors, Ordering::Relaxed);
                    sh.cursor.store(c, Ordering::Relaxed);
                    if hot {
                        sh.hot_len.store(2 * chunk_sectors, Ordering::Relaxed);
                        sh.hot.store(c, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
            .expect("spawn the follower");
        Follower {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
