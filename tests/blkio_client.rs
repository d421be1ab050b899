// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real daemon binary driven over its real socket by a real client
//! (libblkio, `docs/blkio-client.md`). Every test checks data against a
//! model, not just status codes.
//!
//! - Random I/O (raw and COW, 1 and 4 queues): one thread per queue,
//!   several requests in flight on each; reads, writes (4..64 KiB at any
//!   sector), discards, write-zeroes and flushes all over the disk. The
//!   model allows any number of requests in flight on any queues as long
//!   as no two overlap, so neighbouring requests on different queues share
//!   COW bitmap bytes and pages. Every read is checked when it completes;
//!   then targeted discards / write-zeroes (the partial tail sector
//!   included) must read as zeros, and the whole disk is read back.
//!   For COW: SIGTERM (exit 0), `uml_moo` must equal what the client last
//!   read, and the set bits must be exactly the sectors written, discarded
//!   or zeroed; the backing file must be untouched (R6, R7).
//! - `--readonly` (raw and COW): the client must open read-only; writes,
//!   discards and write-zeroes fail, reads return the right data, the files
//!   do not change.
//! - Bad requests (R8): out of range, and buffers wholly or partly outside
//!   guest memory, get error completions (or a dropped connection),
//!   requests next to them are unaffected, the daemon keeps running and a
//!   new client reads the right data.
//! - libblkio must be able to connect to a daemon with default options
//!   (fails today: see `libblkio_connects_to_a_daemon_with_default_limits`).
//! - Disconnect / reconnect with different queue counts (raw and COW).
//! - R4 through the socket, with the daemon's bitmap-write delay hook.
//!
//! Each test prints its duration on stderr (not captured).

mod common;

use std::{
    io::Write,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Barrier, Mutex,
    },
    time::{Duration, Instant},
};

use common::{
    backing_byte,
    client::{
        self, Blkioq, Client, ClientConfig, Errno, Mem, ReqFlags, IO_TIMEOUT, MAX_DAEMON_QUEUE_SIZE,
    },
    daemon::{Daemon, DaemonBuilder},
    disk_bitmap, make_backing, set_sectors, stamp_of, stamps, uml_moo, Rng, BACKING_MTIME,
};

/// Bytes per sector.
const SECTOR: u64 = 512;
/// Largest request of the random workload.
const MAX_IO: usize = 64 << 10;
/// Requests in flight per queue in the random workload.
const DEPTH: usize = 8;
/// Size of the raw image of the random workload.
const RAW_SIZE: u64 = 16 << 20;
/// Size of the COW backing: not a sector multiple, so the last sector is
/// half backing data, half zeros (R7), and `uml_moo` drops it.
const COW_BACKING_SIZE: u64 = (16 << 20) + 1000;

/// Runs `f`, printing how long it took (straight to stderr: libtest does
/// not capture that).
fn timed<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    let _ = writeln!(
        std::io::stderr(),
        "[blkio_client] {name}: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    r
}

/// What a sector's bytes look like, for failure messages.
fn describe(sector: u64, bytes: &[u8], size: u64) -> String {
    if bytes.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    let base = sector * SECTOR;
    if bytes.iter().enumerate().all(|(i, &b)| {
        b == if base + (i as u64) < size {
            backing_byte(base + i as u64)
        } else {
            0
        }
    }) {
        return "the backing/initial pattern".into();
    }
    match stamp_of(bytes) {
        Some((id, sec)) if sec == sector => format!("write #{id}"),
        Some((id, sec)) => format!("write #{id} of sector {sec} (misplaced)"),
        None => format!("unknown bytes {:02x?}..", &bytes[..16]),
    }
}

/// Panics, naming the first differing sector, unless `got == want`.
fn assert_same(what: &str, got: &[u8], want: &[u8], first_sector: u64, size: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got == want {
        return;
    }
    let bad: Vec<usize> = got
        .chunks(SECTOR as usize)
        .zip(want.chunks(SECTOR as usize))
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(i, _)| i)
        .collect();
    let i = bad[0];
    let s = first_sector + i as u64;
    let r = i * SECTOR as usize..(i + 1) * SECTOR as usize;
    panic!(
        "{what}: {} of {} sectors differ; first: sector {s}: got {}, expected {}",
        bad.len(),
        got.len() / SECTOR as usize,
        describe(s, &got[r.clone()], size),
        describe(s, &want[r], size),
    );
}

/// What the client believes the disk holds.
#[derive(Debug)]
struct Model {
    /// Backing (COW) or image (raw) size in bytes.
    size: u64,
    /// Device sectors.
    nsect: u64,
    /// Expected content of every sector.
    data: Vec<u8>,
    /// Sectors written, discarded or zeroed (their COW bits must be set).
    touched: Vec<bool>,
    /// Requests in flight (sector ranges; none overlap).
    busy: Vec<Range<u64>>,
}

impl Model {
    /// The model of a disk whose initial content is `file` (the backing
    /// of a fresh COW, or a raw image), padded with zeros to a sector.
    fn from_file(file: &Path) -> Self {
        let mut data = std::fs::read(file).unwrap();
        let size = data.len() as u64;
        let nsect = size.div_ceil(SECTOR);
        data.resize((nsect * SECTOR) as usize, 0);
        Self {
            size,
            nsect,
            data,
            touched: vec![false; nsect as usize],
            busy: Vec::new(),
        }
    }

    fn bytes(&self, r: &Range<u64>) -> &[u8] {
        &self.data[(r.start * SECTOR) as usize..(r.end * SECTOR) as usize]
    }

    fn set(&mut self, r: &Range<u64>, content: Option<&[u8]>) {
        let d = &mut self.data[(r.start * SECTOR) as usize..(r.end * SECTOR) as usize];
        match content {
            Some(c) => d.copy_from_slice(c),
            None => d.fill(0),
        }
        self.touched[r.start as usize..r.end as usize].fill(true);
    }

    fn is_free(&self, r: &Range<u64>) -> bool {
        self.busy
            .iter()
            .all(|b| b.end <= r.start || r.end <= b.start)
    }

    fn release(&mut self, r: &Range<u64>) {
        let i = self
            .busy
            .iter()
            .position(|b| b == r)
            .expect("range in flight");
        self.busy.swap_remove(i);
    }

    fn touched_sectors(&self) -> Vec<u64> {
        (0..self.nsect)
            .filter(|&s| self.touched[s as usize])
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Discard,
    Zeroes { unmap: bool },
    Flush,
}

#[derive(Debug)]
struct InFlight {
    kind: Kind,
    range: Range<u64>,
    /// Content written (writes only).
    content: Vec<u8>,
    id: u64,
    /// Vectored requests: the segments (see [`scatter`]); the iovec array
    /// libblkio may still read until completion (a backlogged request).
    segs: Vec<(usize, usize)>,
    _iov: Vec<libc::iovec>,
}

/// Splits a `len`-byte request into 2..=4 segments, cut at random byte
/// offsets or at sector boundaries, and places them in the slot buffer in
/// reverse order (the last segment first), so that a device that ignored
/// the order or the lengths of the segments would move the wrong bytes.
/// Returns `(offset in the slot buffer, length)` in disk order.
fn scatter(rng: &mut Rng, len: usize) -> Vec<(usize, usize)> {
    let k = rng.range(2, 4) as usize;
    let mut cuts: Vec<usize> = (0..k - 1)
        .map(|_| {
            if rng.below(2) == 0 {
                SECTOR as usize * rng.range(1, len as u64 / SECTOR - 1) as usize
            } else {
                rng.range(1, len as u64 - 1) as usize
            }
        })
        .collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    let lens: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
    let mut out = vec![(0, 0); lens.len()];
    let mut at = 0;
    for i in (0..lens.len()).rev() {
        out[i] = (at, lens[i]);
        at += lens[i];
    }
    out
}

/// The iovecs of `segs` in the slot buffer at region offset `off`.
fn iovecs(mem: Mem, off: usize, segs: &[(usize, usize)]) -> Vec<libc::iovec> {
    segs.iter()
        .map(|&(o, l)| libc::iovec {
            iov_base: mem.ptr(off + o, l).cast(),
            iov_len: l,
        })
        .collect()
}

/// Counts of completed requests per kind.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    reads: u64,
    writes: u64,
    discards: u64,
    zeroes: u64,
    flushes: u64,
    /// Reads and writes with several segments.
    vectored: u64,
    max_in_flight: usize,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.discards += o.discards;
        self.zeroes += o.zeroes;
        self.flushes += o.flushes;
        self.vectored += o.vectored;
        self.max_in_flight = self.max_in_flight.max(o.max_in_flight);
    }
}

/// Picks a free range and marks it busy. Half of the requests go to a hot
/// window at the start of the disk (neighbours share bitmap bytes), the
/// rest anywhere. Discards are 4 KiB aligned.
fn pick(rng: &mut Rng, m: &mut Model, aligned: bool) -> Option<Range<u64>> {
    let hot = 2048.min(m.nsect);
    for _ in 0..32 {
        let limit = if rng.below(2) == 0 { hot } else { m.nsect };
        let r = if aligned {
            let n = 8 * rng.range(1, 16);
            let slots = (limit / 8).checked_sub(n / 8)?;
            let s = 8 * rng.below(slots + 1);
            s..s + n
        } else {
            let n = rng.range(8, 128);
            let s = rng.below(limit - n + 1);
            s..s + n
        };
        if m.is_free(&r) {
            m.busy.push(r.clone());
            return Some(r);
        }
    }
    None
}

/// One queue's share of the random workload: keeps up to `DEPTH`
/// requests in flight until `ops` requests completed; checks every read
/// against the model when it completes; ends with a flush.
fn random_queue(
    qi: usize,
    q: &mut Blkioq,
    mem: Mem,
    model: &Mutex<Model>,
    ids: &AtomicU64,
    seed: u64,
    ops: usize,
) -> Counts {
    let mut rng = Rng::new(seed);
    let mut slots: Vec<Option<InFlight>> = (0..DEPTH).map(|_| None).collect();
    let slot_off = |slot: usize| (qi * DEPTH + slot) * MAX_IO;
    let mut issued = 0usize;
    let mut counts = Counts::default();
    let size = model.lock().unwrap().size;
    loop {
        for (slot, st) in slots.iter_mut().enumerate() {
            if issued >= ops || st.is_some() {
                continue;
            }
            let kind = match rng.below(100) {
                0..45 => Kind::Read,
                45..85 => Kind::Write,
                85..90 => Kind::Discard,
                90..95 => Kind::Zeroes {
                    unmap: rng.below(2) == 0,
                },
                _ => Kind::Flush,
            };
            let range = if kind == Kind::Flush {
                0..0
            } else {
                let mut m = model.lock().unwrap();
                match pick(&mut rng, &mut m, kind == Kind::Discard) {
                    Some(r) => r,
                    None => break, // crowded: wait for completions
                }
            };
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let pos = range.start * SECTOR;
            let len = (range.end - range.start) * SECTOR;
            let off = slot_off(slot);
            let mut content = Vec::new();
            let mut segs = Vec::new();
            let mut iov = Vec::new();
            let vectored = len >= 2 * SECTOR && rng.below(3) == 0;
            match kind {
                Kind::Read if vectored => {
                    mem.fill(off, len as usize, 0xEE);
                    segs = scatter(&mut rng, len as usize);
                    iov = iovecs(mem, off, &segs);
                    q.readv(pos, iov.as_ptr(), iov.len() as u32, slot, ReqFlags::empty());
                }
                Kind::Read => {
                    mem.fill(off, len as usize, 0xEE);
                    q.read(
                        pos,
                        mem.ptr(off, len as usize),
                        len as usize,
                        slot,
                        ReqFlags::empty(),
                    );
                }
                Kind::Write if vectored => {
                    content = stamps(id, range.start, range.end - range.start);
                    segs = scatter(&mut rng, len as usize);
                    let mut d = 0;
                    for &(o, l) in &segs {
                        mem.write(off + o, &content[d..d + l]);
                        d += l;
                    }
                    iov = iovecs(mem, off, &segs);
                    q.writev(pos, iov.as_ptr(), iov.len() as u32, slot, ReqFlags::empty());
                }
                Kind::Write => {
                    content = stamps(id, range.start, range.end - range.start);
                    mem.write(off, &content);
                    q.write(
                        pos,
                        mem.ptr(off, len as usize),
                        len as usize,
                        slot,
                        ReqFlags::empty(),
                    );
                }
                Kind::Discard => q.discard(pos, len, slot, ReqFlags::empty()),
                Kind::Zeroes { unmap } => {
                    let flags = if unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    q.write_zeroes(pos, len, slot, flags);
                }
                Kind::Flush => q.flush(slot, ReqFlags::empty()),
            }
            *st = Some(InFlight {
                kind,
                range,
                content,
                id,
                segs,
                _iov: iov,
            });
            issued += 1;
        }
        let in_flight = slots.iter().filter(|s| s.is_some()).count();
        counts.max_in_flight = counts.max_in_flight.max(in_flight);
        if in_flight == 0 {
            if issued >= ops {
                break;
            }
            // Every free range was taken by other queues: let them finish.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let done = client::wait(q, 1, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("queue {qi}: do_io with {in_flight} in flight: {e}"));
        for d in done {
            let f = slots[d.user_data]
                .take()
                .expect("completion of a request in flight");
            assert_eq!(
                d.ret,
                0,
                "queue {qi}: {:?} of sectors {:?} (#{}) failed: {}",
                f.kind,
                f.range,
                f.id,
                Errno::from_raw_os_error(-d.ret)
            );
            let mut m = model.lock().unwrap();
            match f.kind {
                Kind::Read => {
                    let len = ((f.range.end - f.range.start) * SECTOR) as usize;
                    let off = slot_off(d.user_data);
                    let got = if f.segs.is_empty() {
                        mem.read(off, len)
                    } else {
                        counts.vectored += 1;
                        f.segs
                            .iter()
                            .flat_map(|&(o, l)| mem.read(off + o, l))
                            .collect()
                    };
                    assert_same(
                        &format!("queue {qi}: read #{} of sectors {:?}", f.id, f.range),
                        &got,
                        m.bytes(&f.range),
                        f.range.start,
                        size,
                    );
                    counts.reads += 1;
                }
                Kind::Write => {
                    if !f.segs.is_empty() {
                        counts.vectored += 1;
                    }
                    m.set(&f.range, Some(&f.content));
                    counts.writes += 1;
                }
                Kind::Discard => {
                    m.set(&f.range, None);
                    counts.discards += 1;
                }
                Kind::Zeroes { .. } => {
                    m.set(&f.range, None);
                    counts.zeroes += 1;
                }
                Kind::Flush => counts.flushes += 1,
            }
            if f.kind != Kind::Flush {
                m.release(&f.range);
            }
        }
    }
    assert_eq!(client::flush(q), 0, "queue {qi}: final flush");
    counts
}

/// Reads sectors `r` on `q` through region bytes at `off` (at most
/// `MAX_IO` per request, one at a time) and checks them against the model.
fn check_range(q: &mut Blkioq, mem: Mem, off: usize, m: &Model, r: Range<u64>, what: &str) {
    let mut s = r.start;
    while s < r.end {
        let n = (r.end - s).min(MAX_IO as u64 / SECTOR);
        let len = (n * SECTOR) as usize;
        mem.fill(off, len, 0xEE);
        let got = client::read_at(q, mem, off, s * SECTOR, len).unwrap_or_else(|e| {
            panic!(
                "{what}: read of sectors {s}+{n}: {}",
                Errno::from_raw_os_error(-e)
            )
        });
        assert_same(what, &got, m.bytes(&(s..s + n)), s, m.size);
        s += n;
    }
}

/// Reads the whole disk, `DEPTH` requests in flight per queue, every queue
/// at once (queue i reads the i-th slice), and returns it.
fn read_all(client: &mut Client, nsect: u64) -> Vec<u8> {
    let nq = client.queues.len() as u64;
    let mem = client.mem;
    let chunk = MAX_IO as u64 / SECTOR;
    let per = nsect.div_ceil(nq).div_ceil(chunk) * chunk;
    let parts: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let handles: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let r = (qi as u64 * per).min(nsect)..((qi as u64 + 1) * per).min(nsect);
                sc.spawn(move || {
                    let mut out = vec![0u8; ((r.end - r.start) * SECTOR) as usize];
                    let mut next = r.start;
                    let mut slots: Vec<Option<Range<u64>>> = vec![None; DEPTH];
                    loop {
                        for (slot, st) in slots.iter_mut().enumerate() {
                            if st.is_none() && next < r.end {
                                let n = (r.end - next).min(chunk);
                                let off = (qi * DEPTH + slot) * MAX_IO;
                                let len = (n * SECTOR) as usize;
                                mem.fill(off, len, 0xEE);
                                q.read(
                                    next * SECTOR,
                                    mem.ptr(off, len),
                                    len,
                                    slot,
                                    ReqFlags::empty(),
                                );
                                *st = Some(next..next + n);
                                next += n;
                            }
                        }
                        if slots.iter().all(Option::is_none) {
                            break;
                        }
                        for d in client::wait(q, 1, IO_TIMEOUT)
                            .unwrap_or_else(|e| panic!("read-back on queue {qi}: {e}"))
                        {
                            let s = slots[d.user_data].take().expect("read in flight");
                            assert_eq!(d.ret, 0, "read-back of sectors {s:?} failed");
                            let off = (qi * DEPTH + d.user_data) * MAX_IO;
                            let len = ((s.end - s.start) * SECTOR) as usize;
                            let at = ((s.start - r.start) * SECTOR) as usize;
                            out[at..at + len].copy_from_slice(&mem.read(off, len));
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    parts.concat()
}

/// The disk under test, freshly made in `dir`.
struct Setup {
    daemon: Daemon,
    cow: Option<(PathBuf, PathBuf)>,
    raw: Option<PathBuf>,
}

impl Setup {
    /// The file with the disk's initial content (COW: the backing).
    fn initial_file(&self) -> PathBuf {
        match (&self.cow, &self.raw) {
            (Some((_, base)), _) => base.clone(),
            (_, Some(raw)) => raw.clone(),
            _ => unreachable!("a disk is raw or COW"),
        }
    }
}

/// Makes a 16 MiB raw image or a COW over a 16 MiB + 1000 byte backing
/// (created by the daemon), both with the known pattern, and serves it.
fn start_disk(dir: &Path, cow: bool, queues: usize, extra: &[&str]) -> Setup {
    if cow {
        let base = dir.join("base.img");
        make_backing(&base, COW_BACKING_SIZE);
        let file = dir.join("disk.cow");
        let daemon = DaemonBuilder::new(dir)
            .cow(&file, Some(&base))
            .queues(queues)
            .queue_size(MAX_DAEMON_QUEUE_SIZE)
            .args(extra)
            .spawn();
        Setup {
            daemon,
            cow: Some((file, base)),
            raw: None,
        }
    } else {
        let raw = dir.join("disk.img");
        make_backing(&raw, RAW_SIZE);
        let daemon = DaemonBuilder::new(dir)
            .raw(&raw)
            .queues(queues)
            .queue_size(MAX_DAEMON_QUEUE_SIZE)
            .args(extra)
            .spawn();
        Setup {
            daemon,
            cow: None,
            raw: Some(raw),
        }
    }
}

/// Checks that the backing file still has its `original` bytes and the
/// mtime tests give it (R6).
fn assert_backing_untouched(base: &Path, original: &[u8]) {
    let meta = std::fs::metadata(base).unwrap();
    let mtime = meta
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(mtime, BACKING_MTIME, "backing mtime changed");
    let got = std::fs::read(base).unwrap();
    assert!(got == original, "the backing file was modified");
}

/// After the daemon exited: `uml_moo` merges the COW into exactly what the
/// client last read (`image`, minus the trailing partial sector, which
/// `uml_moo` drops), and the set bits are exactly the sectors written,
/// discarded or zeroed (R7).
fn check_cow_after_exit(dir: &Path, cow_file: &Path, m: &Model, image: &[u8]) {
    let merged = uml_moo(cow_file, &dir.join("merged.img"));
    let whole = (m.size / SECTOR * SECTOR) as usize;
    assert_eq!(merged.len(), whole, "uml_moo output length");
    assert_same(
        "uml_moo merge vs last read-back",
        &merged,
        &image[..whole],
        0,
        m.size,
    );
    let bits = set_sectors(&disk_bitmap(cow_file), m.nsect);
    let want = m.touched_sectors();
    if bits != want {
        let extra: Vec<u64> = bits
            .iter()
            .filter(|s| !m.touched[**s as usize])
            .copied()
            .collect();
        let missing: Vec<u64> = want.iter().filter(|s| !bits.contains(s)).copied().collect();
        panic!(
            "COW bits differ from the sectors written/discarded/zeroed: {} set, {} expected; \
             set but untouched (first 10): {:?}; touched but clear (first 10): {:?}",
            bits.len(),
            want.len(),
            &extra[..extra.len().min(10)],
            &missing[..missing.len().min(10)]
        );
    }
}

/// Test 1 and 2: random I/O on `queues` queues, targeted discards and
/// write-zeroes, full read-back; for COW, uml_moo and the bitmap.
fn random_io_case(cow: bool, queues: usize, ops_per_queue: usize, seed: u64, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let setup = start_disk(dir.path(), cow, queues, extra);
    let model = Mutex::new(Model::from_file(&setup.initial_file()));
    let original = std::fs::read(setup.initial_file()).unwrap();
    let nsect = model.lock().unwrap().nsect;
    let mut client = Client::connect(
        setup.daemon.socket(),
        &ClientConfig {
            num_queues: queues,
            read_only: false,
            mem_len: queues * DEPTH * MAX_IO,
        },
    )
    .unwrap();
    assert_eq!(client.queues.len(), queues);
    assert_eq!(
        client.capacity,
        nsect * SECTOR,
        "capacity must be the image size rounded up to a sector"
    );

    // Random phase: every queue at once.
    let ids = AtomicU64::new(1);
    let mem = client.mem;
    let counts: Counts = std::thread::scope(|sc| {
        let hs: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let (model, ids) = (&model, &ids);
                sc.spawn(move || {
                    random_queue(qi, q, mem, model, ids, seed + qi as u64, ops_per_queue)
                })
            })
            .collect();
        let mut c = Counts::default();
        for h in hs {
            c += h.join().unwrap();
        }
        c
    });
    let _ = writeln!(
        std::io::stderr(),
        "[blkio_client]   {} {queues}q seed {seed}: {counts:?}",
        if cow { "cow" } else { "raw" }
    );
    assert!(counts.reads > 0 && counts.writes > 0 && counts.discards > 0 && counts.zeroes > 0);
    assert!(
        counts.max_in_flight > 1,
        "the workload never had more than one request in flight"
    );

    // Targeted discards and write-zeroes, each read back with neighbours.
    let mut m = model.into_inner().unwrap();
    let q = &mut client.queues[0];
    let aligned_end = nsect / 8 * 8;
    let mut discards = vec![64..72, 1024..1152, aligned_end - 64..aligned_end];
    if aligned_end < nsect {
        // The partial tail: allowed unaligned because it ends the disk.
        discards.push(aligned_end..nsect);
    }
    for r in discards {
        let ret = client::discard(q, r.start * SECTOR, (r.end - r.start) * SECTOR);
        assert_eq!(ret, 0, "discard {r:?}");
        m.set(&r, None);
        let around = r.start.saturating_sub(8)..(r.end + 8).min(nsect);
        check_range(q, mem, 0, &m, around, &format!("after discard {r:?}"));
    }
    for (r, no_unmap) in [
        (3..8, false),
        (2000..2077, true),
        (5001..5129, false),
        (nsect - 3..nsect, true),
    ] {
        let ret = client::write_zeroes(q, r.start * SECTOR, (r.end - r.start) * SECTOR, no_unmap);
        assert_eq!(ret, 0, "write-zeroes {r:?} (no_unmap {no_unmap})");
        m.set(&r, None);
        let around = r.start.saturating_sub(8)..(r.end + 8).min(nsect);
        check_range(q, mem, 0, &m, around, &format!("after write-zeroes {r:?}"));
    }
    // A write into a discarded range reads back (no stale hole).
    let r = 1032..1040;
    let content = stamps(
        ids.fetch_add(1, Ordering::Relaxed),
        r.start,
        r.end - r.start,
    );
    assert_eq!(client::write_at(q, mem, 0, r.start * SECTOR, &content), 0);
    m.set(&r, Some(&content));
    check_range(q, mem, 0, &m, 1024..1152, "write into a discarded range");
    assert_eq!(client::flush(q), 0, "flush");

    // Everything, on every queue at once.
    let image = read_all(&mut client, nsect);
    assert_same("full read-back", &image, &m.data, 0, m.size);
    drop(client);

    setup.daemon.assert_running();
    let st = setup.daemon.terminate();
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM exit status; log:\n{}",
        setup.daemon.log_tail(30)
    );

    if let Some((cow_file, base)) = &setup.cow {
        check_cow_after_exit(dir.path(), cow_file, &m, &image);
        assert_backing_untouched(base, &original);
    }
    if let Some(raw) = &setup.raw {
        let file = std::fs::read(raw).unwrap();
        assert_same("raw image file after exit", &file, &image, 0, m.size);
    }
}

/// Seed of a random case: `BLKIO_TEST_SEED` (plus `offset`) or `default`.
fn seed(default: u64) -> u64 {
    match std::env::var("BLKIO_TEST_SEED") {
        Ok(v) => v.parse::<u64>().expect("BLKIO_TEST_SEED is a number") ^ default,
        Err(_) => default,
    }
}

#[test]
fn raw_one_queue_random_io_matches_the_model() {
    timed("raw_one_queue_random_io_matches_the_model", || {
        random_io_case(false, 1, 3000, seed(11), &[]);
    });
}

/// `--cache none`: O_DIRECT, so segments cut at odd byte offsets must be
/// bounced by the daemon. All four queues on one worker thread.
#[test]
fn raw_four_queues_random_io_matches_the_model() {
    timed("raw_four_queues_random_io_matches_the_model", || {
        random_io_case(
            false,
            4,
            1000,
            seed(21),
            &["--cache", "none", "--threads", "1"],
        );
    });
}

/// `--cache none` (O_DIRECT: unaligned segments need bouncing), and
/// production timing: bitmap writes at flushes and the default 1 s
/// checkpoint.
#[test]
fn cow_one_queue_random_io_matches_the_model_uml_moo_and_the_bitmap() {
    timed(
        "cow_one_queue_random_io_matches_the_model_uml_moo_and_the_bitmap",
        || random_io_case(true, 1, 3000, seed(31), &["--cache", "none"]),
    );
}

/// Frequent checkpoints and slow bitmap writes: reads of fresh sectors
/// keep meeting pending bitmap writes of their bytes (R3, R4 under load).
/// Two worker threads with two queues each.
#[test]
fn cow_four_queues_random_io_matches_the_model_uml_moo_and_the_bitmap() {
    timed(
        "cow_four_queues_random_io_matches_the_model_uml_moo_and_the_bitmap",
        || {
            random_io_case(
                true,
                4,
                1000,
                seed(41),
                &[
                    "--checkpoint-ms",
                    "20",
                    "--test-bitmap-delay-ms",
                    "3",
                    "--threads",
                    "2",
                ],
            );
        },
    );
}

/// Expected bytes of `[pos, pos + len)` of an untouched disk over a
/// pattern file of `size` bytes (zeros past `size`).
fn pattern_bytes(pos: u64, len: usize, size: u64) -> Vec<u8> {
    (pos..pos + len as u64)
        .map(|p| if p < size { backing_byte(p) } else { 0 })
        .collect()
}

fn errno_name(ret: i32) -> String {
    format!("{} ({ret})", Errno::from_raw_os_error(-ret))
}

/// The daemon's default `--queue-size 1024` makes it advertise
/// size_max = 4 MiB and seg_max = 1022; libblkio 0.5.1 multiplies them in
/// `i32` for its `max-transfer` property (overflow: a panic in a debug
/// build of the client, a negative `max-transfer` in a release build). A
/// libblkio client must be able to connect to a daemon started with
/// default options.
#[test]
fn libblkio_connects_to_a_daemon_with_default_limits() {
    timed("libblkio_connects_to_a_daemon_with_default_limits", || {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        make_backing(&raw, 1 << 20);
        let daemon = DaemonBuilder::new(dir.path()).raw(&raw).spawn();
        let socket = daemon.socket().to_path_buf();
        let outcome = std::panic::catch_unwind(move || {
            Client::connect(&socket, &ClientConfig::default()).map(|mut c| {
                let mem = c.mem;
                let max_transfer = c.blkio().get_i32("max-transfer");
                let data = client::read_at(c.q(0), mem, 0, 0, 4096);
                (max_transfer.map_err(|e| e.to_string()), data)
            })
        });
        daemon.assert_running();
        match outcome {
            Err(_) => panic!(
                "libblkio panicked in connect (max-transfer = size_max * seg_max overflows i32 \
                 with the daemon's default size_max 4 MiB and seg_max 1022): cap seg_max (or \
                 size_max) so that their product fits in i32"
            ),
            Ok(Err(e)) => panic!("connect failed: {e}"),
            Ok(Ok((max_transfer, data))) => {
                let mt = max_transfer.unwrap();
                assert!(mt > 0, "libblkio computed max-transfer {mt}");
                assert_eq!(data.unwrap(), pattern_bytes(0, 4096, 1 << 20));
            }
        }
    });
}

/// Test 3: `--readonly`, raw and COW.
#[test]
fn readonly_disks_read_correct_data_and_refuse_writes() {
    timed("readonly_disks_read_correct_data_and_refuse_writes", || {
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = (2 << 20) + 700;
        let base = dir.path().join("base.img");
        make_backing(&base, size);

        // A COW with some data in it, written through a read-write daemon.
        let cow = dir.path().join("disk.cow");
        let written = [(0u64, 8u64), (100, 3), (2000, 64)];
        let mut model = Model::from_file(&base);
        {
            let d = DaemonBuilder::new(dir.path())
                .name("rw")
                .cow(&cow, Some(&base))
                .queue_size(MAX_DAEMON_QUEUE_SIZE)
                .spawn();
            let mut c = Client::connect(d.socket(), &ClientConfig::default()).unwrap();
            let mem = c.mem;
            for (i, &(s, n)) in written.iter().enumerate() {
                let buf = stamps(1000 + i as u64, s, n);
                assert_eq!(client::write_at(c.q(0), mem, 0, s * SECTOR, &buf), 0);
                model.set(&(s..s + n), Some(&buf));
            }
            assert_eq!(client::flush(c.q(0)), 0);
            drop(c);
            assert_eq!(d.terminate().code(), Some(0));
        }
        // Raw: the pattern file itself (a copy, so that the COW's backing
        // stays separate).
        let raw = dir.path().join("raw.img");
        std::fs::copy(&base, &raw).unwrap();

        for (name, cow_mode) in [("raw", false), ("cow", true)] {
            let file = if cow_mode { &cow } else { &raw };
            let before = std::fs::read(file).unwrap();
            let b = DaemonBuilder::new(dir.path())
                .name(&format!("ro-{name}"))
                .queue_size(MAX_DAEMON_QUEUE_SIZE)
                .queues(2)
                .arg("--readonly");
            let d = if cow_mode {
                b.cow(&cow, None)
            } else {
                b.raw(&raw)
            }
            .spawn();

            // A client that does not ask for read-only is refused (the
            // device offers VIRTIO_BLK_F_RO)...
            let err = Client::connect(d.socket(), &ClientConfig::default())
                .expect_err("a read-write client must not start on a --readonly device");
            assert_eq!(err.errno(), Errno::ROFS, "{name}: {err}");
            d.assert_running();

            // ... a read-only one works.
            let mut c = Client::connect(
                d.socket(),
                &ClientConfig {
                    num_queues: 2,
                    read_only: true,
                    mem_len: 1 << 20,
                },
            )
            .unwrap_or_else(|e| panic!("{name}: read-only client: {e}"));
            let nsect = if cow_mode {
                size.div_ceil(SECTOR)
            } else {
                size / SECTOR
            };
            assert_eq!(c.capacity, nsect * SECTOR, "{name}: capacity");
            let mem = c.mem;
            let want = |r: &Range<u64>| -> Vec<u8> {
                if cow_mode {
                    model.bytes(r).to_vec()
                } else {
                    pattern_bytes(
                        r.start * SECTOR,
                        ((r.end - r.start) * SECTOR) as usize,
                        size,
                    )
                }
            };
            let ranges = [0..16, 98..110, 1990..2070, nsect - 5..nsect];
            for (qi, r) in ranges.iter().enumerate() {
                let q = c.q(qi % 2);
                let len = ((r.end - r.start) * SECTOR) as usize;
                let got = client::read_at(q, mem, 0, r.start * SECTOR, len)
                    .unwrap_or_else(|e| panic!("{name}: read {r:?}: {}", errno_name(e)));
                assert_same(
                    &format!("{name}: read-only read {r:?}"),
                    &got,
                    &want(r),
                    r.start,
                    size,
                );
            }
            // Writes, write-zeroes and discards fail.
            let q = c.q(0);
            let ret = client::write_at(q, mem, 0, 0, &[0x55u8; 4096]);
            assert!(
                ret < 0,
                "{name}: write on a read-only device returned {ret}"
            );
            let ret = client::write_zeroes(q, 4096, 4096, false);
            assert!(
                ret < 0,
                "{name}: write-zeroes on a read-only device returned {ret}"
            );
            let ret = client::discard(q, 8192, 4096);
            assert!(
                ret < 0,
                "{name}: discard on a read-only device returned {ret}"
            );
            assert_eq!(client::flush(q), 0, "{name}: flush on a read-only device");
            // Nothing changed.
            let got = client::read_at(q, mem, 0, 0, 16 * SECTOR as usize).unwrap();
            assert_same(
                &format!("{name}: read after refused writes"),
                &got,
                &want(&(0..16)),
                0,
                size,
            );
            drop(c);
            d.assert_running();
            assert_eq!(d.terminate().code(), Some(0), "{name}: exit status");
            assert!(
                std::fs::read(file).unwrap() == before,
                "{name}: a --readonly daemon changed the file"
            );
        }
        assert_backing_untouched(&base, &pattern_bytes(0, size as usize, size));
    });
}

/// Test 4: bad requests (R8).
#[test]
fn bad_requests_get_errors_and_the_daemon_keeps_serving() {
    timed(
        "bad_requests_get_errors_and_the_daemon_keeps_serving",
        || {
            let dir = tempfile::tempdir().unwrap();
            let size: u64 = 1 << 20;
            let raw = dir.path().join("disk.img");
            make_backing(&raw, size);
            let mut m = Model::from_file(&raw);
            let d = DaemonBuilder::new(dir.path())
                .raw(&raw)
                .queues(2)
                .queue_size(MAX_DAEMON_QUEUE_SIZE)
                .spawn();
            let mut c = Client::connect(
                d.socket(),
                &ClientConfig {
                    num_queues: 2,
                    read_only: false,
                    mem_len: 1 << 20,
                },
            )
            .unwrap();
            // 8 KiB of which only the first 4 KiB are guest memory.
            let partial = c.map_partial(4096, 4096).unwrap();
            let cap = c.capacity;
            assert_eq!(cap, size);
            let mem = c.mem;
            let q = c.q(0);

            // Out of range: past the end, straddling the end, absurd offsets.
            for (pos, len) in [
                (cap, 4096usize),
                (cap - 512, 4096),
                (cap - 4096, 8192),
                (1 << 60, 512),
            ] {
                let r = client::read_at(q, mem, 0, pos, len);
                assert!(
                    r.is_err(),
                    "read of {len} at {pos} (capacity {cap}) succeeded"
                );
            }
            let ret = client::write_at(q, mem, 0, cap - 512, &[0xA5; 1024]);
            assert!(ret < 0, "write straddling the end returned {ret}");
            let ret = client::write_at(q, mem, 0, cap, &[0xA5; 512]);
            assert!(ret < 0, "write past the end returned {ret}");
            let ret = client::write_zeroes(q, cap - 4096, 8192, false);
            assert!(ret < 0, "write-zeroes straddling the end returned {ret}");
            let ret = client::discard(q, cap, 4096);
            assert!(ret < 0, "discard past the end returned {ret}");
            // None of them touched the last sectors.
            let got = client::read_at(q, mem, 0, cap - 8192, 8192).unwrap();
            let n = m.nsect;
            assert_same(
                "tail after refused requests",
                &got,
                m.bytes(&(n - 16..n)),
                n - 16,
                size,
            );

            // A bad request between good ones in one batch: only it fails.
            let (a, b) = (0usize, 8192usize);
            mem.fill(a, 4096, 0xEE);
            mem.fill(b, 4096, 0xEE);
            q.read(0, mem.ptr(a, 4096), 4096, 1, ReqFlags::empty());
            q.read(cap, mem.ptr(4096, 4096), 4096, 2, ReqFlags::empty());
            q.read(40960, mem.ptr(b, 4096), 4096, 3, ReqFlags::empty());
            let mut done = Vec::new();
            while done.len() < 3 {
                done.extend(client::wait(q, 1, IO_TIMEOUT).unwrap());
            }
            done.sort_by_key(|x| x.user_data);
            assert_eq!(done[0].ret, 0, "good read before a bad one");
            assert!(done[1].ret < 0, "bad read in a batch succeeded");
            assert_eq!(done[2].ret, 0, "good read after a bad one");
            assert_same(
                "batch read 1",
                &mem.read(a, 4096),
                m.bytes(&(0..8)),
                0,
                size,
            );
            assert_same(
                "batch read 3",
                &mem.read(b, 4096),
                m.bytes(&(80..88)),
                80,
                size,
            );

            // Buffers outside guest memory (a plain heap Vec, and one that
            // runs from registered memory into memory never given to the
            // device): an error completion or a dropped connection, never
            // success, never a crash.
            let q = c.q(1);
            let mut heap = vec![0u8; 8192];
            let mut dropped = false;
            let heap_ptr = heap.as_mut_ptr();
            q.read(0, heap_ptr, 4096, 7, ReqFlags::empty());
            match client::wait(q, 1, Duration::from_secs(5)) {
                Ok(dn) => {
                    assert_eq!(dn.len(), 1);
                    assert!(
                        dn[0].ret < 0,
                        "read into a heap buffer outside guest memory succeeded"
                    );
                    let _ = writeln!(
                        std::io::stderr(),
                        "[blkio_client]   heap-buffer read: {}",
                        errno_name(dn[0].ret)
                    );
                }
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "[blkio_client]   heap-buffer read: no completion ({e}): connection dropped");
                    dropped = true;
                }
            }
            d.assert_running();
            if !dropped {
                heap.fill(0xAA);
                q.write(16 * SECTOR, heap.as_ptr(), 4096, 8, ReqFlags::empty());
                let dn = client::wait(q, 1, Duration::from_secs(5)).expect(
                    "the heap-buffer read got an error completion, so this one must complete too",
                );
                assert!(
                    dn[0].ret < 0,
                    "write from a heap buffer outside guest memory succeeded"
                );
                // Straddling the end of guest memory: the first half is
                // mapped, the second is not.
                let tail = partial.mem.ptr(partial.mapped - 2048, 4096);
                q.read(32 * SECTOR, tail, 4096, 9, ReqFlags::empty());
                let dn = client::wait(q, 1, Duration::from_secs(5))
                    .expect("completion of a straddling read");
                assert!(
                    dn[0].ret < 0,
                    "read into a buffer running past guest memory succeeded"
                );
                // The same connection still serves good requests, on both queues.
                for qi in [0, 1] {
                    let got = client::read_at(c.q(qi), mem, 0, 16 * SECTOR, 8192).unwrap();
                    assert_same("after bad buffers", &got, m.bytes(&(16..32)), 16, size);
                }
            }
            assert!(
                heap.iter().all(|&x| x == 0 || x == 0xAA),
                "the heap buffer was written"
            );
            assert!(
                partial
                    .mem
                    .read(partial.mapped, 4096)
                    .iter()
                    .all(|&x| x == 0),
                "the unregistered part of the partial region was written"
            );
            // A good write on the old connection (if it lives) or the new one.
            let content = stamps(4242, 48, 8);
            if !dropped {
                assert_eq!(client::write_at(c.q(0), mem, 0, 48 * SECTOR, &content), 0);
                m.set(&(48..56), Some(&content));
            }
            drop(c);
            drop(partial);
            d.assert_running();

            // A new connection works and reads the right data.
            let mut c2 = Client::connect(d.socket(), &ClientConfig::default()).unwrap();
            if dropped {
                let mem = c2.mem;
                assert_eq!(client::write_at(c2.q(0), mem, 0, 48 * SECTOR, &content), 0);
                m.set(&(48..56), Some(&content));
            }
            let image = read_all(&mut c2, m.nsect);
            assert_same(
                "new connection after bad requests",
                &image,
                &m.data,
                0,
                size,
            );
            drop(c2);
            d.assert_running();
            assert_eq!(d.terminate().code(), Some(0));
            assert!(
                std::fs::read(&raw).unwrap() == m.data,
                "image file after exit"
            );
        },
    );
}

/// Writes stamped data at `ranges` on queue `qi`, updating the model.
fn write_ranges(c: &mut Client, qi: usize, m: &mut Model, ranges: &[Range<u64>], id: u64) {
    let mem = c.mem;
    for (k, r) in ranges.iter().enumerate() {
        let buf = stamps(id + k as u64, r.start, r.end - r.start);
        let off = qi * DEPTH * MAX_IO;
        assert_eq!(
            client::write_at(c.q(qi), mem, off, r.start * SECTOR, &buf),
            0,
            "write {r:?}"
        );
        m.set(r, Some(&buf));
    }
}

/// Test 5: data written by one client is read by the next, across
/// connections with different queue counts.
fn reconnect_case(cow: bool) {
    let dir = tempfile::tempdir().unwrap();
    let setup = start_disk(dir.path(), cow, 4, &[]);
    let original = std::fs::read(setup.initial_file()).unwrap();
    let mut m = Model::from_file(&setup.initial_file());
    let n = m.nsect;
    let cfg = |q| ClientConfig {
        num_queues: q,
        read_only: false,
        mem_len: q * DEPTH * MAX_IO,
    };

    // Client 1: four queues, each writes its own ranges; a discard and a
    // write-zeroes; no flush before the disconnect.
    let mut c1 = Client::connect(setup.daemon.socket(), &cfg(4)).unwrap();
    for qi in 0..4u64 {
        let base = qi * 3000 + 5;
        write_ranges(
            &mut c1,
            qi as usize,
            &mut m,
            &[
                base..base + 9,
                base + 100..base + 228,
                base + 1000..base + 1001,
            ],
            100 * qi,
        );
    }
    assert_eq!(client::discard(c1.q(1), 20000 * SECTOR, 64 * SECTOR), 0);
    m.set(&(20000..20064), None);
    assert_eq!(
        client::write_zeroes(c1.q(2), 20100 * SECTOR, 13 * SECTOR, true),
        0
    );
    m.set(&(20100..20113), None);
    write_ranges(&mut c1, 3, &mut m, &[n - 2..n], 900);
    drop(c1);
    setup.daemon.assert_running();

    // Client 2: one queue, reads everything, writes more.
    let mut c2 = Client::connect(setup.daemon.socket(), &cfg(1)).unwrap();
    let image = read_all(&mut c2, n);
    assert_same(
        "second client reads the first one's data",
        &image,
        &m.data,
        0,
        m.size,
    );
    write_ranges(&mut c2, 0, &mut m, &[7..15, 20050..20058], 2000);
    drop(c2);
    setup.daemon.assert_running();

    // Client 3: two queues.
    let mut c3 = Client::connect(setup.daemon.socket(), &cfg(2)).unwrap();
    let image = read_all(&mut c3, n);
    assert_same(
        "third client reads both earlier clients' data",
        &image,
        &m.data,
        0,
        m.size,
    );
    // SIGTERM with the client still connected (and its writes not
    // flushed): the daemon disconnects it, persists, exits 0.
    write_ranges(&mut c3, 1, &mut m, &[30..31, 2999..3003], 3000);
    setup.daemon.assert_running();
    let st = setup.daemon.terminate();
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM with a client connected; log:\n{}",
        setup.daemon.log_tail(30)
    );
    drop(c3);
    let image = m.data.clone();
    if let Some((cow_file, base)) = &setup.cow {
        check_cow_after_exit(dir.path(), cow_file, &m, &image);
        assert_backing_untouched(base, &original);
    }
    if let Some(raw) = &setup.raw {
        assert!(
            std::fs::read(raw).unwrap() == image,
            "raw image file after exit"
        );
    }
}

#[test]
fn data_survives_disconnect_and_reconnect_raw() {
    timed("data_survives_disconnect_and_reconnect_raw", || {
        reconnect_case(false);
    });
}

#[test]
fn data_survives_disconnect_and_reconnect_cow() {
    timed("data_survives_disconnect_and_reconnect_cow", || {
        reconnect_case(true);
    });
}

/// One read of the R4 test.
#[derive(Debug, Clone, Copy)]
struct Sample {
    submitted: Duration,
    completed: Option<Duration>,
    ret: i32,
}

impl Sample {
    fn latency(&self) -> Duration {
        self.completed.expect("completed") - self.submitted
    }
}

/// Interval between the reads of the R4 test.
const TICK: Duration = Duration::from_millis(20);
/// Most reads per queue in the R4 test.
const MAX_TICKS: usize = 60;

/// Reads `sector` every `TICK` (each into its own 512-byte buffer at
/// `base_off`) from `barrier` until `stop` is set, then waits for all;
/// checks every read's data against `want`. Times are relative to `t0`.
#[allow(clippy::too_many_arguments)]
fn read_every_tick(
    q: &mut Blkioq,
    mem: Mem,
    base_off: usize,
    sector: u64,
    want: &[u8],
    barrier: &Barrier,
    stop: &AtomicBool,
    t0: Instant,
) -> Vec<Sample> {
    barrier.wait();
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut in_flight = 0usize;
    loop {
        let submitting = !stop.load(Ordering::SeqCst) && samples.len() < MAX_TICKS;
        let next = start + TICK * samples.len() as u32;
        if submitting && Instant::now() >= next {
            let i = samples.len();
            let off = base_off + i * SECTOR as usize;
            mem.fill(off, SECTOR as usize, 0xEE);
            samples.push(Sample {
                submitted: t0.elapsed(),
                completed: None,
                ret: 0,
            });
            q.read(
                sector * SECTOR,
                mem.ptr(off, SECTOR as usize),
                SECTOR as usize,
                i,
                ReqFlags::empty(),
            );
            in_flight += 1;
            continue;
        }
        if !submitting && in_flight == 0 {
            break;
        }
        let timeout = if submitting {
            next.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        } else {
            IO_TIMEOUT
        };
        if in_flight == 0 {
            std::thread::sleep(timeout);
            continue;
        }
        match client::wait(q, 1, timeout) {
            Ok(done) => {
                let now = t0.elapsed();
                for d in done {
                    let s = &mut samples[d.user_data];
                    s.completed = Some(now);
                    s.ret = d.ret;
                    in_flight -= 1;
                    assert_eq!(
                        d.ret,
                        0,
                        "read of sector {sector} #{} failed: {}",
                        d.user_data,
                        errno_name(d.ret)
                    );
                    let got = mem.read(base_off + d.user_data * SECTOR as usize, SECTOR as usize);
                    assert_same(
                        &format!("read of sector {sector} #{}", d.user_data),
                        &got,
                        want,
                        sector,
                        u64::MAX,
                    );
                }
            }
            Err(e) if e.errno() == Errno::TIME && submitting => {}
            Err(e) => panic!("reads of sector {sector}: {e}"),
        }
    }
    samples
}

/// Test 6: R4 through the socket. The daemon holds every COW bitmap write
/// for 300 ms. Sector 0 is written, then a FLUSH makes the daemon write
/// bitmap byte 0 (held). Meanwhile, on two other queues, sector 1 (same
/// bitmap byte, bit clear: served from the backing) and sector 4096 (bitmap
/// byte 512) are read every 20 ms. Every read must succeed with the
/// backing's data; some read of sector 1 must have waited for the bitmap
/// write (>= 200 ms), and the reads of sector 4096 must not wait for it.
///
/// The daemon's `reads_parked` counter is not visible over the socket, so
/// "waited" is judged from latencies, which the 300 ms hold makes robust.
#[test]
fn r4_reads_overlapping_a_held_bitmap_write_wait_and_others_do_not() {
    timed(
        "r4_reads_overlapping_a_held_bitmap_write_wait_and_others_do_not",
        || {
            let dir = tempfile::tempdir().unwrap();
            let size: u64 = 4 << 20;
            let base = dir.path().join("base.img");
            make_backing(&base, size);
            let cow = dir.path().join("disk.cow");
            let d = DaemonBuilder::new(dir.path())
                .cow(&cow, Some(&base))
                .queues(3)
                .queue_size(MAX_DAEMON_QUEUE_SIZE)
                .args(["--test-bitmap-delay-ms", "300", "--checkpoint-ms", "100000"])
                .spawn();
            let mut c = Client::connect(
                d.socket(),
                &ClientConfig {
                    num_queues: 3,
                    read_only: false,
                    mem_len: 3 * MAX_TICKS * SECTOR as usize + 4096,
                },
            )
            .unwrap();
            let mem = c.mem;
            let mut m = Model::from_file(&base);
            let (near, far) = (1u64, 4096u64);
            let want_near = m.bytes(&(near..near + 1)).to_vec();
            let want_far = m.bytes(&(far..far + 1)).to_vec();

            // Sector 0: fresh, so the next FLUSH writes bitmap byte 0.
            let content = stamps(77, 0, 1);
            let q0_buf = 3 * MAX_TICKS * SECTOR as usize;
            assert_eq!(client::write_at(c.q(0), mem, q0_buf, 0, &content), 0);
            m.set(&(0..1), Some(&content));

            let barrier = Barrier::new(3);
            let stop = AtomicBool::new(false);
            let t0 = Instant::now();
            let [q0, q1, q2] = &mut c.queues[..] else {
                panic!("three queues");
            };
            let (flush, near_s, far_s) = std::thread::scope(|sc| {
                let (barrier, stop) = (&barrier, &stop);
                let fl = sc.spawn(move || {
                    barrier.wait();
                    let submitted = t0.elapsed();
                    q0.flush(1, ReqFlags::empty());
                    let dn = client::wait(q0, 1, IO_TIMEOUT);
                    let completed = t0.elapsed();
                    stop.store(true, Ordering::SeqCst);
                    let dn = dn.unwrap_or_else(|e| panic!("flush: {e}"));
                    Sample {
                        submitted,
                        completed: Some(completed),
                        ret: dn[0].ret,
                    }
                });
                let (wn, wf) = (&want_near, &want_far);
                let nr = sc.spawn(move || read_every_tick(q1, mem, 0, near, wn, barrier, stop, t0));
                let fr = sc.spawn(move || {
                    read_every_tick(
                        q2,
                        mem,
                        MAX_TICKS * SECTOR as usize,
                        far,
                        wf,
                        barrier,
                        stop,
                        t0,
                    )
                });
                (fl.join().unwrap(), nr.join().unwrap(), fr.join().unwrap())
            });
            let ms = |d: Duration| d.as_millis();
            let lat = |v: &[Sample]| v.iter().map(|s| ms(s.latency())).collect::<Vec<_>>();
            let _ = writeln!(
            std::io::stderr(),
            "[blkio_client]   flush {} ms; sector {near} read latencies (ms): {:?}; sector {far}: {:?}",
            ms(flush.latency()),
            lat(&near_s),
            lat(&far_s)
        );
            assert_eq!(flush.ret, 0, "flush failed: {}", errno_name(flush.ret));
            assert!(
            flush.latency() >= Duration::from_millis(250),
            "the flush took {} ms: the daemon's 300 ms bitmap-write hold did not apply, the test \
             cannot observe R4",
            ms(flush.latency())
        );
            let parked: Vec<usize> = (0..near_s.len())
                .filter(|&i| near_s[i].latency() >= Duration::from_millis(200))
                .collect();
            assert!(
                !parked.is_empty(),
                "no read of sector {near} waited for the held write of its bitmap byte (R4)"
            );
            for &i in &parked {
                if let Some(f) = far_s.get(i) {
                    assert!(
                    f.completed < near_s[i].completed,
                    "the read of sector {far} submitted with parked read #{i} of sector {near} \
                     completed after it: it waited for an unrelated bitmap write ({} ms)",
                    ms(f.latency())
                );
                }
            }
            // The flush made the write durable with its bit.
            drop(c);
            assert_eq!(d.terminate().code(), Some(0));
            // The daemon's own count of reads it parked (R4), from its exit log.
            let log = d.log();
            let parked: u64 = log
                .lines()
                .filter_map(|l| l.split("reads parked (R4) ").nth(1))
                .filter_map(|r| r.split(',').next()?.trim().parse().ok())
                .max()
                .unwrap_or_else(|| panic!("no stats line in the daemon log:\n{log}"));
            assert!(
                parked >= 1,
                "the daemon parked no read (R4 never triggered)"
            );
            let bits = set_sectors(&disk_bitmap(&cow), m.nsect);
            assert_eq!(bits, vec![0], "COW bits after one written sector");
            let merged = uml_moo(&cow, &dir.path().join("merged.img"));
            assert_same("uml_moo merge", &merged, &m.data, 0, size);
        },
    );
}
