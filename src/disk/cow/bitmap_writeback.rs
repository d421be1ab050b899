// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bitmap writeback scheduler: the seed's rules R1-R4, and only here.
//!
//! - **R1 direct bitmap writes.** A bitmap write covers bitmap bytes
//!   `[b0, b1)` and is issued straight from the in-memory bitmap
//!   ([`Issued::mem`]) at file offset `bitmap_offset + b0`; there is no copy.
//! - **R2 late bits.** A write's bits are set in memory only in
//!   [`BitmapWriteback::submit`] / [`BitmapWriteback::complete`], at the
//!   moment the write is handed out for issue, never while it waits. The
//!   caller submits a write only once its sectors' data is written (and, in
//!   writeback mode, durable).
//! - **R3 stable while in flight.** Bytes inside an in-flight ("pending")
//!   write are never modified: a write overlapping a pending write, or an
//!   earlier waiting write, goes on the waiting list; when a pending write
//!   completes, waiting writes are retried in order (they may keep waiting
//!   on another).
//! - **R4 reads wait, never fail.** [`BitmapWriteback::check_read`] answers
//!   [`ReadAgain`] when the backing-file part of a read (its sectors whose bit
//!   is clear) overlaps a pending or waiting write. Overlap is computed in
//!   one unit: the read's sector range is converted to bitmap byte offsets
//!   first (the 2007 patch compared request-relative sectors with byte
//!   offsets). The caller parks the read and retries it after any bitmap
//!   write completes.
//!
//! The scheduler is a pure state machine: no I/O, no locks. The COW disk
//! keeps it under its state lock and the durability thread drives it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    ops::Range,
};

use crate::cow::{bitmap::byte_range, Bitmap, Geometry};
use crate::disk::extents::ExtentSet;
use crate::engine::IoVecs;

/// Identifies one bitmap write.
pub type WriteId = u64;

/// A bitmap write handed out for issue: its bits are set, its bytes are
/// frozen until [`BitmapWriteback::complete`] is called with its id.
#[derive(Debug)]
pub struct Issued<T> {
    /// The write's id, to pass to `complete`.
    pub id: WriteId,
    /// Bitmap bytes `[b0, b1)` written.
    pub bytes: Range<u64>,
    /// File offset: `bitmap_offset + b0`.
    pub file_offset: u64,
    /// The bytes in the in-memory bitmap (R1), owned by the write.
    pub mem: IoVecs,
    /// Sector ranges whose bits this write set.
    pub sectors: Vec<Range<u64>>,
    /// The caller's tag (the durability epoch).
    pub tag: T,
}

#[derive(Debug)]
struct Waiting<T> {
    id: WriteId,
    bytes: Range<u64>,
    /// The bytes in memory, found at submit: a write that waits can always
    /// be issued later (no fallible step after its bits are set).
    mem: IoVecs,
    sectors: Vec<Range<u64>>,
    tag: T,
}

/// What became of a submitted bitmap write.
#[derive(Debug)]
pub enum Queued<T> {
    /// Issue it now: its bits are set and its bytes frozen.
    Issue(Issued<T>),
    /// It waits (R3); it will come out of a later `complete`.
    Wait(WriteId),
}

/// A read must wait: it overlaps a pending or waiting bitmap write (R4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAgain;

/// Pending and waiting bitmap writes.
///
/// A checkpoint of random writes hands in thousands of writes at once, and
/// every read of a fresh sector asks [`BitmapWriteback::check_read`] under
/// the COW state lock: overlap queries must not scan every pending write.
/// Pending writes never overlap each other (R3), so they are kept as
/// disjoint byte ranges ordered by start, and a query is one ordered lookup.
#[derive(Debug)]
pub struct BitmapWriteback<T> {
    next_id: WriteId,
    /// Pending writes: first byte -> (end byte, id). Disjoint.
    pending: BTreeMap<u64, (u64, WriteId)>,
    /// Pending write id -> its first byte.
    pending_ids: HashMap<WriteId, u64>,
    waiting: VecDeque<Waiting<T>>,
    completed: u64,
}

impl<T> Default for BitmapWriteback<T> {
    fn default() -> Self {
        Self {
            next_id: 1,
            pending: BTreeMap::new(),
            pending_ids: HashMap::new(),
            waiting: VecDeque::new(),
            completed: 0,
        }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl<T> BitmapWriteback<T> {
    /// An idle scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes in flight.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes on the waiting list.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Bitmap writes completed so far (a generation number: parked reads
    /// retry when it moves).
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// True when nothing is pending or waiting.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.waiting.is_empty()
    }

    /// Does `bytes` overlap a pending write? The pending write starting
    /// last before `bytes.end` is the only candidate (they are disjoint).
    fn overlaps_pending(&self, bytes: &Range<u64>) -> bool {
        self.pending
            .range(..bytes.end)
            .next_back()
            .is_some_and(|(&start, &(end, _))| overlaps(&(start..end), bytes))
    }

    /// A new write waits if it overlaps a pending write or any waiting one
    /// (they go first).
    fn blocked(&self, bytes: &Range<u64>) -> bool {
        self.overlaps_pending(bytes) || self.waiting.iter().any(|w| overlaps(&w.bytes, bytes))
    }

    /// Hands a write out for issue. Infallible: everything that can fail
    /// (the range, the pointer) was checked in `submit`, before any bit.
    fn issue(&mut self, bitmap: &Bitmap, geometry: &Geometry, w: Waiting<T>) -> Issued<T> {
        // R2: the bits are set now, just before the write is issued.
        for s in &w.sectors {
            bitmap.set_range(s.clone());
        }
        self.pending.insert(w.bytes.start, (w.bytes.end, w.id));
        self.pending_ids.insert(w.id, w.bytes.start);
        Issued {
            id: w.id,
            file_offset: geometry.bitmap_offset.saturating_add(w.bytes.start),
            bytes: w.bytes,
            mem: w.mem,
            sectors: w.sectors,
            tag: w.tag,
        }
    }

    /// Submits a write of bitmap bytes `bytes` carrying the bits of
    /// `sectors`: it is issued now or waits (it will then come out of a
    /// later [`Self::complete`]). `bytes` must cover the bytes of every range
    /// in `sectors` and lie inside the on-disk bitmap; otherwise the tag is
    /// handed back (build writes with [`Self::bytes_for`]).
    pub fn submit(
        &mut self,
        bitmap: &Bitmap,
        geometry: &Geometry,
        bytes: Range<u64>,
        sectors: Vec<Range<u64>>,
        tag: T,
    ) -> Result<Queued<T>, T> {
        if bytes.start >= bytes.end
            || bytes.end > geometry.bitmap_len
            || sectors.iter().any(|s| {
                let b = byte_range(s.clone());
                b.start < bytes.start || b.end > bytes.end
            })
        {
            return Err(tag);
        }
        let Some(mem) = bitmap.io_vecs(bytes.clone()) else {
            return Err(tag);
        };
        // Ids never repeat (nor reach 0, the durability thread's sync tag):
        // once they run out, writes are refused.
        let id = self.next_id;
        let Some(next_id) = id.checked_add(1) else {
            return Err(tag);
        };
        self.next_id = next_id;
        let w = Waiting {
            id,
            bytes,
            mem,
            sectors,
            tag,
        };
        if self.blocked(&w.bytes) {
            self.waiting.push_back(w);
            return Ok(Queued::Wait(id));
        }
        Ok(Queued::Issue(self.issue(bitmap, geometry, w)))
    }

    /// Marks a pending write complete and issues the waiting writes it
    /// released, in order. Unknown ids are ignored.
    pub fn complete(
        &mut self,
        bitmap: &Bitmap,
        geometry: &Geometry,
        id: WriteId,
    ) -> Vec<Issued<T>> {
        let Some(start) = self.pending_ids.remove(&id) else {
            return Vec::new();
        };
        self.pending.remove(&start);
        // Wrapping on purpose: a generation number only has to move.
        self.completed = self.completed.wrapping_add(1);
        let mut released = Vec::new();
        if self.waiting.is_empty() {
            return released;
        }
        // In order: a waiting write goes when it overlaps neither a pending
        // write nor a write still waiting ahead of it (`ahead`).
        let mut ahead = ExtentSet::new();
        let mut still = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            if self.overlaps_pending(&w.bytes) || ahead.intersects(w.bytes.clone()) {
                ahead.insert(w.bytes.clone());
                still.push_back(w);
            } else {
                released.push(self.issue(bitmap, geometry, w));
            }
        }
        self.waiting = still;
        released
    }

    /// R4: may a read whose backing-file part is `backing_sectors` go ahead?
    /// The sector ranges are converted to bitmap bytes before comparing.
    pub fn check_read(&self, backing_sectors: &[Range<u64>]) -> Result<(), ReadAgain> {
        if self.is_idle() {
            return Ok(());
        }
        for s in backing_sectors {
            let bytes = byte_range(s.clone());
            if bytes.start >= bytes.end {
                continue;
            }
            if self.blocked(&bytes) {
                return Err(ReadAgain);
            }
        }
        Ok(())
    }

    /// Groups sector ranges (sorted or not) into bitmap writes: ranges
    /// whose bytes lie within `gap` bytes of each other share a write, and
    /// no write grows past `max_len` bytes (unless one range alone does).
    pub fn bytes_for(
        sectors: &[Range<u64>],
        gap: u64,
        max_len: u64,
    ) -> Vec<(Range<u64>, Vec<Range<u64>>)> {
        let mut sorted: Vec<Range<u64>> = sectors
            .iter()
            .filter(|r| r.start < r.end)
            .cloned()
            .collect();
        sorted.sort_by_key(|r| r.start);
        let mut out: Vec<(Range<u64>, Vec<Range<u64>>)> = Vec::new();
        for s in sorted {
            let b = byte_range(s.clone());
            match out.last_mut() {
                Some((cur, list))
                    if b.start <= cur.end.saturating_add(gap)
                        && b.end
                            .max(cur.end)
                            .checked_sub(cur.start)
                            .is_some_and(|len| len <= max_len.max(1)) =>
                {
                    cur.end = cur.end.max(b.end);
                    list.push(s);
                }
                _ => out.push((b, vec![s])),
            }
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
    use crate::cow::CowHeader;

    impl<T> Queued<T> {
        fn unwrap(self) -> Issued<T> {
            match self {
                Queued::Issue(w) => w,
                Queued::Wait(id) => panic!("write {id} waits"),
            }
        }
        fn is_none(&self) -> bool {
            matches!(self, Queued::Wait(_))
        }
    }

    fn setup(sectors: u64) -> (Bitmap, Geometry) {
        let h = CowHeader::new_v3(std::path::Path::new("/b"), 0, sectors * 512, 4096, 512).unwrap();
        let g = h.geometry().unwrap();
        (Bitmap::from_bytes(vec![], g.nsect), g)
    }

    #[test]
    fn a_write_sets_its_bits_only_when_issued() {
        let (bm, g) = setup(1024);
        let mut wb = BitmapWriteback::new();
        let first = wb.submit(&bm, &g, 0..2, vec![0..8], 'a').unwrap().unwrap();
        assert!(bm.all_set(0..8));
        assert_eq!(first.file_offset, g.bitmap_offset);
        // Overlaps the pending write: waits, bits of 8..16 stay clear (R2, R3).
        assert!(wb
            .submit(&bm, &g, 1..2, vec![8..16], 'b')
            .unwrap()
            .is_none());
        assert!(!bm.test(8));
        assert_eq!((wb.pending(), wb.waiting()), (1, 1));
        let released = wb.complete(&bm, &g, first.id);
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].tag, 'b');
        assert!(bm.all_set(8..16));
        assert!(wb.complete(&bm, &g, released[0].id).is_empty());
        assert!(wb.is_idle());
        assert_eq!(wb.completed(), 2);
    }

    #[test]
    fn a_write_that_could_not_be_issued_is_refused_before_any_bit() {
        // A memory bitmap shorter than the file's (should the two ever
        // disagree): bytes past its end have no pointer.
        let (_, g) = setup(2048);
        let bm = Bitmap::from_bytes(vec![], 1024);
        assert!(g.bitmap_len > bm.len());
        let mut wb = BitmapWriteback::new();
        let past = bm.len()..bm.len() + 1;
        assert_eq!(wb.submit(&bm, &g, past, vec![], 'x').err(), Some('x'));
        // A refused write neither waits (it would wait forever: nothing
        // would ever complete it) nor leaves anything pending.
        assert!(wb.is_idle());
        let a = wb.submit(&bm, &g, 0..2, vec![0..8], 'a').unwrap().unwrap();
        let tail = bm.len() - 1..bm.len() + 1;
        assert_eq!(
            wb.submit(&bm, &g, tail, vec![1016..1024], 'y').err(),
            Some('y')
        );
        assert!(!bm.test(1016), "no bit of a refused write is set");
        assert!(wb.complete(&bm, &g, a.id).is_empty());
        assert!(wb.is_idle());
    }

    #[test]
    fn overlapping_waiters_are_released_in_order() {
        let (bm, g) = setup(1024);
        let mut wb = BitmapWriteback::new();
        let a = wb.submit(&bm, &g, 0..4, vec![0..8], 1).unwrap().unwrap();
        // b waits on a; c overlaps b (not a) but must queue behind b.
        assert!(wb.submit(&bm, &g, 2..6, vec![16..24], 2).unwrap().is_none());
        assert!(wb.submit(&bm, &g, 5..8, vec![40..48], 3).unwrap().is_none());
        // d overlaps nothing: goes at once.
        let d = wb
            .submit(&bm, &g, 10..11, vec![80..88], 4)
            .unwrap()
            .unwrap();
        assert_eq!(d.tag, 4);
        assert!(!bm.test(16) && !bm.test(40) && bm.test(80));
        let r = wb.complete(&bm, &g, a.id);
        assert_eq!(r.iter().map(|i| i.tag).collect::<Vec<_>>(), vec![2]);
        assert!(!bm.test(40));
        let r2 = wb.complete(&bm, &g, r[0].id);
        assert_eq!(r2.iter().map(|i| i.tag).collect::<Vec<_>>(), vec![3]);
        assert!(bm.test(40));
        wb.complete(&bm, &g, r2[0].id);
        wb.complete(&bm, &g, d.id);
        assert!(wb.is_idle());
    }

    #[test]
    fn a_waiter_released_by_one_write_may_still_wait_on_another() {
        let (bm, g) = setup(1024);
        let mut wb = BitmapWriteback::new();
        let a = wb.submit(&bm, &g, 0..2, vec![0..8], 1).unwrap().unwrap();
        let b = wb.submit(&bm, &g, 4..6, vec![32..40], 2).unwrap().unwrap();
        assert!(wb.submit(&bm, &g, 1..5, vec![8..16], 3).unwrap().is_none());
        assert!(wb.complete(&bm, &g, a.id).is_empty());
        assert!(!bm.test(8));
        let r = wb.complete(&bm, &g, b.id);
        assert_eq!(r.len(), 1);
        assert!(bm.test(8));
    }

    #[test]
    fn reads_overlapping_pending_or_waiting_writes_get_again() {
        let (bm, g) = setup(1024);
        let mut wb = BitmapWriteback::new();
        let a = wb.submit(&bm, &g, 1..2, vec![8..16], 1).unwrap().unwrap();
        assert!(wb.submit(&bm, &g, 1..3, vec![16..20], 2).unwrap().is_none());
        // Sector 12's byte (1) is pending: wait. Sector 17 is waiting: wait.
        assert_eq!(wb.check_read(&[12..13]), Err(ReadAgain));
        assert_eq!(wb.check_read(&[17..18]), Err(ReadAgain));
        // Sectors 0..8 (byte 0) and 24..32 (byte 3) overlap nothing.
        assert_eq!(wb.check_read(&[0..8, 24..32]), Ok(()));
        // Byte units, not sectors: sector 3 is byte 0, not byte 3.
        assert_eq!(wb.check_read(&[3..4]), Ok(()));
        // The waiter (bytes 1..3) is now in flight: both still wait.
        let r = wb.complete(&bm, &g, a.id);
        assert_eq!(wb.check_read(&[12..13]), Err(ReadAgain));
        assert_eq!(wb.check_read(&[17..18]), Err(ReadAgain));
        wb.complete(&bm, &g, r[0].id);
        assert_eq!(wb.check_read(&[12..13, 17..18]), Ok(()));
    }

    #[test]
    fn bad_writes_are_refused() {
        let (bm, g) = setup(64);
        let mut wb = BitmapWriteback::new();
        assert_eq!(wb.submit(&bm, &g, 0..9, vec![0..8], 1).unwrap_err(), 1);
        assert_eq!(wb.submit(&bm, &g, 0..1, vec![0..16], 2).unwrap_err(), 2);
        assert_eq!(wb.submit(&bm, &g, 3..3, vec![], 3).unwrap_err(), 3);
        assert!(bm.count_set() == 0);
    }

    #[test]
    fn grouping_coalesces_nearby_ranges_within_the_cap() {
        let g = BitmapWriteback::<()>::bytes_for(&[80..81, 0..8, 8..9, 4000..4008], 4, 64);
        assert_eq!(
            g,
            vec![
                (0..2, vec![0..8, 8..9]),
                (10..11, vec![80..81]),
                (500..501, vec![4000..4008]),
            ]
        );
        let g = BitmapWriteback::<()>::bytes_for(&[0..8, 80..81], 16, 64);
        assert_eq!(g, vec![(0..11, vec![0..8, 80..81])]);
        let g = BitmapWriteback::<()>::bytes_for(&[0..8, 80..81], 16, 4);
        assert_eq!(g.len(), 2);
    }

    /// The rules stated naively (linear scans over every write) as a
    /// model: on random submits, completions and read checks the scheduler
    /// must make exactly the model's decisions, and never let two pending
    /// writes overlap (R3).
    #[test]
    fn random_operations_match_a_naive_model() {
        #[derive(Default)]
        struct Model {
            pending: Vec<(WriteId, Range<u64>)>,
            waiting: Vec<(WriteId, Range<u64>)>,
        }
        impl Model {
            fn blocked(&self, b: &Range<u64>, ahead: usize) -> bool {
                self.pending.iter().any(|(_, p)| overlaps(p, b))
                    || self.waiting[..ahead].iter().any(|(_, w)| overlaps(w, b))
            }
            fn complete(&mut self, id: WriteId) -> Vec<WriteId> {
                self.pending.retain(|(p, _)| *p != id);
                let mut out = Vec::new();
                let mut i = 0;
                while i < self.waiting.len() {
                    if self.blocked(&self.waiting[i].1.clone(), i) {
                        i += 1;
                    } else {
                        let w = self.waiting.remove(i);
                        out.push(w.0);
                        self.pending.push(w);
                    }
                }
                out
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (bm, g) = setup(64 * 8);
        for round in 0..200 {
            let mut wb = BitmapWriteback::new();
            let mut m = Model::default();
            for _ in 0..200 {
                match rnd(3) {
                    0 => {
                        let b0 = rnd(64);
                        let b = b0..(b0 + 1 + rnd(6)).min(64);
                        let sectors = vec![b.start * 8..b.end * 8];
                        let id = match wb.submit(&bm, &g, b.clone(), sectors, ()).unwrap() {
                            Queued::Issue(w) => {
                                assert!(!m.blocked(&b, m.waiting.len()), "round {round}");
                                m.pending.push((w.id, b));
                                w.id
                            }
                            Queued::Wait(id) => {
                                assert!(m.blocked(&b, m.waiting.len()), "round {round}");
                                m.waiting.push((id, b));
                                id
                            }
                        };
                        assert!(id > 0);
                    }
                    1 if !m.pending.is_empty() => {
                        let i = rnd(m.pending.len() as u64) as usize;
                        let id = m.pending[i].0;
                        let got: Vec<WriteId> =
                            wb.complete(&bm, &g, id).iter().map(|w| w.id).collect();
                        assert_eq!(got, m.complete(id), "round {round}: complete {id}");
                    }
                    _ => {
                        let s0 = rnd(64 * 8);
                        let r = s0..(s0 + 1 + rnd(40)).min(64 * 8);
                        let b = byte_range(r.clone());
                        let model_again = m.pending.iter().any(|(_, p)| overlaps(p, &b))
                            || m.waiting.iter().any(|(_, w)| overlaps(w, &b));
                        assert_eq!(
                            wb.check_read(std::slice::from_ref(&r)).is_err(),
                            model_again,
                            "round {round}: read {r:?}"
                        );
                    }
                }
                for (i, (_, a)) in m.pending.iter().enumerate() {
                    for (_, b) in &m.pending[i + 1..] {
                        assert!(!overlaps(a, b), "two pending writes overlap");
                    }
                }
                assert_eq!(wb.pending(), m.pending.len());
                assert_eq!(wb.waiting(), m.waiting.len());
            }
        }
    }
}
