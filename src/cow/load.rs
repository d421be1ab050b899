// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading a COW's on-disk bitmap into memory: only the parts of the file
//! that hold data (a fresh 1 TiB COW's 32 MiB bitmap is one hole), and the
//! number of bits set, counted from the bytes read.

use std::{fs::File, io, os::unix::fs::FileExt};

use super::{bitmap::Bitmap, header::Geometry};
use crate::engine::AtomicBytes;

/// Reads the on-disk bitmap into memory: a memfd (see
/// [`AtomicBytes::shared`]) that a live handover passes to the next daemon
/// instance as it is.
/// Returns it with the number of bits set in it.
pub fn load_bitmap(file: &File, g: &Geometry) -> io::Result<(Bitmap, u64)> {
    let too_large = || {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            "bitmap larger than the address space",
        )
    };
    // One bit per sector; bytes of the on-disk bitmap past the device hold
    // no sectors and are not read.
    let len = usize::try_from(g.nsect.div_ceil(8)).map_err(|_| too_large())?;
    let on_disk = usize::try_from(g.bitmap_len).map_err(|_| too_large())?;
    // Zero pages of the memfd take no memory until touched: a fresh (sparse)
    // COW of 1 TiB starts without reading or faulting in its 256 MiB of zeros.
    let (mem, bits) = AtomicBytes::shared("ubd-cow-bitmap", len, |bytes| {
        let read = bytes.get_mut(..on_disk.min(len)).unwrap_or_default();
        let spans = read_data_regions(file, read, g.bitmap_offset)?;
        // Bits set on disk, counted where data was read (holes are clear), a
        // word at a time: the crash journal checks it against what it saw.
        let counted: u64 = spans
            .iter()
            .filter_map(|r| read.get(r.clone()))
            .map(count_ones)
            .sum();
        // Bits of the last byte past the last sector do not count.
        let full = usize::try_from(g.nsect / 8).unwrap_or(usize::MAX);
        let partial = read.get(full).map_or(0, |&b| {
            let keep = (1u16 << (g.nsect % 8)).saturating_sub(1);
            u64::from((u16::from(b) & !keep).count_ones())
        });
        Ok(counted.saturating_sub(partial))
    })?;
    Ok((Bitmap::from_atomic(mem, g.nsect)?, bits))
}

/// Set bits in `bytes`, eight bytes at a time.
fn count_ones(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words
        .remainder()
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum();
    words
        .map(|w| {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            u64::from(u64::from_ne_bytes(a).count_ones())
        })
        .sum::<u64>()
        .saturating_add(tail)
}

/// Fills `buf` from `file` at `offset`, reading only the ranges that hold
/// data (`SEEK_DATA`/`SEEK_HOLE`); holes read as zeros, which `buf` holds
/// already. Falls back to one read where the file system cannot tell.
/// Returns the byte ranges of `buf` that were read (the rest is zero).
pub fn read_data_regions(
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<Vec<std::ops::Range<usize>>> {
    let mut spans = Vec::new();
    let end = offset.saturating_add(buf.len() as u64);
    let mut pos = offset;
    while pos < end {
        let data = match crate::engine::sys::seek_data_or_hole(file, pos, true) {
            Ok(Some(d)) => d,
            // No data at or after `pos`: the rest is a hole.
            Ok(None) => return Ok(spans),
            // SEEK_DATA unsupported here: read everything left.
            Err(_) => pos,
        };
        if data >= end {
            return Ok(spans);
        }
        let hole = crate::engine::sys::seek_data_or_hole(file, data, false)
            .ok()
            .flatten()
            .filter(|&h| h > data)
            .map_or(end, |h| h.min(end));
        let (Some(Ok(from)), Some(Ok(to))) = (
            data.checked_sub(offset).map(usize::try_from),
            hole.checked_sub(offset).map(usize::try_from),
        ) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bitmap range"));
        };
        let Some(dst) = buf.get_mut(from..to) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bitmap range"));
        };
        file.read_exact_at(dst, data)?;
        spans.push(from..to);
        pos = hole;
    }
    Ok(spans)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;
