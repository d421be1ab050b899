// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `serve --backing-check size+mtime|size|none`: a base whose mtime cannot
//! be kept (a network store mounted as a file) is served with `size`, said
//! at start, while the default still refuses it; `size` still refuses a base
//! of another size; while served, an mtime change is ignored by `size` and
//! fails base reads under the default (the negative control, R6).

mod common;

use std::time::{Duration, Instant};

use common::{
    backing_byte,
    client::{self},
    daemon::DaemonBuilder,
    make_backing, set_mtime, BINARY,
};

fn cow_over(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.img");
    make_backing(&base, 1 << 20);
    set_mtime(&base, 1_700_000_000);
    let cow = dir.join("disk.cow");
    let st = std::process::Command::new(BINARY)
        .arg("create")
        .arg(&cow)
        .arg(&base)
        .status()
        .unwrap();
    assert!(st.success());
    (base, cow)
}

fn serve_refused(dir: &std::path::Path, cow: &std::path::Path, check: &str) -> String {
    let out = std::process::Command::new(BINARY)
        .args([
            "serve",
            "--crash-journal",
            "off",
            "--backing-check",
            check,
            "--socket",
        ])
        .arg(dir.join("refused.sock"))
        .arg("--cow")
        .arg(cow)
        .output()
        .unwrap();
    assert!(!out.status.success(), "--backing-check {check} must refuse");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn size_serves_a_base_whose_mtime_changed_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = cow_over(dir.path());
    set_mtime(&base, 1_700_000_999);
    let err = serve_refused(dir.path(), &cow, "size+mtime");
    assert!(err.contains("mtime"), "{err}");
    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, None)
        .args(["--backing-check", "size"])
        .spawn();
    assert!(
        d.log()
            .contains("checked for its size only (--backing-check size)"),
        "{}",
        d.log()
    );
    let mut c = client::connect_one_queue(d.socket());
    let mem = c.mem;
    let got = client::read_at(c.q(0), mem, 0, 8192, 512).unwrap();
    assert!(got == (8192..8192 + 512).map(backing_byte).collect::<Vec<_>>());
    // While served: another mtime change is not looked at.
    set_mtime(&base, 1_700_001_500);
    std::thread::sleep(Duration::from_millis(1500));
    let got = client::read_at(c.q(0), mem, 0, 16384, 512).unwrap();
    assert!(got == (16384..16384 + 512).map(backing_byte).collect::<Vec<_>>());
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn size_still_refuses_a_base_of_another_size_and_none_takes_any() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = cow_over(dir.path());
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    f.set_len((1 << 20) + 512).unwrap();
    drop(f);
    let err = serve_refused(dir.path(), &cow, "size");
    assert!(err.contains("size"), "{err}");
    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, None)
        .args(["--backing-check", "none"])
        .spawn();
    assert!(d.log().contains("checked for nothing only"), "{}", d.log());
    assert_eq!(d.terminate().code(), Some(0));
}

/// Negative control: under the default, the same mtime change while
/// served makes base reads fail (R6).
#[test]
fn the_default_fails_base_reads_after_an_mtime_change_while_served() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = cow_over(dir.path());
    let d = DaemonBuilder::new(dir.path()).cow(&cow, None).spawn();
    let mut c = client::connect_one_queue(d.socket());
    let mem = c.mem;
    assert!(client::read_at(c.q(0), mem, 0, 0, 512).is_ok());
    set_mtime(&base, 1_700_001_500);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if client::read_at(c.q(0), mem, 0, 4096, 512).is_err() {
            break;
        }
        assert!(Instant::now() < end, "base reads still succeed");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(c);
    let _ = d.terminate();
}

/// A loop device attached to `file` (detached on drop); `None` where loop
/// devices cannot be used here.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Option<Self> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Self(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// A block-device base (krbd, rbd-nbd, the kernel NBD client; here a loop
/// device): `create` takes the device's size (its metadata says 0), and a
/// device of another size is refused under `size`, as a file would be.
/// Negative control: `none` serves the wrong device.
#[test]
fn a_block_device_base_is_measured_not_taken_at_its_word() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let Some(dev) = Loop::attach(&base) else {
        return;
    };
    let cow = dir.path().join("disk.cow");
    let out = std::process::Command::new(BINARY)
        .arg("create")
        .arg(&cow)
        .arg(&dev.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let info = std::process::Command::new(BINARY)
        .args(["info", "--json"])
        .arg(&cow)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["size"], 1 << 20, "the device's size: {v}");
    {
        let d = DaemonBuilder::new(dir.path())
            .name("right")
            .cow(&cow, None)
            .args(["--backing-check", "size"])
            .spawn();
        let mut c = client::connect_one_queue(d.socket());
        let mem = c.mem;
        let got = client::read_at(c.q(0), mem, 0, 4096, 512).unwrap();
        assert!(got == (4096..4096 + 512).map(backing_byte).collect::<Vec<_>>());
        drop(c);
        assert_eq!(d.terminate().code(), Some(0));
    }
    // Another device at the same path: half the size.
    drop(dev);
    let small = dir.path().join("small.img");
    make_backing(&small, 1 << 19);
    let Some(dev2) = Loop::attach(&small) else {
        return;
    };
    if std::path::Path::new(&dev2.0)
        == std::path::Path::new(&v["backing_file"].as_str().unwrap_or(""))
    {
        let err = serve_refused(dir.path(), &cow, "size");
        assert!(err.contains("size"), "{err}");
        let d = DaemonBuilder::new(dir.path())
            .name("none")
            .cow(&cow, None)
            .args(["--backing-check", "none"])
            .spawn();
        assert_eq!(d.terminate().code(), Some(0), "negative control");
    } else {
        eprintln!(
            "skipped the size check: the loop device came back as {}",
            dev2.0
        );
    }
}
