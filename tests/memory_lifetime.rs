// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory lifetime (fault 1 of the restructure issue): an I/O operation owns
//! the guest memory its iovecs point into until its completion is reaped,
//! whatever happens to the connection; a stuck request is logged and
//! waited for, never abandoned on a timeout.
//!
//! The daemon runs with two test hooks (`engine::hooks`): its first write
//! is held 1.5 s before it reaches the kernel, and a drain reports what it
//! still waits for every 100 ms. A frontend writes, and disconnects and
//! unmaps its guest memory while the write is held. The write must land
//! from the daemon's own mapping (no EFAULT, no SIGSEGV), the drain must
//! outlast its report interval, and a new frontend, whose first request
//! overwrites the same sector, must be served after it: the old write may
//! not land on top of the newer one.
//!
//! Negative control (a mutation, done by hand): with `Worker::discard_all`
//! giving up at its first report, the next frontend is served after about
//! 100 ms, before the held write landed, and the first check fails.

mod common;

use std::time::{Duration, Instant};

use common::frontend::{pattern, Daemon, Desc, Opts, Session, TIMEOUT};

#[test]
fn a_write_held_across_a_disconnect_lands_from_memory_that_stays_mapped() {
    // This file's only test: the hooks reach only this test's daemon.
    std::env::set_var("VHOST_USER_UBD_TEST_HOLD_WRITES", "1:1500");
    std::env::set_var("VHOST_USER_UBD_TEST_DRAIN_REPORT_MS", "100");
    let d = Daemon::start(&[]);
    let _wd = d.watchdog(Duration::from_secs(60));
    let old = pattern(7, 4096);
    let new = pattern(9, 4096);
    {
        let mut s = Session::open(&d, &Opts::default());
        let h = s.header(virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT, 16);
        let buf = s.alloc(old.len());
        s.gm.write(buf, &old);
        let st = s.status_byte();
        s.ring
            .add_chain(&s.gm, &[Desc::r(h, 16), Desc::r(buf, 4096), Desc::w(st, 1)]);
        s.ring.kick(&s.gm);
        assert!(
            d.wait_for_log("test hook: writes held 1500 ms", TIMEOUT),
            "{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        // Disconnect; the session's guest memory is unmapped and its memfds
        // closed here: only the daemon's mapping is left.
    }
    let t = Instant::now();
    let mut s = Session::open(&d, &Opts::default());
    // The daemon serves the next frontend only once the held write landed,
    // with the data of the memory it was given.
    assert!(
        d.disk_bytes(16 * 512, 4096) == old,
        "sector 16 does not hold the held write when the next frontend is served ({:?} after \
         the disconnect)",
        t.elapsed()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "the new frontend was served after {:?}: the held write was not waited for",
        t.elapsed()
    );
    s.check_write(16, &new);
    s.check_read(16, &new);
    drop(s);
    let log = d.log();
    assert!(
        log.contains("still in flight after"),
        "the drain did not report the held write:\n{log}"
    );
    assert!(
        !log.contains("Bad address") && !log.contains("request failed"),
        "a held write failed:\n{log}"
    );
    assert!(
        d.disk_bytes(16 * 512, 4096) == new,
        "sector 16 on disk is not the new frontend's write"
    );
    let (st, log) = d.stop();
    assert!(st.success(), "{st}\n{log}");
}
