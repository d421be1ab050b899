// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, the
//! vhost-user spec's "Inflight I/O tracking"): exactly-once completion
//! across a daemon crash, whatever order requests complete in.
//!
//! The frontend keeps a shared buffer across back-end restarts
//! (`GET_INFLIGHT_FD` once, `SET_INFLIGHT_FD` at every start). It holds one
//! region per queue, laid out as QEMU's libvhost-user lays it out, so that
//! either back end can pick up after the other:
//!
//! ```text
//! region (stride = align_up(16 * queue_size + 2, 64)):
//!   u64 features; u16 version (1; 0 = fresh); u16 desc_num;
//!   u16 last_batch_head; u16 used_idx;
//!   desc[desc_num] of 16 bytes: u8 inflight; u8 pad[5]; u16 next; u64 counter
//! ```
//!
//! A head is marked in flight (with the next counter) right after it is
//! popped, before anything else happens to it; at completion
//! `last_batch_head = head`, then the used element is published, then
//! `inflight = 0` and `used_idx = used->idx`. A new back end, at ring
//! start, clears the last batch if the crash came between publishing and
//! `used_idx`, and resubmits every head still in flight, oldest counter
//! first; the ring restarts at `used->idx + in flight`, whatever
//! `SET_VRING_BASE` said (QEMU sends the used index, cloud-hypervisor the
//! available one). The region is never trusted: a version, size or head out
//! of range resets it.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd},
    sync::{
        atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
};

use crate::engine::shm::SharedMap;

const ALIGN: usize = 64;
const DESC: usize = 16;
const HEADER: usize = 16;
const VERSION: u16 = 1;

/// Bytes of one queue's region (libvhost-user's `vu_inflight_queue_size`).
pub fn queue_stride(queue_size: u16) -> usize {
    (DESC * usize::from(queue_size) + 2).div_ceil(ALIGN) * ALIGN
}

/// The shared buffer, mapped.
#[derive(Debug)]
pub struct InflightRegion {
    map: SharedMap,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A fresh, zeroed buffer for `queues` queues of `queue_size`
    /// (`GET_INFLIGHT_FD`): a sealed memfd, as libvhost-user makes it.
    pub fn create(queues: u16, queue_size: u16) -> io::Result<File> {
        let len = queue_stride(queue_size)
            .checked_mul(usize::from(queues))
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated name; memfd_create takes no other memory.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us, owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(u64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?)?;
        // SAFETY: fcntl on our own descriptor; no memory is passed.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// Maps the buffer the frontend hands over (`SET_INFLIGHT_FD`),
    /// refusing one too small for `queues` x `queue_size` or reaching past
    /// the end of its file.
    pub fn map(
        file: &File,
        size: u64,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_owned());
        let need = queue_stride(queue_size)
            .checked_mul(usize::from(queues))
            .filter(|&l| l > 0)
            .ok_or_else(|| bad("no queues"))?;
        let len = usize::try_from(size).map_err(|_| bad("size"))?;
        if len < need {
            return Err(bad("smaller than its queues need"));
        }
        Ok(Self {
            map: SharedMap::map(file, offset, len)?,
            queues,
            queue_size,
        })
    }

    /// Queue `q`'s region.
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<QueueInflight> {
        let q16 = u16::try_from(q).ok().filter(|&q| q < self.queues)?;
        let off = queue_stride(self.queue_size).checked_mul(usize::from(q16))?;
        let qi = QueueInflight {
            region: self.clone(),
            off,
            desc_num: self.queue_size,
        };
        qi.u16_at(10).store(self.queue_size, Ordering::Release);
        Some(qi)
    }
}

/// One queue's region.
#[derive(Debug, Clone)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    /// Offset of the region in the mapping.
    off: usize,
    desc_num: u16,
}

impl QueueInflight {
    fn at(&self, rel: usize) -> *mut u8 {
        // SAFETY (of every caller's dereference): `off + rel` stays inside
        // this queue's stride (`rel < 16 + 16 * desc_num`, checked by the
        // callers' head bounds), which lies inside the mapping (`map`).
        self.region.map.as_ptr().wrapping_add(self.off + rel)
    }

    fn u16_at(&self, rel: usize) -> &AtomicU16 {
        // SAFETY: in bounds (see `at`), 2-aligned (the mapping is
        // page-aligned, strides and fields are multiples of 2), and only
        // ever accessed atomically while mapped (the `Arc` keeps it).
        unsafe { &*self.at(rel).cast::<AtomicU16>() }
    }

    fn desc_inflight(&self, head: u16) -> &AtomicU8 {
        // SAFETY: as `u16_at`; `head < desc_num` (callers).
        unsafe {
            &*self
                .at(HEADER + DESC * usize::from(head))
                .cast::<AtomicU8>()
        }
    }

    fn desc_counter(&self, head: u16) -> &AtomicU64 {
        // SAFETY: as `u16_at`, 8-aligned (offset 16 + 16 * head + 8).
        unsafe {
            &*self
                .at(HEADER + DESC * usize::from(head) + 8)
                .cast::<AtomicU64>()
        }
    }

    /// Marks `head` in flight, popped as the `counter`-th request.
    pub fn begin(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        self.desc_counter(head).store(counter, Ordering::Relaxed);
        self.desc_inflight(head).store(1, Ordering::Release);
    }

    /// Before `head`'s used element is published.
    pub fn pre_put(&self, head: u16) {
        if head < self.desc_num {
            self.u16_at(12).store(head, Ordering::Release);
        }
    }

    /// After it is published and the used index is `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.desc_inflight(head).store(0, Ordering::Release);
        }
        self.u16_at(14).store(used_idx, Ordering::Release);
    }

    fn reset(&self) {
        for h in 0..self.desc_num {
            self.desc_inflight(h).store(0, Ordering::Relaxed);
            self.desc_counter(h).store(0, Ordering::Relaxed);
        }
        self.u16_at(12).store(0, Ordering::Relaxed);
        self.u16_at(10).store(self.desc_num, Ordering::Relaxed);
        self.u16_at(8).store(VERSION, Ordering::Release);
    }

    /// At ring start: the heads to resubmit, oldest first, and the next
    /// counter. `guest_used` is `used->idx` in guest memory, `queue_size`
    /// the ring's size.
    pub fn recover(&self, guest_used: u16, queue_size: u16) -> (Vec<u16>, u64) {
        match self.u16_at(8).load(Ordering::Acquire) {
            0 => {
                self.reset();
                return (Vec::new(), 1);
            }
            VERSION if self.u16_at(10).load(Ordering::Acquire) == self.desc_num => {}
            v => {
                log::warn!("inflight region: version {v} or size unknown; reset");
                self.reset();
                return (Vec::new(), 1);
            }
        }
        if self.u16_at(14).load(Ordering::Acquire) != guest_used {
            // The crash came between publishing a used element and
            // recording it: that head is complete.
            let last = self.u16_at(12).load(Ordering::Acquire);
            if last < self.desc_num {
                self.desc_inflight(last).store(0, Ordering::Release);
            }
            self.u16_at(14).store(guest_used, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num.min(queue_size))
            .filter(|&h| self.desc_inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.desc_counter(h).load(Ordering::Acquire), h))
            .collect();
        if heads.len() > usize::from(queue_size) {
            log::warn!("inflight region: more heads in flight than the ring holds; reset");
            self.reset();
            return (Vec::new(), 1);
        }
        heads.sort_unstable();
        let next = heads.last().map_or(1, |&(c, _)| c.saturating_add(1));
        (heads.into_iter().map(|(_, h)| h).collect(), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (Arc<InflightRegion>, File) {
        let f = InflightRegion::create(queues, size).unwrap();
        let len = f.metadata().unwrap().len();
        (
            Arc::new(InflightRegion::map(&f, len, 0, queues, size).unwrap()),
            f,
        )
    }

    #[test]
    fn the_layout_is_libvhost_users() {
        assert_eq!(queue_stride(128), 2112);
        assert_eq!(queue_stride(256), 4160);
        let f = InflightRegion::create(2, 128).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 2 * 2112);
    }

    #[test]
    fn a_fresh_region_has_nothing_to_resubmit() {
        let (r, _f) = region(1, 8);
        let q = r.queue(0).unwrap();
        assert_eq!(q.recover(0, 8), (vec![], 1));
        assert!(r.queue(1).is_none(), "no such queue");
    }

    #[test]
    fn heads_in_flight_come_back_oldest_first() {
        let (r, f) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0, 8);
        for (counter, head) in [(1, 5), (2, 2), (3, 7), (4, 0)] {
            q.begin(head, counter);
        }
        // Head 2 and head 0 complete (out of order).
        for (head, used) in [(2, 1), (0, 2)] {
            q.pre_put(head);
            q.post_put(head, used);
        }
        // A new daemon maps the same memfd.
        let r2 = Arc::new(InflightRegion::map(&f, f.metadata().unwrap().len(), 0, 1, 8).unwrap());
        let q2 = r2.queue(0).unwrap();
        assert_eq!(q2.recover(2, 8), (vec![5, 7], 4));
    }

    #[test]
    fn a_crash_after_publishing_clears_the_last_batch() {
        let (r, _f) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0, 8);
        q.begin(3, 1);
        q.begin(4, 2);
        // Head 4 was published (the guest's used index is 1) but the crash
        // came before inflight = 0 and used_idx.
        q.pre_put(4);
        assert_eq!(q.recover(1, 8), (vec![3], 2));
    }

    #[test]
    fn a_region_that_makes_no_sense_is_reset() {
        let (r, _f) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.begin(1, 9);
        q.u16_at(8).store(7, Ordering::Release); // unknown version
        assert_eq!(q.recover(0, 8), (vec![], 1));
        assert_eq!(q.recover(0, 8), (vec![], 1), "reset to an empty version 1");
        // Heads beyond the ring are ignored, never resubmitted.
        q.begin(6, 3);
        assert_eq!(q.recover(0, 4), (vec![], 1));
    }

    #[test]
    fn a_region_smaller_than_its_queues_or_past_its_file_is_refused() {
        let f = InflightRegion::create(1, 8).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(InflightRegion::map(&f, len, 0, 2, 8).is_err());
        assert!(InflightRegion::map(&f, len, 64, 1, 8).is_err());
        assert!(InflightRegion::map(&f, len, 0, 1, 8).is_ok());
    }
}
