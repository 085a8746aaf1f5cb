//! `cargo fuzz run history_query`: see `xiaozhi_fuzz::harness::history_query` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xiaozhi_fuzz::harness::history_query(data));
