//! `cargo fuzz run device_json`: see `xiaozhi_fuzz::harness::device_json` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xiaozhi_fuzz::harness::device_json(data));
