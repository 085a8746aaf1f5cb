//! The web console end to end, in a real browser: Debian's Chromium driven by
//! playwright-core (`console/tests/e2e.mjs`), against a gateway relaying to the mock
//! xiaozhi-server with SQLite history, and a simulated device that talks when the
//! browser is ready for it.
//!
//! The browser script prints `STEP <name>` where this side must act and waits for `GO`
//! on its stdin; everything else it prints is passed through. It needs Node.js, the
//! console's npm packages (`npm ci --prefix console`) and Chromium (`/usr/bin/chromium`,
//! or `CHROMIUM`); `.ci/run` installs them. Screenshots of every view land in
//! `target/console-e2e/`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use xiaozhi_tools::simulator::demo::{FRAME_MS, TurnHeard, open_conversation, speak_turn};
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

const TOKEN: &str = "console-e2e-token";
/// Frames the device speaks per turn (and the mock answers after).
const FRAMES_PER_TURN: u32 = 10;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the browser test needs, or a message that says how to get it.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    let node = std::env::var_os("NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("node"));
    let version = std::process::Command::new(&node).arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        return Err("Node.js (`node`) is needed for the console's browser test; install Node.js 18 or newer (Debian: nodejs)".into());
    }
    if !repo()
        .join("console/node_modules/playwright-core/package.json")
        .exists()
    {
        return Err("playwright-core is missing: run `npm ci --prefix console`".into());
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!(
            "{} is missing: install Debian's chromium (apt-get install chromium) or set CHROMIUM",
            chromium.display()
        ));
    }
    Ok((node, chromium))
}

async fn send_go(stdin: &mut tokio::process::ChildStdin) {
    stdin
        .write_all(b"GO\n")
        .await
        .expect("browser script reads GO");
    stdin.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_end_to_end_in_chromium() {
    let (node, chromium) = prerequisites().unwrap_or_else(|e| panic!("{e}"));

    let mock = MockUpstream::start(MockUpstreamConfig {
        frames_per_turn: FRAMES_PER_TURN,
        reply_frames: 8,
        dialogue: xiaozhi_tools::simulator::demo::demo_dialogue(),
        ..MockUpstreamConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    config.pipeline.kind = xiaozhi_gateway::config::PipelineKind::Xiaozhi;
    config.pipeline.xiaozhi.urls = vec![mock.url.clone()];
    config.history.enabled = true;
    config.history.database_url = format!("sqlite://{}", dir.path().join("history.db").display());
    config.history.journal_dir = dir.path().join("journal");
    config.history.api_token = Some(TOKEN.into());
    let gw = common::start_with(config).await;

    // A device in a conversation with one turn already recorded.
    let mut dev = common::device(&gw, 7).await;
    let mac = dev.credentials.mac.colon();
    let (session, mut audio) = open_conversation(&mut dev).await.unwrap();
    speak_turn(&mut dev, &mut audio, &session, 0, FRAMES_PER_TURN)
        .await
        .unwrap();
    let mut spoken = FRAMES_PER_TURN;

    // Two devices in a call with each other (as manager-api's address book connects
    // them), for the fleet's in-call state and count.
    let mut caller = common::device(&gw, 8).await;
    let mut callee = common::device(&gw, 9).await;
    let _caller_channel = common::conversation(&mut caller).await;
    let _callee_channel = common::conversation(&mut callee).await;
    let token = xiaozhi_gateway::http::management::daily_token(
        time::OffsetDateTime::now_utc().date(),
        common::KEY,
    );
    let http = reqwest::Client::new();
    for (path, body) in [
        (
            "/api/call/request",
            json!({"caller_mac": common::mac(8).colon(), "target_mac": common::mac(9).colon()}),
        ),
        ("/api/call/accept", json!({"mac": common::mac(9).colon()})),
    ] {
        let answer: serde_json::Value = http
            .post(format!("http://{}{path}", gw.addrs.http))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            ["pending", "bridged"].contains(&answer["status"].as_str().unwrap_or("")),
            "{path}: {answer}"
        );
    }
    let call_macs = format!("{},{}", common::mac(8).colon(), common::mac(9).colon());

    let shots = repo().join("target/console-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let expected_audio = f64::from(FRAMES_PER_TURN * FRAME_MS) / 1000.0;
    let mut child = tokio::process::Command::new(node)
        .arg(repo().join("console/tests/e2e.mjs"))
        .env("CONSOLE_URL", format!("http://{}/console/", gw.addrs.http))
        .env("CONSOLE_TOKEN", TOKEN)
        .env("DEVICE_MAC", &mac)
        .env("CALL_MACS", &call_macs)
        .env("EXPECTED_AUDIO_SECONDS", expected_audio.to_string())
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let started = Instant::now();
    let mut ok = false;
    let mut steps = Vec::new();
    let (mut heard, mut user_seen, mut assistant_seen): (
        Option<TurnHeard>,
        Option<i64>,
        Option<i64>,
    ) = (None, None, None);
    let run = async {
        while let Some(line) = lines.next_line().await.expect("read the browser script") {
            println!("e2e: {line}");
            if line == "E2E OK" {
                ok = true;
            }
            if let Some(at) = line.strip_prefix("METRIC user_seen_unix_ms ") {
                user_seen = at.parse().ok();
            }
            if let Some(at) = line.strip_prefix("METRIC assistant_seen_unix_ms ") {
                assistant_seen = at.parse().ok();
            }
            let Some(step) = line.strip_prefix("STEP ") else {
                continue;
            };
            steps.push(step.to_owned());
            match step {
                "talk" => {
                    // The browser watches while the device speaks.
                    send_go(&mut stdin).await;
                    heard = Some(
                        speak_turn(&mut dev, &mut audio, &session, spoken, FRAMES_PER_TURN)
                            .await
                            .expect("the device's turn"),
                    );
                    spoken += FRAMES_PER_TURN;
                }
                "wait_session_end" => {
                    dev.publish_json(&json!({"session_id": session, "type": "goodbye"}))
                        .await
                        .unwrap();
                    // Every record of the conversation is stored before the browser
                    // opens it.
                    let stored = common::eventually(Duration::from_secs(10), || {
                        gw.metrics.snapshot().history_records_stored >= 4
                    })
                    .await;
                    assert!(stored, "the conversation's records were stored");
                    send_go(&mut stdin).await;
                }
                "pushed" => {
                    // The alert pushed from the device view reached the device as the
                    // firmware reads it.
                    let alert = dev
                        .recv_type("alert", Duration::from_secs(5))
                        .await
                        .expect("the pushed alert reaches the device");
                    assert_eq!(
                        alert,
                        json!({"type": "alert", "status": "E2E", "message": "console push", "emotion": "neutral"})
                    );
                    send_go(&mut stdin).await;
                }
                // The browser is only telling where it is.
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test finishes within 4 minutes");
    let status = child.wait().await.unwrap();
    println!("browser test took {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        status.success() && ok,
        "the browser test failed (exit {status}); see its output above and target/console-e2e/"
    );
    for step in ["talk", "wait_session_end", "pushed"] {
        assert!(steps.iter().any(|s| s == step), "the script reached {step}");
    }
    // Live: each record was on the operator's screen within a second of the message
    // that made it (the device's `stt` for the user's words, `tts stop` for the
    // assistant's sentence, which is complete only then).
    let heard = heard.expect("the device's turn was timed");
    let (stt_at, stop_at) = (heard.stt_at_ms, heard.stop_at_ms);
    let user_lag = user_seen.expect("the browser reported the user message") - stt_at;
    let assistant_lag =
        assistant_seen.expect("the browser reported the assistant message") - stop_at;
    println!(
        "live transcript: user {user_lag} ms after stt, assistant {assistant_lag} ms after tts stop"
    );
    assert!(
        user_lag < 1000,
        "user message on screen {user_lag} ms after stt"
    );
    assert!(
        assistant_lag < 1000,
        "assistant message on screen {assistant_lag} ms after tts stop"
    );

    // What the browser did reached the device and the gateway.
    assert_eq!(
        dev.mcp_volume(),
        42,
        "the tool call from the console set the volume"
    );
    assert!(
        dev.closed(Duration::from_secs(5)).await,
        "the console's Disconnect closed the device's connection"
    );
    for view in [
        "fleet",
        "fleet-phone",
        "device",
        "session",
        "stats",
        "export",
        "fleet-zh",
    ] {
        let path: &Path = &shots.join(format!("{view}.png"));
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 5_000, "screenshot {} was saved", path.display());
    }
    gw.shutdown().await;
    mock.stop().await;
}
