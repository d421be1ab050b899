// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The sandbox (`--sandbox seccomp`, the default): once serving, the
//! daemon has no capabilities, no_new_privs and a seccomp filter on every
//! thread; a system call outside the allow-list from a serving thread kills
//! it (test hook `VHOST_USER_UBD_TEST_FORBIDDEN_SYSCALL`: `socket(AF_INET)`
//! at the first kick). Every other test runs with the sandbox on.
//!
//! Negative controls: the same hook under `--sandbox none` goes through
//! and the daemon serves on; under `--seccomp log` it is allowed (and
//! logged by the kernel).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::{
    client::{self, Client, ClientConfig},
    daemon::DaemonBuilder,
};

const HOOK: &str = "VHOST_USER_UBD_TEST_FORBIDDEN_SYSCALL";

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0x33u8; 1 << 20]).unwrap();
    img
}

fn one_queue() -> ClientConfig {
    ClientConfig {
        num_queues: 1,
        read_only: false,
        mem_len: 1 << 20,
    }
}

#[test]
fn a_serving_daemon_has_no_capabilities_and_a_seccomp_filter() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonBuilder::new(dir.path())
        .raw(&image(dir.path()))
        .spawn();
    let pid = d.pid();
    assert_eq!(status_field(pid, "Seccomp"), "2", "filter mode");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    // It still serves (and every thread is filtered: TSYNC).
    let mut c = Client::connect(d.socket(), &one_queue()).unwrap();
    let mem = c.mem;
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &[1u8; 4096]), 0);
    assert_eq!(
        client::read_at(c.q(0), mem, 4096, 0, 4096).unwrap(),
        vec![1u8; 4096]
    );
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let st = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(
            st.contains("Seccomp:\t2"),
            "a thread without the filter:\n{st}"
        );
    }
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_forbidden_system_call_from_a_serving_thread_kills_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonBuilder::new(dir.path())
        .raw(&image(dir.path()))
        .env(HOOK, "1")
        .spawn();
    // The first kick makes the worker thread call socket(AF_INET).
    if let Ok(mut c) = Client::connect(d.socket(), &one_queue()) {
        let mem = c.mem;
        let p = mem.ptr(0, 512);
        c.q(0).read(0, p, 512, 1, client::ReqFlags::empty());
        let _ = client::wait(c.q(0), 1, Duration::from_secs(5));
    }
    let st = d
        .wait_timeout(Duration::from_secs(20))
        .expect("the daemon survived a forbidden system call");
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}\n{}", d.log());
}

#[test]
fn negative_controls_without_the_sandbox_or_in_log_mode_the_call_goes_through() {
    for args in [&["--sandbox", "none"][..], &["--seccomp", "log"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let d = DaemonBuilder::new(dir.path())
            .raw(&image(dir.path()))
            .args(args)
            .env(HOOK, "1")
            .spawn();
        let mut c = Client::connect(d.socket(), &one_queue()).unwrap();
        let mem = c.mem;
        assert_eq!(
            client::read_at(c.q(0), mem, 0, 0, 512).unwrap(),
            vec![0x33u8; 512],
            "{args:?}"
        );
        drop(c);
        assert!(
            d.log().contains("the forbidden system call went through"),
            "{args:?}: {}",
            d.log()
        );
        assert_eq!(d.terminate().code(), Some(0), "{args:?}");
    }
}
