//! `/readyz` against real dependencies that we stop and start: a private redis-server, a
//! TCP proxy in front of MariaDB that we cut, and a mock xiaozhi-server that goes away.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

const MARIADB: &str = "127.0.0.1:3306";

/// Forwards a local port to MariaDB until stopped; stopping also cuts every connection
/// it carries, as a database going down does.
struct Proxy {
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let inner = tasks.clone();
        tasks.lock().await.spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                inner.lock().await.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(MARIADB).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { tasks }
    }

    async fn stop(self) {
        self.tasks.lock().await.abort_all();
        // Let the listener's socket close before the port is reused.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(http: SocketAddr) -> (u16, Value) {
    let r = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap())
}

/// Polls `/readyz` until `pred` holds.
async fn wait_ready(http: SocketAddr, mut pred: impl FnMut(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = readyz(http).await;
        if pred(code, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never matched: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_reports_each_dependency_and_recovers() {
    let redis_port = common::free_port();
    let mut redis = common::start_redis(redis_port).await;
    let proxy_port = common::free_port();
    let proxy = Proxy::start(proxy_port).await;
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let journal = tempfile::tempdir().unwrap();

    let mut config = common::test_config();
    config.presence.redis_url = Some(format!("redis://127.0.0.1:{redis_port}"));
    config.presence.timeout_ms = 500;
    config.history.enabled = true;
    config.history.database_url = format!("mysql://root@127.0.0.1:{proxy_port}/test");
    config.history.journal_dir = journal.path().to_owned();
    config.history.write_timeout_ms = 1_000;
    config.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    let gw = common::start_with(config).await;
    let http = gw.addrs.http;

    let body = wait_ready(http, |code, _| code == 200).await;
    assert_eq!(body["status"], "ready");
    for dep in ["database", "presence", "upstream"] {
        assert_eq!(body["checks"][dep]["ok"], true, "{body}");
    }
    assert_eq!(body["checks"]["presence"]["backend"], "redis");

    // Redis goes away: not ready, presence named with a reason; back: ready.
    redis.kill().await.unwrap();
    let _ = redis.wait().await;
    let body = wait_ready(http, |code, _| code == 503).await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["presence"]["ok"], false);
    assert!(
        body["checks"]["presence"]["reason"].as_str().unwrap().len() > 3,
        "{body}"
    );
    assert_eq!(body["checks"]["database"]["ok"], true, "{body}");
    let _redis = common::start_redis(redis_port).await;
    wait_ready(http, |code, _| code == 200).await;

    // The database goes away (every connection cut): not ready; back: ready.
    proxy.stop().await;
    let body = wait_ready(http, |code, b| {
        code == 503 && b["checks"]["database"]["ok"] == false
    })
    .await;
    assert!(body["checks"]["database"]["reason"].is_string(), "{body}");
    assert_eq!(body["checks"]["presence"]["ok"], true, "{body}");
    let _proxy = Proxy::start(proxy_port).await;
    wait_ready(http, |code, _| code == 200).await;
    gw.shutdown().await;

    // No speech server reachable: not ready, upstream named.
    let mut config = common::test_config();
    config.pipeline.xiaozhi.urls = vec![format!(
        "ws://127.0.0.1:{}/xiaozhi/v1/",
        common::free_port()
    )];
    let gw = common::start_with(config).await;
    let (code, body) = readyz(gw.addrs.http).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["checks"]["upstream"]["ok"], false);
    assert!(
        body["checks"]["upstream"]["reason"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "{body}"
    );
    assert!(body["checks"].get("database").is_none(), "history is off");
    gw.shutdown().await;
}
