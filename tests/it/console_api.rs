//! The web console's server side over real sockets: the embedded page and its security
//! headers, the console API (fleet, device, commands, export tickets) under the history
//! token, and the upstream-failure alerts on `/ws/admin`. The page itself is tested in
//! a browser by `console_browser.rs`.

use crate::common;

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use xiaozhi_gateway::config::Config;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::demo::{open_conversation, speak_turn};
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

const TOKEN: &str = "console-api-token";

fn history_config(dir: &tempfile::TempDir, urls: Vec<String>) -> Config {
    let mut config = common::test_config();
    config.pipeline.kind = xiaozhi_gateway::config::PipelineKind::Xiaozhi;
    config.pipeline.xiaozhi.urls = urls;
    config.pipeline.xiaozhi.connect_timeout_ms = 1_000;
    config.history.enabled = true;
    config.history.database_url = format!("sqlite://{}", dir.path().join("history.db").display());
    config.history.journal_dir = dir.path().join("journal");
    config.history.api_token = Some(TOKEN.into());
    config
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.addrs.http)
}

async fn get(gw: &Gateway, path: &str) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .get(url(gw, path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn command(gw: &Gateway, mac: &str, body: Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(url(gw, &format!("/api/console/devices/{mac}/commands")))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&dir, vec![])).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client.get(url(&gw, "/console")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/console/");

    let r = client.get(url(&gw, "/console/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = r.text().await.unwrap();
    assert!(
        html.contains("<script type=\"module\""),
        "the page loads its modules"
    );

    // What is not part of the page is not served.
    for path in [
        "/console/package.json",
        "/console/tests/e2e.mjs",
        "/console/scripts/vendor.mjs",
        "/console/../Cargo.toml",
        "/console/nope.js",
    ] {
        let r = client.get(url(&gw, path)).send().await.unwrap();
        assert!(
            r.status() == StatusCode::NOT_FOUND || r.status() == StatusCode::BAD_REQUEST,
            "{path}: {}",
            r.status()
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn the_console_api_needs_the_token_and_is_off_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&dir, vec![])).await;
    let client = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/api/console/fleet"),
        ("GET", "/api/console/devices/aa:bb:cc:dd:ee:ff"),
        ("POST", "/api/console/devices/aa:bb:cc:dd:ee:ff/commands"),
        ("POST", "/api/console/export-link"),
    ] {
        let request = client.request(method.parse().unwrap(), url(&gw, path));
        let r = request.try_clone().unwrap().send().await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} without a token"
        );
        let r = request.bearer_auth("wrong").send().await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong token"
        );
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
    }
    gw.shutdown().await;

    // No token configured: the console API does not exist (the page still loads and
    // says how to turn it on).
    let mut config = history_config(&dir, vec![]);
    config.history.api_token = None;
    let gw = common::start_with(config).await;
    let r = client
        .get(url(&gw, "/api/console/fleet"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client.get(url(&gw, "/console/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn commands_from_the_console_reach_the_device() {
    let mock = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&dir, vec![mock.url.clone()])).await;
    let mut dev = common::device(&gw, 21).await;
    let mac = dev.credentials.mac.colon();

    // The device view: presence, this node's view and the tools with their schemas.
    let tools_ready = common::eventually(Duration::from_secs(5), || {
        gw.directory
            .mcp(&dev.credentials.mac)
            .is_some_and(|m| m.cache().complete)
    })
    .await;
    assert!(tools_ready, "MCP setup finished");
    let (status, view) = get(&gw, &format!("/api/console/devices/{mac}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["mac_address"], mac);
    assert_eq!(view["connected_here"], true);
    assert_eq!(view["presence"]["state"], "online");
    let tools = view["tools"].as_array().unwrap();
    let volume = tools
        .iter()
        .find(|t| t["name"] == "self.audio_speaker.set_volume")
        .expect("the firmware's volume tool is listed");
    assert_eq!(
        volume["inputSchema"]["properties"]["volume"]["type"],
        "integer"
    );

    // A tool call: the device runs it and the reply is the MQTT reply's shape.
    let (status, reply) = command(
        &gw,
        &mac,
        json!({"command": "mcp", "payload": {"method": "tools/call",
            "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 33}}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["ok"], true);
    assert!(
        reply["request_id"]
            .as_str()
            .unwrap()
            .starts_with("console-")
    );
    assert_eq!(reply["result"]["isError"], false);
    assert_eq!(dev.mcp_volume(), 33);

    // The device's own error comes back as device_error / 502.
    let (status, reply) = command(
        &gw,
        &mac,
        json!({"command": "mcp", "payload": {"method": "tools/call",
            "params": {"name": "self.audio_speaker.set_volume", "arguments": {}}}}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{reply}");
    assert_eq!(reply["error"]["code"], "device_error");

    // Bad commands are 400s with the same codes as on MQTT.
    for (body, code) in [
        (json!({"command": "fly"}), "unknown_command"),
        (json!({"command": "mcp"}), "invalid_command"),
        (json!([1, 2]), "malformed_json"),
        (json!({"command": "list_online"}), "wrong_topic"),
    ] {
        let (status, reply) = command(&gw, &mac, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{body}");
    }
    let r = reqwest::Client::new()
        .post(url(&gw, "/api/console/devices/not-a-mac/commands"))
        .bearer_auth(TOKEN)
        .json(&json!({"command": "status"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Ending a conversation: 409 without one, then a real one ends.
    let (status, reply) = command(&gw, &mac, json!({"command": "goodbye"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{reply}");
    assert_eq!(reply["error"]["code"], "no_conversation");
    let (session, mut audio) = open_conversation(&mut dev).await.unwrap();
    speak_turn(&mut dev, &mut audio, &session, 0, 5)
        .await
        .unwrap();
    let (_, view) = get(&gw, &format!("/api/console/devices/{mac}")).await;
    assert_eq!(view["session_id"], session.as_str());
    let (status, reply) = command(&gw, &mac, json!({"command": "goodbye"})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let goodbye = dev
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(goodbye["session_id"], session.as_str());

    // Disconnect: the connection closes, and the device is offline for commands.
    let (status, reply) = command(&gw, &mac, json!({"command": "kick", "reason": "test"})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(dev.closed(Duration::from_secs(5)).await, "kicked");
    let (status, reply) = command(&gw, &mac, json!({"command": "status"})).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "status answers for an offline device: {reply}"
    );
    let offline = common::eventually(Duration::from_secs(5), || {
        gw.directory.get(&common::mac(21)).is_none()
    })
    .await;
    assert!(offline);
    let (status, reply) = command(&gw, &mac, json!({"command": "kick"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert_eq!(reply["error"]["code"], "device_offline");
    gw.shutdown().await;
    mock.stop().await;
}

#[tokio::test]
async fn export_links_are_single_use_and_keep_the_token_out_of_urls() {
    let mock = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&dir, vec![mock.url.clone()])).await;
    let (_dev, _session) = common::converse(&gw, 31, 2).await;
    let mac = common::mac(31).colon();
    let stored = common::eventually(Duration::from_secs(10), || {
        gw.metrics.snapshot().history_records_stored >= 4
    })
    .await;
    assert!(stored);

    let client = reqwest::Client::new();
    let link = |query: String| {
        client
            .post(url(&gw, &format!("/api/console/export-link?{query}")))
            .bearer_auth(TOKEN)
            .send()
    };
    let r = link(format!("format=csv&mac={mac}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let href = body["url"].as_str().unwrap().to_owned();
    assert!(href.starts_with("/api/console/download/") && !href.contains(TOKEN));
    assert_eq!(body["expires_in_secs"], 60);

    // The download needs no header, streams the export, and works once.
    let r = client.get(url(&gw, &href)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.starts_with("attachment;") && disposition.contains(".csv"),
        "{disposition}"
    );
    let csv = r.text().await.unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].contains("mac_address"), "header: {}", rows[0]);
    assert!(rows.len() >= 5, "4 records and a header: {csv}");
    assert!(rows[1..].iter().all(|r| r.contains(&mac)));
    let again = client.get(url(&gw, &href)).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND, "a ticket works once");

    let r = link("format=jsonl".into()).await.unwrap();
    let href = r.json::<Value>().await.unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let jsonl = client
        .get(url(&gw, &href))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(jsonl.lines().count() >= 4);
    for line in jsonl.lines() {
        let row: Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(row["mac_address"], mac);
    }

    // Bad parameters are refused when the link is made, not when it is used.
    for query in ["format=xml", "mac=nope", "from=2026-13-01", "token=x"] {
        let r = link(query.into()).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    let r = client
        .get(url(&gw, "/api/console/download/0123"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    gw.shutdown().await;
    mock.stop().await;
}

#[tokio::test]
async fn upstream_failures_reach_the_live_feed() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("ws://127.0.0.1:{port}/xiaozhi/v1/");
    let gw = common::start_with(history_config(&dir, vec![dead])).await;

    let mut request = format!("ws://{}/ws/admin", gw.addrs.http)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("xiaozhi-admin, bearer.{TOKEN}").parse().unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(gw.addrs.http).await.unwrap();
    let (mut feed, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();

    let mut dev = common::device(&gw, 41).await;
    dev.publish_json(&xiaozhi_tools::simulator::device::SimDevice::firmware_hello())
        .await
        .unwrap();
    let alert = dev
        .recv_type("alert", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(alert["status"], "error", "{alert}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let failure = loop {
        let message = tokio::time::timeout_at(deadline, feed.next())
            .await
            .expect("an upstream_failure event within 5 s")
            .unwrap()
            .unwrap();
        if let tungstenite::Message::Text(text) = message {
            let event: Value = serde_json::from_str(&text).unwrap();
            if event["type"] == "upstream_failure" {
                break event;
            }
        }
    };
    assert_eq!(failure["mac_address"], common::mac(41).colon());
    assert!(failure["error"].as_str().unwrap().len() > 3, "{failure}");
    assert!(failure["at_ms"].as_i64().unwrap() > 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_fleet_lists_every_state_with_counts() {
    let mock = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = common::start_with(history_config(&dir, vec![mock.url.clone()])).await;
    let before = xiaozhi_gateway::history::record::now_ms();
    // Five devices: 51 leaves again, 52 is in a conversation, the rest stay online.
    let mut devices = Vec::new();
    for n in 50..55 {
        devices.push(common::device(&gw, n).await);
    }
    let mut talking = devices.remove(2);
    let (session, mut audio) = open_conversation(&mut talking).await.unwrap();
    speak_turn(&mut talking, &mut audio, &session, 0, 5)
        .await
        .unwrap();
    devices.remove(1).disconnect().await;

    let expect = json!({"connected": 4, "in_session": 1, "in_call": 0, "offline": 1});
    let mut page = Value::Null;
    let settled = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (status, body) = get(&gw, "/api/console/fleet").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["counts"] == expect {
                page = body;
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(settled, "counts reached {expect}; last page {page}");
    assert_eq!(page["total"], 5);
    assert_eq!(
        page["history_utc_offset_minutes"], 480,
        "the zone history times are in"
    );
    let macs: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mac_address"].as_str().unwrap())
        .collect();
    let mut sorted = macs.clone();
    sorted.sort();
    assert_eq!(macs, sorted, "sorted by MAC");

    let (_, offline) = get(&gw, "/api/console/fleet?state=offline").await;
    assert_eq!(offline["total"], 1);
    assert_eq!(
        offline["devices"][0]["mac_address"],
        common::mac(51).colon()
    );
    assert_eq!(offline["devices"][0]["state"], "offline");
    let (_, in_session) = get(&gw, "/api/console/fleet?state=in_session").await;
    assert_eq!(in_session["devices"][0]["session_id"], session.as_str());

    // Search is over the visible columns, case-insensitive.
    let tail = common::mac(53).colon()[9..].to_uppercase();
    let (_, found) = get(&gw, &format!("/api/console/fleet?q={tail}")).await;
    assert_eq!(found["total"], 1, "{found}");
    let (_, by_group) = get(&gw, "/api/console/fleet?q=gid_TEST").await;
    assert_eq!(by_group["total"], 5);

    // "Offline, seen today": a later cut leaves out the device that left before it.
    let (_, later) = get(
        &gw,
        &format!("/api/console/fleet?since_ms={}", before + 3_600_000),
    )
    .await;
    assert_eq!(later["counts"]["offline"], 0);
    assert_eq!(later["total"], 4);

    // Keyset paging walks every device once.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (_, page) = get(&gw, &format!("/api/console/fleet?limit=2{after}")).await;
        for d in page["devices"].as_array().unwrap() {
            seen.push(d["mac_address"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, sorted, "pages of 2 cover the fleet once, in order");

    for bad in ["state=asleep", "limit=0", "after=zz", "since_ms=-5"] {
        let (status, body) = get(&gw, &format!("/api/console/fleet?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    gw.shutdown().await;
    mock.stop().await;
}
