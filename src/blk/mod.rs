// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pure virtio-blk, no vhost: [`request`] parses a descriptor chain into a
//! typed request (R8: a bad chain still gets a status when it has a status
//! byte), [`translate`] turns a request into a disk operation (the one
//! range check, the one errno -> status mapping). The limits the device
//! announces in its config space are here too, so that what the guest is
//! told and what is checked cannot drift apart.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod request;
pub mod translate;

pub use request::{
    parse, BadRequest, BlkRequest, RequestType, Seg, SECTOR, S_IOERR, S_OK, S_UNSUPP,
};
pub use translate::{status_of, translate, Action, Refusal};

/// Discard and write-zeroes limit per request, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discard alignment in sectors (4 KiB).
pub const DISCARD_ALIGN: u32 = 8;
