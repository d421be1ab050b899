// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays every committed fuzz input (`fuzz/corpus/<target>/*`) through the
//! fuzz target bodies, so inputs that once found a bug stay fixed. `make
//! fuzz` runs the real fuzzers (libFuzzer via cargo-fuzz).

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "fuzz input {} fails again", p.display());
            n += 1;
        }
    }
    println!("{target}: replayed {n} inputs");
    n
}

#[test]
fn request_corpus_replays_clean() {
    replay("request", targets::request);
    // Hand-picked shapes, also run when the corpus is empty.
    targets::request(&[]);
    targets::request(&[0u8; 300]);
    targets::request(&[0xff; 600]);
}

#[test]
fn cow_header_corpus_replays_clean() {
    replay("cow_header", targets::cow_header);
    targets::cow_header(b"OOOM\0\0\0\x03");
    targets::cow_header(&[0xff; 5000]);
}

#[test]
fn disk_ops_corpus_replays_clean() {
    replay("disk_ops", targets::disk_ops);
    targets::disk_ops(&[0, 1, 3, 4, 0xaa, 0, 3, 4, 0, 5, 0, 0, 0, 0, 3, 4, 0]);
    targets::disk_ops(&[2, 1, 60, 8, 1, 3, 62, 8, 0, 4, 0, 0, 0]);
}
