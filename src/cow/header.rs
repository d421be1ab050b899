// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The UML ubd COW header: parse V1, V2, V3 and the broken 64-bit V3 layout
//! ("V3_b"), write V3 byte-identical to `uml_mkcow`, and derive the geometry.
//!
//! Format only: no I/O policy lives here. Every field that comes from a file
//! is validated and every computation on it is checked, so a corrupt or
//! truncated header is an [`HeaderError`] naming the field, never a panic.
//! The layouts are those of `docs/ubd-cow-format.md` section 2.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The COW magic, `"OOOM"` when stored big-endian.
pub const COW_MAGIC: u32 = 0x4F4F_4F4D;
/// The only sector size UML can use.
pub const SECTOR_SIZE: u32 = 512;
/// Alignment written by `uml_mkcow` on x86-64 (the host page size).
pub const DEFAULT_ALIGNMENT: u32 = 4096;
/// Length of a V3 header.
pub const V3_HEADER_LEN: usize = 4128;
/// Length of a V3_b header (the unpacked 64-bit layout).
pub const V3B_HEADER_LEN: usize = 4136;
/// Length of a V2 header.
pub const V2_HEADER_LEN: usize = 4120;
/// Length of a V1 header.
pub const V1_HEADER_LEN: usize = 280;
/// Bytes needed to recognise and parse any version.
pub const MAX_HEADER_LEN: usize = V3B_HEADER_LEN;
/// Size of the backing-path field in V2 and V3 headers (NUL included).
pub const PATH_FIELD_LEN: usize = 4096;
/// Size of the backing-path field in V1 headers (NUL included).
pub const V1_PATH_FIELD_LEN: usize = 256;
/// Largest alignment accepted when reading (1 GiB): anything larger is a
/// corrupt header, not a real file.
pub const MAX_ALIGNMENT: u32 = 1 << 30;
/// Largest COW sector (bytes one bitmap bit covers) accepted. `uml_moo`
/// honours the header's sector size; the UML kernel driver assumes 512.
pub const MAX_SECTOR_SIZE: u32 = 64 * 1024;
/// UML and `uml_moo` keep offsets in a C `int`.
pub const UML_MAX_DATA_OFFSET: u64 = (1 << 31) - 1;

/// A header that cannot be used, with the field at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header of the detected version.
    #[error("header truncated: {version} needs {needed} bytes, the file has {got}")]
    Truncated {
        /// The version detected from the magic and version words.
        version: &'static str,
        /// Bytes the header needs.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The first word is not the COW magic in either byte order.
    #[error("not a UML COW file: magic is {found:#010x}, expected {COW_MAGIC:#010x} in either byte order")]
    BadMagic {
        /// The word found at offset 0 (big-endian reading).
        found: u32,
    },
    /// A version other than 1, 2 or 3.
    #[error("field 'version' is {0}: only COW versions 1, 2 and 3 exist")]
    BadVersion(u32),
    /// The backing path has no NUL terminator inside its field.
    #[error("field 'backing_file' is not NUL-terminated within its {0} bytes")]
    PathNotTerminated(usize),
    /// The backing path is empty.
    #[error("field 'backing_file' is empty")]
    PathEmpty,
    /// Sector size other than 512.
    #[error(
        "field 'sectorsize' is {0}: a COW sector is a power of two from 512 to {MAX_SECTOR_SIZE} \
         bytes (UML's kernel driver only works with 512)"
    )]
    BadSectorSize(u32),
    /// Alignment zero or implausibly large.
    #[error("field 'alignment' is {0}: must be between 1 and {MAX_ALIGNMENT}")]
    BadAlignment(u32),
    /// Geometry does not fit in 64 bits.
    #[error("field 'size' is {0}: the geometry overflows")]
    SizeOverflow(u64),
    /// The backing path is too long to store.
    #[error("backing path is {0} bytes long: at most {max} fit in a V3 header", max = PATH_FIELD_LEN - 1)]
    PathTooLong(usize),
}

/// Header versions this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CowVersion {
    /// Ancient, host byte order, 256-byte path.
    V1,
    /// Legacy, big-endian, path first.
    V2,
    /// Current: what `uml_mkcow` and UML write.
    V3,
    /// V3 written by pre-2006 64-bit builds with 4 bytes of padding after mtime.
    V3Broken,
}

impl CowVersion {
    /// Name used in messages and `info` output.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "V1",
            Self::V2 => "V2",
            Self::V3 => "V3",
            Self::V3Broken => "V3_b",
        }
    }

    /// Bytes the header occupies.
    pub fn header_len(self) -> usize {
        match self {
            Self::V1 => V1_HEADER_LEN,
            Self::V2 => V2_HEADER_LEN,
            Self::V3 => V3_HEADER_LEN,
            Self::V3Broken => V3B_HEADER_LEN,
        }
    }
}

/// A parsed and validated COW header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowHeader {
    /// Which layout the file uses.
    pub version: CowVersion,
    /// The backing file path exactly as stored (bytes up to the first NUL).
    pub backing_file: PathBuf,
    /// Backing file mtime in seconds (32 bits, as stored).
    pub mtime: u32,
    /// Backing file size in bytes.
    pub size: u64,
    /// Bytes one bitmap bit covers (a power of two, 512 to
    /// [`MAX_SECTOR_SIZE`]; UML's kernel driver only handles 512).
    pub sectorsize: u32,
    /// Alignment of the bitmap and data areas.
    pub alignment: u32,
    /// `cow_format` (V3 only; 0 = plain bitmap; ignored by UML).
    pub cow_format: u32,
}

/// Where the regions of a COW file lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    /// COW sectors (bits of the bitmap): `ceil(size / sectorsize)`.
    pub nsect: u64,
    /// Bytes one bit covers (the header's `sectorsize`).
    pub sectorsize: u32,
    /// File offset of the bitmap.
    pub bitmap_offset: u64,
    /// Bytes of the on-disk bitmap.
    pub bitmap_len: u64,
    /// File offset of sector 0's data.
    pub data_offset: u64,
    /// Backing size in bytes.
    pub size: u64,
}

impl Geometry {
    /// 512-byte sectors of the device: `ceil(size / 512)` (R7).
    pub fn disk_sectors(&self) -> u64 {
        self.size.div_ceil(u64::from(SECTOR_SIZE))
    }

    /// log2 of the 512-byte sectors one COW sector (bit) covers: 0 for the
    /// 512-byte sectors UML uses, 3 for 4096.
    pub fn shift(&self) -> u32 {
        (self.sectorsize / SECTOR_SIZE).trailing_zeros()
    }

    /// The COW sectors (bits) that 512-byte sectors `r` touch.
    pub fn bits_of(&self, r: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let k = 1u64 << self.shift();
        (r.start >> self.shift())..r.end.div_ceil(k)
    }

    /// The 512-byte sectors of COW sectors (bits) `b`, clipped to the disk.
    pub fn sectors_of(&self, b: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let end = self.disk_sectors();
        (b.start << self.shift()).min(end)..(b.end << self.shift()).min(end)
    }

    /// COW sectors (bits) whose bit fits in the on-disk bitmap. Equal to `nsect` for
    /// V3; V1/V2 round the bitmap length down and may hold fewer bits.
    pub fn bitmap_sectors(&self) -> u64 {
        self.nsect.min(self.bitmap_len.saturating_mul(8))
    }

    /// File length `uml_mkcow` creates: `data_offset + size`.
    pub fn initial_file_len(&self) -> u64 {
        self.data_offset.saturating_add(self.size)
    }

    /// File offset of a 512-byte sector's data (caller guarantees `sector <
    /// disk_sectors()`): the data area is byte-linear whatever the COW
    /// sector size.
    pub fn data_pos(&self, sector: u64) -> u64 {
        self.data_offset
            .saturating_add(sector.saturating_mul(u64::from(SECTOR_SIZE)))
    }
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(off..off.saturating_add(4)) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(off..off.saturating_add(8)) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

fn ne32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(off..off.saturating_add(4)) {
        w.copy_from_slice(s);
    }
    u32::from_ne_bytes(w)
}

fn ne64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(off..off.saturating_add(8)) {
        w.copy_from_slice(s);
    }
    u64::from_ne_bytes(w)
}

fn path_field(b: &[u8], off: usize, len: usize) -> Result<PathBuf, HeaderError> {
    use std::os::unix::ffi::OsStrExt;
    let field = b
        .get(off..off.saturating_add(len))
        .ok_or(HeaderError::PathNotTerminated(len))?;
    let nul = field
        .iter()
        .position(|&c| c == 0)
        .ok_or(HeaderError::PathNotTerminated(len))?;
    let bytes = field.get(..nul).unwrap_or_default();
    if bytes.is_empty() {
        return Err(HeaderError::PathEmpty);
    }
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// True when `buf` starts with the COW magic in either byte order (what UML
/// checks to decide whether a file is a COW file at all).
pub fn has_cow_magic(buf: &[u8]) -> bool {
    buf.len() >= 4 && {
        let w = ne32(buf, 0);
        w == COW_MAGIC || w.swap_bytes() == COW_MAGIC
    }
}

fn round_up(x: u64, align: u64) -> Option<u64> {
    if align == 0 {
        return None;
    }
    x.checked_next_multiple_of(align)
}

impl CowHeader {
    /// Parses a header from the first bytes of a file (`buf` may be shorter
    /// than [`MAX_HEADER_LEN`] only when the file is).
    pub fn parse(buf: &[u8]) -> Result<Self, HeaderError> {
        if buf.len() < 8 {
            return Err(HeaderError::Truncated {
                version: "any",
                needed: 8,
                got: buf.len(),
            });
        }
        let magic = ne32(buf, 0);
        let swapped = if magic == COW_MAGIC {
            false
        } else if magic.swap_bytes() == COW_MAGIC {
            true
        } else {
            return Err(HeaderError::BadMagic {
                found: be32(buf, 0),
            });
        };
        let raw_version = ne32(buf, 4);
        let version_word = if swapped {
            raw_version.swap_bytes()
        } else {
            raw_version
        };
        let version = match version_word {
            1 => CowVersion::V1,
            2 => CowVersion::V2,
            3 => {
                // A zero word at offset 32 is cow_format of the unpacked
                // layout; in a real V3 it is the start of a non-empty path.
                if buf.get(32..36).is_some_and(|w| w == [0, 0, 0, 0]) {
                    CowVersion::V3Broken
                } else {
                    CowVersion::V3
                }
            }
            other => return Err(HeaderError::BadVersion(other)),
        };
        let needed = version.header_len();
        if buf.len() < needed {
            return Err(HeaderError::Truncated {
                version: version.name(),
                needed,
                got: buf.len(),
            });
        }
        let header = match version {
            CowVersion::V3 => Self {
                version,
                mtime: be32(buf, 8),
                size: be64(buf, 12),
                sectorsize: be32(buf, 20),
                alignment: be32(buf, 24),
                cow_format: ne32(buf, 28),
                backing_file: path_field(buf, 32, PATH_FIELD_LEN)?,
            },
            CowVersion::V3Broken => Self {
                version,
                mtime: be32(buf, 8),
                size: be64(buf, 16),
                sectorsize: be32(buf, 24),
                alignment: be32(buf, 28),
                cow_format: ne32(buf, 32),
                backing_file: path_field(buf, 36, PATH_FIELD_LEN)?,
            },
            CowVersion::V2 => {
                let sectorsize = be32(buf, 4116);
                Self {
                    version,
                    backing_file: path_field(buf, 8, PATH_FIELD_LEN)?,
                    mtime: be32(buf, 4104),
                    size: be64(buf, 4108),
                    sectorsize,
                    alignment: sectorsize,
                    cow_format: 0,
                }
            }
            CowVersion::V1 => {
                // V1 fields are read raw, in the reader's byte order,
                // whatever order the magic was found in (as UML does).
                let sectorsize = ne32(buf, 276);
                Self {
                    version,
                    backing_file: path_field(buf, 8, V1_PATH_FIELD_LEN)?,
                    mtime: ne32(buf, 264),
                    size: ne64(buf, 268),
                    sectorsize,
                    alignment: sectorsize,
                    cow_format: 0,
                }
            }
        };
        header.validate()?;
        Ok(header)
    }

    fn validate(&self) -> Result<(), HeaderError> {
        if !self.sectorsize.is_power_of_two()
            || self.sectorsize < SECTOR_SIZE
            || self.sectorsize > MAX_SECTOR_SIZE
        {
            return Err(HeaderError::BadSectorSize(self.sectorsize));
        }
        if self.alignment == 0 || self.alignment > MAX_ALIGNMENT {
            return Err(HeaderError::BadAlignment(self.alignment));
        }
        self.geometry().map(|_| ())
    }

    /// Derives the file layout (section 3 of the format document).
    pub fn geometry(&self) -> Result<Geometry, HeaderError> {
        let overflow = HeaderError::SizeOverflow(self.size);
        let ss = u64::from(self.sectorsize);
        if ss == 0 {
            return Err(HeaderError::BadSectorSize(0));
        }
        let al = u64::from(self.alignment);
        let nsect = self.size.div_ceil(ss);
        let (bitmap_offset, bitmap_len, data_align) = match self.version {
            CowVersion::V3 | CowVersion::V3Broken => {
                let hdr = self.version.header_len() as u64;
                (
                    round_up(hdr, al).ok_or(HeaderError::BadAlignment(self.alignment))?,
                    nsect.div_ceil(8),
                    al,
                )
            }
            // The V1/V2 "rounding bug": floor((size + ss - 1) / (8 * ss)).
            CowVersion::V1 | CowVersion::V2 => (
                self.version.header_len() as u64,
                self.size
                    .checked_add(ss.saturating_sub(1))
                    .and_then(|v| v.checked_div(ss.checked_mul(8)?))
                    .ok_or(overflow)?,
                ss,
            ),
        };
        let data_offset = bitmap_offset
            .checked_add(bitmap_len)
            .and_then(|end| round_up(end, data_align))
            .ok_or(HeaderError::SizeOverflow(self.size))?;
        data_offset
            .checked_add(self.size)
            .and_then(|end| end.checked_add(ss))
            .ok_or(HeaderError::SizeOverflow(self.size))?;
        Ok(Geometry {
            nsect,
            sectorsize: self.sectorsize,
            bitmap_offset,
            bitmap_len,
            data_offset,
            size: self.size,
        })
    }

    /// A V3 header as `uml_mkcow` writes it (`backing_file` must already be
    /// the absolute path to store).
    pub fn new_v3(
        backing_file: &Path,
        mtime: u32,
        size: u64,
        alignment: u32,
        sectorsize: u32,
    ) -> Result<Self, HeaderError> {
        use std::os::unix::ffi::OsStrExt;
        let len = backing_file.as_os_str().as_bytes().len();
        if len == 0 {
            return Err(HeaderError::PathEmpty);
        }
        if len >= PATH_FIELD_LEN {
            return Err(HeaderError::PathTooLong(len));
        }
        let header = Self {
            version: CowVersion::V3,
            backing_file: backing_file.to_path_buf(),
            mtime,
            size,
            sectorsize,
            alignment,
            cow_format: 0,
        };
        header.validate()?;
        Ok(header)
    }

    /// Serialises as V3: big-endian fields, zero-filled path field.
    pub fn to_v3_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        use std::os::unix::ffi::OsStrExt;
        let path = self.backing_file.as_os_str().as_bytes();
        if path.len() >= PATH_FIELD_LEN {
            return Err(HeaderError::PathTooLong(path.len()));
        }
        let mut out = Vec::with_capacity(V3_HEADER_LEN);
        out.extend_from_slice(&COW_MAGIC.to_be_bytes());
        out.extend_from_slice(&3u32.to_be_bytes());
        out.extend_from_slice(&self.mtime.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.sectorsize.to_be_bytes());
        out.extend_from_slice(&self.alignment.to_be_bytes());
        out.extend_from_slice(&self.cow_format.to_ne_bytes());
        out.extend_from_slice(path);
        out.resize(V3_HEADER_LEN, 0);
        Ok(out)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;
