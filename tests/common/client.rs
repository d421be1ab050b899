// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A libblkio (`blkio` crate) virtio-blk-vhost-user client for integration
//! tests, with the quirks of `docs/blkio-client.md` handled once:
//!
//! - `num-queues` (and `read-only`) are set between `connect` and `start`;
//!   a read-only device must be opened with `read-only` set, or `start`
//!   fails.
//! - The buffer region is allocated with `alloc_mem_region` and mapped with
//!   `map_mem_region` AFTER `start` (this driver sends one
//!   VHOST_USER_ADD_MEM_REG per region). Every buffer must lie inside it.
//! - Every `do_io` gets a timeout ([`IO_TIMEOUT`] unless told otherwise):
//!   without one, a dead server makes it wait forever.
//! - [`Client`] drops its queues before its `Blkio` (field order). Code
//!   that moves queues out must drop them before the client.
//!
//! Known libblkio 0.5.1 problem: `connect` computes
//! `max-transfer = size_max * seg_max` in `i32`. The daemon advertises
//! size_max = 4 MiB and seg_max = queue size - 2 (at most 1022); with the
//! default `--queue-size 1024` the product overflows, which panics in a
//! debug build of the client (and wraps to a negative `max-transfer` in a
//! release build). Start the daemon with `--queue-size` at most
//! [`MAX_DAEMON_QUEUE_SIZE`] unless the test is about exactly that.
//!
//! Buffers are addressed by offset into the client's one mapped region
//! ([`Mem`]); helpers copy bytes in and out. Each thread must use its own
//! part of the region, must not touch a buffer while a request using it is
//! in flight, and no `Mem` may be used after its [`Client`] (or
//! [`PartialRegion`]) is dropped: these rules are what the `unsafe` blocks
//! rely on.

use std::{
    mem::MaybeUninit,
    path::Path,
    time::{Duration, Instant},
};

pub use blkio::{Blkio, Blkioq, Completion, Errno, Error, MemoryRegion, ReqFlags};

/// Largest daemon `--queue-size` whose advertised limits libblkio 0.5.1
/// accepts (4 MiB * (512 - 2) < 2^31; see the module documentation).
pub const MAX_DAEMON_QUEUE_SIZE: u32 = 512;

/// Default `do_io` timeout: a request that takes longer is a hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// How to open the device.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    /// `num-queues` (the daemon must offer at least this many).
    pub num_queues: usize,
    /// Open read-only (required when the daemon serves `--readonly`).
    pub read_only: bool,
    /// Size of the mapped buffer region in bytes (rounded up to the
    /// driver's alignment).
    pub mem_len: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            read_only: false,
            mem_len: 1 << 20,
        }
    }
}

/// The client's mapped buffer region: plain offsets, bounds-checked.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    addr: usize,
    len: usize,
}

impl Mem {
    /// Region length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Address of `[off, off + len)`; panics when out of the region.
    pub fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "buffer {off}+{len} outside the {}-byte region",
            self.len
        );
        (self.addr + off) as *mut u8
    }

    /// Copies `data` into the region at `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        let p = self.ptr(off, data.len());
        // SAFETY: `ptr` checked that the range lies inside the region,
        // which is still mapped (this module's rules: no Mem outlives its
        // client) and which no request uses meanwhile; `data` is a
        // separate allocation (no overlap).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// Fills `[off, off + len)` with `byte`.
    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        let p = self.ptr(off, len);
        // SAFETY: as in `write`: inside the mapped region, unused meanwhile.
        unsafe { std::ptr::write_bytes(p, byte, len) };
    }

    /// Copies `[off, off + len)` out of the region.
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        let p = self.ptr(off, len);
        let mut v = vec![0u8; len];
        // SAFETY: as in `write`: inside the mapped region, no request in
        // flight writes to it; `v` is a separate allocation of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }
}

/// A started libblkio client with one mapped buffer region.
pub struct Client {
    /// The started queues. Declared before `blkio`: dropped first.
    pub queues: Vec<Blkioq>,
    /// `capacity` property, bytes.
    pub capacity: u64,
    /// The mapped buffer region.
    pub mem: Mem,
    region: MemoryRegion,
    blkio: Blkio,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("queues", &self.queues.len())
            .field("capacity", &self.capacity)
            .field("mem", &self.mem)
            .finish_non_exhaustive()
    }
}

/// `context: error` in one string.
fn ctx(what: &str, e: &Error) -> Error {
    Error::new(
        e.errno(),
        format!("{what}: {} ({:?})", e.message(), e.errno()),
    )
}

impl Client {
    /// Connects to `socket`, starts `cfg.num_queues` queues and maps a
    /// buffer region. Retries the connect for up to 5 s while the socket
    /// refuses (a daemon between two connections is still listening, so
    /// this only covers a daemon that has just started).
    pub fn connect(socket: &Path, cfg: &ClientConfig) -> Result<Client, Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| ctx("Blkio::new", &e))?;
        let path = socket.to_str().expect("socket path is UTF-8");
        b.set_str("path", path).map_err(|e| ctx("path", &e))?;
        if cfg.read_only {
            b.set_bool("read-only", true)
                .map_err(|e| ctx("read-only", &e))?;
        }
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match b.connect() {
                Ok(()) => break,
                Err(e)
                    if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                        && Instant::now() < end =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(ctx("connect", &e)),
            }
        }
        let n = i32::try_from(cfg.num_queues).expect("queue count fits i32");
        b.set_i32("num-queues", n)
            .map_err(|e| ctx("num-queues", &e))?;
        let started = b.start().map_err(|e| ctx("start", &e))?;
        let capacity = b.get_u64("capacity").map_err(|e| ctx("capacity", &e))?;
        let align = usize::try_from(
            b.get_u64("mem-region-alignment")
                .map_err(|e| ctx("mem-region-alignment", &e))?,
        )
        .expect("alignment fits usize")
        .max(1);
        let len = cfg.mem_len.div_ceil(align) * align;
        let region = b
            .alloc_mem_region(len)
            .map_err(|e| ctx("alloc_mem_region", &e))?;
        b.map_mem_region(&region)
            .map_err(|e| ctx("map_mem_region", &e))?;
        Ok(Client {
            queues: started.queues,
            capacity,
            mem: Mem {
                addr: region.addr,
                len: region.len,
            },
            region,
            blkio: b,
        })
    }

    /// The mapped region as libblkio describes it.
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }

    /// Maps `mapped + unmapped` bytes of a new memfd into this process but
    /// registers only the first `mapped` bytes with the device (both page
    /// multiples). A buffer that runs from the registered part into the
    /// rest is partly outside guest memory, and nothing else can sit at
    /// those addresses (unlike the bytes after a region: libblkio's vring
    /// region often follows the last buffer region directly).
    pub fn map_partial(&mut self, mapped: usize, unmapped: usize) -> Result<PartialRegion, Error> {
        let total = mapped + unmapped;
        // SAFETY: plain syscalls on a fresh memfd; the mapping is owned by
        // the returned PartialRegion, which unmaps it on drop.
        let (fd, addr) = unsafe {
            let fd = libc::memfd_create(c"test-partial".as_ptr(), 0);
            if fd < 0 {
                return Err(Error::from_last_os_error());
            }
            let size = libc::off_t::try_from(total).expect("size fits off_t");
            if libc::ftruncate(fd, size) != 0 {
                let e = Error::from_last_os_error();
                libc::close(fd);
                return Err(e);
            }
            let addr = libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if addr == libc::MAP_FAILED {
                let e = Error::from_last_os_error();
                libc::close(fd);
                return Err(e);
            }
            (fd, addr as usize)
        };
        let region = MemoryRegion {
            addr,
            iova: 0,
            len: mapped,
            fd,
            fd_offset: 0,
            flags: 0,
        };
        let part = PartialRegion {
            mem: Mem { addr, len: total },
            mapped,
            fd,
        };
        self.blkio
            .map_mem_region(&region)
            .map_err(|e| ctx("map_mem_region (partial)", &e))?;
        Ok(part)
    }

    /// The underlying `Blkio` (properties).
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// Queue `i`.
    pub fn q(&mut self, i: usize) -> &mut Blkioq {
        &mut self.queues[i]
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Queues before the Blkio (the field order does the same; explicit
        // here so that reordering the fields cannot break it). No explicit
        // unmap_mem_region: it waits for the server's reply, which would
        // hang on a stuck server; dropping the Blkio closes the socket.
        self.queues.clear();
    }
}

/// Memory of which only the first `mapped` bytes are guest memory (see
/// [`Client::map_partial`]). Drop it after the client.
#[derive(Debug)]
pub struct PartialRegion {
    /// All of it (registered part first).
    pub mem: Mem,
    /// Bytes registered with the device.
    pub mapped: usize,
    fd: libc::c_int,
}

impl Drop for PartialRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping and descriptor were created by map_partial
        // and are owned by self; no request uses them any more (the rule
        // of this module; drop it after the client).
        unsafe {
            libc::munmap(self.mem.addr as *mut libc::c_void, self.mem.len);
            libc::close(self.fd);
        }
    }
}

/// One completion: the request's `user_data` and `ret` (0 or -errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The `user_data` given at submission.
    pub user_data: usize,
    /// 0 or a negative errno.
    pub ret: i32,
}

/// Waits for at least `min` completions, at most `timeout`; returns every
/// completion available (up to 256). `Err` with `ETIME` on timeout.
pub fn wait(q: &mut Blkioq, min: usize, timeout: Duration) -> Result<Vec<Done>, Error> {
    let mut buf: [MaybeUninit<Completion>; 256] = [const { MaybeUninit::uninit() }; 256];
    let mut left = timeout;
    let n = q.do_io(&mut buf, min, Some(&mut left), None)?;
    Ok(buf[..n]
        .iter()
        .map(|c| {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            Done {
                user_data: c.user_data,
                ret: c.ret,
            }
        })
        .collect())
}

/// Submits one request with `submit(q, user_data)` and waits for its
/// completion; returns its `ret`. `Err` on a `do_io` failure or timeout.
/// The queue must have nothing else in flight.
pub fn sync_io(
    q: &mut Blkioq,
    timeout: Duration,
    submit: impl FnOnce(&mut Blkioq, usize),
) -> Result<i32, Error> {
    const TAG: usize = 0x5EED;
    submit(q, TAG);
    let done = wait(q, 1, timeout)?;
    assert_eq!(done.len(), 1, "one request in flight, got {done:?}");
    assert_eq!(done[0].user_data, TAG);
    Ok(done[0].ret)
}

/// Reads `len` bytes at disk offset `pos` through region bytes
/// `[mem_off, mem_off + len)`; `Ok(data)` or `Err(ret)` (negative errno).
/// Panics on a timeout.
pub fn read_at(
    q: &mut Blkioq,
    mem: Mem,
    mem_off: usize,
    pos: u64,
    len: usize,
) -> Result<Vec<u8>, i32> {
    let p = mem.ptr(mem_off, len);
    let ret = sync_io(q, IO_TIMEOUT, |q, tag| {
        q.read(pos, p, len, tag, ReqFlags::empty());
    })
    .unwrap_or_else(|e| panic!("read {len} at {pos}: {e}"));
    if ret == 0 {
        Ok(mem.read(mem_off, len))
    } else {
        Err(ret)
    }
}

/// Writes `data` at disk offset `pos` through region bytes starting at
/// `mem_off`; returns `ret`. Panics on a timeout.
pub fn write_at(q: &mut Blkioq, mem: Mem, mem_off: usize, pos: u64, data: &[u8]) -> i32 {
    mem.write(mem_off, data);
    let p = mem.ptr(mem_off, data.len());
    sync_io(q, IO_TIMEOUT, |q, tag| {
        q.write(pos, p, data.len(), tag, ReqFlags::empty());
    })
    .unwrap_or_else(|e| panic!("write {} at {pos}: {e}", data.len()))
}

/// FLUSH; returns `ret`. Panics on a timeout.
pub fn flush(q: &mut Blkioq) -> i32 {
    sync_io(q, IO_TIMEOUT, |q, tag| q.flush(tag, ReqFlags::empty()))
        .unwrap_or_else(|e| panic!("flush: {e}"))
}

/// DISCARD `[pos, pos + len)`; returns `ret`. Panics on a timeout.
pub fn discard(q: &mut Blkioq, pos: u64, len: u64) -> i32 {
    sync_io(q, IO_TIMEOUT, |q, tag| {
        q.discard(pos, len, tag, ReqFlags::empty());
    })
    .unwrap_or_else(|e| panic!("discard {len} at {pos}: {e}"))
}

/// WRITE_ZEROES `[pos, pos + len)` (with the UNMAP flag unless
/// `no_unmap`); returns `ret`. Panics on a timeout.
pub fn write_zeroes(q: &mut Blkioq, pos: u64, len: u64, no_unmap: bool) -> i32 {
    let flags = if no_unmap {
        ReqFlags::NO_UNMAP
    } else {
        ReqFlags::empty()
    };
    sync_io(q, IO_TIMEOUT, |q, tag| q.write_zeroes(pos, len, tag, flags))
        .unwrap_or_else(|e| panic!("write-zeroes {len} at {pos}: {e}"))
}

/// A writable one-queue client with 4 MiB of buffers (panics on failure).
pub fn connect_one_queue(socket: &Path) -> Client {
    Client::connect(
        socket,
        &ClientConfig {
            num_queues: 1,
            read_only: false,
            mem_len: 4 << 20,
        },
    )
    .unwrap_or_else(|e| panic!("connect to {}: {e:?}", socket.display()))
}
