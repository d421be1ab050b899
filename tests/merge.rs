// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-ubd merge` against the real `uml_moo` (the oracle): the same
//! bytes for V3 (alignments 4096 and 512), V2 and 4096-byte COW sectors,
//! with scattered writes, runs across the 4 MiB merge windows, zeros
//! written over base data and odd-sized bases; a sparse image; `--in-place`
//! against `uml_moo -d`; the refusals (COW or backing in use, a touched
//! backing, an existing image); `--output json`.

mod common;

use std::{
    fs::File,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use vhost_user_ubd::cow::{file::read_header_bytes, CowHeader};

/// `vhost-user-ubd ARGS`: whether it succeeded, its stdout, its stderr.
fn ubd(args: &[&Path]) -> (bool, String, String) {
    let out = Command::new(BINARY).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// Files `a` and `b` are equal (`cmp`), lengths included.
fn assert_cmp_equal(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where a COW file's regions lie, from its header (any version).
struct Layout {
    bitmap_offset: u64,
    data_offset: u64,
    sectorsize: u64,
    /// Bits the on-disk bitmap holds.
    bits: u64,
}

fn layout(cow: &Path) -> Layout {
    let f = File::open(cow).unwrap();
    let h = CowHeader::parse(&read_header_bytes(&f).unwrap()).unwrap();
    let g = h.geometry().unwrap();
    Layout {
        bitmap_offset: g.bitmap_offset,
        data_offset: g.data_offset,
        sectorsize: u64::from(g.sectorsize),
        bits: g.bitmap_sectors(),
    }
}

/// Writes COW sectors by hand, as the format says: their data (`None`:
/// none, the data area stays a hole there) and then their bits.
fn put(cow: &Path, l: &Layout, first: u64, n: u64, data: Option<&[u8]>) {
    let f = File::options().read(true).write(true).open(cow).unwrap();
    if let Some(d) = data {
        assert_eq!(d.len() as u64, n * l.sectorsize);
        f.write_all_at(d, l.data_offset + first * l.sectorsize)
            .unwrap();
    }
    for s in first..first + n {
        let at = l.bitmap_offset + s / 8;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] | 1 << (s % 8)], at).unwrap();
    }
}

/// Scattered writes, runs across the 4 MiB windows, zeros over base data
/// (written, and as a hole), the last sectors; seeded.
fn fill(cow: &Path, size: u64, seed: u64) {
    let l = layout(cow);
    let ss = l.sectorsize;
    let sectors = size.div_ceil(ss);
    let mut rng = Rng::new(seed);
    let data =
        |n: u64, rng: &mut Rng| -> Vec<u8> { (0..n * ss).map(|_| rng.next() as u8 | 1).collect() };
    for _ in 0..60 {
        let n = rng.range(1, 24);
        let first = rng.below(sectors - n);
        let d = data(n, &mut rng);
        put(cow, &l, first, n, Some(&d));
    }
    let window = (4 << 20) / ss;
    for edge in [window, 2 * window] {
        let d = data(12, &mut rng);
        put(cow, &l, edge - 5, 12, Some(&d));
    }
    // Zeros written over the base, and set bits over a hole of the data area.
    let zero_at = window + 64;
    put(cow, &l, zero_at, 16, Some(&vec![0u8; (16 * ss) as usize]));
    put(cow, &l, zero_at + 100, 9, None);
    // The last sectors (a partial one on an odd-sized base).
    let d = data(2, &mut rng);
    put(cow, &l, sectors - 2, 2, Some(&d));
}

/// `merge COW OUT` equals `uml_moo COW OUT`, byte for byte.
fn merge_equals_uml_moo(cow: &Path, dir: &Path, name: &str) {
    let ours = dir.join(format!("{name}.ours"));
    let theirs = dir.join(format!("{name}.moo"));
    let (ok, stdout, err) = ubd(&[p("merge"), cow, &ours]);
    assert!(ok, "merge {name} failed: {err}");
    assert!(stdout.is_empty(), "text mode printed on stdout: {stdout}");
    assert!(
        !err.contains('\r'),
        "a progress bar was drawn on a pipe: {err}"
    );
    uml_moo(cow, &theirs);
    assert_cmp_equal(&ours, &theirs);
}

#[test]
fn merge_equals_uml_moo_for_v3_alignments_4096_and_512_on_odd_sized_bases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Not a multiple of 512, and a multiple of 512 but not of 4096.
    for (i, size) in [(9 << 20) + 100, (9 << 20) + 1536].into_iter().enumerate() {
        let base = d.join(format!("base{i}.img"));
        make_backing(&base, size);
        let a4096 = d.join(format!("a4096-{i}.cow"));
        run(Command::new(tool("uml_mkcow")).arg(&a4096).arg(&base));
        fill(&a4096, size, 1 + i as u64);
        merge_equals_uml_moo(&a4096, d, &format!("a4096-{i}"));
        let a512 = d.join(format!("a512-{i}.cow"));
        let (ok, _, err) = ubd(&[p("create"), p("--alignment"), p("512"), &a512, &base]);
        assert!(ok, "{err}");
        assert_eq!(layout(&a512).bitmap_offset, 4608);
        fill(&a512, size, 11 + i as u64);
        merge_equals_uml_moo(&a512, d, &format!("a512-{i}"));
    }
}

/// A V2 header by hand (`docs/ubd-cow-format.md` 2.3): its bitmap rounds
/// down, so the last sectors have no bit; uml_moo reads them from the base
/// (and so does the merge), whatever the data area holds there.
#[test]
fn merge_equals_uml_moo_for_v2_including_the_sectors_past_its_bitmap() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = (9 << 20) + 3 * 512;
    let base = dir.path().join("base.img");
    make_backing(&base, size);
    let mut h = vec![0u8; 4120];
    h[0..4].copy_from_slice(&0x4F4F_4F4Du32.to_be_bytes());
    h[4..8].copy_from_slice(&2u32.to_be_bytes());
    let path = base.as_os_str().as_bytes();
    h[8..8 + path.len()].copy_from_slice(path);
    h[4104..4108].copy_from_slice(&(BACKING_MTIME as u32).to_be_bytes());
    h[4108..4116].copy_from_slice(&size.to_be_bytes());
    h[4116..4120].copy_from_slice(&512u32.to_be_bytes());
    let cow = dir.path().join("v2.cow");
    std::fs::write(&cow, &h).unwrap();
    let l = layout(&cow);
    assert_eq!((l.bitmap_offset, l.bits), (4120, 18432));
    File::options()
        .write(true)
        .open(&cow)
        .unwrap()
        .set_len(l.data_offset + size)
        .unwrap();
    fill(&cow, l.bits * 512, 21);
    // Data (but no bit: there is none) for the 3 sectors past the bitmap,
    // and the last bitmap byte full.
    File::options()
        .write(true)
        .open(&cow)
        .unwrap()
        .write_all_at(&[0xAB; 3 * 512], l.data_offset + l.bits * 512)
        .unwrap();
    put(&cow, &l, l.bits - 8, 8, Some(&[0xCD; 8 * 512]));
    merge_equals_uml_moo(&cow, dir.path(), "v2");
    let merged = std::fs::read(dir.path().join("v2.ours")).unwrap();
    let past = (l.bits * 512) as usize;
    assert_eq!(merged.len() as u64, size);
    assert_eq!(merged[past], backing_byte(past as u64), "past the bitmap");
}

#[test]
fn merge_equals_uml_moo_for_4096_byte_cow_sectors_and_drops_the_partial_one() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = (9 << 20) + 1536;
    let base = dir.path().join("base.img");
    make_backing(&base, size);
    let cow = dir.path().join("s4096.cow");
    let (ok, _, err) = ubd(&[p("create"), p("--sectorsize"), p("4096"), &cow, &base]);
    assert!(ok, "{err}");
    assert_eq!(layout(&cow).sectorsize, 4096);
    fill(&cow, size, 31);
    merge_equals_uml_moo(&cow, dir.path(), "s4096");
    // uml_moo merges whole COW sectors only: the image ends at 9 MiB.
    let len = std::fs::metadata(dir.path().join("s4096.ours"))
        .unwrap()
        .len();
    assert_eq!(len, 9 << 20);
}

/// A base with holes (a sparse 256 MiB file with 3 data regions) and a COW
/// with a few writes: the image holds data only where there is some.
#[test]
fn the_image_is_sparse_where_the_base_and_the_cow_are() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 256 << 20;
    let base = dir.path().join("base.img");
    let f = File::create(&base).unwrap();
    f.set_len(size).unwrap();
    for at in [0, 100 << 20, size - (1 << 20)] {
        let data: Vec<u8> = (at..at + (1 << 20)).map(backing_byte).collect();
        f.write_all_at(&data, at).unwrap();
    }
    drop(f);
    set_mtime(&base, BACKING_MTIME);
    let cow = dir.path().join("c.cow");
    run(Command::new(tool("uml_mkcow")).arg(&cow).arg(&base));
    let l = layout(&cow);
    for s in [7u64, 300_000, 400_001] {
        put(&cow, &l, s, 8, Some(&[0x5A; 8 * 512]));
    }
    merge_equals_uml_moo(&cow, dir.path(), "sparse");
    let used = std::fs::metadata(dir.path().join("sparse.ours"))
        .unwrap()
        .blocks()
        * 512;
    // 3 MiB of base data and 3 x 4 KiB of COW data in 256 MiB.
    assert!(used < 4 << 20, "the image takes {used} bytes of {size}");
}

/// Two equal copies of a base (same bytes, same mtime), one COW: `uml_moo
/// -d -b COPY` into one, `merge --in-place` into the other.
fn check_in_place(dir: &Path, name: &str, cow_args: &[&str], size: u64) {
    let base = dir.join(format!("{name}.base"));
    let copy = dir.join(format!("{name}.copy"));
    make_backing(&base, size);
    make_backing(&copy, size);
    let cow = dir.join(format!("{name}.cow"));
    let mut create = vec![p("create")];
    create.extend(cow_args.iter().map(|a| p(a)));
    create.extend([cow.as_path(), base.as_path()]);
    let (ok, _, err) = ubd(&create);
    assert!(ok, "{err}");
    fill(&cow, size, 41);
    run(Command::new(tool("uml_moo"))
        .arg("-d")
        .arg("-b")
        .arg(&copy)
        .arg(&cow));
    let (ok, _, err) = ubd(&[p("merge"), p("--in-place"), &cow]);
    assert!(ok, "{name}: {err}");
    assert!(err.contains("no longer matches"), "{err}");
    assert_cmp_equal(&base, &copy);
    for f in [&base, &copy] {
        let m = std::fs::metadata(f).unwrap();
        assert_eq!(m.len(), size, "{}: size kept", f.display());
        assert_ne!(m.mtime() as u64, BACKING_MTIME, "{}: mtime", f.display());
    }
    // As after uml_moo -d, the COW no longer matches its base.
    let (ok, _, err) = ubd(&[p("merge"), p("--in-place"), &cow]);
    assert!(!ok && err.contains("mtime"), "{err}");
}

#[test]
fn in_place_equals_uml_moo_d() {
    let dir = tempfile::tempdir().unwrap();
    check_in_place(dir.path(), "a512", &["--alignment", "512"], (9 << 20) + 100);
    check_in_place(
        dir.path(),
        "s4096",
        &["--sectorsize", "4096"],
        (9 << 20) + 1536,
    );
}

/// A COW and a merged image of it, in a fresh directory.
struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("c.cow");
    run(Command::new(tool("uml_mkcow")).arg(&cow).arg(&base));
    put(&cow, &layout(&cow), 3, 2, Some(&[0x77; 1024]));
    Setup { dir, base, cow }
}

/// No image and no temporary file in `dir` besides `keep`.
fn assert_nothing_left(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    names.sort();
    assert!(names.is_empty(), "left behind: {names:?}");
}

fn ofd_lock(path: &Path, write: bool) -> File {
    let f = File::options().read(true).write(write).open(path).unwrap();
    vhost_user_ubd::cow::file::ofd_lock(&f, path, write, "test").unwrap();
    f
}

#[test]
fn a_cow_in_use_is_refused_naming_it_and_the_fix() {
    let s = setup();
    let out = s.dir.path().join("out.img");
    // As a daemon serving the COW holds it: an OFD write lock.
    let held = ofd_lock(&s.cow, true);
    for args in [
        vec![p("merge"), &s.cow, &out],
        vec![p("merge"), p("--in-place"), &s.cow],
    ] {
        let (ok, _, err) = ubd(&args);
        assert!(!ok, "merged a COW in use: {args:?}");
        assert!(
            err.contains("c.cow") && err.contains("in use") && err.contains("Stop the"),
            "{err}"
        );
    }
    drop(held);
    assert_nothing_left(s.dir.path(), &["base.img", "c.cow"]);
    // A real daemon serving it.
    let daemon = common::daemon::DaemonBuilder::new(s.dir.path())
        .cow(&s.cow, None)
        .spawn();
    let (ok, _, err) = ubd(&[p("merge"), &s.cow, &out]);
    assert!(
        !ok && err.contains("c.cow") && err.contains("daemon"),
        "{err}"
    );
    assert!(daemon.terminate().success());
    let (ok, _, err) = ubd(&[p("merge"), &s.cow, &out]);
    assert!(ok, "after the daemon stopped: {err}");
}

#[test]
fn a_backing_in_use_refuses_an_in_place_merge_only() {
    let s = setup();
    // As every daemon serving a COW over it holds it: an OFD read lock.
    let held = ofd_lock(&s.base, false);
    let (ok, _, err) = ubd(&[p("merge"), p("--in-place"), &s.cow]);
    assert!(!ok, "merged into a backing in use");
    assert!(
        err.contains("backing file") && err.contains("base.img") && err.contains("stop them"),
        "{err}"
    );
    let out = s.dir.path().join("out.img");
    let (ok, _, err) = ubd(&[p("merge"), &s.cow, &out]);
    assert!(ok, "a merge into a new file only reads the backing: {err}");
    drop(held);
}

#[test]
fn a_touched_backing_is_refused_naming_it() {
    let s = setup();
    set_mtime(&s.base, BACKING_MTIME + 60);
    let out = s.dir.path().join("out.img");
    for args in [
        vec![p("merge"), &s.cow, &out],
        vec![p("merge"), p("--in-place"), &s.cow],
    ] {
        let (ok, _, err) = ubd(&args);
        assert!(!ok, "merged over a touched backing: {args:?}");
        assert!(err.contains("base.img") && err.contains("mtime"), "{err}");
    }
    assert_nothing_left(s.dir.path(), &["base.img", "c.cow"]);
    // --backing-check size accepts it; --in-place needs some check.
    let (ok, _, err) = ubd(&[p("merge"), p("--backing-check"), p("size"), &s.cow, &out]);
    assert!(ok, "{err}");
    let (ok, _, err) = ubd(&[
        p("merge"),
        p("--in-place"),
        p("--backing-check"),
        p("none"),
        &s.cow,
    ]);
    assert!(!ok && err.contains("--backing-check"), "{err}");
}

#[test]
fn an_existing_image_is_replaced_only_with_force_and_never_an_input() {
    let s = setup();
    let out = s.dir.path().join("out.img");
    std::fs::write(&out, b"keep me").unwrap();
    let (ok, _, err) = ubd(&[p("merge"), &s.cow, &out]);
    assert!(
        !ok && err.contains("out.img") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let (ok, _, err) = ubd(&[p("merge"), p("--force"), &s.cow, &out]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 20);
    for input in [&s.base, &s.cow] {
        let (ok, _, err) = ubd(&[p("merge"), p("--force"), &s.cow, input]);
        assert!(!ok && err.contains("of the merge"), "{err}");
    }
    assert_nothing_left(s.dir.path(), &["base.img", "c.cow", "out.img"]);
    // The base is what it was.
    let base = std::fs::read(&s.base).unwrap();
    assert!(base == (0..1 << 20).map(backing_byte).collect::<Vec<_>>());
}

#[test]
fn json_output_has_progress_lines_and_a_done_line() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 9 << 20;
    let base = dir.path().join("base.img");
    make_backing(&base, size);
    let cow = dir.path().join("c.cow");
    run(Command::new(tool("uml_mkcow")).arg(&cow).arg(&base));
    fill(&cow, size, 51);
    let out = dir.path().join("out.img");
    let (ok, stdout, err) = ubd(&[p("merge"), p("--output"), p("json"), &cow, &out]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let (last, progress) = lines.split_last().expect("no JSON line");
    assert!(!progress.is_empty(), "no progress line: {stdout}");
    for l in progress {
        for k in ["bytes_done", "bytes_total", "rate_bps", "eta_s"] {
            assert!(l.get(k).is_some(), "{k} missing in {l}");
        }
        assert_eq!(l["bytes_total"], size);
        assert!(l.get("done").is_none(), "{l}");
    }
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["bytes_done"], size);
    assert_eq!(last["bytes_total"], size);
    assert!(last["elapsed_s"].as_f64().is_some(), "{last}");
    // Start and end are logged (stderr).
    assert!(
        err.contains("merging COW file") && err.contains("merged"),
        "{err}"
    );
    let theirs = dir.path().join("moo.img");
    uml_moo(&cow, &theirs);
    assert_cmp_equal(&out, &theirs);
}
