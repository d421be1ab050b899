// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! kill -9 under load: a libblkio client does verified random writes on two
//! queues; the daemon is SIGKILLed at a random moment, restarted on the same
//! COW, and the hot area is read back against a model. The backing file
//! never changes.
//!
//! - With periodic flushes: every write whose flush completed before the
//!   kill reads back intact (sectors may also hold newer data).
//! - Without any flush, checkpoints pushed out of reach: every write that
//!   *completed* before the kill reads back intact, thanks to the crash
//!   journal; and, as the negative control, with `--crash-journal off` the
//!   same run loses completed writes (they read as the backing's data).
//!
//! `KILL_ITERS` (default 25; `make crash-sweep`: 100) and `KILL_SEED`.

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use blkio::ReqFlags;
use common::*;
use common::{
    client::{self, Client, ClientConfig},
    daemon::DaemonBuilder,
};

const SECTORS: u64 = 8192; // 4 MiB hot area
const QUEUES: usize = 2;
const DEPTH: usize = 8;
const SLOT: usize = 16 * 512; // largest write: 16 sectors

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Backing,
    Write(u64),
    Other,
}

/// One write as the model knows it.
#[derive(Clone, Copy, Debug)]
struct W {
    id: u64,
    done: Option<u64>,
}

#[derive(Default)]
struct Model {
    /// Per sector: its writes in submission order (the client never has two
    /// writes to one sector in flight).
    writes: HashMap<u64, Vec<W>>,
    /// Flushes: (submit, done) sequence numbers.
    flushes: Vec<(u64, Option<u64>)>,
    /// Content every sector had (durably) when the iteration started.
    start: HashMap<u64, Content>,
}

/// What the test promises across the kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promise {
    /// Writes whose flush completed survive (R5; any crash).
    Flushed,
    /// Writes that completed survive (a process crash, with the journal).
    Completed,
}

impl Model {
    /// What sector `s` may hold after the kill.
    fn valid(&self, s: u64, promise: Promise) -> Vec<Content> {
        let durable_point = self
            .flushes
            .iter()
            .filter(|f| f.1.is_some())
            .map(|f| f.0)
            .max();
        let ws = self.writes.get(&s).map_or(&[][..], Vec::as_slice);
        let durable = match promise {
            Promise::Flushed => ws
                .iter()
                .rposition(|w| durable_point.is_some_and(|p| w.done.is_some_and(|d| d < p))),
            Promise::Completed => ws.iter().rposition(|w| w.done.is_some()),
        };
        let base = durable.map_or_else(
            || self.start.get(&s).copied().unwrap_or(Content::Backing),
            |i| Content::Write(ws[i].id),
        );
        let mut v = vec![base];
        v.extend(
            ws[durable.map_or(0, |i| i + 1)..]
                .iter()
                .map(|w| Content::Write(w.id)),
        );
        v
    }
}

fn identify(s: u64, got: &[u8]) -> Content {
    let back: Vec<u8> = (s * 512..s * 512 + 512).map(backing_byte).collect();
    if got == back.as_slice() {
        return Content::Backing;
    }
    match stamp_of(got) {
        Some((id, sector)) if sector == s => Content::Write(id),
        _ => Content::Other,
    }
}

/// State the writers share.
struct Shared<'a> {
    seq: &'a AtomicU64,
    next_id: &'a AtomicU64,
    model: &'a Mutex<Model>,
    stop: &'a AtomicBool,
    /// A flush every this many requests (0: never).
    flush_every: u64,
}

/// One queue's writer: random writes over its half of the hot area, a
/// flush every `flush_every` requests, until the daemon dies or `stop` is
/// set.
fn writer(q: &mut blkio::Blkioq, mem: client::Mem, qi: usize, seed: u64, sh: &Shared<'_>) {
    let Shared {
        seq,
        next_id,
        model,
        stop,
        flush_every,
    } = *sh;
    let mut rng = Rng::new(seed);
    let mut busy = vec![false; SECTORS as usize];
    // user_data -> (buffer slot, (sector, count, write id) or a flush)
    type Write = (u64, u64, u64);
    let mut inflight: HashMap<usize, (usize, Option<Write>)> = HashMap::new();
    let mut flush_index: HashMap<usize, usize> = HashMap::new();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut ud = 1usize;
    let mut writes = 0u64;
    let base_off = qi * DEPTH * SLOT;
    loop {
        while !stop.load(Ordering::Acquire) && !free.is_empty() {
            let slot = free.pop().unwrap();
            if flush_every > 0 && writes % flush_every == flush_every - 1 {
                let s = seq.fetch_add(1, Ordering::SeqCst);
                {
                    let mut m = model.lock().unwrap();
                    m.flushes.push((s, None));
                    // This flush's own entry: the other queue's flushes
                    // complete independently.
                    flush_index.insert(ud, m.flushes.len() - 1);
                }
                q.flush(ud, ReqFlags::empty());
                inflight.insert(ud, (slot, None));
            } else {
                let n = 1 + rng.below(16);
                // Sectors of this queue: 64-sector chunks with (chunk % 2) == qi.
                let chunk = rng.below(SECTORS / 64 / 2) * 2 + qi as u64;
                let sector = chunk * 64 + rng.below(64 - n + 1);
                if busy[sector as usize..(sector + n) as usize]
                    .iter()
                    .any(|&b| b)
                {
                    free.push(slot);
                    break;
                }
                busy[sector as usize..(sector + n) as usize].fill(true);
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let data = stamps(id, sector, n);
                let off = base_off + slot * SLOT;
                mem.write(off, &data);
                {
                    let mut m = model.lock().unwrap();
                    for sec in sector..sector + n {
                        m.writes.entry(sec).or_default().push(W { id, done: None });
                    }
                }
                q.write(
                    sector * 512,
                    mem.ptr(off, data.len()),
                    data.len(),
                    ud,
                    ReqFlags::empty(),
                );
                inflight.insert(ud, (slot, Some((sector, n, id))));
            }
            writes += 1;
            ud += 1;
        }
        if stop.load(Ordering::Acquire) && inflight.is_empty() {
            return;
        }
        let done = match client::wait(q, 1, Duration::from_millis(200)) {
            Ok(d) => d,
            Err(_) if stop.load(Ordering::Acquire) => return,
            Err(_) => continue,
        };
        for d in done {
            let Some((slot, what)) = inflight.remove(&d.user_data) else {
                continue;
            };
            free.push(slot);
            if d.ret != 0 {
                // The daemon died under the request: it did not complete.
                continue;
            }
            let s = seq.fetch_add(1, Ordering::SeqCst);
            let mut m = model.lock().unwrap();
            match what {
                None => {
                    if let Some(f) = flush_index
                        .remove(&d.user_data)
                        .and_then(|i| m.flushes.get_mut(i))
                    {
                        f.1 = Some(s);
                    }
                }
                Some((sector, n, id)) => {
                    for sec in sector..sector + n {
                        if let Some(w) = m
                            .writes
                            .get_mut(&sec)
                            .and_then(|v| v.iter_mut().find(|w| w.id == id))
                        {
                            w.done = Some(s);
                        }
                    }
                    busy[sector as usize..(sector + n) as usize].fill(false);
                }
            }
        }
    }
}

/// How one run of kill -9 iterations is set up.
struct Run {
    name: &'static str,
    promise: Promise,
    iters: usize,
    flush_every: u64,
    /// Extra `serve` arguments.
    args: &'static [&'static str],
    /// Kill after 30 ms plus up to this many.
    kill_spread_ms: u64,
    /// A new COW for every iteration (so that its writes are first writes,
    /// whose bits are what a crash can lose).
    fresh_cow: bool,
}

/// What a run saw.
struct Outcome {
    /// Sectors that read back outside the promise.
    broken: Vec<String>,
    /// Writes completed before the kills, summed.
    writes_done: usize,
    /// Sectors the restarted daemons recovered from the crash journal.
    recovered: u64,
}

#[test]
fn flushed_writes_survive_kill_9_under_load() {
    let iters: usize = std::env::var("KILL_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let out = kill9_run(&Run {
        name: "flushed",
        promise: Promise::Flushed,
        iters,
        flush_every: 16,
        args: &[],
        kill_spread_ms: 250,
        fresh_cow: false,
    });
    assert!(out.broken.is_empty(), "{}", out.broken.join("\n"));
}

/// Checkpoints out of reach (a minute, a million extents) and no flush: the
/// bits of every completed first write are only in memory when the daemon
/// dies, so only the crash journal can bring them back.
const NO_CHECKPOINT: &[&str] = &[
    "--checkpoint-ms",
    "60000",
    "--checkpoint-extents",
    "1000000",
];

#[test]
fn completed_writes_survive_kill_9_without_a_flush() {
    let iters: usize = std::env::var("KILL_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(12, |n: usize| n / 2 + 1);
    let out = kill9_run(&Run {
        name: "completed",
        promise: Promise::Completed,
        iters,
        flush_every: 0,
        args: NO_CHECKPOINT,
        kill_spread_ms: 400,
        fresh_cow: true,
    });
    println!(
        "with the journal: {} sectors of completed, unflushed writes recovered after {iters} kills",
        out.recovered
    );
    assert!(
        out.writes_done > 1000,
        "too few writes completed: {}",
        out.writes_done
    );
    assert!(out.recovered > 0, "the journal recovered nothing");
    assert!(out.broken.is_empty(), "{}", out.broken.join("\n"));
}

/// Negative control: the same run with the journal switched off loses
/// completed writes, so the test above can fail.
#[test]
fn negative_control_without_the_journal_completed_writes_are_lost() {
    let mut args = NO_CHECKPOINT.to_vec();
    args.extend(["--crash-journal", "off"]);
    let out = kill9_run(&Run {
        name: "no-journal",
        promise: Promise::Completed,
        iters: 3,
        flush_every: 0,
        args: args.leak(),
        kill_spread_ms: 400,
        fresh_cow: true,
    });
    println!(
        "without the journal: {} sectors of completed writes lost in 3 kills ({} writes completed)",
        out.broken.len(),
        out.writes_done
    );
    assert!(
        !out.broken.is_empty(),
        "with --crash-journal off every completed write survived: the journal test cannot fail"
    );
}

fn kill9_run(run: &Run) -> Outcome {
    let iters = run.iters;
    let mut broken = Vec::new();
    let mut writes_total = 0usize;
    let mut recovered = 0u64;
    let seed: u64 = std::env::var("KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b11_9000_0000_0001);
    println!(
        "{}: kill -9 iterations: {iters}, seed {seed:#x} (KILL_ITERS / KILL_SEED)",
        run.name
    );
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, SECTORS * 512);
    let base_bytes = std::fs::read(&base).unwrap();
    let cow = dir.path().join("vm.cow");
    let mut rng = Rng::new(seed);
    let next_id = AtomicU64::new(1);
    let mut current: HashMap<u64, Content> = HashMap::new();
    let mut checked_sectors = 0u64;
    let t0 = Instant::now();
    for iter in 0..iters {
        if run.fresh_cow {
            let _ = std::fs::remove_file(&cow);
            current.clear();
        }
        let d = DaemonBuilder::new(dir.path())
            .name(&format!("d{iter}"))
            .cow(&cow, Some(&base))
            .queues(QUEUES)
            .queue_size(256)
            .args(run.args)
            .spawn();
        let mut c = Client::connect(
            d.socket(),
            &ClientConfig {
                num_queues: QUEUES,
                read_only: false,
                mem_len: QUEUES * DEPTH * SLOT + (1 << 20),
            },
        )
        .unwrap();
        // Everything read back so far is durable at the start.
        if iter > 0 {
            assert_eq!(client::flush(c.q(0)), 0);
        }
        let model = Arc::new(Mutex::new(Model {
            start: current.clone(),
            ..Model::default()
        }));
        let seq = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mem = c.mem;
        let mut queues = std::mem::take(&mut c.queues);
        let kill_after = Duration::from_millis(30 + rng.below(run.kill_spread_ms));
        let killed = std::thread::scope(|sc| {
            let mut handles = Vec::new();
            for (qi, q) in queues.iter_mut().enumerate() {
                let sh = Shared {
                    seq: &seq,
                    next_id: &next_id,
                    model: &model,
                    stop: &stop,
                    flush_every: run.flush_every,
                };
                let s = rng.next();
                handles.push(sc.spawn(move || writer(q, mem, qi, s, &sh)));
            }
            std::thread::sleep(kill_after);
            d.kill();
            stop.store(true, Ordering::Release);
            for h in handles {
                h.join().unwrap();
            }
            true
        });
        assert!(killed);
        drop(queues);
        drop(c);
        drop(d);

        // Restart on the same COW and read the hot area back.
        let d = DaemonBuilder::new(dir.path())
            .name(&format!("r{iter}"))
            .cow(&cow, None)
            .queues(1)
            .queue_size(256)
            .args(run.args)
            .spawn();
        let mut c = Client::connect(
            d.socket(),
            &ClientConfig {
                num_queues: 1,
                read_only: false,
                mem_len: 1 << 20,
            },
        )
        .unwrap();
        let m = model.lock().unwrap();
        let flushes_done = m.flushes.iter().filter(|f| f.1.is_some()).count();
        let writes_done = m
            .writes
            .values()
            .flatten()
            .filter(|w| w.done.is_some())
            .count();
        let mem = c.mem;
        for start in (0..SECTORS).step_by(1024) {
            let data = client::read_at(c.q(0), mem, 0, start * 512, 1024 * 512).unwrap();
            for s in start..start + 1024 {
                let got = identify(
                    s,
                    &data[((s - start) * 512) as usize..((s - start + 1) * 512) as usize],
                );
                let valid = m.valid(s, run.promise);
                if !valid.contains(&got) {
                    broken.push(format!(
                        "iteration {iter} (killed after {kill_after:?}, {flushes_done} flushes and \
                         {writes_done} writes completed): sector {s} reads {got:?}, allowed {valid:?}"
                    ));
                }
                current.insert(s, got);
                checked_sectors += 1;
            }
        }
        writes_total += writes_done;
        recovered += d
            .log()
            .lines()
            .filter_map(|l| l.split("crash journal ").nth(1))
            .filter_map(|l| l.split(": ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
        drop(m);
        if !broken.is_empty() && run.promise == Promise::Completed && !run.args.contains(&"off") {
            // Stop at the first broken iteration (the report has it).
            drop(c);
            let _ = d.terminate();
            return Outcome {
                broken,
                writes_done: writes_total,
                recovered,
            };
        }
        assert_eq!(client::flush(c.q(0)), 0);
        drop(c);
        assert_eq!(d.terminate().code(), Some(0));
        assert!(
            std::fs::read(&base).unwrap() == base_bytes,
            "iteration {iter}: the backing file changed"
        );
        if iter < 3 || iter + 1 == iters {
            println!(
                "iteration {iter}: killed after {kill_after:?}: {writes_done} writes and {flushes_done} flushes had completed"
            );
        }
    }
    let meta = std::fs::metadata(&base).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::mtime(&meta) as u64,
        BACKING_MTIME,
        "the backing file's mtime changed"
    );
    println!(
        "{}: {iters} kill -9 iterations, {writes_total} writes completed before the kills, \
         {checked_sectors} sectors checked, {:?}",
        run.name,
        t0.elapsed()
    );
    Outcome {
        broken,
        writes_done: writes_total,
        recovered,
    }
}
