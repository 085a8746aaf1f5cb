//! `cargo fuzz run upstream_frames`: see `xiaozhi_fuzz::harness::upstream_frames` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xiaozhi_fuzz::harness::upstream_frames(data));
