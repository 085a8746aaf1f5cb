//! Shared helpers for the integration tests: a gateway on ephemeral loopback ports, and
//! firmware-exact simulated devices.
#![allow(dead_code)]

pub mod alloc_count;
pub mod scratch_db;

use std::time::Duration;

use figment::Figment;
use figment::providers::Serialized;
use serde_json::{Value, json};
use xiaozhi_gateway::config::{BrokerRole, BrokerUser, Config};
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::audio::{ServerHello, SimAudio, synthetic_frame};
use xiaozhi_tools::simulator::device::{DeviceCredentials, SimDevice};

pub const KEY: &str = "test-signature-key";
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASS: &str = "admin-secret";

/// A config with every listener on an ephemeral loopback port.
pub fn test_config() -> Config {
    let mut c = Config::from_figment(
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Serialized::default("auth.signature_key", KEY)),
    )
    .expect("test config");
    let any = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    c.mqtt.listen = any(0);
    c.mqtt.tls_listen = any(0);
    c.broker.listen = any(0);
    c.udp.listen = any(0);
    c.http.listen = any(0);
    c.udp.public_host = "127.0.0.1".into();
    c.broker.users = vec![BrokerUser {
        username: ADMIN_USER.into(),
        password: ADMIN_PASS.into(),
        role: BrokerRole::Admin,
    }];
    c.shutdown.grace_secs = 3;
    // The functional tests send far faster than firmware does (thousands of frames at
    // once, hundreds of admin round trips a second) and connect from one address; the
    // per-peer rate limits are tested with their own settings in tests/it/limits.rs.
    c.mqtt.message_rate = 0;
    c.udp.channel_rate = 0;
    c.mqtt.connect_rate_per_source = 0;
    // Tests that record chat history turn it on with their own database and journal.
    c.history.enabled = false;
    c
}

pub async fn start() -> Gateway {
    start_with(test_config()).await
}

pub async fn start_with(config: Config) -> Gateway {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("XZ_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    Gateway::start(config).await.expect("gateway starts")
}

pub fn mac(n: u32) -> Mac {
    DeviceCredentials::nth_mac(n)
}

pub fn creds(n: u32) -> DeviceCredentials {
    DeviceCredentials::for_mac(mac(n), "GID_test", Some(KEY.as_bytes()))
}

pub async fn device(gw: &Gateway, n: u32) -> SimDevice {
    SimDevice::connect(gw.addrs.mqtt, creds(n))
        .await
        .expect("device connects")
}

/// Says hello and opens the audio channel, as the firmware does.
pub async fn conversation(dev: &mut SimDevice) -> (ServerHello, SimAudio) {
    dev.publish_json(&SimDevice::firmware_hello())
        .await
        .unwrap();
    let hello = dev
        .recv_type("hello", Duration::from_secs(10))
        .await
        .expect("server hello");
    // The device runs firmware 2.4 by default, which ignores a hello it does not like.
    assert!(
        dev.violations().is_empty(),
        "firmware {} would refuse: {:?}",
        dev.firmware().label(),
        dev.violations()
    );
    let hello = ServerHello::parse(&hello).expect("valid server hello");
    let audio = SimAudio::open(&hello, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (hello, audio)
}

/// A whole conversation through a speech server that answers each turn of 5 frames
/// (the mock upstream's default): hello, `turns` turns (each waits for the reply's
/// `tts stop`), goodbye. Returns the device (still connected) and the session id.
pub async fn converse(gw: &Gateway, n: u32, turns: u32) -> (SimDevice, String) {
    let mut dev = device(gw, n).await;
    let session = converse_on(&mut dev, turns).await;
    (dev, session)
}

/// [`converse`] on a device already connected (to any gateway); the session id.
pub async fn converse_on(dev: &mut SimDevice, turns: u32) -> String {
    let (hello, mut audio) = conversation(dev).await;
    dev.publish_json(&listen_start(&hello.session_id, "auto"))
        .await
        .unwrap();
    for turn in 0..turns {
        for i in 0..5 {
            let index = turn * 5 + i;
            audio
                .send(index * 60, &synthetic_frame(index, 30))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Wait for the whole reply before speaking again.
        loop {
            let tts = dev.recv_type("tts", Duration::from_secs(5)).await.unwrap();
            if tts["state"] == "stop" {
                break;
            }
        }
        dev.publish_json(&listen_start(&hello.session_id, "auto"))
            .await
            .unwrap();
    }
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    hello.session_id
}

pub fn listen_start(session: &str, mode: &str) -> Value {
    json!({"session_id": session, "type": "listen", "state": "start", "mode": mode})
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// Whether the mock speech server has seen `n` of its connections closed by the gateway
/// within 3 s.
pub async fn upstream_closed(
    upstream: &xiaozhi_tools::simulator::upstream::MockUpstream,
    n: u32,
) -> bool {
    eventually(Duration::from_secs(3), || {
        upstream.observed().closes_by_gateway == n
    })
    .await
}

/// A free loopback TCP port (for services a test starts and stops itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to 10 s) until something accepts TCP connections on loopback `port`.
async fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private `redis-server` on `port` (no persistence), killed when dropped.
pub async fn start_redis(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (installed by .ci/run)");
    wait_listening(port, "redis-server").await;
    child
}

/// Reads a `serve` child's JSON log (`log.format = "json"`) until its "serving" line and
/// returns the device MQTT address it names; keeps draining the log afterwards so the
/// child never blocks on a full pipe.
pub async fn wait_serving(child: &mut tokio::process::Child) -> std::net::SocketAddr {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mqtt = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "xiaozhi-gateway serving" {
                return v["fields"]["mqtt"].as_str().unwrap().parse().unwrap();
            }
        }
        panic!("gateway exited before serving");
    })
    .await
    .expect("gateway starts");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    mqtt
}

/// A private Mosquitto on `port` (anonymous, in memory), killed when dropped: the
/// external broker of the scale-out tests, which stop and start it at will.
pub async fn start_mosquitto(port: u16) -> tokio::process::Child {
    let dir = std::env::temp_dir().join(format!("xz-mosquitto-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\nset_tcp_nodelay true\n"
        ),
    )
    .unwrap();
    let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("mosquitto");
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto (installed by .ci/run)");
    wait_listening(port, "mosquitto").await;
    child
}
