//! `cargo fuzz run device_mqtt`: see `xiaozhi_fuzz::harness::device_mqtt` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xiaozhi_fuzz::harness::device_mqtt(data));
