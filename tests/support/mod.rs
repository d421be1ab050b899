// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers for integration tests that drive the real `vhost-user-ubd`
//! binary over its socket.
//!
//! - [`daemon`]: spawn `vhost-user-ubd serve` on a socket in a temporary
//!   directory, wait until it listens, capture its stderr to a file, stop it
//!   with SIGTERM (or SIGKILL), and a watchdog that kills a hung daemon so a
//!   hang becomes a test failure instead of a stuck CI job.
//! - [`client`]: a libblkio (`blkio` crate) vhost-user-blk client with the
//!   quirks of `docs/blkio-client.md` handled once: `map_mem_region` after
//!   `start`, every `do_io` with a timeout, queues dropped before the
//!   `Blkio`.
//!
//! Use it with `mod support;` in a test file (it needs only `std`, `libc`
//! and `blkio`; tests make their temporary directories with `tempfile`).
//! A file that wants only the daemon can write
//! `#[path = "support/daemon.rs"] mod daemon;`.
#![allow(dead_code)]

pub mod client;
pub mod daemon;
