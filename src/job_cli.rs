// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `flatten`, `export` and `cancel` commands: clients of a serving
//! daemon's control socket. The job runs in the daemon; the command starts
//! it and, unless `--detach`, follows it until it ends (a progress bar on a
//! terminal, one JSON line per second with `--output json`). Interrupting
//! the command leaves the job running; `cancel` stops it.

use std::{
    io::IsTerminal,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use vhost_user_ubd::daemon::{self, DaemonError};

use crate::args::{JobArgs, Output};

/// Starts a flatten and follows it.
pub fn flatten(j: &JobArgs) -> Result<ExitCode, DaemonError> {
    let mut req = json!({"v": 1, "cmd": "flatten"});
    if let Some(r) = j.rate {
        req["rate"] = json!(mb_to_bytes(r));
    }
    start(&j.control, &req, "flatten", j.detach, j.output)
}

/// Starts a point-in-time export to `out` and follows it.
pub fn export(j: &JobArgs, out: &Path, force: bool) -> Result<ExitCode, DaemonError> {
    // The daemon may run in another directory: it gets an absolute path.
    let out = std::path::absolute(out).map_err(|e| DaemonError::Control {
        path: out.to_path_buf(),
        reason: format!("cannot make the path absolute: {e}"),
    })?;
    let mut req = json!({"v": 1, "cmd": "export", "path": out, "force": force});
    if let Some(r) = j.rate {
        req["rate"] = json!(mb_to_bytes(r));
    }
    start(&j.control, &req, "export", j.detach, j.output)
}

/// Stops the running job and prints its final status.
pub fn cancel(control: &Path, output: Output) -> Result<ExitCode, DaemonError> {
    let v = daemon::control::call(control, &json!({"v": 1, "cmd": "cancel"}))?;
    let job = &v["job"];
    match output {
        Output::Json => println!("{job}"),
        Output::Text => println!("{}", summary(job)),
    }
    Ok(ExitCode::SUCCESS)
}

fn mb_to_bytes(mb: f64) -> u64 {
    (mb.max(0.0) * 1e6) as u64
}

fn start(
    control: &Path,
    req: &Value,
    kind: &str,
    detach: bool,
    output: Output,
) -> Result<ExitCode, DaemonError> {
    daemon::control::call(control, req)?;
    if detach {
        if output == Output::Text {
            println!(
                "{kind} started; follow it with `vhost-user-ubd status --control {}`, stop it \
                 with `vhost-user-ubd cancel --control {}`",
                control.display(),
                control.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(control, kind, output)
}

fn follow(control: &Path, kind: &str, output: Output) -> Result<ExitCode, DaemonError> {
    let bar = (output == Output::Text && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{kind} (Ctrl-C leaves it running)"));
        bar
    });
    let mut last_line = Instant::now();
    loop {
        let v = daemon::control::call(control, &json!({"v": 1, "cmd": "status"}))?;
        let job = &v["job"];
        let state = job["state"].as_str().unwrap_or("none");
        if let Some(bar) = &bar {
            bar.set_length(job["bytes_total"].as_u64().unwrap_or(0));
            bar.set_position(job["bytes_done"].as_u64().unwrap_or(0));
        }
        let running = state == "running";
        if output == Output::Json && (!running || last_line.elapsed() >= Duration::from_secs(1)) {
            println!("{job}");
            last_line = Instant::now();
        }
        if !running {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            if output == Output::Text {
                println!("{}", summary(job));
            }
            return Ok(if state == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        std::thread::sleep(Duration::from_millis(if bar.is_some() { 200 } else { 250 }));
    }
}

fn summary(job: &Value) -> String {
    let mb = |k: &str| job[k].as_u64().unwrap_or(0) as f64 / 1e6;
    let mut s = format!(
        "{} {}: {:.1} of {:.1} MB, {:.1} MB copied, {:.1} s, {:.0} MB/s",
        job["kind"].as_str().unwrap_or("job"),
        job["state"].as_str().unwrap_or("?"),
        mb("bytes_done"),
        mb("bytes_total"),
        mb("bytes_copied"),
        job["elapsed_s"].as_f64().unwrap_or(0.0),
        mb("rate_bps"),
    );
    if let Some(t) = job["target"].as_str() {
        s.push_str(&format!("; image {t}"));
    }
    if let Some(e) = job["error"].as_str() {
        s.push_str(&format!("; error: {e}"));
    }
    if let Some(n) = job["note"].as_str() {
        s.push_str(&format!("; note: {n}"));
    }
    s
}
