//! The `xiaozhi-gateway` binary as an operator runs it: exit codes, error messages that
//! name the setting to change, signals, and the shipped example config.

use crate::common;

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use xiaozhi_tools::simulator::audio::{ServerHello, SimAudio};
use xiaozhi_tools::simulator::device::SimDevice;

const BIN: &str = env!("CARGO_BIN_EXE_xiaozhi-gateway");

/// The binary with every listener on an ephemeral loopback port, JSON logs, no config
/// from the caller's environment.
fn gateway_command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("XZ_MQTT__LISTEN", "127.0.0.1:0")
        .env("XZ_BROKER__LISTEN", "127.0.0.1:0")
        .env("XZ_UDP__LISTEN", "127.0.0.1:0")
        .env("XZ_HTTP__LISTEN", "127.0.0.1:0")
        .env("XZ_LOG__FORMAT", "json")
        .env("XZ_SHUTDOWN__GRACE_SECS", "3")
        // No chat-history files in the working tree.
        .env("XZ_HISTORY__ENABLED", "false")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("command finishes")
        .expect("command runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn a_busy_port_names_the_setting_that_moves_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = run(gateway_command()
        .arg("--dev")
        .arg("serve")
        .env("XZ_MQTT__LISTEN", addr.to_string()))
    .await;
    assert!(!out.status.success(), "must not start on a busy port");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&addr.to_string()),
        "names the address: {stderr}"
    );
    assert!(
        stderr.contains("mqtt.listen") && stderr.contains("XZ_MQTT__LISTEN"),
        "names the setting: {stderr}"
    );
    drop(taken);

    // The QUIC port too, when QUIC is on.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = run(gateway_command()
        .args(["--dev", "serve"])
        .env("XZ_QUIC__ENABLED", "true")
        .env("XZ_QUIC__LISTEN", addr.to_string()))
    .await;
    assert!(!out.status.success(), "must not start on a busy QUIC port");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&addr.to_string())
            && stderr.contains("quic.listen")
            && stderr.contains("XZ_QUIC__LISTEN"),
        "names the QUIC setting: {stderr}"
    );
}

/// The README's `simulate --transport` flow against `serve --dev` with QUIC on: every
/// transport carries a conversation end to end with nothing lost.
#[tokio::test]
async fn simulate_speaks_every_transport_against_serve() {
    let mut child = gateway_command()
        .args(["--dev", "serve"])
        .env("XZ_QUIC__ENABLED", "true")
        .env("XZ_QUIC__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mqtt = common::wait_serving(&mut child).await;
    for transport in ["ctr", "gcm", "quic"] {
        let out = run(Command::new(BIN).args([
            "simulate",
            "--mqtt",
            &mqtt.to_string(),
            "--devices",
            "3",
            "--seconds",
            "1",
            "--transport",
            transport,
            "--json",
        ]))
        .await;
        assert!(out.status.success(), "{transport}: {}", text(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["conversations"], 3, "{transport}: {report}");
        assert!(
            report["frames_echoed"].as_u64().unwrap() > 0,
            "{transport}: {report}"
        );
        assert_eq!(report["frames_lost"], 0, "{transport}: {report}");
        assert_eq!(
            report["errors"],
            serde_json::json!([]),
            "{transport}: {report}"
        );
    }
    let _ = child.kill().await;
}

#[tokio::test]
async fn config_check_names_the_bad_key_and_value() {
    let out = run(gateway_command()
        .args(["--dev", "config", "check"])
        .env("XZ_UDP__IDLE_TIMEOUT_SECS", "soon"))
    .await;
    assert_eq!(out.status.code(), Some(2), "bad config exits 2");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("idle_timeout_secs") && stderr.contains("soon"),
        "{stderr}"
    );

    let out = run(gateway_command().args(["config", "check"])).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "no signature key and no --dev is refused"
    );
    assert!(
        text(&out.stderr).contains("auth.signature_key"),
        "{}",
        text(&out.stderr)
    );

    let out =
        run(gateway_command().args(["config", "check", "--config", "/nonexistent/gw.toml"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/gw.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn the_example_config_is_valid_and_secrets_are_not_printed() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/xiaozhi-gateway.example.toml"
    );
    let out = run(gateway_command().args(["--dev", "config", "check", "--config", example])).await;
    assert!(
        out.status.success(),
        "example config: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("config OK"));

    let out = run(gateway_command()
        .args(["config", "check", "--config", example])
        .env("XZ_AUTH__SIGNATURE_KEY", "super-secret-signature-key"))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("super-secret-signature-key"),
        "the key is redacted: {stdout}"
    );
    assert!(stdout.contains("<redacted>"));
}

/// Starts `serve --dev` and returns it with its device MQTT address, read from the
/// "serving" log line.
async fn serve() -> (Child, SocketAddr) {
    let mut child = gateway_command()
        .args(["--dev", "serve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mqtt = common::wait_serving(&mut child).await;
    (child, mqtt)
}

#[tokio::test]
async fn sigterm_says_goodbye_to_live_sessions_and_exits_zero() {
    let (mut child, mqtt) = serve().await;
    let mut dev = SimDevice::connect(mqtt, common::creds(70))
        .await
        .expect("device connects");
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let hello = dev
        .recv_type("hello", Duration::from_secs(10))
        .await
        .expect("server hello");
    let hello = ServerHello::parse(&hello).unwrap();
    let _audio = SimAudio::open(&hello, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());

    let goodbye = dev
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .expect("goodbye before exit");
    assert_eq!(goodbye["session_id"], hello.session_id.as_str());

    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
}

#[tokio::test]
async fn sigint_with_no_devices_exits_zero_quickly() {
    let (mut child, _) = serve().await;
    let started = std::time::Instant::now();
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "idle shutdown took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn migrate_creates_the_schema_and_can_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("db/history.db").display());
    for _ in 0..2 {
        let out = run(gateway_command()
            .args(["--dev", "migrate"])
            .env("XZ_HISTORY__DATABASE_URL", &url))
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("schema ready"));
    }
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for expected in [
        "ai_agent_chat_audio",
        "ai_agent_chat_history",
        "v_chat_summary",
        "xz_chat_applied",
    ] {
        assert!(
            tables.iter().any(|t| t == expected),
            "{expected} in {tables:?}"
        );
    }
    let out = run(gateway_command()
        .args(["--dev", "migrate"])
        .env("XZ_HISTORY__DATABASE_URL", "postgres://nope"))
    .await;
    assert_eq!(out.status.code(), Some(2), "a bad URL is a config error");
    assert!(text(&out.stderr).contains("history.database_url"));
}
