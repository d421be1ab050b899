// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-ubd: a vhost-user virtio-blk backend for raw files and
//! User-Mode-Linux ubd COW files.
//!
//! Module map (each layer knows only the one below):
//!
//! - [`cow`]: the COW file format: header, geometry, bitmap, create/open/lock.
//! - [`disk`]: the `Disk` interface, raw and COW disks, the bitmap writeback
//!   scheduler (R1-R4) and durability (R5).
//! - [`engine`]: the io_uring engine; owns iovecs until completion.
//! - [`blk`]: pure virtio-blk: request parsing, request -> disk operation.
//! - [`vhost`]: the vhost-user backend (features, config space, queue workers,
//!   guest memory); the only module that knows the vhost crates, with
//!   [`daemon`]'s connection loop.
//! - [`daemon`]: listener, connection loop, signals.
//! - [`config`]: validated `serve` configuration.

pub mod blk;
pub mod config;
pub mod cow;
pub mod daemon;
pub mod disk;
pub mod engine;
pub mod vhost;
