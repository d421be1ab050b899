// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Files mapped `MAP_SHARED` ([`SharedMap`]), and one seen as an array of
//! `AtomicU64` words ([`SharedWords`], the crash journal).
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

/// A shared, writable mapping of `len` bytes of a file from `offset`;
/// unmapped on drop. What the bytes mean, and how they are accessed
/// (atomically: other mappings of the file may change them at any time),
/// is the user's.
#[derive(Debug)]
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared memory; the pointer stays valid until `drop` unmaps
// it, and users access the bytes only through atomics.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `file` (opened read-write) from `offset` (a
    /// multiple of the page size), refusing a range past the end of the
    /// file: touching a page there would be SIGBUS.
    pub fn map(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if len == 0 {
            return Err(bad("empty mapping".into()));
        }
        let file_len = file.metadata()?.len();
        let end = u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .ok_or_else(|| bad("mapping range overflows".into()))?;
        if end > file_len {
            return Err(bad(format!(
                "mapping of {len} bytes at {offset} over a file of {file_len}"
            )));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| bad("offset".into()))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL), of a file
        // descriptor we own, inside the file (checked above); no existing
        // memory is affected. The result is checked against MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    /// Start of the mapping (page-aligned), valid for `len` bytes while
    /// `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (empty mappings are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference
        // into it outlives `self` (users borrow `self` for every access).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A shared, writable mapping of a whole file, seen as `u64` words.
#[derive(Debug)]
pub struct SharedWords {
    map: SharedMap,
    words: usize,
}

impl SharedWords {
    /// Maps the first `words * 8` bytes of `file` (opened read-write, at
    /// least that long) shared and writable.
    pub fn map(file: &File, words: usize) -> io::Result<Self> {
        let len = words
            .checked_mul(8)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mapping size"))?;
        Ok(Self {
            map: SharedMap::map(file, 0, len)?,
            words,
        })
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
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.words) }
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
