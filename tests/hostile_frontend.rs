// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A hostile guest and a hostile frontend, driving raw rings with the
//! `vhost` crate's frontend against the real binary: what they break must
//! stay theirs. After each fault the same daemon serves a well-behaved
//! frontend, with its CPU idle and its log bounded.

mod common;

use std::{thread, time::Duration};

use common::frontend::{initial, pattern, Daemon, GuestMem, MemPath, Opts, Session, TIMEOUT};
use vhost::{vhost_user::VhostUserFrontend, VhostBackend};

const WATCHDOG: Duration = Duration::from_secs(30);

/// The daemon serves a new, well-behaved frontend; sector 8 holds `at8`.
fn serves_a_new_frontend(d: &Daemon, seed: u8, at8: &[u8]) {
    let mut s = Session::open(d, &Opts::default());
    let p = pattern(seed, 4096);
    s.check_write(200, &p);
    s.check_read(200, &p);
    s.check_read(8, at8);
}

/// CPU the daemon burns in `window` of idling.
fn cpu_in(d: &Daemon, window: Duration) -> Duration {
    let a = d.cpu_time();
    thread::sleep(window);
    d.cpu_time().saturating_sub(a)
}

/// Fault 8 of the restructure issue: an available index more than the
/// queue size ahead of the next one (or moved back by one) made the worker
/// spin at 100% CPU holding its lock, virtio-queue log "invalid available
/// ring index" at ~100 MB/s, and the daemon never accept another frontend.
#[test]
fn a_broken_available_index_stops_that_queue_only() {
    for (name, delta) in [("ahead by size + 5", 64u16 + 5), ("back by one", u16::MAX)] {
        let d = Daemon::start(&[]);
        let _wd = d.watchdog(WATCHDOG);
        let mut s = Session::open(&d, &Opts::default());
        s.check_write(8, &pattern(1, 4096));
        let bad = s.ring.avail_idx.wrapping_add(delta);
        s.gm.write(s.ring.avail + 2, &bad.to_le_bytes());
        for _ in 0..20 {
            s.ring.kick(&s.gm);
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            d.wait_for_log("the guest broke its ring", TIMEOUT),
            "{name}: {}",
            d.log()
        );
        let cpu = cpu_in(&d, Duration::from_secs(1));
        assert!(
            cpu < Duration::from_millis(200),
            "{name}: the daemon used {cpu:?} of CPU in 1 s with a broken ring"
        );
        let log = d.log();
        assert_eq!(d.log_count("the guest broke its ring"), 1, "{name}: {log}");
        assert!(
            d.log_count("invalid available ring index") <= 1,
            "{name}: the crate's log line repeats: {log}"
        );
        assert!(
            log.len() < 16 * 1024,
            "{name}: log grew to {} bytes",
            log.len()
        );
        drop(s);
        serves_a_new_frontend(&d, 2, &pattern(1, 4096));
        let (st, log) = d.stop();
        assert!(st.success(), "{name}: {st}\n{log}");
    }
}

/// Fault 10: a memory region larger than its file was accepted, and the
/// first status-byte write there killed the daemon with SIGBUS.
#[test]
fn a_memory_region_past_the_end_of_its_file_is_refused() {
    for path in [MemPath::SetMemTable, MemPath::AddMemReg] {
        let d = Daemon::start(&[]);
        let _wd = d.watchdog(WATCHDOG);
        let mut fe = d.connect(16);
        let _ = common::frontend::negotiate(&mut fe, path);
        let gm = GuestMem::new(&[(0, 2 << 20)]);
        gm.shrink_file(0, 1 << 20);
        let regions = gm.regions();
        let refused = match path {
            MemPath::SetMemTable => fe.set_mem_table(&regions).is_err(),
            MemPath::AddMemReg => fe.add_mem_region(&regions[0]).is_err(),
        };
        assert!(
            refused,
            "{path:?}: a region past the end of its memfd was accepted"
        );
        assert!(
            d.wait_for_log("memory table refused", TIMEOUT),
            "{}",
            d.log()
        );
        assert!(d.is_running(), "{path:?}: the daemon died");
        drop(fe);
        serves_a_new_frontend(&d, 3, &initial(8, 4096));
        let (st, log) = d.stop();
        assert!(st.success(), "{path:?}: {st}\n{log}");
    }
}

/// Fault 9: a kick descriptor that reaches EOF (a pipe whose writer closed)
/// ended that queue's worker thread silently: its requests were never
/// answered and nothing was logged. Now the daemon notices, says so, and
/// drops the connection so the frontend can reconnect.
#[test]
fn a_worker_ended_by_a_bad_kick_descriptor_drops_the_connection() {
    use std::os::fd::FromRawFd;
    let d = Daemon::start(&[]);
    let _wd = d.watchdog(WATCHDOG);
    let mut s = Session::open(&d, &Opts::default());
    s.check_write(8, &pattern(1, 4096));
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (reader, writer) = unsafe {
        (
            vmm_sys_util::eventfd::EventFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // vhost-user-backend keeps the first kick descriptor in its epoll set
    // and reads the vring's current one when it fires.
    s.fe.set_vring_kick(0, &reader)
        .expect("SET_VRING_KICK with a pipe");
    drop(writer); // the daemon's read of the kick now sees EOF
    s.ring.kick(&s.gm);
    assert!(
        d.wait_for_log("a queue worker thread ended", TIMEOUT),
        "the dead worker went unnoticed:\n{}",
        d.log()
    );
    assert!(
        d.wait_for_log("frontend disconnected", TIMEOUT),
        "{}",
        d.log()
    );
    drop(s);
    serves_a_new_frontend(&d, 4, &pattern(1, 4096));
    let (st, log) = d.stop();
    assert!(st.success(), "{st}\n{log}");
}
