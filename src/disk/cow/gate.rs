// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Copies that run while the guest does I/O (seeds 000 and 004): who owns
//! which COW sectors while a copy is in flight, which guest writes are in
//! flight, and what a point-in-time export has saved.
//!
//! Three kinds of copy use it, all in units of COW sectors (bits):
//! - **copy-up** (a COW sector larger than 512 bytes): a guest write that
//!   covers part of a COW sector not yet in the COW needs the rest from the
//!   backing first. Exactly one request is elected to copy (seed 000); the
//!   other writes and the reads of that sector are parked until the copy is
//!   complete (the queues' park/retry, a wait list, never a sleep loop).
//! - **flatten**: the job copies a chunk's sectors still in the base into
//!   the COW. While the chunk is busy, guest writes into it are parked; the
//!   job starts copying only after the registered writes into the chunk
//!   have completed, so the copy never lands over newer guest data.
//! - **export** (copy-before-write, dm-snapshot origin semantics): a guest
//!   write into a chunk whose point-in-time content is not saved yet is
//!   parked and asks the job for that chunk first.
//!
//! Seed 004's four states of a chunk, as they are here:
//! - *none*: not in `busy`, (export) state [`ChunkState::None`];
//! - *pending*: in `busy` (copy-up, flatten) or [`ChunkState::Pending`]
//!   (export: its old content is being read): writes that would overwrite
//!   the copy's source or target wait;
//! - *pending + complete*: the copy is done and new reads go to the new
//!   place, but reads routed to the old place are still in flight. For
//!   copy-up and flatten the old place is the backing file, which nothing
//!   ever writes (R6): such reads can never be torn, so this state ends the
//!   moment it starts (the sectors enter `unpersisted` and leave `busy`
//!   under one lock). For export the old place is the live disk: the
//!   job's own read of it is the read in flight, and the chunk stays
//!   `Pending` until that read has landed;
//! - *complete*: out of `busy`, (export) [`ChunkState::Saved`].
//!
//! Nobody waits while holding the state lock: a parked request is handed
//! back to its queue, and the job waits on a condition variable, which
//! releases the lock.

use std::{collections::VecDeque, ops::Range};

/// Who owns a busy range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copier {
    /// A queue's copy-up of one COW sector.
    CopyUp,
    /// The flatten job's chunk.
    Flatten,
}

/// What an export has saved of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkState {
    /// Not saved yet: a write into it must wait for the copy.
    None = 0,
    /// Its old content is being read: writes wait.
    Pending = 1,
    /// Its content at the start instant is saved: writes pass.
    Saved = 2,
}

/// The copy-before-write map of a running export.
#[derive(Debug)]
pub struct ExportMap {
    /// COW sectors per chunk.
    pub chunk_bits: u64,
    states: Vec<ChunkState>,
    /// Chunks guest writes are waiting for, oldest first.
    pub urgent: VecDeque<u64>,
}

impl ExportMap {
    /// A map of `nbits` COW sectors in chunks of `chunk_bits`.
    pub fn new(nbits: u64, chunk_bits: u64) -> Self {
        let chunk_bits = chunk_bits.max(1);
        let n = usize::try_from(nbits.div_ceil(chunk_bits)).unwrap_or(usize::MAX);
        Self {
            chunk_bits,
            states: vec![ChunkState::None; n],
            urgent: VecDeque::new(),
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.states.len() as u64
    }

    /// A chunk's state (`Saved` past the end).
    pub fn state(&self, chunk: u64) -> ChunkState {
        usize::try_from(chunk)
            .ok()
            .and_then(|c| self.states.get(c).copied())
            .unwrap_or(ChunkState::Saved)
    }

    /// Sets a chunk's state.
    pub fn set(&mut self, chunk: u64, s: ChunkState) {
        if let Some(c) = usize::try_from(chunk)
            .ok()
            .and_then(|c| self.states.get_mut(c))
        {
            *c = s;
        }
    }

    /// The chunks COW sectors `bits` touch.
    pub fn chunks_of(&self, bits: &Range<u64>) -> Range<u64> {
        if bits.is_empty() {
            return 0..0;
        }
        // `chunk_bits` is at least 1 (`new`).
        bits.start.checked_div(self.chunk_bits).unwrap_or(0)..bits.end.div_ceil(self.chunk_bits)
    }

    /// True when a write of `bits` may go: every chunk it touches is saved.
    /// Otherwise queues the unsaved chunks that nobody asked for yet.
    pub fn admit(&mut self, bits: &Range<u64>) -> bool {
        let mut ok = true;
        for c in self.chunks_of(bits) {
            match self.state(c) {
                ChunkState::Saved => {}
                ChunkState::Pending => ok = false,
                ChunkState::None => {
                    ok = false;
                    if !self.urgent.contains(&c) {
                        self.urgent.push_back(c);
                    }
                }
            }
        }
        ok
    }
}

/// Copies in flight and the guest writes they must not cross.
#[derive(Debug, Default)]
pub struct Gate {
    busy: Vec<(Range<u64>, Copier)>,
    writes: Vec<(u64, Range<u64>)>,
    next_id: u64,
    /// The running export's map.
    pub export: Option<ExportMap>,
    /// A request was parked on the gate: wake the queues when it opens.
    pub parked: bool,
    /// A job waits on the condition variable for writes or copies to end.
    pub job_waits: bool,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl Gate {
    /// A copy of `bits` by `who` is in flight.
    pub fn hold(&mut self, bits: Range<u64>, who: Copier) {
        self.busy.push((bits, who));
    }

    /// The copy of `bits` is complete.
    pub fn release(&mut self, bits: &Range<u64>) {
        if let Some(i) = self.busy.iter().position(|(r, _)| r == bits) {
            self.busy.swap_remove(i);
        }
    }

    /// Some copy in flight overlaps `bits` (of `who`, if given).
    pub fn busy(&self, bits: &Range<u64>, who: Option<Copier>) -> bool {
        self.busy
            .iter()
            .any(|(r, w)| overlaps(r, bits) && who.is_none_or(|x| x == *w))
    }

    /// A guest write of `bits` is in flight: its ticket.
    pub fn register(&mut self, bits: Range<u64>) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.writes.push((self.next_id, bits));
        self.next_id
    }

    /// The write with `ticket` completed (data and, in writethrough mode,
    /// bits).
    pub fn unregister(&mut self, ticket: u64) {
        if let Some(i) = self.writes.iter().position(|(t, _)| *t == ticket) {
            self.writes.swap_remove(i);
        }
    }

    /// Some registered write overlaps `bits`.
    pub fn writing(&self, bits: &Range<u64>) -> bool {
        self.writes.iter().any(|(_, r)| overlaps(r, bits))
    }

    /// Registered writes in flight.
    pub fn writes(&self) -> usize {
        self.writes.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_writes_are_found_by_overlap_only() {
        let mut g = Gate::default();
        g.hold(8..9, Copier::CopyUp);
        assert!(g.busy(&(0..9), None));
        assert!(!g.busy(&(9..20), None));
        assert!(!g.busy(&(8..9), Some(Copier::Flatten)));
        let t = g.register(0..4);
        assert!(g.writing(&(3..5)));
        assert!(!g.writing(&(4..5)));
        g.unregister(t);
        assert!(!g.writing(&(3..5)));
        g.release(&(8..9));
        assert!(!g.busy(&(8..9), None));
    }

    #[test]
    fn an_export_admits_a_write_only_into_saved_chunks_and_asks_once() {
        let mut m = ExportMap::new(100, 16);
        assert_eq!(m.chunks(), 7);
        assert!(!m.admit(&(10..20)));
        assert!(!m.admit(&(12..13)));
        assert_eq!(m.urgent, [0, 1]);
        m.set(0, ChunkState::Pending);
        m.set(1, ChunkState::Saved);
        assert!(!m.admit(&(10..20)));
        m.set(0, ChunkState::Saved);
        assert!(m.admit(&(10..20)));
        assert!(m.admit(&(0..0)));
        assert_eq!(m.state(99), ChunkState::Saved);
    }
}
