// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real `vhost-user-ubd` binary driven by `vhost::vhost_user::Frontend`
//! over a tempdir socket: feature and protocol negotiation, GET_CONFIG,
//! block I/O through hand-built split rings in memfd guest memory (both the
//! SET_MEM_TABLE and the ADD_MEM_REG paths), malformed chains, RESET_DEVICE,
//! queue-count mismatch, reconnect, SIGTERM and GET_VRING_BASE. No VM.

mod common;

use std::{
    mem::offset_of,
    time::{Duration, Instant},
};

use common::frontend::{
    initial, negotiate, pattern, Daemon, Desc, GuestMem, MemPath, Opts, Session, DISK_SECTORS,
    NO_STATUS, SERIAL, TIMEOUT,
};
use vhost::{
    vhost_user::{
        message::{
            VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
            VhostUserVirtioFeatures,
        },
        Frontend, VhostUserFrontend,
    },
    VhostBackend,
};
use virtio_bindings::{
    virtio_blk::{
        virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SCSI_CMD,
    },
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Longest a daemon may live in one test before it is killed as hung.
const WATCHDOG: Duration = Duration::from_secs(20);

fn bit(b: u32) -> u64 {
    1 << b
}

/// The virtio features the daemon must offer.
fn expected_features(readonly: bool, writethrough: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_MQ)
        // Dirty-page logging (live migration: QEMU blocks it without).
        | VhostUserVirtioFeatures::LOG_ALL.bits()
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if !writethrough {
        f |= bit(VIRTIO_BLK_F_CONFIG_WCE);
    }
    if readonly {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

fn expected_protocol(inflight: bool) -> VhostUserProtocolFeatures {
    let f = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD;
    if inflight {
        f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    } else {
        f
    }
}

/// Offered features of a freshly started daemon; checks the protocol
/// features and GET_QUEUE_NUM on the way.
fn offered(d: &Daemon, queues: u64) -> u64 {
    offered_with(d, queues, true)
}

fn offered_with(d: &Daemon, queues: u64, inflight: bool) -> u64 {
    let mut fe = d.connect(queues);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert_eq!(proto, expected_protocol(inflight), "protocol features");
    assert!(!proto.contains(VhostUserProtocolFeatures::STATUS));
    fe.set_protocol_features(proto).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), queues, "GET_QUEUE_NUM");
    fe.set_features(features).unwrap();
    features
}

fn assert_features(got: u64, want: u64) {
    assert_eq!(
        got,
        want,
        "features {got:#x}, want {want:#x}: extra {:#x}, missing {:#x}",
        got & !want,
        want & !got
    );
}

fn stop_ok(d: &Daemon) -> String {
    let (st, log) = d.stop();
    assert!(st.success(), "daemon exit status {st}:\n{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    log
}

/// (1) Virtio and protocol features, GET_QUEUE_NUM; RO only with
/// --readonly (then no DISCARD/WRITE_ZEROES), no CONFIG_WCE with
/// --writethrough. SIGTERM with no frontend connected exits 0.
#[test]
fn negotiation_features_protocol_and_queue_count() {
    let d = Daemon::start(&["--queues", "3"]);
    let _wd = d.watchdog(WATCHDOG);
    assert_features(offered(&d, 3), expected_features(false, false));
    stop_ok(&d);

    // No --queues: 16 offered, so that a frontend's own default (QEMU: the
    // vCPU count) fits.
    let d = Daemon::start(&["--readonly"]);
    let _wd = d.watchdog(WATCHDOG);
    let f = offered(&d, 16);
    assert_features(f, expected_features(true, false));
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        0
    );
    stop_ok(&d);

    let d = Daemon::start(&["--writethrough", "--queues", "16"]);
    let _wd = d.watchdog(WATCHDOG);
    assert_features(offered(&d, 16), expected_features(false, true));
    stop_ok(&d);

    // --inflight off: INFLIGHT_SHMFD is not offered (requests complete in
    // pop order).
    let d = Daemon::start(&["--inflight", "off"]);
    let _wd = d.watchdog(WATCHDOG);
    assert_features(offered_with(&d, 16, false), expected_features(false, false));
    stop_ok(&d);
}

fn get_config(fe: &mut Frontend, offset: u32, size: u32) -> Vec<u8> {
    let buf = vec![0u8; size as usize];
    let (_, data) = fe
        .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
        .unwrap_or_else(|e| panic!("GET_CONFIG offset {offset} size {size}: {e}"));
    assert_eq!(
        data.len(),
        size as usize,
        "GET_CONFIG {offset}+{size} length"
    );
    data
}

fn le(b: &[u8], off: usize, n: usize) -> u64 {
    b[off..off + n]
        .iter()
        .rev()
        .fold(0u64, |a, &x| (a << 8) | u64::from(x))
}

/// (2) GET_CONFIG: the full 60-byte config, sub-windows, oversize requests
/// zero-padded; SET_CONFIG of the writeback byte.
#[test]
fn get_config_offsets_and_sizes() {
    let d = Daemon::start(&["--queues", "2", "--queue-size", "128"]);
    let _wd = d.watchdog(WATCHDOG);
    let mut fe = d.connect(2);
    negotiate(&mut fe, MemPath::SetMemTable);
    let c = get_config(&mut fe, 0, 60);
    let f = |off: usize, n: usize| le(&c, off, n);
    assert_eq!(f(offset_of!(virtio_blk_config, capacity), 8), DISK_SECTORS);
    let size_max = f(offset_of!(virtio_blk_config, size_max), 4);
    assert!(
        size_max >= 4096 && size_max % 512 == 0,
        "size_max {size_max}"
    );
    // seg_max must leave room for header and status in a 128-entry ring.
    let seg_max = f(offset_of!(virtio_blk_config, seg_max), 4);
    assert!((1..=126).contains(&seg_max), "seg_max {seg_max}");
    assert_eq!(f(offset_of!(virtio_blk_config, geometry), 4), 0);
    assert_eq!(f(offset_of!(virtio_blk_config, blk_size), 4), 512);
    assert_eq!(f(offset_of!(virtio_blk_config, physical_block_exp), 1), 3);
    assert_eq!(f(offset_of!(virtio_blk_config, alignment_offset), 1), 0);
    assert_eq!(f(offset_of!(virtio_blk_config, min_io_size), 2), 8);
    assert_eq!(f(offset_of!(virtio_blk_config, wce), 1), 1);
    assert_eq!(f(offset_of!(virtio_blk_config, unused), 1), 0);
    assert_eq!(f(offset_of!(virtio_blk_config, num_queues), 2), 2);
    let max_discard = f(offset_of!(virtio_blk_config, max_discard_sectors), 4);
    assert!(max_discard >= 8, "max_discard_sectors {max_discard}");
    assert!(f(offset_of!(virtio_blk_config, max_discard_seg), 4) >= 1);
    assert!(f(offset_of!(virtio_blk_config, discard_sector_alignment), 4) >= 1);
    assert!(f(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 4) >= 8);
    assert!(f(offset_of!(virtio_blk_config, max_write_zeroes_seg), 4) >= 1);
    assert_eq!(
        f(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 1),
        1
    );
    assert_eq!(&c[57..60], &[0, 0, 0], "padding");

    // Named fields on their own.
    assert_eq!(get_config(&mut fe, 0, 8), DISK_SECTORS.to_le_bytes());
    assert_eq!(get_config(&mut fe, 32, 1), [1]);
    assert_eq!(get_config(&mut fe, 34, 2), 2u16.to_le_bytes());
    assert_eq!(get_config(&mut fe, 20, 4), 512u32.to_le_bytes());
    // Every window inside the 60 bytes is the matching slice.
    for off in 0..60u32 {
        for size in [1u32, 2, 3, 4, 8, 60 - off] {
            if off + size <= 60 {
                let o = off as usize;
                let w = get_config(&mut fe, off, size);
                assert_eq!(w, &c[o..o + size as usize], "window {off}+{size}");
            }
        }
    }
    // Larger than the struct: zero-padded to the requested length.
    let big = get_config(&mut fe, 0, 64);
    assert_eq!(&big[..60], &c[..]);
    assert_eq!(&big[60..], &[0; 4]);
    let big = get_config(&mut fe, 0, 256);
    assert_eq!(&big[..60], &c[..]);
    assert!(big[60..].iter().all(|&b| b == 0));
    assert_eq!(get_config(&mut fe, 56, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(get_config(&mut fe, 100, 4), [0; 4]);
    assert_eq!(get_config(&mut fe, 0xffc, 4), [0; 4]);

    // The writeback byte follows SET_CONFIG (CONFIG_WCE acked).
    fe.set_config(32, VhostUserConfigFlags::empty(), &[0])
        .unwrap();
    assert_eq!(get_config(&mut fe, 32, 1), [0]);
    fe.set_config(32, VhostUserConfigFlags::empty(), &[1])
        .unwrap();
    assert_eq!(get_config(&mut fe, 32, 1), [1]);
    drop(fe);
    stop_ok(&d);

    // --writethrough: WCE reads 0 and a write of it is ignored.
    let d = Daemon::start(&["--writethrough"]);
    let _wd = d.watchdog(WATCHDOG);
    let mut fe = d.connect(1);
    negotiate(&mut fe, MemPath::SetMemTable);
    assert_eq!(get_config(&mut fe, 32, 1), [0]);
    fe.set_config(32, VhostUserConfigFlags::empty(), &[1])
        .unwrap();
    assert_eq!(get_config(&mut fe, 32, 1), [0]);
    drop(fe);
    stop_ok(&d);
}

/// (2b) cloud-hypervisor's frontend asks for the config at
/// `VHOST_USER_CONFIG_OFFSET` (0x100) (`get_config(0x100, 60)` in
/// virtio-devices/src/vhost_user/blk.rs, and its own backend ignores the
/// offset). QEMU asks at 0. A daemon meant for both must answer the config
/// at 0x100 too, or cloud-hypervisor guests see capacity 0.
///
/// DAEMON BUG (fails as of this writing): `get_config` treats the offset
/// as relative to the config struct and returns 60 zero bytes.
#[test]
fn get_config_at_vhost_user_config_offset_like_cloud_hypervisor() {
    let d = Daemon::start(&[]);
    let _wd = d.watchdog(WATCHDOG);
    let mut fe = d.connect(1);
    negotiate(&mut fe, MemPath::SetMemTable);
    let at0 = get_config(&mut fe, 0, 60);
    let at100 = get_config(&mut fe, 0x100, 60);
    assert_eq!(
        le(&at100, 0, 8),
        DISK_SECTORS,
        "capacity read at offset 0x100 (cloud-hypervisor): {at100:?}"
    );
    assert_eq!(at100, at0);
    drop(fe);
    stop_ok(&d);
}

/// Writes, reads back, checks the image file and the neighbours; FLUSH;
/// GET_ID.
fn basic_io(d: &Daemon, s: &mut Session, sector: u64, seed: u8) {
    s.check_read(sector, &initial(sector, 4096));
    let data = pattern(seed, 8192);
    s.check_write(sector, &data);
    s.check_read(sector, &data);
    assert!(
        d.disk_bytes(sector * 512, data.len()) == data,
        "image file content"
    );
    s.check_read(sector - 1, &initial(sector - 1, 512));
    s.check_read(sector + 16, &initial(sector + 16, 512));
    let f = s.flush();
    assert_eq!((f.status, f.len), (OK, 1), "FLUSH");
    let id = s.get_id(20);
    assert_eq!((id.status, id.len), (OK, 21), "GET_ID status, used len");
    assert_eq!(id.data, SERIAL.as_bytes(), "GET_ID bytes");
}

/// (3a) A frontend without CONFIGURE_MEM_SLOTS: SET_MEM_TABLE, then
/// OUT/IN/FLUSH/GET_ID, a multi-descriptor read, status sharing the last
/// data descriptor, and an indirect table.
#[test]
fn io_via_set_mem_table() {
    let d = Daemon::start(&["--serial", SERIAL]);
    let _wd = d.watchdog(WATCHDOG);
    let mut s = Session::open(&d, &Opts::default());
    assert!(!s
        .neg
        .proto
        .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    basic_io(&d, &mut s, 10, 1);

    // Read into three descriptors: 512 + 1024 bytes, then status.
    let want = d.disk_bytes(10 * 512, 1536);
    let h = s.header(VIRTIO_BLK_T_IN, 10);
    let (b1, b2, st) = (s.alloc(512), s.alloc(1024), s.status_byte());
    let u = s.run(&[
        Desc::r(h, 16),
        Desc::w(b1, 512),
        Desc::w(b2, 1024),
        Desc::w(st, 1),
    ]);
    assert_eq!((s.gm.read(st, 1)[0], u.len), (OK, 1537));
    assert_eq!([s.gm.read(b1, 512), s.gm.read(b2, 1024)].concat(), want);

    // The status byte at the end of the data descriptor (any layout).
    let h = s.header(VIRTIO_BLK_T_IN, 10);
    let b = s.alloc(513);
    s.gm.write(b + 512, &[NO_STATUS]);
    let u = s.run(&[Desc::r(h, 16), Desc::w(b, 513)]);
    assert_eq!((s.gm.read(b + 512, 1)[0], u.len), (OK, 513));
    assert_eq!(s.gm.read(b, 512), want[..512]);

    // An indirect descriptor table.
    let table = s.alloc(48);
    let h = s.header(VIRTIO_BLK_T_IN, 10);
    let (b, st) = (s.alloc(4096), s.status_byte());
    let head = s.ring.add_indirect(
        &s.gm,
        table,
        &[Desc::r(h, 16), Desc::w(b, 4096), Desc::w(st, 1)],
    );
    s.ring.kick(&s.gm);
    let u = s.ring.wait_used(&s.gm, 1)[0];
    assert_eq!(u.id, u32::from(head));
    assert_eq!((s.gm.read(st, 1)[0], u.len), (OK, 4097));
    assert_eq!(s.gm.read(b, 4096), d.disk_bytes(10 * 512, 4096));

    drop(s);
    stop_ok(&d);
}

/// (3b) CONFIGURE_MEM_SLOTS: memory given as two ADD_MEM_REG regions (two
/// memfds, contiguous GPAs above 4 GiB); buffers in the second region and
/// one straddling the boundary.
#[test]
fn io_via_add_mem_reg() {
    let d = Daemon::start(&["--serial", SERIAL]);
    let _wd = d.watchdog(WATCHDOG);
    let base = 0x1_0000_0000u64;
    let opts = Opts {
        mem_path: MemPath::AddMemReg,
        regions: vec![(base, 1 << 20), (base + (1 << 20), 1 << 20)],
        ..Opts::default()
    };
    let mut s = Session::open(&d, &opts);
    assert!(s
        .neg
        .proto
        .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    assert!(s.fe.get_max_mem_slots().unwrap() >= 8);
    basic_io(&d, &mut s, 30, 2);

    // Data in the second region.
    let second = base + (1 << 20) + 0x8000;
    let data = pattern(3, 4096);
    let w = s.write_via(60, second, &data);
    assert_eq!((w.status, w.len), (OK, 1));
    let r = s.read_via(VIRTIO_BLK_T_IN, 60, second + 0x2000, 4096);
    assert_eq!((r.status, r.len), (OK, 4097));
    assert!(r.data == data);

    // A buffer across the boundary of the two regions (two iovecs).
    let across = base + (1 << 20) - 2048;
    let data = pattern(4, 4096);
    let w = s.write_via(70, across, &data);
    assert_eq!((w.status, w.len), (OK, 1));
    assert!(d.disk_bytes(70 * 512, 4096) == data);
    s.gm.write(across, &[0; 4096]);
    let r = s.read_via(VIRTIO_BLK_T_IN, 70, across, 4096);
    assert_eq!((r.status, r.len), (OK, 4097));
    assert!(r.data == data);

    drop(s);
    stop_ok(&d);
}

/// (4, R8) Malformed chains: each one answered (IOERR/UNSUPP, or used
/// length 0 when there is no status byte to write), and a good request on
/// the same queue still works afterwards.
#[test]
fn bad_requests_are_answered_and_queue_keeps_serving() {
    let d = Daemon::start(&[]);
    let _wd = d.watchdog(WATCHDOG);
    let mut s = Session::open(&d, &Opts::default());
    let good_sector = 5;
    let good = initial(good_sector, 1024);
    let outside = 0x4000_0000u64; // beyond the 2 MiB of guest memory
    let mem_end = 2u64 << 20;
    s.check_read(good_sector, &good);

    // No status byte: an OUT whose descriptors are all device-readable.
    let h = s.header(VIRTIO_BLK_T_OUT, 7);
    let b = s.alloc(512);
    s.gm.write(b, &pattern(9, 512));
    let u = s.run(&[Desc::r(h, 16), Desc::r(b, 512)]);
    assert_eq!(u.len, 0, "no status byte: used len");
    assert!(
        d.disk_bytes(7 * 512, 512) == initial(7, 512),
        "no-status OUT must not write"
    );
    s.check_read(good_sector, &good);

    // Header only.
    let h = s.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(s.run(&[Desc::r(h, 16)]).len, 0, "header-only: used len");
    s.check_read(good_sector, &good);

    // Out of range.
    let r = s.read(DISK_SECTORS - 1, 1024);
    assert_eq!((r.status, r.len), (IOERR, 1), "read past the end");
    s.check_read(good_sector, &good);
    let w = s.write(DISK_SECTORS, &pattern(1, 512));
    assert_eq!((w.status, w.len), (IOERR, 1), "write past the end");
    s.check_read(good_sector, &good);
    let r = s.read(u64::MAX, 1024);
    assert_eq!((r.status, r.len), (IOERR, 1), "sector overflow");
    s.check_read(good_sector, &good);

    // Unknown request types.
    let r = s.bare(0x7f, 0);
    assert_eq!((r.status, r.len), (UNSUPP, 1), "type 0x7f");
    s.check_read(good_sector, &good);
    let r = s.read_type(VIRTIO_BLK_T_SCSI_CMD, 0, 512);
    assert_eq!(r.status, UNSUPP, "SCSI_CMD");
    s.check_read(good_sector, &good);

    // Data buffers outside guest memory, or running off its end.
    let h = s.header(VIRTIO_BLK_T_IN, 0);
    let st = s.status_byte();
    let u = s.run(&[Desc::r(h, 16), Desc::w(outside, 512), Desc::w(st, 1)]);
    assert_eq!(
        (s.gm.read(st, 1)[0], u.len),
        (IOERR, 1),
        "IN outside memory"
    );
    s.check_read(good_sector, &good);
    let h = s.header(VIRTIO_BLK_T_OUT, 0);
    let st = s.status_byte();
    let u = s.run(&[Desc::r(h, 16), Desc::r(outside, 512), Desc::w(st, 1)]);
    assert_eq!(
        (s.gm.read(st, 1)[0], u.len),
        (IOERR, 1),
        "OUT outside memory"
    );
    s.check_read(good_sector, &good);
    let h = s.header(VIRTIO_BLK_T_IN, 0);
    let st = s.status_byte();
    let u = s.run(&[Desc::r(h, 16), Desc::w(mem_end - 256, 512), Desc::w(st, 1)]);
    assert_eq!(
        (s.gm.read(st, 1)[0], u.len),
        (IOERR, 1),
        "IN across the end of memory"
    );
    s.check_read(good_sector, &good);

    // The status byte itself outside guest memory: nothing to write it to.
    let h = s.header(VIRTIO_BLK_T_IN, 0);
    let b = s.alloc(512);
    let u = s.run(&[Desc::r(h, 16), Desc::w(b, 512), Desc::w(outside, 1)]);
    assert_eq!(u.len, 0, "status outside memory: used len");
    s.check_read(good_sector, &good);

    // Read length not a multiple of 512.
    let r = s.read(0, 100);
    assert_eq!((r.status, r.len), (IOERR, 1), "unaligned read");
    s.check_read(good_sector, &good);

    // A device-readable descriptor after a device-writable one.
    let h = s.header(VIRTIO_BLK_T_IN, 0);
    let (b, x, st) = (s.alloc(512), s.alloc(16), s.status_byte());
    let u = s.run(&[
        Desc::r(h, 16),
        Desc::w(b, 512),
        Desc::r(x, 16),
        Desc::w(st, 1),
    ]);
    assert_eq!(
        (s.gm.read(st, 1)[0], u.len),
        (IOERR, 1),
        "readable after writable"
    );
    s.check_read(good_sector, &good);

    // GET_ID into a short buffer: only that many bytes.
    let id = s.get_id(8);
    assert_eq!((id.status, id.len), (OK, 9));

    // The first bad requests were logged (rate limit: 10 a second).
    let log = d.log();
    assert!(log.contains("no writable status byte"), "{log}");
    assert!(log.contains("beyond the end"), "{log}");
    assert!(log.contains("unsupported request type 127"), "{log}");
    drop(s);
    stop_ok(&d);
}

/// (5) RESET_DEVICE after I/O; the frontend acks features again and sets
/// the ring up from scratch; I/O works and sees the earlier write.
#[test]
fn reset_device_then_ring_setup_again() {
    let d = Daemon::start(&[]);
    let _wd = d.watchdog(WATCHDOG);
    let mut s = Session::open(&d, &Opts::default());
    let p1 = pattern(11, 4096);
    s.check_write(40, &p1);
    s.check_read(40, &p1);

    s.fe.reset_device().expect("RESET_DEVICE");
    assert!(d.wait_for_log("device reset by the frontend", TIMEOUT));
    s.fe.set_features(s.neg.features)
        .expect("SET_FEATURES after reset");
    s.ring.clear(&s.gm);
    s.ring.start(&mut s.fe, &s.gm, 0);

    s.check_read(40, &p1);
    let p2 = pattern(12, 4096);
    s.check_write(48, &p2);
    s.check_read(48, &p2);
    assert_eq!(s.flush().status, OK);
    assert_eq!(
        s.fe.get_vring_base(0).unwrap(),
        4,
        "requests since the reset"
    );
    drop(s);
    stop_ok(&d);
}

/// (6) A frontend wanting more queues than --queues. QEMU (and
/// cloud-hypervisor) read GET_QUEUE_NUM before SET_FEATURES and give up:
/// the daemon must log a hint to raise --queues, and keep listening. A
/// frontend that ignores GET_QUEUE_NUM gets its SET_VRING_NUM on the extra
/// queue refused (NACK) and the connection dropped. A correct frontend
/// works afterwards.
#[test]
fn too_many_queues_hint_and_daemon_keeps_listening() {
    let d = Daemon::start(&["--queues", "1"]);
    let _wd = d.watchdog(WATCHDOG);
    let hint = "disconnected before SET_FEATURES";

    // QEMU's realize with num-queues=4.
    let mut fe = d.connect(4);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    // The vhost crate's Frontend now refuses queue 1 itself, unsent.
    assert!(fe.set_vring_num(1, 64).is_err());
    drop(fe);
    assert!(d.wait_for_log(hint, TIMEOUT), "no hint:\n{}", d.log());
    let line = d
        .log()
        .lines()
        .find(|l| l.contains(hint))
        .unwrap()
        .to_owned();
    assert!(line.contains("--queues"), "{line}");
    assert!(line.contains("backend is 1"), "{line}");

    // A frontend that skips GET_QUEUE_NUM and uses queue 1 anyway.
    let mut fe = d.connect(2);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap(), features);
    fe.set_protocol_features(proto).unwrap();
    fe.set_features(features).unwrap();
    let gm = GuestMem::new(&[(0, 1 << 20)]);
    gm.hand_over(&mut fe, MemPath::AddMemReg);
    fe.set_vring_num(0, 64).expect("queue 0");
    let e = fe
        .set_vring_num(1, 64)
        .expect_err("queue 1 must be refused");
    eprintln!("SET_VRING_NUM on queue 1 with --queues 1: {e}");
    assert!(
        fe.get_features().is_err(),
        "the daemon should have dropped the connection"
    );
    drop(fe);
    let deadline = Instant::now() + TIMEOUT;
    // The user gets a hint to raise --queues.
    while d.log_count("raise --queues") < 1 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "daemon log after the refused queue:\n{}",
        d.log()
            .lines()
            .filter(|l| l.contains("disconnect") || l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        d.log_count(hint),
        1,
        "hint only for the pre-SET_FEATURES drop"
    );

    // A frontend that fits.
    let mut s = Session::open(&d, &Opts::default());
    s.check_read(0, &initial(0, 512));
    let p = pattern(21, 1024);
    s.check_write(100, &p);
    s.check_read(100, &p);
    drop(s);
    stop_ok(&d);
}

/// (7) Drop the frontend, connect a new one (other memory, queue 1): the
/// data written by the first is there; then SIGTERM while connected exits 0
/// and closes the connection.
#[test]
fn reconnect_then_sigterm_exits_zero() {
    let d = Daemon::start(&["--queues", "2"]);
    let _wd = d.watchdog(WATCHDOG);
    let p1 = pattern(31, 8192);
    let mut s = Session::open(&d, &Opts::default());
    s.check_write(200, &p1);
    s.check_read(200, &p1);
    drop(s);

    let opts = Opts {
        regions: vec![(0x8000_0000, 1 << 20)],
        queue: 1,
        mem_path: MemPath::AddMemReg,
        ..Opts::default()
    };
    let mut s = Session::open(&d, &opts);
    s.check_read(200, &p1);
    let p2 = pattern(32, 4096);
    s.check_write(240, &p2);
    s.check_read(240, &p2);
    assert!(d.log().contains("frontend disconnected"));

    let log = stop_ok(&d);
    assert!(log.contains("draining"), "{log}");
    assert!(
        s.fe.get_features().is_err(),
        "connection still open after SIGTERM"
    );
    let img = std::fs::read(&d.disk).unwrap();
    assert!(img[200 * 512..200 * 512 + p1.len()] == p1[..]);
    assert!(img[240 * 512..240 * 512 + p2.len()] == p2[..]);
}

/// QEMU's `vhost_dev_stop` for one ring: SET_VRING_ENABLE 0, then
/// GET_VRING_BASE.
fn stop_ring(s: &mut Session) -> u16 {
    s.fe.set_vring_enable(s.ring.index, false).unwrap();
    u16::try_from(s.fe.get_vring_base(s.ring.index).unwrap()).unwrap()
}

/// (8) GET_VRING_BASE after I/O returns the number of requests consumed
/// (bad ones included); the ring restarted at that base goes on.
#[test]
fn get_vring_base_counts_consumed_requests() {
    let d = Daemon::start(&["--serial", SERIAL]);
    let _wd = d.watchdog(WATCHDOG);
    let mut s = Session::open(&d, &Opts::default());
    s.check_write(100, &pattern(41, 4096));
    s.check_read(100, &pattern(41, 4096));
    assert_eq!(s.flush().status, OK);
    assert_eq!(s.get_id(20).status, OK);
    assert_eq!(s.bare(0x7f, 0).status, UNSUPP);
    assert_eq!(stop_ring(&mut s), 5);
    assert_eq!(s.ring.device_used_idx(&s.gm), 5);

    // QEMU's restart: num, base, addr, kick, call, enable.
    s.ring.start(&mut s.fe, &s.gm, 5);
    s.check_read(100, &pattern(41, 4096));
    let h = s.header(VIRTIO_BLK_T_IN, 0);
    s.run(&[Desc::r(h, 16)]); // malformed, still consumed
    assert_eq!(stop_ring(&mut s), 7);
    drop(s);
    stop_ok(&d);
}

/// Queues `n` writes of `segs` 512-byte data descriptors each (request
/// `k` at sector 256 + k * segs, data `pattern(seed + k)`) without
/// kicking; returns their status-byte addresses.
fn queue_writes(s: &mut Session, n: u16, segs: u16, seed: u8) -> Vec<u64> {
    let mut status = Vec::new();
    for k in 0..n {
        let sector = 256 + u64::from(k) * u64::from(segs);
        let data = pattern(seed.wrapping_add(k as u8), 512 * usize::from(segs));
        let mut chain = vec![Desc::r(s.header(VIRTIO_BLK_T_OUT, sector), 16)];
        for c in data.chunks(512) {
            let b = s.alloc(512);
            s.gm.write(b, c);
            chain.push(Desc::r(b, 512));
        }
        let st = s.status_byte();
        chain.push(Desc::w(st, 1));
        s.ring.add_chain(&s.gm, &chain);
        status.push(st);
    }
    status
}

/// (8b) GET_VRING_BASE racing the queue worker: a batch is kicked and the
/// ring stopped right after (as QEMU does on `stop`/migration while the
/// guest has I/O queued), with a delay swept over the worker's pop window.
/// Whatever base comes back, every request it counts must be in the used
/// ring and the others untouched; a restart at that base completes them.
///
/// DAEMON BUG (fails as of this writing, in nearly every run): when GET_VRING_BASE marks the queue
/// not ready while the worker is inside `process_queue` with requests
/// still unpopped, the EVENT_IDX loop spins forever (`pop_all` pops
/// nothing because the queue is not ready, `enable_notification` keeps
/// returning true because avail is ahead of next_avail) holding the worker
/// mutex, so `stop_vring` blocks on that mutex and GET_VRING_BASE never
/// answers (the watchdog then kills the daemon).
#[test]
fn get_vring_base_racing_the_worker_never_hangs() {
    let d = Daemon::start(&[]);
    let wd = d.watchdog(Duration::from_secs(6));
    let opts = Opts {
        queue_size: 1024,
        ..Opts::default()
    };
    let mut s = Session::open(&d, &opts);
    let (n, segs) = (60u16, 15u16);
    let mut total = 0u16;
    let mut counted = Vec::new();
    for round in 0..60u16 {
        let seed = (round as u8).wrapping_mul(32);
        let status = queue_writes(&mut s, n, segs, seed);
        let delay = Duration::from_micros(u64::from(round % 20) * 20);
        s.ring.kick(&s.gm);
        let t = Instant::now();
        while t.elapsed() < delay {
            std::hint::spin_loop();
        }
        let base = match s.fe.get_vring_base(0) {
            Ok(b) => u16::try_from(b).unwrap(),
            Err(e) => panic!(
                "round {round}: GET_VRING_BASE failed ({e}); watchdog killed the hung \
                 daemon: {} (counted in earlier rounds: {counted:?})",
                wd.fired()
            ),
        };
        assert!((total..=total + n).contains(&base), "base {base}");
        counted.push(base - total);
        // Everything counted is completed: no popped-but-unanswered request.
        for u in s.ring.take_used(&s.gm, base) {
            assert_eq!(u.len, 1);
        }
        let done = usize::from(base - total);
        for (k, &st) in status.iter().enumerate() {
            let want = if k < done { OK } else { NO_STATUS };
            assert_eq!(s.gm.read(st, 1)[0], want, "round {round} request {k}");
        }
        // Restart at the returned base (QEMU's order: the ring stays
        // disabled until kick and call are in): the rest completes.
        s.fe.set_vring_enable(0, false).unwrap();
        s.ring.start(&mut s.fe, &s.gm, base);
        total = total.wrapping_add(n);
        if base != total {
            s.ring.kick(&s.gm);
            for u in s.ring.wait_used(&s.gm, total.wrapping_sub(base)) {
                assert_eq!(u.len, 1);
            }
        }
        for &st in &status {
            assert_eq!(s.gm.read(st, 1)[0], OK);
        }
        for k in 0..n {
            let sector = 256 + u64::from(k) * u64::from(segs);
            let want = pattern(seed.wrapping_add(k as u8), 512 * usize::from(segs));
            assert!(
                d.disk_bytes(sector * 512, want.len()) == want,
                "round {round} data {k}"
            );
        }
    }
    eprintln!("requests counted by GET_VRING_BASE right after kicking {n}: {counted:?}");
    assert_eq!(stop_ring(&mut s), total);
    drop(s);
    stop_ok(&d);
}

/// (7b) SIGTERM while a request is in flight and the guest keeps
/// submitting: the daemon lets the in-flight request complete, takes no
/// new ones, and exits 0. A COW disk whose bitmap writes are held 1 s
/// (`--test-bitmap-delay-ms`) keeps a FLUSH in flight.
///
/// DAEMON BUG (fails as of this writing): once `stopping` is set, a kick for new requests
/// makes the EVENT_IDX loop in `process_queue` spin forever (`pop_all`
/// returns at once because of `stopping`, `enable_notification` keeps
/// returning true because the new request is unpopped), holding the worker
/// mutex; `drain` blocks on that mutex and the daemon never exits.
#[test]
fn sigterm_while_guest_keeps_submitting_exits_zero() {
    let d = Daemon::start_cow(&["--test-bitmap-delay-ms", "1000"]);
    let _wd = d.watchdog(Duration::from_secs(8));
    let mut s = Session::open(&d, &Opts::default());
    s.check_write(0, &pattern(61, 4096));
    // A FLUSH that waits for the (held) bitmap write.
    let h = s.header(VIRTIO_BLK_T_FLUSH, 0);
    let flush_status = s.status_byte();
    s.ring
        .add_chain(&s.gm, &[Desc::r(h, 16), Desc::w(flush_status, 1)]);
    s.ring.kick(&s.gm);
    let deadline = Instant::now() + TIMEOUT;
    while s.ring.device_avail_event(&s.gm) != s.ring.avail_idx {
        assert!(Instant::now() < deadline, "FLUSH not popped");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        s.gm.read(flush_status, 1)[0],
        NO_STATUS,
        "precondition: the FLUSH must still be in flight (held by --test-bitmap-delay-ms)"
    );

    d.signal(libc::SIGTERM);
    assert!(d.wait_for_log("draining", TIMEOUT), "{}", d.log());
    // The guest submits more I/O while the daemon drains.
    let r = s.header(VIRTIO_BLK_T_IN, 8);
    let (b, st) = (s.alloc(512), s.status_byte());
    s.ring
        .add_chain(&s.gm, &[Desc::r(r, 16), Desc::w(b, 512), Desc::w(st, 1)]);
    s.ring.kick(&s.gm);

    let exit = d.wait_timeout(Duration::from_secs(6));
    let log = d.log();
    let st_flush = s.gm.read(flush_status, 1)[0];
    assert!(
        exit.is_some_and(|e| e.success()),
        "daemon did not exit 0 within 6 s of SIGTERM (exit {exit:?}):\n{log}"
    );
    assert_eq!(st_flush, OK, "the in-flight FLUSH must complete");
    assert!(log.contains("stopped cleanly"), "{log}");
}

/// The guest's cache mode through SET_CONFIG (the WCE byte at offset 32),
/// with a real frontend: writethrough makes a first write complete only
/// once its bit is in the COW file; writeback lets the bit wait for a
/// flush (checkpoints pushed out of reach), and back.
#[test]
fn wce_switched_by_set_config_moves_the_bits_of_completed_writes() {
    let d = Daemon::start_cow(&[
        "--checkpoint-ms",
        "60000",
        "--checkpoint-extents",
        "1000000",
    ]);
    let _wd = d.watchdog(WATCHDOG);
    let mut s = Session::open(&d, &Opts::default());
    let cow = d.dir().join("disk.cow");
    let geometry = {
        let f = std::fs::File::open(&cow).unwrap();
        let bytes = vhost_user_ubd::cow::file::read_header_bytes(&f).unwrap();
        vhost_user_ubd::cow::CowHeader::parse(&bytes)
            .unwrap()
            .geometry()
            .unwrap()
    };
    let bit_in_file = |d: &Daemon, sector: u64| {
        let b = d.disk_bytes(geometry.bitmap_offset + sector / 8, 1)[0];
        b & (1 << (sector % 8)) != 0
    };
    let set_wce = |s: &mut Session, on: bool| {
        s.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[u8::from(on)])
            .expect("SET_CONFIG of the WCE byte");
        assert_eq!(
            get_config(&mut s.fe, 32, 1),
            vec![u8::from(on)],
            "WCE read back"
        );
    };
    // Writeback (the default with FLUSH): the bit waits for the flush.
    s.check_write(64, &pattern(1, 4096));
    assert!(
        !bit_in_file(&d, 64),
        "writeback: the bit is in the file before any flush"
    );
    assert_eq!(s.flush().status, OK);
    assert!(
        bit_in_file(&d, 64),
        "writeback: the bit is not in the file after the flush"
    );

    set_wce(&mut s, false);
    assert!(d.wait_for_log("guest switched the cache to writethrough", TIMEOUT));
    s.check_write(128, &pattern(2, 4096));
    assert!(
        bit_in_file(&d, 128) && bit_in_file(&d, 135),
        "writethrough: a completed first write's bits are not in the file"
    );

    set_wce(&mut s, true);
    assert!(d.wait_for_log("guest switched the cache to writeback", TIMEOUT));
    s.check_write(256, &pattern(3, 4096));
    assert!(
        !bit_in_file(&d, 256),
        "writeback again: the bit did not wait for a flush"
    );
    assert_eq!(s.flush().status, OK);
    assert!(bit_in_file(&d, 256));
    s.check_read(128, &pattern(2, 4096));
    drop(s);
    stop_ok(&d);
}
