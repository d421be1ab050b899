// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers for `tests/vhost_frontend.rs` and `tests/hostile_frontend.rs`:
//! start the real daemon (the common launcher) on a fresh disk, build memfd
//! "guest memory", hand-build split rings in it and push virtio-blk
//! requests through them with `vhost`'s `Frontend`.

pub mod ring;

use std::{
    fs::File,
    ops::Deref,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

use vhost::{
    vhost_user::{
        message::{VhostUserHeaderFlag, VhostUserProtocolFeatures},
        Frontend, VhostUserFrontend,
    },
    VhostBackend,
};

pub use ring::{Desc, GuestMem, Ring, Used};

use super::daemon::{self, DaemonBuilder};

/// Sectors of the test disk (1 MiB).
pub const DISK_SECTORS: u64 = 2048;
/// Bytes of the test disk.
pub const DISK_BYTES: u64 = DISK_SECTORS * 512;
/// How long any single wait in these tests may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A 20-byte serial (the whole virtio-blk id).
pub const SERIAL: &str = "ubd-frontend-test-20";

/// Initial content of disk byte `pos`: different in every sector.
pub fn disk_byte(pos: u64) -> u8 {
    ((pos / 512).wrapping_mul(131) ^ pos.wrapping_mul(7) ^ 0x5a) as u8
}

/// A test pattern (never equal to the initial disk content for long).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ 0xa5)
        .collect()
}

/// The daemon binary (the common launcher) serving a fresh 1 MiB disk in
/// its own tempdir; everything of [`daemon::Daemon`] through `Deref`.
#[derive(Debug)]
pub struct Daemon {
    /// Declared first: killed before the tempdir goes.
    daemon: daemon::Daemon,
    /// The disk image served (the COW for [`Daemon::start_cow`]).
    pub disk: PathBuf,
    dir: tempfile::TempDir,
}

impl Deref for Daemon {
    type Target = daemon::Daemon;

    fn deref(&self) -> &daemon::Daemon {
        &self.daemon
    }
}

impl Daemon {
    /// Starts `vhost-user-ubd serve --socket S --raw DISK EXTRA...` on a
    /// fresh 1 MiB disk filled with [`disk_byte`]; returns once the socket
    /// listens.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.raw");
        write_initial(&disk);
        let b = DaemonBuilder::new(dir.path()).raw(&disk);
        Self::spawn(dir, disk, b, extra)
    }

    /// Like [`Daemon::start`], but serving a UML COW file created over a
    /// backing image with the [`disk_byte`] content (`disk` is the COW).
    pub fn start_cow(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("backing.img");
        write_initial(&backing);
        let cow = dir.path().join("disk.cow");
        let b = DaemonBuilder::new(dir.path()).cow(&cow, Some(&backing));
        Self::spawn(dir, cow, b, extra)
    }

    /// The daemon logs with `VUB_TEST_LOG` (default `info`), not the test's
    /// `RUST_LOG`: the tests wait for its info lines. No lifetime deadline:
    /// the tests arm [`daemon::Daemon::watchdog`] where a hang is possible.
    fn spawn(dir: tempfile::TempDir, disk: PathBuf, b: DaemonBuilder, extra: &[&str]) -> Self {
        let log = std::env::var("VUB_TEST_LOG").unwrap_or_else(|_| "info".into());
        let daemon = b.args(extra).rust_log(&log).no_deadline().spawn();
        Self { daemon, disk, dir }
    }

    /// Connects a frontend that believes the device has `queues` queues.
    pub fn connect(&self, queues: u64) -> Frontend {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match Frontend::connect(self.socket(), queues) {
                Ok(f) => return f,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connect: {e}; retrying");
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to the daemon: {e}\n{}", self.log()),
            }
        }
    }

    /// Reads `len` bytes of the disk image at `offset` (what the daemon
    /// wrote, through the page cache).
    pub fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = File::open(&self.disk).expect("open disk");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read disk");
        buf
    }

    /// Sends SIGTERM and waits for the exit (due within [`TIMEOUT`]);
    /// returns the status and the log. The tempdir (disk image, log)
    /// stays until `self` is dropped.
    pub fn stop(&self) -> (ExitStatus, String) {
        (self.terminate_within(TIMEOUT), self.log())
    }

    /// The tempdir (for extra files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Writes a [`DISK_BYTES`] image with the [`disk_byte`] content.
fn write_initial(path: &Path) {
    let data: Vec<u8> = (0..DISK_BYTES).map(disk_byte).collect();
    std::fs::write(path, data).expect("write disk image");
}

/// How the frontend hands its memory to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemPath {
    /// No CONFIGURE_MEM_SLOTS: one SET_MEM_TABLE.
    SetMemTable,
    /// CONFIGURE_MEM_SLOTS negotiated: one ADD_MEM_REG per region.
    AddMemReg,
}

/// What [`negotiate`] agreed on.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    /// Virtio features offered by the daemon (all acked).
    pub features: u64,
    /// Protocol features offered by the daemon.
    pub offered_proto: VhostUserProtocolFeatures,
    /// Protocol features acked.
    pub proto: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM.
    pub queues: u64,
}

/// QEMU's order: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, then SET_FEATURES acking everything offered. Every
/// message asks for a reply (REPLY_ACK), so refusals surface as errors.
pub fn negotiate(fe: &mut Frontend, mem: MemPath) -> Negotiated {
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    let offered_proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let mut proto = offered_proto;
    if mem == MemPath::SetMemTable {
        proto.remove(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    }
    fe.set_protocol_features(proto)
        .expect("SET_PROTOCOL_FEATURES");
    let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
    fe.set_features(features).expect("SET_FEATURES");
    Negotiated {
        features,
        offered_proto,
        proto,
        queues,
    }
}

/// Session options.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Memory-table path.
    pub mem_path: MemPath,
    /// Guest memory regions (GPA, size), contiguous, ring in the first.
    pub regions: Vec<(u64, usize)>,
    /// Queue to use.
    pub queue: usize,
    /// Ring size.
    pub queue_size: u16,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            mem_path: MemPath::SetMemTable,
            regions: vec![(0, 2 << 20)],
            queue: 0,
            queue_size: 64,
        }
    }
}

/// A connected, negotiated frontend with memory and one started ring.
pub struct Session {
    /// The frontend.
    pub fe: Frontend,
    /// What was negotiated.
    pub neg: Negotiated,
    /// Guest memory.
    pub gm: GuestMem,
    /// The ring in use.
    pub ring: Ring,
    scratch_start: u64,
    scratch_end: u64,
    scratch_next: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("ring", &self.ring)
            .finish_non_exhaustive()
    }
}

/// A completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// The status byte (0xff: not written).
    pub status: u8,
    /// Used length.
    pub len: u32,
    /// Device-writable data (reads, GET_ID).
    pub data: Vec<u8>,
}

/// Status byte value before the device writes it.
pub const NO_STATUS: u8 = 0xff;

impl Session {
    /// Connects, negotiates, hands over memory and starts the ring.
    pub fn open(d: &Daemon, opts: &Opts) -> Self {
        let mut fe = d.connect(16);
        let neg = negotiate(&mut fe, opts.mem_path);
        let gm = GuestMem::new(&opts.regions);
        gm.hand_over(&mut fe, opts.mem_path);
        let base = opts.regions.first().expect("a region").0;
        let end = opts
            .regions
            .last()
            .map(|&(a, s)| a + s as u64)
            .expect("a region");
        let mut ring = Ring::new(opts.queue, opts.queue_size, base);
        ring.clear(&gm);
        ring.start(&mut fe, &gm, 0);
        Self {
            fe,
            neg,
            gm,
            ring,
            scratch_start: base + 0x10000,
            scratch_end: end,
            scratch_next: base + 0x10000,
        }
    }

    /// Guest memory for a buffer of `len` bytes (512-byte aligned, 64 for
    /// small ones; wraps around, which is fine because requests complete
    /// before their buffers are reused).
    pub fn alloc(&mut self, len: usize) -> u64 {
        let align = if len >= 512 { 512 } else { 64 };
        let len = (len as u64).max(1).next_multiple_of(align);
        let mut a = self.scratch_next.next_multiple_of(align);
        if a + len > self.scratch_end {
            a = self.scratch_start;
        }
        assert!(a + len <= self.scratch_end, "buffer too large");
        self.scratch_next = a + len;
        a
    }

    /// A request header in guest memory.
    pub fn header(&mut self, rtype: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.gm.write(a, &h);
        a
    }

    /// A status byte in guest memory, preset to [`NO_STATUS`].
    pub fn status_byte(&mut self) -> u64 {
        let a = self.alloc(1);
        self.gm.write(a, &[NO_STATUS]);
        a
    }

    /// Submits one chain, kicks, waits for it; checks the used id.
    pub fn run(&mut self, descs: &[Desc]) -> Used {
        let head = self.ring.add_chain(&self.gm, descs);
        self.ring.kick(&self.gm);
        let used = self.ring.wait_used(&self.gm, 1);
        assert_eq!(used[0].id, u32::from(head), "used id");
        used[0]
    }

    /// A write (OUT) of `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Done {
        let b = self.alloc(data.len());
        self.write_via(sector, b, data)
    }

    /// A write (OUT) of `data` at `sector` from the guest buffer at `buf`.
    pub fn write_via(&mut self, sector: u64, buf: u64, data: &[u8]) -> Done {
        let h = self.header(virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT, sector);
        self.gm.write(buf, data);
        let s = self.status_byte();
        let u = self.run(&[
            Desc::r(h, 16),
            Desc::r(buf, data.len() as u32),
            Desc::w(s, 1),
        ]);
        Done {
            status: self.gm.read(s, 1)[0],
            len: u.len,
            data: Vec::new(),
        }
    }

    /// A device-writable request of type `rtype` with a `len`-byte buffer.
    pub fn read_type(&mut self, rtype: u32, sector: u64, len: usize) -> Done {
        let b = self.alloc(len);
        self.read_via(rtype, sector, b, len)
    }

    /// A device-writable request of type `rtype` into the guest buffer at
    /// `buf` (preset to 0xee).
    pub fn read_via(&mut self, rtype: u32, sector: u64, buf: u64, len: usize) -> Done {
        let h = self.header(rtype, sector);
        self.gm.write(buf, &vec![0xee; len]);
        let s = self.status_byte();
        let u = self.run(&[Desc::r(h, 16), Desc::w(buf, len as u32), Desc::w(s, 1)]);
        Done {
            status: self.gm.read(s, 1)[0],
            len: u.len,
            data: self.gm.read(buf, len),
        }
    }

    /// A read (IN) of `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: usize) -> Done {
        self.read_type(virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN, sector, len)
    }

    /// A request with only a header and a status byte (FLUSH, unknown types).
    pub fn bare(&mut self, rtype: u32, sector: u64) -> Done {
        let h = self.header(rtype, sector);
        let s = self.status_byte();
        let u = self.run(&[Desc::r(h, 16), Desc::w(s, 1)]);
        Done {
            status: self.gm.read(s, 1)[0],
            len: u.len,
            data: Vec::new(),
        }
    }

    /// FLUSH.
    pub fn flush(&mut self) -> Done {
        self.bare(virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH, 0)
    }

    /// GET_ID into a `len`-byte buffer.
    pub fn get_id(&mut self, len: usize) -> Done {
        self.read_type(virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID, 0, len)
    }

    /// Reads `len` bytes at `sector` and checks status, used length and
    /// that the data equals `expect`.
    pub fn check_read(&mut self, sector: u64, expect: &[u8]) {
        let r = self.read(sector, expect.len());
        assert_eq!(r.status, 0, "read status at sector {sector}");
        assert_eq!(r.len as usize, expect.len() + 1, "read used len");
        assert!(r.data == expect, "read data at sector {sector} differs");
    }

    /// Writes and checks status and used length.
    pub fn check_write(&mut self, sector: u64, data: &[u8]) {
        let w = self.write(sector, data);
        assert_eq!(w.status, 0, "write status at sector {sector}");
        assert_eq!(w.len, 1, "write used len");
    }
}

/// The initial disk content of `len` bytes at `sector`.
pub fn initial(sector: u64, len: usize) -> Vec<u8> {
    (sector * 512..sector * 512 + len as u64)
        .map(disk_byte)
        .collect()
}
