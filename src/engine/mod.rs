// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! I/O engines. One [`uring::Engine`] per queue worker (and one for the
//! COW durability thread); nothing here knows about COW or virtio.

pub mod aio;
pub mod shm;
pub mod uring;

pub use uring::{AlignedBuf, Engine, EventFd, IoDone, IoKind, IoObserver, IoOp};
