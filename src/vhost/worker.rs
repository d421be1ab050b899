// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A queue's requests: pop (a ring the guest broke is detected once and
//! stopped), start (parse, translate, submit), park reads the disk hands
//! back (R4), complete in pop order.

use std::{
    collections::VecDeque,
    io,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::{
    blk::{self, Action, BlkRequest, RequestType, S_IOERR, S_OK},
    disk::{Completion, DiskQueue, IoVecs, Op, Request, Submitted},
};

use super::{
    inflight::QueueInflight,
    memory::{chain_at, iovecs},
    BlkBackend, Mem, Vring,
};

/// Rate limiter for guest-triggered log lines.
#[derive(Debug)]
pub(super) struct RateLimit {
    pub(super) window: Instant,
    pub(super) count: u32,
}

impl RateLimit {
    pub(super) fn allow(&mut self) -> bool {
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
pub(super) struct Slot {
    head: u16,
    /// Status byte address; `None` when the chain has none.
    status_addr: Option<GuestAddress>,
    /// Set once the request finished.
    status: Option<u8>,
    /// Bytes written into device-writable buffers before the status.
    data_in: u32,
    /// The guest memory its status byte is written to (the disk operations
    /// own the mapping their iovecs point into themselves).
    mem: Arc<Mem>,
    /// A read's buffers, which the kernel writes: marked in the dirty log
    /// at completion when a migration asks for it.
    written: Vec<crate::blk::Seg>,
    /// Published on the used ring (it leaves `slots` once every earlier
    /// one has too).
    answered: bool,
}

/// Per-queue state, owned by that queue's epoll thread.
pub(super) struct Worker {
    /// The virtqueue's index (for logs).
    pub(super) index: usize,
    /// The guest broke this ring (its available index is impossible): the
    /// queue takes no more requests until the frontend sets it up again.
    pub(super) broken: bool,
    pub(super) queue: Box<dyn DiskQueue>,
    pub(super) slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`; disk tags are sequence numbers.
    pub(super) base_seq: u64,
    pub(super) next_seq: u64,
    /// Reads waiting for a bitmap write (R4).
    pub(super) parked: VecDeque<Request>,
    pub(super) done: Vec<Completion>,
    pub(super) limit: RateLimit,
    /// This queue's inflight region, when the frontend set one up.
    pub(super) inflight: Option<QueueInflight>,
    /// The next inflight counter.
    pub(super) counter: u64,
    /// Resubmit the heads the region says are in flight before popping.
    pub(super) recover: bool,
    /// Pop at the next disk event: the backend resumed after a suspend,
    /// and kicks that came meanwhile were taken without popping.
    pub(super) repoll: bool,
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
    /// Requests popped and not yet on the used ring.
    pub(super) fn pending(&self) -> usize {
        self.slots.iter().filter(|s| !s.answered).count()
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let idx = usize::try_from(seq.checked_sub(self.base_seq)?).ok()?;
        self.slots.get_mut(idx)
    }

    /// Waits for every disk request and forgets every slot (disconnect or
    /// reset: the ring they belong to is gone). The operations own the
    /// guest memory their iovecs point into, so nothing here could free it
    /// early; the wait is for ordering: the next frontend replays requests
    /// that did not complete, and an old write landing after a newer one
    /// would overwrite it. A stuck request is logged (every minute) and
    /// waited for, never abandoned on a timeout.
    pub(super) fn discard_all(&mut self) {
        self.parked.clear();
        let start = Instant::now();
        let every = crate::engine::hooks::drain_report();
        let mut next_report = every;
        while self.queue.in_flight() > 0 {
            let _ = self.queue.commit();
            self.queue.wait(Some(Duration::from_millis(100)));
            self.queue.poll(&mut self.done);
            self.done.clear();
            if self.queue.in_flight() > 0 && start.elapsed() >= next_report {
                log::error!(
                    "queue {}: {} disk requests still in flight after {} ms; waiting for them \
                     before the next frontend is served (they own their guest memory)",
                    self.index,
                    self.queue.in_flight(),
                    start.elapsed().as_millis()
                );
                next_report += every;
            }
        }
        self.slots.clear();
        self.base_seq = self.next_seq;
        self.broken = false;
        // Requests forgotten here stay marked in the inflight region (they
        // never reached the used ring): the next start resubmits them.
        self.inflight = None;
        self.recover = false;
    }
}

impl BlkBackend {
    /// The guest broke `w`'s ring: stop taking requests from it, say so once.
    fn ring_broken(&self, w: &mut Worker, why: &str) {
        w.broken = true;
        log::error!(
            "{}: queue {}: the guest broke its ring: {why}. The queue takes no more requests \
             until the frontend sets it up again (a device reset or a reconnect); the other \
             queues go on",
            self.disk.info().path.display(),
            w.index
        );
    }

    /// At the first kick after a ring (re)start with an inflight region:
    /// resubmits the heads it says are in flight, oldest first, and
    /// restarts the ring after them (`used->idx + in flight`), overriding
    /// SET_VRING_BASE (QEMU sends the used index, cloud-hypervisor the
    /// available one).
    fn recover_inflight(&self, w: &mut Worker, vring: &Vring) {
        if !w.recover {
            return;
        }
        let Some(mem) = self.memory() else {
            return;
        };
        let (ready, size, table, used) = {
            let st = vring.get_ref();
            let q = st.get_queue();
            (
                q.ready(),
                q.size(),
                q.desc_table(),
                q.used_idx(mem.as_ref(), Ordering::Acquire),
            )
        };
        if !ready {
            return;
        }
        w.recover = false;
        let Some(qi) = w.inflight.clone() else {
            return;
        };
        let used = match used {
            Ok(u) => u.0,
            Err(e) => {
                self.ring_broken(w, &format!("its used index cannot be read ({e})"));
                return;
            }
        };
        let (heads, next) = qi.recover(used, size);
        w.counter = next;
        let inuse = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        let base = used.wrapping_add(inuse);
        vring.set_queue_next_used(used);
        vring.set_queue_next_avail(base);
        if heads.is_empty() {
            return;
        }
        log::info!(
            "queue {}: inflight tracking: resubmitting {} requests the previous daemon did not \
             complete (heads {heads:?}); the ring restarts at {base}",
            w.index,
            heads.len()
        );
        for head in heads {
            match chain_at(&mem, GuestAddress(table), size, head) {
                Ok(descs) => self.start(w, head, &descs, &mem),
                Err(why) => {
                    self.bad(w, head, &format!("inflight head {head}: {why}"));
                    self.start(w, head, &[], &mem);
                }
            }
        }
    }

    /// Pops and starts every available request.
    pub(super) fn process_queue(&self, w: &mut Worker, vring: &Vring) {
        self.recover_inflight(w, vring);
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
        // Pops in a row that found entries published but could not take one.
        let mut stuck = 0u32;
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
                    // call): tell them apart, here. The driver may publish
                    // a request right after the pop found none: that is a
                    // race, not a fault, and the next pop takes it.
                    match ring_after_empty_pop(q, mem.as_ref()) {
                        Ring::Empty => {}
                        Ring::Raced if stuck == 0 => {
                            stuck += 1;
                            continue;
                        }
                        Ring::Raced => {
                            self.ring_broken(w, "entries are published but none can be read");
                            break false;
                        }
                        Ring::Broken(why) => {
                            self.ring_broken(w, &why);
                            break false;
                        }
                    }
                } else {
                    stuck = 0;
                }
                chain
            };
            let Some(chain) = chain else {
                break true;
            };
            let head = chain.head_index();
            // Before anything else happens to it (inflight tracking).
            if let Some(qi) = &w.inflight {
                qi.begin(head, w.counter);
                w.counter = w.counter.wrapping_add(1);
            }
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
            written: Vec::new(),
            answered: false,
        });
        let mut req = match blk::parse(descs.iter().copied(), mem.as_ref()) {
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
                        s.written = std::mem::take(&mut req.data);
                    }
                }
                if let Submitted::Again(r) = w.queue.submit(Request { op, tag: seq }) {
                    w.parked.push_back(r);
                }
            }
        }
    }

    /// Turns a parsed request into a disk operation (`None`: answered
    /// here, GET_ID), or an immediate status.
    fn to_disk(
        &self,
        w: &mut Worker,
        head: u16,
        req: &BlkRequest,
        mem: &Arc<Mem>,
    ) -> Result<Option<Op>, u8> {
        let data = || {
            let iov = iovecs(mem, &req.data)?;
            let owner: crate::engine::Owner = mem.clone();
            // SAFETY: the iovecs point into guest memory mapped by `mem`
            // (checked by `iovecs`), which the disk operations own through
            // `owner` until they are reaped, whatever happens to this slot
            // or the connection; the guest does not touch buffers it handed
            // to the device until the used ring says so.
            Some(unsafe { IoVecs::with_owner(iov, Some(owner)) })
        };
        match blk::translate(req, self.disk.info(), &self.cfg.serial, data) {
            Ok(Action::Disk(op)) => Ok(Some(op)),
            Ok(Action::GetId(id)) => {
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
            Err(r) => {
                self.bad(w, head, &r.why);
                Err(r.status)
            }
        }
    }

    /// Collects disk completions, retries parked reads, completes in order.
    pub(super) fn reap(&self, w: &mut Worker, vring: &Vring) {
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
        let status = blk::status_of(c.result);
        if let Err(e) = c.result {
            if status == S_IOERR {
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                if w.limit.allow() {
                    log::warn!(
                        "{}: request failed: {}",
                        self.disk.info().path.display(),
                        io::Error::from_raw_os_error(e)
                    );
                }
            }
        }
        if let Some(s) = w.slot_mut(c.tag) {
            s.status = Some(status);
            if status != S_OK {
                s.data_in = 0;
            }
        }
    }

    /// Publishes finished requests: in pop order, or, with inflight
    /// tracking (a crash cannot lose or repeat one then), each as soon as
    /// it finished.
    fn complete_in_order(&self, w: &mut Worker, vring: &Vring) {
        let mut any = false;
        let out_of_order = w.inflight.is_some() || self.cfg.out_of_order;
        for s in &mut w.slots {
            if s.answered {
                continue;
            }
            if s.status.is_none() {
                if out_of_order {
                    continue;
                }
                break;
            }
            self.put(s, w.inflight.as_ref(), vring);
            any = true;
        }
        while w.slots.front().is_some_and(|s| s.answered) {
            w.slots.pop_front();
            w.base_seq += 1;
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

impl BlkBackend {
    /// Writes a finished request's status and publishes it on the used
    /// ring (between the inflight region's two marks).
    fn put(&self, s: &mut Slot, inflight: Option<&QueueInflight>, vring: &Vring) {
        s.answered = true;
        // Before the used ring says so: the frontend's last log read comes
        // after it has seen the request complete.
        if !s.written.is_empty() && self.logging() {
            super::memory::mark_dirty(&s.mem, &s.written);
        }
        let used_len = match (s.status_addr, s.status) {
            (Some(addr), Some(st)) => {
                if s.mem.write_obj(st, addr).is_err() {
                    log::warn!("status byte outside guest memory");
                }
                s.data_in.saturating_add(1)
            }
            _ => 0,
        };
        if let Some(qi) = inflight {
            qi.pre_put(s.head);
        }
        if let Err(e) = vring.add_used(s.head, used_len) {
            log::error!("cannot add descriptor {} to the used ring: {e}", s.head);
        }
        if let Some(qi) = inflight {
            qi.post_put(s.head, vring.get_ref().get_queue().next_used());
        }
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a ring is when a pop found nothing.
enum Ring {
    /// Nothing published: the available index is the next one to pop.
    Empty,
    /// Published entries (at most a queue's worth) the pop did not see:
    /// published just after it, or unreadable.
    Raced,
    /// Impossible for a correct driver: the available index is unreadable,
    /// more than the queue size ahead of the next one to pop, or behind it.
    Broken(String),
}

fn ring_after_empty_pop(q: &virtio_queue::Queue, mem: &Mem) -> Ring {
    match q.avail_idx(mem, Ordering::Acquire) {
        Err(e) => Ring::Broken(format!("its available index cannot be read ({e})")),
        Ok(avail) => {
            let ahead = avail.0.wrapping_sub(q.next_avail());
            if ahead == 0 {
                Ring::Empty
            } else if ahead <= q.size() {
                Ring::Raced
            } else {
                Ring::Broken(format!(
                    "its available index {} is {ahead} entries ahead of the next one to pop ({}) \
                     in a queue of {} (or behind it)",
                    avail.0,
                    q.next_avail(),
                    q.size()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests;
