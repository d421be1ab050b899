// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! libFuzzer target: see `fuzz/src/targets.rs` (`disk_ops`).
#![no_main]

#[path = "../src/targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::disk_ops(data));
