//! Smoke runs of the benchmark tools over real sockets: the load tool against the
//! gateway (echo pipeline, and the xiaozhi pipeline through the echo upstream), against
//! the floor, with idle devices, and the floor's password check.
//!
//! They assert functional figures only (devices connected, frames echoed, nothing
//! rejected), never timings. The runs are serialised: each measures this process (the
//! gateway runs in-process), and the machine may have as few as two cores.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use xiaozhi_tools::bench::echo_upstream::EchoUpstream;
use xiaozhi_tools::bench::floor::{Floor, FloorConfig};
use xiaozhi_tools::bench::load::{self, LoadConfig, LoadReport};

/// One load run at a time in this test binary.
static RUN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A short talking run of `devices` devices against `mqtt`, measuring this process.
fn talk_config(mqtt: SocketAddr, key: Option<&str>, devices: u32) -> LoadConfig {
    LoadConfig {
        mqtt,
        signature_key: key.map(str::to_owned),
        devices,
        connect_rate: 1000,
        warmup: Duration::from_millis(500),
        measure: Duration::from_secs(2),
        target_pid: Some(std::process::id()),
        ..LoadConfig::default()
    }
}

async fn run(config: LoadConfig) -> LoadReport {
    let report = load::run(config).await;
    println!("{report}");
    report
}

/// What every successful talking run shows: all devices in conversation and completed,
/// every frame back, nothing the firmware would drop, and a measured window.
fn assert_talk_ok(report: &LoadReport, devices: u32) {
    assert_eq!(
        report.functional_failures(),
        Vec::<String>::new(),
        "{report}"
    );
    assert_eq!(report.mode, "talk");
    assert_eq!(report.devices, devices);
    assert_eq!(report.connected, devices, "{report}");
    assert_eq!(report.in_conversation, devices, "{report}");
    assert_eq!(report.completed, devices, "{report}");
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
    assert!(report.frames_sent > 0, "{report}");
    assert_eq!(report.frames_received, report.frames_sent, "{report}");
    assert_eq!(report.frames_lost, 0, "{report}");
    assert_eq!(report.downlink_rejected, 0, "{report}");
    assert_eq!(report.hello.count, u64::from(devices), "{report}");
    assert_eq!(
        report.round_trip.count, report.frames_received,
        "one round trip per frame received"
    );
    // 2.5 s of streaming at one frame per 60 ms is ~40 frames per device.
    assert!(
        report.frames_sent >= u64::from(devices) * 30,
        "every device streams at the frame pace: {report}"
    );
    assert!(report.window_secs >= 1.9, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_load_against_the_gateway_echo_pipeline() {
    let _one = RUN.lock().await;
    let gw = common::start().await;
    let report = run(talk_config(gw.addrs.mqtt, Some(common::KEY), 200)).await;
    let m = gw.metrics.snapshot();
    println!("gateway metrics: {m:?}");
    assert_talk_ok(&report, 200);
    assert!(report.round_trip.count > 0);
    let target = report.target.as_ref().expect("this process was measured");
    assert_eq!(target.pid, std::process::id());
    assert!(target.rss_end_bytes > 0, "{report}");
    assert!(target.threads > 0, "{report}");
    // The gateway saw every datagram and echoed each one.
    assert!(m.udp_rx_datagrams >= report.frames_sent, "{m:?}");
    assert!(m.udp_tx_datagrams >= report.frames_received, "{m:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_load_through_the_echo_upstream() {
    let _one = RUN.lock().await;
    let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let mut config = common::test_config();
    config.pipeline.xiaozhi.urls = vec![upstream.url()];
    config.pipeline.xiaozhi.connect_timeout_ms = 5_000;
    let gw = common::start_with(config).await;

    let report = run(talk_config(gw.addrs.mqtt, Some(common::KEY), 100)).await;
    assert_talk_ok(&report, 100);

    // Every frame went through the upstream: one WebSocket per conversation, every
    // uplink frame well-formed and answered.
    let stats = upstream.stats();
    println!("upstream: {stats:?}");
    assert_eq!(stats.connections, 100, "{stats:?}");
    assert_eq!(stats.bad_frames, 0, "{stats:?}");
    assert!(
        stats.frames_in >= report.frames_sent,
        "upstream got {} frames, the devices sent {}",
        stats.frames_in,
        report.frames_sent
    );
    assert_eq!(stats.frames_out, stats.frames_in, "{stats:?}");
    // hello, listen and goodbye at least, per conversation.
    assert!(stats.text_in >= 100, "{stats:?}");
    gw.shutdown().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_load_against_the_floor() {
    let _one = RUN.lock().await;
    let floor = Floor::start(FloorConfig::default()).expect("floor starts");
    assert_ne!(floor.mqtt_addr().port(), 0);
    assert_ne!(floor.udp_addr().port(), 0);
    let report = run(talk_config(floor.mqtt_addr(), None, 100)).await;
    assert_talk_ok(&report, 100);
    let echoed = tokio::task::spawn_blocking(move || floor.stop())
        .await
        .unwrap();
    assert_eq!(
        echoed, report.frames_received,
        "the floor echoed every frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_load_against_the_relay_floor() {
    let _one = RUN.lock().await;
    let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let floor = Floor::start(FloorConfig {
        upstream: Some(upstream.url()),
        ..FloorConfig::default()
    })
    .expect("relay floor starts");
    let report = run(talk_config(floor.mqtt_addr(), None, 100)).await;
    assert_talk_ok(&report, 100);
    // One WebSocket per conversation, every frame through it both ways.
    let stats = upstream.stats();
    assert_eq!((stats.connections, stats.bad_frames), (100, 0), "{stats:?}");
    assert!(stats.frames_in >= report.frames_sent, "{stats:?}");
    let relayed = tokio::task::spawn_blocking(move || floor.stop())
        .await
        .unwrap();
    assert!(
        relayed >= report.frames_sent + report.frames_received,
        "the relay floor relayed {relayed} frames; the devices sent {} and got {}",
        report.frames_sent,
        report.frames_received
    );
    upstream.stop().await;
    // Not a WebSocket URL: refused with a clear error.
    let err = Floor::start(FloorConfig {
        upstream: Some("http://127.0.0.1:1/".into()),
        ..FloorConfig::default()
    })
    .err()
    .expect("refused");
    assert!(err.to_string().contains("ws://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_load_idle_devices() {
    let _one = RUN.lock().await;
    let gw = common::start().await;
    let config = LoadConfig {
        talk: false,
        measure: Duration::from_secs(1),
        ..talk_config(gw.addrs.mqtt, Some(common::KEY), 300)
    };
    let running = tokio::spawn(load::run(config));
    // While the devices idle, the gateway's directory lists each of them.
    assert!(
        common::eventually(Duration::from_secs(10), || gw.directory.len() == 300).await,
        "{} devices in the gateway's directory",
        gw.directory.len()
    );
    let report = running.await.unwrap();
    println!("{report}");
    assert_eq!(report.mode, "idle");
    assert_eq!(
        report.functional_failures(),
        Vec::<String>::new(),
        "{report}"
    );
    assert_eq!(report.connected, 300, "{report}");
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
    assert_eq!(report.in_conversation, 0);
    assert_eq!((report.frames_sent, report.hello.count), (0, 0));
    assert!(report.target.as_ref().is_some_and(|t| t.rss_end_bytes > 0));
    // They left as the firmware does.
    assert!(
        common::eventually(Duration::from_secs(10), || gw.directory.is_empty()).await,
        "{} devices still in the gateway's directory",
        gw.directory.len()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_checks_passwords_like_the_gateway() {
    let _one = RUN.lock().await;
    let floor = Floor::start(FloorConfig {
        signature_key: Some("k".into()),
        ..FloorConfig::default()
    })
    .expect("floor starts");
    let short = |key: Option<&str>| LoadConfig {
        measure: Duration::from_millis(500),
        warmup: Duration::ZERO,
        ..talk_config(floor.mqtt_addr(), key, 20)
    };

    // Unsigned passwords are refused.
    let report = run(short(None)).await;
    assert_eq!(report.connected, 0, "{report}");
    assert_eq!(report.errors, 20, "{report}");
    assert!(
        report
            .first_errors
            .iter()
            .all(|e| e.contains("MQTT connect")),
        "{:?}",
        report.first_errors
    );
    assert!(!report.functional_failures().is_empty());
    assert_eq!(report.frames_sent, 0);

    // A wrong key too.
    let report = run(short(Some("not-k"))).await;
    assert_eq!(report.connected, 0, "{report}");
    assert!(!report.functional_failures().is_empty());

    // The right key gets in and talks.
    let report = run(short(Some("k"))).await;
    assert_eq!(
        report.functional_failures(),
        Vec::<String>::new(),
        "{report}"
    );
    assert_eq!(report.connected, 20);
    assert!(report.frames_received > 0);
    tokio::task::spawn_blocking(move || floor.stop())
        .await
        .unwrap();
}
