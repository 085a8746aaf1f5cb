//! `cargo fuzz run config`: see `xiaozhi_fuzz::harness::config` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xiaozhi_fuzz::harness::config(data));
