// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket (`serve --control`, issue 12 item 4) and live resize
//! of raw disks (item 5), through the real binary: `status` reports the
//! disk and the device, `resize` grows and (with --force) shrinks a raw
//! disk whose new capacity a libblkio client sees and serves, a COW
//! refuses with a message that says why and what to do, and hostile input
//! (garbage, an overlong line, another user, a second daemon on the same
//! path) is answered and survived. The guest's view of a live resize is
//! `tests/boot.rs` (`a_raw_disk_grows_while_the_guest_runs`).

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use common::{
    client::{self, Client},
    daemon::{Daemon, DaemonBuilder},
};

const MIB: u64 = 1 << 20;

fn status(control: &Path) -> serde_json::Value {
    let (ok, out) = control_cli(&["status", "--json"], control);
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn raw_daemon(dir: &Path, size: u64) -> (Daemon, PathBuf, PathBuf) {
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; usize::try_from(size).unwrap()]).unwrap();
    let control = dir.join("control.sock");
    let d = DaemonBuilder::new(dir)
        .raw(&image)
        .arg("--control")
        .arg(&control)
        .spawn();
    (d, image, control)
}

fn connect(d: &Daemon) -> Client {
    client::connect_one_queue(d.socket())
}

#[test]
fn status_reports_the_disk_and_the_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let (d, image, control) = raw_daemon(dir.path(), 4 * MIB);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is private");
    let v = status(&control);
    assert_eq!(v["v"], 1);
    assert_eq!(v["disk"]["kind"], "raw");
    assert_eq!(v["disk"]["path"], image.display().to_string());
    assert_eq!(v["disk"]["sectors"], 4 * MIB / 512);
    assert_eq!(v["device"]["connected"], false);
    let mut c = connect(&d);
    let mem = c.mem;
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &[7u8; 4096]), 0);
    let v = status(&control);
    assert_eq!(v["device"]["connected"], true, "{v}");
    assert_ne!(v["device"]["features"], 0);
    assert!(v["device"]["completed"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["device"]["in_flight"], 0);
    let (ok, human) = control_cli(&["status"], &control);
    assert!(
        ok && human.contains("raw") && human.contains("connected"),
        "{human}"
    );
    drop(c);
    d.terminate();
    assert!(
        !control.exists(),
        "the daemon removes its control socket at exit"
    );
}

#[test]
fn a_raw_disk_grows_and_shrinks_while_served() {
    let dir = tempfile::tempdir().unwrap();
    let (d, image, control) = raw_daemon(dir.path(), 4 * MIB);
    let (ok, out) = control_cli(&["resize", "6M"], &control);
    assert!(ok, "{out}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 6 * MIB);
    assert_eq!(status(&control)["disk"]["sectors"], 6 * MIB / 512);
    // A client sees the new capacity and serves the new tail.
    let mut c = connect(&d);
    assert_eq!(c.capacity, 6 * MIB);
    let mem = c.mem;
    let tail: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(client::write_at(c.q(0), mem, 0, 6 * MIB - 4096, &tail), 0);
    assert_eq!(
        client::read_at(c.q(0), mem, 0, 6 * MIB - 4096, 4096).unwrap(),
        tail
    );
    // Shrinking cuts off what the guest may address: only with --force.
    let (ok, out) = control_cli(&["resize", "5M"], &control);
    assert!(!ok && out.contains("--force"), "{out}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 6 * MIB);
    let (ok, out) = control_cli(&["resize", "--force", "5M"], &control);
    assert!(ok, "{out}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 5 * MIB);
    // The connected client's requests past the new end now fail; below it
    // they are served.
    assert!(client::read_at(c.q(0), mem, 0, 5 * MIB, 4096).is_err());
    assert!(client::read_at(c.q(0), mem, 0, 5 * MIB - 4096, 4096).is_ok());
    for bad in ["0", "1000", "12Q", "-1"] {
        let (ok, out) = control_cli(&["resize", bad], &control);
        assert!(!ok, "resize {bad}: {out}");
    }
    drop(c);
    let st = d.terminate();
    assert!(st.success(), "{st}");
}

#[test]
fn a_cow_refuses_to_resize_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 4 * MIB);
    let cow = dir.path().join("vm.cow");
    let control = dir.path().join("control.sock");
    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, Some(&base))
        .arg("--control")
        .arg(&control)
        .spawn();
    let cow_len = std::fs::metadata(&cow).unwrap().len();
    let (ok, out) = control_cli(&["resize", "8M"], &control);
    assert!(!ok, "{out}");
    assert!(
        out.contains("vm.cow") && out.contains("size of its backing file") && out.contains("--raw"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&cow).unwrap().len(), cow_len);
    assert_eq!(std::fs::metadata(&base).unwrap().len(), 4 * MIB);
    assert_eq!(status(&control)["disk"]["kind"], "cow");
    assert!(d.terminate().success());
}

/// One request line, raw; returns the reply line.
fn exchange(s: &mut UnixStream, line: &[u8]) -> String {
    s.write_all(line).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    out
}

#[test]
fn hostile_control_clients_are_answered_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _image, control) = raw_daemon(dir.path(), 4 * MIB);
    let mut s = UnixStream::connect(&control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for (line, needle) in [
        (&b"garbage\n"[..], "bad request"),
        (b"{\"v\":1,\"cmd\":\"format-c\"}\n", "bad request"),
        (b"{\"v\":1,\"cmd\":\"status\",\"extra\":1}\n", "bad request"),
        (b"{\"v\":2,\"cmd\":\"status\"}\n", "version 2"),
        (
            b"{\"v\":1,\"cmd\":\"resize\",\"size\":\"big\"}\n",
            "bad request",
        ),
        (b"\xff\xfe\n", "bad request"),
    ] {
        let r = exchange(&mut s, line);
        assert!(
            r.contains("\"ok\":false") && r.contains(needle),
            "{line:?}: {r}"
        );
    }
    // The same connection still works after errors.
    assert!(exchange(&mut s, b"{\"v\":1,\"cmd\":\"status\"}\n").contains("\"ok\":true"));
    // A line longer than the limit is refused and the connection closed.
    let mut s = UnixStream::connect(&control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(&vec![b'x'; 1 << 20]);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("longer than"), "{reply}");
    // Another user is refused by its credentials, even where the file mode
    // would let it in.
    // (The tempdir and a copy of the binary are opened up to it for that;
    // tempdirs and the CI checkout are private to root.)
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let cli_copy = dir.path().join("vub-cli");
    std::fs::copy(BINARY, &cli_copy).unwrap();
    std::fs::set_permissions(&cli_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(&cli_copy)
        .args(["status", "--control"])
        .arg(&control)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run the CLI as user 65534");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "another user was served");
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        d.log().contains("refused a client of user 65534"),
        "{}",
        d.log()
    );
    // A second daemon does not take a live control socket over.
    let dir2 = tempfile::tempdir().unwrap();
    let image2 = dir2.path().join("other.raw");
    std::fs::write(&image2, vec![0u8; 1 << 20]).unwrap();
    let out = Command::new(BINARY)
        .args(["serve", "--socket"])
        .arg(dir2.path().join("s.sock"))
        .arg("--raw")
        .arg(&image2)
        .arg("--control")
        .arg(&control)
        .args(["--crash-journal", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another process serves it"),
        "{err}"
    );
    // Through all of it the daemon kept serving.
    assert_eq!(status(&control)["disk"]["sectors"], 4 * MIB / 512);
    let mut c = connect(&d);
    let mem = c.mem;
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &[1u8; 4096]), 0);
    drop(c);
    assert!(d.terminate().success());
}

/// Counts CONFIG_CHANGE_MSGs received on a frontend's backend channel.
#[derive(Default)]
struct ConfigChanges(std::sync::atomic::AtomicUsize);

impl vhost::vhost_user::VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> vhost::vhost_user::HandlerResult<u64> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(0)
    }
}

/// Gives `s` a backend channel; returns the change counter (a thread
/// serves the channel until the daemon closes it).
fn backend_channel(s: &mut common::frontend::Session) -> std::sync::Arc<ConfigChanges> {
    use vhost::vhost_user::{FrontendReqHandler, VhostUserFrontend};
    let seen = std::sync::Arc::new(ConfigChanges::default());
    let mut h = FrontendReqHandler::new(seen.clone()).unwrap();
    s.fe.set_backend_request_fd(&h.get_tx_raw_fd()).unwrap();
    std::thread::spawn(move || while h.handle_request().is_ok() {});
    seen
}

fn wait_count(c: &ConfigChanges, n: usize) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if c.0.load(std::sync::atomic::Ordering::SeqCst) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The capacity field of the config space, as a frontend reads it.
fn capacity(s: &mut common::frontend::Session) -> u64 {
    use vhost::vhost_user::{message::VhostUserConfigFlags, VhostUserFrontend};
    let (_, payload) =
        s.fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .unwrap();
    u64::from_le_bytes(payload[..8].try_into().unwrap())
}

/// A resize is told to the frontend on its backend channel at once
/// (CONFIG_CHANGE_MSG, then GET_CONFIG shows the new capacity), and again
/// to a frontend that connects later, once its rings run: QEMU does not
/// read the config space again on reconnect.
#[test]
fn resize_is_announced_now_and_to_the_next_frontend() {
    use common::frontend::{pattern, Daemon as FeDaemon, Opts, Session};
    let ctl = tempfile::tempdir().unwrap();
    let control = ctl.path().join("control.sock");
    let d = FeDaemon::start(&["--control", control.to_str().unwrap()]);
    let mut s = Session::open(&d, &Opts::default());
    let seen = backend_channel(&mut s);
    let before = capacity(&mut s);
    let (ok, out) = control_cli(&["resize", "2M"], &control);
    assert!(ok && out.contains("the frontend was told"), "{out}");
    assert!(wait_count(&seen, 1), "no CONFIG_CHANGE_MSG\n{}", d.log());
    assert_eq!(
        (before, capacity(&mut s)),
        (2048, 4096),
        "capacity before and after"
    );
    s.check_write(4000, &pattern(3, 4096));
    s.check_read(4000, &pattern(3, 4096));
    drop(s);
    let mut s = Session::open(&d, &Opts::default());
    let seen = backend_channel(&mut s);
    // The announcement waits for the rings to run: the next request.
    s.check_read(4000, &pattern(3, 4096));
    assert!(
        wait_count(&seen, 1),
        "the next frontend was not told\n{}",
        d.log()
    );
    assert_eq!(capacity(&mut s), 4096);
    drop(s);
    let (st, log) = d.stop();
    assert!(st.success(), "{st}\n{log}");
}
