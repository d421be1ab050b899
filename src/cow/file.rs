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

use super::load::load_bitmap;
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
         image (or its mtime, `touch -d @{header}` if its contents are unchanged), serve with \
         `--backing-check size` if the base sits on a mount whose mtime is not the original's \
         (a network store), or recreate the COW (its contents are lost)"
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

/// The error of a bitmap that cannot be read.
pub(super) fn bitmap_read(path: &Path, source: io::Error) -> CowFileError {
    CowFileError::Read {
        path: path.to_path_buf(),
        what: "bitmap",
        source,
    }
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
    create_cow_with(path, backing, alignment, crate::cow::header::SECTOR_SIZE)
}

/// [`create_cow`] with COW sectors of `sectorsize` bytes (one bitmap bit
/// each): 4096 makes the bitmap 8 times smaller. `uml_moo` honours it; the
/// UML kernel driver assumes 512 and misreads such a file.
pub fn create_cow_with(
    path: &Path,
    backing: &Path,
    alignment: u32,
    sectorsize: u32,
) -> Result<CowHeader, CowFileError> {
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
    // A block device's size is its end, not its metadata's (0).
    let size = File::open(&abs)
        .and_then(|f| backing_size(&f, &meta))
        .map_err(|e| bad(format!("{}: {e}", abs.display())))?;
    if size == 0 {
        return Err(bad("the backing file is empty".into()));
    }
    // UML stores the low 32 bits of st_mtime.
    let mtime = meta.mtime() as u32;
    let header = CowHeader::new_v3(&abs, mtime, size, alignment, sectorsize)
        .map_err(|e| bad(e.to_string()))?;
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
    /// What the backing file is checked for against the header.
    pub backing_check: BackingCheck,
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
    /// What the backing file is checked for, at open and while served.
    pub backing_check: BackingCheck,
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
pub(super) fn read_layout(
    file: &File,
    path: &Path,
) -> Result<(CowHeader, Geometry, u64), CowFileError> {
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

/// What is compared between the backing file and the COW header
/// (`serve --backing-check`). UML compares size and mtime; a base on a
/// network store mounted as a file (nbdfuse, some FUSE or NFS set-ups) has
/// the mount's mtime, not the original file's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackingCheck {
    /// Size exact and mtime seconds, as UML does.
    #[default]
    SizeMtime,
    /// Size only: a different base of the same size goes unnoticed.
    Size,
    /// Nothing: any file is taken for the base.
    None,
}

impl BackingCheck {
    /// The `--backing-check` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::SizeMtime => "size+mtime",
            Self::Size => "size",
            Self::None => "none",
        }
    }

    /// Parses the `--backing-check` spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "size+mtime" => Some(Self::SizeMtime),
            "size" => Some(Self::Size),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Compares the backing file with the header (size exact, mtime seconds);
/// a block device's size is not in its metadata and is taken as the
/// header's (use [`check_backing_with`] with the device open).
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
    check_backing_with(cow, backing, header, meta, size, BackingCheck::SizeMtime)
}

/// The size of an open backing file: a block device's from its end (its
/// metadata says 0), a file's from its metadata.
pub fn backing_size(file: &File, meta: &std::fs::Metadata) -> io::Result<u64> {
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        // The backing is read with positional reads only: the offset moved
        // here is never used.
        (&*file).seek(io::SeekFrom::End(0))
    } else {
        Ok(meta.size())
    }
}

/// Compares the backing file with the header as `check` says.
/// Compares the backing file (its metadata, and its size as
/// [`backing_size`] measured it) with the header as `check` says.
pub fn check_backing_with(
    cow: &Path,
    backing: &Path,
    header: &CowHeader,
    meta: &std::fs::Metadata,
    size: u64,
    check: BackingCheck,
) -> Result<(), CowFileError> {
    if check == BackingCheck::None {
        return Ok(());
    }
    if size != header.size {
        return Err(CowFileError::BackingSize {
            cow: cow.to_path_buf(),
            backing: backing.to_path_buf(),
            header: header.size,
            actual: size,
        });
    }
    // UML compares the stored 32-bit value with the 64-bit st_mtime.
    if check == BackingCheck::SizeMtime && meta.mtime() != i64::from(header.mtime) {
        return Err(CowFileError::BackingMtime {
            cow: cow.to_path_buf(),
            backing: backing.to_path_buf(),
            header: u64::from(header.mtime),
            actual: meta.mtime(),
        });
    }
    Ok(())
}

/// The open files of a COW a predecessor passed (a live handover), locked
/// by their open file descriptions.
#[derive(Debug)]
pub struct Passed {
    /// See [`CowFile::meta_fd`].
    pub meta_fd: File,
    /// See [`CowFile::data_fd`].
    pub data_fd: File,
    /// See [`CowFile::backing_fd`].
    pub backing_fd: File,
    /// The predecessor's in-memory bitmap (a memfd, one bit per sector).
    pub bitmap: File,
    /// `data_fd` is `O_DIRECT`.
    pub direct: bool,
    /// `backing_fd` is `O_DIRECT`.
    pub backing_direct: bool,
}

impl CowFile {
    /// Takes over a COW file another instance opened, checked and locked
    /// (its OFD locks came with the descriptors), with its bitmap in memory.
    /// The header and the backing are checked again, as `open` does.
    pub fn adopt(
        path: &Path,
        backing_path: &Path,
        f: Passed,
        backing_check: BackingCheck,
    ) -> Result<Self, CowFileError> {
        let (header, geometry, _) = read_layout(&f.meta_fd, path)?;
        let bmeta = f
            .backing_fd
            .metadata()
            .map_err(|e| CowFileError::OpenBacking {
                cow: path.to_path_buf(),
                backing: backing_path.to_path_buf(),
                source: e,
            })?;
        let size = backing_size(&f.backing_fd, &bmeta).map_err(|e| CowFileError::OpenBacking {
            cow: path.to_path_buf(),
            backing: backing_path.to_path_buf(),
            source: e,
        })?;
        check_backing_with(path, backing_path, &header, &bmeta, size, backing_check)?;
        let len = usize::try_from(geometry.nsect.div_ceil(8))
            .map_err(|_| bitmap_read(path, io::Error::from(io::ErrorKind::OutOfMemory)))?;
        let mem = crate::engine::AtomicBytes::from_memfd(f.bitmap, len)
            .map_err(|e| bitmap_read(path, e))?;
        let bitmap = Bitmap::from_atomic(mem, geometry.nsect).map_err(|e| bitmap_read(path, e))?;
        Ok(Self {
            backing_check,
            bits_at_open: bitmap.count_set(),
            path: path.to_path_buf(),
            backing_path: backing_path.to_path_buf(),
            header,
            geometry,
            meta_fd: f.meta_fd,
            data_fd: f.data_fd,
            backing_fd: f.backing_fd,
            direct: f.direct,
            backing_direct: f.backing_direct,
            bitmap,
        })
    }

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
        let size = backing_size(&backing_fd, &bmeta).map_err(backing_err)?;
        check_backing_with(
            path,
            &backing_path,
            &header,
            &bmeta,
            size,
            opts.backing_check,
        )?;

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
        let (bitmap, bits_at_open) =
            load_bitmap(&meta_fd, &geometry).map_err(|e| bitmap_read(path, e))?;
        Ok(Self {
            backing_check: opts.backing_check,
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
