// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading a COW's on-disk bitmap into memory: only the parts of the file
//! that hold data (a fresh 1 TiB COW's 32 MiB bitmap is one hole), and the
//! number of bits set, counted from the bytes read.

use std::{fs::File, io, os::unix::fs::FileExt};

use super::{bitmap::Bitmap, header::Geometry};

/// Reads the on-disk bitmap into memory.
/// Returns it with the number of bits set in it.
pub fn load_bitmap(file: &File, g: &Geometry) -> io::Result<(Bitmap, u64)> {
    let len = usize::try_from(g.bitmap_len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            "bitmap larger than the address space",
        )
    })?;
    // Zeroed lazily by the allocator: pages of the bitmap that stay clear
    // are never touched, so a fresh (sparse) COW of 1 TiB starts without
    // reading or faulting in its 256 MiB of zeros.
    let mut bytes = vec![0u8; len];
    let spans = read_data_regions(file, &mut bytes, g.bitmap_offset)?;
    // Bits set on disk, counted where data was read (holes are clear), a
    // word at a time (a full 1 TiB bitmap is 256 MiB): the crash journal
    // checks it against what it saw. Bits past the last sector do not count.
    let counted: u64 = spans
        .iter()
        .filter_map(|r| bytes.get(r.clone()))
        .map(count_ones)
        .sum();
    // Bytes past the device hold no sectors (unread bytes are zero).
    let full = usize::try_from(g.nsect / 8).unwrap_or(usize::MAX);
    let partial = bytes.get(full).map_or(0, |&b| {
        let keep = (1u16 << (g.nsect % 8)).saturating_sub(1);
        u64::from((u16::from(b) & !keep).count_ones())
    });
    let beyond = bytes.get(full.saturating_add(1)..).map_or(0, count_ones);
    let bits = counted.saturating_sub(partial.saturating_add(beyond));
    Ok((Bitmap::from_bytes(bytes, g.nsect), bits))
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
