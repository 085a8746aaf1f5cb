//! The integration tests, one module per capability, in one binary: each `tests/*.rs`
//! file used to be its own crate linking the whole gateway (28 of them), which cost most
//! of CI's build time; as modules they share one link and one copy of every generic.
//! `cargo test --release --test it <module>::` runs one capability.
//!
//! The tests run one at a time (`RUST_TEST_THREADS=1` in `.cargo/config.toml`; set it to
//! 2 to try more): many of them bound a duration or count every frame, and the suite
//! holds loads (300 devices, Chromium, whole gateway processes) that would otherwise run
//! beside them.

mod common;

/// Counts allocations per thread, for `allocations` (no allocation per frame).
#[global_allocator]
static ALLOCATOR: common::alloc_count::CountingAllocator = common::alloc_count::CountingAllocator;
// The fuzz targets' harness and seeds, replayed by `fuzz_regressions` (they say `crate::`
// as the fuzz crate's root sees them).
#[allow(dead_code)]
#[path = "../../fuzz/src/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../../fuzz/src/seeds.rs"]
mod seeds;

mod allocations;
mod architecture;
mod bench_smoke;
mod broker_acl;
mod bus;
mod calling;
mod cli;
mod console_api;
mod console_browser;
mod deploy_files;
mod device_auth;
mod echo_conversation;
mod fuzz_regressions;
mod history;
mod history_api;
mod limits;
mod management_api;
mod metrics;
mod ota;
mod presence_admin;
mod presence_store;
mod push;
mod readiness;
mod robustness;
mod roundtrip_props;
mod scale_out;
mod shutdown;
mod tls;
mod transports;
mod udp_rules;
mod udp_shards;
mod upstream_bridge;
