//! No allocation per frame: the gateway runs alone on a thread of its own (a
//! current-thread runtime, so every task of its audio path runs there), a device on the
//! test's thread sends 10,000 frames and gets 10,000 back, and the allocations the
//! gateway's thread made meanwhile are counted (tests/it/common/alloc_count.rs). A
//! conversation's setup, a turn of chat history, a timer firing may allocate; a frame
//! may not. The budget below is one allocation per 50 frames in all, so a single
//! allocation per frame (20,000 in both directions) fails the test many times over.
//!
//! Paths: the echo pipeline (realtime, where the socket task reflects each frame), the
//! relay to a xiaozhi-server stand-in (`bench upstream`'s, on the test's thread), and
//! that relay with chat history recording both directions (SQLite, audio kept).

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::history::writer::RecordMode;
use xiaozhi_gateway::server::BoundAddrs;
use xiaozhi_tools::bench::echo_upstream::{EchoUpstream, Turns};
use xiaozhi_tools::simulator::audio::{ServerHello, SimLink, frame_index, synthetic_frame};

use common::alloc_count::allocations_on_this_thread;

/// Frames each way in the measured window.
const FRAMES: u32 = 10_000;
/// Frames each way before it, so every buffer has grown to its working size.
const WARMUP: u32 = 1_000;
/// Frames in flight at once (sent, then all awaited). Firmware sends one frame every
/// 60 ms; a few at once stands for the bursts a network delivers after a hiccup.
const WINDOW: u32 = 4;
/// Allocations allowed on the gateway's thread for the whole window, both directions.
const BUDGET: u64 = (2 * FRAMES / 50) as u64;
const WAIT: Duration = Duration::from_secs(10);

enum Ask {
    Allocations(oneshot::Sender<u64>),
    Stop(oneshot::Sender<()>),
}

/// A gateway on a thread of its own, asked for that thread's allocation count.
struct GatewayThread {
    addrs: BoundAddrs,
    asks: mpsc::Sender<Ask>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GatewayThread {
    async fn start(config: Config) -> GatewayThread {
        let (ready_tx, ready) = oneshot::channel();
        let (asks, mut rx) = mpsc::channel(4);
        let thread = std::thread::Builder::new()
            .name("gateway-under-count".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let gw = common::start_with(config).await;
                    let _ = ready_tx.send(gw.addrs);
                    while let Some(ask) = rx.recv().await {
                        match ask {
                            Ask::Allocations(reply) => {
                                let _ = reply.send(allocations_on_this_thread());
                            }
                            Ask::Stop(done) => {
                                gw.shutdown().await;
                                let _ = done.send(());
                                return;
                            }
                        }
                    }
                });
            })
            .expect("thread");
        let addrs = ready.await.expect("gateway started");
        GatewayThread {
            addrs,
            asks,
            thread: Some(thread),
        }
    }

    async fn allocations(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Allocations(tx)).await.expect("gateway");
        rx.await.expect("gateway answers")
    }

    async fn stop(mut self) {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Stop(tx)).await.expect("gateway");
        rx.await.expect("gateway stops");
        if let Some(thread) = self.thread.take() {
            thread.join().expect("gateway thread");
        }
    }
}

/// Sends frames `from..from + count` in windows, each answered before the next.
async fn exchange(link: &mut SimLink, from: u32, count: u32) {
    let mut next = from;
    while next < from + count {
        let window = WINDOW.min(from + count - next);
        for i in next..next + window {
            link.send(i * 60, &synthetic_frame(i, 60)).await.unwrap();
        }
        for _ in 0..window {
            let frame = link
                .recv(WAIT)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no answer to the window from frame {next}"));
            let index = frame_index(&frame.opus).expect("a frame of ours");
            assert!(
                (next..next + window).contains(&index),
                "frame {index} outside the window from {next}"
            );
        }
        next += window;
    }
}

/// A device's conversation in realtime listening: warm up, then count the gateway's
/// allocations over [`FRAMES`] frames each way. Returns the count, and how many times
/// `turns` changed meanwhile.
async fn allocations_per_window(gw: &GatewayThread, turns: impl Fn() -> u64) -> (u64, u64) {
    let mut dev =
        xiaozhi_tools::simulator::device::SimDevice::connect(gw.addrs.mqtt, common::creds(1))
            .await
            .expect("device connects");
    dev.publish_json(&xiaozhi_tools::simulator::device::SimDevice::firmware_hello())
        .await
        .unwrap();
    let hello = dev.recv_type("hello", WAIT).await.expect("server hello");
    let hello = ServerHello::parse(&hello).expect("valid server hello");
    let mut link = SimLink::open(&hello, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("channel opens");
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();
    exchange(&mut link, 0, WARMUP).await;
    let (before, turns_before) = (gw.allocations().await, turns());
    exchange(&mut link, WARMUP, FRAMES).await;
    let (after, turns_after) = (gw.allocations().await, turns());
    // The two asks themselves are answered on the gateway's thread, and allocate
    // nothing there (a oneshot's memory is the asker's).
    (after - before, turns_after - turns_before)
}

/// Allocations a turn of chat history may make on the gateway's thread: parsing the
/// four server messages of a turn, the user and assistant records, their batch and
/// transaction, the utterance buffers growing past their starting size.
const PER_TURN: u64 = 400;

fn check(path: &str, (allocations, turns): (u64, u64)) {
    let budget = BUDGET + PER_TURN * turns;
    println!(
        "{path}: {allocations} allocations on the gateway's thread for {FRAMES} frames each \
         way and {turns} turns (budget {budget})"
    );
    assert!(
        allocations <= budget,
        "{path}: {allocations} allocations for {FRAMES} frames each way and {turns} turns \
         (budget {budget}): something allocates per frame"
    );
}

#[tokio::test]
async fn the_echo_path_allocates_nothing_per_frame() {
    let gw = GatewayThread::start(common::test_config()).await;
    let n = allocations_per_window(&gw, || 0).await;
    gw.stop().await;
    check("echo", n);
}

fn relay_config(upstream: &EchoUpstream) -> Config {
    let mut c = common::test_config();
    c.pipeline.xiaozhi.urls = vec![upstream.url()];
    c
}

#[tokio::test]
async fn the_relay_path_allocates_nothing_per_frame() {
    let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("upstream");
    let gw = GatewayThread::start(relay_config(&upstream)).await;
    let n = allocations_per_window(&gw, || upstream.stats().turns).await;
    gw.stop().await;
    upstream.stop().await;
    check("relay", n);
}

#[tokio::test]
async fn recording_the_relay_allocates_nothing_per_frame() {
    // Long turns: a few in the window, each a user and an assistant record with audio,
    // so what is counted is the recording of frames, not of turns.
    let upstream = EchoUpstream::start_with_turns(
        ([127, 0, 0, 1], 0).into(),
        Some(Turns {
            min_secs: 150.0,
            max_secs: 150.0,
        }),
    )
    .await
    .expect("upstream");
    let dir = tempfile::tempdir().unwrap();
    let mut config = relay_config(&upstream);
    config.history.enabled = true;
    config.history.mode = RecordMode::Audio;
    config.history.database_url = format!("sqlite://{}", dir.path().join("h.db").display());
    config.history.journal_dir = dir.path().to_owned();
    let gw = GatewayThread::start(config).await;
    let n = allocations_per_window(&gw, || upstream.stats().turns).await;
    gw.stop().await;
    upstream.stop().await;
    // 150 s turns are 2,500 frames: the window of 10,000 holds four turns.
    assert!((3..=5).contains(&n.1), "{} turns in the window", n.1);
    check("relay with chat history", n);
}
