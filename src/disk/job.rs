// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Block jobs a serving disk runs while the guest does I/O (README "Block
//! jobs"): what is asked, and what `status` shows of the job running or
//! last run.

use std::path::PathBuf;

/// A job to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobRequest {
    /// Copy every sector still read from the backing into the COW.
    Flatten {
        /// Bytes per second copied at most (None: as fast as it goes).
        rate: Option<u64>,
    },
    /// Write the disk as it is at the job's start to a new raw image.
    Export {
        /// The image to create (absolute).
        path: PathBuf,
        /// Replace it if it exists.
        force: bool,
        /// Bytes per second copied at most (None: as fast as it goes).
        rate: Option<u64>,
    },
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Copying.
    Running,
    /// Done, everything copied and durable.
    Completed,
    /// Stopped by an error (`error` says which).
    Failed,
    /// Stopped by `cancel` (a flatten keeps what it copied; an export's
    /// image is removed).
    Cancelled,
}

/// What `status` shows of a job.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JobStatus {
    /// `flatten` or `export`.
    pub kind: &'static str,
    /// Where it is.
    pub state: JobState,
    /// Bytes of the disk dealt with so far.
    pub bytes_done: u64,
    /// Bytes of the disk to deal with.
    pub bytes_total: u64,
    /// Bytes read and written (a flatten skips what is in the COW
    /// already).
    pub bytes_copied: u64,
    /// Bytes of the disk dealt with per second, so far.
    pub rate_bps: u64,
    /// Seconds left at that rate (None until it is known, or when done).
    pub eta_s: Option<f64>,
    /// Seconds since it started (to its end, once ended).
    pub elapsed_s: f64,
    /// Chunks a guest write waited for (export) or was parked on (flatten).
    pub writes_waited: u64,
    /// The configured rate limit, bytes per second.
    pub rate_limit_bps: Option<u64>,
    /// The export's image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A note on the result (e.g. sectors a V1/V2 bitmap cannot hold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}
