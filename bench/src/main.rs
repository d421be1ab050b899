// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ubd-bench`: N queues x iodepth D of random or sequential I/O for T
//! seconds, one thread per queue, against a vhost-user-blk socket (libblkio
//! client, the same for every server) or, as the limit, io_uring straight at
//! a host file with O_DIRECT. Prints one JSON line: IOPS, MB/s, latency
//! percentiles, and the server's CPU seconds per I/O (from /proc/PID/stat).

use std::{
    fs::OpenOptions,
    mem::MaybeUninit,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random writes, a flush after every 16 writes.
    Flushmix,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

/// Load generator for vhost-user-blk servers.
#[derive(Debug, Parser)]
struct Args {
    /// vhost-user socket of the server.
    #[arg(long, conflicts_with = "file")]
    socket: Option<PathBuf>,
    /// Limit mode: io_uring with O_DIRECT straight at this file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Queues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Workload.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes of the device used (from offset 0); default: all of it.
    #[arg(long)]
    size: Option<u64>,
    /// Server PID, for CPU seconds per I/O.
    #[arg(long)]
    pid: Option<u32>,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Flushmix: a flush after this many writes.
    #[arg(long, default_value_t = 16)]
    flush_every: u64,
    /// Sequential modes: stop once each queue covered its slice of the
    /// region (a prefill pass).
    #[arg(long)]
    once: bool,
    /// Label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    label: String,
    mode: Mode,
    queues: usize,
    depth: usize,
    bs: usize,
    seconds: f64,
    ios: u64,
    errors: u64,
    iops: f64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    server_cpu_s: Option<f64>,
    cpu_us_per_io: Option<f64>,
    flushes: u64,
    flush_p50_us: f64,
    flush_p99_us: f64,
    flush_max_us: f64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Offsets for one queue: random over the region, or sequential from this
/// queue's own slice of it.
struct Offsets {
    rng: Rng,
    random: bool,
    blocks: u64,
    bs: u64,
    next: u64,
    start: u64,
    span: u64,
}

impl Offsets {
    fn new(args: &Args, size: u64, qi: usize) -> Self {
        let bs = args.bs as u64;
        let blocks = (size / bs).max(1);
        let random = matches!(args.mode, Mode::Randread | Mode::Randwrite | Mode::Flushmix);
        let span = (blocks / args.queues as u64).max(1);
        let start = span * qi as u64;
        Self {
            rng: Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (qi as u64 + 1)),
            random,
            blocks,
            bs,
            next: 0,
            start,
            span,
        }
    }

    fn next(&mut self) -> u64 {
        if self.random {
            (self.rng.next() % self.blocks) * self.bs
        } else {
            let b = self.start + self.next % self.span;
            self.next += 1;
            b * self.bs
        }
    }

    /// True once a sequential pass covered this queue's slice.
    fn wrapped(&self) -> bool {
        !self.random && self.next >= self.span
    }
}

/// Per-thread result: latencies in microseconds (flushes apart), errors.
struct ThreadResult {
    lat: Vec<u32>,
    flush_lat: Vec<u32>,
    errors: u64,
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

fn run_blkio_queue(
    q: &mut Blkioq,
    buf: usize,
    args: &Args,
    size: u64,
    qi: usize,
    stop: &AtomicBool,
) -> ThreadResult {
    let mut offs = Offsets::new(args, size, qi);
    let mut lat = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let mut started = vec![Instant::now(); args.depth];
    let mut writes = 0u64;
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..args.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = 0usize;
    let mut flush_lat = Vec::new();
    let mut is_flush = vec![false; args.depth];
    let submit = |q: &mut Blkioq, slot: usize, writes: &mut u64, offs: &mut Offsets| -> bool {
        let ptr = (buf + slot * args.bs) as *mut u8;
        match args.mode {
            Mode::Randread | Mode::Read => {
                q.read(offs.next(), ptr, args.bs, slot, ReqFlags::empty());
            }
            Mode::Randwrite | Mode::Write => {
                q.write(offs.next(), ptr, args.bs, slot, ReqFlags::empty());
            }
            Mode::Flushmix => {
                *writes += 1;
                if (*writes).is_multiple_of(args.flush_every + 1) {
                    q.flush(slot, ReqFlags::empty());
                    return true;
                }
                q.write(offs.next(), ptr, args.bs, slot, ReqFlags::empty());
            }
        }
        false
    };
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        is_flush[slot] = submit(q, slot, &mut writes, &mut offs);
        in_flight += 1;
    }
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(10);
        let n = match q.do_io(&mut done, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("queue {qi}: do_io: {e}");
                errors += in_flight as u64;
                break;
            }
        };
        let stopping = stop.load(Ordering::Relaxed) || (args.once && offs.wrapped());
        for c in done.iter().take(n) {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if c.ret != 0 {
                errors += 1;
            }
            let ns = u32::try_from(started[slot].elapsed().as_micros()).unwrap_or(u32::MAX);
            if is_flush[slot] {
                flush_lat.push(ns);
            } else {
                lat.push(ns);
            }
            in_flight -= 1;
            if !stopping {
                started[slot] = Instant::now();
                is_flush[slot] = submit(q, slot, &mut writes, &mut offs);
                in_flight += 1;
            }
        }
    }
    ThreadResult {
        lat,
        flush_lat,
        errors,
    }
}

fn run_socket(
    args: &Args,
    socket: &std::path::Path,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<ThreadResult>, String> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| e.to_string())?;
    b.set_str("path", &socket.to_string_lossy())
        .map_err(|e| e.to_string())?;
    b.connect().map_err(|e| format!("connect: {e}"))?;
    b.set_i32("num-queues", args.queues as i32)
        .map_err(|e| e.to_string())?;
    b.set_i32("queue-size", 256).map_err(|e| e.to_string())?;
    let mut out = b.start().map_err(|e| format!("start: {e}"))?;
    let capacity = b.get_u64("capacity").map_err(|e| e.to_string())?;
    let size = args.size.unwrap_or(capacity).min(capacity);
    let len = (args.queues * args.depth * args.bs).div_ceil(2 << 20) * (2 << 20);
    let region = b
        .alloc_mem_region(len)
        .map_err(|e| format!("alloc_mem_region: {e}"))?;
    b.map_mem_region(&region)
        .map_err(|e| format!("map_mem_region: {e}"))?;
    // Non-zero data for writes.
    // SAFETY: the region is `len` bytes of freshly mapped memory we own.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xa5, len) };
    let base = region.addr;
    let results = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for (qi, q) in out.queues.iter_mut().enumerate() {
            let buf = base + qi * args.depth * args.bs;
            let stop = stop.clone();
            hs.push(s.spawn(move || run_blkio_queue(q, buf, args, size, qi, &stop)));
        }
        let end = Instant::now() + Duration::from_secs_f64(args.seconds);
        while Instant::now() < end && !hs.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        hs.into_iter()
            .map(|h| h.join().expect("worker"))
            .collect::<Vec<_>>()
    });
    drop(out);
    drop(b);
    Ok(results)
}

fn run_uring_queue(
    fd: i32,
    buf: usize,
    args: &Args,
    size: u64,
    qi: usize,
    stop: &AtomicBool,
) -> ThreadResult {
    use io_uring::{opcode, types, IoUring};
    let mut ring = IoUring::new((args.depth as u32).next_power_of_two().max(4)).expect("io_uring");
    let mut offs = Offsets::new(args, size, qi);
    let mut lat = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let mut started = vec![Instant::now(); args.depth];
    let mut writes = 0u64;
    let mut in_flight = 0usize;
    let push = |ring: &mut IoUring, slot: usize, writes: &mut u64, offs: &mut Offsets| {
        let ptr = (buf + slot * args.bs) as *mut u8;
        let e = match args.mode {
            Mode::Randread | Mode::Read => opcode::Read::new(types::Fd(fd), ptr, args.bs as u32)
                .offset(offs.next())
                .build(),
            Mode::Randwrite | Mode::Write => opcode::Write::new(types::Fd(fd), ptr, args.bs as u32)
                .offset(offs.next())
                .build(),
            Mode::Flushmix => {
                *writes += 1;
                if (*writes).is_multiple_of(args.flush_every + 1) {
                    opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                } else {
                    opcode::Write::new(types::Fd(fd), ptr, args.bs as u32)
                        .offset(offs.next())
                        .build()
                }
            }
        };
        // SAFETY: the buffer slot is owned by this request until its
        // completion is reaped below; the ring is large enough for `depth`.
        unsafe {
            ring.submission()
                .push(&e.user_data(slot as u64))
                .expect("sq full")
        };
    };
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        push(&mut ring, slot, &mut writes, &mut offs);
        in_flight += 1;
    }
    while in_flight > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                eprintln!("io_uring: {e}");
                break;
            }
        }
        let stopping = stop.load(Ordering::Relaxed) || (args.once && offs.wrapped());
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            let slot = ud as usize;
            if res < 0 {
                errors += 1;
            }
            lat.push(u32::try_from(started[slot].elapsed().as_micros()).unwrap_or(u32::MAX));
            in_flight -= 1;
            if !stopping {
                started[slot] = Instant::now();
                push(&mut ring, slot, &mut writes, &mut offs);
                in_flight += 1;
            }
        }
    }
    ThreadResult {
        lat,
        flush_lat: Vec::new(),
        errors,
    }
}

fn run_file(
    args: &Args,
    path: &std::path::Path,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<ThreadResult>, String> {
    let write = !matches!(args.mode, Mode::Randread | Mode::Read);
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let size = args.size.unwrap_or(len).min(len);
    let total = args.queues * args.depth * args.bs;
    let layout = std::alloc::Layout::from_size_align(total, 4096).map_err(|e| e.to_string())?;
    // SAFETY: non-zero size layout.
    let mem = unsafe { std::alloc::alloc(layout) };
    if mem.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: `mem` is `total` bytes we just allocated.
    unsafe { std::ptr::write_bytes(mem, 0xa5, total) };
    let base = mem as usize;
    let fd = f.as_raw_fd();
    let results = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for qi in 0..args.queues {
            let buf = base + qi * args.depth * args.bs;
            let stop = stop.clone();
            hs.push(s.spawn(move || run_uring_queue(fd, buf, args, size, qi, &stop)));
        }
        let end = Instant::now() + Duration::from_secs_f64(args.seconds);
        while Instant::now() < end && !hs.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        hs.into_iter()
            .map(|h| h.join().expect("worker"))
            .collect::<Vec<_>>()
    });
    // SAFETY: allocated above with this layout; the threads are joined.
    unsafe { std::alloc::dealloc(mem, layout) };
    Ok(results)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = args.pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    let results = match (&args.socket, &args.file) {
        (Some(s), None) => run_socket(&args, s, &stop),
        (None, Some(f)) => run_file(&args, f, &stop),
        _ => Err("give --socket or --file".into()),
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = args.pid.and_then(cpu_seconds);
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ubd-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut lat: Vec<u32> = results.iter().flat_map(|r| r.lat.iter().copied()).collect();
    let mut flush_lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.flush_lat.iter().copied())
        .collect();
    flush_lat.sort_unstable();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    lat.sort_unstable();
    let ios = (lat.len() + flush_lat.len()) as u64;
    let secs = args.seconds.min(elapsed);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let report = Report {
        label: args.label.clone(),
        mode: args.mode,
        queues: args.queues,
        depth: args.depth,
        bs: args.bs,
        seconds: secs,
        ios,
        errors,
        iops: ios as f64 / secs,
        mb_s: ios as f64 * args.bs as f64 / secs / 1e6,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        p999_us: pct(&lat, 0.999),
        max_us: lat.last().map_or(0.0, |&v| f64::from(v)),
        server_cpu_s: cpu,
        cpu_us_per_io: cpu.map(|c| c * 1e6 / ios.max(1) as f64),
        flushes: flush_lat.len() as u64,
        flush_p50_us: pct(&flush_lat, 0.50),
        flush_p99_us: pct(&flush_lat, 0.99),
        flush_max_us: flush_lat.last().map_or(0.0, |&v| f64::from(v)),
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if errors > 0 {
        eprintln!("ubd-bench: {errors} requests failed");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
