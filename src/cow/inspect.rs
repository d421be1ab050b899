// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What `vhost-user-ubd info` reports about a COW file, gathered without
//! taking its lock (a served COW can be inspected).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use super::{
    file::{bitmap_read, check_backing, read_layout, CowFileError},
    header::Geometry,
    load::load_bitmap,
};

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
    /// 512-byte sectors whose COW sector's bit is set.
    pub sectors_in_cow: u64,
    /// Bits set (COW sectors of `sectorsize` bytes in the COW).
    pub bits_set: u64,
    /// Some sector is still read from the backing file (false once every
    /// bit is set, e.g. after `flatten`: the base can then be retired).
    pub reads_backing: bool,
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
    let (bitmap, _) = load_bitmap(&file, &geometry).map_err(|e| bitmap_read(path, e))?;
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
        sectors_in_cow: (bitmap.count_set() << geometry.shift()).min(geometry.disk_sectors()),
        bits_set: bitmap.count_set(),
        reads_backing: bitmap.count_set() < geometry.nsect,
        backing,
    })
}
