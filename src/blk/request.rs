// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pure virtio-blk request parsing: a descriptor chain becomes a typed
//! [`BlkRequest`], or a [`BadRequest`] that says whether a status byte can
//! still be written (R8).
//!
//! Any descriptor layout is accepted (virtio 1.x section 2.7.4.1): the
//! device-readable bytes are the 16-byte header followed by the request
//! payload (write data, discard ranges); the device-writable bytes are the
//! response data (read data, the id) followed by the one status byte. All
//! arithmetic on guest values is checked; nothing here panics on guest
//! input.
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes per virtio-blk sector.
pub const SECTOR: u64 = 512;
/// Size of the request header.
pub const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes range.
pub const RANGE_LEN: u32 = 16;
/// Status: success.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status: I/O error.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status: unsupported.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Write-zeroes flag: the device may deallocate.
pub const WZ_UNMAP: u32 = 1;

/// A guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Bytes.
    pub len: u32,
}

/// Request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush.
    Flush,
    /// Device id.
    GetId,
    /// Discard.
    Discard,
    /// Write zeroes.
    WriteZeroes,
    /// Anything else (answered with UNSUPP).
    Unsupported(u32),
}

impl RequestType {
    fn from_u32(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// One discard / write-zeroes range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// Flags (`WZ_UNMAP`).
    pub flags: u32,
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// Type.
    pub rtype: RequestType,
    /// Sector from the header.
    pub sector: u64,
    /// Payload buffers: read destination (In, GetId) or write source (Out).
    pub data: Vec<Seg>,
    /// Total payload bytes.
    pub data_len: u64,
    /// Ranges (Discard, WriteZeroes).
    pub ranges: Vec<Range>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// No device-writable byte for the status.
    #[error("no writable status byte")]
    NoStatus,
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one")]
    Order,
    /// Fewer than 16 readable bytes.
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    /// A buffer lies outside guest memory.
    #[error("buffer outside guest memory")]
    BadAddress,
    /// Lengths overflow.
    #[error("buffer lengths overflow")]
    Overflow,
    /// Payload in the wrong direction for the type.
    #[error("payload in the wrong direction for the request type")]
    Direction,
    /// Read/write length not a multiple of 512.
    #[error("data length not a multiple of 512")]
    Unaligned,
    /// Discard/write-zeroes payload not a whole number of ranges.
    #[error("bad discard/write-zeroes payload")]
    BadRanges,
}

/// A chain that cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// What is wrong.
    pub error: ParseError,
    /// The status byte, if one exists (then answer IOERR there).
    pub status: Option<GuestAddress>,
}

fn add(a: GuestAddress, off: u32) -> Result<GuestAddress, ParseError> {
    a.0.checked_add(u64::from(off))
        .map(GuestAddress)
        .ok_or(ParseError::Overflow)
}

/// Drops `n` bytes from the front of a buffer list.
fn skip_front(segs: &mut Vec<Seg>, mut n: u32) -> Result<(), ParseError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs.iter() {
        if n >= s.len {
            n = n.checked_sub(s.len).ok_or(ParseError::Overflow)?;
        } else {
            out.push(Seg {
                addr: add(s.addr, n)?,
                len: s.len.checked_sub(n).ok_or(ParseError::Overflow)?,
            });
            n = 0;
        }
    }
    *segs = out;
    Ok(())
}

fn total(segs: &[Seg]) -> Result<u64, ParseError> {
    segs.iter()
        .try_fold(0u64, |t, s| t.checked_add(u64::from(s.len)))
        .ok_or(ParseError::Overflow)
}

/// Copies `buf.len()` bytes from the front of a buffer list.
fn read_front<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    buf: &mut [u8],
) -> Result<(), ParseError> {
    let mut done = 0usize;
    for s in segs {
        if done >= buf.len() {
            break;
        }
        let want = buf.len().saturating_sub(done).min(s.len as usize);
        let dst = buf
            .get_mut(done..done.saturating_add(want))
            .ok_or(ParseError::Overflow)?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| ParseError::BadAddress)?;
        done = done.saturating_add(want);
    }
    if done < buf.len() {
        return Err(ParseError::ShortHeader);
    }
    Ok(())
}

/// Parses a chain given as `(address, length, device_writable)` triples.
pub fn parse<M, I>(descriptors: I, mem: &M) -> Result<BlkRequest, BadRequest>
where
    M: GuestMemoryBackend,
    I: IntoIterator<Item = (GuestAddress, u32, bool)>,
{
    let mut readable = Vec::new();
    let mut writable: Vec<Seg> = Vec::new();
    let mut order_error = false;
    for (addr, len, w) in descriptors {
        if len == 0 {
            continue;
        }
        if w {
            writable.push(Seg { addr, len });
        } else if !writable.is_empty() {
            order_error = true;
        } else {
            readable.push(Seg { addr, len });
        }
    }
    // The status byte: the last writable byte.
    let status = match writable.last_mut() {
        None => {
            return Err(BadRequest {
                error: ParseError::NoStatus,
                status: None,
            })
        }
        Some(last) => {
            let off = last.len.saturating_sub(1);
            let a = add(last.addr, off).map_err(|e| BadRequest {
                error: e,
                status: None,
            })?;
            last.len = off;
            a
        }
    };
    if !mem.check_range(status, 1) {
        return Err(BadRequest {
            error: ParseError::BadAddress,
            status: None,
        });
    }
    writable.retain(|s| s.len > 0);
    let bad = |error| BadRequest {
        error,
        status: Some(status),
    };
    if order_error {
        return Err(bad(ParseError::Order));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_front(mem, &readable, &mut header).map_err(bad)?;
    skip_front(&mut readable, HEADER_LEN).map_err(bad)?;
    let mut t = [0u8; 4];
    let mut s = [0u8; 8];
    t.copy_from_slice(header.get(0..4).unwrap_or(&[0; 4]));
    s.copy_from_slice(header.get(8..16).unwrap_or(&[0; 8]));
    let rtype = RequestType::from_u32(u32::from_le_bytes(t));
    let sector = u64::from_le_bytes(s);
    let mut req = BlkRequest {
        rtype,
        sector,
        data: Vec::new(),
        data_len: 0,
        ranges: Vec::new(),
        status,
    };
    match rtype {
        RequestType::In | RequestType::GetId => {
            if !readable.is_empty() {
                return Err(bad(ParseError::Direction));
            }
            req.data_len = total(&writable).map_err(bad)?;
            req.data = writable;
            if rtype == RequestType::In && req.data_len.checked_rem(SECTOR) != Some(0) {
                return Err(bad(ParseError::Unaligned));
            }
        }
        RequestType::Out => {
            if !writable.is_empty() {
                return Err(bad(ParseError::Direction));
            }
            req.data_len = total(&readable).map_err(bad)?;
            req.data = readable;
            if req.data_len.checked_rem(SECTOR) != Some(0) {
                return Err(bad(ParseError::Unaligned));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if !writable.is_empty() {
                return Err(bad(ParseError::Direction));
            }
            let len = total(&readable).map_err(bad)?;
            if len == 0
                || len.checked_rem(u64::from(RANGE_LEN)) != Some(0)
                || len > 64 * u64::from(RANGE_LEN)
            {
                return Err(bad(ParseError::BadRanges));
            }
            let mut raw = vec![0u8; usize::try_from(len).map_err(|_| bad(ParseError::Overflow))?];
            read_front(mem, &readable, &mut raw).map_err(bad)?;
            for r in raw.chunks_exact(RANGE_LEN as usize) {
                let mut a = [0u8; 8];
                let mut b = [0u8; 4];
                let mut c = [0u8; 4];
                a.copy_from_slice(r.get(0..8).unwrap_or(&[0; 8]));
                b.copy_from_slice(r.get(8..12).unwrap_or(&[0; 4]));
                c.copy_from_slice(r.get(12..16).unwrap_or(&[0; 4]));
                req.ranges.push(Range {
                    sector: u64::from_le_bytes(a),
                    num_sectors: u32::from_le_bytes(b),
                    flags: u32::from_le_bytes(c),
                });
            }
        }
        RequestType::Flush | RequestType::Unsupported(_) => {}
    }
    Ok(req)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {

    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
        m.write_slice(&t.to_le_bytes(), GuestAddress(at)).unwrap();
        m.write_slice(&sector.to_le_bytes(), GuestAddress(at + 8))
            .unwrap();
    }

    #[test]
    fn read_with_separate_descriptors() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_IN, 7);
        let r = parse(
            [
                (GuestAddress(0), 16, false),
                (GuestAddress(0x1000), 1024, true),
                (GuestAddress(0x2000), 1, true),
            ],
            &m,
        )
        .unwrap();
        assert_eq!(r.rtype, RequestType::In);
        assert_eq!(
            (r.sector, r.data_len, r.status),
            (7, 1024, GuestAddress(0x2000))
        );
        assert_eq!(
            r.data,
            vec![Seg {
                addr: GuestAddress(0x1000),
                len: 1024
            }]
        );
    }

    #[test]
    fn any_layout_header_split_and_status_in_the_data_descriptor() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 3);
        // Header split over two descriptors, data right after it in the
        // second; status as the last byte of a writable descriptor.
        let r = parse(
            [
                (GuestAddress(0x100), 10, false),
                (GuestAddress(0x10a), 6 + 512, false),
                (GuestAddress(0x3000), 1, true),
            ],
            &m,
        )
        .unwrap();
        assert_eq!((r.rtype, r.sector, r.data_len), (RequestType::Out, 3, 512));
        assert_eq!(
            r.data,
            vec![Seg {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );
        header(&m, 0, VIRTIO_BLK_T_IN, 0);
        let r = parse(
            [
                (GuestAddress(0), 16, false),
                (GuestAddress(0x1000), 513, true),
            ],
            &m,
        )
        .unwrap();
        assert_eq!((r.data_len, r.status), (512, GuestAddress(0x1200)));
    }

    #[test]
    fn malformed_chains_say_where_the_status_goes() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_IN, 0);
        let e = parse([(GuestAddress(0), 16, false)], &m).unwrap_err();
        assert_eq!(
            e,
            BadRequest {
                error: ParseError::NoStatus,
                status: None
            }
        );
        let e = parse(
            [(GuestAddress(0), 8, false), (GuestAddress(0x100), 1, true)],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::ShortHeader);
        assert_eq!(e.status, Some(GuestAddress(0x100)));
        let e = parse(
            [
                (GuestAddress(0), 16, false),
                (GuestAddress(0x100), 100, true),
                (GuestAddress(0x200), 1, true),
            ],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::Unaligned);
        let e = parse(
            [
                (GuestAddress(0), 16, false),
                (GuestAddress(0x100), 512, true),
                (GuestAddress(0x300), 512, false),
                (GuestAddress(0x200), 1, true),
            ],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::Order);
        // Status outside guest memory: nothing can be written.
        let e = parse(
            [
                (GuestAddress(0), 16, false),
                (GuestAddress(0x20000), 1, true),
            ],
            &m,
        )
        .unwrap_err();
        assert_eq!(
            e,
            BadRequest {
                error: ParseError::BadAddress,
                status: None
            }
        );
        // Header outside guest memory.
        let e = parse(
            [
                (GuestAddress(0x20000), 16, false),
                (GuestAddress(0x100), 1, true),
            ],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::BadAddress);
        // Write with writable payload.
        header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let e = parse(
            [
                (GuestAddress(0), 16, false),
                (GuestAddress(0x100), 512, true),
                (GuestAddress(0x400), 1, true),
            ],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::Direction);
        // Huge lengths do not overflow.
        let e = parse(
            [
                (GuestAddress(u64::MAX - 4), u32::MAX, false),
                (GuestAddress(0x100), 1, true),
            ],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::BadAddress);
    }

    #[test]
    fn discard_ranges_and_unknown_types() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        m.write_slice(&80u64.to_le_bytes(), GuestAddress(16))
            .unwrap();
        m.write_slice(&16u32.to_le_bytes(), GuestAddress(24))
            .unwrap();
        m.write_slice(&1u32.to_le_bytes(), GuestAddress(28))
            .unwrap();
        let r = parse(
            [(GuestAddress(0), 32, false), (GuestAddress(0x100), 1, true)],
            &m,
        )
        .unwrap();
        assert_eq!(
            r.ranges,
            vec![Range {
                sector: 80,
                num_sectors: 16,
                flags: 1
            }]
        );
        let e = parse(
            [(GuestAddress(0), 24, false), (GuestAddress(0x100), 1, true)],
            &m,
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::BadRanges);
        header(&m, 0, 99, 0);
        let r = parse(
            [(GuestAddress(0), 16, false), (GuestAddress(0x100), 1, true)],
            &m,
        )
        .unwrap();
        assert_eq!(r.rtype, RequestType::Unsupported(99));
    }
}
