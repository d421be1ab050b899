// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A disk as one daemon instance hands it to the next (live handover):
//! the open files go as descriptors of the same open file descriptions
//! (their OFD locks with them: the COW is never unlocked), the COW bitmap
//! as its memfd (no copy, no re-read), the rest as JSON. The receiving side
//! checks what it gets as it would check a file it opened.

use std::sync::Arc;

pub use super::passed::{DiskExport, DiskMeta, Received};
use super::{Disk, DiskError, DiskOptions};

/// Builds the disk a predecessor passed.
pub fn adopt(
    meta: &DiskMeta,
    fds: &mut Received,
    opts: &DiskOptions,
) -> Result<Arc<dyn Disk>, DiskError> {
    match meta {
        DiskMeta::Raw { path, direct } => {
            let file = fds.take("image").ok_or_else(|| missing(path, "image"))?;
            Ok(Arc::new(super::raw::RawDisk::adopt(
                path, file, *direct, opts,
            )?))
        }
        DiskMeta::Cow {
            path,
            backing,
            direct,
            backing_direct,
        } => {
            let mut take = |n: &'static str| fds.take(n).ok_or_else(|| missing(path, n));
            let files = crate::cow::Passed {
                meta_fd: take("cow-meta")?,
                data_fd: take("cow-data")?,
                backing_fd: take("backing")?,
                bitmap: take("bitmap")?,
                direct: *direct,
                backing_direct: *backing_direct,
            };
            let file = crate::cow::CowFile::adopt(path, backing, files, opts.backing_check)?;
            Ok(Arc::new(super::cow::CowDisk::from_file(file, opts)?))
        }
    }
}

fn missing(path: &std::path::Path, what: &str) -> DiskError {
    DiskError::Setup {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the previous instance did not pass the {what} descriptor"),
        ),
    }
}

/// The disk of a migration destination before the switch-over: it has the
/// running instance's size and names (the frontend's set-up reads them),
/// makes no queue, and becomes the passed disk once [`PendingDisk::set`]
/// is called (the queues are made only after that: the switch-over gate
/// holds the rings until then).
#[derive(Debug)]
pub struct PendingDisk {
    info: super::DiskInfo,
    writeback: std::sync::atomic::AtomicBool,
    inner: std::sync::OnceLock<Arc<dyn Disk>>,
}

impl PendingDisk {
    /// A disk described by `info` until it arrives.
    pub fn new(info: super::DiskInfo) -> Self {
        Self {
            info,
            writeback: std::sync::atomic::AtomicBool::new(false),
            inner: std::sync::OnceLock::new(),
        }
    }

    /// The disk arrived (once; later calls are ignored).
    pub fn set(&self, disk: Arc<dyn Disk>) {
        disk.set_writeback(self.writeback.load(std::sync::atomic::Ordering::Acquire));
        if self.inner.set(disk).is_err() {
            log::warn!("{}: the disk arrived twice", self.info.path.display());
        }
    }

    fn not_yet(&self) -> DiskError {
        DiskError::Setup {
            path: self.info.path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the disk is still the running instance's (no switch-over yet)",
            ),
        }
    }
}

impl Disk for PendingDisk {
    fn info(&self) -> &super::DiskInfo {
        self.inner.get().map_or(&self.info, |d| d.info())
    }

    fn new_queue_on(
        &self,
        event: Arc<crate::engine::EventFd>,
    ) -> Result<Box<dyn super::DiskQueue>, DiskError> {
        match self.inner.get() {
            Some(d) => d.new_queue_on(event),
            None => Err(self.not_yet()),
        }
    }

    fn set_writeback(&self, writeback: bool) {
        self.writeback
            .store(writeback, std::sync::atomic::Ordering::Release);
        if let Some(d) = self.inner.get() {
            d.set_writeback(writeback);
        }
    }

    fn writeback(&self) -> bool {
        self.inner.get().map_or_else(
            || self.writeback.load(std::sync::atomic::Ordering::Acquire),
            |d| d.writeback(),
        )
    }

    fn shutdown(&self) -> Result<(), DiskError> {
        self.inner.get().map_or(Ok(()), |d| d.shutdown())
    }

    fn stats(&self) -> super::DiskStats {
        self.inner.get().map(|d| d.stats()).unwrap_or_default()
    }

    fn resize(&self, sectors: u64, force: bool, drain: &dyn Fn()) -> Result<(), DiskError> {
        match self.inner.get() {
            Some(d) => d.resize(sectors, force, drain),
            None => Err(self.not_yet()),
        }
    }

    fn export(&self) -> Result<DiskExport, DiskError> {
        match self.inner.get() {
            Some(d) => d.export(),
            None => Err(self.not_yet()),
        }
    }

    fn retire(&self, retired: bool) {
        if let Some(d) = self.inner.get() {
            d.retire(retired);
        }
    }

    fn start_job(&self, job: super::job::JobRequest) -> Result<(), DiskError> {
        match self.inner.get() {
            Some(d) => d.start_job(job),
            None => Err(self.not_yet()),
        }
    }

    fn job(&self) -> Option<super::job::JobStatus> {
        self.inner.get().and_then(|d| d.job())
    }

    fn cancel_job(&self) -> Result<super::job::JobStatus, DiskError> {
        match self.inner.get() {
            Some(d) => d.cancel_job(),
            None => Err(self.not_yet()),
        }
    }
}
