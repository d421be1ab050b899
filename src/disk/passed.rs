// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A disk's open files as a live handover passes them (the types only: the
//! disks export them, `handover` builds a disk from them).

use std::{fs::File, os::fd::OwnedFd, path::PathBuf};

use serde::{Deserialize, Serialize};

/// What is said about the passed files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DiskMeta {
    /// A raw image: descriptor `image`.
    Raw {
        /// The image's path (logs, the serial).
        path: PathBuf,
        /// The descriptor is `O_DIRECT`.
        direct: bool,
    },
    /// A COW file: descriptors `cow-meta`, `cow-data`, `backing`, `bitmap`.
    Cow {
        /// The COW file's path.
        path: PathBuf,
        /// The backing file actually used.
        backing: PathBuf,
        /// `cow-data` is `O_DIRECT`.
        direct: bool,
        /// `backing` is `O_DIRECT`.
        backing_direct: bool,
    },
}

/// A disk's files, ready to be passed.
#[derive(Debug)]
pub struct DiskExport {
    /// What they are.
    pub meta: DiskMeta,
    /// The descriptors, by name.
    pub fds: Vec<(&'static str, OwnedFd)>,
}

/// Descriptors received, by name.
#[derive(Debug, Default)]
pub struct Received(pub Vec<(String, OwnedFd)>);

impl Received {
    /// Takes the descriptor `name` as a file.
    pub fn take(&mut self, name: &str) -> Option<File> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(File::from(self.0.swap_remove(i).1))
    }
}
