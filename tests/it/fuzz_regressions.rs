//! The fuzz targets' inputs replayed under plain `cargo test` (docs/fuzzing.md): every
//! seed in `fuzz/seeds/<target>/` and every saved crash in `fuzz/regressions/<target>/`
//! goes through the same harness code the fuzzer runs (`fuzz/src/harness.rs`, included
//! here by path), so a crash once found stays fixed and the harness itself is compiled
//! and exercised by the normal test suite, without libFuzzer or nightly flags.
//!
//! It also checks that the generated seeds (`fuzz/src/seeds.rs`) are the committed ones
//! and that they reach the states they were written for (an authenticated device, a
//! bound and rebound audio channel). `XZ_WRITE_SEEDS=1 cargo test --release --test it
//! fuzz_regressions::` rewrites them after a protocol change.
//!
//! The harness and the seeds are modules of the test crate's root (`main.rs`), where the
//! fuzz crate has them too, so their own `crate::` paths hold.

use std::path::{Path, PathBuf};

use crate::harness::{self, MqttRun, TARGETS, UdpRun};
use crate::seeds;
use xiaozhi_gateway::protocol::credentials::AuthError;
use xiaozhi_gateway::protocol::device_mqtt::CloseReason;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted (none if the folder does not exist).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && !is_note(p))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// `README.md` files beside the inputs explain them; they are not inputs.
fn is_note(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "md")
}

/// Runs `input` through `target`'s harness, naming the file if it panics.
fn replay(target: &str, run: harness::Harness, path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if std::panic::catch_unwind(|| run(&bytes)).is_err() {
        panic!(
            "{target}: {} fails (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {})",
            path.display(),
            path.display()
        );
    }
}

fn harness_of(target: &str) -> harness::Harness {
    TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .unwrap_or_else(|| panic!("no harness for {target}"))
}

/// Every seed and every regression of one target; returns how many ran.
fn replay_all(target: &str) -> usize {
    let run = harness_of(target);
    let seeds = inputs("seeds", target);
    assert!(
        seeds.len() >= 3,
        "{target}: only {} seeds in fuzz/seeds/{target}/",
        seeds.len()
    );
    let regressions = inputs("regressions", target);
    for path in seeds.iter().chain(&regressions) {
        replay(target, run, path);
    }
    seeds.len() + regressions.len()
}

#[test]
fn device_mqtt_inputs_replay() {
    assert!(replay_all("device_mqtt") >= 3);
}

#[test]
fn device_json_inputs_replay() {
    assert!(replay_all("device_json") >= 3);
}

#[test]
fn udp_datagram_inputs_replay() {
    assert!(replay_all("udp_datagram") >= 3);
}

#[test]
fn upstream_frames_inputs_replay() {
    assert!(replay_all("upstream_frames") >= 3);
}

#[test]
fn config_inputs_replay() {
    assert!(replay_all("config") >= 3);
}

#[test]
fn history_query_inputs_replay() {
    assert!(replay_all("history_query") >= 3);
}

/// Every saved crash belongs to a target that exists (a typo in a folder name would
/// silently skip it).
#[test]
fn regression_folders_name_real_targets() {
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join("regressions")) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/regressions/{name} is not a fuzz target"
            );
        }
    }
}

#[test]
fn generated_seeds_are_committed() {
    let write = std::env::var_os("XZ_WRITE_SEEDS").is_some_and(|v| v == "1");
    let all = seeds::all();
    assert!(all.len() >= 30);
    for seed in all {
        let path = fuzz_dir().join("seeds").join(seed.target).join(seed.name);
        if write {
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
            std::fs::write(&path, &seed.bytes).expect("write seed");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (XZ_WRITE_SEEDS=1 cargo test --release --test it fuzz_regressions:: writes it)",
                path.display()
            )
        });
        assert!(
            committed == seed.bytes,
            "{} differs from fuzz/src/seeds.rs (XZ_WRITE_SEEDS=1 rewrites it)",
            path.display()
        );
    }
}

fn seed_bytes(target: &str, name: &str) -> Vec<u8> {
    seeds::all()
        .into_iter()
        .find(|s| s.target == target && s.name == name)
        .unwrap_or_else(|| panic!("no seed {target}/{name}"))
        .bytes
}

/// The MQTT seeds reach what they were written for, whatever the chunking.
#[test]
fn mqtt_seeds_reach_their_states() {
    for name in ["conversation", "conversation-ragged"] {
        assert_eq!(
            harness::device_mqtt_run(&seed_bytes("device_mqtt", name)),
            MqttRun {
                authenticated: true,
                uplinks: 4,
                close: Some(CloseReason::ClientDisconnect),
            },
            "{name}"
        );
    }
    let unsigned = harness::device_mqtt_run(&seed_bytes("device_mqtt", "unsigned"));
    assert!(unsigned.authenticated && unsigned.uplinks == 1);
    assert_eq!(
        harness::device_mqtt_run(&seed_bytes("device_mqtt", "bad-password")).close,
        Some(CloseReason::AuthFailed(AuthError::BadSignature))
    );
    let slow = harness::device_mqtt_run(&seed_bytes("device_mqtt", "keep-alive-runs-out"));
    assert_eq!(slow.close, Some(CloseReason::KeepAliveTimeout));
    assert!(slow.authenticated);
    assert_eq!(
        harness::device_mqtt_run(&seed_bytes("device_mqtt", "foreign-topic-then-qos2")).close,
        Some(CloseReason::ProtocolViolation(
            "QoS 2 publish is not supported"
        ))
    );
    assert_eq!(
        harness::device_mqtt_run(&seed_bytes("device_mqtt", "oversized")).close,
        Some(CloseReason::ProtocolViolation("malformed packet"))
    );
}

/// The UDP seeds bind, relay, refuse replays and follow a NAT rebinding.
#[test]
fn udp_seeds_reach_their_states() {
    assert_eq!(
        harness::udp_datagram_run(&seed_bytes("udp_datagram", "stream")),
        UdpRun {
            accepted: 3,
            rebinds: 0,
            drops: vec!["replay", "replay"],
        }
    );
    assert_eq!(
        harness::udp_datagram_run(&seed_bytes("udp_datagram", "nat-rebinding")),
        UdpRun {
            accepted: 2,
            rebinds: 1,
            // The new address's first datagram, then the old address's (which now
            // needs two in a row itself).
            drops: vec!["hijack", "hijack"],
        }
    );
    assert_eq!(
        harness::udp_datagram_run(&seed_bytes("udp_datagram", "on-the-wire")),
        UdpRun {
            accepted: 2,
            rebinds: 0,
            drops: vec!["hijack"],
        }
    );
    assert_eq!(
        harness::udp_datagram_run(&seed_bytes("udp_datagram", "malformed")).drops,
        ["truncated", "empty", "wrong_type", "hijack", "decrypt"]
    );
}
