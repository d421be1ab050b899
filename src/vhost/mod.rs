// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user virtio-blk backend, and the only code that knows the
//! vhost, vhost-user-backend and virtio-queue crates: `backend.rs` (the
//! `VhostUserBackend` impl), `worker.rs` (a queue's requests: pop, start,
//! in-order completion, parked reads), `config_space.rs`, `memory.rs` (what
//! guest memory the daemon accepts, iovecs into it).
//!
//! - One epoll thread per queue (`queues_per_thread`), each with its own
//!   [`DiskQueue`] (its own io_uring) whose eventfd is registered on that
//!   thread's epoll: kicks and completions are handled by one thread, and
//!   queues run in parallel (no lock is shared between workers).
//! - Zero copy: iovecs point straight into guest memory; each request keeps
//!   the guest memory mapping alive until it completes.
//! - With inflight tracking (`inflight.rs`, QEMU and cloud-hypervisor take
//!   it) a request reaches the used ring as soon as its I/O is done, and a
//!   restarted daemon resubmits what its predecessor left in flight.
//!   Without it (libblkio) completions reach the used ring **in pop
//!   order**: after a daemon crash the frontend restarts the ring at the
//!   used index, which then replays exactly the requests that had not
//!   completed (all idempotent).
//! - Reads the disk hands back with `Again` (R4) are parked per queue and
//!   resubmitted when the disk says so; they are never failed.
//! - Bad chains get IOERR/UNSUPP (or used length 0 when there is no status
//!   byte), a rate-limited log line, and the queue goes on (R8).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    time::{Duration, Instant},
};

use vhost_user_backend::VringRwLock;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::disk::Disk;

mod backend;
mod config_space;
pub mod connection;
pub mod gate;
mod inflight;
mod memory;
mod worker;

pub use config_space::CONFIG_LEN;
use worker::{RateLimit, Worker};

/// Guest memory whose regions carry a dirty-page log that QEMU can switch
/// on for a live migration (SET_LOG_BASE); writes through vm-memory mark it.
type Mem = GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;
type Gm = GuestMemoryAtomic<Mem>;
/// The vring type the backend uses.
pub type Vring = VringRwLock<Gm>;

/// Virtio feature bit of dirty-page logging (`VHOST_F_LOG_ALL`).
pub(crate) const VHOST_F_LOG_ALL: u32 = 26;

/// Largest queue count.
pub const MAX_QUEUES: usize = 16;

/// Epoll id of the disk eventfd of a thread's `local`-th queue (ids up to
/// `num_queues` are the library's: kicks, then the exit event).
fn disk_event_id(queues: usize, local: usize) -> u16 {
    u16::try_from(queues + 1 + local).unwrap_or(u16::MAX)
}

/// What the backend serves.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Queues offered (GET_QUEUE_NUM).
    pub queues: usize,
    /// Largest queue size accepted.
    pub queue_size: u16,
    /// Refuse writes, offer VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// GET_ID answer (at most 20 bytes).
    pub serial: String,
    /// Force WCE=0: no CONFIG_WCE, every write durable at completion.
    pub writethrough: bool,
    /// Worker threads; queue `q` is served by thread `q % threads`.
    pub threads: usize,
    /// Offer inflight I/O tracking (requests then complete out of order).
    pub inflight: bool,
    /// Test hook: complete out of order even without inflight tracking.
    pub out_of_order: bool,
}

/// Counters for logs and tests.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Requests answered IOERR or UNSUPP or dropped as malformed.
    pub bad_requests: AtomicU64,
    /// Requests completed.
    pub completed: AtomicU64,
}

/// The virtio-blk device.
pub struct BlkBackend {
    disk: Arc<dyn Disk>,
    cfg: BlkConfig,
    workers: Vec<Mutex<Worker>>,
    mem: RwLock<Option<Gm>>,
    event_idx: AtomicBool,
    acked: AtomicU64,
    /// Guest's WCE choice (config byte).
    wce: AtomicBool,
    /// Stop popping new requests (graceful shutdown).
    stopping: AtomicBool,
    /// SET_FEATURES seen on this connection.
    negotiated: AtomicBool,
    /// The backend-to-frontend channel of this connection (config change
    /// notifications), when the frontend set one up.
    channel: Mutex<Option<vhost::vhost_user::Backend>>,
    /// The disk was resized during this daemon's life: a new frontend is
    /// told (QEMU does not read the config space again on reconnect).
    resized: AtomicBool,
    /// A config change notification waits for the rings to run.
    announce: AtomicBool,
    /// A migration destination's switch-over gate: rings wait at it until
    /// the disk has been handed over.
    gate: Option<Arc<gate::SwitchGate>>,
    /// Counters.
    pub stats: BackendStats,
}

/// What the control socket's `status` reports about the device.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceStatus {
    /// A frontend negotiated features on the current connection.
    pub connected: bool,
    /// Virtio features acked by the frontend (0 before SET_FEATURES).
    pub features: u64,
    /// Queues offered.
    pub queues: usize,
    /// Requests popped and not yet completed to the guest.
    pub in_flight: usize,
    /// Reads parked for a bitmap write (R4).
    pub parked: usize,
    /// The frontend set up the backend channel (resize notifications).
    pub config_channel: bool,
    /// Requests completed since start.
    pub completed: u64,
    /// Requests answered IOERR or UNSUPP since start.
    pub bad_requests: u64,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Locks `m`; a panic of another holder does not poison it for us (the
/// state it guards stays consistent at every unlock).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// True when the worker has nothing in flight; false while it is busy
/// (never blocks, so callers' deadlines hold).
fn idle(w: &Mutex<Worker>) -> bool {
    match w.try_lock() {
        Ok(g) => g.slots.is_empty(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().slots.is_empty(),
        Err(std::sync::TryLockError::WouldBlock) => false,
    }
}

impl BlkBackend {
    /// A backend with one disk queue per virtqueue.
    pub fn new(disk: Arc<dyn Disk>, cfg: BlkConfig) -> Result<Self, crate::disk::DiskError> {
        let mut workers = Vec::new();
        for index in 0..cfg.queues {
            workers.push(Mutex::new(Worker {
                index,
                broken: false,
                queue: Box::new(
                    crate::disk::lazy::LazyQueue::new(disk.clone()).map_err(|e| {
                        crate::disk::DiskError::Setup {
                            path: disk.info().path.clone(),
                            source: e,
                        }
                    })?,
                ),
                slots: VecDeque::new(),
                base_seq: 0,
                next_seq: 0,
                parked: VecDeque::new(),
                done: Vec::new(),
                limit: RateLimit {
                    window: Instant::now(),
                    count: 0,
                },
                inflight: None,
                counter: 1,
                recover: false,
                repoll: false,
            }));
        }
        let wce = !cfg.writethrough;
        disk.set_writeback(false);
        Ok(Self {
            disk,
            cfg,
            workers,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            wce: AtomicBool::new(wce),
            stopping: AtomicBool::new(false),
            negotiated: AtomicBool::new(false),
            channel: Mutex::new(None),
            resized: AtomicBool::new(false),
            announce: AtomicBool::new(false),
            gate: None,
            stats: BackendStats::default(),
        })
    }

    /// Rings wait at `gate` before they pop (a migration destination).
    #[must_use]
    pub fn with_gate(mut self, gate: Arc<gate::SwitchGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The switch-over failed: rings waiting at the gate give up.
    pub fn gate_failed(&self) {
        if let Some(g) = &self.gate {
            g.open(false);
        }
    }

    /// A live migration runs (the frontend asked for dirty-page logging).
    pub fn migrating(&self) -> bool {
        self.logging()
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }

    /// Worker threads (at least one, at most one per queue).
    fn threads(&self) -> usize {
        self.cfg.threads.clamp(1, self.cfg.queues.max(1))
    }

    /// The queues thread `thread` serves, in the order of its vrings.
    fn thread_queues(&self, thread: usize) -> impl Iterator<Item = usize> {
        let n = self.threads();
        (0..self.cfg.queues).filter(move |q| q % n == thread)
    }

    /// The disk eventfds of thread `thread`'s queues and the epoll ids to
    /// register them with.
    pub fn disk_event_fds(&self, thread: usize) -> Vec<(std::os::fd::RawFd, u64)> {
        self.thread_queues(thread)
            .enumerate()
            .filter_map(|(local, q)| {
                let w = self.workers.get(q)?;
                let id = disk_event_id(self.cfg.queues, local);
                Some((lock(w).queue.event_fd(), u64::from(id)))
            })
            .collect()
    }

    /// Called between connections: finish disk I/O of the old one, forget
    /// its rings and negotiated state.
    pub fn disconnected(&self) {
        if !self.negotiated.swap(false, Ordering::AcqRel) {
            log::warn!(
                "the frontend disconnected before SET_FEATURES. If QEMU reported \"The maximum number of \
                 queues supported by the backend is {n}\", start vhost-user-ubd with --queues matching \
                 the device's num-queues (QEMU defaults num-queues to the vCPU count)",
                n = self.cfg.queues
            );
        }
        for w in &self.workers {
            lock(w).discard_all();
        }
        *self
            .mem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        *lock(&self.channel) = None;
        self.announce.store(false, Ordering::Release);
        self.event_idx.store(false, Ordering::Release);
        self.acked.store(0, Ordering::Release);
        self.wce.store(!self.cfg.writethrough, Ordering::Release);
    }

    /// Stop taking requests and wait (up to `timeout`) for the ones in
    /// flight to complete to the guest.
    pub fn drain(&self, timeout: Duration) -> bool {
        self.stopping.store(true, Ordering::Release);
        self.wait_idle(timeout)
    }

    /// Suspends the device (a live handover): no request is popped from
    /// here on (the guest's stay in the rings, for whoever serves next),
    /// and the ones popped complete. False if some were still in flight
    /// after `timeout` (the caller then resumes).
    pub fn suspend(&self, timeout: Duration) -> bool {
        self.drain(timeout)
    }

    /// Takes requests again after [`BlkBackend::suspend`]: each queue pops
    /// what the guest queued meanwhile (its kicks were taken unanswered).
    pub fn resume(&self) {
        self.stopping.store(false, Ordering::Release);
        for w in &self.workers {
            let mut w = lock(w);
            w.repoll = true;
            w.queue.wake();
        }
    }

    /// Counters to carry over to the instance that takes over.
    pub fn counters(&self) -> (u64, u64, bool) {
        (
            self.stats.completed.load(Ordering::Relaxed),
            self.stats.bad_requests.load(Ordering::Relaxed),
            self.resized.load(Ordering::Acquire),
        )
    }

    /// Continues a predecessor's counters; `resized`: the disk was resized
    /// under it, so the next frontend is told.
    pub fn restore_counters(&self, completed: u64, bad_requests: u64, resized: bool) {
        self.stats.completed.store(completed, Ordering::Relaxed);
        self.stats
            .bad_requests
            .store(bad_requests, Ordering::Relaxed);
        if resized {
            self.resized.store(true, Ordering::Release);
        }
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.workers.iter().map(|w| lock(w).slots.len()).sum()
    }

    /// Waits (up to `timeout`) until no request is in flight on any queue,
    /// without stopping new ones; false if some still were.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.workers.iter().all(idle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The device as the control socket reports it.
    pub fn status(&self) -> DeviceStatus {
        let (mut in_flight, mut parked) = (0, 0);
        for w in &self.workers {
            let w = lock(w);
            in_flight += w.pending();
            parked += w.parked.len();
        }
        DeviceStatus {
            connected: self.negotiated.load(Ordering::Acquire),
            features: self.acked.load(Ordering::Acquire),
            queues: self.cfg.queues,
            in_flight,
            parked,
            config_channel: lock(&self.channel).is_some(),
            completed: self.stats.completed.load(Ordering::Relaxed),
            bad_requests: self.stats.bad_requests.load(Ordering::Relaxed),
        }
    }

    /// The config space changed (the disk was resized): tells the frontend
    /// now if it can hear it, and every later frontend once its rings run.
    /// Returns whether a notification went out now.
    pub fn config_changed(&self) -> bool {
        self.resized.store(true, Ordering::Release);
        self.notify_config()
    }

    /// Sends CONFIG_CHANGE_MSG on the backend channel, if there is one
    /// (fire and forget: the frontend answers with GET_CONFIG).
    fn notify_config(&self) -> bool {
        use vhost::vhost_user::VhostUserFrontendReqHandler;
        let ch = lock(&self.channel).clone();
        match ch {
            Some(ch) => match ch.handle_config_change() {
                Ok(_) => {
                    log::info!("told the frontend that the config space changed");
                    true
                }
                Err(e) => {
                    log::warn!("cannot send CONFIG_CHANGE_MSG to the frontend: {e}");
                    false
                }
            },
            None => {
                log::info!(
                    "the frontend has no backend channel (libblkio, some cloud-hypervisor \
                     versions): the guest sees the new size when it reconnects or reloads its driver"
                );
                false
            }
        }
    }

    /// An inflight region must describe queues this device has: 1 to
    /// `queues` of a power-of-two size up to 32768 (the virtio maximum).
    fn check_inflight_shape(
        &self,
        r: &vhost::vhost_user::message::VhostUserInflight,
    ) -> std::io::Result<()> {
        let queues_ok = (1..=self.cfg.queues).contains(&usize::from(r.num_queues));
        let size_ok = r.queue_size.is_power_of_two() && r.queue_size <= 32768;
        if queues_ok && size_ok {
            return Ok(());
        }
        log::error!(
            "inflight region of {} queues of {} descriptors refused (this device has {} queues; \
             sizes are powers of two up to 32768)",
            r.num_queues,
            r.queue_size,
            self.cfg.queues
        );
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "inflight region shape",
        ))
    }

    /// The frontend's backend channel (SET_BACKEND_REQ_FD).
    fn set_channel(&self, ch: vhost::vhost_user::Backend) {
        // Fire and forget, as libvhost-user does: with REPLY_ACK the
        // frontend answers only after its own GET_CONFIG round trip.
        ch.set_reply_ack_flag(false);
        *lock(&self.channel) = Some(ch);
        if self.resized.load(Ordering::Acquire) {
            self.announce.store(true, Ordering::Release);
        }
    }

    /// Called when a queue runs: sends a notification a resize left for
    /// this connection.
    fn announce_pending(&self) {
        if self.announce.load(Ordering::Relaxed) && self.announce.swap(false, Ordering::AcqRel) {
            self.notify_config();
        }
    }

    /// The frontend asked for dirty-page logging (a live migration runs):
    /// guest pages the kernel writes (read data) are marked by hand; vm-memory
    /// marks what goes through it (status bytes, the used ring, GET_ID).
    fn logging(&self) -> bool {
        self.acked.load(Ordering::Acquire) & (1 << VHOST_F_LOG_ALL) != 0
    }

    fn writeback_for(&self, acked: u64) -> bool {
        acked & (1 << VIRTIO_BLK_F_FLUSH) != 0
            && !self.cfg.writethrough
            && self.wce.load(Ordering::Acquire)
    }

    fn memory(&self) -> Option<Arc<Mem>> {
        self.mem
            .read()
            .ok()
            .and_then(|m| m.as_ref().map(|a| a.memory().into_inner()))
    }

    fn bad(&self, w: &mut Worker, head: u16, what: &str) {
        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        if w.limit.allow() {
            log::warn!(
                "{}: request (descriptor {head}): {what}",
                self.disk.info().path.display()
            );
        }
    }
}
