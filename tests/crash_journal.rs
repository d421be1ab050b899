// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The COW crash journal across daemon restarts, with a real libblkio
//! client: a journal is applied to the COW it belongs to and to nothing
//! else. Each test writes first writes without a flush (checkpoints out of
//! reach, so their bits are only in memory), kills the daemon with -9, does
//! something to the files, restarts and reads back against a model.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use common::{
    client::{self, Client, ClientConfig},
    daemon::{Daemon, DaemonBuilder},
};

const SECTORS: u64 = 4096; // 2 MiB device
/// Checkpoints out of reach: bits wait for a flush.
const NO_CHECKPOINT: [&str; 4] = [
    "--checkpoint-ms",
    "60000",
    "--checkpoint-extents",
    "1000000",
];

fn backing_sector(s: u64) -> Vec<u8> {
    (s * 512..s * 512 + 512).map(backing_byte).collect()
}

struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    cow: PathBuf,
    journal_dir: PathBuf,
    starts: usize,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        make_backing(&base, SECTORS * 512);
        let journal_dir = dir.path().join("journal");
        std::fs::create_dir(&journal_dir).unwrap();
        Self {
            cow: dir.path().join("vm.cow"),
            base,
            journal_dir,
            dir,
            starts: 0,
        }
    }

    fn start(&mut self, cow: &Path) -> (Daemon, Client) {
        self.starts += 1;
        let d = DaemonBuilder::new(self.dir.path())
            .name(&format!("d{}", self.starts))
            .cow(cow, Some(&self.base))
            .args(NO_CHECKPOINT)
            .arg("--crash-journal")
            .arg(&self.journal_dir)
            .spawn();
        let c = Client::connect(
            d.socket(),
            &ClientConfig {
                num_queues: 1,
                read_only: false,
                mem_len: 1 << 20,
            },
        )
        .unwrap();
        (d, c)
    }

    fn journals(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.journal_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "journal"))
            .collect();
        v.sort();
        v
    }
}

/// Writes `tag` stamps into `sectors` (8-sector writes), each completed.
fn write(c: &mut Client, sectors: &[u64], tag: u64) {
    let mem = c.mem;
    for &s in sectors {
        let data = stamps(tag, s, 8);
        assert_eq!(client::write_at(c.q(0), mem, 0, s * 512, &data), 0);
    }
}

/// Every sector of each 8-sector write in `sectors` reads `want(sector)`.
fn expect<W: AsRef<[u8]>>(c: &mut Client, sectors: &[u64], want: impl Fn(u64) -> W, what: &str) {
    let mem = c.mem;
    for &s in sectors {
        let got = client::read_at(c.q(0), mem, 0, s * 512, 8 * 512).unwrap();
        for x in s..s + 8 {
            let i = ((x - s) * 512) as usize;
            assert!(
                got[i..i + 512] == *want(x).as_ref(),
                "{what}: sector {x} reads wrong data"
            );
        }
    }
}

/// `vhost-user-ubd check` of a COW (retried while the killed daemon's lock
/// drains).
fn check_output(cow: &Path, journal_dir: &Path) -> String {
    for _ in 0..100 {
        let out = Command::new(BINARY)
            .arg("check")
            .arg("--crash-journal")
            .arg(journal_dir)
            .arg(cow)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() || !text.contains("locked") {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} stayed locked", cow.display());
}

/// Context switches of every thread of process `pid` so far.
fn context_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|st| {
            st.lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

const A: [u64; 4] = [8, 512, 2048, 4000];
const B: [u64; 3] = [64, 1024, 3000];

#[test]
fn completed_writes_come_back_and_a_clean_stop_removes_the_journal() {
    let mut s = Setup::new();
    let cow = s.cow.clone();
    let (d, mut c) = s.start(&cow);
    write(&mut c, &A, 1);
    assert_eq!(s.journals().len(), 1, "a journal while serving");
    d.kill();
    drop(c);
    // `check` names the pending journal (the UML tools would miss it).
    let out = check_output(&cow, &s.journal_dir);
    assert!(
        out.contains("note: crash journal") && out.contains("holds 32 sectors"),
        "{out}"
    );
    let (d, mut c) = s.start(&cow);
    assert!(
        d.log()
            .contains("32 sectors written and completed by the earlier daemon"),
        "{}",
        d.log()
    );
    expect(&mut c, &A, |x| stamp(1, x), "recovered");
    // Untouched sectors still read the base.
    expect(&mut c, &B, backing_sector, "untouched");
    assert_eq!(client::flush(c.q(0)), 0);
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
    assert!(s.journals().is_empty(), "a clean stop leaves no journal");
    // The bits are on disk now: uml_moo sees the writes.
    let merged = uml_moo(&cow, &s.dir.path().join("merged.img"));
    for &w in &A {
        for x in w..w + 8 {
            let i = (x * 512) as usize;
            assert!(merged[i..i + 512] == stamp(1, x)[..], "uml_moo: sector {x}");
        }
    }
}

#[test]
fn a_journal_is_not_applied_to_a_copy_of_the_cow() {
    let mut s = Setup::new();
    let cow = s.cow.clone();
    let (d, mut c) = s.start(&cow);
    write(&mut c, &A, 2);
    d.kill();
    drop(c);
    let copy = s.dir.path().join("copy.cow");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&cow)
        .arg(&copy));
    // Put the original's journal where the copy's would be.
    let journal = s.journals().pop().unwrap();
    let meta = std::fs::metadata(&copy).unwrap();
    let copy_journal = s.journal_dir.join(format!(
        "vhost-user-ubd-{:x}-{:x}.journal",
        std::os::unix::fs::MetadataExt::dev(&meta),
        std::os::unix::fs::MetadataExt::ino(&meta)
    ));
    std::fs::rename(&journal, &copy_journal).unwrap();
    let (d, mut c) = s.start(&copy);
    assert!(
        d.log().contains("not applied: it belongs to another file"),
        "{}",
        d.log()
    );
    expect(&mut c, &A, backing_sector, "copy");
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
    // After the clean stop the copy's journal is gone; check has no note.
    assert!(!check_output(&copy, &s.journal_dir).contains("note:"));
    let (d, c) = s.start(&copy);
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_journal_is_not_applied_after_another_writer_changed_the_cow() {
    let mut s = Setup::new();
    let cow = s.cow.clone();
    let (d, mut c) = s.start(&cow);
    write(&mut c, &A, 3);
    d.kill();
    drop(c);
    // A UML-style writer (the UML kernel, say) writes sector 100: data
    // first, then its bit.
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&cow)
        .unwrap();
    let bytes = vhost_user_ubd::cow::file::read_header_bytes(&f).unwrap();
    let g = vhost_user_ubd::cow::CowHeader::parse(&bytes)
        .unwrap()
        .geometry()
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&stamp(9, 100), g.data_pos(100)).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, g.bitmap_offset + 100 / 8)
        .unwrap();
    byte[0] |= 1 << (100 % 8);
    f.write_all_at(&byte, g.bitmap_offset + 100 / 8).unwrap();
    drop(f);
    let (d, mut c) = s.start(&cow);
    assert!(
        d.log().contains("not applied: the COW's bitmap changed"),
        "{}",
        d.log()
    );
    expect(&mut c, &A, backing_sector, "journal refused");
    let mem = c.mem;
    let got = client::read_at(c.q(0), mem, 0, 100 * 512, 512).unwrap();
    assert_eq!(got, stamp(9, 100), "the other writer's sector");
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn an_older_copy_of_the_journal_is_not_applied() {
    let mut s = Setup::new();
    let cow = s.cow.clone();
    let (d, mut c) = s.start(&cow);
    write(&mut c, &A, 4);
    let journal = s.journals().pop().unwrap();
    let old = s.dir.path().join("old.journal");
    std::fs::copy(&journal, &old).unwrap();
    // A becomes durable, then B is written without a flush.
    assert_eq!(client::flush(c.q(0)), 0);
    write(&mut c, &B, 5);
    d.kill();
    drop(c);
    std::fs::copy(&old, &journal).unwrap();
    let (d, mut c) = s.start(&cow);
    assert!(
        d.log().contains("not applied: the COW's bitmap changed")
            && d.log().contains("an older copy of the journal"),
        "{}",
        d.log()
    );
    expect(&mut c, &A, |x| stamp(4, x), "flushed");
    // Without its journal B is lost, as without any journal; never
    // replaced by something else.
    expect(&mut c, &B, backing_sector, "unflushed, journal refused");
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_read_only_daemon_applies_the_journal_and_keeps_it() {
    let mut s = Setup::new();
    let cow = s.cow.clone();
    let (d, mut c) = s.start(&cow);
    write(&mut c, &A, 6);
    d.kill();
    drop(c);
    let before = s.journals();
    let d = DaemonBuilder::new(s.dir.path())
        .name("ro")
        .cow(&cow, None)
        .arg("--readonly")
        .arg("--crash-journal")
        .arg(&s.journal_dir)
        .spawn();
    let mut c = Client::connect(
        d.socket(),
        &ClientConfig {
            num_queues: 1,
            read_only: true,
            mem_len: 1 << 20,
        },
    )
    .unwrap();
    expect(&mut c, &A, |x| stamp(6, x), "read-only");
    // Past a checkpoint's age, and a FLUSH: a read-only daemon writes no
    // bits (it used to try, and fail, every second) and its FLUSH succeeds.
    std::thread::sleep(std::time::Duration::from_millis(1300));
    // ... and sleeps while idle (it has no checkpoint to wait for).
    let before_cs = context_switches(d.pid());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let woke = context_switches(d.pid()) - before_cs;
    assert!(
        woke < 100,
        "the idle read-only daemon woke {woke} times in 1 s"
    );
    assert_eq!(client::flush(c.q(0)), 0, "FLUSH on the read-only device");
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
    let log = d.log();
    assert!(
        !log.contains("bitmap write failed") && !log.contains("ERROR"),
        "the read-only daemon tried to write:\n{log}"
    );
    assert_eq!(s.journals(), before, "a read-only daemon keeps the journal");
    // The next writable daemon still recovers the writes.
    let (d, mut c) = s.start(&cow);
    expect(&mut c, &A, |x| stamp(6, x), "after read-only");
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}
