// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The subcommands `create`, `info` and `check`.

use std::{path::Path, process::ExitCode};

use std::sync::Arc;

use thiserror::Error;
use vhost_user_ubd::{
    config::{self, ConfigError, DiskSpec, ServeArgsRaw, ServeConfig},
    cow::{
        self,
        inspect::{inspect, BackingStatus, CowReport},
        CowFile, CowFileError, OpenCow,
    },
    daemon::{
        self,
        control::ControlSocket,
        handover::{Handed, Takeover},
        DaemonError, Serving,
    },
    disk::{self, DiskError},
    vhost::{BlkBackend, BlkConfig},
};

use crate::args::{Args, Command};

/// Errors of the command-line tool.
#[derive(Debug, Error)]
pub enum CliError {
    /// A COW file problem.
    #[error(transparent)]
    Cow(#[from] CowFileError),
    /// JSON output failed.
    #[error("cannot print JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A bad `serve` argument.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    /// A merge failed.
    #[error(transparent)]
    Merge(#[from] cow::merge::MergeError),
    /// A size that cannot be parsed.
    #[error(
        "cannot read the size {0:?}: give bytes, or a number with K, M, G or T (powers of 1024)"
    )]
    Size(String),
}

/// Bytes in `s`: a number with an optional K, M, G or T suffix (1024s).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (s.get(..i)?, 10),
        (i, 'M' | 'm') => (s.get(..i)?, 20),
        (i, 'G' | 'g') => (s.get(..i)?, 30),
        (i, 'T' | 't') => (s.get(..i)?, 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// `status`: what a running daemon serves.
fn status(control: &Path, json: bool) -> Result<ExitCode, CliError> {
    let v = daemon::control::call(control, &serde_json::json!({"v": 1, "cmd": "status"}))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let (d, dev, st) = (&v["disk"], &v["device"], &v["stats"]);
    println!(
        "disk:       {} ({}, {} bytes, {} sectors{}{})",
        d["path"].as_str().unwrap_or("?"),
        d["kind"].as_str().unwrap_or("?"),
        d["bytes"],
        d["sectors"],
        if d["readonly"] == true {
            ", read-only"
        } else {
            ""
        },
        if d["writeback"] == true {
            ", writeback cache"
        } else {
            ", writethrough"
        },
    );
    println!(
        "frontend:   {}",
        if dev["connected"] == true {
            format!(
                "connected, features {:#x}, {} queues offered{}",
                dev["features"].as_u64().unwrap_or(0),
                dev["queues"],
                if dev["config_channel"] == true {
                    ", backend channel"
                } else {
                    ""
                }
            )
        } else {
            "none connected".into()
        }
    );
    println!(
        "requests:   {} in flight, {} parked, {} completed, {} bad",
        dev["in_flight"], dev["parked"], dev["completed"], dev["bad_requests"]
    );
    let h = &v["handover"];
    println!(
        "handover:   {}",
        match h["role"].as_str() {
            Some("source") => format!(
                "{} (handing over to pid {})",
                h["state"].as_str().unwrap_or("?"),
                h["peer_pid"]
            ),
            Some("destination") => format!(
                "{} (took over from pid {})",
                h["state"].as_str().unwrap_or("?"),
                h["peer_pid"]
            ),
            _ => "none".into(),
        }
    );
    println!(
        "cow:        {} bitmap writes ({} waited), {} syncs, {} epochs, {} reads parked",
        st["bitmap_writes"],
        st["bitmap_writes_waited"],
        st["syncs"],
        st["epochs"],
        st["reads_parked"]
    );
    if st["copy_ups"].as_u64().unwrap_or(0) > 0 || st["writes_held"].as_u64().unwrap_or(0) > 0 {
        println!(
            "copies:     {} COW sectors copied up, {} requests held for a copy",
            st["copy_ups"], st["writes_held"]
        );
    }
    let job = &v["job"];
    if job.is_object() {
        let pct = match (job["bytes_done"].as_u64(), job["bytes_total"].as_u64()) {
            (Some(d), Some(t)) if t > 0 => d as f64 * 100.0 / t as f64,
            _ => 0.0,
        };
        println!(
            "job:        {} {}, {pct:.1}% ({} of {} bytes), {:.1} MB/s{}{}{}",
            job["kind"].as_str().unwrap_or("?"),
            job["state"].as_str().unwrap_or("?"),
            job["bytes_done"],
            job["bytes_total"],
            job["rate_bps"].as_f64().unwrap_or(0.0) / 1e6,
            job["eta_s"]
                .as_f64()
                .map(|e| format!(", eta {e:.0} s"))
                .unwrap_or_default(),
            job["target"]
                .as_str()
                .map(|t| format!(", image {t}"))
                .unwrap_or_default(),
            job["error"]
                .as_str()
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The answer to `--print-capabilities` (vhost-user backend program
/// conventions, QEMU's docs/interop/vhost-user.json).
pub fn capabilities() -> String {
    serde_json::json!({"type": "block", "features": ["read-only", "blk-file"]}).to_string()
}

/// Runs one subcommand (none: serve).
pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let Some(command) = args.command else {
        return serve(args.serve);
    };
    match command {
        Command::Man => {
            use clap::CommandFactory;
            let man = clap_mangen::Man::new(Args::command());
            let mut out = Vec::new();
            man.render(&mut out).map_err(CliError::Output)?;
            use std::io::Write;
            std::io::stdout()
                .write_all(&out)
                .map_err(CliError::Output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(a) => serve(*a),
        Command::Status { control, json } => status(&control, json),
        Command::Resize {
            control,
            force,
            size,
        } => {
            let bytes = parse_size(&size).ok_or(CliError::Size(size))?;
            let v = daemon::control::call(
                &control,
                &serde_json::json!({"v": 1, "cmd": "resize", "size": bytes, "force": force}),
            )?;
            println!(
                "resized to {} bytes ({} sectors){}",
                bytes,
                v["sectors"],
                if v["notified"] == true {
                    "; the frontend was told"
                } else {
                    "; no frontend channel: the guest sees it when it reconnects"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Flatten(j) => Ok(crate::job_cli::flatten(&j)?),
        Command::Export { job, force, out } => Ok(crate::job_cli::export(&job, &out, force)?),
        Command::Cancel { control, output } => Ok(crate::job_cli::cancel(&control, output)?),
        Command::Create {
            alignment,
            sectorsize,
            cow,
            backing,
        } => {
            let h = cow::create_cow_with(&cow, &backing, alignment, sectorsize)?;
            log::info!(
                "created COW file {} over {} ({} bytes)",
                cow.display(),
                h.backing_file.display(),
                h.size
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Merge {
            in_place,
            force,
            backing,
            backing_check,
            crash_journal,
            output,
            cow,
            out,
        } => {
            let backing_check = cow::BackingCheck::parse(&backing_check)
                .ok_or(ConfigError::BackingCheck(backing_check))?;
            let target = match out {
                Some(path) if !in_place => cow::merge::Target::File { path, force },
                _ => cow::merge::Target::InPlace,
            };
            let opts = cow::merge::MergeOptions {
                cow,
                target,
                backing,
                backing_check,
            };
            refuse_pending_journal(&opts, &crash_journal)?;
            let output = if output == "json" {
                cow::merge::Output::Json
            } else {
                cow::merge::Output::Text
            };
            cow::merge::run(&opts, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Info { json, cow } => {
            let report = inspect(&cow, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            backing,
            backing_check,
            cow,
            crash_journal,
        } => {
            let mode = cow::BackingCheck::parse(&backing_check)
                .ok_or(ConfigError::BackingCheck(backing_check))?;
            Ok(check(&cow, backing.as_deref(), &crash_journal, mode))
        }
    }
}

/// A merge would miss the writes a crash journal holds (a daemon that died
/// completed them, their bits are not in the file): refused. A journal that
/// cannot be looked at is only logged; the merge checks the files itself.
fn refuse_pending_journal(
    opts: &cow::merge::MergeOptions,
    dir: &Path,
) -> Result<(), cow::merge::MergeError> {
    let open = OpenCow {
        readonly: true,
        backing: opts.backing.clone(),
        no_lock: true,
        backing_check: cow::BackingCheck::None,
        ..OpenCow::default()
    };
    let Ok(f) = CowFile::open(&opts.cow, &open) else {
        return Ok(());
    };
    match disk::cow::journal::pending(dir, &f) {
        Ok(disk::cow::journal::Pending::Applies { path, sectors }) => {
            Err(cow::merge::MergeError::PendingJournal {
                cow: opts.cow.clone(),
                journal: path,
                sectors,
            })
        }
        Ok(_) => Ok(()),
        Err(e) => {
            log::warn!("{}: crash journal not checked: {e}", opts.cow.display());
            Ok(())
        }
    }
}

fn print_report(r: &CowReport) {
    let g = &r.geometry;
    println!("file:          {}", r.path.display());
    println!("version:       {}", r.version);
    println!("backing file:  {}", r.backing_file.display());
    println!(
        "backing size:  {} bytes ({} sectors)",
        r.size,
        g.disk_sectors()
    );
    println!("backing mtime: {}", r.mtime);
    println!(
        "sectorsize:    {}{}",
        r.sectorsize,
        if r.sectorsize == 512 {
            ""
        } else {
            " (uml_moo honours it; the UML kernel driver does not: serve it with vhost-user-ubd)"
        }
    );
    println!("alignment:     {}", r.alignment);
    println!(
        "bitmap:        offset {} length {}",
        g.bitmap_offset, g.bitmap_len
    );
    println!("data offset:   {}", g.data_offset);
    println!("file length:   {}", r.file_len);
    println!(
        "in COW:        {} sectors ({} bytes, {:.2}%)",
        r.sectors_in_cow,
        r.sectors_in_cow * 512,
        if g.nsect == 0 {
            0.0
        } else {
            r.bits_set as f64 * 100.0 / g.nsect as f64
        }
    );
    if r.reads_backing {
        println!("reads backing: yes");
    } else {
        println!(
            "reads backing: no (every sector is in the COW: the backing is no longer read; keep \
             it, or a file of its size and mtime, for uml_moo and UML)"
        );
    }
    match &r.backing {
        BackingStatus::Ok => println!("backing:       ok (size and mtime match)"),
        BackingStatus::Missing { error } => println!("backing:       MISSING: {error}"),
        BackingStatus::Mismatch { error } => println!("backing:       MISMATCH: {error}"),
    }
}

fn check(
    path: &Path,
    backing: Option<&Path>,
    journal_dir: &Path,
    backing_check: cow::BackingCheck,
) -> ExitCode {
    let opts = OpenCow {
        readonly: false,
        backing: backing.map(Path::to_path_buf),
        direct: false,
        no_lock: false,
        lock_wait: std::time::Duration::ZERO,
        backing_check,
    };
    match CowFile::open(path, &opts) {
        Ok(f) => {
            println!(
                "{}: ok: {} header, {} sectors ({} in the COW), backing {} matches, not locked by anyone else",
                path.display(),
                f.header.version.name(),
                f.geometry.disk_sectors(),
                (f.bitmap.count_set() << f.geometry.shift()).min(f.geometry.disk_sectors()),
                f.backing_path.display()
            );
            match disk::cow::journal::pending(journal_dir, &f) {
                Ok(disk::cow::journal::Pending::None) => {}
                Ok(disk::cow::journal::Pending::Applies { path: j, sectors }) => println!(
                    "{}: note: crash journal {} holds {sectors} sectors a daemon wrote and \
                     completed before it died, not in the bitmap yet. Serve the COW once (the \
                     daemon applies them; a clean stop writes their bits) before giving the file \
                     to uml_moo or UML, which would read those sectors from the backing",
                    path.display(),
                    j.display()
                ),
                Ok(disk::cow::journal::Pending::Refused { path: j, why }) => println!(
                    "{}: note: crash journal {} does not belong to this COW ({why}); `serve` \
                     will set it aside",
                    path.display(),
                    j.display()
                ),
                Err(e) => println!("{}: note: {e}", path.display()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}: NOT USABLE: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn serve(a: crate::args::ServeArgs) -> Result<ExitCode, CliError> {
    // --blk-file (the conventions' name): a COW file is served as one.
    let (mut cow, mut raw_image) = (a.cow, a.raw);
    if let Some(f) = a.blk_file {
        if disk::is_cow_file(&f).unwrap_or(false) {
            cow = Some(f);
        } else {
            raw_image = Some(f);
        }
    }
    let raw = ServeArgsRaw {
        socket: a.socket,
        fd: a.fd,
        cow,
        backing: a.backing,
        raw: raw_image,
        queues: a.queues,
        queue_size: a.queue_size,
        readonly: a.readonly,
        serial: a.serial,
        cache: a.cache,
        writethrough: a.writethrough,
        checkpoint_extents: a.checkpoint_extents,
        checkpoint_ms: a.checkpoint_ms,
        bitmap_delay_ms: a.test_bitmap_delay_ms,
        threads: a.threads,
        aio: a.aio,
        crash_journal: a.crash_journal,
        control: a.control,
        inflight: a.inflight,
        out_of_order: a.test_out_of_order,
        takeover: false,
        backing_check: a.backing_check,
        sandbox: a.sandbox,
        seccomp: a.seccomp,
    };
    let mut raw = raw;
    // systemd socket activation (LISTEN_FDS/LISTEN_PID), when no socket
    // is named; read before any thread starts.
    if raw.socket.is_none() && raw.fd.is_none() && a.takeover.is_none() {
        if let Some(fd) = daemon::notify::listen_fd() {
            log::info!("systemd socket activation: serving fd {fd}");
            raw.fd = Some(fd);
        }
    }
    // Before any thread starts: only the signal thread takes SIGTERM/SIGINT.
    let signals = daemon::block_signals()?;
    if let Some(ctl) = a.takeover {
        return takeover(&ctl, raw, &a.explicit, signals);
    }
    let cfg = ServeConfig::try_from(raw)?;
    fresh(&cfg, signals, None, std::time::Duration::ZERO)
}

/// A start from the files: claim the socket, open the disk, listen.
/// `claim_wait`: how long a claim of the socket held by another process is
/// waited for (a predecessor that just died).
fn fresh(
    cfg: &ServeConfig,
    signals: daemon::Signals,
    control: Option<ControlSocket>,
    claim_wait: std::time::Duration,
) -> Result<ExitCode, CliError> {
    // Before the disk is opened: a socket another daemon serves is refused
    // at once, naming that daemon (held until the process exits).
    let claim = match &cfg.listen {
        daemon::ListenOn::Path(p) => Some(daemon::SocketClaim::take_waiting(p, claim_wait)?),
        daemon::ListenOn::Fd(_) | daemon::ListenOn::Handed => None,
    };
    let opts = cfg.disk_options();
    let disk = match &cfg.disk {
        DiskSpec::Cow { cow, .. } => disk::open_cow(cow, &opts)?,
        DiskSpec::Raw(raw) => disk::open_raw(raw, &opts)?,
    };
    let (backend, serial) = backend(cfg, disk)?;
    let (listener, listen_desc) = daemon::listen(&cfg.listen)?;
    let control = match control {
        Some(c) => Some(c),
        None => cfg
            .control
            .as_deref()
            .map(ControlSocket::bind)
            .transpose()?,
    };
    let spec = cfg.spec(&serial, backend.disk().info());
    daemon::run(
        backend,
        Serving {
            listener,
            listen_desc,
            claim,
            control,
            control_adopted: false,
            spec,
            takeover: None,
            switch: None,
            sandbox: (cfg.sandbox, cfg.on_violation),
        },
        signals,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The device over `disk`, and the serial it answers.
fn backend(
    cfg: &ServeConfig,
    disk: Arc<dyn disk::Disk>,
) -> Result<(Arc<BlkBackend>, String), CliError> {
    let (b, serial) = device(cfg, disk)?;
    Ok((Arc::new(b), serial))
}

/// The device over `disk` (not shared yet), and the serial it answers.
fn device(cfg: &ServeConfig, disk: Arc<dyn disk::Disk>) -> Result<(BlkBackend, String), CliError> {
    let serial = cfg.serial.clone().unwrap_or_else(|| disk.info().id.clone());
    let backend = BlkBackend::new(
        disk,
        BlkConfig {
            queues: cfg.queues,
            queue_size: cfg.queue_size,
            readonly: cfg.readonly,
            serial: serial.clone(),
            writethrough: cfg.writethrough,
            threads: cfg.threads,
            inflight: cfg.inflight,
            out_of_order: cfg.out_of_order,
        },
    )?;
    Ok((backend, serial))
}

/// `serve --takeover CTL`: the live handover from the instance at `ctl`.
fn takeover(
    ctl: &Path,
    raw: ServeArgsRaw,
    explicit: &[String],
    signals: daemon::Signals,
) -> Result<ExitCode, CliError> {
    let mut t = Takeover::register(ctl)?;
    let source = t.source_pid();
    let (cfg, migration) = match config::for_takeover(raw, explicit, t.spec()) {
        Ok(c) => c,
        Err(e) => {
            t.abort(&e.to_string());
            return Err(e.into());
        }
    };
    // A control socket of its own is bound before anything is suspended:
    // if it cannot be, the running instance is left alone.
    let own = cfg
        .control
        .as_deref()
        .filter(|c| t.spec().control.as_deref() != Some(*c));
    let own_control = match own.map(ControlSocket::bind).transpose() {
        Ok(c) => c,
        Err(e) => {
            t.abort(&e.to_string());
            return Err(e.into());
        }
    };
    if migration {
        return migrate_in(t, &cfg, own_control, signals);
    }
    let (meta, mut fds) = match t.suspend()? {
        Handed::Passed { meta, fds } => (meta, fds),
        Handed::SourceGone(why) => {
            log::warn!(
                "handover: pid {source} went away before it passed its files ({why}); opening \
                 them from disk (everything it completed before its last flush is there, R5)"
            );
            drop(t);
            return fresh(&cfg, signals, own_control, config::LOCK_WAIT);
        }
    };
    let built = (|| {
        let disk = disk::handover::adopt(&meta.disk, &mut fds, &cfg.disk_options())?;
        let (backend, serial) = backend(&cfg, disk)?;
        let c = meta.counters;
        backend.restore_counters(c.completed, c.bad_requests, c.resized);
        let listen = fds.take("listen").ok_or_else(|| DaemonError::Handover {
            ctl: ctl.to_path_buf(),
            reason: "the listening socket was not passed".into(),
        })?;
        let listener = vhost_user_ubd::vhost::connection::Listener::from_owned(listen.into())
            .map_err(DaemonError::from)?;
        let claim = fds
            .take("claim")
            .map(daemon::SocketClaim::adopt)
            .transpose()
            .map_err(|e| DaemonError::Handover {
                ctl: ctl.to_path_buf(),
                reason: format!("cannot hold the socket's lock file: {e}"),
            })?;
        let passed_control = fds.take("control");
        let (control, control_adopted) = match (own_control, passed_control, &cfg.control) {
            (Some(c), _, _) => (Some(c), false),
            (None, Some(f), Some(path)) => (Some(ControlSocket::adopt(f.into(), path)), true),
            (None, _, _) => (None, false),
        };
        Ok::<_, CliError>((backend, serial, listener, claim, control, control_adopted))
    })();
    let (backend, serial, listener, claim, control, control_adopted) = match built {
        Ok(b) => b,
        Err(e) => {
            t.abort(&e.to_string());
            return Err(e);
        }
    };
    let spec = cfg.spec(&serial, backend.disk().info());
    let listen_desc = spec.socket.clone().map_or_else(
        || format!("the socket pid {source} served"),
        |p| p.display().to_string(),
    );
    daemon::run(
        backend,
        Serving {
            listener,
            listen_desc,
            claim,
            control,
            control_adopted,
            spec,
            takeover: Some(t),
            switch: None,
            sandbox: (cfg.sandbox, cfg.on_violation),
        },
        signals,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `serve --takeover CTL --socket DST_SOCK`: a live migration's
/// destination. It serves its own socket to the destination QEMU at once,
/// with the running instance's size and names, and takes the disk over
/// when the destination's rings start (the switch-over).
fn migrate_in(
    t: Takeover,
    cfg: &ServeConfig,
    own_control: Option<ControlSocket>,
    signals: daemon::Signals,
) -> Result<ExitCode, CliError> {
    let spec = t.spec().clone();
    let claim = match &cfg.listen {
        daemon::ListenOn::Path(p) => Some(daemon::SocketClaim::take(p)?),
        daemon::ListenOn::Fd(_) | daemon::ListenOn::Handed => None,
    };
    let path = spec
        .cow
        .clone()
        .or_else(|| spec.raw.clone())
        .unwrap_or_default();
    let pending = Arc::new(disk::handover::PendingDisk::new(disk::DiskInfo {
        size: disk::DiskSize::new(spec.sectors),
        readonly: spec.readonly,
        path,
        id: spec.id.clone(),
        kind: if spec.kind == "raw" { "raw" } else { "cow" },
        direct: spec.direct,
    }));
    let gate = Arc::new(vhost_user_ubd::vhost::gate::SwitchGate::new());
    let (device, serial) = device(cfg, pending.clone())?;
    let backend = Arc::new(device.with_gate(gate.clone()));
    let (listener, listen_desc) = daemon::listen(&cfg.listen)?;
    let opts = cfg.disk_options();
    let open = {
        let (cfg, opts) = (cfg.clone(), opts.clone());
        Box::new(move || match &cfg.disk {
            DiskSpec::Cow { cow, .. } => disk::open_cow(cow, &opts),
            DiskSpec::Raw(raw) => disk::open_raw(raw, &opts),
        })
    };
    let mut spec = cfg.spec(&serial, backend.disk().info());
    spec.id.clone_from(&t.spec().id);
    log::info!(
        "live migration destination for pid {}: serving {listen_desc}; the disk is taken over \
         when the destination's rings start",
        t.source_pid()
    );
    daemon::run(
        backend,
        Serving {
            listener,
            listen_desc,
            claim,
            control: own_control,
            control_adopted: false,
            spec,
            takeover: Some(t),
            switch: Some(daemon::Switch {
                pending,
                gate,
                opts,
                open,
            }),
            sandbox: (cfg.sandbox, cfg.on_violation),
        },
        signals,
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes_and_nothing_else() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("8K"), Some(8192));
        for bad in ["", "M", "-1", "1.5G", "12Q", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
