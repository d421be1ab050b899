// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory handed to the kernel, and what keeps it alive.
//!
//! Invariant: an I/O operation owns what its iovecs point at until its
//! completion is reaped, whatever happens to the request, the connection or
//! the queue meanwhile. [`IoVecs`] carries an [`Owner`] (the guest memory
//! mapping, the bitmap, a buffer): the operation built from it holds that
//! owner until [`super::Engine::reap`] returns its completion, and an engine
//! is never dropped with operations in flight. So nothing here is freed or
//! unmapped on a timeout; a stuck operation keeps its memory forever.
//!
//! Safe constructors exist for memory the engine can vouch for: a buffer it
//! owns ([`IoVecs::from_buf`]), the shared zero page (write-only,
//! [`IoVecs::zeros`]), bytes of an [`AtomicBytes`] (write-only,
//! [`AtomicBytes::io_vecs`]). Memory of someone else (guest memory) goes
//! through the one `unsafe` constructor, [`IoVecs::with_owner`].

use std::{
    alloc::Layout,
    any::Any,
    io,
    ops::Range,
    ptr::NonNull,
    sync::{atomic::AtomicU8, Arc, OnceLock},
};

/// Alignment used for `O_DIRECT` bounce buffers and the alignment checks.
pub const DIRECT_ALIGN: usize = 512;
const BOUNCE_ALIGN: usize = 4096;
/// Size of the shared zero buffer ([`IoVecs::zeros`] repeats it).
const ZERO_CHUNK: usize = 64 * 1024;

/// Keeps memory an operation's iovecs point into valid.
pub type Owner = Arc<dyn Any + Send + Sync>;

/// A heap buffer aligned for `O_DIRECT`.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` gives out only a raw pointer (`as_mut_ptr`, whose
// every use is `unsafe` and answers for races itself) and shared reads
// through `as_slice`, which no `IoVecs` can race with: the safe ways to
// hand a buffer to the kernel take it by value.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment).
    pub fn new(len: usize) -> io::Result<Self> {
        let size = len
            .max(1)
            .checked_next_multiple_of(BOUNCE_ALIGN)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let layout = Layout::from_size_align(size, BOUNCE_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self { ptr, layout })
    }

    /// Start of the buffer.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes (the rounded-up size).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `capacity` initialised (zeroed) bytes owned by `self`; no
        // kernel operation holds them (those own the buffer, see above).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity()) }
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes other users.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

fn zero_buf() -> Option<&'static AlignedBuf> {
    static ZEROS: OnceLock<Option<AlignedBuf>> = OnceLock::new();
    ZEROS
        .get_or_init(|| AlignedBuf::new(ZERO_CHUNK).ok())
        .as_ref()
}

/// Memory for one read or write, with what keeps it valid.
#[derive(Default)]
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    owner: Option<Owner>,
    /// False: the kernel may only read this memory (write operations).
    writable: bool,
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecs")
            .field("segments", &self.iov.len())
            .field("len", &self.len())
            .field("owned", &self.owner.is_some())
            .field("writable", &self.writable)
            .finish()
    }
}

// SAFETY: the pointers are only dereferenced by the kernel, or by the engine
// on behalf of the operation, under the contract of the constructor that
// made them; the owner is `Send + Sync`.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Wraps iovecs into memory `owner` keeps valid.
    ///
    /// # Safety
    /// While `owner` lives, each iovec must describe valid memory (writable
    /// for reads, readable for writes) that nobody else writes (for writes)
    /// or accesses (for reads) until the operation carrying it completed.
    /// With `owner` `None` the caller itself keeps the memory valid until
    /// then (a caller that waits for the completion).
    pub unsafe fn with_owner(iov: Vec<libc::iovec>, owner: Option<Owner>) -> Self {
        Self {
            iov,
            owner,
            writable: true,
        }
    }

    /// Wraps iovecs the caller keeps valid until the operation completed.
    ///
    /// # Safety
    /// As [`Self::with_owner`] with no owner.
    pub unsafe fn new(iov: Vec<libc::iovec>) -> Self {
        // SAFETY: the caller's contract is ours.
        unsafe { Self::with_owner(iov, None) }
    }

    /// The first `len` bytes of `buf` (at most its capacity), which the
    /// operation owns. [`BufReturn::take`] gives the buffer back once the
    /// operation is done with it.
    pub fn from_buf(buf: AlignedBuf, len: usize) -> (Self, BufReturn) {
        let len = len.min(buf.capacity());
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }];
        let buf = Arc::new(buf);
        let owner: Owner = buf.clone();
        (
            Self {
                iov,
                owner: Some(owner),
                writable: true,
            },
            BufReturn(buf),
        )
    }

    /// `len` bytes of zeros, to write (the kernel only reads them).
    pub fn zeros(len: u64) -> io::Result<Self> {
        let buf = zero_buf().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let mut iov = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(ZERO_CHUNK as u64);
            iov.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: usize::try_from(n).unwrap_or(ZERO_CHUNK),
            });
            left = left.saturating_sub(n);
        }
        // The zero buffer is static: no owner needed, and nobody writes it.
        Ok(Self {
            iov,
            owner: None,
            writable: false,
        })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.iov.iter().map(|v| v.iov_len as u64).sum()
    }

    /// True when no byte is described.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the kernel may write this memory (reads into it).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The iovecs.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Moves the iovec array out (an operation hands it to the kernel);
    /// the owner stays.
    pub(crate) fn take_iov(&mut self) -> Vec<libc::iovec> {
        std::mem::take(&mut self.iov)
    }

    /// Puts an array taken by [`Self::take_iov`] back.
    pub(crate) fn put_iov(&mut self, iov: Vec<libc::iovec>) {
        self.iov = iov;
    }

    /// The bytes `[from, from+len)`, with the same owner.
    pub fn slice(&self, from: u64, len: u64) -> Self {
        let mut out = Vec::new();
        let (mut pos, end) = (0u64, from.saturating_add(len));
        for v in &self.iov {
            let (vs, ve) = (pos, pos.saturating_add(v.iov_len as u64));
            pos = ve;
            let (s, e) = (vs.max(from), ve.min(end));
            if s < e {
                // `vs <= s < e <= ve`: both differences fit the segment.
                let (skip, len) = (s.saturating_sub(vs) as usize, e.saturating_sub(s) as usize);
                out.push(libc::iovec {
                    // SAFETY: `skip < iov_len`: stays inside this buffer.
                    iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
                    iov_len: len,
                });
            }
            if pos >= end {
                break;
            }
        }
        Self {
            iov: out,
            owner: self.owner.clone(),
            writable: self.writable,
        }
    }
}

/// Gives back a buffer lent to an operation by [`IoVecs::from_buf`].
#[derive(Debug)]
pub struct BufReturn(Arc<AlignedBuf>);

impl BufReturn {
    /// The buffer, once every operation holding it completed (`None` while
    /// one still does).
    pub fn take(self) -> Option<AlignedBuf> {
        Arc::try_unwrap(self.0).ok()
    }
}

/// Bytes read and set with atomics by threads while the kernel writes
/// ranges of them to a file (the COW bitmap, R1).
pub struct AtomicBytes(Cells);

/// Where the cells of an [`AtomicBytes`] live.
enum Cells {
    /// The process heap.
    Heap(Box<[AtomicU8]>),
    /// A memfd mapped shared: another process can map the same bytes (a
    /// live handover passes the COW bitmap this way, without a copy).
    Shared {
        map: super::shm::SharedMap,
        file: std::fs::File,
    },
}

impl std::fmt::Debug for AtomicBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicBytes")
            .field("len", &self.as_slice().len())
            .field("shared", &self.memfd().is_some())
            .finish()
    }
}

impl AtomicBytes {
    /// Takes over `bytes` without copying (memory never touched stays
    /// untouched: a calloc'd vector stays lazily zeroed).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let boxed = bytes.into_boxed_slice();
        let len = boxed.len();
        let ptr = Box::into_raw(boxed).cast::<AtomicU8>();
        // SAFETY: `AtomicU8` has the same size, alignment and bit validity
        // as `u8` (documented in std), and the allocation came from a
        // `Box<[u8]>` of `len` elements, so it is a valid `Box<[AtomicU8]>`.
        let bytes = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) };
        Self(Cells::Heap(bytes))
    }

    /// `len` zero bytes in a fresh memfd named `name` (pages never touched
    /// take no memory), filled by `init` before anyone else can see them.
    /// Empty byte arrays live on the heap (there is nothing to share).
    pub fn shared<T>(
        name: &str,
        len: usize,
        init: impl FnOnce(&mut [u8]) -> io::Result<T>,
    ) -> io::Result<(Self, T)> {
        if len == 0 {
            let mut v = Vec::new();
            let t = init(&mut v)?;
            return Ok((Self::from_vec(v), t));
        }
        let file = super::sys::memfd(name)?;
        file.set_len(len as u64)?;
        let map = super::shm::SharedMap::map(&file, 0, len)?;
        // SAFETY: a fresh private memfd, mapped just now and `len` bytes
        // long: no other reference to these bytes exists while `init` runs
        // (the descriptor has not left this function), and the slice does
        // not outlive this statement.
        let bytes = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), len) };
        let t = init(bytes)?;
        Ok((Self(Cells::Shared { map, file }), t))
    }

    /// Maps the bytes of a memfd another process filled (see
    /// [`AtomicBytes::memfd`]); it must be exactly `len` bytes long.
    pub fn from_memfd(file: std::fs::File, len: usize) -> io::Result<Self> {
        let have = file.metadata()?.len();
        if have != len as u64 || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared bytes of {have} bytes where {len} were expected"),
            ));
        }
        let map = super::shm::SharedMap::map(&file, 0, len)?;
        Ok(Self(Cells::Shared { map, file }))
    }

    /// The memfd holding the bytes, when they live in one.
    pub fn memfd(&self) -> Option<&std::fs::File> {
        match &self.0 {
            Cells::Heap(_) => None,
            Cells::Shared { file, .. } => Some(file),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[AtomicU8] {
        match &self.0 {
            Cells::Heap(b) => b,
            // SAFETY: a live shared mapping of `len` readable and writable
            // bytes (unmapped only when `self` drops, and the slice borrows
            // `self`); `AtomicU8` has the size, alignment and bit validity of
            // `u8`, and all access goes through atomics, so other threads or
            // another process mapping the memfd may store concurrently.
            Cells::Shared { map, .. } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU8>(), map.len())
            },
        }
    }

    /// Bytes `range`, to write to a file; the operation keeps `self`
    /// alive. `None` when the range is not inside.
    ///
    /// Memory safety holds whatever other threads store meanwhile (the
    /// kernel reads initialised atomic cells that cannot be freed while the
    /// operation lives); which values it reads is the caller's rule to keep
    /// (R3: bytes of a write in flight are not modified).
    pub fn io_vecs(self: &Arc<Self>, range: Range<u64>) -> Option<IoVecs> {
        let start = usize::try_from(range.start).ok()?;
        let end = usize::try_from(range.end).ok()?;
        let cells = self.as_slice().get(start..end)?;
        let owner: Owner = self.clone();
        Some(IoVecs {
            iov: vec![libc::iovec {
                // `AtomicU8::as_ptr` points into the cell; the kernel reads.
                iov_base: cells.as_ptr().cast_mut().cast(),
                iov_len: cells.len(),
            }],
            owner: Some(owner),
            writable: false,
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn slices_keep_the_owner_and_stay_inside() {
        let (iov, back) = IoVecs::from_buf(AlignedBuf::new(4096).unwrap(), 4096);
        let part = iov.slice(512, 1024);
        assert_eq!(part.len(), 1024);
        assert!(part.writable());
        drop(iov);
        let back = match back.take() {
            Some(_) => panic!("the slice still owns the buffer"),
            None => BufReturn(
                part.owner
                    .clone()
                    .unwrap()
                    .downcast::<AlignedBuf>()
                    .unwrap(),
            ),
        };
        drop(part);
        assert!(back.take().is_some(), "last holder gone: buffer given back");
    }

    #[test]
    fn zeros_are_write_only_and_cover_the_length() {
        let z = IoVecs::zeros(3 * ZERO_CHUNK as u64 + 512).unwrap();
        assert_eq!(z.len(), 3 * ZERO_CHUNK as u64 + 512);
        assert!(!z.writable());
        assert_eq!(z.as_slice().len(), 4);
    }

    #[test]
    fn atomic_bytes_hand_out_only_ranges_inside() {
        let b = Arc::new(AtomicBytes::from_vec(vec![1, 2, 3]));
        assert_eq!(b.io_vecs(0..3).unwrap().len(), 3);
        assert!(b.io_vecs(1..4).is_none());
        assert!(!b.io_vecs(0..1).unwrap().writable());
    }

    #[test]
    fn shared_bytes_are_seen_through_the_memfd_by_a_second_mapping() {
        use std::sync::atomic::Ordering;
        let (a, n) = AtomicBytes::shared("test", 8192, |b| {
            b[5] = 7;
            Ok(3)
        })
        .unwrap();
        assert_eq!(n, 3);
        let fd = a.memfd().unwrap().try_clone().unwrap();
        let b = AtomicBytes::from_memfd(fd, 8192).unwrap();
        assert_eq!(b.as_slice()[5].load(Ordering::Relaxed), 7);
        a.as_slice()[8191].store(9, Ordering::Relaxed);
        assert_eq!(b.as_slice()[8191].load(Ordering::Relaxed), 9);
        let short = a.memfd().unwrap().try_clone().unwrap();
        assert!(
            AtomicBytes::from_memfd(short, 4096).is_err(),
            "length checked"
        );
        let (e, ()) = AtomicBytes::shared("empty", 0, |_| Ok(())).unwrap();
        assert!(e.as_slice().is_empty() && e.memfd().is_none());
    }
}
