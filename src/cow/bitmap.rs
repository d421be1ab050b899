// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-memory COW bitmap and its bit math.
//!
//! Invariant (R7): bits are only ever set, never cleared. Sector `N` is bit
//! `N % 8` (LSB first) of byte `N / 8`, the same on every host.
//!
//! The bitmap is an array of atomics so that readers test bits without a
//! lock, and so that the kernel may read a byte range of it (a bitmap write
//! issued straight from memory, R1) while other threads set bits in other
//! bytes. Which bytes may change while a write is in flight is decided by
//! `disk::cow::bitmap_writeback` (R3), not here.

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
};

use crate::engine::{AtomicBytes, IoVecs};

/// Bitmap byte holding a sector's bit.
pub fn byte_of(sector: u64) -> u64 {
    sector / 8
}

/// Mask of a sector's bit within its byte.
pub fn mask_of(sector: u64) -> u8 {
    1u8 << (sector % 8)
}

/// Bitmap bytes `[b0, b1)` that hold the bits of sectors `[start, end)`
/// (empty when the sector range is).
pub fn byte_range(sectors: Range<u64>) -> Range<u64> {
    if sectors.start >= sectors.end {
        return 0..0;
    }
    // `end > start >= 0`: `end - 1` does not wrap, and a byte index of a
    // u64 sector is at most u64::MAX / 8.
    byte_of(sectors.start)..byte_of(sectors.end.saturating_sub(1)).saturating_add(1)
}

/// The bitmap of a COW device, authoritative while the daemon runs.
pub struct Bitmap {
    /// Shared with the bitmap writes in flight, which own what they write.
    mem: Arc<AtomicBytes>,
    nsect: u64,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap")
            .field("len", &self.len())
            .field("nsect", &self.nsect)
            .finish()
    }
}

impl Bitmap {
    /// Builds a bitmap for `nsect` sectors from the bytes read off disk
    /// (`disk` may be shorter: missing bytes are clear; longer: truncated).
    pub fn from_bytes(mut disk: Vec<u8>, nsect: u64) -> Self {
        let len = usize::try_from(nsect.div_ceil(8)).unwrap_or(usize::MAX);
        disk.resize(len, 0);
        Self {
            mem: Arc::new(AtomicBytes::from_vec(disk)),
            nsect,
        }
    }

    /// A bitmap for `nsect` sectors over `mem` (at least one bit per
    /// sector; a memfd from [`load_bitmap`](crate::cow::load::load_bitmap)
    /// or a predecessor).
    pub fn from_atomic(mem: AtomicBytes, nsect: u64) -> std::io::Result<Self> {
        let need = nsect.div_ceil(8);
        if (mem.as_slice().len() as u64) < need {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a bitmap of {} bytes cannot hold {nsect} sectors",
                    mem.as_slice().len()
                ),
            ));
        }
        Ok(Self {
            mem: Arc::new(mem),
            nsect,
        })
    }

    /// The memfd holding the bits, when they live in one (a live handover
    /// passes it on).
    pub fn memfd(&self) -> Option<&std::fs::File> {
        self.mem.memfd()
    }

    /// Sectors covered.
    pub fn nsect(&self) -> u64 {
        self.nsect
    }

    /// Bytes of the in-memory bitmap.
    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// True for a bitmap of zero sectors.
    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    fn byte(&self, idx: u64) -> Option<&AtomicU8> {
        usize::try_from(idx).ok().and_then(|i| self.bytes().get(i))
    }

    /// Is the sector's data in the COW file? Out-of-range sectors are clear.
    pub fn test(&self, sector: u64) -> bool {
        sector < self.nsect
            && self
                .byte(byte_of(sector))
                .is_some_and(|b| b.load(Ordering::Acquire) & mask_of(sector) != 0)
    }

    /// True when every sector of the range has its bit set (fast path of
    /// reads and rewrites: such sectors can never go back to the backing).
    pub fn all_set(&self, sectors: Range<u64>) -> bool {
        if sectors.end > self.nsect {
            return false;
        }
        let mut s = sectors.start;
        while s < sectors.end {
            let Some(b) = self.byte(byte_of(s)) else {
                return false;
            };
            let v = b.load(Ordering::Acquire);
            // `s < end <= nsect`: the steps below stay at or under `end`.
            if s % 8 == 0 && sectors.end.saturating_sub(s) >= 8 {
                if v != 0xff {
                    return false;
                }
                s = s.saturating_add(8);
            } else {
                if v & mask_of(s) == 0 {
                    return false;
                }
                s = s.saturating_add(1);
            }
        }
        true
    }

    /// Sets the bits of a sector range (clamped to the device). Returns
    /// whether any bit changed.
    pub fn set_range(&self, sectors: Range<u64>) -> bool {
        let end = sectors.end.min(self.nsect);
        let mut changed = false;
        let mut s = sectors.start;
        while s < end {
            let Some(b) = self.byte(byte_of(s)) else {
                break;
            };
            // `s < end`: `left >= 1`, and a step never passes `end`.
            let left = end.saturating_sub(s);
            let (mask, step) = if s % 8 == 0 && left >= 8 {
                (0xffu8, 8)
            } else {
                let first = s % 8;
                let n = left.min(8u64.saturating_sub(first));
                let mut m = 0u8;
                for bit in first..first.saturating_add(n) {
                    m |= 1 << bit;
                }
                (m, n)
            };
            changed |= b.fetch_or(mask, Ordering::AcqRel) & mask != mask;
            s = s.saturating_add(step);
        }
        changed
    }

    /// Number of sectors whose bit is set (bits past `nsect` ignored).
    pub fn count_set(&self) -> u64 {
        self.count_set_bytes(0..self.len())
    }

    /// Number of bits set in bitmap bytes `bytes` (bits past `nsect`
    /// ignored).
    pub fn count_set_bytes(&self, bytes: Range<u64>) -> u64 {
        let mut n = 0u64;
        for i in bytes.start..bytes.end.min(self.len()) {
            let Some(b) = self.byte(i) else { break };
            let mut v = b.load(Ordering::Relaxed);
            let first = i.saturating_mul(8);
            if first.saturating_add(8) > self.nsect {
                let valid = self.nsect.saturating_sub(first);
                // `valid < 8` here.
                v &= ((1u16 << valid).saturating_sub(1)) as u8;
            }
            n = n.saturating_add(u64::from(v.count_ones()));
        }
        n
    }

    /// Copies a byte range out (for tests and `info`).
    pub fn snapshot(&self, bytes: Range<u64>) -> Vec<u8> {
        (bytes.start..bytes.end.min(self.len()))
            .filter_map(|i| self.byte(i).map(|b| b.load(Ordering::Acquire)))
            .collect()
    }

    /// Bitmap bytes `bytes`, to write straight from memory (R1); the
    /// write owns them (keeps the bitmap's memory alive) until reaped.
    /// `None` when the range is not inside.
    pub fn io_vecs(&self, bytes: Range<u64>) -> Option<IoVecs> {
        if bytes.start > bytes.end {
            return None;
        }
        self.mem.io_vecs(bytes)
    }

    fn bytes(&self) -> &[AtomicU8] {
        self.mem.as_slice()
    }

    /// Sector runs `(start, end, set)` of uniform bit value covering `sectors`.
    pub fn runs(&self, sectors: Range<u64>) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut s = sectors.start;
        while s < sectors.end {
            let v = self.test(s);
            let next = s.saturating_add(1);
            match out.last_mut() {
                Some(last) if last.2 == v => last.1 = next,
                _ => out.push((s, next, v)),
            }
            s = next;
        }
        out
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

    #[test]
    fn bit_order_is_lsb_first_per_byte() {
        let bm = Bitmap::from_bytes(vec![], 64);
        bm.set_range(0..2);
        bm.set_range(7..10);
        assert_eq!(bm.snapshot(0..2), vec![0x83, 0x03]);
        assert!(bm.test(7) && bm.test(9) && !bm.test(10));
        assert_eq!(byte_range(0..1), 0..1);
        assert_eq!(byte_range(7..9), 0..2);
        assert_eq!(byte_range(8..16), 1..2);
        assert_eq!(byte_range(5..5), 0..0);
        assert_eq!((byte_of(1_000_000), mask_of(1_000_000)), (125_000, 1));
        assert_eq!((byte_of(2_097_151), mask_of(2_097_151)), (262_143, 0x80));
    }

    #[test]
    fn set_range_reports_changes_and_is_idempotent() {
        let bm = Bitmap::from_bytes(vec![], 100);
        assert!(bm.set_range(3..21));
        assert!(!bm.set_range(3..21));
        assert!(bm.set_range(20..22));
        assert_eq!(bm.count_set(), 19);
        assert!(bm.all_set(3..22));
        assert!(!bm.all_set(2..22));
        assert!(!bm.all_set(3..23));
        for s in 0..100 {
            assert_eq!(bm.test(s), (3..22).contains(&s), "sector {s}");
        }
    }

    #[test]
    fn bits_past_the_device_are_ignored() {
        let bm = Bitmap::from_bytes(vec![0xff, 0xff], 10);
        assert_eq!(bm.count_set(), 10);
        assert!(!bm.test(10));
        assert!(!bm.all_set(8..11));
        bm.set_range(9..40);
        assert_eq!(bm.len(), 2);
    }

    #[test]
    fn runs_split_by_bit_value() {
        let bm = Bitmap::from_bytes(vec![], 32);
        bm.set_range(4..6);
        assert_eq!(
            bm.runs(2..9),
            vec![(2, 4, false), (4, 6, true), (6, 9, false)]
        );
    }

    #[test]
    fn io_vecs_stay_inside() {
        let bm = Bitmap::from_bytes(vec![1, 2, 3], 24);
        assert!(bm.io_vecs(0..3).is_some());
        assert!(bm.io_vecs(1..4).is_none());
    }
}
