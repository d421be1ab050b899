// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A file mapped `MAP_SHARED` as an array of `AtomicU64` words.
//!
//! Stores into the mapping go straight into the file's page cache: they
//! survive the death of the process (kill -9, a panic, OOM) without any
//! system call, which is what the COW crash journal needs. Whether they
//! survive a power loss depends on the file system (tmpfs: no).

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// A shared, writable mapping of a whole file, seen as `u64` words.
#[derive(Debug)]
pub struct SharedWords {
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU64`, which is `Sync`;
// the pointer stays valid until `drop` unmaps it.
unsafe impl Send for SharedWords {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps the first `words * 8` bytes of `file` (opened read-write, at
    /// least that long) shared and writable.
    pub fn map(file: &File, words: usize) -> io::Result<Self> {
        let len = words
            .checked_mul(8)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mapping size"))?;
        let file_len = file.metadata()?.len();
        if (len as u64) > file_len {
            // Touching a page past the end of the file would be SIGBUS.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mapping of {len} bytes over a file of {file_len}"),
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL), of a file
        // descriptor we own; no existing memory is affected. The result is
        // checked against MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, words })
    }

    /// The words. Page-aligned (so `AtomicU64`-aligned), `words` long,
    /// backed by the file.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is a live mapping of `words * 8` readable and
        // writable bytes, page-aligned; `AtomicU64` has the size and
        // alignment of `u64` and every bit pattern is valid; all access goes
        // through atomics, so other threads (and the file's other mappings)
        // may change the words concurrently; the slice borrows `self`, which
        // unmaps only on drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }

    /// Word `i`, if inside.
    pub fn word(&self, i: usize) -> Option<&AtomicU64> {
        self.words().get(i)
    }

    /// Stores `v` into word `i` (ignored outside).
    pub fn store(&self, i: usize, v: u64) {
        if let Some(w) = self.word(i) {
            w.store(v, Ordering::Release);
        }
    }

    /// Loads word `i` (0 outside).
    pub fn load(&self, i: usize) -> u64 {
        self.word(i).map_or(0, |w| w.load(Ordering::Acquire))
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference
        // into it outlives `self` (`words` borrows `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.words.saturating_mul(8));
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn stores_reach_the_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let m = SharedWords::map(&f, 512).unwrap();
        m.store(3, 0x0102_0304_0506_0708);
        m.word(511).unwrap().fetch_or(1, Ordering::Release);
        assert_eq!(m.load(3), 0x0102_0304_0506_0708);
        assert_eq!(m.load(512), 0);
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 24).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x0102_0304_0506_0708);
        f.read_exact_at(&mut b, 4088).unwrap();
        assert_eq!(u64::from_le_bytes(b), 1);
    }

    #[test]
    fn refuses_a_mapping_past_the_end_of_the_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(100).unwrap();
        assert!(SharedWords::map(&f, 13).is_err());
        assert!(SharedWords::map(&f, 0).is_err());
        assert!(SharedWords::map(&f, 12).is_ok());
    }
}
