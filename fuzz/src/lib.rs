//! `xiaozhi_fuzz`: the fuzz targets' shared code (docs/fuzzing.md).
//!
//! [`harness`] holds what every target does with its input, [`seeds`] builds the
//! generated seed corpora. Both files are also compiled into the main crate's
//! `tests/it/fuzz_regressions.rs` (with `#[path]`), so plain `cargo test` replays every seed
//! and every saved crash through exactly the code the fuzzer runs.

pub mod harness;
pub mod seeds;
