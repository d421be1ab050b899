// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Inflight I/O tracking across a daemon crash (issue 12, items 2 and 3),
//! with the `vhost` crate's frontend on memfd guest memory against the real
//! binary.
//!
//! A frontend queues six writes. The daemon holds the first two (test hook
//! `VHOST_USER_UBD_TEST_HOLD_WRITES`) and completes the others at once: out
//! of order, which inflight tracking allows. The daemon is killed with -9
//! while the two are held (they never reach the kernel), a new daemon
//! starts on the same disk, and the frontend hands it the same inflight
//! memfd and, as QEMU does, a SET_VRING_BASE of the used index (or, as
//! cloud-hypervisor does, of the available index). Every request must then
//! complete exactly once, the two resubmitted ones oldest first, and the
//! disk must hold all six writes.
//!
//! Negative control: the same with `--inflight off` and cloud-hypervisor's
//! base loses the requests the first daemon had not completed (with QEMU's
//! base and in-order completion it would not, which is why in-order
//! completion was the rule before).

mod common;

use std::{os::fd::AsRawFd, path::Path, thread, time::Duration};

use common::{
    daemon::{Daemon, DaemonBuilder},
    frontend::{negotiate, Desc, GuestMem, MemPath, Ring, Used, DISK_BYTES},
};
use vhost::vhost_user::{message::VhostUserInflight, Frontend, VhostUserFrontend};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

const QSIZE: u16 = 64;
const WRITES: u64 = 6;
const HELD: u64 = 2;

/// Where the i-th write goes, and what it writes.
fn sector_of(i: u64) -> u64 {
    8 * (i + 1)
}

fn data_of(i: u64) -> Vec<u8> {
    (0..4096u32)
        .map(|k| (k as u8) ^ (0x11 * (i as u8 + 1)))
        .collect()
}

fn start(dir: &Path, disk: &Path, extra: &[&str], hold: bool) -> Daemon {
    let mut b = DaemonBuilder::new(dir).raw(disk).args(extra);
    if hold {
        b = b.env("VHOST_USER_UBD_TEST_HOLD_WRITES", &format!("{HELD}:20000"));
    }
    b.spawn()
}

fn connect(d: &Daemon) -> Frontend {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(d.socket(), 1) {
            Ok(f) => return f,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "connect: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The frontend's side: guest memory, the ring, the inflight memfd.
struct Guest {
    gm: GuestMem,
    ring: Ring,
    inflight: Option<(VhostUserInflight, std::fs::File)>,
}

impl Guest {
    /// Connects to `d` and starts the ring at `base` (first start: a fresh
    /// ring; later: the same memory and inflight region, as QEMU keeps).
    fn attach(&mut self, d: &Daemon, base: u16, first: bool) -> Frontend {
        let mut fe = connect(d);
        let neg = negotiate(&mut fe, MemPath::SetMemTable);
        let offered = neg
            .proto
            .contains(vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        if offered {
            if self.inflight.is_none() {
                let req = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: 1,
                    queue_size: QSIZE,
                };
                self.inflight = Some(fe.get_inflight_fd(&req).expect("GET_INFLIGHT_FD"));
            }
            if let Some((info, file)) = &self.inflight {
                fe.set_inflight_fd(info, file.as_raw_fd())
                    .expect("SET_INFLIGHT_FD");
            }
        }
        self.gm.hand_over(&mut fe, MemPath::SetMemTable);
        if first {
            self.ring.clear(&self.gm);
        }
        self.ring.start(&mut fe, &self.gm, base);
        fe
    }

    /// Queues write `i` (no kick); returns its head.
    fn queue_write(&mut self, i: u64) -> u16 {
        let base = 0x40000 + i * 0x2000;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&sector_of(i).to_le_bytes());
        self.gm.write(base, &h);
        self.gm.write(base + 0x1000, &data_of(i));
        self.gm.write(base + 0x40, &[0xff]);
        self.ring.add_chain(
            &self.gm,
            &[
                Desc::r(base, 16),
                Desc::r(base + 0x1000, 4096),
                Desc::w(base + 0x40, 1),
            ],
        )
    }

    fn status_of(&self, i: u64) -> u8 {
        self.gm.read(0x40000 + i * 0x2000 + 0x40, 1)[0]
    }
}

/// Used entries that appear within `wait`, without asserting a count.
fn used_within(g: &mut Guest, wait: Duration) -> Vec<Used> {
    let deadline = std::time::Instant::now() + wait;
    let mut got = Vec::new();
    loop {
        let idx = g.ring.device_used_idx(&g.gm);
        if idx != g.ring.used_idx {
            got.extend(g.ring.take_used(&g.gm, idx));
        }
        if std::time::Instant::now() >= deadline {
            return got;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The scenario; returns the heads completed by each daemon, in order,
/// and whether the disk holds all writes.
fn crash_scenario(
    extra: &[&str],
    cloud_hypervisor_base: bool,
) -> (Vec<u16>, Vec<u16>, bool, Vec<u16>) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; usize::try_from(DISK_BYTES).unwrap()]).unwrap();
    let mut g = Guest {
        gm: GuestMem::new(&[(0, 2 << 20)]),
        ring: Ring::new(0, QSIZE, 0),
        inflight: None,
    };
    let a = start(dir.path(), &disk, extra, true);
    let fe_a = g.attach(&a, 0, true);
    let heads: Vec<u16> = (0..WRITES).map(|i| g.queue_write(i)).collect();
    g.ring.kick(&g.gm);
    // The writes after the held ones complete (out of order, if allowed).
    let first: Vec<u16> = used_within(&mut g, Duration::from_millis(1500))
        .iter()
        .map(|u| u16::try_from(u.id).unwrap())
        .collect();
    a.kill();
    drop(fe_a);
    let b = start(dir.path(), &disk, extra, false);
    let base = if cloud_hypervisor_base {
        g.ring.avail_idx
    } else {
        g.ring.device_used_idx(&g.gm)
    };
    let fe_b = g.attach(&b, base, false);
    g.ring.kick(&g.gm);
    let second: Vec<u16> = used_within(&mut g, Duration::from_secs(3))
        .iter()
        .map(|u| u16::try_from(u.id).unwrap())
        .collect();
    let all_written = (0..WRITES).all(|i| {
        let bytes = std::fs::read(&disk).unwrap();
        let off = usize::try_from(sector_of(i) * 512).unwrap();
        bytes[off..off + 4096] == data_of(i)[..] && g.status_of(i) == 0
    });
    drop(fe_b);
    let st = b.terminate();
    assert!(st.success(), "{st}\n{}", b.log());
    (first, second, all_written, heads)
}

fn exactly_once(first: &[u16], second: &[u16], heads: &[u16]) -> Result<(), String> {
    let mut all: Vec<u16> = first.iter().chain(second).copied().collect();
    all.sort_unstable();
    let mut want = heads.to_vec();
    want.sort_unstable();
    if all == want {
        Ok(())
    } else {
        Err(format!(
            "completions {first:?} then {second:?}; every one of {heads:?} exactly once expected"
        ))
    }
}

#[test]
fn a_crash_loses_and_repeats_nothing_with_qemus_base() {
    let (first, second, written, heads) = crash_scenario(&[], false);
    exactly_once(&first, &second, &heads).unwrap();
    let held: Vec<u16> = heads[..usize::try_from(HELD).unwrap()].to_vec();
    assert_eq!(
        first,
        heads[usize::try_from(HELD).unwrap()..].to_vec(),
        "the first daemon completes the writes it did not hold, out of order"
    );
    assert_eq!(
        second, held,
        "the held writes are resubmitted, oldest first"
    );
    assert!(written, "the disk holds every write");
}

#[test]
fn a_crash_loses_and_repeats_nothing_with_cloud_hypervisors_base() {
    let (first, second, written, heads) = crash_scenario(&[], true);
    exactly_once(&first, &second, &heads).unwrap();
    assert!(written, "the disk holds every write");
}

#[test]
fn negative_control_without_inflight_cloud_hypervisors_base_loses_requests() {
    let (first, second, written, heads) = crash_scenario(&["--inflight", "off"], true);
    assert!(
        first.is_empty(),
        "in pop order, nothing passes the held writes: {first:?}"
    );
    assert!(
        exactly_once(&first, &second, &heads).is_err() && !written,
        "without inflight tracking a restart at the available index lost nothing: the test \
         above cannot fail (completions {first:?} then {second:?})"
    );
}
