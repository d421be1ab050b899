// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of `worker`.

use std::{os::unix::fs::FileExt, sync::Arc, time::Instant};

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::{
    desc::{split::Descriptor as SplitDescriptor, RawDescriptor},
    mock::MockSplitQueue,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::super::{lock, BlkBackend, BlkConfig};
use crate::blk::{S_IOERR, S_OK, S_UNSUPP};

const QSIZE: u16 = 32;
const DISK: u64 = 1 << 20;
/// Guest buffers start here (the mock queue's rings sit below).
const BUF: u64 = 0x10_0000;

struct Rig {
    mem: GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>,
    backend: BlkBackend,
    vring: VringRwLock<
        GuestMemoryAtomic<GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>>,
    >,
    avail: GuestAddress,
    used: GuestAddress,
    _dir: tempfile::TempDir,
    disk_path: std::path::PathBuf,
    next_desc: u16,
    next_buf: u64,
}

fn disk_byte(pos: u64) -> u8 {
    (pos / 512) as u8 ^ (pos % 251) as u8
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk_path = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..DISK).map(disk_byte).collect();
        std::fs::write(&disk_path, data).unwrap();
        let disk = crate::disk::open_raw(&disk_path, &crate::disk::DiskOptions::default()).unwrap();
        let mem: GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (desc, avail, used) = {
            let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
            (q.desc_table_addr(), q.avail_addr(), q.used_addr())
        };
        let backend = BlkBackend::new(
            disk,
            BlkConfig {
                queues: 1,
                queue_size: QSIZE,
                readonly: false,
                serial: "unit-serial".into(),
                writethrough: false,
                threads: 1,
                inflight: false,
                out_of_order: false,
            },
        )
        .unwrap();
        backend
            .update_memory(GuestMemoryAtomic::new(mem.clone()))
            .unwrap();
        let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(desc.0, avail.0, used.0).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Self {
            mem,
            backend,
            vring,
            avail,
            used,
            _dir: dir,
            disk_path,
            next_desc: 0,
            next_buf: BUF,
        }
    }

    fn buf(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(512);
        a
    }

    /// Publishes a chain; returns its head.
    fn add(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let n = descs.len() as u16;
        let table = GuestAddress(0);
        for (k, &(addr, len, write)) in descs.iter().enumerate() {
            let k = k as u16;
            let i = head + k;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if k + 1 < n {
                flags |= 1; // NEXT
            }
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1));
            self.mem
                .write_obj(d, table.unchecked_add(16 * u64::from(i)))
                .unwrap();
        }
        self.next_desc += n;
        let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(
                head,
                self.avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)),
            )
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
        head
    }

    fn header(&mut self, rtype: u32, sector: u64) -> u64 {
        let a = self.buf(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(a)).unwrap();
        a
    }

    fn status(&mut self) -> u64 {
        let a = self.buf(1);
        self.mem.write_obj(0xffu8, GuestAddress(a)).unwrap();
        a
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    fn used(&self, i: u16) -> (u32, u32) {
        let a = self.used.unchecked_add(4 + 8 * u64::from(i));
        (
            self.mem.read_obj(a).unwrap(),
            self.mem.read_obj(a.unchecked_add(4)).unwrap(),
        )
    }

    /// Kicks, then drives the worker until `n` requests are used.
    fn run(&mut self, n: u16) -> Vec<(u32, u32)> {
        let w = &self.backend.workers[0];
        self.backend.process_queue(&mut lock(w), &self.vring);
        let end = Instant::now() + std::time::Duration::from_secs(10);
        while self.used_idx() < n {
            assert!(Instant::now() < end, "used {} of {n}", self.used_idx());
            let mut g = lock(w);
            g.queue.wait(Some(std::time::Duration::from_millis(10)));
            self.backend.reap(&mut g, &self.vring);
        }
        (0..n).map(|i| self.used(i)).collect()
    }

    fn byte(&self, a: u64) -> u8 {
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
}

#[test]
fn requests_complete_in_pop_order_with_their_data() {
    let mut r = Rig::new();
    let mut heads = Vec::new();
    let mut statuses = Vec::new();
    // write 4 KiB at sector 8, read it back, read the base at 100, flush, GET_ID
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8 | 1).collect();
    let wbuf = r.buf(4096);
    r.mem.write_slice(&data, GuestAddress(wbuf)).unwrap();
    let (h, s) = (r.header(VIRTIO_BLK_T_OUT, 8), r.status());
    heads.push(r.add(&[(h, 16, false), (wbuf, 4096, false), (s, 1, true)]));
    statuses.push(s);
    // Requests in flight together have no order between them (a driver
    // waits for a write before it reads it back): the write goes first.
    assert_eq!(r.run(1).len(), 1);
    let (h, s, rb) = (r.header(VIRTIO_BLK_T_IN, 8), r.status(), r.buf(4096));
    heads.push(r.add(&[(h, 16, false), (rb, 4096, true), (s, 1, true)]));
    statuses.push(s);
    let (h, s, rb2) = (r.header(VIRTIO_BLK_T_IN, 100), r.status(), r.buf(1024));
    heads.push(r.add(&[(h, 16, false), (rb2, 1024, true), (s, 1, true)]));
    statuses.push(s);
    let (h, s) = (r.header(VIRTIO_BLK_T_FLUSH, 0), r.status());
    heads.push(r.add(&[(h, 16, false), (s, 1, true)]));
    statuses.push(s);
    let (h, s, idb) = (r.header(VIRTIO_BLK_T_GET_ID, 0), r.status(), r.buf(20));
    heads.push(r.add(&[(h, 16, false), (idb, 20, true), (s, 1, true)]));
    statuses.push(s);
    let used = r.run(5);
    let ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    assert_eq!(ids, heads.iter().map(|&h| u32::from(h)).collect::<Vec<_>>());
    // used lengths: data written into the guest + the status byte
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![1, 4097, 1025, 1, 21]
    );
    for s in &statuses {
        assert_eq!(r.byte(*s), S_OK);
    }
    let mut got = vec![0u8; 4096];
    r.mem.read_slice(&mut got, GuestAddress(rb)).unwrap();
    assert!(got == data, "read after write");
    let mut base = vec![0u8; 1024];
    r.mem.read_slice(&mut base, GuestAddress(rb2)).unwrap();
    let want: Vec<u8> = (100 * 512..100 * 512 + 1024).map(disk_byte).collect();
    assert!(base == want, "base data");
    let mut id = vec![0u8; 11];
    r.mem.read_slice(&mut id, GuestAddress(idb)).unwrap();
    assert_eq!(&id, b"unit-serial");
    let f = std::fs::File::open(&r.disk_path).unwrap();
    let mut on_disk = vec![0u8; 4096];
    f.read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert!(on_disk == data, "the write reached the file");
}

#[test]
fn bad_chains_are_answered_and_the_next_request_is_served() {
    let mut r = Rig::new();
    // unknown type -> UNSUPP
    let (h, s1) = (r.header(0x4242, 0), r.status());
    r.add(&[(h, 16, false), (s1, 1, true)]);
    // beyond the end of the disk -> IOERR
    let (h, s2, b) = (
        r.header(VIRTIO_BLK_T_IN, DISK / 512),
        r.status(),
        r.buf(512),
    );
    r.add(&[(h, 16, false), (b, 512, true), (s2, 1, true)]);
    // read-only data buffer for a read -> IOERR
    let (h, s3, b3) = (r.header(VIRTIO_BLK_T_IN, 0), r.status(), r.buf(512));
    r.add(&[(h, 16, false), (b3, 512, false), (s3, 1, true)]);
    // no status byte at all: completed with used length 0
    let h = r.header(VIRTIO_BLK_T_IN, 0);
    r.add(&[(h, 16, false)]);
    // a good read after them
    let (h, s5, b5) = (r.header(VIRTIO_BLK_T_IN, 2), r.status(), r.buf(512));
    r.add(&[(h, 16, false), (b5, 512, true), (s5, 1, true)]);
    let used = r.run(5);
    assert_eq!(r.byte(s1), S_UNSUPP);
    assert_eq!(r.byte(s2), S_IOERR);
    assert_eq!(r.byte(s3), S_IOERR);
    assert_eq!(used[3].1, 0, "no status byte: used length 0");
    assert_eq!(r.byte(s5), S_OK);
    let mut got = vec![0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(b5)).unwrap();
    let want: Vec<u8> = (1024..1536).map(disk_byte).collect();
    assert!(got == want, "the good read after the bad ones");
    assert_eq!(
        r.backend
            .stats
            .bad_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[test]
fn an_empty_pop_tells_an_empty_ring_a_race_and_a_broken_ring_apart() {
    let mem: GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let q: virtio_queue::Queue = mq.create_queue().unwrap();
    let set = |idx: u16| {
        mem.write_obj(idx, mq.avail_addr().unchecked_add(2))
            .unwrap();
    };
    set(0);
    assert!(matches!(
        super::ring_after_empty_pop(&q, &mem),
        super::Ring::Empty
    ));
    // Published right after the pop: a race, taken by the next pop.
    set(1);
    assert!(matches!(
        super::ring_after_empty_pop(&q, &mem),
        super::Ring::Raced
    ));
    set(QSIZE);
    assert!(matches!(
        super::ring_after_empty_pop(&q, &mem),
        super::Ring::Raced
    ));
    // More than a queue's worth ahead, or behind: broken.
    for bad in [QSIZE + 1, QSIZE + 5, u16::MAX] {
        set(bad);
        assert!(
            matches!(
                super::ring_after_empty_pop(&q, &mem),
                super::Ring::Broken(_)
            ),
            "avail idx {bad}"
        );
    }
}

#[test]
fn a_drained_queue_takes_nothing_new() {
    let mut r = Rig::new();
    let (h, s, b) = (r.header(VIRTIO_BLK_T_IN, 0), r.status(), r.buf(512));
    r.add(&[(h, 16, false), (b, 512, true), (s, 1, true)]);
    assert_eq!(r.run(1).len(), 1);
    assert!(r.backend.drain(std::time::Duration::from_secs(5)));
    let (h, s2, b2) = (r.header(VIRTIO_BLK_T_IN, 0), r.status(), r.buf(512));
    r.add(&[(h, 16, false), (b2, 512, true), (s2, 1, true)]);
    let w = &r.backend.workers[0];
    r.backend.process_queue(&mut lock(w), &r.vring);
    std::thread::sleep(std::time::Duration::from_millis(50));
    r.backend.reap(&mut lock(w), &r.vring);
    assert_eq!(r.used_idx(), 1, "a request was taken after the drain");
    assert_eq!(r.byte(s2), 0xff);
    let _ = Arc::clone(r.backend.disk());
}
