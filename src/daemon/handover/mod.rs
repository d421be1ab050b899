// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live handover of a served disk to a new instance of the daemon (live
//! upgrade, a change of settings), modelled on dm-snapshot's handover of an
//! in-use exception store between two table instances: the new instance
//! (`serve --takeover CTL`) registers with the running one over its control
//! socket; the running one suspends (stops popping, lets every popped
//! request complete, persists: data sync -> bitmap -> sync, R5) and passes
//! its open files over the socket (`SCM_RIGHTS`): the listening socket and
//! its lock, the COW, data and backing descriptors (their OFD locks travel
//! with the open file descriptions, so the COW is never unlocked), the
//! bitmap's memfd, the control socket. The new one builds its disk from
//! them and commits; the old one closes its frontend connection and stops
//! accepting; the new one says it is live and serves the same listening
//! socket, where the frontend's reconnect lands; the old one exits 0.
//!
//! - `state.rs`: the source's state machine (pure, unit-tested).
//! - `source.rs`: the running instance's side, in its control thread.
//! - `destination.rs`: the new instance's side.
//!
//! Failure at any step leaves one instance serving: a destination that
//! goes away (or silent for [`STEP_TIMEOUT`]) before it said live makes
//! the source resume; a source that dies before passing its files makes
//! the destination open them from disk (R5 makes that safe), after it, the
//! destination goes live with what it got.

use std::{
    io,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{disk::handover::DiskMeta, engine::sys};

mod destination;
mod source;
pub mod state;

pub use destination::{Handed, Takeover};
pub use source::{SourceCtx, SourceShared};

/// How long the source waits for the destination's next step before it
/// gives up and serves on (the guest stalls while it is suspended).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a suspend waits for the requests in flight.
pub const SUSPEND_DRAIN: Duration = Duration::from_secs(10);

/// What the running instance serves, as its arguments say: the destination
/// takes these over (and refuses to differ in any it was given).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// `--socket` (none: an inherited `--fd`).
    pub socket: Option<PathBuf>,
    /// `--cow`.
    pub cow: Option<PathBuf>,
    /// `--backing`.
    pub backing: Option<PathBuf>,
    /// `--raw`.
    pub raw: Option<PathBuf>,
    /// `--queues`.
    pub queues: usize,
    /// `--queue-size`.
    pub queue_size: u32,
    /// `--readonly`.
    pub readonly: bool,
    /// `--serial` as served (given or derived from the file).
    pub serial: String,
    /// `--cache`.
    pub cache: String,
    /// `--writethrough`.
    pub writethrough: bool,
    /// `--inflight`.
    pub inflight: String,
    /// `--crash-journal`.
    pub crash_journal: String,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// The hidden out-of-order test switch.
    pub out_of_order: bool,
    /// The disk's size in sectors now (a migration destination answers the
    /// frontend's set-up with it before it has the disk).
    #[serde(default)]
    pub sectors: u64,
    /// The disk's identifier (`file_id`).
    #[serde(default)]
    pub id: String,
    /// `raw` or `cow`.
    #[serde(default)]
    pub kind: String,
    /// The data descriptors are `O_DIRECT`.
    #[serde(default)]
    pub direct: bool,
    /// `--backing-check`.
    #[serde(default)]
    pub backing_check: String,
}

/// Counters the destination carries on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests completed.
    pub completed: u64,
    /// Requests answered IOERR or UNSUPP.
    pub bad_requests: u64,
    /// The disk was resized during the source's life.
    pub resized: bool,
}

/// The suspend reply's description of the descriptors it carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PassedMeta {
    /// The disk's files.
    pub disk: DiskMeta,
    /// Names of the descriptors, in the order they were attached.
    pub fds: Vec<String>,
    /// Counters.
    pub counters: Counters,
}

/// Test hook: `VHOST_USER_UBD_TEST_HANDOVER_PAUSE=STEP[:MS]` stops this
/// process for MS milliseconds (default 5000) when it reaches the named
/// step, so that a test can kill either instance there.
pub(crate) fn pause(step: &str) {
    let Ok(v) = std::env::var("VHOST_USER_UBD_TEST_HANDOVER_PAUSE") else {
        return;
    };
    let (name, ms) = match v.split_once(':') {
        Some((n, ms)) => (n, ms.parse().unwrap_or(5000)),
        None => (v.as_str(), 5000),
    };
    if name == step {
        log::info!("handover: test pause at {step} ({ms} ms)");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Reads one line (and the descriptors sent with it) from `stream`, a byte
/// at a time: nothing of a later message is consumed. `Ok(None)` at the
/// end of the stream. The stream's read timeout bounds the whole line.
/// An interrupted read is retried (an io_uring this thread set up, for the
/// suspend's flush, interrupts blocking reads with its task work).
pub(crate) fn read_line_with_fds(
    stream: &UnixStream,
    limit: usize,
) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let deadline = stream
        .read_timeout()?
        .and_then(|t| std::time::Instant::now().checked_add(t));
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let (n, mut got) = match sys::recv_fds(stream, &mut byte) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        fds.append(&mut got);
        if n == 0 {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the line was cut short",
                ))
            };
        }
        if byte == [b'\n'] {
            return Ok(Some((line, fds)));
        }
        line.push(byte[0]);
        if line.len() > limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
    }
}
