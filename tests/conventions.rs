// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user backend program conventions (QEMU
//! docs/interop/vhost-user.rst, "Backend program conventions", and
//! vhost-user.json): `--print-capabilities` answers and does nothing else;
//! the invocation without a subcommand, `--socket-path=PATH
//! --blk-file=FILE [--read-only]`, serves (a COW file as a COW); the JSON
//! descriptor names a block backend. (`--fd=FDNUM` is
//! `hostile.rs::an_inherited_listening_socket_is_served`.)
//!
//! Negative controls: the descriptor check fails on a descriptor of another
//! type (checked in the test); a client that does not ask for read-only is
//! refused by the `--read-only` device, and a write is refused.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    backing_byte,
    client::{self, Client, ClientConfig},
    daemon::listening,
    make_backing, BINARY, SECTOR,
};
use serde_json::Value;

/// Kills the daemon when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&std::ffi::OsStr], dir: &Path, log: &str) -> Running {
    let out = std::fs::File::create(dir.join(log)).unwrap();
    let err = out.try_clone().unwrap();
    Running(
        Command::new(BINARY)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap(),
    )
}

fn wait_listening(sock: &Path, d: &mut Running, log: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    while !listening(sock) {
        if let Some(st) = d.0.try_wait().unwrap() {
            panic!(
                "daemon exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < end, "the socket never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn print_capabilities_answers_json_and_does_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("never.sock");
    let out = Command::new(BINARY)
        .arg("--print-capabilities")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(dir.path().join("missing.img"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "block");
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        features.contains(&"read-only") && features.contains(&"blk-file"),
        "{v}"
    );
    assert!(out.stderr.is_empty(), "nothing else is said");
    assert!(!sock.exists(), "nothing else is done: no socket bound");
}

#[test]
fn the_conventions_invocation_serves_a_raw_image_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let size = 2 << 20;
    make_backing(&img, size);
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("vub.sock");
    let mut d = spawn(
        &[
            format!("--socket-path={}", sock.display()).as_ref(),
            format!("--blk-file={}", img.display()).as_ref(),
            "--read-only".as_ref(),
        ],
        dir.path(),
        "d.log",
    );
    wait_listening(&sock, &mut d, &dir.path().join("d.log"));
    let err = Client::connect(&sock, &ClientConfig::default())
        .expect_err("a read-write client must not start on a --read-only device");
    assert_eq!(err.errno(), client::Errno::ROFS, "{err}");
    let mut c = Client::connect(
        &sock,
        &ClientConfig {
            num_queues: 1,
            read_only: true,
            mem_len: 1 << 20,
        },
    )
    .unwrap();
    let mem = c.mem;
    let got = client::read_at(c.q(0), mem, 0, 7 * SECTOR as u64, 4096).unwrap();
    let want: Vec<u8> = (7 * SECTOR as u64..7 * SECTOR as u64 + 4096)
        .map(backing_byte)
        .collect();
    assert!(got == want, "the image's data");
    assert_ne!(client::write_at(c.q(0), mem, 0, 0, &[1u8; 512]), 0);
    drop(c);
    assert_eq!(std::fs::read(&img).unwrap(), before, "read-only: unchanged");
}

#[test]
fn blk_file_serves_a_cow_file_as_a_cow() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("disk.cow");
    let st = Command::new(BINARY)
        .arg("create")
        .arg(&cow)
        .arg(&base)
        .status()
        .unwrap();
    assert!(st.success());
    let sock = dir.path().join("vub.sock");
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let log = dir.path().join("d.log");
    let mut d = spawn(
        &[
            format!("--socket-path={}", sock.display()).as_ref(),
            format!("--blk-file={}", cow.display()).as_ref(),
            format!("--crash-journal={}", journal.display()).as_ref(),
        ],
        dir.path(),
        "d.log",
    );
    wait_listening(&sock, &mut d, &log);
    let mut c = client::connect_one_queue(&sock);
    let mem = c.mem;
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &[0x5a; 4096]), 0);
    assert_eq!(client::flush(c.q(0)), 0);
    let got = client::read_at(c.q(0), mem, 4096, 4096, 512).unwrap();
    let want: Vec<u8> = (4096..4096 + 512).map(backing_byte).collect();
    assert!(got == want, "unwritten sectors come from the base");
    drop(c);
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("(cow disk"),
        "served as a COW"
    );
    let base_now = std::fs::read(&base).unwrap();
    let want: Vec<u8> = (0..1 << 20).map(backing_byte).collect();
    assert!(base_now == want, "the base is never written");
}

/// The descriptor management tools read (`contrib/50-vhost-user-ubd.json`,
/// installed in /usr/share/qemu/vhost-user/): a block backend, an absolute
/// binary path.
#[test]
fn the_json_descriptor_names_a_block_backend() {
    let check = |v: &Value| -> Result<(), String> {
        if v["type"] != "block" {
            return Err(format!("type {}", v["type"]));
        }
        match v["binary"].as_str() {
            Some(b) if b.starts_with('/') && b.ends_with("/vhost-user-ubd") => Ok(()),
            other => Err(format!("binary {other:?}")),
        }
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/50-vhost-user-ubd.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    check(&v).unwrap();
    assert!(v["description"].is_string());
    let mut other = v.clone();
    other["type"] = "fs".into();
    assert!(check(&other).is_err(), "negative control");
}

/// `make install-files` (what `make install` does after the release
/// build) stages the binary, a man page generated from the clap
/// definitions with the examples, the systemd units and the descriptor,
/// whose binary path is the installed one.
#[test]
fn make_install_stages_the_binary_man_page_units_and_descriptor() {
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-s", "install-files"])
        .arg(format!("BIN={BINARY}"))
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/opt/ubd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let root = dest.path().join("opt/ubd");
    for f in [
        "bin/vhost-user-ubd",
        "lib/systemd/system/vhost-user-ubd@.socket",
        "lib/systemd/system/vhost-user-ubd@.service",
    ] {
        assert!(root.join(f).is_file(), "{f}");
    }
    let man = std::fs::read_to_string(root.join("share/man/man1/vhost-user-ubd.1")).unwrap();
    assert!(man.contains(".TH vhost-user-ubd 1"), "a man page");
    for word in ["takeover", "print\\-capabilities", "Examples:"] {
        assert!(man.contains(word), "{word} in the man page");
    }
    let desc: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("share/qemu/vhost-user/50-vhost-user-ubd.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(desc["binary"], "/opt/ubd/bin/vhost-user-ubd");
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/vhost-user-ubd@.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/ubd/bin/vhost-user-ubd serve"),
        "{unit}"
    );
}
