// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Started the way systemd starts it: socket activation through
//! `LISTEN_FDS`/`LISTEN_PID` (the listening socket as descriptor 3, the
//! variables naming this very process), and the notification protocol
//! (`READY=1` once the socket accepts, `STOPPING=1` at SIGTERM) on a
//! `NOTIFY_SOCKET` datagram socket of the test's own. Once through a shell
//! that does exactly what systemd does before exec, once through Debian's
//! `systemd-socket-activate` when it is installed.
//!
//! Negative control: `LISTEN_PID` naming another process is not taken for
//! this one's (the daemon then has no socket and says so).

mod common;

use std::{
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    client::{self, Client, ClientConfig},
    make_backing, BINARY,
};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Datagrams received on `notify` within `timeout`, until one contains
/// `want`.
fn wait_notify(notify: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut got = Vec::new();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < end {
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            got.push(msg);
            if done {
                return got;
            }
        }
    }
    panic!("no {want:?} from the daemon within {timeout:?}; got {got:?}");
}

/// A client reads and writes through the activated socket.
fn serves(sock: &Path) {
    let mut c = Client::connect(
        sock,
        &ClientConfig {
            num_queues: 1,
            read_only: false,
            mem_len: 1 << 20,
        },
    )
    .unwrap();
    let mem = c.mem;
    assert_eq!(client::write_at(c.q(0), mem, 0, 4096, &[0x42; 4096]), 0);
    assert_eq!(
        client::read_at(c.q(0), mem, 8192, 4096, 4096).unwrap(),
        vec![0x42; 4096]
    );
}

fn sigterm_exits_0(d: &mut Running, notify: &UnixDatagram) {
    let pid = i32::try_from(d.0.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child this test started and has not
    // reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    wait_notify(notify, "STOPPING=1", Duration::from_secs(20));
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(st) = d.0.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            return;
        }
        assert!(Instant::now() < end, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn socket_activation_and_notifications_as_systemd_does_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_backing(&img, 1 << 20);
    let sock = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on our own descriptor so bash inherits it (dash redirects only descriptors 0-9).
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // What systemd does between fork and exec: the socket as fd 3,
    // LISTEN_FDS=1 and LISTEN_PID naming the process that execs.
    // (When the listener already is descriptor 3 there is nothing to move.)
    let moves = if fd == 3 {
        String::new()
    } else {
        format!("exec 3<&{fd}; exec {fd}<&-; ")
    };
    let script = format!(
        "{moves}LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve --raw \"$1\" --crash-journal off"
    );
    let log = std::fs::File::create(dir.path().join("d.log")).unwrap();
    let mut d = Running(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg(BINARY)
            .arg(&img)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    drop(listener);
    let ready = wait_notify(&notify, "READY=1", Duration::from_secs(20));
    assert!(
        ready.iter().any(|m| m.contains("STATUS=serving")),
        "{ready:?}"
    );
    serves(&sock);
    let logged = std::fs::read_to_string(dir.path().join("d.log")).unwrap();
    assert!(
        logged.contains("systemd socket activation: serving fd 3"),
        "{logged}"
    );
    sigterm_exits_0(&mut d, &notify);
}

#[test]
fn systemd_socket_activate_starts_it_at_the_first_connection() {
    let Some(tool) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists()) else {
        eprintln!("systemd-socket-activate not installed: skipped (the shell test covers it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_backing(&img, 1 << 20);
    let sock = dir.path().join("activated.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = std::fs::File::create(dir.path().join("d.log")).unwrap();
    let mut d = Running(
        Command::new(tool)
            .arg("-l")
            .arg(&sock)
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
            .arg("-E")
            .arg("RUST_LOG=info")
            .arg(BINARY)
            .args(["serve", "--crash-journal", "off", "--raw"])
            .arg(&img)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while !common::daemon::listening(&sock) {
        assert!(
            Instant::now() < end,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which then accepts it.
    serves(&sock);
    wait_notify(&notify, "READY=1", Duration::from_secs(20));
    sigterm_exits_0(&mut d, &notify);
}

#[test]
fn listen_pid_of_another_process_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_backing(&img, 1 << 20);
    let out = Command::new(BINARY)
        .args(["serve", "--crash-journal", "off", "--raw"])
        .arg(&img)
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give exactly one of --socket"), "{err}");
}
