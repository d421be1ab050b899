// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Validated configuration of `serve`: every argument check lives here.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

use crate::{
    daemon::{handover::Spec, ListenOn},
    disk::{AioMode, DiskInfo, DiskOptions},
    vhost::MAX_QUEUES,
};

/// Cache mode of the data files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// `O_DIRECT`: bypass the host page cache.
    None,
    /// Use the host page cache.
    Writeback,
}

/// The disk to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSpec {
    /// A COW file (created over `backing` when missing).
    Cow {
        /// The COW file.
        cow: PathBuf,
        /// Backing file (required to create; else overrides the header).
        backing: Option<PathBuf>,
    },
    /// A raw image.
    Raw(PathBuf),
}

/// Everything `serve` needs, validated.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `--sandbox`.
    pub sandbox: crate::daemon::sandbox::Sandbox,
    /// `--seccomp`.
    pub on_violation: crate::daemon::sandbox::OnViolation,
    /// What a COW's backing file is checked for (`--backing-check`).
    pub backing_check: crate::cow::BackingCheck,
    /// Where to listen.
    pub listen: ListenOn,
    /// What to serve.
    pub disk: DiskSpec,
    /// Virtqueues.
    pub queues: usize,
    /// Largest queue size.
    pub queue_size: u16,
    /// Read-only device.
    pub readonly: bool,
    /// GET_ID serial; `None`: derived from the file.
    pub serial: Option<String>,
    /// Cache mode.
    pub cache: CacheMode,
    /// Force WCE=0.
    pub writethrough: bool,
    /// Checkpoint after this many pending write extents.
    pub checkpoint_extents: usize,
    /// Checkpoint when the oldest pending write is this old.
    pub checkpoint_age: Duration,
    /// Test hook (hidden option).
    pub bitmap_write_delay: Duration,
    /// Interface for allocating O_DIRECT writes.
    pub aio: AioMode,
    /// Worker threads (1..=queues).
    pub threads: usize,
    /// Crash journal directory (`None`: off).
    pub crash_journal: Option<PathBuf>,
    /// Control socket.
    pub control: Option<PathBuf>,
    /// Offer inflight I/O tracking.
    pub inflight: bool,
    /// Test hook: out-of-order completion without inflight tracking.
    pub out_of_order: bool,
}

/// A rejected argument.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Neither or both of --socket / --fd.
    #[error("give exactly one of --socket PATH or --fd N (or --takeover CTL)")]
    Listen,
    /// Neither or both of --cow / --raw.
    #[error("give exactly one of --cow FILE or --raw FILE")]
    Disk,
    /// --backing without --cow.
    #[error("--backing only goes with --cow")]
    BackingWithoutCow,
    /// The queue count is out of range.
    #[error("--queues {0}: must be between 1 and {MAX_QUEUES}")]
    Queues(usize),
    /// The queue size is not a power of two in range.
    #[error("--queue-size {0}: must be a power of two between 2 and 32768")]
    QueueSize(u32),
    /// The serial is too long.
    #[error("--serial is {0} bytes long: at most 20 fit in the virtio-blk id")]
    Serial(usize),
    /// Unknown cache mode.
    #[error("--cache {0}: must be 'none' or 'writeback'")]
    Cache(String),
    /// --threads out of range.
    #[error("--threads {0}: give 1 to {1} (the number of --queues)")]
    Threads(usize, usize),
    /// Unknown AIO mode.
    #[error("--aio {0}: must be 'native' or 'io_uring'")]
    Aio(String),
    /// Bad --inflight.
    #[error("--inflight {0}: must be 'on' or 'off'")]
    Inflight(String),
    /// The COW does not exist and no backing was given.
    #[error("COW file {0} does not exist: give --backing FILE to create it")]
    NoCow(PathBuf),
    /// The raw image does not exist.
    #[error("raw image {0} does not exist")]
    NoRaw(PathBuf),
    /// Checkpoint thresholds of zero.
    #[error("--checkpoint-extents and --checkpoint-ms must be at least 1")]
    Checkpoint,
    /// Unknown --sandbox.
    #[error("--sandbox {0}: must be 'seccomp' or 'none'")]
    Sandbox(String),
    /// Unknown --seccomp.
    #[error("--seccomp {0}: must be 'kill' or 'log'")]
    Seccomp(String),
    /// Unknown --backing-check.
    #[error("--backing-check {0}: must be 'size+mtime', 'size' or 'none'")]
    BackingCheck(String),
    /// A `--takeover` argument that differs from the running instance's.
    #[error("{0}; leave it out to take the running instance's over, or stop that instance and start afresh")]
    TakeoverMismatch(String),
    /// The crash journal directory is not a directory.
    #[error("--crash-journal {0}: not a directory (give an existing directory, e.g. /dev/shm, or 'off')")]
    CrashJournal(PathBuf),
}

/// Raw values as parsed by clap, before validation.
#[derive(Clone, Debug, Default)]
pub struct ServeArgsRaw {
    /// --socket
    pub socket: Option<PathBuf>,
    /// --fd
    pub fd: Option<i32>,
    /// --cow
    pub cow: Option<PathBuf>,
    /// --backing
    pub backing: Option<PathBuf>,
    /// --raw
    pub raw: Option<PathBuf>,
    /// --queues
    pub queues: usize,
    /// --queue-size
    pub queue_size: u32,
    /// --readonly
    pub readonly: bool,
    /// --serial
    pub serial: Option<String>,
    /// --cache
    pub cache: String,
    /// --writethrough
    pub writethrough: bool,
    /// --checkpoint-extents
    pub checkpoint_extents: usize,
    /// --checkpoint-ms
    pub checkpoint_ms: u64,
    /// --test-bitmap-delay-ms
    pub bitmap_delay_ms: u64,
    /// --aio
    pub aio: String,
    /// --threads
    pub threads: Option<usize>,
    /// --crash-journal
    pub crash_journal: String,
    /// --control
    pub control: Option<PathBuf>,
    /// --inflight
    pub inflight: String,
    /// --test-out-of-order
    pub out_of_order: bool,
    /// `--takeover`: the listening socket may be the predecessor's.
    pub takeover: bool,
    /// --backing-check (empty: the default)
    pub backing_check: String,
    /// --sandbox (empty: the default)
    pub sandbox: String,
    /// --seccomp (empty: the default)
    pub seccomp: String,
}

impl TryFrom<ServeArgsRaw> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgsRaw) -> Result<Self, ConfigError> {
        let listen = match (a.socket, a.fd) {
            (Some(p), None) => ListenOn::Path(p),
            (None, Some(fd)) => ListenOn::Fd(fd),
            // The predecessor's inherited socket, passed at the handover.
            (None, None) if a.takeover => ListenOn::Handed,
            _ => return Err(ConfigError::Listen),
        };
        let disk = match (a.cow, a.raw) {
            (Some(cow), None) => {
                if !cow.exists() && a.backing.is_none() {
                    return Err(ConfigError::NoCow(cow));
                }
                DiskSpec::Cow {
                    cow,
                    backing: a.backing,
                }
            }
            (None, Some(raw)) => {
                if a.backing.is_some() {
                    return Err(ConfigError::BackingWithoutCow);
                }
                if !raw.exists() {
                    return Err(ConfigError::NoRaw(raw));
                }
                DiskSpec::Raw(raw)
            }
            _ => return Err(ConfigError::Disk),
        };
        if a.queues == 0 || a.queues > MAX_QUEUES {
            return Err(ConfigError::Queues(a.queues));
        }
        if !a.queue_size.is_power_of_two() || !(2..=32768).contains(&a.queue_size) {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if let Some(s) = &a.serial {
            if s.len() > 20 {
                return Err(ConfigError::Serial(s.len()));
            }
        }
        let cache = match a.cache.as_str() {
            "none" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            other => return Err(ConfigError::Cache(other.into())),
        };
        let aio = match a.aio.as_str() {
            "native" => AioMode::Native,
            "io_uring" => AioMode::IoUring,
            other => return Err(ConfigError::Aio(other.into())),
        };
        let inflight = match a.inflight.as_str() {
            "on" => true,
            "off" => false,
            other => return Err(ConfigError::Inflight(other.into())),
        };
        if a.checkpoint_extents == 0 || a.checkpoint_ms == 0 {
            return Err(ConfigError::Checkpoint);
        }
        let crash_journal = match a.crash_journal.as_str() {
            "off" => None,
            // Only a COW has one; a raw disk ignores it.
            dir => {
                let dir = PathBuf::from(dir);
                if matches!(disk, DiskSpec::Cow { .. }) && !dir.is_dir() {
                    return Err(ConfigError::CrashJournal(dir));
                }
                Some(dir)
            }
        };
        let backing_check = if a.backing_check.is_empty() {
            crate::cow::BackingCheck::default()
        } else {
            crate::cow::BackingCheck::parse(&a.backing_check)
                .ok_or_else(|| ConfigError::BackingCheck(a.backing_check.clone()))?
        };
        use crate::daemon::sandbox::{OnViolation, Sandbox};
        let sandbox = match a.sandbox.as_str() {
            "" | "seccomp" => Sandbox::Seccomp,
            "none" => Sandbox::None,
            other => return Err(ConfigError::Sandbox(other.into())),
        };
        let on_violation = match a.seccomp.as_str() {
            "" | "kill" => OnViolation::Kill,
            "log" => OnViolation::Log,
            other => return Err(ConfigError::Seccomp(other.into())),
        };
        let threads = a.threads.unwrap_or_else(|| default_threads(a.queues));
        if threads == 0 || threads > a.queues {
            return Err(ConfigError::Threads(threads, a.queues));
        }
        Ok(Self {
            sandbox,
            on_violation,
            backing_check,
            listen,
            disk,
            queues: a.queues,
            queue_size: u16::try_from(a.queue_size)
                .map_err(|_| ConfigError::QueueSize(a.queue_size))?,
            readonly: a.readonly,
            serial: a.serial,
            cache,
            writethrough: a.writethrough,
            checkpoint_extents: a.checkpoint_extents,
            checkpoint_age: Duration::from_millis(a.checkpoint_ms),
            bitmap_write_delay: Duration::from_millis(a.bitmap_delay_ms),
            aio,
            threads,
            crash_journal,
            control: a.control,
            inflight,
            out_of_order: a.out_of_order,
        })
    }
}

/// How long `serve` waits for a COW lock held by another open file
/// description: a daemon killed with -9 holds its lock until the kernel has
/// finished its in-flight I/O (measured here: a restart right after the kill
/// found the lock still held), and a supervisor restarts it at once.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Default worker threads: one per queue, but at most half the CPUs this
/// process may run on (at least one). The guest's vCPUs, or a local client,
/// need the other half; more threads than that only add wake-ups and
/// cross-CPU signalling. Measured on 2 CPUs, 2 queues (libblkio client, 4
/// KiB, alternated runs): one thread against two gave first writes on a
/// fresh COW 65.7k vs 61.5k IOPS at qd32 and 138 vs 164 us p50 with 40 vs
/// 59 us of CPU per write at qd1; reads at qd1 31 vs 45 us of CPU per read.
pub fn default_threads(queues: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cpus / 2).clamp(1, queues.max(1))
}

/// Whether two paths name the same file (or are equal as given).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// The arguments of `serve --takeover`: the disk arguments come from the
/// running instance (`spec`); those given explicitly (`explicit`, clap's
/// ids) must be equal to its. Settings (threads, checkpoints, aio) are this
/// instance's own.
///
/// A `--socket` other than the running instance's makes this instance a
/// live migration's destination (the second value is then true): it
/// serves that socket and takes the disk over at the switch-over.
pub fn for_takeover(
    mut a: ServeArgsRaw,
    explicit: &[String],
    spec: &Spec,
) -> Result<(ServeConfig, bool), ConfigError> {
    let given = |id: &str| explicit.iter().any(|e| e == id);
    let differ = |flag: &str, mine: String, theirs: String| {
        ConfigError::TakeoverMismatch(format!(
            "{flag} {mine} differs from the running instance's {theirs}"
        ))
    };
    let path_arg = |id: &str, flag: &str, mine: &Option<PathBuf>, theirs: &Option<PathBuf>| {
        if !given(id) {
            return Ok(());
        }
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
        };
        match (mine, theirs) {
            (Some(m), Some(t)) if same_path(m, t) => Ok(()),
            _ => Err(differ(flag, show(mine), show(theirs))),
        }
    };
    if given("fd") {
        return Err(ConfigError::TakeoverMismatch(
            "--fd: a takeover serves the running instance's listening socket".into(),
        ));
    }
    let migration = given("socket")
        && !matches!((&a.socket, &spec.socket), (Some(m), Some(t)) if same_path(m, t));
    path_arg("cow", "--cow", &a.cow, &spec.cow)?;
    path_arg("raw", "--raw", &a.raw, &spec.raw)?;
    path_arg("backing", "--backing", &a.backing, &spec.backing)?;
    let plain = |id: &str, flag: &str, mine: String, theirs: String| {
        if given(id) && mine != theirs {
            Err(differ(flag, mine, theirs))
        } else {
            Ok(())
        }
    };
    plain(
        "queues",
        "--queues",
        a.queues.to_string(),
        spec.queues.to_string(),
    )?;
    plain(
        "queue_size",
        "--queue-size",
        a.queue_size.to_string(),
        spec.queue_size.to_string(),
    )?;
    plain(
        "readonly",
        "--readonly",
        a.readonly.to_string(),
        spec.readonly.to_string(),
    )?;
    plain(
        "serial",
        "--serial",
        a.serial.clone().unwrap_or_default(),
        spec.serial.clone(),
    )?;
    plain("cache", "--cache", a.cache.clone(), spec.cache.clone())?;
    plain(
        "writethrough",
        "--writethrough",
        a.writethrough.to_string(),
        spec.writethrough.to_string(),
    )?;
    plain(
        "inflight",
        "--inflight",
        a.inflight.clone(),
        spec.inflight.clone(),
    )?;
    plain(
        "crash_journal",
        "--crash-journal",
        a.crash_journal.clone(),
        spec.crash_journal.clone(),
    )?;
    plain(
        "backing_check",
        "--backing-check",
        a.backing_check.clone(),
        spec.backing_check.clone(),
    )?;
    a.backing_check.clone_from(&spec.backing_check);
    if !migration {
        a.socket = spec.socket.clone();
    }
    a.fd = None;
    a.cow = spec.cow.clone();
    a.raw = spec.raw.clone();
    a.backing = spec.backing.clone();
    a.queues = spec.queues;
    a.queue_size = spec.queue_size;
    a.readonly = spec.readonly;
    a.serial = Some(spec.serial.clone());
    a.cache = spec.cache.clone();
    a.writethrough = spec.writethrough;
    a.inflight = spec.inflight.clone();
    a.crash_journal = spec.crash_journal.clone();
    a.out_of_order = spec.out_of_order;
    if !given("threads") {
        a.threads = None;
    }
    if !given("control") {
        a.control = spec.control.clone();
    }
    a.takeover = true;
    Ok((ServeConfig::try_from(a)?, migration))
}

impl ServeConfig {
    /// What this instance serves, for a successor (`serial`: as served;
    /// `disk`: the disk's size and names).
    pub fn spec(&self, serial: &str, disk: &DiskInfo) -> Spec {
        Spec {
            sectors: disk.sectors(),
            id: disk.id.clone(),
            kind: disk.kind.to_owned(),
            direct: disk.direct,
            socket: match &self.listen {
                ListenOn::Path(p) => Some(p.clone()),
                ListenOn::Fd(_) | ListenOn::Handed => None,
            },
            cow: match &self.disk {
                DiskSpec::Cow { cow, .. } => Some(cow.clone()),
                DiskSpec::Raw(_) => None,
            },
            backing: match &self.disk {
                DiskSpec::Cow { backing, .. } => backing.clone(),
                DiskSpec::Raw(_) => None,
            },
            raw: match &self.disk {
                DiskSpec::Raw(r) => Some(r.clone()),
                DiskSpec::Cow { .. } => None,
            },
            queues: self.queues,
            queue_size: u32::from(self.queue_size),
            readonly: self.readonly,
            serial: serial.to_owned(),
            cache: match self.cache {
                CacheMode::None => "none".into(),
                CacheMode::Writeback => "writeback".into(),
            },
            writethrough: self.writethrough,
            inflight: if self.inflight { "on" } else { "off" }.into(),
            crash_journal: self
                .crash_journal
                .as_ref()
                .map_or_else(|| "off".into(), |d| d.display().to_string()),
            control: self.control.clone(),
            out_of_order: self.out_of_order,
            backing_check: self.backing_check.name().to_owned(),
        }
    }

    /// Options for opening the disk.
    pub fn disk_options(&self) -> DiskOptions {
        DiskOptions {
            readonly: self.readonly,
            direct: self.cache == CacheMode::None,
            writeback: !self.writethrough,
            backing: match &self.disk {
                DiskSpec::Cow { backing, .. } => backing.clone(),
                DiskSpec::Raw(_) => None,
            },
            max_pending_extents: self.checkpoint_extents,
            max_pending_age: self.checkpoint_age,
            ring_entries: u32::from(self.queue_size).max(64),
            bitmap_write_delay: self.bitmap_write_delay,
            aio: self.aio,
            observer: None,
            journal_dir: self.crash_journal.clone(),
            lock_wait: LOCK_WAIT,
            backing_check: self.backing_check,
            ..DiskOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ServeArgsRaw {
        ServeArgsRaw {
            socket: Some("/run/x.sock".into()),
            raw: Some("/etc/hostname".into()),
            queues: 1,
            queue_size: 256,
            cache: "writeback".into(),
            aio: "native".into(),
            threads: None,
            checkpoint_extents: 10,
            checkpoint_ms: 10,
            crash_journal: "off".into(),
            inflight: "on".into(),
            ..ServeArgsRaw::default()
        }
    }

    #[test]
    fn a_good_configuration_passes() {
        let c = ServeConfig::try_from(good()).unwrap();
        assert_eq!(c.listen, ListenOn::Path("/run/x.sock".into()));
        assert_eq!(c.disk, DiskSpec::Raw("/etc/hostname".into()));
        assert_eq!(c.disk_options().aio, AioMode::Native);
        for (s, m) in [("native", AioMode::Native), ("io_uring", AioMode::IoUring)] {
            let mut a = good();
            a.aio = s.into();
            assert_eq!(ServeConfig::try_from(a).unwrap().aio, m);
        }
        for (queues, threads, want) in [(1, None, 1), (4, Some(4), 4), (4, Some(3), 3)] {
            let mut a = good();
            a.queues = queues;
            a.threads = threads;
            assert_eq!(ServeConfig::try_from(a).unwrap().threads, want);
        }
        let mut a = good();
        a.queues = 16;
        let t = ServeConfig::try_from(a).unwrap().threads;
        assert_eq!(t, default_threads(16));
        assert!((1..=16).contains(&t), "{t}");
    }

    #[test]
    fn default_threads_leave_half_the_cpus_and_serve_every_queue() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(default_threads(1), 1);
        assert_eq!(default_threads(16), (cpus / 2).clamp(1, 16));
        assert!(default_threads(16) <= cpus.max(2) / 2);
    }

    #[test]
    fn each_bad_argument_is_rejected() {
        let e = |f: fn(&mut ServeArgsRaw)| {
            let mut a = good();
            f(&mut a);
            ServeConfig::try_from(a).unwrap_err()
        };
        assert_eq!(e(|a| a.fd = Some(3)), ConfigError::Listen);
        assert_eq!(e(|a| a.socket = None), ConfigError::Listen);
        assert_eq!(e(|a| a.cow = Some("/x".into())), ConfigError::Disk);
        assert_eq!(e(|a| a.raw = None), ConfigError::Disk);
        assert_eq!(
            e(|a| a.backing = Some("/b".into())),
            ConfigError::BackingWithoutCow
        );
        assert_eq!(e(|a| a.queues = 0), ConfigError::Queues(0));
        assert_eq!(e(|a| a.queues = 17), ConfigError::Queues(17));
        assert_eq!(e(|a| a.queue_size = 100), ConfigError::QueueSize(100));
        assert_eq!(e(|a| a.queue_size = 65536), ConfigError::QueueSize(65536));
        assert_eq!(
            e(|a| a.serial = Some("x".repeat(21))),
            ConfigError::Serial(21)
        );
        assert_eq!(
            e(|a| a.cache = "bogus".into()),
            ConfigError::Cache("bogus".into())
        );
        assert_eq!(
            e(|a| a.aio = "threads".into()),
            ConfigError::Aio("threads".into())
        );
        assert_eq!(e(|a| a.checkpoint_ms = 0), ConfigError::Checkpoint);
        let mut a = good();
        a.crash_journal = "/dev/shm".into();
        assert_eq!(
            ServeConfig::try_from(a).unwrap().crash_journal,
            Some("/dev/shm".into())
        );
        assert_eq!(
            e(|a| {
                a.raw = None;
                a.cow = Some(std::env::temp_dir());
                a.crash_journal = "/nonexistent/j".into();
            }),
            ConfigError::CrashJournal("/nonexistent/j".into())
        );
        assert_eq!(e(|a| a.threads = Some(0)), ConfigError::Threads(0, 1));
        assert_eq!(e(|a| a.threads = Some(2)), ConfigError::Threads(2, 1));
        assert_eq!(
            e(|a| a.raw = Some("/nonexistent/x.img".into())),
            ConfigError::NoRaw("/nonexistent/x.img".into())
        );
        assert_eq!(
            e(|a| {
                a.raw = None;
                a.cow = Some("/nonexistent/x.cow".into());
            }),
            ConfigError::NoCow("/nonexistent/x.cow".into())
        );
    }
}
