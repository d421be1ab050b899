// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Concurrency stress test of the `Disk` / `DiskQueue` API against a model.
//!
//! Several threads, each with its own queue, keep many requests in flight
//! at once (reads, writes, discards, write-zeroes, flushes) over a small hot
//! region, a slowly advancing "frontier" window (fresh sectors, so COW
//! bitmap writes keep happening next to reads of the backing file) and the
//! rest of the disk. Requests use the queue API directly: `submit` (reads
//! handed back with `Submitted::Again` are parked and submitted again once
//! `poll` says so: R4), `commit`, `poll`, `wait`.
//!
//! Every written sector carries a stamp: its sector number and a globally
//! unique write id in the first 16 bytes, the rest a pattern derived from
//! both. The backing file (or the raw image's initial content) carries the
//! stamps of write id 0. So a read tells exactly which write, zeroing op or
//! the backing file each sector came from.
//!
//! A global sequence counter (SeqCst) is read before every submit and after
//! every completion. Offline, every sector of every read must be one of:
//! (a) the content of an op to that sector that was in flight during the
//! read (submitted before the read completed, completed after it was
//! submitted); (b) the content of an op that completed before the read was
//! submitted and was not superseded (no op to the sector was submitted after
//! it completed and completed before the read was submitted); (c) the
//! backing content if no op to the sector completed before the read was
//! submitted. All-zero sectors are legal only through a discard or
//! write-zeroes candidate. A sector that mixes, word by word, the contents
//! of valid candidates while at least one of them was in flight is counted
//! as torn and accepted (virtio-blk gives no atomicity between a read and a
//! concurrent write; buffered I/O can show it), never silently.
//!
//! At the end: a final flush, stats, every sector read on the live disk,
//! shutdown, reopen, every sector read again; both must match the model's
//! final state (the same rule with the read at +infinity). The backing file
//! must be unchanged (R6).
//!
//! Environment: `STRESS_SEED` overrides each case's seed, `STRESS_OPS` the
//! number of requests per thread.

mod common;

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{splitmix, stamp, stamp_header, stamp_of, stamps, Rng, SECTOR};
use vhost_user_ubd::{
    cow::{create_cow_with, header::DEFAULT_ALIGNMENT},
    disk::{
        open_cow, open_raw, Blocking, Completion, Disk, DiskOptions, DiskQueue, IoVecs, Op,
        Request, Submitted,
    },
};

/// Disk size: 4 MiB.
const DISK_SECTORS: u64 = 8192;
/// The hot region: small, so requests overlap heavily. It starts and ends
/// in the middle of COW bitmap bytes on purpose.
const HOT_START: u64 = 1003;
const HOT_LEN: u64 = 160;
/// The frontier window advances over fresh sectors as requests are issued.
const FRONTIER_BASE: u64 = 2048;
const FRONTIER_LEN: u64 = 96;
const FRONTIER_SPAN: u64 = 5000;
/// Worker threads, each with its own queue.
const THREADS: usize = 4;
/// Most requests a thread keeps in flight (parked reads included).
const MAX_DEPTH: u64 = 16;
/// Largest read or write.
const MAX_NSECT: u64 = 64;
/// Largest discard / write-zeroes.
const MAX_ZERO_NSECT: u64 = 128;
/// Canary bytes around every iovec piece of a buffer.
const GAP: usize = 16;
const CANARY: u8 = 0xA5;
/// What a read buffer holds before the read: never a valid sector.
const POISON: u8 = 0xEE;
/// Write id of the backing file's (or raw image's initial) content.
const BACKING_ID: u64 = 0;
/// A worker that sees no completion and no retry for this long reports a
/// hang.
const STALL: Duration = Duration::from_secs(20);
/// Most mismatches reported in detail.
const MAX_REPORTED: usize = 25;

// ---------------------------------------------------------------------------
// Stamps (`common::stamp`: the sector number and the write id in the first
// 16 bytes).

/// What a read found in one sector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// The exact stamp of this sector by write `id` (0: backing).
    Data(u64),
    /// 512 zero bytes.
    Zero,
    /// Anything else (kept for the torn check and the report).
    Other(Box<[u8]>),
}

fn classify(sector: u64, data: &[u8]) -> Seen {
    if data.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    match stamp_of(data) {
        Some((id, s)) if s == sector => Seen::Data(id),
        _ => Seen::Other(data.into()),
    }
}

/// A readable account of a sector that is no valid stamp.
fn describe_other(sector: u64, data: &[u8]) -> String {
    if data.iter().all(|&b| b == POISON) {
        return "the untouched read buffer (poison): the read wrote nothing here".into();
    }
    if let Some((id, s)) = stamp_of(data).filter(|&(_, s)| s < DISK_SECTORS) {
        return format!(
            "the data of ANOTHER sector: sector {s} as written by {} (wanted sector {sector})",
            who(id)
        );
    }
    let (id, s) = stamp_header(data);
    let zeros = data.iter().filter(|&&b| b == 0).count();
    let poison = data.iter().filter(|&&b| b == POISON).count();
    format!(
        "garbage: header (sector {s}, id {id}), {zeros} zero bytes, {poison} poison bytes, first bytes {:02x?}",
        &data[..32]
    )
}

fn who(id: u64) -> String {
    if id == BACKING_ID {
        "the backing file".into()
    } else {
        format!("write #{id}")
    }
}

// ---------------------------------------------------------------------------
// What the workers record.

/// The global clock and the write id allocator.
struct Clock {
    seq: AtomicU64,
    next_id: AtomicU64,
    issued: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Self {
            seq: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            issued: AtomicU64::new(0),
        }
    }

    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Write,
    Discard,
    WriteZeroes { unmap: bool },
}

impl OpKind {
    fn zeroes(self) -> bool {
        self != Self::Write
    }
}

/// A completed op that changed sectors.
#[derive(Clone, Debug)]
struct OpRec {
    id: u64,
    kind: OpKind,
    start: u64,
    nsect: u64,
    sub: u64,
    comp: u64,
    thread: usize,
}

impl std::fmt::Display for OpRec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            OpKind::Write => "write",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes { unmap: true } => "write-zeroes(unmap)",
            OpKind::WriteZeroes { unmap: false } => "write-zeroes",
        };
        write!(
            f,
            "{what} #{} (thread {}, sectors {}+{}, seq {}..{})",
            self.id, self.thread, self.start, self.nsect, self.sub, self.comp
        )
    }
}

/// A completed read and what it found.
#[derive(Debug)]
struct ReadRec {
    thread: usize,
    start: u64,
    sub: u64,
    comp: u64,
    again: u32,
    seen: Vec<Seen>,
}

/// What one worker did.
#[derive(Debug, Default)]
struct Log {
    ops: Vec<OpRec>,
    reads: Vec<ReadRec>,
    flushes: u64,
    again: u64,
    multi_iov: u64,
    failures: Vec<String>,
}

#[derive(Debug)]
enum What {
    Read,
    Change(u64, OpKind),
    Flush,
}

/// A request between `submit` and its completion: owns the memory its
/// iovecs point at.
#[derive(Debug)]
struct Pending {
    what: What,
    start: u64,
    nsect: u64,
    sub: u64,
    again: u32,
    buf: Box<[u8]>,
    pieces: Vec<(usize, usize)>,
}

// ---------------------------------------------------------------------------
// Buffers: 1-4 iovec pieces, canaries around each.

/// A buffer of `len` payload bytes cut into pieces, with `GAP` canary bytes
/// before, between and after them.
fn layout(rng: &mut Rng, len: usize) -> (Box<[u8]>, Vec<(usize, usize)>) {
    let mut cuts = vec![0, len];
    if rng.pct(40) {
        let aligned = rng.pct(50);
        let nsect = (len / SECTOR) as u64;
        for _ in 0..1 + rng.below(3) {
            if aligned && nsect >= 2 {
                cuts.push(SECTOR * (1 + rng.below(nsect - 1)) as usize);
            } else if !aligned {
                cuts.push(1 + rng.below(len as u64 - 1) as usize);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
    }
    let mut pieces = Vec::new();
    let mut off = GAP;
    for w in cuts.windows(2) {
        let l = w[1] - w[0];
        pieces.push((off, l));
        off += l + GAP;
    }
    (vec![CANARY; off].into_boxed_slice(), pieces)
}

fn iovecs(buf: &mut [u8], pieces: &[(usize, usize)]) -> IoVecs {
    let base = buf.as_mut_ptr();
    let iov = pieces
        .iter()
        .map(|&(off, len)| libc::iovec {
            iov_base: base.wrapping_add(off).cast(),
            iov_len: len,
        })
        .collect();
    // SAFETY: every piece lies inside `buf`, a heap allocation owned by the
    // request's `Pending` entry. That entry stays in the worker's `pending`
    // map (moving the `Box` does not move the bytes) and nobody reads or
    // writes the buffer until `poll` returned the request's completion; only
    // then is the entry removed and the buffer inspected and freed. On a hang
    // the entries (and the queue) are leaked, never freed.
    unsafe { IoVecs::new(iov) }
}

fn canaries_intact(buf: &[u8], pieces: &[(usize, usize)]) -> bool {
    let mut pos = 0;
    for &(off, len) in pieces {
        if buf[pos..off].iter().any(|&b| b != CANARY) {
            return false;
        }
        pos = off + len;
    }
    buf[pos..].iter().all(|&b| b == CANARY)
}

fn gather(buf: &[u8], pieces: &[(usize, usize)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pieces.iter().map(|p| p.1).sum());
    for &(off, len) in pieces {
        out.extend_from_slice(&buf[off..off + len]);
    }
    out
}

fn scatter(buf: &mut [u8], pieces: &[(usize, usize)], data: &[u8]) {
    let mut pos = 0;
    for &(off, len) in pieces {
        buf[off..off + len].copy_from_slice(&data[pos..pos + len]);
        pos += len;
    }
}

// ---------------------------------------------------------------------------
// The workers.

/// Where a request goes: mostly the hot region, some the frontier window,
/// some anywhere.
fn pick_range(rng: &mut Rng, clock: &Clock, max: u64) -> (u64, u64) {
    let nsect = if rng.pct(60) {
        1 + rng.below(8)
    } else {
        1 + rng.below(max)
    };
    let r = rng.below(100);
    if r < 75 {
        let nsect = nsect.min(HOT_LEN);
        (HOT_START + rng.below(HOT_LEN - nsect + 1), nsect)
    } else if r < 88 {
        let nsect = nsect.min(FRONTIER_LEN);
        let at = FRONTIER_BASE + clock.issued.load(Ordering::Relaxed) / 4 % FRONTIER_SPAN;
        (at + rng.below(FRONTIER_LEN - nsect + 1), nsect)
    } else {
        (rng.below(DISK_SECTORS - nsect + 1), nsect)
    }
}

fn generate(rng: &mut Rng, clock: &Clock) -> (Op, Pending) {
    clock.issued.fetch_add(1, Ordering::Relaxed);
    let r = rng.below(100);
    let mut p = Pending {
        what: What::Flush,
        start: 0,
        nsect: 0,
        sub: 0,
        again: 0,
        buf: Box::default(),
        pieces: Vec::new(),
    };
    if r >= 96 {
        return (Op::Flush, p);
    }
    if r >= 84 {
        let (start, nsect) = pick_range(rng, clock, MAX_ZERO_NSECT);
        let kind = if r < 90 {
            OpKind::Discard
        } else {
            OpKind::WriteZeroes { unmap: rng.pct(50) }
        };
        let id = clock.new_id();
        (p.what, p.start, p.nsect) = (What::Change(id, kind), start, nsect);
        let op = match kind {
            OpKind::Discard => Op::Discard {
                sector: start,
                nsect,
            },
            OpKind::WriteZeroes { unmap } => Op::WriteZeroes {
                sector: start,
                nsect,
                unmap,
            },
            OpKind::Write => unreachable!(),
        };
        return (op, p);
    }
    let (start, nsect) = pick_range(rng, clock, MAX_NSECT);
    let len = nsect as usize * SECTOR;
    let (mut buf, pieces) = layout(rng, len);
    let op;
    if r < 44 {
        for &(off, l) in &pieces {
            buf[off..off + l].fill(POISON);
        }
        p.what = What::Read;
        let iov = iovecs(&mut buf, &pieces);
        op = Op::Read { sector: start, iov };
    } else {
        let id = clock.new_id();
        scatter(&mut buf, &pieces, &stamps(id, start, nsect));
        p.what = What::Change(id, OpKind::Write);
        let iov = iovecs(&mut buf, &pieces);
        op = Op::Write { sector: start, iov };
    }
    (p.start, p.nsect, p.buf, p.pieces) = (start, nsect, buf, pieces);
    (op, p)
}

struct Worker {
    thread: usize,
    /// Writes may be parked too (COW sectors above 512 bytes: copy-up).
    writes_may_wait: bool,
    queue: Box<dyn DiskQueue>,
    clock: Arc<Clock>,
    pending: HashMap<u64, Pending>,
    parked: Vec<Request>,
    log: Log,
    /// `in_flight()` disagreed once (reported once).
    in_flight_wrong: bool,
}

impl Worker {
    fn submit(&mut self, req: Request) {
        let tag = req.tag;
        let is_read = matches!(req.op, Op::Read { .. });
        let sub = self.clock.tick();
        if let Some(p) = self.pending.get_mut(&tag) {
            p.sub = sub;
        }
        match self.queue.submit(req) {
            Submitted::Queued => {}
            Submitted::Again(r) => {
                if !is_read && !self.writes_may_wait {
                    self.fail(format!("tag {tag}: a non-read was handed back with Again"));
                }
                if r.tag != tag {
                    self.fail(format!("tag {tag}: Again handed back tag {}", r.tag));
                }
                self.log.again += 1;
                if let Some(p) = self.pending.get_mut(&tag) {
                    p.again += 1;
                }
                self.parked.push(r);
            }
        }
    }

    fn fail(&mut self, msg: String) {
        self.log
            .failures
            .push(format!("thread {}: {msg}", self.thread));
    }

    fn complete(&mut self, c: Completion, comp: u64) {
        let Some(p) = self.pending.remove(&c.tag) else {
            self.fail(format!(
                "completion for unknown or already completed tag {}",
                c.tag
            ));
            return;
        };
        if let Err(errno) = c.result {
            self.fail(format!(
                "{:?} of sectors {}+{} failed: {}",
                p.what,
                p.start,
                p.nsect,
                std::io::Error::from_raw_os_error(errno)
            ));
        }
        match p.what {
            What::Flush => self.log.flushes += 1,
            What::Change(id, kind) => self.log.ops.push(OpRec {
                id,
                kind,
                start: p.start,
                nsect: p.nsect,
                sub: p.sub,
                comp,
                thread: self.thread,
            }),
            What::Read => {
                if !canaries_intact(&p.buf, &p.pieces) {
                    self.fail(format!(
                        "read of sectors {}+{} wrote outside its iovecs (pieces {:?})",
                        p.start, p.nsect, p.pieces
                    ));
                }
                if c.result.is_err() {
                    return;
                }
                let data = gather(&p.buf, &p.pieces);
                let seen = data
                    .chunks_exact(SECTOR)
                    .enumerate()
                    .map(|(i, d)| classify(p.start + i as u64, d))
                    .collect();
                self.log.reads.push(ReadRec {
                    thread: self.thread,
                    start: p.start,
                    sub: p.sub,
                    comp,
                    again: p.again,
                    seen,
                });
            }
        }
    }

    fn run(mut self, seed: u64, n_ops: usize) -> Log {
        let mut rng = Rng::new(seed ^ splitmix(self.thread as u64 + 1));
        let mut out = Vec::new();
        let (mut next_tag, mut issued, mut depth) = (1u64, 0usize, 1usize);
        let mut last_progress = Instant::now();
        loop {
            while issued < n_ops && self.pending.len() < depth {
                if issued % 32 == 0 {
                    depth = 1 + rng.below(MAX_DEPTH) as usize;
                }
                let (op, p) = generate(&mut rng, &self.clock);
                if p.pieces.len() > 1 {
                    self.log.multi_iov += 1;
                }
                let tag = next_tag;
                next_tag += 1;
                self.pending.insert(tag, p);
                self.submit(Request { op, tag });
                issued += 1;
            }
            if let Err(e) = self.queue.commit() {
                self.fail(format!("commit: {e}"));
            }
            let retry = self.queue.poll(&mut out);
            let progressed = !out.is_empty();
            for c in out.drain(..) {
                let comp = self.clock.tick();
                self.complete(c, comp);
            }
            if retry {
                for r in std::mem::take(&mut self.parked) {
                    self.submit(r);
                }
                if let Err(e) = self.queue.commit() {
                    self.fail(format!("commit: {e}"));
                }
            }
            let accepted = self.pending.len() - self.parked.len();
            if self.queue.in_flight() != accepted && !self.in_flight_wrong {
                self.in_flight_wrong = true;
                let n = self.queue.in_flight();
                self.fail(format!(
                    "queue.in_flight() is {n} but {accepted} accepted requests have not completed"
                ));
            }
            if issued == n_ops && self.pending.is_empty() {
                break;
            }
            if progressed || retry {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL {
                let parked: Vec<String> = self
                    .parked
                    .iter()
                    .map(|r| format!("{:?}", r.op.sectors()))
                    .collect();
                let msg = format!(
                    "HANG: no completion and no retry for {STALL:?}; {} requests outstanding \
                     (queue in_flight {}), {} parked reads {parked:?}; outstanding: {:?}",
                    self.pending.len(),
                    self.queue.in_flight(),
                    self.parked.len(),
                    self.pending
                        .values()
                        .map(|p| (&p.what, p.start, p.nsect, p.again))
                        .collect::<Vec<_>>()
                );
                self.fail(msg);
                // The kernel may still write into these buffers: leak them.
                std::mem::forget(std::mem::take(&mut self.pending));
                std::mem::forget(std::mem::take(&mut self.parked));
                let log = std::mem::take(&mut self.log);
                std::mem::forget(self);
                return log;
            } else {
                self.queue.wait(Some(Duration::from_millis(50)));
            }
        }
        if self.queue.in_flight() != 0 {
            let n = self.queue.in_flight();
            self.fail(format!(
                "queue reports {n} in flight after every completion"
            ));
        }
        std::mem::take(&mut self.log)
    }
}

// ---------------------------------------------------------------------------
// The model.

struct Model<'a> {
    ops: &'a [OpRec],
    by_id: HashMap<u64, usize>,
    /// Ops touching each sector, by completion.
    on: Vec<Vec<usize>>,
    /// Per sector: `latest[s][k]` = the latest submit among `on[s][..=k]`.
    latest: Vec<Vec<u64>>,
}

enum Verdict {
    Clean,
    /// Accepted, with its pieces.
    Torn(String),
}

impl<'a> Model<'a> {
    fn new(ops: &'a [OpRec]) -> Self {
        let mut on = vec![Vec::new(); DISK_SECTORS as usize];
        let mut by_id = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            by_id.insert(op.id, i);
            for s in op.start..op.start + op.nsect {
                on[s as usize].push(i);
            }
        }
        let latest = on
            .iter_mut()
            .map(|list| {
                list.sort_by_key(|&i| ops[i].comp);
                list.iter()
                    .scan(0, |m, &i| {
                        *m = ops[i].sub.max(*m);
                        Some(*m)
                    })
                    .collect()
            })
            .collect();
        Self {
            ops,
            by_id,
            on,
            latest,
        }
    }

    /// `(any op to s completed before r_sub, the latest submit among them)`.
    fn history(&self, s: u64, r_sub: u64) -> (bool, u64) {
        let on = &self.on[s as usize];
        let k = on.partition_point(|&i| self.ops[i].comp < r_sub);
        match k.checked_sub(1) {
            Some(last) => (true, self.latest[s as usize][last]),
            None => (false, 0),
        }
    }

    /// Rules (a) and (b) for one op. `latest`: see `history`. An op X that
    /// completed before the read was submitted is superseded exactly when
    /// an op Y that also did was submitted after X completed, i.e. when the
    /// latest submit among those ops comes after X's completion.
    fn valid(x: &OpRec, r_sub: u64, r_comp: u64, latest: u64) -> bool {
        let in_flight = x.sub < r_comp && x.comp > r_sub;
        let last_done = x.comp < r_sub && x.comp > latest;
        in_flight || last_done
    }

    /// The valid candidates for sector `s` read during `[r_sub, r_comp]`:
    /// `(None = backing | Some(op), in flight during the read)`.
    fn candidates(&self, s: u64, r_sub: u64, r_comp: u64) -> Vec<(Option<&OpRec>, bool)> {
        let (any, latest) = self.history(s, r_sub);
        let mut out = Vec::new();
        if !any {
            out.push((None, false));
        }
        for &i in &self.on[s as usize] {
            let x = &self.ops[i];
            if Self::valid(x, r_sub, r_comp, latest) {
                out.push((Some(x), x.sub < r_comp && x.comp > r_sub));
            }
        }
        out
    }

    fn judge(&self, s: u64, seen: &Seen, r_sub: u64, r_comp: u64) -> Option<Verdict> {
        let (any, latest) = self.history(s, r_sub);
        let covers = |x: &OpRec| x.start <= s && s < x.start + x.nsect;
        let ok = match seen {
            Seen::Data(BACKING_ID) => !any,
            Seen::Data(id) => self.by_id.get(id).is_some_and(|&i| {
                let x = &self.ops[i];
                x.kind == OpKind::Write && covers(x) && Self::valid(x, r_sub, r_comp, latest)
            }),
            Seen::Zero => self.on[s as usize].iter().any(|&i| {
                let x = &self.ops[i];
                x.kind.zeroes() && Self::valid(x, r_sub, r_comp, latest)
            }),
            Seen::Other(data) => return self.torn(s, data, r_sub, r_comp).map(Verdict::Torn),
        };
        ok.then_some(Verdict::Clean)
    }

    /// Accepts a torn sector: a read racing writes or punches on the page
    /// cache may see each byte from the old content or from one of the ops
    /// in flight (the tear falls where a copy was cut: a memcpy chunk, an
    /// iovec boundary inside the sector). So every byte must come from an op
    /// in flight during the read or from ONE other valid candidate (what the
    /// sector held), and at least one op must be in flight. Returns the
    /// pieces, e.g. "0..300 write #5, 300..512 zeros #7".
    fn torn(&self, s: u64, data: &[u8], r_sub: u64, r_comp: u64) -> Option<String> {
        let cands = self.candidates(s, r_sub, r_comp);
        if !cands.iter().any(|c| c.1) {
            return None;
        }
        let content = |op: &Option<&OpRec>| match op {
            None => ("backing".to_string(), stamp(BACKING_ID, s)),
            Some(x) if x.kind.zeroes() => (format!("zeros #{}", x.id), [0u8; SECTOR]),
            Some(x) => (format!("write #{}", x.id), stamp(x.id, s)),
        };
        let flying: Vec<(String, [u8; SECTOR])> = cands
            .iter()
            .filter(|c| c.1)
            .map(|c| content(&c.0))
            .collect();
        let settled: Vec<(String, [u8; SECTOR])> = cands
            .iter()
            .filter(|c| !c.1)
            .map(|c| content(&c.0))
            .collect();
        let olds: Vec<Option<&(String, [u8; SECTOR])>> = if settled.is_empty() {
            vec![None]
        } else {
            settled.iter().map(Some).collect()
        };
        olds.into_iter().find_map(|old| {
            let allowed: Vec<&(String, [u8; SECTOR])> = flying.iter().chain(old).collect();
            cover(data, &allowed)
        })
    }

    fn explain(&self, s: u64, seen: &Seen, r_sub: u64, r_comp: u64) -> String {
        let saw = match seen {
            Seen::Data(BACKING_ID) => "the backing content".to_string(),
            Seen::Data(id) => match self.by_id.get(id) {
                Some(&i) => format!("{}", self.ops[i]),
                None => format!("write #{id}, which no completed write has"),
            },
            Seen::Zero => "zeros".into(),
            Seen::Other(d) => describe_other(s, d),
        };
        let cands: Vec<String> = self
            .candidates(s, r_sub, r_comp)
            .iter()
            .map(|(op, flying)| match op {
                None => "backing".into(),
                Some(x) => format!("{x}{}", if *flying { " in flight" } else { "" }),
            })
            .collect();
        let done_before: Vec<String> = self.on[s as usize]
            .iter()
            .map(|&i| &self.ops[i])
            .filter(|x| x.comp < r_sub)
            .map(ToString::to_string)
            .collect();
        let recent = &done_before[done_before.len().saturating_sub(4)..];
        format!(
            "saw {saw}; valid: [{}]; last ops completed before it: [{}]",
            cands.join(", "),
            recent.join(", ")
        )
    }
}

/// Cuts `data` into runs, each equal to the same bytes of one of `from`
/// (greedy, longest run first); None when some byte matches none.
fn cover(data: &[u8], from: &[&(String, [u8; SECTOR])]) -> Option<String> {
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let (name, end) = from
            .iter()
            .map(|(name, c)| {
                let n = c[at..]
                    .iter()
                    .zip(&data[at..])
                    .take_while(|(a, b)| a == b)
                    .count();
                (name, at + n)
            })
            .max_by_key(|&(_, end)| end)?;
        if end == at {
            return None;
        }
        pieces.push(format!("{at}..{end} {name}"));
        at = end;
    }
    Some(pieces.join(", "))
}

/// Checks every sector of every read; returns (sectors, torn).
fn check_reads(model: &Model, reads: &[ReadRec], failures: &mut Vec<String>) -> (u64, u64) {
    let (mut sectors, mut torn) = (0, 0);
    for r in reads {
        for (i, seen) in r.seen.iter().enumerate() {
            let s = r.start + i as u64;
            sectors += 1;
            match model.judge(s, seen, r.sub, r.comp) {
                Some(Verdict::Clean) => {}
                Some(Verdict::Torn(pieces)) => {
                    torn += 1;
                    if torn <= 3 {
                        println!(
                            "  torn (accepted): sector {s}, read by thread {} of sectors {}+{} \
                             (seq {}..{}): {pieces}",
                            r.thread,
                            r.start,
                            r.seen.len(),
                            r.sub,
                            r.comp
                        );
                    }
                }
                None => {
                    if failures.len() < MAX_REPORTED {
                        failures.push(format!(
                            "sector {s}: read by thread {} of sectors {}+{} (seq {}..{}, parked {} times): {}",
                            r.thread,
                            r.start,
                            r.seen.len(),
                            r.sub,
                            r.comp,
                            r.again,
                            model.explain(s, seen, r.sub, r.comp)
                        ));
                    } else if failures.len() == MAX_REPORTED {
                        failures.push("(more mismatches not shown)".into());
                    }
                }
            }
        }
    }
    (sectors, torn)
}

/// Checks a whole-disk image against the model's final state.
fn check_final(model: &Model, what: &str, image: &[Seen], failures: &mut Vec<String>) {
    let mut bad = 0;
    for (s, seen) in image.iter().enumerate() {
        let s = s as u64;
        if model.judge(s, seen, u64::MAX, u64::MAX).is_none() {
            bad += 1;
            if bad <= MAX_REPORTED {
                failures.push(format!(
                    "{what}: sector {s}: {}",
                    model.explain(s, seen, u64::MAX, u64::MAX)
                ));
            }
        }
    }
    if bad > MAX_REPORTED {
        failures.push(format!("{what}: {bad} bad sectors in all"));
    }
}

// ---------------------------------------------------------------------------
// Cases.

fn write_pattern(path: &Path) {
    fs::write(path, stamps(BACKING_ID, 0, DISK_SECTORS)).expect("write the backing file");
}

fn read_all(disk: &dyn Disk) -> Result<Vec<Seen>, String> {
    let mut b = Blocking::new(disk).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(DISK_SECTORS as usize);
    let mut buf = vec![POISON; 64 * SECTOR];
    for start in (0..DISK_SECTORS).step_by(64) {
        buf.fill(POISON);
        b.read(start, &mut buf)
            .map_err(|e| format!("read of sectors {start}+64 failed: errno {e}"))?;
        for (i, d) in buf.chunks_exact(SECTOR).enumerate() {
            out.push(classify(start + i as u64, d));
        }
    }
    Ok(out)
}

struct Case {
    name: &'static str,
    cow: bool,
    opts: DiskOptions,
    seed: u64,
    ops_per_thread: usize,
    /// Flip writeback / writethrough every few milliseconds during the run
    /// (a guest toggling WCE).
    toggle_cache_mode: bool,
    /// Bytes one COW bitmap bit covers (`create --sectorsize`): above 512,
    /// writes smaller than a COW sector copy the rest up from the backing.
    sectorsize: u32,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn open(cow: bool, path: &Path, opts: &DiskOptions) -> Arc<dyn Disk> {
    let r = if cow {
        open_cow(path, opts)
    } else {
        open_raw(path, opts)
    };
    r.unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn run_case(case: &Case) {
    let seed = env_u64("STRESS_SEED").unwrap_or(case.seed);
    let n_ops = env_u64("STRESS_OPS").map_or(case.ops_per_thread, |n| n as usize);
    println!(
        "[{}] seed {seed:#x} (STRESS_SEED={seed:#x} reproduces), {THREADS} threads x {n_ops} requests, \
         hot {HOT_START}+{HOT_LEN}, options {:?}",
        case.name, case.opts
    );
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing.img");
    write_pattern(&backing);
    let backing_meta = fs::metadata(&backing).expect("stat backing");
    let (path, opts): (PathBuf, DiskOptions) = if case.cow {
        let path = dir.path().join("disk.cow");
        create_cow_with(&path, &backing, DEFAULT_ALIGNMENT, case.sectorsize)
            .expect("create the COW file");
        let opts = DiskOptions {
            backing: Some(backing.clone()),
            ..case.opts.clone()
        };
        (path, opts)
    } else {
        let path = dir.path().join("disk.raw");
        fs::copy(&backing, &path).expect("copy the raw image");
        (path, case.opts.clone())
    };
    let disk = open(case.cow, &path, &opts);
    assert_eq!(disk.info().sectors(), DISK_SECTORS);

    let clock = Arc::new(Clock::new());
    let writes_may_wait = case.cow && case.sectorsize > 512;
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let disk = disk.clone();
            let clock = clock.clone();
            std::thread::Builder::new()
                .name(format!("stress-{thread}"))
                .spawn(move || {
                    let queue = match disk.new_queue() {
                        Ok(q) => q,
                        Err(e) => {
                            return Log {
                                failures: vec![format!("thread {thread}: new_queue: {e}")],
                                ..Log::default()
                            }
                        }
                    };
                    let w = Worker {
                        thread,
                        writes_may_wait,
                        queue,
                        clock,
                        pending: HashMap::new(),
                        parked: Vec::new(),
                        log: Log::default(),
                        in_flight_wrong: false,
                    };
                    w.run(seed, n_ops)
                })
                .expect("spawn a worker")
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = case.toggle_cache_mode.then(|| {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                disk.set_writeback(!disk.writeback());
                flips += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            flips
        })
    });
    let logs: Vec<Log> = workers
        .into_iter()
        .map(|h| h.join().expect("a worker panicked"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = toggler {
        let flips = t.join().expect("the toggler panicked");
        println!("[{}] cache mode flipped {flips} times", case.name);
    }
    let t_run = t0.elapsed();

    let mut failures: Vec<String> = logs.iter().flat_map(|l| l.failures.clone()).collect();
    if failures.iter().any(|f| f.contains("HANG")) {
        // Requests are still in flight; shutting down could block for long.
        std::mem::forget(disk);
        panic!(
            "[{}] seed {seed:#x}: {} failures:\n{}",
            case.name,
            failures.len(),
            failures.join("\n")
        );
    }
    let again: u64 = logs.iter().map(|l| l.again).sum();
    let flushes: u64 = logs.iter().map(|l| l.flushes).sum();
    let multi: u64 = logs.iter().map(|l| l.multi_iov).sum();
    let mut ops: Vec<OpRec> = logs.iter().flat_map(|l| l.ops.iter().cloned()).collect();
    ops.sort_by_key(|o| o.sub);
    let reads: Vec<&ReadRec> = logs.iter().flat_map(|l| &l.reads).collect();

    // Final flush, stats, the live disk's final content, shutdown.
    match Blocking::new(&*disk).map(|mut b| b.flush()) {
        Ok(Ok(())) => {}
        other => failures.push(format!("final flush: {other:?}")),
    }
    let stats = disk.stats();
    println!("[{}] stats after the run: {stats:?}", case.name);
    // Every hand-back is counted, once per read or once per `Again`.
    let parked_reads = logs
        .iter()
        .flat_map(|l| &l.reads)
        .filter(|r| r.again > 0)
        .count() as u64;
    // Copy-ups park reads and writes of their sector (`writes_held`).
    let counted = stats.reads_parked + stats.writes_held;
    if writes_may_wait {
        if stats.copy_ups == 0 || counted < parked_reads || counted > again {
            failures.push(format!(
                "{} copy-ups; reads_parked {} + writes_held {} is not within {parked_reads}..={again} \
                 hand-backs",
                stats.copy_ups, stats.reads_parked, stats.writes_held
            ));
        }
    } else if !(parked_reads..=again).contains(&stats.reads_parked) {
        failures.push(format!(
            "stats.reads_parked is {} but {parked_reads} reads were handed back {again} times",
            stats.reads_parked
        ));
    }
    let live = read_all(&*disk);
    if let Err(e) = disk.shutdown() {
        failures.push(format!("shutdown: {e}"));
    }
    drop(disk);
    let t_close = t0.elapsed();

    // Reopen and read everything again.
    let disk = open(case.cow, &path, &opts);
    let reopened = read_all(&*disk);
    if let Err(e) = disk.shutdown() {
        failures.push(format!("shutdown after reopen: {e}"));
    }
    drop(disk);

    // R6: the backing file is untouched.
    let after = fs::metadata(&backing).expect("stat backing");
    if (after.len(), after.mtime(), after.mtime_nsec())
        != (
            backing_meta.len(),
            backing_meta.mtime(),
            backing_meta.mtime_nsec(),
        )
    {
        failures.push("the backing file's size or mtime changed".into());
    }
    let content = fs::read(&backing).expect("read backing");
    for (s, d) in content.chunks_exact(SECTOR).enumerate() {
        if classify(s as u64, d) != Seen::Data(BACKING_ID) {
            failures.push(format!("the backing file's sector {s} changed"));
            break;
        }
    }

    // The offline check.
    let t_check = Instant::now();
    let model = Model::new(&ops);
    let mut sectors = 0;
    let mut torn = 0;
    for l in &logs {
        let (s, t) = check_reads(&model, &l.reads, &mut failures);
        sectors += s;
        torn += t;
    }
    for (what, image) in [("live final read", live), ("after reopen", reopened)] {
        match image {
            Ok(image) => check_final(&model, what, &image, &mut failures),
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    let zero_ops = ops.iter().filter(|o| o.kind.zeroes()).count();
    println!(
        "[{}] {} reads ({sectors} sectors checked, {torn} torn, {parked_reads} parked, {again} Again), \
         {} writes, {zero_ops} discards/write-zeroes, {flushes} flushes, {multi} multi-iovec; \
         run {:.2?}, flush+shutdown {:.2?}, check {:.2?}, total {:.2?}",
        case.name,
        reads.len(),
        ops.len() - zero_ops,
        t_run,
        t_close - t_run,
        t_check.elapsed(),
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "[{}] seed {seed:#x}: {} failures:\n{}",
        case.name,
        failures.len(),
        failures.join("\n")
    );
}

const OPS: usize = 6000;

#[test]
fn cow_writeback_stress() {
    run_case(&Case {
        name: "cow-writeback",
        cow: true,
        opts: DiskOptions::default(),
        seed: 0xC0_0001,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

#[test]
fn cow_writethrough_stress() {
    run_case(&Case {
        name: "cow-writethrough",
        cow: true,
        opts: DiskOptions {
            writeback: false,
            ..DiskOptions::default()
        },
        seed: 0xC0_0002,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

/// Checkpoints mid-run: few pending extents and a short age.
#[test]
fn cow_checkpoint_stress() {
    run_case(&Case {
        name: "cow-checkpoints",
        cow: true,
        opts: DiskOptions {
            max_pending_extents: 8,
            max_pending_age: Duration::from_millis(5),
            ..DiskOptions::default()
        },
        seed: 0xC0_0003,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

/// Bitmap writes held 2 ms: overlapping bitmap writes wait (R3) and reads
/// of the backing file park (R4).
#[test]
fn cow_slow_bitmap_writes_stress() {
    run_case(&Case {
        name: "cow-slow-bitmap",
        cow: true,
        opts: DiskOptions {
            max_pending_extents: 8,
            bitmap_write_delay: Duration::from_millis(2),
            ..DiskOptions::default()
        },
        seed: 0xC0_0004,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

/// Writethrough with slow bitmap writes: every first write of a sector
/// waits for its bitmap write.
#[test]
fn cow_writethrough_slow_bitmap_writes_stress() {
    run_case(&Case {
        name: "cow-writethrough-slow-bitmap",
        cow: true,
        opts: DiskOptions {
            writeback: false,
            bitmap_write_delay: Duration::from_millis(2),
            ..DiskOptions::default()
        },
        seed: 0xC0_0005,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

#[test]
fn raw_writeback_stress() {
    run_case(&Case {
        name: "raw-writeback",
        cow: false,
        opts: DiskOptions::default(),
        seed: 0x5A_0001,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

#[test]
fn raw_writethrough_stress() {
    run_case(&Case {
        name: "raw-writethrough",
        cow: false,
        opts: DiskOptions {
            writeback: false,
            ..DiskOptions::default()
        },
        seed: 0x5A_0002,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

/// The guest flips the write cache (WCE) back and forth while requests run:
/// writes that completed in one mode and reads of them in the other.
#[test]
fn cow_toggle_cache_mode_stress() {
    run_case(&Case {
        name: "cow-toggle-cache-mode",
        cow: true,
        opts: DiskOptions {
            max_pending_extents: 64,
            ..DiskOptions::default()
        },
        seed: 0xC0_0006,
        ops_per_thread: OPS,
        toggle_cache_mode: true,
        sectorsize: 512,
    });
}

/// `O_DIRECT` data: misaligned iovec pieces go through bounce buffers.
#[test]
fn cow_direct_stress() {
    let aio_before = vhost_user_ubd::engine::aio::submitted();
    run_case(&Case {
        name: "cow-direct",
        cow: true,
        opts: DiskOptions {
            direct: true,
            max_pending_extents: 8,
            ..DiskOptions::default()
        },
        seed: 0xC0_0007,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
    // With `--aio native` (the default) O_DIRECT data writes go through
    // Linux AIO (engine::aio, CowQueue::write).
    assert!(
        vhost_user_ubd::engine::aio::submitted() > aio_before,
        "no write took the Linux AIO path"
    );
}

#[test]
fn raw_direct_stress() {
    run_case(&Case {
        name: "raw-direct",
        cow: false,
        opts: DiskOptions {
            direct: true,
            ..DiskOptions::default()
        },
        seed: 0x5A_0003,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

/// A tiny ring (4 submission entries, 16 completion entries) under 16
/// requests in flight, some split into many operations (COW reads over
/// alternating COW and backing runs): the submission queue fills and the
/// completion queue can overflow.
#[test]
fn cow_small_ring_stress() {
    run_case(&Case {
        name: "cow-small-ring",
        cow: true,
        opts: DiskOptions {
            ring_entries: 4,
            max_pending_extents: 8,
            ..DiskOptions::default()
        },
        seed: 0xC0_0008,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

#[test]
fn raw_small_ring_stress() {
    run_case(&Case {
        name: "raw-small-ring",
        cow: false,
        opts: DiskOptions {
            ring_entries: 4,
            ..DiskOptions::default()
        },
        seed: 0x5A_0004,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 512,
    });
}

/// The checker itself, on hand-made histories (sector 10 unless said).
#[test]
fn model_rules() {
    let op = |id, kind, sub, comp| OpRec {
        id,
        kind,
        start: 8,
        nsect: 4,
        sub,
        comp,
        thread: 0,
    };
    let ops = [
        op(1, OpKind::Write, 10, 20),
        op(2, OpKind::Write, 30, 40),
        op(3, OpKind::Discard, 50, 60),
        op(4, OpKind::Write, 100, 130),
        op(5, OpKind::WriteZeroes { unmap: false }, 110, 120),
    ];
    let m = Model::new(&ops);
    let ok = |seen: Seen, r: (u64, u64)| m.judge(10, &seen, r.0, r.1).is_some();
    // (c) backing before anything completed; (a) write 1 in flight.
    assert!(ok(Seen::Data(BACKING_ID), (5, 15)));
    assert!(ok(Seen::Data(1), (5, 15)));
    assert!(!ok(Seen::Data(2), (5, 15)));
    assert!(!ok(Seen::Zero, (5, 15)));
    // (b) write 1 completed and not superseded, (a) write 2 in flight.
    assert!(ok(Seen::Data(1), (25, 35)));
    assert!(ok(Seen::Data(2), (25, 35)));
    assert!(!ok(Seen::Data(BACKING_ID), (25, 35)));
    // Write 2 superseded write 1.
    assert!(!ok(Seen::Data(1), (45, 48)));
    assert!(ok(Seen::Data(2), (45, 48)));
    // The discard superseded write 2: only zeros.
    assert!(ok(Seen::Zero, (70, 80)));
    assert!(!ok(Seen::Data(2), (70, 80)));
    // Writes 4 and 5 overlapped: both are valid afterwards, the discard not.
    assert!(ok(Seen::Data(4), (140, 150)));
    assert!(ok(Seen::Zero, (140, 150)));
    assert!(!ok(Seen::Data(3), (140, 150)));
    // Another sector's data, or a stamp of this sector by a write that
    // never touched it, is never valid.
    assert!(!ok(Seen::Data(99), (140, 150)));
    assert!(m
        .judge(10, &classify(10, &stamp(4, 11)), 140, 150)
        .is_none());
    // A sector torn between write 1 (held) and write 2 (in flight) passes;
    // one torn between write 1 and zeros nobody wrote does not.
    let mut torn = stamp(1, 10);
    torn[200..].copy_from_slice(&stamp(2, 10)[200..]);
    assert!(matches!(
        m.judge(10, &classify(10, &torn), 25, 35),
        Some(Verdict::Torn(_))
    ));
    let mut zeroed = stamp(1, 10);
    zeroed[200..].fill(0);
    assert!(m.judge(10, &classify(10, &zeroed), 25, 35).is_none());
    // Torn between two settled writes (4 and a copy of 5's zeros) with
    // nothing in flight: a write-write tear on disk, refused.
    let mut settled = stamp(4, 10);
    settled[100..].fill(0);
    assert!(m.judge(10, &classify(10, &settled), 140, 150).is_none());
    // The final state: the read at +infinity.
    assert!(ok(Seen::Data(4), (u64::MAX, u64::MAX)));
    assert!(ok(Seen::Zero, (u64::MAX, u64::MAX)));
    assert!(!ok(Seen::Data(2), (u64::MAX, u64::MAX)));
    assert!(m
        .judge(10, &classify(10, &torn), u64::MAX, u64::MAX)
        .is_none());
    // Sectors nobody wrote hold the backing content, and only that.
    assert!(m
        .judge(100, &Seen::Data(BACKING_ID), u64::MAX, u64::MAX)
        .is_some());
    assert!(m.judge(100, &Seen::Zero, u64::MAX, u64::MAX).is_none());
}

/// COW sectors of 4096 bytes: most writes cover part of a cold COW sector
/// and copy the rest up first; concurrent writes and reads of that sector
/// wait for the one elected copy (the model still holds every read).
#[test]
fn cow_sectorsize_4096_stress() {
    run_case(&Case {
        name: "cow-sectorsize-4096",
        cow: true,
        opts: DiskOptions::default(),
        seed: 0xC0_4096,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 4096,
    });
}

/// The same in writethrough mode (a write's registration at the gate
/// lasts until its bits are durable).
#[test]
fn cow_sectorsize_4096_writethrough_stress() {
    run_case(&Case {
        name: "cow-sectorsize-4096-writethrough",
        cow: true,
        opts: DiskOptions {
            writeback: false,
            ..DiskOptions::default()
        },
        seed: 0xC0_4097,
        ops_per_thread: OPS,
        toggle_cache_mode: false,
        sectorsize: 4096,
    });
}

/// Negative control of the copy-up: the same run with the copy-up switched
/// off (test hook) loses the backing's data around partial writes, and the
/// model says so. Runs this test binary again, as its own process (the
/// hook is read once per process).
#[test]
fn without_the_copy_up_the_4096_stress_fails() {
    if std::env::var_os("VHOST_USER_UBD_TEST_GATE_OFF").is_some() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "cow_sectorsize_4096_stress", "--nocapture"])
        .env("VHOST_USER_UBD_TEST_GATE_OFF", "copy-up")
        .env("STRESS_OPS", "2000")
        .output()
        .expect("run the stress");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the stress passed without the copy-up:\n{text}"
    );
    assert!(
        text.contains("saw zeros; valid: [backing]"),
        "it failed, but not on data:\n{}",
        text.lines()
            .filter(|l| !l.contains("torn (accepted)"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
