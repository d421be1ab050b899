// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration (issue 14) through the real binary, with a raw
//! vhost-user frontend (`vhost` crate, hand-built split rings in memfd
//! guest memory) playing QEMU, and libblkio clients where only the data
//! matters:
//!
//! - Dirty-page logging: with VHOST_F_LOG_ALL acked and a log memfd set
//!   (SET_LOG_BASE, LOG_SHMFD), a completed read marks exactly its data
//!   pages, its status byte's page and the used ring's page; a write marks
//!   only its status byte's and the used ring's pages. Negative control:
//!   with the log set but LOG_ALL not acked, the same read leaves its data
//!   pages clean (the kernel writes them; only the marking by hand at
//!   completion covers them), while what vm-memory writes is still marked
//!   (so the log was live).
//! - The switch-over: a destination instance B (`serve --takeover A.ctl
//!   --socket B.sock`) takes the disk over once its frontend's ring starts
//!   and serves the source's data; the source A, paused at `src-retired`,
//!   answers its own frontend IOERR, and that write never reaches the
//!   disk.
//! - A cancelled migration: B's frontend leaves before any ring starts; B
//!   stops (exit 0), A aborts the handover and serves on.
//! - A normal handover is refused while A's frontend logs dirty pages;
//!   negative control: once the frontend stops logging (SET_FEATURES
//!   without LOG_ALL, as QEMU does when a migration is cancelled) the same
//!   takeover is accepted.

mod common;

use std::{
    fs::File,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::FileExt,
    },
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use common::{
    client,
    daemon::{Daemon, DaemonBuilder},
    frontend::{self, initial, Desc, GuestMem, MemPath, Ring, Used},
    handover::{self, handover_of, paused_at, wait_until, ABORTED, LIVE, PAUSE},
    make_backing, stamp_of, stamps, uml_moo, SECTOR,
};
use vhost::{
    vhost_user::{
        message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures},
        Frontend, VhostUserFrontend,
    },
    VhostBackend, VhostUserDirtyLogRegion, VringConfigData,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// `VHOST_F_LOG_ALL`: the frontend asks for dirty-page logging.
const LOG_ALL: u64 = 1 << 26;
/// Bytes per page of the dirty log.
const PAGE: u64 = 4096;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The status byte before the device writes it.
const NO_STATUS: u8 = 0xff;
/// Ring size of every raw frontend here.
const QSIZE: u16 = 64;
/// Size of the disks of the migration tests (the dirty-log tests use the
/// frontend module's 1 MiB raw disk).
const DISK: u64 = 1 << 20;
const NSECT: u64 = DISK / SECTOR as u64;
/// How long a request, a switch-over, a refusal or an exit may take.
const SOON: Duration = Duration::from_secs(20);
/// Lifetime of every daemon here (a hung one is killed, so a frontend
/// blocked on it fails instead of hanging the test).
const DEADLINE: Duration = Duration::from_secs(90);

// ------------------------------------------------------------ dirty log --

/// A fresh memfd of `size` bytes (zeros).
fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; it returns a new
    // descriptor or -1 and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd set_len");
    f
}

/// The frontend's dirty log: one bit per 4 KiB guest page from guest
/// address 0 (bit `p % 8` of byte `p / 8`), in a memfd the daemon maps.
struct DirtyLog {
    file: File,
    /// Pages it covers.
    pages: u64,
}

impl DirtyLog {
    /// A clean log for `mem_len` bytes of guest memory from address 0.
    fn new(mem_len: u64) -> Self {
        let pages = mem_len / PAGE;
        let bytes = pages.div_ceil(8).next_multiple_of(PAGE);
        Self {
            file: memfd(c"ubd-test-dirty-log", bytes),
            pages,
        }
    }

    fn bytes(&self) -> u64 {
        self.file.metadata().expect("log size").len()
    }

    /// The guest pages marked dirty.
    fn dirty(&self) -> Vec<u64> {
        let mut b = vec![0u8; self.pages.div_ceil(8) as usize];
        self.file.read_exact_at(&mut b, 0).expect("read the log");
        (0..self.pages)
            .filter(|&p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    /// Clears every bit (as QEMU does after it synced the log).
    fn clear(&self) {
        let zeros = vec![0u8; self.bytes() as usize];
        self.file.write_all_at(&zeros, 0).expect("clear the log");
    }
}

// ------------------------------------------------------- raw frontend --

/// Where a raw frontend puts its guest memory, rings and buffers.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// One region of this many bytes at guest address 0.
    mem_len: usize,
    /// Descriptor table, available ring, used ring.
    desc: u64,
    avail: u64,
    used: u64,
    /// Request header, status byte, data buffer of the I/O helpers.
    header: u64,
    status: u64,
    data: u64,
}

impl Layout {
    /// 2 MiB; the ring's tables on pages 0 and 1; header and status on
    /// page 8; data buffers (up to 1 MiB) from 1 MiB.
    fn io() -> Self {
        let r = Ring::new(0, QSIZE, 0);
        Self {
            mem_len: 2 << 20,
            desc: r.desc,
            avail: r.avail,
            used: r.used,
            header: 0x8000,
            status: 0x8100,
            data: 1 << 20,
        }
    }
}

/// A connected vhost-user frontend with guest memory and ring 0 started,
/// as QEMU sets a device up (SET_MEM_TABLE path).
struct Raw {
    fe: Frontend,
    gm: GuestMem,
    ring: Ring,
    layout: Layout,
    /// The virtio features acked so far.
    acked: u64,
    /// The features the daemon offered.
    offered: u64,
    /// The protocol features the daemon offered.
    offered_proto: VhostUserProtocolFeatures,
}

/// Connects to `socket` (retrying while it refuses).
fn connect(socket: &Path) -> Frontend {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(socket, 1) {
            Ok(f) => return f,
            Err(e) => {
                assert!(Instant::now() < end, "connect to {}: {e}", socket.display());
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Raw {
    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    /// SET_FEATURES of everything offered but LOG_ALL (QEMU acks LOG_ALL
    /// only when a migration starts), every message with NEED_REPLY.
    fn handshake(socket: &Path) -> (Frontend, u64, u64, VhostUserProtocolFeatures) {
        let mut fe = connect(socket);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let offered_proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let mut proto = offered_proto;
        proto.remove(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        fe.set_protocol_features(proto)
            .expect("SET_PROTOCOL_FEATURES");
        fe.get_queue_num().expect("GET_QUEUE_NUM");
        let acked = offered & !LOG_ALL;
        fe.set_features(acked).expect("SET_FEATURES");
        (fe, acked, offered, offered_proto)
    }

    /// Connects, negotiates, hands over the memory and starts ring 0.
    fn open(socket: &Path, layout: Layout) -> Self {
        Self::start(Self::handshake(socket), layout)
    }

    /// After [`Raw::handshake`]: hands over the memory and starts ring 0
    /// (SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL, _ENABLE).
    fn start(
        (mut fe, acked, offered, offered_proto): (Frontend, u64, u64, VhostUserProtocolFeatures),
        layout: Layout,
    ) -> Self {
        let gm = GuestMem::new(&[(0, layout.mem_len)]);
        gm.hand_over(&mut fe, MemPath::SetMemTable);
        let mut ring = Ring::new(0, QSIZE, layout.desc);
        ring.avail = layout.avail;
        ring.used = layout.used;
        ring.clear(&gm);
        ring.start(&mut fe, &gm, 0);
        Self {
            fe,
            gm,
            ring,
            layout,
            acked,
            offered,
            offered_proto,
        }
    }

    /// SET_LOG_BASE with a fresh log memfd covering the guest memory.
    fn set_log(&mut self) -> DirtyLog {
        let log = DirtyLog::new(self.layout.mem_len as u64);
        let region = VhostUserDirtyLogRegion {
            mmap_size: log.bytes(),
            mmap_offset: 0,
            mmap_handle: log.file.as_raw_fd(),
        };
        self.fe.set_log_base(0, Some(region)).expect("SET_LOG_BASE");
        log
    }

    /// SET_FEATURES with LOG_ALL on or off (the rest as acked before).
    fn log_all(&mut self, on: bool) {
        self.acked = if on {
            self.acked | LOG_ALL
        } else {
            self.acked & !LOG_ALL
        };
        self.fe
            .set_features(self.acked)
            .expect("SET_FEATURES (LOG_ALL)");
    }

    /// What a migration's source QEMU does: SET_LOG_BASE, then
    /// SET_FEATURES with LOG_ALL.
    fn start_logging(&mut self) -> DirtyLog {
        assert_ne!(
            self.offered & LOG_ALL,
            0,
            "VHOST_F_LOG_ALL not offered: {:#x}",
            self.offered
        );
        assert!(
            self.offered_proto
                .contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "LOG_SHMFD not offered: {:?}",
            self.offered_proto
        );
        let log = self.set_log();
        self.log_all(true);
        log
    }

    /// Publishes one chain and kicks; waits up to `timeout` for the used
    /// entry (`None`: none came).
    fn submit(&mut self, descs: &[Desc], timeout: Duration) -> Option<Used> {
        let head = self.ring.add_chain(&self.gm, descs);
        self.ring.kick(&self.gm);
        let end = Instant::now() + timeout;
        loop {
            let idx = self.ring.device_used_idx(&self.gm);
            if idx != self.ring.used_idx {
                let used = self.ring.take_used(&self.gm, idx);
                assert_eq!(used.len(), 1, "one request in flight: {used:?}");
                assert_eq!(used[0].id, u32::from(head), "used id");
                return Some(used[0]);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_micros(300));
        }
    }

    /// A request with its header at `header`, an optional data buffer
    /// `(addr, len, device-writable)` and its status byte at `status`
    /// (preset to [`NO_STATUS`]): `(status, used length)`, `None` when no
    /// answer came within `timeout`.
    fn request(
        &mut self,
        rtype: u32,
        sector: u64,
        (header, status): (u64, u64),
        data: Option<(u64, u32, bool)>,
        timeout: Duration,
    ) -> Option<(u8, u32)> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.gm.write(header, &h);
        self.gm.write(status, &[NO_STATUS]);
        let mut descs = vec![Desc::r(header, 16)];
        if let Some((addr, len, w)) = data {
            descs.push(if w {
                Desc::w(addr, len)
            } else {
                Desc::r(addr, len)
            });
        }
        descs.push(Desc::w(status, 1));
        let used = self.submit(&descs, timeout)?;
        Some((self.gm.read(status, 1)[0], used.len))
    }

    fn hs(&self) -> (u64, u64) {
        (self.layout.header, self.layout.status)
    }

    /// Reads `len` bytes at `sector`: `(status, data)`, `None` on timeout.
    fn read(&mut self, sector: u64, len: usize, timeout: Duration) -> Option<(u8, Vec<u8>)> {
        let buf = self.layout.data;
        self.gm.write(buf, &vec![0xee; len]);
        let n = u32::try_from(len).expect("length");
        let (st, used) = self.request(
            VIRTIO_BLK_T_IN,
            sector,
            self.hs(),
            Some((buf, n, true)),
            timeout,
        )?;
        if st == OK {
            assert_eq!(used, n + 1, "read used length");
        }
        Some((st, self.gm.read(buf, len)))
    }

    /// Writes `data` at `sector`: its status, `None` on timeout.
    fn write(&mut self, sector: u64, data: &[u8], timeout: Duration) -> Option<u8> {
        let buf = self.layout.data;
        self.gm.write(buf, data);
        let n = u32::try_from(data.len()).expect("length");
        self.request(
            VIRTIO_BLK_T_OUT,
            sector,
            self.hs(),
            Some((buf, n, false)),
            timeout,
        )
        .map(|(st, _)| st)
    }

    /// FLUSH: its status, `None` on timeout.
    fn flush(&mut self, timeout: Duration) -> Option<u8> {
        self.request(VIRTIO_BLK_T_FLUSH, 0, self.hs(), None, timeout)
            .map(|(st, _)| st)
    }
}

/// The capacity (sectors) GET_CONFIG answers.
fn capacity(fe: &mut Frontend) -> u64 {
    let (_, c) = fe
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
        .expect("GET_CONFIG");
    u64::from_le_bytes(c[..8].try_into().expect("8 bytes"))
}

// ------------------------------------------------------ the dirty tests --

/// The dirty-log tests' layout: 1 MiB of guest memory; descriptor table,
/// available ring and used ring on pages 0, 1 and 2; the header on page
/// 0x10, the data buffer on pages 0x20 and 0x21, the status byte on page
/// 0x30 (every page between them unused).
fn dirty_layout() -> Layout {
    Layout {
        mem_len: 1 << 20,
        desc: 0,
        avail: PAGE,
        used: 2 * PAGE,
        header: 0x10 * PAGE,
        status: 0x30 * PAGE + 0x40,
        data: 0x20 * PAGE,
    }
}

const DESC_PAGE: u64 = 0;
const AVAIL_PAGE: u64 = 1;
const USED_PAGE: u64 = 2;
const HEADER_PAGE: u64 = 0x10;
const DATA_PAGES: [u64; 2] = [0x20, 0x21];
const STATUS_PAGE: u64 = 0x30;
/// A two-page read or write at this sector.
const DIRTY_SECTOR: u64 = 64;
const DIRTY_LEN: usize = 2 * PAGE as usize;

/// The frontend module's daemon (a 1 MiB raw disk) and a raw frontend on
/// it with the dirty-log layout, its log set; LOG_ALL acked if `log_all`.
fn dirty_session(log_all: bool) -> (frontend::Daemon, Raw, DirtyLog) {
    let d = frontend::Daemon::start(&[]);
    let mut f = Raw::open(d.socket(), dirty_layout());
    let log = if log_all {
        f.start_logging()
    } else {
        f.set_log()
    };
    (d, f, log)
}

/// Names the pages of [`dirty_layout`] for failure messages.
fn page_names(pages: &[u64]) -> String {
    let name = |p: u64| match p {
        DESC_PAGE => "descriptor table".to_string(),
        AVAIL_PAGE => "available ring".into(),
        USED_PAGE => "used ring".into(),
        HEADER_PAGE => "header".into(),
        STATUS_PAGE => "status byte".into(),
        p if DATA_PAGES.contains(&p) => format!("data page {p:#x}"),
        p => format!("unused page {p:#x}"),
    };
    let v: Vec<String> = pages.iter().map(|&p| name(p)).collect();
    format!("[{}]", v.join(", "))
}

fn assert_dirty(log: &DirtyLog, want: &[u64], what: &str, d: &frontend::Daemon) {
    let got = log.dirty();
    let mut want = want.to_vec();
    want.sort_unstable();
    assert_eq!(
        got,
        want,
        "{what}: dirty pages {} where {} were expected; daemon log tail:\n{}",
        page_names(&got),
        page_names(&want),
        d.log_tail(30)
    );
}

/// The read, checked: status OK, the disk's data in the buffer.
fn dirty_read(f: &mut Raw, d: &frontend::Daemon) {
    let l = f.layout;
    let n = u32::try_from(DIRTY_LEN).expect("length");
    f.gm.write(l.data, &vec![0xee; DIRTY_LEN]);
    let got = f.request(
        VIRTIO_BLK_T_IN,
        DIRTY_SECTOR,
        (l.header, l.status),
        Some((l.data, n, true)),
        SOON,
    );
    assert_eq!(
        got,
        Some((OK, n + 1)),
        "read: (status, used length); log:\n{}",
        d.log_tail(30)
    );
    assert!(
        f.gm.read(l.data, DIRTY_LEN) == initial(DIRTY_SECTOR, DIRTY_LEN),
        "the read's data differs from the disk"
    );
}

/// With LOG_ALL acked and a log set, a completed two-page read marks
/// exactly its two data pages (written by the kernel, marked by hand), its
/// status byte's page and the used ring's page (written through
/// vm-memory); not the header's, the descriptor table's or the available
/// ring's page (only read), nor any unused page.
///
/// Its negative control is
/// `without_log_all_a_read_leaves_its_data_pages_clean`.
#[test]
fn a_completed_read_marks_exactly_its_buffers_its_status_byte_and_the_used_ring() {
    let (d, mut f, log) = dirty_session(true);
    let _wd = d.watchdog(Duration::from_secs(30));
    // Whatever the set-up wrote: the request's own marks from a clean log.
    log.clear();
    dirty_read(&mut f, &d);
    let mut want = DATA_PAGES.to_vec();
    want.extend([STATUS_PAGE, USED_PAGE]);
    assert_dirty(&log, &want, "a completed read (LOG_ALL acked)", &d);
    // Once more, from a clean log (QEMU clears what it synced): the same.
    log.clear();
    dirty_read(&mut f, &d);
    assert_dirty(&log, &want, "a second read (LOG_ALL acked)", &d);
    d.assert_running();
}

/// With LOG_ALL acked and a log set, a completed two-page write marks only
/// its status byte's page and the used ring's page: the device reads a
/// write's data, never writes it.
#[test]
fn a_completed_write_marks_only_its_status_byte_and_the_used_ring() {
    let (d, mut f, log) = dirty_session(true);
    let _wd = d.watchdog(Duration::from_secs(30));
    log.clear();
    let l = f.layout;
    let data = frontend::pattern(7, DIRTY_LEN);
    f.gm.write(l.data, &data);
    let n = u32::try_from(DIRTY_LEN).expect("length");
    let got = f.request(
        VIRTIO_BLK_T_OUT,
        DIRTY_SECTOR,
        (l.header, l.status),
        Some((l.data, n, false)),
        SOON,
    );
    assert_eq!(
        got,
        Some((OK, 1)),
        "write: (status, used length); log:\n{}",
        d.log_tail(30)
    );
    assert_dirty(
        &log,
        &[STATUS_PAGE, USED_PAGE],
        "a completed write (LOG_ALL acked)",
        &d,
    );
    // A real write, which landed (the image, through the page cache).
    assert!(
        d.disk_bytes(DIRTY_SECTOR * SECTOR as u64, DIRTY_LEN) == data,
        "the write is not in the image"
    );
    d.assert_running();
}

/// Negative control of the read test: the same read with the log set
/// (SET_LOG_BASE) but LOG_ALL never acked leaves its data pages clean,
/// while the status byte's and the used ring's pages, which go through
/// vm-memory and its log bitmap, are still marked (so the log was live).
/// The data pages of the read test are therefore marked by the daemon's
/// marking by hand, which covers what the kernel writes.
#[test]
fn without_log_all_a_read_leaves_its_data_pages_clean() {
    let (d, mut f, log) = dirty_session(false);
    let _wd = d.watchdog(Duration::from_secs(30));
    assert_eq!(f.acked & LOG_ALL, 0);
    log.clear();
    dirty_read(&mut f, &d);
    assert_dirty(
        &log,
        &[STATUS_PAGE, USED_PAGE],
        "a completed read (log set, LOG_ALL not acked)",
        &d,
    );
    d.assert_running();
}

// ------------------------------------------------------------ the model --

/// What the disk must hold: the base's bytes with every completed write
/// over them.
struct Model {
    image: Vec<u8>,
    base: Vec<u8>,
}

impl Model {
    fn new(base: &[u8]) -> Self {
        Self {
            image: base.to_vec(),
            base: base.to_vec(),
        }
    }

    fn apply(&mut self, sector: u64, data: &[u8]) {
        let at = sector as usize * SECTOR;
        self.image[at..at + data.len()].copy_from_slice(data);
    }

    /// What sector `s`'s `data` is, in words.
    fn describe(&self, s: u64, data: &[u8]) -> String {
        let at = s as usize * SECTOR;
        if data == &self.base[at..at + SECTOR] {
            return "the base's data".into();
        }
        if data.iter().all(|&b| b == 0xee) {
            return "the buffer's fill (nothing read)".into();
        }
        match stamp_of(data) {
            Some((id, x)) if x == s => format!("write {id}"),
            Some((id, x)) => format!("write {id} of sector {x}"),
            None => "garbage".into(),
        }
    }

    /// `data` read from sector `first` on must equal the model.
    fn check(&self, first: u64, data: &[u8], what: &str) {
        let mut bad = Vec::new();
        for (i, got) in data.chunks_exact(SECTOR).enumerate() {
            let s = first + i as u64;
            let at = s as usize * SECTOR;
            let want = &self.image[at..at + SECTOR];
            if got != want && bad.len() < 20 {
                bad.push(format!(
                    "sector {s}: {} (want {})",
                    self.describe(s, got),
                    self.describe(s, want)
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: differs from the model:\n{}",
            bad.join("\n")
        );
    }

    /// Write `id` of `n` sectors at `sector` through a raw frontend, which
    /// must succeed.
    fn write_raw(&mut self, f: &mut Raw, id: u64, sector: u64, n: u64, d: &Daemon) {
        let data = stamps(id, sector, n);
        let st = f.write(sector, &data, SOON);
        assert_eq!(
            st,
            Some(OK),
            "write {id} ({n} sectors at {sector}); log:\n{}",
            d.log_tail(30)
        );
        self.apply(sector, &data);
    }

    /// The same through a libblkio client.
    fn write_blkio(&mut self, c: &mut client::Client, id: u64, sector: u64, n: u64) {
        let data = stamps(id, sector, n);
        let mem = c.mem;
        let ret = client::write_at(c.q(0), mem, 0, sector * SECTOR as u64, &data);
        assert_eq!(ret, 0, "write {id} ({n} sectors at {sector})");
        self.apply(sector, &data);
    }

    /// The whole disk through a raw frontend equals the model.
    fn check_raw(&self, f: &mut Raw, what: &str, daemons: &[&Daemon]) {
        let chunk = 256 << 10;
        for pos in (0..DISK).step_by(chunk) {
            let sector = pos / SECTOR as u64;
            let Some((st, data)) = f.read(sector, chunk, SOON) else {
                panic!(
                    "{what}: no answer to a read of {chunk} bytes at sector {sector} within \
                     {SOON:?}\n{}",
                    logs(daemons)
                );
            };
            assert_eq!(st, OK, "{what}: read at sector {sector}\n{}", logs(daemons));
            self.check(sector, &data, what);
        }
    }

    /// The whole disk through a libblkio client equals the model.
    fn check_blkio(&self, c: &mut client::Client, what: &str) {
        assert_eq!(c.capacity, DISK, "{what}: capacity");
        let mem = c.mem;
        let data = client::read_at(c.q(0), mem, 0, 0, DISK as usize)
            .unwrap_or_else(|r| panic!("{what}: read failed: {r}"));
        self.check(0, &data, what);
    }
}

/// The log tails of `daemons`, for failure messages.
fn logs(daemons: &[&Daemon]) -> String {
    daemons
        .iter()
        .map(|d| {
            format!(
                "--- {} (pid {}):\n{}",
                d.log_path().display(),
                d.pid(),
                d.log_tail(40)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------- files --

/// One test's files: a COW over a base with the known pattern, A's
/// control socket, in a fresh temporary directory.
struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
    /// A's control socket.
    a_ctl: PathBuf,
    base_before: Vec<u8>,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.img");
        make_backing(&base, DISK);
        let base_before = std::fs::read(&base).expect("read the base");
        Self {
            cow: dir.path().join("vm.cow"),
            a_ctl: dir.path().join("a.ctl"),
            base,
            base_before,
            dir,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn model(&self) -> Model {
        Model::new(&self.base_before)
    }

    /// The source A: `serve --socket DIR/a.sock --cow COW --backing BASE
    /// --control A.ctl`, with the environment `envs`.
    fn a(&self, envs: &[(&str, &str)]) -> Daemon {
        let mut b = DaemonBuilder::new(self.dir())
            .name("a")
            .cow(&self.cow, Some(&self.base))
            .arg("--control")
            .arg(&self.a_ctl)
            .deadline(DEADLINE);
        for (k, v) in envs {
            b = b.env(k, v);
        }
        b.spawn()
    }

    /// A migration destination: `serve --takeover A.ctl --socket
    /// DIR/NAME.sock --control DIR/NAME.ctl`; returns once its socket
    /// listens, with the socket and the control socket.
    fn destination(&self, name: &str, a: &Daemon) -> (Daemon, PathBuf, PathBuf) {
        let sock = self.dir().join(format!("{name}.sock"));
        let ctl = self.dir().join(format!("{name}.ctl"));
        let b = DaemonBuilder::new(self.dir()).name(name).deadline(DEADLINE);
        let d = handover::start_destination(b, &self.a_ctl, &sock, &ctl, SOON, &|| logs(&[a]));
        (d, sock, ctl)
    }

    /// A normal handover: `serve --takeover A.ctl` (no --socket).
    fn takeover(&self, name: &str, a: &Daemon) -> Daemon {
        DaemonBuilder::new(self.dir())
            .name(name)
            .takeover(&self.a_ctl, a.socket())
            .deadline(DEADLINE)
            .spawn()
    }

    /// `uml_moo`'s merge of the COW (the disk as the files hold it).
    fn merged(&self) -> Vec<u8> {
        let out = self.dir().join("merged.img");
        let m = uml_moo(&self.cow, &out);
        let _ = std::fs::remove_file(&out);
        m
    }

    /// The base is byte for byte what it was, mtime included.
    fn assert_base_unchanged(&self) {
        handover::assert_base_unchanged(&self.base, &self.base_before);
    }

    /// SIGTERM to `d` (exit 0), then the merge holds the model and the
    /// base is unchanged.
    fn stop_and_check(&self, d: &Daemon, model: &Model, what: &str) {
        let st = d.terminate();
        assert_eq!(
            st.code(),
            Some(0),
            "{what}: exit after SIGTERM\n{}",
            logs(&[d])
        );
        model.check(
            0,
            &self.merged(),
            &format!("{what}: uml_moo merge after the stop"),
        );
        self.assert_base_unchanged();
    }
}

/// `handover` on `control` has this role, state and peer.
fn assert_handover(control: &Path, role: &str, state: &str, peer: Option<u32>, what: &str) {
    let h = handover_of(control);
    assert_eq!(h["role"], role, "{what}: {h}");
    assert_eq!(h["state"], state, "{what}: {h}");
    match peer {
        Some(p) => assert_eq!(h["peer_pid"], p, "{what}: {h}"),
        None => assert!(h["peer_pid"].is_null(), "{what}: {h}"),
    }
}

/// B's log line once the switch-over brought it the disk.
const SWITCHED: &str = "handover: live (switch-over of a live migration";
/// A destination whose frontend left before the switch-over.
const LEFT: &str = "left before the switch-over";

// -------------------------------------------------- the migration tests --

/// A serves a COW (with `src-retired:4000` as its pause hook); its raw
/// frontend F_A (the source QEMU, logging dirty pages) writes a model and
/// flushes. B (`serve --takeover A.ctl --socket B.sock --control B.ctl`)
/// listens at once and shows destination/waiting while A shows
/// source/registered; its frontend F_B (the destination QEMU) gets A's
/// capacity from GET_CONFIG with no switch-over yet. F_B's ring start (the
/// destination VM runs; vhost-user-backend handles a ring as kicked once it
/// is enabled) triggers the switch-over, and F_B's first read, kicked right
/// after, reads the model through B. B logs the switch-over; A pauses at
/// `src-retired`, and while it does, a new write of F_A is answered IOERR
/// (not success, not a hang). A then exits 0, B shows destination/live,
/// the late write's sectors hold the base's data through F_B, B serves a
/// write of F_B, and after B's SIGTERM the merge holds the model (no late
/// write) and the base is unchanged.
#[test]
fn a_source_request_after_the_switch_over_gets_ioerr() {
    let s = Setup::new();
    let a = s.a(&[(PAUSE, "src-retired:4000")]);
    let mut model = s.model();
    let mut fa = Raw::open(a.socket(), Layout::io());
    let _a_log = fa.start_logging();
    for (id, (sector, n)) in [(0, 8), (100, 64), (1001, 3), (NSECT - 8, 8)]
        .into_iter()
        .enumerate()
    {
        model.write_raw(&mut fa, id as u64 + 1, sector, n, &a);
    }
    assert_eq!(fa.flush(SOON), Some(OK), "F_A's flush");

    let (b, b_sock, b_ctl) = s.destination("b", &a);
    assert_handover(
        &b_ctl,
        "destination",
        "waiting",
        Some(a.pid()),
        "B before the switch-over",
    );
    assert_handover(
        &s.a_ctl,
        "source",
        "registered",
        Some(b.pid()),
        "A while B waits",
    );
    let mut hs = Raw::handshake(&b_sock);
    assert_eq!(capacity(&mut hs.0), NSECT, "B's capacity (A's size)");
    assert!(
        !b.log().contains(SWITCHED),
        "B switched over before its frontend's ring started\n{}",
        logs(&[&b])
    );
    assert_handover(
        &b_ctl,
        "destination",
        "waiting",
        Some(a.pid()),
        "B after its frontend's handshake and GET_CONFIG",
    );
    let mut fb = Raw::start(hs, Layout::io());
    let t = Instant::now();
    model.check_raw(&mut fb, "F_B's first read through B", &[&b, &a]);
    eprintln!("F_B read the disk {:?} after its ring started", t.elapsed());
    assert!(
        b.wait_for_log(SWITCHED, SOON),
        "B does not log the switch-over\n{}",
        logs(&[&b, &a])
    );
    assert!(
        a.wait_for_log(&paused_at("src-retired"), SOON),
        "A never paused at src-retired\n{}",
        logs(&[&a, &b])
    );

    // The source VM's request after the switch-over: IOERR from the
    // retired disk, within 2 s.
    let late = 1500;
    let t = Instant::now();
    let got = fa.write(late, &stamps(99, late, 8), Duration::from_secs(2));
    eprintln!("F_A's late write: {got:?} after {:?}", t.elapsed());
    assert!(
        a.is_running(),
        "A exited before its pause at src-retired ended: the test did not test a retired A"
    );
    assert_eq!(
        got,
        Some(IOERR),
        "F_A's write to A after the switch-over (None: no answer within 2 s)\n{}",
        logs(&[&a])
    );
    let st = a
        .wait_timeout(SOON)
        .unwrap_or_else(|| panic!("A still runs after the switch-over\n{}", logs(&[&a])));
    assert_eq!(st.code(), Some(0), "A's exit\n{}", logs(&[&a]));
    assert_handover(
        &b_ctl,
        "destination",
        "live",
        Some(a.pid()),
        "B after the switch-over",
    );

    // The late write never reached the disk; B serves on.
    let (st, data) = fb
        .read(late, 8 * SECTOR, SOON)
        .unwrap_or_else(|| panic!("no answer from B\n{}", logs(&[&b])));
    assert_eq!(st, OK);
    model.check(late, &data, "the late write's sectors through B");
    model.write_raw(&mut fb, 10, 1200, 16, &b);
    assert_eq!(fb.flush(SOON), Some(OK), "F_B's flush");
    model.check_raw(&mut fb, "F_B's second read through B", &[&b]);
    drop(fb);
    drop(fa);
    s.stop_and_check(&b, &model, "B");
}

/// SET_MEM_TABLE and ring 0's SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL,
/// but no SET_VRING_ENABLE: with PROTOCOL_FEATURES acked the ring stays
/// disabled, so it has not started (vhost-user-backend handles a ring as
/// kicked once it is enabled, which starts a destination's switch-over).
fn set_up_ring_without_enabling_it(fe: &mut Frontend) {
    let gm = GuestMem::new(&[(0, 2 << 20)]);
    gm.hand_over(fe, MemPath::SetMemTable);
    let mut ring = Ring::new(0, QSIZE, 0);
    ring.clear(&gm);
    fe.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
    fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
    let cfg = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: gm.va(ring.desc),
        used_ring_addr: gm.va(ring.used),
        avail_ring_addr: gm.va(ring.avail),
        log_addr: None,
    };
    fe.set_vring_addr(0, &cfg).expect("SET_VRING_ADDR");
    fe.set_vring_kick(0, &ring.kick).expect("SET_VRING_KICK");
    fe.set_vring_call(0, &ring.call).expect("SET_VRING_CALL");
}

/// A serves a COW to a libblkio client F_A (writes, flushed). A migration
/// destination B is started twice, and each time its frontend leaves
/// before the switch-over (as a destination QEMU does when the migration
/// is cancelled or it quits before the VM runs): the first after the
/// handshake and GET_CONFIG (A's capacity), the second after it also sent
/// its memory table and set ring 0 up without enabling it (no ring
/// started, no request). Each time B exits 0 saying its frontend left
/// before the switch-over, A logs the handover aborted and shows it idle,
/// and F_A's writes, flush and full read work on A. After A's SIGTERM the
/// merge holds the model.
#[test]
fn a_destination_whose_frontend_leaves_before_the_switch_over_stops_and_the_source_serves_on() {
    let s = Setup::new();
    let a = s.a(&[]);
    let _wd = a.watchdog(Duration::from_secs(60));
    let mut model = s.model();
    let mut fa = client::connect_one_queue(a.socket());
    model.write_blkio(&mut fa, 1, 10, 32);
    model.write_blkio(&mut fa, 2, 700, 64);
    assert_eq!(client::flush(fa.q(0)), 0, "F_A's flush");

    for (round, name, rings) in [(1, "b1", false), (2, "b2", true)] {
        let what = format!("round {round} ({name}, ring set up but not enabled: {rings})");
        let (b, b_sock, b_ctl) = s.destination(name, &a);
        assert_handover(
            &b_ctl,
            "destination",
            "waiting",
            Some(a.pid()),
            &format!("{what}: B"),
        );
        assert_handover(
            &s.a_ctl,
            "source",
            "registered",
            Some(b.pid()),
            &format!("{what}: A"),
        );
        let (mut fe, ..) = Raw::handshake(&b_sock);
        assert_eq!(capacity(&mut fe), NSECT, "{what}: B's capacity");
        if rings {
            set_up_ring_without_enabling_it(&mut fe);
        }
        drop(fe);
        let st = b.wait_timeout(SOON).unwrap_or_else(|| {
            panic!(
                "{what}: B still runs {SOON:?} after its frontend left\n{}",
                logs(&[&b, &a])
            )
        });
        assert_eq!(st.code(), Some(0), "{what}: B's exit\n{}", logs(&[&b]));
        let blog = b.log();
        assert!(blog.contains(LEFT), "{what}: B's log:\n{blog}");
        assert!(
            !blog.contains("asking for the disk") && !blog.contains(LIVE),
            "{what}: B started a switch-over:\n{blog}"
        );
        assert!(
            wait_until(SOON, || a.log_count(ABORTED) >= round),
            "{what}: A does not log {ABORTED:?}\n{}",
            logs(&[&a])
        );
        a.assert_running();
        assert_handover(&s.a_ctl, "none", "idle", None, &format!("{what}: A after"));
        model.write_blkio(&mut fa, 10 + round as u64, 300 * round as u64, 16);
        assert_eq!(client::flush(fa.q(0)), 0, "{what}: F_A's flush");
        model.check_blkio(&mut fa, &format!("{what}: F_A's read of A"));
    }
    drop(fa);
    s.stop_and_check(&a, &model, "A");
}

/// A serves a COW to a raw frontend F_A, which writes and flushes, then
/// starts logging dirty pages (SET_LOG_BASE, SET_FEATURES with LOG_ALL).
/// A normal handover C (`serve --takeover A.ctl`, no --socket) is refused:
/// C exits non-zero with a message about the live migration, A logs the
/// handover aborted, shows it idle and serves F_A on (write, flush, full
/// read).
///
/// Negative control: once F_A stops logging (SET_FEATURES without LOG_ALL,
/// a cancelled migration), the same takeover D is accepted: D goes live,
/// A exits 0, and a libblkio client reads the model through D.
#[test]
fn a_normal_handover_is_refused_while_a_migration_runs() {
    let s = Setup::new();
    let a = s.a(&[]);
    let mut model = s.model();
    let mut fa = Raw::open(a.socket(), Layout::io());
    model.write_raw(&mut fa, 1, 20, 16, &a);
    assert_eq!(fa.flush(SOON), Some(OK), "F_A's flush");
    let _log = fa.start_logging();

    let c = s.takeover("c", &a);
    let st = c.wait_timeout(SOON).unwrap_or_else(|| {
        panic!(
            "C still runs {SOON:?} after its start: not refused\n{}",
            logs(&[&c, &a])
        )
    });
    let clog = c.log();
    assert!(!st.success(), "C was accepted ({st}):\n{clog}");
    assert!(
        clog.contains("live migration") && !clog.contains(LIVE),
        "C's message does not name the live migration:\n{clog}"
    );
    assert!(
        wait_until(SOON, || a.log_count(ABORTED) >= 1),
        "A does not log {ABORTED:?}\n{}",
        logs(&[&a])
    );
    a.assert_running();
    assert_handover(&s.a_ctl, "none", "idle", None, "A after the refusal");
    model.write_raw(&mut fa, 2, 300, 8, &a);
    assert_eq!(fa.flush(SOON), Some(OK), "F_A's flush after the refusal");
    model.check_raw(&mut fa, "F_A's read of A after the refusal", &[&a]);

    // Negative control: no migration, the same takeover goes through.
    fa.log_all(false);
    let d = s.takeover("d", &a);
    assert!(
        d.wait_for_log(LIVE, SOON),
        "D (no migration running) did not go live\n{}",
        logs(&[&d, &a])
    );
    let st = a
        .wait_timeout(SOON)
        .unwrap_or_else(|| panic!("A still runs after D went live\n{}", logs(&[&a])));
    assert_eq!(st.code(), Some(0), "A's exit after the handover to D");
    drop(fa);
    let mut c = client::connect_one_queue(d.socket());
    model.check_blkio(&mut c, "a fresh client's read through D");
    drop(c);
    s.stop_and_check(&d, &model, "D");
}
