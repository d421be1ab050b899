// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user virtio-blk backend: features, config space, and one
//! worker per queue that turns descriptor chains into disk requests.
//!
//! - One epoll thread per queue (`queues_per_thread`), each with its own
//!   [`DiskQueue`] (its own io_uring) whose eventfd is registered on that
//!   thread's epoll: kicks and completions are handled by one thread, and
//!   queues run in parallel (no lock is shared between workers).
//! - Zero copy: iovecs point straight into guest memory; each request keeps
//!   the guest memory mapping alive until it completes.
//! - Completions reach the used ring **in pop order**. With out-of-order
//!   io_uring completions this costs a little head-of-line waiting, and buys
//!   crash safety without inflight tracking: after a daemon crash the
//!   frontend restarts the ring at the used index, which then replays exactly
//!   the requests that had not completed (all idempotent).
//! - Reads the disk hands back with `Again` (R4) are parked per queue and
//!   resubmitted when the disk says so; they are never failed.
//! - Bad chains get IOERR/UNSUPP (or used length 0 when there is no status
//!   byte), a rate-limited log line, and the queue goes on (R8).

use std::{
    collections::VecDeque,
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    time::{Duration, Instant},
};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::{
    virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    },
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use crate::{
    disk::{Completion, Disk, DiskQueue, IoVecs, Op, Request, Submitted},
    request::{self, BlkRequest, RequestType, Seg, SECTOR, S_IOERR, S_OK, S_UNSUPP, WZ_UNMAP},
};

type Mem = GuestMemoryMmap<()>;
type Gm = GuestMemoryAtomic<Mem>;
/// The vring type the backend uses.
pub type Vring = VringRwLock<Gm>;

/// Largest queue count.
pub const MAX_QUEUES: usize = 16;
/// Config space size (virtio_blk_config up to write_zeroes_may_unmap + pad).
pub const CONFIG_LEN: usize = 60;
/// Offset of the `writeback` byte in the config space.
const CONFIG_WCE_OFFSET: u32 = 32;
/// Discard and write-zeroes limits, in sectors.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discard alignment in sectors (4 KiB).
const DISCARD_ALIGN: u32 = 8;
/// Largest segment the guest may send.
/// (`size_max * seg_max` must fit in an i32: libblkio computes it so.)
const SIZE_MAX: u32 = 1 << 20;
/// Most segments per request (stays below IOV_MAX).
const SEG_MAX_CAP: u32 = 1022;
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
}

/// Rate limiter for guest-triggered log lines.
#[derive(Debug)]
struct RateLimit {
    window: Instant,
    count: u32,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        if self.window.elapsed() > Duration::from_secs(1) {
            if self.count > 10 {
                log::warn!(
                    "{} more bad requests in the last second (not logged)",
                    self.count - 10
                );
            }
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        self.count <= 10
    }
}

/// A request popped from the ring, in pop order.
#[derive(Debug)]
struct Slot {
    head: u16,
    /// Status byte address; `None` when the chain has none.
    status_addr: Option<GuestAddress>,
    /// Set once the request finished.
    status: Option<u8>,
    /// Bytes written into device-writable buffers before the status.
    data_in: u32,
    /// Keeps guest memory mapped while the disk uses the iovecs.
    mem: Arc<Mem>,
}

/// Per-queue state, owned by that queue's epoll thread.
struct Worker {
    /// The virtqueue's index (for logs).
    index: usize,
    /// The guest broke this ring (its available index is impossible): the
    /// queue takes no more requests until the frontend sets it up again.
    broken: bool,
    queue: Box<dyn DiskQueue>,
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`; disk tags are sequence numbers.
    base_seq: u64,
    next_seq: u64,
    /// Reads waiting for a bitmap write (R4).
    parked: VecDeque<Request>,
    done: Vec<Completion>,
    limit: RateLimit,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("in_flight", &self.slots.len())
            .field("parked", &self.parked.len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let idx = usize::try_from(seq.checked_sub(self.base_seq)?).ok()?;
        self.slots.get_mut(idx)
    }

    /// Waits for every disk request and forgets every slot (disconnect or
    /// reset: the ring they belong to is gone). The slots keep the guest
    /// memory their requests' iovecs point into mapped, so they are only
    /// dropped once the kernel is done with those iovecs: a stuck request is
    /// logged and waited for, never abandoned on a timeout.
    fn discard_all(&mut self) {
        self.parked.clear();
        let start = Instant::now();
        let mut next_report = Duration::from_secs(60);
        while self.queue.in_flight() > 0 {
            let _ = self.queue.commit();
            self.queue.wait(Some(Duration::from_millis(100)));
            self.queue.poll(&mut self.done);
            self.done.clear();
            if self.queue.in_flight() > 0 && start.elapsed() >= next_report {
                log::error!(
                    "queue {}: {} disk requests still in flight after {} s; waiting for them \
                     (the kernel may still use their guest memory)",
                    self.index,
                    self.queue.in_flight(),
                    start.elapsed().as_secs()
                );
                next_report += Duration::from_secs(60);
            }
        }
        self.slots.clear();
        self.base_seq = self.next_seq;
        self.broken = false;
    }
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
    /// Counters.
    pub stats: BackendStats,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn lock(w: &Mutex<Worker>) -> MutexGuard<'_, Worker> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
                queue: disk.new_queue()?,
                slots: VecDeque::new(),
                base_seq: 0,
                next_seq: 0,
                parked: VecDeque::new(),
                done: Vec::new(),
                limit: RateLimit {
                    window: Instant::now(),
                    count: 0,
                },
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
            stats: BackendStats::default(),
        })
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
        self.event_idx.store(false, Ordering::Release);
        self.acked.store(0, Ordering::Release);
        self.wce.store(!self.cfg.writethrough, Ordering::Release);
    }

    /// Stop taking requests and wait (up to `timeout`) for the ones in
    /// flight to complete to the guest.
    pub fn drain(&self, timeout: Duration) -> bool {
        self.stopping.store(true, Ordering::Release);
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

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.workers.iter().map(|w| lock(w).slots.len()).sum()
    }

    fn writeback_for(&self, acked: u64) -> bool {
        acked & (1 << VIRTIO_BLK_F_FLUSH) != 0
            && !self.cfg.writethrough
            && self.wce.load(Ordering::Acquire)
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| {
            if let Some(d) = c.get_mut(off..off + v.len()) {
                d.copy_from_slice(v);
            }
        };
        let seg_max = u32::from(self.cfg.queue_size)
            .saturating_sub(2)
            .clamp(1, SEG_MAX_CAP);
        put(0, &self.disk.info().sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &seg_max.to_le_bytes());
        put(20, &512u32.to_le_bytes());
        put(24, &[3, 0]); // 4 KiB physical blocks, no offset
        put(26, &8u16.to_le_bytes()); // min_io_size: 8 sectors
        put(28, &0u32.to_le_bytes());
        put(
            32,
            &[u8::from(
                !self.cfg.writethrough && self.wce.load(Ordering::Acquire),
            )],
        );
        put(
            34,
            &u16::try_from(self.cfg.queues).unwrap_or(1).to_le_bytes(),
        );
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes());
        put(44, &DISCARD_ALIGN.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[1]);
        c
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

    /// Pops and starts every available request.
    fn process_queue(&self, w: &mut Worker, vring: &Vring) {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            if !self.pop_all(w, vring) {
                // Stopped (not ready, draining, no memory): leave the ring
                // alone; re-enabling notifications would report the
                // unpopped requests forever.
                break;
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::error!("enable_notification: {e}");
                    break;
                }
            }
        }
    }

    /// Pops and starts requests until the ring is empty (true) or popping
    /// must stop: ring not ready, draining, or no guest memory (false).
    fn pop_all(&self, w: &mut Worker, vring: &Vring) -> bool {
        let Some(mem) = self.memory() else {
            return false;
        };
        let drained = loop {
            if self.stopping.load(Ordering::Acquire) {
                break false;
            }
            if w.broken {
                break false;
            }
            let chain = {
                let mut state = vring.get_mut();
                if !state.get_queue().ready() {
                    break false;
                }
                let q = state.get_queue_mut();
                let chain = q.pop_descriptor_chain(mem.clone());
                if chain.is_none() {
                    // virtio-queue answers None both for an empty ring and
                    // for one the guest broke (and logs the latter on every
                    // call): tell them apart once, here.
                    if let Some(why) = broken_ring(q, mem.as_ref()) {
                        w.broken = true;
                        log::error!(
                            "{}: queue {}: the guest broke its ring: {why}. The queue takes no \
                             more requests until the frontend sets it up again (a device reset \
                             or a reconnect); the other queues go on",
                            self.disk.info().path.display(),
                            w.index
                        );
                        break false;
                    }
                }
                chain
            };
            let Some(chain) = chain else {
                break true;
            };
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32, bool)> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            self.start(w, head, &descs, &mem);
        };
        if let Err(e) = w.queue.commit() {
            log::error!("{}: io_uring submit: {e}", self.disk.info().path.display());
        }
        self.reap(w, vring);
        drained
    }

    fn start(
        &self,
        w: &mut Worker,
        head: u16,
        descs: &[(GuestAddress, u32, bool)],
        mem: &Arc<Mem>,
    ) {
        let seq = w.next_seq;
        w.next_seq += 1;
        w.slots.push_back(Slot {
            head,
            status_addr: None,
            status: None,
            data_in: 0,
            mem: mem.clone(),
        });
        let req = match request::parse(descs.iter().copied(), mem.as_ref()) {
            Ok(r) => r,
            Err(bad) => {
                self.bad(w, head, &bad.error.to_string());
                if let Some(s) = w.slot_mut(seq) {
                    s.status_addr = bad.status;
                    s.status = Some(S_IOERR);
                }
                return;
            }
        };
        if let Some(s) = w.slot_mut(seq) {
            s.status_addr = Some(req.status);
        }
        let result = self.to_disk(w, head, &req, mem);
        match result {
            Err(status) => {
                if let Some(s) = w.slot_mut(seq) {
                    s.status = Some(status);
                }
            }
            Ok(None) => {
                let id_len =
                    u32::try_from(req.data_len.min(u64::from(VIRTIO_BLK_ID_BYTES))).unwrap_or(0);
                if let Some(s) = w.slot_mut(seq) {
                    s.status = Some(S_OK);
                    if req.rtype == RequestType::GetId {
                        s.data_in = id_len;
                    }
                }
            }
            Ok(Some(op)) => {
                if req.rtype == RequestType::In {
                    if let Some(s) = w.slot_mut(seq) {
                        s.data_in = u32::try_from(req.data_len).unwrap_or(u32::MAX);
                    }
                }
                if let Submitted::Again(r) = w.queue.submit(Request { op, tag: seq }) {
                    w.parked.push_back(r);
                }
            }
        }
    }

    /// Turns a parsed request into a disk operation, or an immediate status.
    fn to_disk(
        &self,
        w: &mut Worker,
        head: u16,
        req: &BlkRequest,
        mem: &Arc<Mem>,
    ) -> Result<Option<Op>, u8> {
        let info = self.disk.info();
        match req.rtype {
            RequestType::In | RequestType::Out => {
                if req.rtype == RequestType::Out && info.readonly {
                    self.bad(w, head, "write to a read-only disk");
                    return Err(S_IOERR);
                }
                let Some(iov) = iovecs(mem, &req.data) else {
                    self.bad(w, head, "data buffer outside guest memory");
                    return Err(S_IOERR);
                };
                let end = req.sector.checked_add(req.data_len / SECTOR);
                if end.is_none_or(|e| e > info.sectors) {
                    self.bad(
                        w,
                        head,
                        &format!(
                            "sectors {}+{} beyond the end ({} sectors)",
                            req.sector,
                            req.data_len / SECTOR,
                            info.sectors
                        ),
                    );
                    return Err(S_IOERR);
                }
                // SAFETY: the iovecs point into guest memory mapped by
                // `mem`, which the slot keeps alive until the request's
                // completion; the guest does not touch buffers it handed to
                // the device until the used ring says so.
                let iov = unsafe { IoVecs::new(iov) };
                Ok(Some(if req.rtype == RequestType::In {
                    Op::Read {
                        sector: req.sector,
                        iov,
                    }
                } else {
                    Op::Write {
                        sector: req.sector,
                        iov,
                    }
                }))
            }
            RequestType::Flush => Ok(Some(Op::Flush)),
            RequestType::GetId => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(id.len());
                if let (Some(d), Some(src)) = (id.get_mut(..n), s.get(..n)) {
                    d.copy_from_slice(src);
                }
                let mut off = 0usize;
                for seg in &req.data {
                    let want = (seg.len as usize).min(id.len().saturating_sub(off));
                    if want == 0 {
                        break;
                    }
                    let src = id.get(off..off + want).unwrap_or_default();
                    if mem.write_slice(src, seg.addr).is_err() {
                        self.bad(w, head, "GET_ID buffer outside guest memory");
                        return Err(S_IOERR);
                    }
                    off += want;
                }
                Ok(None)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if info.readonly {
                    self.bad(w, head, "discard/write-zeroes on a read-only disk");
                    return Err(S_IOERR);
                }
                let [r] = req.ranges.as_slice() else {
                    self.bad(w, head, "more than one discard/write-zeroes range");
                    return Err(S_UNSUPP);
                };
                let nsect = u64::from(r.num_sectors);
                let end = r.sector.checked_add(nsect);
                if end.is_none_or(|e| e > info.sectors) || nsect > u64::from(MAX_DISCARD_SECTORS) {
                    self.bad(w, head, "discard/write-zeroes range beyond the end");
                    return Err(S_IOERR);
                }
                if req.rtype == RequestType::Discard {
                    if r.flags != 0 {
                        self.bad(w, head, "discard with flags");
                        return Err(S_UNSUPP);
                    }
                    let align = u64::from(DISCARD_ALIGN);
                    let tail_ok = end == Some(info.sectors);
                    if r.sector % align != 0 || (nsect % align != 0 && !tail_ok) {
                        self.bad(w, head, "discard not aligned to 4 KiB");
                        return Err(S_IOERR);
                    }
                    Ok(Some(Op::Discard {
                        sector: r.sector,
                        nsect,
                    }))
                } else {
                    if r.flags & !WZ_UNMAP != 0 {
                        self.bad(w, head, "write-zeroes with unknown flags");
                        return Err(S_UNSUPP);
                    }
                    Ok(Some(Op::WriteZeroes {
                        sector: r.sector,
                        nsect,
                        unmap: r.flags & WZ_UNMAP != 0,
                    }))
                }
            }
            RequestType::Unsupported(t) => {
                self.bad(w, head, &format!("unsupported request type {t}"));
                Err(S_UNSUPP)
            }
        }
    }

    /// Collects disk completions, retries parked reads, completes in order.
    fn reap(&self, w: &mut Worker, vring: &Vring) {
        loop {
            let mut done = std::mem::take(&mut w.done);
            // `poll` reports a bitmap-write wake-up only once: it must be
            // acted on here, even when it arrives while the retried reads
            // are being resubmitted (else they wait for a wake-up that
            // already happened, forever).
            let retry = w.queue.poll(&mut done);
            for c in done.drain(..) {
                self.record(w, &c);
            }
            w.done = done;
            if !retry || w.parked.is_empty() {
                break;
            }
            let parked = std::mem::take(&mut w.parked);
            for r in parked {
                if let Submitted::Again(r) = w.queue.submit(r) {
                    w.parked.push_back(r);
                }
            }
            if let Err(e) = w.queue.commit() {
                log::error!("{}: io_uring submit: {e}", self.disk.info().path.display());
            }
        }
        self.complete_in_order(w, vring);
    }

    /// Stores a disk completion's status in its slot.
    fn record(&self, w: &mut Worker, c: &Completion) {
        let status = match c.result {
            Ok(()) => S_OK,
            Err(e) if e == libc::EOPNOTSUPP => S_UNSUPP,
            Err(e) => {
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                if w.limit.allow() {
                    log::warn!(
                        "{}: request failed: {}",
                        self.disk.info().path.display(),
                        io::Error::from_raw_os_error(e)
                    );
                }
                S_IOERR
            }
        };
        if let Some(s) = w.slot_mut(c.tag) {
            s.status = Some(status);
            if status != S_OK {
                s.data_in = 0;
            }
        }
    }

    fn complete_in_order(&self, w: &mut Worker, vring: &Vring) {
        let mut any = false;
        while w.slots.front().is_some_and(|s| s.status.is_some()) {
            let Some(s) = w.slots.pop_front() else {
                break;
            };
            w.base_seq += 1;
            let used_len = match (s.status_addr, s.status) {
                (Some(addr), Some(st)) => {
                    if s.mem.write_obj(st, addr).is_err() {
                        log::warn!("status byte outside guest memory");
                    }
                    s.data_in.saturating_add(1)
                }
                _ => 0,
            };
            if let Err(e) = vring.add_used(s.head, used_len) {
                log::error!("cannot add descriptor {} to the used ring: {e}", s.head);
            }
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            any = true;
        }
        if any {
            let notify = if self.event_idx.load(Ordering::Acquire) {
                vring.needs_notification().unwrap_or(true)
            } else {
                true
            };
            if log::log_enabled!(log::Level::Trace) {
                let st = vring.get_ref();
                let q = st.get_queue();
                let addr = GuestAddress(q.avail_ring() + 4 + 2 * u64::from(q.size()));
                let ue = self.memory().and_then(|m| m.read_obj::<u16>(addr).ok());
                log::trace!(
                    "seq {}: next_used {} used_event {ue:?}: notify {notify}",
                    w.base_seq,
                    q.next_used()
                );
            }
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    log::debug!("signal_used_queue: {e}");
                }
            }
        }
    }
}

/// A region mapped past the end of its file would kill the daemon with
/// SIGBUS at the first access there (vm-memory does not check): refuse the
/// table. A file that shrinks later is not caught here; regions of sealed
/// memfds (F_SEAL_SHRINK, QEMU's default `seal=on`) cannot shrink.
fn check_regions(mem: &Mem) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use vm_memory::GuestMemoryRegion;
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let file_len = fo.file().metadata()?.len();
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|e| e > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "region at guest address {:#x} maps {} bytes from offset {} of a file of {} \
                     bytes: touching its end would be SIGBUS",
                    r.start_addr().0,
                    r.len(),
                    fo.start(),
                    file_len
                ),
            ));
        }
        // SAFETY: F_GET_SEALS reads no memory of ours; the fd is valid.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals >= 0 && seals & libc::F_SEAL_SHRINK == 0 {
            log::debug!(
                "region at guest address {:#x}: its file is not sealed against shrinking",
                r.start_addr().0
            );
        }
    }
    Ok(())
}

/// Offset into the device config. cloud-hypervisor addresses the config
/// space as in virtio-pci, starting at `VHOST_USER_CONFIG_OFFSET` (0x100);
/// QEMU and libblkio start at 0.
fn config_offset(offset: u32) -> u32 {
    const VHOST_USER_CONFIG_OFFSET: u32 = 0x100;
    if offset >= VHOST_USER_CONFIG_OFFSET {
        offset - VHOST_USER_CONFIG_OFFSET
    } else {
        offset
    }
}

/// Why a ring from which nothing could be popped is broken, if it is: its
/// available index is unreadable, or ahead of the next index to pop (an
/// empty ring has them equal; more than the queue size ahead, or behind, is
/// impossible for a correct driver).
fn broken_ring(q: &virtio_queue::Queue, mem: &Mem) -> Option<String> {
    match q.avail_idx(mem, Ordering::Acquire) {
        Err(e) => Some(format!("its available index cannot be read ({e})")),
        Ok(avail) => {
            let ahead = avail.0.wrapping_sub(q.next_avail());
            (ahead != 0).then(|| {
                format!(
                    "its available index {} is {ahead} entries ahead of the next one to pop ({}) \
                     in a queue of {} (or behind it), and no request could be taken",
                    avail.0,
                    q.next_avail(),
                    q.size()
                )
            })
        }
    }
}

/// Iovecs for guest buffers (split at memory region boundaries).
fn iovecs(mem: &Mem, segs: &[Seg]) -> Option<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.ok()?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(out)
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.cfg.queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if !self.cfg.writethrough {
            f |= 1 << VIRTIO_BLK_F_CONFIG_WCE;
        }
        if self.cfg.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn acked_features(&self, features: u64) {
        let before = self.acked.swap(features, Ordering::AcqRel);
        self.negotiated.store(true, Ordering::Release);
        let wb = self.writeback_for(features);
        self.disk.set_writeback(wb);
        if before == features {
            return;
        }
        log::info!(
            "features negotiated: {features:#x} ({} cache)",
            if wb { "writeback" } else { "writethrough" }
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        log::info!("device reset by the frontend");
        for w in &self.workers {
            lock(w).discard_all();
        }
        self.acked.store(0, Ordering::Release);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let offset = config_offset(offset);
        let c = self.config_bytes();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < c.len() {
            let n = (c.len() - start).min(out.len());
            if let (Some(d), Some(s)) = (out.get_mut(..n), c.get(start..start + n)) {
                d.copy_from_slice(s);
            }
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let offset = config_offset(offset);
        if offset == CONFIG_WCE_OFFSET && buf.len() == 1 {
            let acked = self.acked.load(Ordering::Acquire);
            if acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) == 0 || self.cfg.writethrough {
                log::warn!("frontend wrote the cache mode without CONFIG_WCE; ignored");
                return Ok(());
            }
            let on = buf.first().is_some_and(|&b| b != 0);
            self.wce.store(on, Ordering::Release);
            let wb = self.writeback_for(acked);
            self.disk.set_writeback(wb);
            log::info!(
                "guest switched the cache to {}",
                if wb { "writeback" } else { "writethrough" }
            );
        } else {
            log::warn!(
                "frontend wrote {} config bytes at {offset}; ignored",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: Gm) -> io::Result<()> {
        let checked = check_regions(&mem.memory());
        let mut m = self
            .mem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match checked {
            Ok(()) => {
                *m = Some(mem);
                Ok(())
            }
            Err(e) => {
                // Serve nothing from this table (nor the previous one).
                *m = None;
                log::error!("memory table refused: {e}");
                Err(e)
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.threads())
            .map(|t| self.thread_queues(t).fold(0u64, |m, q| m | (1u64 << q)))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("cannot create an exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        // GET_VRING_BASE: answer only once nothing popped is outstanding,
        // so the base the frontend gets skips no request.
        let Some(w) = self.workers.get(index as usize) else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !idle(w) {
            if Instant::now() > deadline {
                log::error!("queue {index}: requests still in flight at GET_VRING_BASE after 30 s");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The frontend stops the ring; it sets it up again before the next
        // kick, so a broken one gets a new chance.
        lock(w).broken = false;
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let disk_base = usize::from(disk_event_id(self.cfg.queues, 0));
        let (local, disk) = match usize::from(device_event) {
            k if k < vrings.len() => (k, false),
            k if k >= disk_base => (k - disk_base, true),
            _ => return Ok(()),
        };
        let Some(queue) = self.thread_queues(thread_id).nth(local) else {
            return Ok(());
        };
        let (Some(vring), Some(worker)) = (vrings.get(local), self.workers.get(queue)) else {
            return Ok(());
        };
        if evset != EventSet::IN {
            log::debug!("queue {queue}: event {evset:?}");
        }
        let mut w = lock(worker);
        if disk {
            self.reap(&mut w, vring);
        } else {
            self.process_queue(&mut w, vring);
        }
        Ok(())
    }
}
