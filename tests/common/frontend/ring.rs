// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! memfd-backed guest memory and a hand-built split virtqueue in it, as
//! the driver side would lay it out (virtio 1.x section 2.7).

use std::{
    fs::File,
    os::fd::FromRawFd,
    sync::atomic::{fence, Ordering},
    thread,
    time::{Duration, Instant},
};

use vhost::{
    vhost_user::{Frontend, VhostUserFrontend},
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{MemPath, TIMEOUT};

/// A fresh memfd of `size` bytes.
fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated static name; it returns a
    // new descriptor or -1 and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"ubd-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).expect("memfd set_len");
    f
}

/// "Guest RAM": one memfd per region, mapped shared in this process.
#[derive(Debug)]
pub struct GuestMem {
    /// The mapping.
    pub mem: GuestMemoryMmap<()>,
}

impl GuestMem {
    /// Regions `(gpa, size)`, each backed by its own memfd.
    pub fn new(ranges: &[(u64, usize)]) -> Self {
        let v: Vec<(GuestAddress, usize, Option<FileOffset>)> = ranges
            .iter()
            .map(|&(gpa, size)| {
                (
                    GuestAddress(gpa),
                    size,
                    Some(FileOffset::new(memfd(size), 0)),
                )
            })
            .collect();
        Self {
            mem: GuestMemoryMmap::from_ranges_with_files(&v).expect("guest memory"),
        }
    }

    /// The regions as vhost-user sees them (GPA, size, our VA, fd).
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info"))
            .collect()
    }

    /// Sends the memory table (SET_MEM_TABLE or one ADD_MEM_REG per region).
    pub fn hand_over(&self, fe: &mut Frontend, path: MemPath) {
        let regions = self.regions();
        match path {
            MemPath::SetMemTable => {
                fe.set_mem_table(&regions).expect("SET_MEM_TABLE");
            }
            MemPath::AddMemReg => {
                for r in &regions {
                    fe.add_mem_region(r).expect("ADD_MEM_REG");
                }
            }
        }
    }

    /// Truncates region `i`'s memfd to `len` bytes after it was mapped, as a
    /// hostile frontend could (our own mapping past `len` must then not be
    /// touched).
    pub fn shrink_file(&self, i: usize, len: u64) {
        use vm_memory::GuestMemoryRegion;
        let r = self.mem.iter().nth(i).expect("region");
        r.file_offset()
            .expect("file-backed region")
            .file()
            .set_len(len)
            .expect("shrink memfd");
    }

    /// Our virtual address of `gpa` (vring addresses are frontend VAs).
    pub fn va(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("gpa in guest memory") as u64
    }

    /// Writes bytes.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("guest write");
    }

    /// Reads bytes.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("guest read");
        v
    }

    fn w16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn r16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn r32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Desc {
    /// Device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// Device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index.
    pub id: u32,
    /// Bytes written by the device.
    pub len: u32,
}

/// A split virtqueue laid out at a guest address, driven from this side.
#[derive(Debug)]
pub struct Ring {
    /// Queue index.
    pub index: usize,
    /// Queue size.
    pub size: u16,
    /// Descriptor table GPA.
    pub desc: u64,
    /// Available ring GPA.
    pub avail: u64,
    /// Used ring GPA.
    pub used: u64,
    next_desc: u16,
    /// Next available index to publish.
    pub avail_idx: u16,
    /// Used entries consumed so far.
    pub used_idx: u16,
    /// Kick eventfd (driver to device).
    pub kick: EventFd,
    /// Call eventfd (device to driver).
    pub call: EventFd,
}

impl Ring {
    /// Layout at `base`: descriptors, then the available ring, then the
    /// used ring at the next 4 KiB boundary.
    pub fn new(index: usize, size: u16, base: u64) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(0x1000);
        Self {
            index,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_idx: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Zeroes the ring memory and the driver-side indices (a new driver).
    pub fn clear(&mut self, gm: &GuestMem) {
        let n = usize::from(self.size);
        gm.write(self.desc, &vec![0u8; 16 * n]);
        gm.write(self.avail, &vec![0u8; 6 + 2 * n]);
        gm.write(self.used, &vec![0u8; 6 + 8 * n]);
        self.next_desc = 0;
        self.avail_idx = 0;
        self.used_idx = 0;
        while self.call.read().is_ok() {}
    }

    /// SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL, then SET_VRING_ENABLE
    /// (QEMU's order).
    pub fn start(&mut self, fe: &mut Frontend, gm: &GuestMem, base: u16) {
        let i = self.index;
        fe.set_vring_num(i, self.size).expect("SET_VRING_NUM");
        fe.set_vring_base(i, base).expect("SET_VRING_BASE");
        let cfg = VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: gm.va(self.desc),
            used_ring_addr: gm.va(self.used),
            avail_ring_addr: gm.va(self.avail),
            log_addr: None,
        };
        fe.set_vring_addr(i, &cfg).expect("SET_VRING_ADDR");
        fe.set_vring_kick(i, &self.kick).expect("SET_VRING_KICK");
        fe.set_vring_call(i, &self.call).expect("SET_VRING_CALL");
        fe.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
    }

    fn write_desc(&self, gm: &GuestMem, table: u64, i: u16, d: &Desc, flags: u32, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        let f = u16::try_from(flags).expect("flags");
        b[12..14].copy_from_slice(&f.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        gm.write(table + 16 * u64::from(i), &b);
    }

    fn publish(&mut self, gm: &GuestMem, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        gm.w16(self.avail + 4 + 2 * slot, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        gm.w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Writes a chain into the descriptor table and publishes its head in
    /// the available ring (no kick).
    pub fn add_chain(&mut self, gm: &GuestMem, descs: &[Desc]) -> u16 {
        let n = u16::try_from(descs.len()).expect("chain length");
        assert!(n >= 1 && n <= self.size, "chain length {n}");
        let head = self.next_desc;
        for (k, d) in descs.iter().enumerate() {
            let k = u16::try_from(k).expect("index");
            let i = (head + k) % self.size;
            let next = (i + 1) % self.size;
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if k + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(gm, self.desc, i, d, flags, if k + 1 < n { next } else { 0 });
        }
        self.next_desc = (head + n) % self.size;
        self.publish(gm, head);
        head
    }

    /// Writes `descs` as an indirect table at `table` and publishes one
    /// ring descriptor pointing to it.
    pub fn add_indirect(&mut self, gm: &GuestMem, table: u64, descs: &[Desc]) -> u16 {
        let n = u16::try_from(descs.len()).expect("chain length");
        for (k, d) in descs.iter().enumerate() {
            let k = u16::try_from(k).expect("index");
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if k + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(gm, table, k, d, flags, if k + 1 < n { k + 1 } else { 0 });
        }
        let head = self.next_desc;
        let ring_desc = Desc::r(table, 16 * u32::from(n));
        self.write_desc(gm, self.desc, head, &ring_desc, VRING_DESC_F_INDIRECT, 0);
        self.next_desc = (head + 1) % self.size;
        self.publish(gm, head);
        head
    }

    /// Asks for a call once the device goes past what we consumed
    /// (`used_event`, EVENT_IDX), then kicks.
    pub fn kick(&self, gm: &GuestMem) {
        gm.w16(self.avail + 4 + 2 * u64::from(self.size), self.used_idx);
        fence(Ordering::SeqCst);
        self.kick.write(1).expect("kick");
    }

    /// The device's used index, as in guest memory now.
    pub fn device_used_idx(&self, gm: &GuestMem) -> u16 {
        let v = gm.r16(self.used + 2);
        fence(Ordering::Acquire);
        v
    }

    /// `avail_event` (EVENT_IDX): the device's next available index as of
    /// its last re-enabling of notifications, i.e. how far it has popped.
    pub fn device_avail_event(&self, gm: &GuestMem) -> u16 {
        let v = gm.r16(self.used + 4 + 8 * u64::from(self.size));
        fence(Ordering::Acquire);
        v
    }

    fn elem(&self, gm: &GuestMem, i: u16) -> Used {
        let a = self.used + 4 + 8 * u64::from(i % self.size);
        Used {
            id: gm.r32(a),
            len: gm.r32(a + 4),
        }
    }

    /// Consumes used entries up to `upto` without waiting; they must be
    /// there already.
    pub fn take_used(&mut self, gm: &GuestMem, upto: u16) -> Vec<Used> {
        assert_eq!(self.device_used_idx(gm), upto, "device used index");
        let mut v = Vec::new();
        while self.used_idx != upto {
            v.push(self.elem(gm, self.used_idx));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        // As a driver re-enabling callbacks does (virtqueue_enable_cb):
        // ask for a call once the device goes past what was consumed.
        gm.w16(self.avail + 4 + 2 * u64::from(self.size), self.used_idx);
        fence(Ordering::SeqCst);
        while self.call.read().is_ok() {}
        v
    }

    /// Waits until `count` more used entries appeared and a call came;
    /// returns them.
    pub fn wait_used(&mut self, gm: &GuestMem, count: u16) -> Vec<Used> {
        let target = self.used_idx.wrapping_add(count);
        let deadline = Instant::now() + TIMEOUT;
        let mut called = false;
        loop {
            if self.call.read().is_ok() {
                called = true;
            }
            let idx = self.device_used_idx(gm);
            let got = idx.wrapping_sub(self.used_idx);
            assert!(
                got <= count,
                "queue {}: {got} used entries, only {count} expected",
                self.index
            );
            if got == count && called {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queue {}: used index {idx}, waiting for {target} (call seen: {called})",
                self.index
            );
            thread::sleep(Duration::from_micros(300));
        }
        let mut v = Vec::new();
        while self.used_idx != target {
            v.push(self.elem(gm, self.used_idx));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        gm.w16(self.avail + 4 + 2 * u64::from(self.size), self.used_idx);
        fence(Ordering::SeqCst);
        v
    }
}
