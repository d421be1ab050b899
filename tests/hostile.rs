// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile input and hostile environments (issue "Reliability", item 4):
//! garbage on the vhost-user socket, a backing file that changes while
//! serving, ENOSPC and EIO on the COW's filesystem, COW headers that lie.
//! Each gets a clear error; the daemon survives where it can; nothing
//! already flushed is lost. (Malformed virtio requests and buffers outside
//! guest memory are covered by `vhost_frontend.rs` and `blkio_client.rs`.)

mod common;

use std::{
    io::Write,
    os::unix::{fs::FileExt, net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use common::{
    client::{self, Client, ClientConfig},
    daemon::{Daemon, DaemonBuilder},
};

fn connect(d: &Daemon) -> Client {
    client::connect_one_queue(d.socket())
}

fn pattern(salt: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ salt | 0x40)
        .collect()
}

#[test]
fn garbage_on_the_socket_drops_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_backing(&img, 1 << 20);
    let d = DaemonBuilder::new(dir.path()).raw(&img).spawn();
    let shapes: Vec<Vec<u8>> = vec![
        vec![0xff; 4096],
        // A header announcing a huge payload that never comes.
        [
            1u32.to_le_bytes(),
            1u32.to_le_bytes(),
            0xffff_fff0u32.to_le_bytes(),
        ]
        .concat(),
        // An unknown request code with a plausible header.
        [
            9999u32.to_le_bytes(),
            1u32.to_le_bytes(),
            8u32.to_le_bytes(),
            [0; 4],
            [0; 4],
        ]
        .concat(),
        // SET_VRING_ADDR before anything else, with garbage addresses.
        [9u32.to_le_bytes(), 1u32.to_le_bytes(), 40u32.to_le_bytes()]
            .concat()
            .into_iter()
            .chain([0xeeu8; 40])
            .collect(),
        Vec::new(),
    ];
    for (i, bytes) in shapes.iter().enumerate() {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        let _ = s.write_all(bytes);
        drop(s);
        // The daemon resets and accepts the next frontend.
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.log().matches("waiting for a vhost-user frontend").count() < i + 2 {
            assert!(
                Instant::now() < deadline,
                "shape {i}: daemon stuck:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d.assert_running();
    }
    // A real client still gets correct data.
    let mut c = connect(&d);
    let mem = c.mem;
    let data = client::read_at(c.q(0), mem, 0, 0, 4096).unwrap();
    let want: Vec<u8> = (0..4096).map(backing_byte).collect();
    assert_eq!(data, want);
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_backing_file_changed_while_serving_fails_backing_reads_and_keeps_the_cow() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let cow = dir.path().join("vm.cow");
    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, Some(&base))
        .spawn();
    let mut c = connect(&d);
    let mem = c.mem;
    let p = pattern(7, 4096);
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &p), 0);
    assert_eq!(client::flush(c.q(0)), 0);
    // Someone writes into the base image in place.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .write_all_at(b"tampered", 65536)
        .unwrap();
    assert!(
        d.wait_for_log(
            "the backing file changed while serving",
            Duration::from_secs(10)
        ),
        "no error logged:\n{}",
        d.log()
    );
    assert!(d.log().contains("base.img") && d.log().contains("Restore the base image"));
    // Sectors in the COW still read; sectors from the backing fail.
    assert_eq!(client::read_at(c.q(0), mem, 0, 0, 4096).unwrap(), p);
    assert!(client::read_at(c.q(0), mem, 0, 65536, 4096).is_err());
    // Writes and flushes still work; the daemon keeps serving.
    let p2 = pattern(9, 4096);
    assert_eq!(client::write_at(c.q(0), mem, 0, 8192, &p2), 0);
    assert_eq!(client::flush(c.q(0)), 0);
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
    // The COW kept both writes; it refuses to open over the changed base.
    let bits = set_sectors(&disk_bitmap(&cow), 2048);
    assert_eq!(bits, (0..8).chain(16..24).collect::<Vec<u64>>());
    let out = Command::new(BINARY)
        .arg("check")
        .arg(&cow)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(
        msg.contains("modified") && msg.contains("base.img"),
        "{msg}"
    );
}

/// A tmpfs of `size` mounted on a fresh directory (root needed, as on CI).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the ENOSPC test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn enospc_on_the_cow_filesystem_fails_writes_and_loses_nothing_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 16 << 20);
    let fs = Tmpfs::mount("4m");
    let cow: PathBuf = fs.path().join("vm.cow");
    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, Some(&base))
        .spawn();
    let mut c = connect(&d);
    let mem = c.mem;
    // 1 MiB flushed: must survive everything below.
    let keep = pattern(1, 1 << 20);
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &keep), 0);
    assert_eq!(client::flush(c.q(0)), 0);
    // Fill the filesystem until writes fail.
    let chunk = pattern(2, 256 << 10);
    let mut failed_at = None;
    for i in 0..64u64 {
        let pos = (2 << 20) + i * (256 << 10);
        if client::write_at(c.q(0), mem, 0, pos, &chunk) != 0 {
            failed_at = Some(pos);
            break;
        }
    }
    let failed_at = failed_at.expect("the 4 MiB filesystem never filled up");
    d.assert_running();
    assert!(
        d.log().contains("No space left") || d.log().contains("os error 28"),
        "the log does not say ENOSPC:\n{}",
        d.log_tail(20)
    );
    // Flushed data reads back; the daemon keeps serving.
    assert_eq!(client::read_at(c.q(0), mem, 0, 0, 1 << 20).unwrap(), keep);
    // Free space (discard punches the COW) and carry on.
    assert_eq!(client::discard(c.q(0), 2 << 20, failed_at - (2 << 20)), 0);
    let after = pattern(3, 4096);
    assert_eq!(client::write_at(c.q(0), mem, 0, failed_at, &after), 0);
    assert_eq!(client::flush(c.q(0)), 0);
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
    // A new daemon sees everything that was flushed.
    let d = DaemonBuilder::new(dir.path())
        .name("again")
        .cow(&cow, None)
        .spawn();
    let mut c = connect(&d);
    let mem = c.mem;
    assert_eq!(client::read_at(c.q(0), mem, 0, 0, 1 << 20).unwrap(), keep);
    assert_eq!(
        client::read_at(c.q(0), mem, 0, failed_at, 4096).unwrap(),
        after
    );
    let zeros = client::read_at(c.q(0), mem, 0, 2 << 20, 4096).unwrap();
    assert!(
        zeros.iter().all(|&b| b == 0),
        "discarded range does not read as zeros"
    );
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}

/// ext4 on a loop device whose image lives on a small tmpfs: once the tmpfs
/// is full, the loop device fails writes and the COW's filesystem returns
/// EIO to `fdatasync`.
#[test]
fn eio_from_the_cow_file_fails_flush_clearly_and_keeps_serving_reads() {
    let fs = Tmpfs::mount("24m");
    let img = fs.path().join("ext4.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&img));
    let mnt = tempfile::tempdir().unwrap();
    run(Command::new("mount")
        .args(["-o", "loop,errors=continue"])
        .arg(&img)
        .arg(mnt.path()));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _um = Umount(mnt.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 32 << 20);
    let cow = mnt.path().join("vm.cow");
    let d = DaemonBuilder::new(dir.path())
        .cow(&cow, Some(&base))
        .spawn();
    let mut c = connect(&d);
    let mem = c.mem;
    let keep = pattern(4, 1 << 20);
    assert_eq!(client::write_at(c.q(0), mem, 0, 0, &keep), 0);
    assert_eq!(client::flush(c.q(0)), 0);
    // Fill the tmpfs under the loop device.
    let filler = fs.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0x5au8; 1 << 20];
    while f.write_all(&block).is_ok() {}
    drop(f);
    // Writes land in the page cache; the flush must report the failure.
    let big = pattern(5, 1 << 20);
    let mut flush_failed = false;
    for i in 0..16u64 {
        let _ = client::write_at(c.q(0), mem, 0, (2 << 20) + i * (1 << 20), &big);
        if client::flush(c.q(0)) != 0 {
            flush_failed = true;
            break;
        }
    }
    assert!(
        flush_failed,
        "no flush failed although the device is out of space"
    );
    d.assert_running();
    assert!(
        d.log().contains("fdatasync failed"),
        "no clear error in the log:\n{}",
        d.log_tail(20)
    );
    // Sticky: later flushes fail too (the kernel may have dropped pages).
    assert_ne!(client::flush(c.q(0)), 0);
    // Data flushed before the fault still reads back.
    assert_eq!(client::read_at(c.q(0), mem, 0, 0, 1 << 20).unwrap(), keep);
    drop(c);
    let _ = d.terminate();
    std::fs::remove_file(&filler).unwrap();
}

#[test]
fn cow_headers_that_lie_are_refused_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    make_backing(&base, 1 << 20);
    let good = dir.path().join("good.cow");
    vhost_user_ubd::cow::create_cow(&good, &base, 4096).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut b = bytes.clone();
    b[12..20].copy_from_slice(&(1u64 << 40).to_be_bytes()); // size: bitmap past EOF
    cases.push(("size.cow", b, "truncated"));
    let mut b = bytes.clone();
    b[24..28].copy_from_slice(&0u32.to_be_bytes());
    cases.push(("align0.cow", b, "alignment"));
    let mut b = bytes.clone();
    b[32..4128].fill(b'x');
    cases.push(("nonul.cow", b, "NUL"));
    let mut b = bytes.clone();
    // 4096 is a valid COW sector (`create --sectorsize`); 1000 is not.
    b[20..24].copy_from_slice(&1000u32.to_be_bytes());
    cases.push(("sector.cow", b, "sectorsize"));
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&7u32.to_be_bytes());
    cases.push(("version.cow", b, "version"));
    cases.push(("short.cow", bytes[..2000].to_vec(), "truncated"));
    for (name, data, needle) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, &data).unwrap();
        for cmd in ["check", "info"] {
            let out = Command::new(BINARY).arg(cmd).arg(&p).output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{cmd} {name} succeeded: {text}");
            assert!(
                text.contains(name) && text.contains(needle),
                "{cmd} {name}: {text}"
            );
            assert!(!text.contains("panicked"), "{cmd} {name}: {text}");
        }
        // serve refuses it at start with the same message, exit status 1.
        let out = Command::new(BINARY)
            .arg("serve")
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--cow")
            .arg(&p)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "serve {name}: {text}");
        assert!(
            text.contains(name) && text.contains(needle),
            "serve {name}: {text}"
        );
    }
}

/// A second daemon on a socket a daemon serves is refused, naming the
/// holder; the first keeps serving its disk on that path. A socket file
/// whose daemon died (kill -9) is stale and replaced.
#[test]
fn a_live_socket_is_never_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.img");
    let other = dir.path().join("other.img");
    std::fs::write(&one, vec![0x11u8; 1 << 20]).unwrap();
    std::fs::write(&other, vec![0x22u8; 1 << 20]).unwrap();
    let d = DaemonBuilder::new(dir.path()).name("s").raw(&one).spawn();
    let out = Command::new(BINARY)
        .arg("serve")
        .arg("--socket")
        .arg(d.socket())
        .arg("--raw")
        .arg(&other)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("pid {}", d.pid())) && text.contains("s.sock"),
        "the refusal names the socket and the holder: {text}"
    );
    // The first daemon still owns the path and serves its own disk.
    let mut c = connect(&d);
    let mem = c.mem;
    let got = client::read_at(c.q(0), mem, 0, 0, 4096).unwrap();
    assert!(got.iter().all(|&b| b == 0x11), "the first daemon's disk");
    drop(c);
    d.kill();
    // Its socket file is left behind, stale: a new daemon replaces it.
    assert!(d.socket().exists());
    let d2 = DaemonBuilder::new(dir.path()).name("s").raw(&other).spawn();
    let mut c = connect(&d2);
    let mem = c.mem;
    let got = client::read_at(c.q(0), mem, 0, 0, 4096).unwrap();
    assert!(got.iter().all(|&b| b == 0x22), "the new daemon's disk");
    drop(c);
    assert_eq!(d2.terminate().code(), Some(0));
}

/// Socket activation (`--fd`): an inherited listening socket is adopted
/// and served (a frontend connects, reads and writes through it), and a
/// descriptor that is not a listening socket is refused with a message
/// that names it.
#[test]
fn an_inherited_listening_socket_is_served_and_anything_else_refused() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on our own descriptor so the child inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let log = dir.path().join("fd.log");
    let mut child = Command::new(BINARY)
        .args(["serve", "--fd", &fd.to_string(), "--raw"])
        .arg(&image)
        .arg("--crash-journal")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    drop(listener);
    let served = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !served().contains("waiting for a vhost-user frontend") {
        assert!(Instant::now() < deadline, "not serving:\n{}", served());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        served().contains(&format!("on inherited fd {fd}")),
        "{}",
        served()
    );
    let mut c = Client::connect(
        &sock,
        &ClientConfig {
            num_queues: 1,
            read_only: false,
            mem_len: 4 << 20,
        },
    )
    .unwrap();
    let mem = c.mem;
    let data = pattern(0x21, 4096);
    assert_eq!(client::write_at(c.q(0), mem, 0, 8 * 512, &data), 0);
    assert_eq!(
        client::read_at(c.q(0), mem, 0, 8 * 512, 4096).unwrap(),
        data
    );
    drop(c);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}\n{}", served());

    let out = Command::new(BINARY)
        .args(["serve", "--fd", "0", "--raw"])
        .arg(&image)
        .stdin(std::fs::File::open(&image).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--fd 0 is not a listening UNIX socket"),
        "{err}"
    );
}
