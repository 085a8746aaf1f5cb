//! `cargo fuzz run udp_datagram`: see `xiaozhi_fuzz::harness::udp_datagram` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xiaozhi_fuzz::harness::udp_datagram(data));
