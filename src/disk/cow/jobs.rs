// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Block jobs of a COW disk, each on a thread of its own while the guest
//! runs (README "Block jobs"):
//!
//! - **flatten** copies, chunk by chunk, every sector still read from the
//!   backing into the COW. A chunk is held at the gate (`gate`) so guest
//!   writes into it wait; the copy starts only once the registered writes
//!   into it have completed, and takes only sectors still not in the COW,
//!   so it never lands over guest data. The copied sectors enter
//!   `unpersisted` like completed writes: the durability thread gives
//!   them their bits after their data is durable (R2, R5). The bitmap is
//!   the progress: a flatten started again (after a cancel, a crash, a
//!   restart) skips what is in the COW. At the end it flushes, so the
//!   bitmap on disk says every sector is in the COW.
//! - **export** writes the disk as it was at the job's start instant to a
//!   new raw image, while the guest writes on (copy-before-write, as
//!   dm-snapshot's origin): a guest write into a chunk not saved yet is
//!   parked and puts the chunk at the head of the job's queue; it waits
//!   for that chunk only, and never under the state lock.
//!
//! The job does plain blocking `pread`/`pwrite` on its own thread (the
//! guest's queues keep their rings), in chunks of [`CHUNK_BYTES`], and
//! sleeps between chunks to honour a rate limit.

use std::{
    fs::{File, OpenOptions},
    io,
    ops::Range,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    channel::{Cmd, Mailbox, Reply},
    gate::{ChunkState, Copier, ExportMap},
    queue::route,
    state::{CowShared, CowState, GATED_EXPORT, GATED_FLATTEN},
};
use crate::{
    disk::{
        job::{JobRequest, JobState, JobStatus},
        DiskError, SECTOR,
    },
    engine::{sys, AlignedBuf, EventFd},
};

/// Bytes a job copies at a time (one chunk held at the gate).
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Bytes of one read or write of a job. A guest request that reaches the
/// disk behind a job's I/O waits for it: 1 MiB transfers put the guest's
/// 4 KiB p99 at 1-2 ms (bench/jobs.py); the gate still holds whole chunks.
pub const JOB_IO_BYTES: usize = 64 * 1024;
/// How long a job waits for one guest write or copy before looking again
/// (it is woken earlier when one ends).
const WAIT: Duration = Duration::from_millis(50);

/// The job running or last run.
#[derive(Debug, Default)]
pub struct JobSlot(Mutex<Option<Job>>);

#[derive(Debug)]
struct Job {
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Progress {
    kind: &'static str,
    total: u64,
    done: AtomicU64,
    copied: AtomicU64,
    waited: AtomicU64,
    cancel: AtomicBool,
    started: Instant,
    rate: Option<u64>,
    target: Option<PathBuf>,
    end: Mutex<Option<End>>,
}

#[derive(Debug)]
struct End {
    state: JobState,
    at: Instant,
    error: Option<String>,
    note: Option<String>,
}

impl Progress {
    fn stopped(&self, shared: &CowShared) -> Result<(), String> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(CANCELLED.into());
        }
        if shared.closed.load(Ordering::Acquire) {
            return Err("the disk was shut down".into());
        }
        Ok(())
    }

    fn status(&self) -> JobStatus {
        let end = self.end.lock().ok();
        let end = end.as_ref().and_then(|e| e.as_ref());
        let now = end.map_or_else(Instant::now, |e| e.at);
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
        let done = self.done.load(Ordering::Relaxed);
        let rate = if elapsed > 0.0 {
            (done as f64 / elapsed) as u64
        } else {
            0
        };
        let eta = match end {
            Some(_) => None,
            None if rate > 0 => Some(self.total.saturating_sub(done) as f64 / rate as f64),
            None => None,
        };
        JobStatus {
            kind: self.kind,
            state: end.map_or(JobState::Running, |e| e.state),
            bytes_done: done,
            bytes_total: self.total,
            bytes_copied: self.copied.load(Ordering::Relaxed),
            rate_bps: rate,
            eta_s: eta,
            elapsed_s: elapsed,
            writes_waited: self.waited.load(Ordering::Relaxed),
            rate_limit_bps: self.rate,
            target: self.target.clone(),
            error: end.and_then(|e| e.error.clone()),
            note: end.and_then(|e| e.note.clone()),
        }
    }

    /// Sleeps so that no more than `rate` bytes per second are copied
    /// (an export wakes early for a chunk a guest write waits for).
    fn throttle(&self, shared: &CowShared) -> Result<(), String> {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return Ok(());
        };
        let due = Duration::from_secs_f64(self.copied.load(Ordering::Relaxed) as f64 / rate as f64);
        loop {
            self.stopped(shared)?;
            let left = due.saturating_sub(self.started.elapsed());
            if left.is_zero() {
                return Ok(());
            }
            let mut s = lock(shared)?;
            if s.gate.export.as_ref().is_some_and(|m| !m.urgent.is_empty()) {
                return Ok(());
            }
            s.gate.job_waits = true;
            let (s, _) = shared
                .job_cv
                .wait_timeout(s, left.min(WAIT))
                .map_err(|_| POISONED.to_string())?;
            drop(s);
        }
    }
}

const CANCELLED: &str = "cancelled";
const POISONED: &str = "the disk's state lock is poisoned (a thread panicked)";

fn lock(shared: &CowShared) -> Result<MutexGuard<'_, CowState>, String> {
    shared.state.lock().map_err(|_| POISONED.to_string())
}

/// Waits (releasing the lock) for a write or copy to end.
fn wait<'a>(
    shared: &'a CowShared,
    mut s: MutexGuard<'a, CowState>,
) -> Result<MutexGuard<'a, CowState>, String> {
    s.gate.job_waits = true;
    let (s, _) = shared
        .job_cv
        .wait_timeout(s, WAIT)
        .map_err(|_| POISONED.to_string())?;
    Ok(s)
}

fn job_error(shared: &CowShared, reason: String) -> DiskError {
    DiskError::Job {
        path: shared.info.path.clone(),
        reason,
    }
}

/// Starts a job (one at a time).
pub fn start(shared: &Arc<CowShared>, job: &JobSlot, req: JobRequest) -> Result<(), DiskError> {
    let mut slot = job
        .0
        .lock()
        .map_err(|_| job_error(shared, POISONED.into()))?;
    if let Some(j) = slot.as_ref() {
        if j.progress.end.lock().is_ok_and(|e| e.is_none()) {
            return Err(job_error(
                shared,
                format!(
                    "a {} job is running: wait for it, or stop it (vhost-user-ubd cancel \
                     --control CTL)",
                    j.progress.kind
                ),
            ));
        }
    }
    if shared.retired.load(Ordering::Acquire) || shared.closed.load(Ordering::Acquire) {
        return Err(job_error(
            shared,
            "the disk is shut down or handed over".into(),
        ));
    }
    let g = &shared.file.geometry;
    let total = sectors_bytes(g.disk_sectors());
    let (kind, rate, target, out) = match &req {
        JobRequest::Flatten { rate } => {
            if shared.info.readonly {
                return Err(job_error(
                    shared,
                    "the disk is served read-only: a flatten writes the COW".into(),
                ));
            }
            ("flatten", *rate, None, None)
        }
        JobRequest::Export { path, force, rate } => {
            if !path.is_absolute() {
                return Err(job_error(
                    shared,
                    format!("export image {}: give an absolute path", path.display()),
                ));
            }
            let mut o = OpenOptions::new();
            o.write(true).mode(0o644);
            if *force {
                o.create(true).truncate(true);
            } else {
                o.create_new(true);
            }
            let out = o.open(path).and_then(|f| f.set_len(total).map(|()| f));
            let out = out.map_err(|e| {
                job_error(
                    shared,
                    format!(
                        "export image {}: {e}{}",
                        path.display(),
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            " (remove it, or give --force)"
                        } else {
                            ""
                        }
                    ),
                )
            })?;
            // A second descriptor with O_DIRECT for the image's data: a
            // buffered copy of the whole disk floods the page cache, and
            // its writeback then stalls the guest's reads for hundreds of
            // milliseconds (measured: bench/jobs.py).
            let direct = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok();
            let image = Image {
                buffered: out,
                direct: Mutex::new(direct),
            };
            ("export", *rate, Some(path.clone()), Some(image))
        }
    };
    // A rate of 0 means no limit, as an absent one.
    let rate = rate.filter(|r| *r > 0);
    let progress = Arc::new(Progress {
        kind,
        total,
        done: AtomicU64::new(0),
        copied: AtomicU64::new(0),
        waited: AtomicU64::new(0),
        cancel: AtomicBool::new(false),
        started: Instant::now(),
        rate,
        target,
        end: Mutex::new(None),
    });
    if out.is_some() {
        // The instant is taken before the reply: a write the client sends
        // after it is never in the image.
        if let Err(e) = start_instant(shared, &progress) {
            end_export(shared);
            if let Some(t) = &progress.target {
                let _ = std::fs::remove_file(t);
            }
            return Err(job_error(shared, format!("export: {e}")));
        }
    }
    let (sh, p) = (shared.clone(), progress.clone());
    let thread = std::thread::Builder::new()
        .name(format!("ubd-{kind}"))
        .spawn(move || run(&sh, &p, out))
        .map_err(|e| {
            if kind == "export" {
                end_export(shared);
            }
            job_error(shared, format!("cannot start the job's thread: {e}"))
        })?;
    log::info!(
        "{}: {kind} started{}{}",
        shared.info.path.display(),
        progress
            .target
            .as_ref()
            .map(|t| format!(" to {}", t.display()))
            .unwrap_or_default(),
        rate.map(|r| format!(" at most {} MB/s", r / 1_000_000))
            .unwrap_or_default()
    );
    *slot = Some(Job {
        progress,
        thread: Some(thread),
    });
    Ok(())
}

/// The job running or last run.
pub fn status(job: &JobSlot) -> Option<JobStatus> {
    let slot = job.0.lock().ok()?;
    slot.as_ref().map(|j| j.progress.status())
}

/// True while a job runs.
pub fn running(job: &JobSlot) -> bool {
    status(job).is_some_and(|s| s.state == JobState::Running)
}

/// Asks the running job to stop; returns once it has.
pub fn cancel(shared: &CowShared, job: &JobSlot) -> Result<JobStatus, DiskError> {
    let thread = {
        let mut slot = job
            .0
            .lock()
            .map_err(|_| job_error(shared, POISONED.into()))?;
        let Some(j) = slot.as_mut() else {
            return Err(job_error(shared, "no job has run on this disk".into()));
        };
        j.progress.cancel.store(true, Ordering::Release);
        j.thread.take()
    };
    shared.job_cv.notify_all();
    if let Some(t) = thread {
        let _ = t.join();
    }
    status(job).ok_or_else(|| job_error(shared, "no job".into()))
}

/// Stops the job, if one runs (the disk shuts down).
pub fn stop(shared: &CowShared, job: &JobSlot) {
    if running(job) {
        let _ = cancel(shared, job);
    }
}

/// An export's image: written through `O_DIRECT` where the file system
/// takes it, through the page cache otherwise.
#[derive(Debug)]
struct Image {
    buffered: File,
    direct: Mutex<Option<File>>,
}

impl Image {
    /// Writes `block` (from an aligned buffer) at `at`.
    fn write_at(&self, block: &[u8], at: u64) -> io::Result<()> {
        const ALIGN: u64 = 4096;
        if at % ALIGN == 0 && block.len() as u64 % ALIGN == 0 {
            if let Ok(mut d) = self.direct.lock() {
                if let Some(f) = d.as_ref() {
                    match f.write_all_at(block, at) {
                        Ok(()) => return Ok(()),
                        // Not for this file system: buffered from now on.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *d = None,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.buffered.write_all_at(block, at)
    }
}

fn run(shared: &Arc<CowShared>, p: &Progress, out: Option<Image>) {
    let result = match out {
        None => flatten(shared, p),
        Some(out) => export(shared, p, &out),
    };
    // Whatever happened, the gate lets writes pass again.
    let bit = if out_is_export(p) {
        GATED_EXPORT
    } else {
        GATED_FLATTEN
    };
    shared.gated.fetch_and(!bit, Ordering::SeqCst);
    if let Ok(mut s) = shared.state.lock() {
        if bit == GATED_EXPORT {
            s.gate.export = None;
        }
        s.gate.job_waits = false;
        if s.gate.parked {
            s.gate.parked = false;
            shared.channel.wake_parked();
        }
    }
    let path = shared.info.path.display();
    let (state, error, note) = match result {
        Ok(note) => {
            log::info!(
                "{path}: {} completed: {} bytes copied in {:.1} s{}",
                p.kind,
                p.copied.load(Ordering::Relaxed),
                p.started.elapsed().as_secs_f64(),
                note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
            );
            (JobState::Completed, None, note)
        }
        Err(e) if e == CANCELLED => {
            log::info!("{path}: {} cancelled", p.kind);
            (JobState::Cancelled, None, None)
        }
        Err(e) => {
            log::error!("{path}: {} failed: {e}", p.kind);
            (JobState::Failed, Some(e), None)
        }
    };
    if state != JobState::Completed {
        if let Some(t) = &p.target {
            if let Err(e) = std::fs::remove_file(t) {
                log::warn!("{}: cannot remove the unfinished export: {e}", t.display());
            }
        }
    }
    if let Ok(mut end) = p.end.lock() {
        *end = Some(End {
            state,
            at: Instant::now(),
            error,
            note,
        });
    }
}

fn out_is_export(p: &Progress) -> bool {
    p.kind == "export"
}

/// The chunk size: `DiskOptions::job_chunk`, whole COW sectors, at most
/// 64 MiB.
fn chunk_bytes(shared: &CowShared) -> u64 {
    let ss = u64::from(shared.file.geometry.sectorsize);
    let c = shared.opts.job_chunk.clamp(ss, 64 << 20);
    c.saturating_sub(c.checked_rem(ss).unwrap_or(0))
}

/// An export's chunk: at most one job I/O ([`JOB_IO_BYTES`]), because
/// every guest write into a chunk not saved yet waits for the chunk's read
/// (with 1 MiB chunks a random write's p99 was 3.8 ms: bench/jobs.py).
fn export_chunk_bytes(shared: &CowShared) -> u64 {
    let ss = u64::from(shared.file.geometry.sectorsize);
    chunk_bytes(shared).min((JOB_IO_BYTES as u64).max(ss))
}

fn sectors_bytes(sectors: u64) -> u64 {
    sectors.saturating_mul(SECTOR)
}

/// Waits for the writes admitted before the job gated them (they took no
/// ticket) to complete.
fn wait_unregistered(shared: &CowShared, p: &Progress) -> Result<(), String> {
    while shared.unregistered.total() > 0 {
        p.stopped(shared)?;
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `pos`, zeros past the end of the file.
fn read_full_at(file: &File, buf: &mut [u8], pos: u64) -> io::Result<()> {
    let mut off = 0usize;
    while let Some(rest) = buf.get_mut(off..).filter(|r| !r.is_empty()) {
        let n = rest.len().min(JOB_IO_BYTES);
        let rest = rest.get_mut(..n).unwrap_or_default();
        match file.read_at(rest, pos.saturating_add(off as u64)) {
            Ok(0) => {
                rest.fill(0);
                return Ok(());
            }
            Ok(n) => off = off.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `data` at `pos` in writes of at most [`JOB_IO_BYTES`].
fn write_pieces(file: &File, data: &[u8], pos: u64) -> io::Result<()> {
    for (i, piece) in data.chunks(JOB_IO_BYTES).enumerate() {
        let at = (i as u64)
            .checked_mul(JOB_IO_BYTES as u64)
            .and_then(|o| pos.checked_add(o))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        file.write_all_at(piece, at)?;
    }
    Ok(())
}

/// Asks the durability thread for a FLUSH and waits for it (every
/// completed write, and every copied sector, durable with its bits).
fn flush(shared: &CowShared) -> Result<(), String> {
    let event = Arc::new(EventFd::new().map_err(|e| format!("eventfd: {e}"))?);
    let mailbox = Arc::new(Mailbox::new(event.clone()));
    shared.channel.send(Cmd::Flush(Reply {
        mailbox: mailbox.clone(),
        tag: 0,
    }));
    let mut out = Vec::new();
    loop {
        if mailbox.take(&mut out) > 0 {
            return match out.first().map(|c| c.result) {
                Some(Err(errno)) => Err(format!("flush: {}", io::Error::from_raw_os_error(errno))),
                _ => Ok(()),
            };
        }
        if shared.closed.load(Ordering::Acquire) {
            return Err("the disk was shut down before the final flush".into());
        }
        event.wait_for(Some(WAIT));
    }
}

/// Copies the sectors of `run` (COW sectors) from the backing to the COW,
/// through `buf`; all-zero pieces are punched instead (the COW stays thin).
fn copy_run(
    shared: &CowShared,
    p: &Progress,
    buf: &mut AlignedBuf,
    run: Range<u64>,
) -> Result<(), String> {
    let f = &shared.file;
    let sectors = f.geometry.sectors_of(run);
    let mut s = sectors.start;
    while s < sectors.end {
        let n = sectors.end.saturating_sub(s).min(CHUNK_BYTES / SECTOR);
        let len = usize::try_from(sectors_bytes(n)).unwrap_or(0);
        let piece = buf
            .as_mut_slice()
            .get_mut(..len)
            .ok_or_else(|| "copy buffer too small".to_string())?;
        read_full_at(&f.backing_fd, piece, sectors_bytes(s)).map_err(|e| {
            format!(
                "reading the backing file {} at byte {}: {e}",
                f.backing_path.display(),
                sectors_bytes(s)
            )
        })?;
        let pos = f.geometry.data_pos(s);
        let written = if piece.iter().all(|&b| b == 0) {
            sys::punch_hole(&f.data_fd, pos, sectors_bytes(n))
                .or_else(|_| write_pieces(&f.data_fd, piece, pos))
        } else {
            write_pieces(&f.data_fd, piece, pos)
        };
        written.map_err(|e| format!("writing the COW at byte {pos}: {e}"))?;
        if let Some(o) = &shared.opts.observer {
            // What reached the file (after the call: a sync from now on
            // covers it), for the crash-state recorder.
            use std::os::fd::AsRawFd;
            if piece.iter().all(|&b| b == 0) {
                o.0.on_zero(f.data_fd.as_raw_fd(), pos, sectors_bytes(n));
            } else {
                o.0.on_write(f.data_fd.as_raw_fd(), pos, piece);
            }
        }
        p.copied.fetch_add(sectors_bytes(n), Ordering::Relaxed);
        s = s.saturating_add(n);
    }
    Ok(())
}

fn flatten(shared: &CowShared, p: &Progress) -> Result<Option<String>, String> {
    shared.gated.fetch_or(GATED_FLATTEN, Ordering::SeqCst);
    wait_unregistered(shared, p)?;
    let f = &shared.file;
    let g = &f.geometry;
    let limit = g.bitmap_sectors();
    let chunk_bits = chunk_bytes(shared)
        .checked_div(u64::from(g.sectorsize))
        .unwrap_or(1)
        .max(1);
    let mut buf = AlignedBuf::new(CHUNK_BYTES as usize).map_err(|e| format!("copy buffer: {e}"))?;
    let mut b0 = 0u64;
    while b0 < limit {
        p.stopped(shared)?;
        if shared.backing_changed.load(Ordering::Acquire) {
            return Err(format!(
                "the backing file {} changed while serving (R6): nothing more is copied from it",
                f.backing_path.display()
            ));
        }
        let chunk = b0..b0.saturating_add(chunk_bits).min(limit);
        let sectors = g.sectors_of(chunk.clone());
        let bytes = sectors_bytes(sectors.end.saturating_sub(sectors.start));
        if !f.bitmap.all_set(chunk.clone()) {
            let runs = claim(shared, p, &chunk)?;
            let copied = runs
                .iter()
                .try_for_each(|r| copy_run(shared, p, &mut buf, r.clone()));
            finish(shared, &chunk, if copied.is_ok() { &runs } else { &[] })?;
            copied?;
        }
        p.done.fetch_add(bytes, Ordering::Relaxed);
        p.throttle(shared)?;
        b0 = chunk.end;
    }
    flush(shared)?;
    Ok((limit < g.nsect).then(|| {
        format!(
            "sectors from {} on have no bit in this {} bitmap and are still read from the \
             backing",
            limit << g.shift(),
            f.header.version.name()
        )
    }))
}

/// Holds `chunk` at the gate for the flatten once no copy-up is in flight
/// in it and the registered writes into it have completed; returns the
/// runs of COW sectors still not in the COW.
fn claim(shared: &CowShared, p: &Progress, chunk: &Range<u64>) -> Result<Vec<Range<u64>>, String> {
    let mut s = lock(shared)?;
    if crate::engine::hooks::gate_off("flatten") {
        let runs = route(&shared.file.bitmap, &s.unpersisted, chunk.clone());
        return Ok(runs
            .into_iter()
            .filter(|r| !r.2)
            .map(|r| r.0..r.1)
            .collect());
    }
    while s.gate.busy(chunk, None) {
        p.stopped(shared)?;
        s = wait(shared, s)?;
    }
    s.gate.hold(chunk.clone(), Copier::Flatten);
    let mut waited = false;
    while s.gate.writing(chunk) {
        waited = true;
        if let Err(e) = p.stopped(shared) {
            s.gate.release(chunk);
            return Err(e);
        }
        s = wait(shared, s)?;
    }
    if waited {
        p.waited.fetch_add(1, Ordering::Relaxed);
    }
    s.gate.job_waits = false;
    let runs = route(&shared.file.bitmap, &s.unpersisted, chunk.clone());
    Ok(runs
        .into_iter()
        .filter(|r| !r.2)
        .map(|r| r.0..r.1)
        .collect())
}

/// The chunk's copied runs are in the COW: they are read from there now
/// and await their bits like completed writes; the chunk leaves the gate.
fn finish(shared: &CowShared, chunk: &Range<u64>, runs: &[Range<u64>]) -> Result<(), String> {
    if let Some(j) = &shared.journal {
        for r in runs {
            j.record(r.clone());
        }
    }
    let mut kick = false;
    {
        let mut s = lock(shared)?;
        for r in runs {
            s.unpersisted.insert(r.clone());
        }
        if !runs.is_empty() && s.since.is_none() {
            s.since = Some(Instant::now());
            kick = true;
        }
        if s.unpersisted.len() >= shared.opts.max_pending_extents && !s.checkpoint_requested {
            s.checkpoint_requested = true;
            kick = true;
        }
        s.gate.release(chunk);
        if s.gate.parked {
            s.gate.parked = false;
            shared.channel.wake_parked();
        }
    }
    if kick {
        shared.channel.send(Cmd::Kick);
    }
    Ok(())
}

/// Takes an export's start instant, before `start` answers: installs the
/// chunk map, closes the gate, and waits until every write admitted before
/// it has completed. Every write admitted from then on waits for its chunk.
fn start_instant(shared: &CowShared, p: &Progress) -> Result<(), String> {
    let g = &shared.file.geometry;
    let chunk_bits = export_chunk_bytes(shared)
        .checked_div(u64::from(g.sectorsize))
        .unwrap_or(1)
        .max(1);
    {
        let mut s = lock(shared)?;
        s.gate.export = Some(ExportMap::new(g.nsect, chunk_bits));
    }
    shared.gated.fetch_or(GATED_EXPORT, Ordering::SeqCst);
    wait_unregistered(shared, p)?;
    let mut s = lock(shared)?;
    while s.gate.writes() > 0 {
        p.stopped(shared)?;
        s = wait(shared, s)?;
    }
    s.gate.job_waits = false;
    drop(s);
    log::info!(
        "{}: export to {}: start instant taken",
        shared.info.path.display(),
        p.target
            .as_ref()
            .map(|t| t.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

/// Opens the gate an export closed (it failed to start, or ended).
fn end_export(shared: &CowShared) {
    shared.gated.fetch_and(!GATED_EXPORT, Ordering::SeqCst);
    if let Ok(mut s) = shared.state.lock() {
        s.gate.export = None;
        s.gate.job_waits = false;
        if s.gate.parked {
            s.gate.parked = false;
            shared.channel.wake_parked();
        }
    }
}

fn export(shared: &CowShared, p: &Progress, out: &Image) -> Result<Option<String>, String> {
    let f = &shared.file;
    let g = &f.geometry;
    let chunk_bits = export_chunk_bytes(shared)
        .checked_div(u64::from(g.sectorsize))
        .unwrap_or(1)
        .max(1);
    let mut buf = AlignedBuf::new(export_chunk_bytes(shared) as usize)
        .map_err(|e| format!("copy buffer: {e}"))?;
    let mut cursor = 0u64;
    loop {
        p.stopped(shared)?;
        let Some((c, urgent)) = next_chunk(shared, &mut cursor)? else {
            break;
        };
        let bits = c.saturating_mul(chunk_bits)..c.saturating_add(1).saturating_mul(chunk_bits);
        let bits = bits.start..bits.end.min(g.nsect);
        let sectors = g.sectors_of(bits.clone());
        let len = usize::try_from(sectors_bytes(sectors.end.saturating_sub(sectors.start)))
            .map_err(|_| "chunk too large".to_string())?;
        let read = read_chunk(shared, p, &mut buf, c, bits, sectors.start, len);
        // On an error the job ends, and with it the map: no write waits
        // for a chunk nobody will save.
        read?;
        if urgent {
            p.waited.fetch_add(1, Ordering::Relaxed);
        }
        let piece = buf.as_slice().get(..len).unwrap_or_default();
        let pos = sectors_bytes(sectors.start);
        // The image was made sparse: zeros need no write.
        for (i, block) in piece.chunks(JOB_IO_BYTES).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let at = pos.saturating_add((i as u64).saturating_mul(JOB_IO_BYTES as u64));
                out.write_at(block, at)
                    .map_err(|e| format!("writing the export image at byte {at}: {e}"))?;
            }
        }
        p.copied.fetch_add(len as u64, Ordering::Relaxed);
        p.done.fetch_add(len as u64, Ordering::Relaxed);
        p.throttle(shared)?;
    }
    out.buffered
        .sync_all()
        .map_err(|e| format!("syncing the export image: {e}"))?;
    Ok(None)
}

/// The next chunk to save: one a guest write waits for, else the next
/// not saved in order. Marks it pending (writes into it wait).
fn next_chunk(shared: &CowShared, cursor: &mut u64) -> Result<Option<(u64, bool)>, String> {
    let mut s = lock(shared)?;
    let Some(map) = s.gate.export.as_mut() else {
        return Ok(None);
    };
    while let Some(c) = map.urgent.pop_front() {
        if map.state(c) == ChunkState::None {
            map.set(c, ChunkState::Pending);
            return Ok(Some((c, true)));
        }
    }
    while *cursor < map.chunks() {
        let c = *cursor;
        *cursor = cursor.saturating_add(1);
        if map.state(c) == ChunkState::None {
            map.set(c, ChunkState::Pending);
            return Ok(Some((c, false)));
        }
    }
    Ok(None)
}

/// Reads chunk `c` (COW sectors `bits`, 512-byte sectors from `first`) as
/// the guest would, into `buf`; then the chunk is saved and writes into it
/// go.
fn read_chunk(
    shared: &CowShared,
    p: &Progress,
    buf: &mut AlignedBuf,
    c: u64,
    bits: Range<u64>,
    first: u64,
    len: usize,
) -> Result<(), String> {
    let f = &shared.file;
    let shift = f.geometry.shift();
    let runs = loop {
        p.stopped(shared)?;
        let s = lock(shared)?;
        let runs = route(&f.bitmap, &s.unpersisted, bits.clone());
        let backing: Vec<Range<u64>> = runs.iter().filter(|r| !r.2).map(|r| r.0..r.1).collect();
        // R4, as for a guest read: not while a bitmap write is pending.
        if s.wb.check_read(&backing).is_ok() {
            break runs;
        }
        drop(s);
        std::thread::sleep(Duration::from_micros(500));
    };
    if !runs.iter().all(|r| r.2) && shared.backing_changed.load(Ordering::Acquire) {
        return Err(format!(
            "the backing file {} changed while serving (R6)",
            f.backing_path.display()
        ));
    }
    let end = first.saturating_add((len as u64) / SECTOR);
    for (b0, b1, cow) in runs {
        let s0 = (b0 << shift).max(first);
        let s1 = (b1 << shift).min(end);
        let from = usize::try_from(sectors_bytes(s0.saturating_sub(first))).unwrap_or(0);
        let to = usize::try_from(sectors_bytes(s1.saturating_sub(first))).unwrap_or(0);
        let piece = buf
            .as_mut_slice()
            .get_mut(from..to)
            .ok_or_else(|| "copy buffer too small".to_string())?;
        let (file, pos, name) = if cow {
            (&f.data_fd, f.geometry.data_pos(s0), &f.path)
        } else {
            (&f.backing_fd, sectors_bytes(s0), &f.backing_path)
        };
        read_full_at(file, piece, pos)
            .map_err(|e| format!("reading {} at byte {pos}: {e}", name.display()))?;
    }
    let mut s = lock(shared)?;
    if let Some(map) = s.gate.export.as_mut() {
        map.set(c, ChunkState::Saved);
    }
    if s.gate.parked {
        s.gate.parked = false;
        shared.channel.wake_parked();
    }
    Ok(())
}
