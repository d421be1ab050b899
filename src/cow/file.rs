// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Creating and opening COW files: the header, the backing-file checks and
//! the locks (R6). No I/O policy: the write path lives in `disk::cow`.
//!
//! Invariant (R6): the backing file is opened read-only and never written;
//! its size and mtime must equal the header's. The COW file carries an OFD
//! write lock and the backing file an OFD read lock, which conflict with the
//! classic POSIX locks UML takes, so a COW in use by a UML guest or another
//! daemon is refused.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::engine::sys::LockHolder;

use super::{
    bitmap::Bitmap,
    header::{has_cow_magic, CowHeader, Geometry, HeaderError, MAX_HEADER_LEN},
};

/// Why a COW file could not be created or opened. Every message names the
/// file and says what to do.
#[derive(Debug, Error)]
pub enum CowFileError {
    /// The COW file could not be opened.
    #[error("cannot open COW file {path}: {source}")]
    Open {
        /// The COW file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the header or bitmap failed.
    #[error("cannot read {what} of COW file {path}: {source}")]
    Read {
        /// The COW file.
        path: PathBuf,
        /// "header" or "bitmap".
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The header is corrupt.
    #[error("COW file {path} has a bad header: {source}")]
    Header {
        /// The COW file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HeaderError,
    },
    /// The file is not a COW file at all.
    #[error("{path} is not a UML COW file (no COW magic); serve it with --raw if it is a plain disk image")]
    NotCow {
        /// The file.
        path: PathBuf,
    },
    /// The bitmap area lies past the end of the file.
    #[error("COW file {path} is truncated: its bitmap ends at byte {need} but the file has {have} bytes")]
    BitmapTruncated {
        /// The COW file.
        path: PathBuf,
        /// End of the bitmap.
        need: u64,
        /// File length.
        have: u64,
    },
    /// The backing file could not be opened.
    #[error("cannot open backing file {backing} of COW file {cow}: {source}")]
    OpenBacking {
        /// The COW file.
        cow: PathBuf,
        /// The backing file.
        backing: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing file's size differs from the header's.
    #[error(
        "backing file {backing} has size {actual} but COW file {cow} was made for size {header}: \
         the base was modified after the COW was made. Restore the original base image, or \
         recreate the COW (its contents are lost)"
    )]
    BackingSize {
        /// The COW file.
        cow: PathBuf,
        /// The backing file.
        backing: PathBuf,
        /// Size in the header.
        header: u64,
        /// Size on disk.
        actual: u64,
    },
    /// The backing file's mtime differs from the header's.
    #[error(
        "backing file {backing} has mtime {actual} but COW file {cow} recorded mtime {header}: \
         the base was modified (or touched) after the COW was made. Restore the original base \
         image (or its mtime, `touch -d @{header}` if its contents are unchanged), or recreate \
         the COW (its contents are lost)"
    )]
    BackingMtime {
        /// The COW file.
        cow: PathBuf,
        /// The backing file.
        backing: PathBuf,
        /// mtime in the header.
        header: u64,
        /// mtime on disk.
        actual: i64,
    },
    /// Another process holds a conflicting lock.
    #[error(
        "{role} {path} is locked by {holder}: it is in use by another vhost-user-ubd, a UML guest \
         or another tool. Stop that user first, or use another COW file"
    )]
    Locked {
        /// "COW file" or "backing file".
        role: &'static str,
        /// The locked file.
        path: PathBuf,
        /// Who holds it, as far as the kernel says.
        holder: String,
        /// The holder is an open file description (another vhost-user-ubd,
        /// possibly one that just died: its in-flight I/O keeps the
        /// description, and so the lock, until it completes).
        ofd: bool,
    },
    /// Taking a lock failed for another reason.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating the COW file failed.
    #[error("cannot create COW file {path}: {source}")]
    Create {
        /// The COW file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing file cannot back a COW.
    #[error("cannot create COW file {path} over {backing}: {reason}")]
    BadBacking {
        /// The COW file.
        path: PathBuf,
        /// The backing file.
        backing: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Takes a whole-file OFD lock (`F_RDLCK` or `F_WRLCK`) without waiting.
pub fn ofd_lock(
    file: &File,
    path: &Path,
    write: bool,
    role: &'static str,
) -> Result<(), CowFileError> {
    match crate::engine::sys::ofd_lock(file, write) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(holder)) => {
            let (holder, ofd) = match holder {
                LockHolder::Posix(pid) => {
                    (format!("process {pid} (a POSIX lock, e.g. UML)"), false)
                }
                LockHolder::Ofd => (
                    "another open file description (an OFD lock, e.g. another vhost-user-ubd)"
                        .into(),
                    true,
                ),
            };
            Err(CowFileError::Locked {
                role,
                path: path.to_path_buf(),
                holder,
                ofd,
            })
        }
        Err(source) => Err(CowFileError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The absolute path `uml_mkcow` stores: the directory part resolved
/// physically (as `chdir` + `getcwd` do), the last component kept as given.
pub fn uml_absolute_path(backing: &Path) -> io::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = backing.as_os_str().as_bytes();
    match bytes.iter().rposition(|&c| c == b'/') {
        None => Ok(std::env::current_dir()?.join(backing)),
        Some(pos) => {
            let (dir, name) = bytes.split_at(pos);
            let name = std::ffi::OsStr::from_bytes(name.get(1..).unwrap_or_default());
            let dir = if dir.is_empty() {
                PathBuf::from("/")
            } else {
                std::fs::canonicalize(std::ffi::OsStr::from_bytes(dir))?
            };
            Ok(if dir == Path::new("/") {
                let mut p = PathBuf::from("/");
                p.push(name);
                p
            } else {
                let mut s = dir.into_os_string();
                s.push("/");
                s.push(name);
                PathBuf::from(s)
            })
        }
    }
}

/// Creates a COW file over `backing` exactly as `uml_mkcow` does: a V3
/// header, then one zero byte at `data_offset + size - 1` (a sparse file).
/// Fails if `path` exists.
pub fn create_cow(path: &Path, backing: &Path, alignment: u32) -> Result<CowHeader, CowFileError> {
    let bad = |reason: String| CowFileError::BadBacking {
        path: path.to_path_buf(),
        backing: backing.to_path_buf(),
        reason,
    };
    let abs = uml_absolute_path(backing).map_err(|e| bad(e.to_string()))?;
    let meta = std::fs::metadata(&abs).map_err(|e| bad(format!("{}: {e}", abs.display())))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(bad("not a regular file".into()));
    }
    if meta.size() == 0 {
        return Err(bad("the backing file is empty".into()));
    }
    // UML stores the low 32 bits of st_mtime.
    let mtime = meta.mtime() as u32;
    let header =
        CowHeader::new_v3(&abs, mtime, meta.size(), alignment).map_err(|e| bad(e.to_string()))?;
    let geometry = header.geometry().map_err(|e| bad(e.to_string()))?;
    let bytes = header.to_v3_bytes().map_err(|e| bad(e.to_string()))?;
    let create = |e: io::Error| CowFileError::Create {
        path: path.to_path_buf(),
        source: e,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(create)?;
    let result = (|| {
        file.write_all_at(&bytes, 0)?;
        file.write_all_at(&[0], geometry.initial_file_len().saturating_sub(1))?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(create(e));
    }
    Ok(header)
}

use std::os::unix::fs::FileTypeExt;

/// How to open a COW file.
#[derive(Clone, Debug, Default)]
pub struct OpenCow {
    /// Serve read-only: no write lock, COW opened `O_RDONLY`.
    pub readonly: bool,
    /// Backing file to use instead of the header's path (must be the same
    /// file or pass the same size/mtime check).
    pub backing: Option<PathBuf>,
    /// Open the data descriptors with `O_DIRECT`.
    pub direct: bool,
    /// Skip locking (for `info` on a COW in use).
    pub no_lock: bool,
    /// How long to wait for an OFD lock held by another open file
    /// description. A daemon killed with -9 keeps its lock until the kernel
    /// has finished (or cancelled) the I/O it had in flight, which can
    /// outlive the process by a few milliseconds to seconds; a restarted
    /// daemon waits for that instead of failing. POSIX holders (UML) are
    /// not waited for.
    pub lock_wait: std::time::Duration,
}

/// Takes the OFD lock, waiting up to `wait` while another open file
/// description holds it.
fn ofd_lock_waiting(
    file: &File,
    path: &Path,
    write: bool,
    role: &'static str,
    wait: std::time::Duration,
) -> Result<(), CowFileError> {
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        match ofd_lock(file, path, write, role) {
            Err(CowFileError::Locked { ofd: true, .. }) if start.elapsed() < wait => {
                if !told {
                    log::info!(
                        "{role} {}: locked by another open file description; waiting up to {} s \
                         (a daemon that just died keeps its lock until its in-flight I/O ends)",
                        path.display(),
                        wait.as_secs()
                    );
                    told = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(()) => {
                if told {
                    log::info!(
                        "{role} {}: lock taken after {} ms",
                        path.display(),
                        start.elapsed().as_millis()
                    );
                }
                return Ok(());
            }
            other => return other,
        }
    }
}

/// An open, checked and locked COW file with its bitmap loaded.
#[derive(Debug)]
pub struct CowFile {
    /// Path of the COW file.
    pub path: PathBuf,
    /// Path of the backing file actually used.
    pub backing_path: PathBuf,
    /// The header.
    pub header: CowHeader,
    /// The layout.
    pub geometry: Geometry,
    /// Buffered descriptor of the COW file: header, bitmap writes, syncs;
    /// it carries the OFD lock.
    pub meta_fd: File,
    /// Descriptor for data I/O (`O_DIRECT` when asked and supported).
    pub data_fd: File,
    /// The backing file, read-only (`O_DIRECT` like `data_fd`).
    pub backing_fd: File,
    /// Whether `data_fd` really is `O_DIRECT`.
    pub direct: bool,
    /// Whether `backing_fd` really is `O_DIRECT`.
    pub backing_direct: bool,
    /// The bitmap as read from the file.
    pub bitmap: Bitmap,
    /// Bits set in the file's bitmap when it was opened.
    pub bits_at_open: u64,
}

fn open_maybe_direct(path: &Path, write: bool, direct: bool) -> io::Result<(File, bool)> {
    if direct {
        match OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: the filesystem does not support O_DIRECT; using the page cache",
                    path.display()
                );
            }
            Err(e) => return Err(e),
        }
    }
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map(|f| (f, false))
}

/// Reads the first bytes of a file (up to the largest header).
pub fn read_header_bytes(file: &File) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HEADER_LEN];
    let mut got = 0;
    while got < buf.len() {
        let n = file.read_at(buf.get_mut(got..).unwrap_or_default(), got as u64)?;
        if n == 0 {
            break;
        }
        got = got.saturating_add(n);
    }
    buf.truncate(got);
    Ok(buf)
}

/// Parses the header of an open file.
pub fn read_header(file: &File, path: &Path) -> Result<CowHeader, CowFileError> {
    let buf = read_header_bytes(file).map_err(|e| CowFileError::Read {
        path: path.to_path_buf(),
        what: "header",
        source: e,
    })?;
    if !has_cow_magic(&buf) && buf.len() >= 4 {
        return Err(CowFileError::NotCow {
            path: path.to_path_buf(),
        });
    }
    CowHeader::parse(&buf).map_err(|e| CowFileError::Header {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Header, geometry and length of an open COW file; the bitmap must lie
/// inside the file.
fn read_layout(file: &File, path: &Path) -> Result<(CowHeader, Geometry, u64), CowFileError> {
    let header = read_header(file, path)?;
    let geometry = header.geometry().map_err(|e| CowFileError::Header {
        path: path.to_path_buf(),
        source: e,
    })?;
    let file_len = file
        .metadata()
        .map_err(|e| CowFileError::Open {
            path: path.to_path_buf(),
            source: e,
        })?
        .len();
    let bitmap_end = geometry.bitmap_offset.saturating_add(geometry.bitmap_len);
    if file_len < bitmap_end {
        return Err(CowFileError::BitmapTruncated {
            path: path.to_path_buf(),
            need: bitmap_end,
            have: file_len,
        });
    }
    Ok((header, geometry, file_len))
}

/// Compares the backing file with the header (size exact, mtime seconds).
pub fn check_backing(
    cow: &Path,
    backing: &Path,
    header: &CowHeader,
    meta: &std::fs::Metadata,
) -> Result<(), CowFileError> {
    let size = if meta.file_type().is_block_device() {
        header.size
    } else {
        meta.size()
    };
    if size != header.size {
        return Err(CowFileError::BackingSize {
            cow: cow.to_path_buf(),
            backing: backing.to_path_buf(),
            header: header.size,
            actual: size,
        });
    }
    // UML compares the stored 32-bit value with the 64-bit st_mtime.
    if meta.mtime() != i64::from(header.mtime) {
        return Err(CowFileError::BackingMtime {
            cow: cow.to_path_buf(),
            backing: backing.to_path_buf(),
            header: u64::from(header.mtime),
            actual: meta.mtime(),
        });
    }
    Ok(())
}

impl CowFile {
    /// Opens, checks and locks a COW file and loads its bitmap.
    pub fn open(path: &Path, opts: &OpenCow) -> Result<Self, CowFileError> {
        let open_err = |e| CowFileError::Open {
            path: path.to_path_buf(),
            source: e,
        };
        let meta_fd = OpenOptions::new()
            .read(true)
            .write(!opts.readonly)
            .open(path)
            .map_err(open_err)?;
        if !opts.no_lock {
            ofd_lock_waiting(&meta_fd, path, !opts.readonly, "COW file", opts.lock_wait)?;
        }
        let (header, geometry, _) = read_layout(&meta_fd, path)?;

        let backing_path = opts
            .backing
            .clone()
            .unwrap_or_else(|| header.backing_file.clone());
        let backing_err = |e| CowFileError::OpenBacking {
            cow: path.to_path_buf(),
            backing: backing_path.clone(),
            source: e,
        };
        if let Some(given) = &opts.backing {
            let same = match (
                std::fs::metadata(given),
                std::fs::metadata(&header.backing_file),
            ) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                log::warn!(
                    "COW file {}: using backing file {} instead of {} named in its header",
                    path.display(),
                    given.display(),
                    header.backing_file.display()
                );
            }
        }
        let (backing_fd, backing_direct) =
            open_maybe_direct(&backing_path, false, opts.direct).map_err(backing_err)?;
        if !opts.no_lock {
            ofd_lock(&backing_fd, &backing_path, false, "backing file")?;
        }
        let bmeta = backing_fd.metadata().map_err(backing_err)?;
        check_backing(path, &backing_path, &header, &bmeta)?;

        let (data_fd, direct) =
            open_maybe_direct(path, !opts.readonly, opts.direct).map_err(open_err)?;
        let (data_fd, direct) = if direct && geometry.data_offset % 512 != 0 {
            log::warn!(
                "COW file {}: data offset {} is not sector aligned; not using O_DIRECT",
                path.display(),
                geometry.data_offset
            );
            (
                OpenOptions::new()
                    .read(true)
                    .write(!opts.readonly)
                    .open(path)
                    .map_err(open_err)?,
                false,
            )
        } else {
            (data_fd, direct)
        };
        let (bitmap, bits_at_open) = load_bitmap(&meta_fd, path, &geometry)?;
        Ok(Self {
            bits_at_open,
            path: path.to_path_buf(),
            backing_path,
            header,
            geometry,
            meta_fd,
            data_fd,
            backing_fd,
            direct,
            backing_direct,
            bitmap,
        })
    }
}

/// Reads the on-disk bitmap into memory.
/// Returns it with the number of bits set in it.
pub fn load_bitmap(file: &File, path: &Path, g: &Geometry) -> Result<(Bitmap, u64), CowFileError> {
    let read_err = |e| CowFileError::Read {
        path: path.to_path_buf(),
        what: "bitmap",
        source: e,
    };
    let len = usize::try_from(g.bitmap_len).map_err(|_| {
        read_err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            "bitmap larger than the address space",
        ))
    })?;
    // Zeroed lazily by the allocator: pages of the bitmap that stay clear
    // are never touched, so a fresh (sparse) COW of 1 TiB starts without
    // reading or faulting in its 256 MiB of zeros.
    let mut bytes = vec![0u8; len];
    let spans = read_data_regions(file, &mut bytes, g.bitmap_offset).map_err(read_err)?;
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

/// The state of a COW's backing file, as `info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum BackingStatus {
    /// Size and mtime match the header.
    Ok,
    /// The backing file cannot be opened.
    Missing {
        /// Why.
        error: String,
    },
    /// Size or mtime differ: the COW cannot be used.
    Mismatch {
        /// What differs.
        error: String,
    },
}

/// What `info` shows about a COW file; gathered without locking.
#[derive(Debug, serde::Serialize)]
pub struct CowReport {
    /// The COW file.
    pub path: PathBuf,
    /// Header version name.
    pub version: &'static str,
    /// Backing path from the header.
    pub backing_file: PathBuf,
    /// Backing size in bytes.
    pub size: u64,
    /// Backing mtime (seconds).
    pub mtime: u32,
    /// Sector size.
    pub sectorsize: u32,
    /// Alignment.
    pub alignment: u32,
    /// Layout.
    pub geometry: Geometry,
    /// Length of the COW file.
    pub file_len: u64,
    /// Sectors whose bit is set.
    pub sectors_in_cow: u64,
    /// Backing check result.
    pub backing: BackingStatus,
}

/// Reads header, bitmap and backing status without taking locks.
pub fn inspect(path: &Path, backing_override: Option<&Path>) -> Result<CowReport, CowFileError> {
    let open_err = |e| CowFileError::Open {
        path: path.to_path_buf(),
        source: e,
    };
    let file = File::open(path).map_err(open_err)?;
    let (header, geometry, file_len) = read_layout(&file, path)?;
    let (bitmap, _) = load_bitmap(&file, path, &geometry)?;
    let backing_path =
        backing_override.map_or_else(|| header.backing_file.clone(), Path::to_path_buf);
    let backing = match std::fs::metadata(&backing_path) {
        Err(e) => BackingStatus::Missing {
            error: format!("{}: {e}", backing_path.display()),
        },
        Ok(meta) => match check_backing(path, &backing_path, &header, &meta) {
            Ok(()) => BackingStatus::Ok,
            Err(e) => BackingStatus::Mismatch {
                error: e.to_string(),
            },
        },
    };
    Ok(CowReport {
        path: path.to_path_buf(),
        version: header.version.name(),
        backing_file: header.backing_file.clone(),
        size: header.size,
        mtime: header.mtime,
        sectorsize: header.sectorsize,
        alignment: header.alignment,
        geometry,
        file_len,
        sectors_in_cow: bitmap.count_set(),
        backing,
    })
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

    /// The bit count taken at open is the bitmap's, whatever lies past the
    /// last sector (garbage there does not count) and with holes in between.
    #[test]
    fn bits_at_open_count_the_device_sectors_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        for sectors in [1000u64, 1003, 4096 * 8 + 5] {
            std::fs::write(&base, vec![7u8; (sectors * 512) as usize]).unwrap();
            let cow = dir.path().join(format!("c{sectors}.cow"));
            create_cow(&cow, &base, 4096).unwrap();
            let f = File::options().read(true).write(true).open(&cow).unwrap();
            let (_, g, _) = read_layout(&f, &cow).unwrap();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut bytes = vec![0u8; g.bitmap_len as usize];
            for (i, b) in bytes.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // a hole in the middle, data elsewhere, garbage at the end
                if !(100..3000).contains(&i) {
                    *b = x as u8;
                }
            }
            f.write_all_at(&bytes[..100], g.bitmap_offset).unwrap();
            f.write_all_at(&bytes[3000.min(bytes.len())..], g.bitmap_offset + 3000)
                .unwrap();
            let (bm, bits) = load_bitmap(&f, &cow, &g).unwrap();
            assert_eq!(bits, bm.count_set(), "{sectors} sectors");
        }
    }

    /// Reading only the data ranges gives the bytes a plain read gives, for
    /// windows that start and end in holes, in data, and past the end.
    #[test]
    fn reading_data_regions_matches_a_full_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let chunks: [(u64, usize, u8); 4] = [
            (100, 50, 0x11),
            (300_000, 9000, 0x22),
            (2_000_001, 3, 0x33),
            ((4 << 20) - 10, 10, 0x44),
        ];
        for (off, len, b) in chunks {
            f.write_all_at(&vec![b; len], off).unwrap();
        }
        let size = 4u64 << 20;
        for (off, len) in [
            (0u64, size as usize),
            (90, 70),
            (4096, 1 << 20),
            (150, 299_900),
            (305_000, 2_000_000),
            (2_000_002, 100_000),
            (size - 5, 5),
            (size - 100, 100),
            (1_000_000, 4096),
        ] {
            let mut want = vec![0u8; len];
            let n = f.read_at(&mut want, off).unwrap();
            assert_eq!(n, len, "window {off}+{len}");
            let mut got = vec![0u8; len];
            read_data_regions(&f, &mut got, off).unwrap();
            assert!(got == want, "window {off}+{len} differs");
        }
    }
}
