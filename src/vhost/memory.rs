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
