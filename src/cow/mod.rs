// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The User-Mode-Linux ubd COW file format (`docs/ubd-cow-format.md`).
//!
//! `header` parses and writes headers and derives the geometry, `bitmap`
//! holds the in-memory bitmap and its bit math, `file` creates, opens,
//! checks and locks COW files. Nothing here knows about virtio, and nothing
//! here decides when bits reach the disk: that is `crate::disk`.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod bitmap;
pub mod file;
pub mod header;
pub mod inspect;
pub mod load;
pub mod merge;

pub use bitmap::Bitmap;
pub use file::{create_cow, create_cow_with, BackingCheck, CowFile, CowFileError, OpenCow, Passed};
pub use header::{CowHeader, CowVersion, Geometry, HeaderError};
