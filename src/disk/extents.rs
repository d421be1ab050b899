// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A set of sector ranges, kept merged and sorted.
//!
//! Used by the COW disk for writes that completed but whose bits are not
//! set yet (R5): reads must find them, flushes convert them to bits.

use std::{collections::BTreeMap, ops::Range};

/// Disjoint, non-adjacent ranges `[start, end)` keyed by start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentSet {
    map: BTreeMap<u64, u64>,
    /// Sectors in the set (a statistic: the sum of the extents' lengths).
    sectors: u64,
}

/// Sectors of extent `[s, e)`. Stored extents are never empty (`s < e`),
/// so this is exactly `e - s`.
fn extent_len(s: u64, e: u64) -> u64 {
    e.saturating_sub(s)
}

impl ExtentSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of disjoint extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no sector is in the set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of sectors in the set.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Adds a range, merging with neighbours it touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // A predecessor that reaches start absorbs it.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let doomed: Vec<(u64, u64)> = self.map.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in doomed {
            end = end.max(e);
            self.map.remove(&s);
            self.sectors = self.sectors.saturating_sub(extent_len(s, e));
        }
        self.map.insert(start, end);
        self.sectors = self.sectors.saturating_add(extent_len(start, end));
    }

    /// Removes a range (parts of extents are kept).
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let hit: Vec<(u64, u64)> = self.overlapping(r.clone()).collect();
        for (s, e) in hit {
            self.map.remove(&s);
            self.sectors = self.sectors.saturating_sub(extent_len(s, e));
            // The parts of the extent before and after `r` stay.
            if let Some(n) = r.start.checked_sub(s).filter(|&n| n > 0) {
                self.map.insert(s, r.start);
                self.sectors = self.sectors.saturating_add(n);
            }
            if let Some(n) = e.checked_sub(r.end).filter(|&n| n > 0) {
                self.map.insert(r.end, e);
                self.sectors = self.sectors.saturating_add(n);
            }
        }
    }

    /// Extents that intersect `r`, in order (whole extents, not clipped).
    pub fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .map
            .range(..=r.start)
            .next_back()
            .filter(|(_, &e)| e > r.start)
            .map(|(&s, &e)| (s, e));
        let rest = self
            .map
            .range(r.start.saturating_add(1)..r.end.max(r.start.saturating_add(1)))
            .map(|(&s, &e)| (s, e));
        first
            .into_iter()
            .chain(rest)
            .filter(move |_| r.start < r.end)
    }

    /// True if the sector is in the set.
    pub fn contains(&self, sector: u64) -> bool {
        self.map
            .range(..=sector)
            .next_back()
            .is_some_and(|(_, &e)| e > sector)
    }

    /// True if any sector of `r` is in the set.
    pub fn intersects(&self, r: Range<u64>) -> bool {
        self.overlapping(r).next().is_some()
    }

    /// All extents in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
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

    fn set(v: &[Range<u64>]) -> ExtentSet {
        let mut s = ExtentSet::new();
        for r in v {
            s.insert(r.clone());
        }
        s
    }

    #[test]
    fn insert_merges_touching_and_overlapping() {
        let s = set(&[10..20, 30..40, 20..25, 5..11, 39..50]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..25, 30..50]);
        assert_eq!(s.sectors(), 40);
        let s = set(&[10..20, 30..40, 0..100]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..100]);
        assert_eq!(s.sectors(), 100);
    }

    #[test]
    fn remove_splits() {
        let mut s = set(&[0..100]);
        s.remove(10..20);
        s.remove(90..200);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..10, 20..90]);
        assert_eq!(s.sectors(), 80);
        assert!(s.contains(9) && !s.contains(10) && s.contains(20) && !s.contains(90));
    }

    #[test]
    fn overlapping_finds_partial_hits() {
        let s = set(&[0..4, 8..12, 20..30]);
        assert_eq!(
            s.overlapping(3..9).collect::<Vec<_>>(),
            vec![(0, 4), (8, 12)]
        );
        assert_eq!(s.overlapping(4..8).count(), 0);
        assert!(s.intersects(29..31));
        assert!(!s.intersects(30..31));
        assert!(!s.intersects(5..5));
    }

    #[test]
    fn matches_a_model_under_random_operations() {
        let mut model = vec![false; 256];
        let mut s = ExtentSet::new();
        let mut x: u64 = 0x1234_5678;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = x % 256;
            let b = (a + (x >> 8) % 20).min(256);
            if x % 3 == 0 {
                s.remove(a..b);
                model[a as usize..b as usize].fill(false);
            } else {
                s.insert(a..b);
                model[a as usize..b as usize].fill(true);
            }
            for (i, &m) in model.iter().enumerate() {
                assert_eq!(s.contains(i as u64), m);
            }
            assert_eq!(s.sectors(), model.iter().filter(|&&m| m).count() as u64);
        }
    }
}
