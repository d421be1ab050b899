// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Interoperability with the real UML tools (`uml_mkcow`, `uml_moo`) and
//! the checks of `docs/ubd-cow-format.md` section 12: header parity, data
//! written through the Disk API merged by `uml_moo`, legacy versions,
//! refused backing files and locks, and when bits reach the disk (R5).

mod common;

use std::{
    collections::BTreeSet, os::unix::fs::FileExt, path::Path, process::Command, sync::Arc,
    time::Duration,
};

use common::*;
use vhost_user_ubd::{
    cow::{create_cow, header::COW_MAGIC},
    disk::{open_cow, Blocking, Disk, DiskOptions, Op, Request, Submitted},
};

fn opts(backing: Option<&Path>) -> DiskOptions {
    DiskOptions {
        backing: backing.map(Path::to_path_buf),
        max_pending_age: Duration::from_secs(3600),
        ..DiskOptions::default()
    }
}

#[test]
fn create_is_byte_identical_to_uml_mkcow() {
    let dir = tempfile::tempdir().unwrap();
    for size in [
        64 << 10,
        (1 << 20) + 1,
        (8 << 20) + 100,
        3 * 512 + 7,
        5 << 20,
    ] {
        let base = dir.path().join(format!("base-{size}.img"));
        make_backing(&base, size);
        let ours = dir.path().join(format!("ours-{size}.cow"));
        let theirs = dir.path().join(format!("theirs-{size}.cow"));
        create_cow(&ours, &base, 4096).unwrap();
        run(Command::new(tool("uml_mkcow")).arg(&theirs).arg(&base));
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "length differs for size {size}");
        assert!(a == b, "content differs for size {size}");
    }
}

#[test]
fn create_refuses_an_existing_file_and_stores_an_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 64 << 10);
    let cow = dir.path().join("x.cow");
    create_cow(&cow, &base, 512).unwrap();
    let err = create_cow(&cow, &base, 512).unwrap_err();
    assert!(err.to_string().contains("x.cow"), "{err}");
    // Relative path with a `..` in the directory part: stored resolved.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let rel = sub.join("../base.img");
    let cow2 = dir.path().join("y.cow");
    let h = create_cow(&cow2, &rel, 4096).unwrap();
    assert_eq!(h.backing_file, std::fs::canonicalize(&base).unwrap());
}

/// Writes `pattern(sector, salt)` into a buffer of `n` sectors.
fn pattern(sector: u64, n: u64, salt: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * 512) as usize);
    for s in sector..sector + n {
        for i in 0..512u64 {
            v.push((s as u8) ^ (i as u8).wrapping_mul(7) ^ salt | 0x80);
        }
    }
    v
}

#[test]
fn disk_api_writes_merge_with_uml_moo_and_set_exactly_the_written_bits() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = (8 << 20) + 100; // odd size: last sector is partial
    let base = dir.path().join("base.img");
    make_backing(&base, size);
    let cow = dir.path().join("disk.cow");
    let disk = open_cow(&cow, &opts(Some(&base))).unwrap();
    let nsect = disk.info().sectors();
    assert_eq!(nsect, 16_385);
    let mut q = Blocking::new(disk.as_ref()).unwrap();
    let mut model: Vec<u8> = (0..nsect * 512)
        .map(|p| if p < size { backing_byte(p) } else { 0 })
        .collect();
    let mut written = BTreeSet::new();
    let mut write = |q: &mut Blocking, sector: u64, n: u64, salt: u8| {
        let data = pattern(sector, n, salt);
        q.write(sector, &data).unwrap();
        model[(sector * 512) as usize..((sector + n) * 512) as usize].copy_from_slice(&data);
        written.extend(sector..sector + n);
    };
    write(&mut q, 0, 1, 1); // single sectors
    write(&mut q, 9, 1, 2);
    write(&mut q, 800, 8, 3); // 4 KiB aligned
    write(&mut q, 1003, 13, 4); // unaligned multi-sector run crossing bytes
    write(&mut q, 2047, 3, 5);
    write(&mut q, nsect - 1, 1, 6); // the partial last sector
    write(&mut q, 1003, 2, 7); // rewrite inside a written run
    q.run(Op::Discard {
        sector: 4000,
        nsect: 20,
    })
    .unwrap();
    model[4000 * 512..4020 * 512].fill(0);
    written.extend(4000..4020);
    q.run(Op::WriteZeroes {
        sector: 805,
        nsect: 6,
        unmap: false,
    })
    .unwrap();
    model[805 * 512..811 * 512].fill(0);
    written.extend(805..811);
    q.flush().unwrap();

    let mut back = vec![0u8; (nsect * 512) as usize];
    for (i, chunk) in back.chunks_mut(64 * 1024).enumerate() {
        q.read(i as u64 * 128, chunk).unwrap();
    }
    assert!(back == model, "Disk API read-back differs from the model");
    drop(q);
    disk.shutdown().unwrap();
    drop(disk);

    let merged = uml_moo(&cow, &dir.path().join("merged.img"));
    // uml_moo drops the trailing partial sector.
    let full = (size / 512 * 512) as usize;
    assert_eq!(merged.len(), full);
    assert!(
        merged[..] == back[..full],
        "uml_moo merge differs from what the Disk API read"
    );
    let bits = set_sectors(&disk_bitmap(&cow), nsect);
    assert_eq!(bits, written.into_iter().collect::<Vec<_>>());
}

/// Hand-made legacy COW: header bytes, then bitmap and data per the spec.
struct Legacy {
    bytes: Vec<u8>,
    bitmap_offset: u64,
    data_offset: u64,
}

fn legacy(version: &str, backing: &Path, size: u64) -> Legacy {
    use std::os::unix::ffi::OsStrExt;
    let path = backing.as_os_str().as_bytes();
    let mtime = BACKING_MTIME as u32;
    let nsect = size.div_ceil(512);
    let put = |b: &mut Vec<u8>, off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    match version {
        "V1" => {
            let mut b = vec![0u8; 280];
            put(&mut b, 0, &COW_MAGIC.to_ne_bytes());
            put(&mut b, 4, &1u32.to_ne_bytes());
            put(&mut b, 8, path);
            put(&mut b, 264, &mtime.to_ne_bytes());
            put(&mut b, 268, &size.to_ne_bytes());
            put(&mut b, 276, &512u32.to_ne_bytes());
            let len = (size + 511) / 4096;
            Legacy {
                bytes: b,
                bitmap_offset: 280,
                data_offset: (280 + len).div_ceil(512) * 512,
            }
        }
        "V2" => {
            let mut b = vec![0u8; 4120];
            put(&mut b, 0, &COW_MAGIC.to_be_bytes());
            put(&mut b, 4, &2u32.to_be_bytes());
            put(&mut b, 8, path);
            put(&mut b, 4104, &mtime.to_be_bytes());
            put(&mut b, 4108, &size.to_be_bytes());
            put(&mut b, 4116, &512u32.to_be_bytes());
            let len = (size + 511) / 4096;
            Legacy {
                bytes: b,
                bitmap_offset: 4120,
                data_offset: (4120 + len).div_ceil(512) * 512,
            }
        }
        "V3_b" => {
            let mut b = vec![0u8; 4136];
            put(&mut b, 0, &COW_MAGIC.to_be_bytes());
            put(&mut b, 4, &3u32.to_be_bytes());
            put(&mut b, 8, &mtime.to_be_bytes());
            put(&mut b, 16, &size.to_be_bytes());
            put(&mut b, 24, &512u32.to_be_bytes());
            put(&mut b, 28, &4096u32.to_be_bytes());
            put(&mut b, 36, path);
            Legacy {
                bytes: b,
                bitmap_offset: 8192,
                data_offset: (8192 + nsect.div_ceil(8)).div_ceil(4096) * 4096,
            }
        }
        _ => unreachable!(),
    }
}

fn check_legacy_file(cow: &Path, base: &Path, size: u64, bitmap_offset: u64, data_offset: u64) {
    // Sectors 0, 5..8, 13 and the last full one are in the COW.
    let nsect = size / 512;
    let in_cow = [0u64, 5, 6, 7, 13, nsect - 1];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cow)
        .unwrap();
    f.set_len(data_offset + size).unwrap();
    for &s in &in_cow {
        let byte = bitmap_offset + s / 8;
        let mut cur = [0u8];
        f.read_exact_at(&mut cur, byte).unwrap();
        f.write_all_at(&[cur[0] | 1 << (s % 8)], byte).unwrap();
        f.write_all_at(&pattern(s, 1, 0x55), data_offset + s * 512)
            .unwrap();
    }
    drop(f);
    let disk = open_cow(
        cow,
        &DiskOptions {
            readonly: true,
            ..opts(None)
        },
    )
    .unwrap();
    let mut q = Blocking::new(disk.as_ref()).unwrap();
    let mut got = vec![0u8; (nsect * 512) as usize];
    q.read(0, &mut got).unwrap();
    for s in 0..nsect {
        let want = if in_cow.contains(&s) {
            pattern(s, 1, 0x55)
        } else {
            (s * 512..s * 512 + 512).map(backing_byte).collect()
        };
        assert!(
            got[(s * 512) as usize..(s * 512 + 512) as usize] == want[..],
            "{}: sector {s} differs",
            cow.display()
        );
    }
    drop(q);
    drop(disk);
    let merged = uml_moo(cow, &cow.with_extension("merged"));
    assert!(merged == got, "{}: uml_moo disagrees", cow.display());
    let _ = base;
}

#[test]
fn legacy_versions_and_alignment_512_read_like_uml_moo() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 256 << 10;
    let base = dir.path().join("base.img");
    make_backing(&base, size);
    for v in ["V1", "V2", "V3_b"] {
        let l = legacy(v, &base, size);
        let cow = dir.path().join(format!("{v}.cow"));
        std::fs::write(&cow, &l.bytes).unwrap();
        check_legacy_file(&cow, &base, size, l.bitmap_offset, l.data_offset);
    }
    let cow = dir.path().join("a512.cow");
    create_cow(&cow, &base, 512).unwrap();
    // round_up(4128, 512) = 4608; bitmap 64 bytes; data at 4608+64 -> 5120.
    check_legacy_file(&cow, &base, size, 4608, 5120);
}

fn open_err(cow: &Path, o: &DiskOptions) -> String {
    match open_cow(cow, o) {
        Ok(_) => panic!("{} opened but should have been refused", cow.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn touched_truncated_or_missing_backing_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    create_cow(&cow, &base, 4096).unwrap();
    set_mtime(&base, BACKING_MTIME + 60);
    let e = open_err(&cow, &opts(None));
    assert!(
        e.contains("mtime") && e.contains("base.img") && e.contains("c.cow"),
        "{e}"
    );
    assert!(e.contains("modified"), "{e}");
    set_mtime(&base, BACKING_MTIME);
    open_cow(&cow, &opts(None)).unwrap().shutdown().unwrap();
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(512 << 10)
        .unwrap();
    set_mtime(&base, BACKING_MTIME);
    let e = open_err(&cow, &opts(None));
    assert!(e.contains("size 524288") && e.contains("1048576"), "{e}");
    std::fs::remove_file(&base).unwrap();
    let e = open_err(&cow, &opts(None));
    assert!(
        e.contains("cannot open backing file") && e.contains("base.img"),
        "{e}"
    );
}

#[test]
fn corrupt_or_truncated_cow_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    create_cow(&cow, &base, 4096).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&cow).unwrap();
    f.set_len(8300).unwrap();
    let e = open_err(&cow, &opts(None));
    assert!(e.contains("truncated") && e.contains("c.cow"), "{e}");
    f.set_len(100).unwrap();
    let e = open_err(&cow, &opts(None));
    assert!(e.contains("truncated") && e.contains("4128"), "{e}");
    f.set_len(0).unwrap();
    f.write_all_at(&vec![b'x'; 8192], 0).unwrap();
    let e = open_err(&cow, &opts(None));
    assert!(
        e.contains("not a UML COW file") && e.contains("--raw"),
        "{e}"
    );
    create_cow(&dir.path().join("d.cow"), &base, 4096).unwrap();
    let d = dir.path().join("d.cow");
    let f = std::fs::OpenOptions::new().write(true).open(&d).unwrap();
    f.write_all_at(&0u32.to_be_bytes(), 24).unwrap();
    let e = open_err(&d, &opts(None));
    assert!(e.contains("alignment") && e.contains("d.cow"), "{e}");
}

#[test]
fn a_cow_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    let first = open_cow(&cow, &opts(Some(&base))).unwrap();
    let e = open_err(&cow, &opts(None));
    assert!(e.contains("locked") && e.contains("c.cow"), "{e}");
    assert!(e.contains("OFD"), "{e}");
    first.shutdown().unwrap();
    drop(first);
    // A classic POSIX lock, as UML takes, held by another process.
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl,sys,time\nf=open(sys.argv[1],'r+')\nfcntl.lockf(f,fcntl.LOCK_EX)\n\
             print('locked',flush=True)\ntime.sleep(30)",
        )
        .arg(&cow)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let e = open_err(&cow, &opts(None));
    assert!(e.contains(&format!("process {}", child.id())), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let ok = open_cow(&cow, &opts(None)).unwrap();
    ok.shutdown().unwrap();
    drop(ok);

    // A lock held by another open file description that goes away soon (a
    // daemon killed a moment ago, its in-flight I/O still draining) is
    // waited for, within `lock_wait`; a POSIX holder (UML) never is.
    let holder = open_cow(&cow, &opts(None)).unwrap();
    let waiting = DiskOptions {
        lock_wait: Duration::from_secs(10),
        ..opts(None)
    };
    let t = std::time::Instant::now();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        holder.shutdown().unwrap();
        drop(holder);
    });
    let d = open_cow(&cow, &waiting).expect("the lock is taken once its holder lets go");
    let waited = t.elapsed();
    release.join().unwrap();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    d.shutdown().unwrap();
}

/// The other direction of the lock interop: while the daemon's disk holds
/// a COW, a UML-style `fcntl` lock (POSIX, as the UML kernel takes) on it is
/// refused, for writing and for reading.
#[test]
fn a_uml_style_lock_on_a_cow_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    let try_lock = |how: &str| {
        let script = format!(
            r#"
import fcntl, sys
f = open(sys.argv[1], "r+")
try:
    fcntl.lockf(f, fcntl.{how} | fcntl.LOCK_NB)
    print("locked")
except OSError as e:
    print("refused", e.errno)
"#
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&cow)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    let disk = open_cow(&cow, &opts(Some(&base))).unwrap();
    for how in ["LOCK_EX", "LOCK_SH"] {
        let got = try_lock(how);
        assert!(got.starts_with("refused"), "{how} while serving: {got}");
    }
    disk.shutdown().unwrap();
    drop(disk);
    assert_eq!(try_lock("LOCK_EX"), "locked", "after the disk closed");
}

#[test]
fn writeback_bits_reach_the_disk_at_flush_and_writethrough_bits_at_completion() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    let disk = open_cow(&cow, &opts(Some(&base))).unwrap();
    let mut q = Blocking::new(disk.as_ref()).unwrap();
    q.write(17, &pattern(17, 2, 1)).unwrap();
    // Writeback: the write completed, reads see it, its bit is not on disk.
    let mut b = vec![0u8; 1024];
    q.read(17, &mut b).unwrap();
    assert_eq!(b, pattern(17, 2, 1));
    assert_eq!(set_sectors(&disk_bitmap(&cow), 2048), Vec::<u64>::new());
    q.flush().unwrap();
    assert_eq!(set_sectors(&disk_bitmap(&cow), 2048), vec![17, 18]);
    // Writethrough: durable with its bit when it completes.
    disk.set_writeback(false);
    q.write(40, &pattern(40, 1, 2)).unwrap();
    assert_eq!(set_sectors(&disk_bitmap(&cow), 2048), vec![17, 18, 40]);
    assert!(disk.stats().syncs >= 3, "{:?}", disk.stats());
    drop(q);
    disk.shutdown().unwrap();
}

#[test]
fn unflushed_writes_are_persisted_by_the_checkpoint_and_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    let disk = open_cow(
        &cow,
        &DiskOptions {
            max_pending_age: Duration::from_millis(50),
            ..opts(Some(&base))
        },
    )
    .unwrap();
    let mut q = Blocking::new(disk.as_ref()).unwrap();
    q.write(3, &pattern(3, 1, 9)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while set_sectors(&disk_bitmap(&cow), 2048) != vec![3] {
        assert!(std::time::Instant::now() < deadline, "checkpoint never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    // By count: 4 pending extents trigger a checkpoint at once.
    drop(q);
    disk.shutdown().unwrap();
    drop(disk);
    let disk = open_cow(
        &cow,
        &DiskOptions {
            max_pending_extents: 4,
            ..opts(None)
        },
    )
    .unwrap();
    let mut q = Blocking::new(disk.as_ref()).unwrap();
    for s in [100u64, 200, 300, 400] {
        q.write(s, &pattern(s, 1, 1)).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while set_sectors(&disk_bitmap(&cow), 2048).len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "count checkpoint never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    q.write(500, &pattern(500, 1, 1)).unwrap();
    drop(q);
    disk.shutdown().unwrap();
    assert_eq!(
        set_sectors(&disk_bitmap(&cow), 2048),
        vec![3, 100, 200, 300, 400, 500]
    );
}

#[test]
fn a_read_overlapping_a_pending_bitmap_write_waits_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    let disk: Arc<dyn Disk> = open_cow(
        &cow,
        &DiskOptions {
            bitmap_write_delay: Duration::from_millis(400),
            ..opts(Some(&base))
        },
    )
    .unwrap();
    let mut w = Blocking::new(disk.as_ref()).unwrap();
    w.write(0, &pattern(0, 1, 3)).unwrap();
    // Flush on another thread: its bitmap write (byte 0) stays pending 400 ms.
    let d2 = disk.clone();
    let flusher = std::thread::spawn(move || Blocking::new(d2.as_ref()).unwrap().flush());
    let mut q = disk.new_queue().unwrap();
    let mut buf1 = vec![0u8; 512];
    let mut buf64 = vec![0u8; 512];
    let read = |buf: &mut Vec<u8>, sector: u64, tag: u64| {
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: 512,
        }];
        // SAFETY: the buffers outlive every request of this test, which
        // waits for all completions before returning.
        let iov = unsafe { vhost_user_ubd::disk::IoVecs::new(iov) };
        Request {
            op: Op::Read { sector, iov },
            tag,
        }
    };
    // Sector 1: bit clear, same bitmap byte as sector 0 -> must wait (R4).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let parked = loop {
        match q.submit(read(&mut buf1, 1, 1)) {
            Submitted::Again(r) => break r,
            Submitted::Queued => {
                let mut out = Vec::new();
                q.commit().unwrap();
                while out.is_empty() {
                    q.wait(Some(Duration::from_millis(50)));
                    q.poll(&mut out);
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "bitmap write never pending"
                );
            }
        }
    };
    assert!(disk.stats().reads_parked >= 1);
    // Sector 64 (bitmap byte 8) is not delayed.
    assert!(matches!(
        q.submit(read(&mut buf64, 64, 2)),
        Submitted::Queued
    ));
    q.commit().unwrap();
    let mut out = Vec::new();
    let mut retry = false;
    while out.is_empty() {
        q.wait(Some(Duration::from_millis(50)));
        retry |= q.poll(&mut out);
    }
    assert_eq!(out[0].tag, 2);
    assert!(
        !flusher.is_finished(),
        "flush finished before the parked read was tested"
    );
    // The parked read is retried once a bitmap write completes.
    while !retry {
        q.wait(Some(Duration::from_millis(50)));
        retry = q.poll(&mut out);
    }
    assert!(matches!(q.submit(parked), Submitted::Queued));
    q.commit().unwrap();
    out.clear();
    while out.is_empty() {
        q.wait(Some(Duration::from_millis(50)));
        q.poll(&mut out);
    }
    assert_eq!(out[0].result, Ok(()));
    flusher.join().unwrap().unwrap();
    let want1: Vec<u8> = (512..1024).map(backing_byte).collect();
    let want64: Vec<u8> = (64 * 512..65 * 512).map(backing_byte).collect();
    assert_eq!(buf1, want1);
    assert_eq!(buf64, want64);
    drop(q);
    drop(w);
    disk.shutdown().unwrap();
}
