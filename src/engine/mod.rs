// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! I/O engines. One [`uring::Engine`] per queue worker (and one for the
//! COW durability thread); nothing here knows about COW or virtio.
//! [`buffers`] holds what keeps memory handed to the kernel alive.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod aio;
pub mod buffers;
pub mod eventfd;
pub mod hooks;
pub mod observer;
pub mod op;
pub mod shm;
pub mod sys;
pub mod uring;

pub use buffers::{AlignedBuf, AtomicBytes, BufReturn, IoVecs, Owner};
pub use eventfd::EventFd;
pub use observer::IoObserver;
pub use op::{IoDone, IoKind, IoOp};
pub use uring::Engine;
