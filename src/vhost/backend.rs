// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `VhostUserBackend` impl: features, protocol features, config
//! space access, memory updates, ring stops and events, each handed to
//! the module that owns it.

use std::{
    fs::File,
    io,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::{
    virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    },
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use super::{
    config_space::{config_offset, CONFIG_WCE_OFFSET},
    disk_event_id, idle,
    inflight::InflightRegion,
    lock,
    memory::check_regions,
    BlkBackend, Gm, Vring,
};

impl VhostUserBackend for BlkBackend {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
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
            // Dirty-page logging (live migration): the pages the daemon
            // writes are marked in the frontend's log while it asks.
            | (1 << super::VHOST_F_LOG_ALL)
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
        let f = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD;
        if self.cfg.inflight {
            f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            f
        }
    }

    fn get_inflight_fd(&self, req: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        if !self.cfg.inflight {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "inflight tracking is off (--inflight off)",
            ));
        }
        self.check_inflight_shape(req)?;
        let file = InflightRegion::create(req.num_queues, req.queue_size)?;
        let size = file.metadata()?.len();
        log::info!(
            "inflight region allocated: {} queues of {} descriptors, {size} bytes",
            req.num_queues,
            req.queue_size
        );
        Ok((
            VhostUserInflight::new(size, 0, req.num_queues, req.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> io::Result<()> {
        if !self.cfg.inflight {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "inflight tracking is off (--inflight off)",
            ));
        }
        self.check_inflight_shape(inflight)?;
        let region = Arc::new(
            InflightRegion::map(
                &file,
                inflight.mmap_size,
                inflight.mmap_offset,
                inflight.num_queues,
                inflight.queue_size,
            )
            .inspect_err(|e| log::error!("inflight region refused: {e}"))?,
        );
        for (q, w) in self.workers.iter().enumerate() {
            let mut w = lock(w);
            w.inflight = region.queue(q);
            w.recover = w.inflight.is_some();
        }
        log::debug!(
            "inflight region set: {} queues of {}",
            inflight.num_queues,
            inflight.queue_size
        );
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        self.set_channel(backend);
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
        self.announce_pending();
        if !disk {
            crate::engine::hooks::forbidden_syscall();
            // A migration destination: the first event of a started ring
            // brings the disk over (the source has stopped its rings);
            // afterwards one atomic load.
            if self.gate.as_ref().is_some_and(|g| !g.pass()) {
                return Ok(());
            }
        }
        let mut w = lock(worker);
        if disk {
            self.reap(&mut w, vring);
            if w.repoll {
                w.repoll = false;
                self.process_queue(&mut w, vring);
            }
        } else {
            self.process_queue(&mut w, vring);
        }
        Ok(())
    }
}
