// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory: which tables the daemon accepts, iovecs into them.

use std::io;

use vm_memory::GuestMemoryBackend;

use crate::blk::Seg;

use super::Mem;

/// A region mapped past the end of its file would kill the daemon with
/// SIGBUS at the first access there (vm-memory does not check): refuse the
/// table. A file that shrinks later is not caught here; regions of sealed
/// memfds (F_SEAL_SHRINK, QEMU's default `seal=on`) cannot shrink.
pub(super) fn check_regions(mem: &Mem) -> io::Result<()> {
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

/// Iovecs for guest buffers (split at memory region boundaries).
pub(super) fn iovecs(mem: &Mem, segs: &[Seg]) -> Option<Vec<libc::iovec>> {
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

/// Marks guest buffers dirty in the frontend's migration log (a no-op
/// while no log is set): for memory the kernel wrote, which vm-memory did
/// not see.
pub(super) fn mark_dirty(mem: &Mem, segs: &[Seg]) {
    use vm_memory::bitmap::Bitmap;
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// The buffers of the descriptor chain at `head` of the split ring whose
/// descriptor table is at `table` (for heads resubmitted from the inflight
/// region, which virtio-queue cannot turn into a chain): `(addr, len,
/// device-writable)`, indirect tables followed, every index and length
/// checked, at most `queue_size` descriptors (and as many per indirect
/// table as it holds).
pub(super) fn chain_at(
    mem: &Mem,
    table: vm_memory::GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<(vm_memory::GuestAddress, u32, bool)>, String> {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::{Bytes, GuestAddress};
    let desc = |base: GuestAddress, i: u16| -> Result<(u64, u32, u16, u16), String> {
        use vm_memory::Address;
        let a = base
            .checked_add(u64::from(i) * 16)
            .ok_or_else(|| "descriptor address overflows".to_owned())?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, a)
            .map_err(|e| format!("descriptor {i} unreadable: {e}"))?;
        let (addr, rest) = raw.split_at(8);
        let (len, rest) = rest.split_at(4);
        let (flags, next) = rest.split_at(2);
        Ok((
            u64::from_le_bytes(addr.try_into().map_err(|_| "descriptor")?),
            u32::from_le_bytes(len.try_into().map_err(|_| "descriptor")?),
            u16::from_le_bytes(flags.try_into().map_err(|_| "descriptor")?),
            u16::from_le_bytes(next.try_into().map_err(|_| "descriptor")?),
        ))
    };
    if head >= queue_size {
        return Err(format!("head {head} beyond the queue size {queue_size}"));
    }
    let mut out = Vec::new();
    let (mut base, mut size, mut i) = (table, queue_size, head);
    let mut indirect = false;
    let mut budget = u32::from(queue_size);
    loop {
        if budget == 0 {
            return Err("descriptor chain loops".into());
        }
        budget -= 1;
        let (addr, len, flags, next) = desc(base, i)?;
        if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
            if indirect || !out.is_empty() {
                return Err("misplaced indirect descriptor".into());
            }
            let n = u16::try_from(len / 16)
                .ok()
                .filter(|&n| n > 0 && len % 16 == 0)
                .ok_or_else(|| format!("indirect table of {len} bytes"))?;
            (base, size, i, indirect, budget) = (GuestAddress(addr), n, 0, true, u32::from(n));
            continue;
        }
        out.push((
            GuestAddress(addr),
            len,
            u32::from(flags) & VRING_DESC_F_WRITE != 0,
        ));
        if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
            return Ok(out);
        }
        if next >= size {
            return Err(format!("next index {next} beyond its table of {size}"));
        }
        i = next;
    }
}
