//! Device-to-device calling, driven as manager-api drives it (`POST /api/call/request`,
//! `POST /api/call/accept` with the daily token) between firmware-exact simulated devices
//! whose conversations run through a real WebSocket speech server: ringing, silence for
//! the waiting caller, accept, audio both ways byte-exact under each device's own key and
//! sequence, hang-up from either side, refusals, timeouts, and a call between devices on
//! two nodes of a cluster (Mosquitto as the bus, Redis for the call book).

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use xiaozhi_gateway::config::{BusMode, Config};
use xiaozhi_gateway::presence::PresenceState;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_gateway::session::call_leg::SILENCE_FRAME;
use xiaozhi_tools::simulator::audio::{ServerHello, SimAudio, synthetic_frame};
use xiaozhi_tools::simulator::device::SimDevice;
use xiaozhi_tools::simulator::mcp::{SimProperty, SimTool, ToolAction};
use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

const RING: &str = "[device_call]您收到来自奶奶的来电，是否接听？";

/// manager-api's side of the calling endpoints.
struct ManagerApi {
    http: reqwest::Client,
    base: String,
}

impl ManagerApi {
    fn of(http_addr: SocketAddr) -> ManagerApi {
        ManagerApi {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            base: format!("http://{http_addr}"),
        }
    }

    fn token() -> String {
        xiaozhi_gateway::http::management::daily_token(
            time::OffsetDateTime::now_utc().date(),
            common::KEY,
        )
    }

    async fn post_with(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("HTTP request");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: {status} with non-JSON {text:?}: {e}"));
        (status, json)
    }

    async fn post(&self, path: &str, body: &Value) -> Value {
        let (status, answer) = self.post_with(path, &Self::token(), body).await;
        assert_eq!(status, StatusCode::OK, "{path} {body}: {answer}");
        answer
    }

    /// As `DeviceAddressBookServiceImpl` sends it: the caller's MAC as its `device-id`
    /// header spells it, the target's lowercased.
    async fn request(&self, caller: Mac, target: Mac) -> Value {
        let body = json!({
            "caller_mac": caller.colon().to_uppercase(),
            "target_mac": target.colon(),
            "caller_nickname": "奶奶",
        });
        self.post("/api/call/request", &body).await
    }

    async fn accept(&self, callee: Mac) -> Value {
        self.post("/api/call/accept", &json!({"mac": callee.colon()}))
            .await
    }
}

fn config_with(upstream: &MockUpstream) -> Config {
    let mut c = common::test_config();
    c.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    // Two audio shards whatever the machine's cores: channels go to them in turn, so the
    // two legs of a call sit on different shards and each splice crosses them.
    c.udp.shards = 2;
    c
}

async fn upstream() -> MockUpstream {
    MockUpstream::start(MockUpstreamConfig::default())
        .await
        .expect("mock upstream")
}

/// A device whose firmware has the wake-up tool of the forks that support calling.
async fn callable_device(addr: SocketAddr, n: u32) -> SimDevice {
    let dev = SimDevice::connect(addr, common::creds(n))
        .await
        .expect("device connects");
    dev.with_mcp(|mcp| {
        mcp.add_tool(SimTool::new(
            "self.remote_wakeup",
            "Wake the device up and start listening, announcing why",
            vec![SimProperty::string("reason"), SimProperty::string("action")],
            ToolAction::Text("true".into()),
        ))
    });
    dev
}

/// Hello, and the audio channel the server hello describes.
async fn open_conversation(dev: &mut SimDevice) -> (ServerHello, SimAudio) {
    common::conversation(dev).await
}

/// The wake-up request the device received, if any within `wait`.
async fn wake_up(dev: &SimDevice, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(r) = dev
            .mcp_requests()
            .into_iter()
            .find(|r| r["params"]["name"] == "self.remote_wakeup")
        {
            return Some(r);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// No message of `kind` reaches the device within `wait`.
async fn hears_no(dev: &mut SimDevice, kind: &str, wait: Duration) -> bool {
    dev.recv_type(kind, wait).await.is_err()
}

/// The first frame of a newly bridged pair: each side's UDP address is known to the
/// gateway only once it has sent audio, so the callee (who has sent none yet) speaks
/// first, and the caller drains the silence it heard while the call rang.
async fn first_words(caller: &mut SimAudio, callee: &mut SimAudio) {
    while caller
        .recv(Duration::from_millis(100))
        .await
        .unwrap()
        .is_some()
    {}
    let hello = synthetic_frame(9_999, 33);
    callee.send(0, &hello).await.unwrap();
    let heard = caller
        .recv(Duration::from_secs(3))
        .await
        .unwrap()
        .expect("the callee's first words");
    assert_eq!(heard.opus, hello);
}

/// The caller streams as a device does until it hears silence: its conversation becomes
/// a leg as soon as its node has the action (which, from another node, may come after the
/// target's wake-up), and frames sent before that went to its speech server.
async fn hears_silence(audio: &mut SimAudio) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for i in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no silence within 5 s"
        );
        audio.send(i * 60, &synthetic_frame(i, 30)).await.unwrap();
        if let Some(heard) = audio.recv(Duration::from_millis(60)).await.unwrap()
            && heard.opus == SILENCE_FRAME
        {
            return;
        }
    }
}

/// `leaving` says goodbye; `other` must hear its own goodbye (with its own session id)
/// within 5 s: `why` names the case.
async fn hang_up(
    leaving: &mut SimDevice,
    leaving_hello: &ServerHello,
    other: &mut SimDevice,
    other_hello: &ServerHello,
    why: &str,
) {
    leaving
        .publish_json(&json!({"session_id": leaving_hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    let goodbye = other
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{why}: {e}"));
    assert_eq!(
        goodbye["session_id"],
        other_hello.session_id.as_str(),
        "{why}"
    );
}

/// Sends frames `first..first + n` from `from` and checks that `to` receives exactly
/// those packets, in order, each accepted by the firmware's downlink checks.
async fn talk(from: &mut SimAudio, to: &mut SimAudio, first: u32, n: u32) {
    for i in first..first + n {
        let frame = synthetic_frame(i, 20 + (i as usize % 60));
        from.send(i * 60, &frame).await.unwrap();
        let got = to
            .recv(Duration::from_secs(3))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("frame {i} did not arrive"));
        assert_eq!(got.opus, frame, "frame {i} arrives byte-exact");
        assert_eq!(
            got.timestamp,
            i * 60,
            "the sender's timestamp travels with it"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        to.rejected, 0,
        "every downlink datagram passes the firmware's checks"
    );
}

/// Everything published on `filter`, as a client of the broker on `port` sees it
/// (with `credentials` for the embedded broker's listener).
async fn listen_on_bus(
    port: u16,
    credentials: Option<(&str, &str)>,
    filter: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> {
    let mut opts = rumqttc::MqttOptions::new(format!("listener-{port}"), "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    opts.set_max_packet_size(1 << 16, 1 << 16);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    client
        .subscribe(filter, rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), eventloop.poll())
            .await
            .expect("bus client connects")
            .expect("bus connection");
        if matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) {
            break;
        }
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                sink.lock().unwrap().push(p.payload.to_vec());
            }
        }
    });
    seen
}

fn presence(gw: &Gateway, mac: Mac) -> Option<PresenceState> {
    gw.presence.local(&mac.colon()).map(|r| r.state)
}

#[tokio::test]
async fn ring_accept_talk_both_ways_and_hang_up() {
    let upstream = upstream().await;
    let gw = common::start_with(config_with(&upstream)).await;
    let api = ManagerApi::of(gw.addrs.http);
    let (a, b) = (common::mac(1), common::mac(2));
    let mut caller = callable_device(gw.addrs.mqtt, 1).await;
    let mut target = callable_device(gw.addrs.mqtt, 2).await;
    let events = listen_on_bus(
        gw.addrs.broker.unwrap().port(),
        Some((common::ADMIN_USER, common::ADMIN_PASS)),
        "xiaozhi/events/calls",
    )
    .await;

    // The caller talks to its speech server, which asks manager-api to call "奶奶".
    let (caller_hello, mut caller_audio) = open_conversation(&mut caller).await;
    assert_eq!(api.request(a, b).await, json!({"status": "pending"}));

    // The caller's speech-server conversation is closed without a goodbye to the device.
    assert!(
        common::upstream_closed(&upstream, 1).await,
        "the caller's upstream is closed"
    );
    assert!(hears_no(&mut caller, "goodbye", Duration::from_millis(300)).await);

    // The target is woken with the announcement its speech server recognises.
    let wake = wake_up(&target, Duration::from_secs(3))
        .await
        .expect("the target is woken");
    assert_eq!(wake["method"], "tools/call");
    assert_eq!(
        wake["params"]["arguments"],
        json!({"reason": RING, "action": "listen"})
    );

    // While it rings, the caller hears silence, not itself.
    hears_silence(&mut caller_audio).await;
    for i in 100..105 {
        caller_audio
            .send(i * 60, &synthetic_frame(i, 40))
            .await
            .unwrap();
        let heard = caller_audio
            .recv(Duration::from_secs(2))
            .await
            .unwrap()
            .expect("the ringing caller hears something");
        assert_eq!(heard.opus, SILENCE_FRAME, "silence, not its own frame");
    }
    assert!(
        common::eventually(Duration::from_secs(2), || presence(&gw, a)
            == Some(PresenceState::InCall))
        .await
    );
    let record = gw.presence.local(&a.colon()).unwrap();
    assert_eq!(record.call_peer.as_deref(), Some(b.colon().as_str()));
    assert_eq!(record.call_bridged, Some(false));
    assert_eq!(
        record.session_id.as_deref(),
        Some(caller_hello.session_id.as_str())
    );

    // Woken, the target opens a conversation and hands the announcement to its speech
    // server, as the forks that support calling do.
    let (target_hello, mut target_audio) = open_conversation(&mut target).await;
    target
        .publish_json(&json!({
            "session_id": target_hello.session_id,
            "type": "listen",
            "state": "detect",
            "text": wake["params"]["arguments"]["reason"],
        }))
        .await
        .unwrap();
    assert!(
        upstream
            .wait_text(Duration::from_secs(3), |t| t["type"] == "listen"
                && t["text"] == RING)
            .await
            .is_some(),
        "the announcement reaches xiaozhi-server"
    );

    // The user says "接听": manager-api accepts.
    assert_eq!(
        api.accept(b).await,
        json!({"status": "bridged", "peerMac": a.colon()})
    );
    let accepted = caller
        .recv_type("call_accepted", Duration::from_secs(3))
        .await
        .expect("the caller is told");
    assert_eq!(accepted["from"], b.colon());
    assert!(
        common::upstream_closed(&upstream, 2).await,
        "the target's upstream is closed too"
    );
    assert!(hears_no(&mut target, "goodbye", Duration::from_millis(200)).await);
    assert!(
        common::eventually(Duration::from_secs(2), || {
            gw.presence.local(&b.colon()).and_then(|r| r.call_bridged) == Some(true)
                && gw.presence.local(&a.colon()).and_then(|r| r.call_bridged) == Some(true)
        })
        .await,
        "both in the call, bridged"
    );

    // Audio both ways, each datagram sealed under the receiver's own channel.
    first_words(&mut caller_audio, &mut target_audio).await;
    talk(&mut caller_audio, &mut target_audio, 100, 40).await;
    talk(&mut target_audio, &mut caller_audio, 200, 40).await;

    // The status answer says both are talking.
    let ids = [a, b].map(|m| format!("GID_default@@@{m}@@@{m}"));
    let status = api
        .post("/api/devices/status", &json!({"clientIds": ids}))
        .await;
    for id in &ids {
        assert_eq!(
            status[id],
            json!({"isAlive": true, "exists": true, "inConversation": true}),
            "{id}"
        );
    }

    // The caller hangs up: the target hears goodbye with its own session id.
    hang_up(
        &mut caller,
        &caller_hello,
        &mut target,
        &target_hello,
        "the target is hung up",
    )
    .await;
    assert!(hears_no(&mut caller, "goodbye", Duration::from_millis(300)).await);
    assert!(
        common::eventually(Duration::from_secs(3), || presence(&gw, a)
            == Some(PresenceState::Online)
            && presence(&gw, b) == Some(PresenceState::Online))
        .await
    );
    let m = gw.metrics.snapshot();
    assert_eq!(
        (
            m.call_requests_pending,
            m.call_accepts_bridged,
            m.calls_ended_party_left
        ),
        (1, 1, 1)
    );
    // The call's life on the bus, for admins and integrations.
    assert!(common::eventually(Duration::from_secs(3), || events.lock().unwrap().len() >= 3).await);
    let events: Vec<Value> = events
        .lock()
        .unwrap()
        .iter()
        .map(|p| serde_json::from_slice(p).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["call_ringing", "call_bridged", "call_ended"]);
    for e in &events {
        assert_eq!(
            (e["caller"].as_str(), e["target"].as_str()),
            (Some(a.colon().as_str()), Some(b.colon().as_str()))
        );
        assert_eq!(e["call_id"], events[0]["call_id"]);
    }
    assert_eq!(events[2]["cause"], "party_left");
    assert_eq!(events[2]["left"], a.colon());
    // Both devices on this node over UDP: the socket seals each frame straight into the
    // other's channel (a frame or two go through the legs' tasks until the splice is set).
    assert!(m.call_frames_spliced >= 75, "{m:?}");
    assert!(m.call_frames_spliced + m.call_frames_local >= 80, "{m:?}");
    assert!(m.call_frames_silence >= 5);
    assert_eq!(m.call_legs, 0);
    gw.shutdown().await;
}

/// Calls that end from the target's side: its goodbye, its disconnect, and a caller that
/// disconnects; each remaining device hears goodbye with its own session id.
#[tokio::test]
async fn either_side_ends_the_call() {
    let upstream = upstream().await;
    let gw = common::start_with(config_with(&upstream)).await;
    let api = ManagerApi::of(gw.addrs.http);
    let (a, b) = (common::mac(11), common::mac(12));
    let mut caller = callable_device(gw.addrs.mqtt, 11).await;
    let mut target = callable_device(gw.addrs.mqtt, 12).await;

    // 1. The target hangs up.
    let (caller_hello, _caller_audio) = open_conversation(&mut caller).await;
    assert_eq!(api.request(a, b).await["status"], "pending");
    let (target_hello, _target_audio) = open_conversation(&mut target).await;
    assert_eq!(api.accept(b).await["status"], "bridged");
    hang_up(
        &mut target,
        &target_hello,
        &mut caller,
        &caller_hello,
        "the caller is hung up",
    )
    .await;

    // 2. The target disconnects.
    let (caller_hello, _caller_audio) = open_conversation(&mut caller).await;
    assert_eq!(api.request(a, b).await["status"], "pending");
    let (_, _target_audio) = open_conversation(&mut target).await;
    assert_eq!(api.accept(b).await["status"], "bridged");
    target.vanish().await;
    let goodbye = caller
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .expect("the caller is hung up");
    assert_eq!(goodbye["session_id"], caller_hello.session_id.as_str());

    // 3. While it rings, the rung target leaving ends the call too.
    let mut target = callable_device(gw.addrs.mqtt, 12).await;
    let (caller_hello, _caller_audio) = open_conversation(&mut caller).await;
    assert_eq!(api.request(a, b).await["status"], "pending");
    assert!(wake_up(&target, Duration::from_secs(3)).await.is_some());
    let (target_hello, _target_audio) = open_conversation(&mut target).await;
    hang_up(
        &mut target,
        &target_hello,
        &mut caller,
        &caller_hello,
        "the caller is told the call is over",
    )
    .await;
    assert_eq!(
        api.accept(b).await,
        json!({"status": "caller_gone", "message": "主叫方已离开或通话已超时"})
    );

    // 4. The caller disconnects from a bridged call.
    let (_, _caller_audio) = open_conversation(&mut caller).await;
    assert_eq!(api.request(a, b).await["status"], "pending");
    let (target_hello, _target_audio) = open_conversation(&mut target).await;
    assert_eq!(api.accept(b).await["status"], "bridged");
    caller.vanish().await;
    let goodbye = target
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .expect("the target is hung up");
    assert_eq!(goodbye["session_id"], target_hello.session_id.as_str());
    assert!(
        common::eventually(Duration::from_secs(3), || gw.metrics.snapshot().call_legs
            == 0)
        .await
    );
    assert_eq!(gw.metrics.snapshot().calls_ended_party_left, 4);
    gw.shutdown().await;
}

/// Every refusal, with the Node gateway's statuses, messages and HTTP codes.
#[tokio::test]
async fn offline_busy_crossing_and_bad_requests() {
    let upstream = upstream().await;
    let gw = common::start_with(config_with(&upstream)).await;
    let api = ManagerApi::of(gw.addrs.http);
    let (a, b, c, d) = (
        common::mac(21),
        common::mac(22),
        common::mac(23),
        common::mac(24),
    );
    let mut dev_a = callable_device(gw.addrs.mqtt, 21).await;
    let mut dev_b = callable_device(gw.addrs.mqtt, 22).await;
    let mut dev_c = callable_device(gw.addrs.mqtt, 23).await;
    let (_, _audio_a) = open_conversation(&mut dev_a).await;
    let (_, _audio_b) = open_conversation(&mut dev_b).await;
    let (_, _audio_c) = open_conversation(&mut dev_c).await;

    // A target that is not connected; a caller that is not.
    assert_eq!(
        api.request(a, d).await,
        json!({"status": "offline", "message": "对方设备不在线，请稍后重试"})
    );
    assert_eq!(
        api.request(d, a).await,
        json!({"status": "error", "message": "主叫设备不在线"})
    );
    assert_eq!(
        api.accept(d).await,
        json!({"status": "offline", "message": "接听设备不在线"})
    );
    assert_eq!(
        api.accept(a).await,
        json!({"status": "no_pending", "message": "没有等待中的通话"})
    );

    // Two devices calling each other at once are bridged at once.
    assert_eq!(api.request(a, b).await["status"], "pending");
    assert_eq!(api.request(b, a).await, json!({"status": "bridged"}));
    let mut a_hears = Vec::new();
    assert!(
        common::eventually(Duration::from_secs(3), || {
            a_hears = [a, b]
                .iter()
                .filter_map(|m| gw.presence.local(&m.colon()))
                .filter(|r| r.call_bridged == Some(true))
                .map(|r| r.mac_address)
                .collect();
            a_hears.len() == 2
        })
        .await,
        "both legs bridged: {a_hears:?}"
    );

    // Busy: a device in a call can neither be called nor call.
    for (from, to) in [(c, a), (a, c)] {
        assert_eq!(
            api.request(from, to).await,
            json!({"status": "error", "message": "设备已在通话中"})
        );
    }
    // A device already ringing someone, or being rung, is refused another call.
    let e = common::mac(25);
    let mut dev_e = callable_device(gw.addrs.mqtt, 25).await;
    let (_, _audio_e) = open_conversation(&mut dev_e).await;
    assert_eq!(api.request(c, e).await["status"], "pending");
    assert_eq!(
        api.request(e, c).await["status"],
        "bridged",
        "crossing, not busy"
    );
    let f = common::mac(26);
    let mut dev_f = callable_device(gw.addrs.mqtt, 26).await;
    let (_, _audio_f) = open_conversation(&mut dev_f).await;
    let g = common::mac(27);
    let mut dev_g = callable_device(gw.addrs.mqtt, 27).await;
    let (_, _audio_g) = open_conversation(&mut dev_g).await;
    assert_eq!(api.request(f, g).await["status"], "pending");
    let busy = json!({"status": "error", "message": "设备已有等待中的通话"});
    assert_eq!(api.request(f, a).await["status"], "error");
    let mut dev_h = callable_device(gw.addrs.mqtt, 28).await;
    let (_, _audio_h) = open_conversation(&mut dev_h).await;
    assert_eq!(api.request(common::mac(28), g).await, busy);
    assert_eq!(api.request(common::mac(28), f).await, busy);
    assert_eq!(
        api.request(f, f).await,
        json!({"status": "error", "message": "呼叫设备参数无效"})
    );
    assert_eq!(
        api.post(
            "/api/call/request",
            &json!({"caller_mac": "nope", "target_mac": a.colon()})
        )
        .await,
        json!({"status": "error", "message": "呼叫设备参数无效"})
    );

    // Malformed bodies are 400, as the Node gateway answers them.
    for (path, body) in [
        ("/api/call/request", json!({"caller_mac": a.colon()})),
        ("/api/call/request", json!({"target_mac": a.colon()})),
        ("/api/call/request", json!([1, 2])),
        ("/api/call/accept", json!({})),
        ("/api/call/accept", json!({"mac": ""})),
    ] {
        let (status, answer) = api.post_with(path, &ManagerApi::token(), &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert!(answer["error"].is_string(), "{answer}");
        assert_eq!(answer["status"], "error");
    }
    // Without the day's token nothing is decided.
    let (status, _) = api
        .post_with(
            "/api/call/request",
            "not-the-token",
            &json!({"caller_mac": a.colon(), "target_mac": b.colon()}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let m = gw.metrics.snapshot();
    assert_eq!(m.call_requests_offline, 1);
    assert!(m.call_requests_error >= 7, "{}", m.call_requests_error);
    assert_eq!(m.call_requests_bridged, 2);
    gw.shutdown().await;
}

/// Nobody answers: after `calls.ring_timeout_secs` the caller hears goodbye with its own
/// session id, and a late accept is told the caller is gone.
#[tokio::test]
async fn an_unanswered_call_rings_out() {
    let upstream = upstream().await;
    let mut config = config_with(&upstream);
    config.calls.ring_timeout_secs = 1;
    let gw = common::start_with(config).await;
    let api = ManagerApi::of(gw.addrs.http);
    let (a, b) = (common::mac(31), common::mac(32));
    let mut caller = callable_device(gw.addrs.mqtt, 31).await;
    let _target = callable_device(gw.addrs.mqtt, 32).await;
    let (hello, _audio) = open_conversation(&mut caller).await;
    assert_eq!(api.request(a, b).await["status"], "pending");
    let goodbye = caller
        .recv_type("goodbye", Duration::from_secs(5))
        .await
        .expect("the caller gives up");
    assert_eq!(goodbye["session_id"], hello.session_id.as_str());
    assert_eq!(api.accept(b).await["status"], "caller_gone");
    assert_eq!(gw.metrics.snapshot().calls_ended_ring_timeout, 1);
    gw.shutdown().await;
}

/// A target whose firmware cannot be woken (stock firmware: no `self.remote_wakeup`) is
/// still rung; the failed wake-up is counted and logged, and the call rings out.
#[tokio::test]
async fn a_target_without_the_wake_up_tool_is_counted() {
    let upstream = upstream().await;
    let gw = common::start_with(config_with(&upstream)).await;
    let api = ManagerApi::of(gw.addrs.http);
    let mut caller = callable_device(gw.addrs.mqtt, 41).await;
    let _stock = common::device(&gw, 42).await;
    let (_, _audio) = open_conversation(&mut caller).await;
    assert_eq!(
        api.request(common::mac(41), common::mac(42)).await["status"],
        "pending"
    );
    assert!(
        common::eventually(Duration::from_secs(3), || gw
            .metrics
            .snapshot()
            .call_wakes_failed
            == 1)
        .await
    );
    gw.shutdown().await;
}

/// Scale-out: the caller on one node, the target on another, the book in Redis and the
/// audio between the nodes over Mosquitto. manager-api may post to either node.
#[tokio::test]
async fn a_call_between_devices_on_two_nodes() {
    let redis_port = common::free_port();
    let _redis = common::start_redis(redis_port).await;
    let broker_port = common::free_port();
    let _mosquitto = common::start_mosquitto(broker_port).await;
    let upstream = upstream().await;
    let node = |id: &str| {
        let mut c = config_with(&upstream);
        c.node.id = id.into();
        c.bus.mode = BusMode::External;
        c.bus.url = format!("mqtt://127.0.0.1:{broker_port}");
        c.presence.redis_url = Some(format!("redis://127.0.0.1:{redis_port}/0"));
        c
    };
    let gw_a = common::start_with(node("gw-a")).await;
    let gw_b = common::start_with(node("gw-b")).await;
    let (a, b) = (common::mac(51), common::mac(52));
    let mut caller = callable_device(gw_a.addrs.mqtt, 51).await;
    let mut target = callable_device(gw_b.addrs.mqtt, 52).await;
    // Presence in Redis says where each device is (the nodes ask it).
    for (gw, mac) in [(&gw_a, a), (&gw_b, b)] {
        let store = gw.presence.store().clone();
        let colon = mac.colon();
        let mut found = false;
        for _ in 0..300 {
            if store.get(&colon).await.ok().flatten().is_some() {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(found, "{mac} in Redis");
    }

    // A client of the bus that listens to the call audio between the nodes.
    let overheard = listen_on_bus(broker_port, None, "xiaozhi/nodes/+/call-audio/#").await;

    let (caller_hello, mut caller_audio) = open_conversation(&mut caller).await;
    // Posted to the target's node, which holds neither the caller nor its conversation.
    let via_b = ManagerApi::of(gw_b.addrs.http);
    let via_a = ManagerApi::of(gw_a.addrs.http);
    assert_eq!(via_b.request(a, b).await, json!({"status": "pending"}));
    let wake = wake_up(&target, Duration::from_secs(3))
        .await
        .expect("the target on the other node is woken");
    assert_eq!(wake["params"]["arguments"]["reason"], RING);
    hears_silence(&mut caller_audio).await;

    let (target_hello, mut target_audio) = open_conversation(&mut target).await;
    // Accepted through the caller's node.
    assert_eq!(
        via_a.accept(b).await,
        json!({"status": "bridged", "peerMac": a.colon()})
    );
    let accepted = caller
        .recv_type("call_accepted", Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(accepted["from"], b.colon());
    assert!(
        common::eventually(Duration::from_secs(3), || {
            gw_a.presence.local(&a.colon()).and_then(|r| r.call_bridged) == Some(true)
                && gw_b.presence.local(&b.colon()).and_then(|r| r.call_bridged) == Some(true)
        })
        .await
    );
    first_words(&mut caller_audio, &mut target_audio).await;
    talk(&mut caller_audio, &mut target_audio, 300, 30).await;
    talk(&mut target_audio, &mut caller_audio, 400, 30).await;
    assert!(gw_a.metrics.snapshot().call_frames_remote_out >= 30);
    assert!(gw_b.metrics.snapshot().call_frames_remote_in >= 30);
    // On the bus the audio is sealed under the call's key: no frame travels in clear.
    let heard = overheard.lock().unwrap().clone();
    assert!(heard.len() >= 60, "{} frames overheard", heard.len());
    for i in (300..330).chain(400..430) {
        let frame = synthetic_frame(i, 20 + (i as usize % 60));
        assert!(
            !heard
                .iter()
                .any(|p| p.windows(frame.len()).any(|w| w == frame)),
            "frame {i} crossed the bus in clear"
        );
    }

    // The target hangs up on its node; the caller on the other hears goodbye.
    hang_up(
        &mut target,
        &target_hello,
        &mut caller,
        &caller_hello,
        "hung up across nodes",
    )
    .await;
    gw_a.shutdown().await;
    gw_b.shutdown().await;
}

/// A device on the QUIC extension calls one on AES-GCM over UDP: no splice is possible
/// (the QUIC channel's downlink is not the UDP socket's), so the audio goes through the
/// two legs' tasks, and still arrives byte-exact both ways under each transport's rules.
#[tokio::test]
async fn a_quic_device_and_a_gcm_device_talk_through_their_legs() {
    use xiaozhi_tools::simulator::audio::{SimLink, Transport};
    let upstream = upstream().await;
    let mut config = config_with(&upstream);
    config.quic.enabled = true;
    config.quic.listen = ([127, 0, 0, 1], 0).into();
    let gw = common::start_with(config).await;
    let api = ManagerApi::of(gw.addrs.http);
    let (a, b) = (common::mac(61), common::mac(62));
    let mut caller = callable_device(gw.addrs.mqtt, 61).await;
    let mut target = callable_device(gw.addrs.mqtt, 62).await;
    let open = async |dev: &mut SimDevice, transport: Transport| {
        dev.publish_json(&transport.hello()).await.unwrap();
        let raw = dev
            .recv_type("hello", Duration::from_secs(5))
            .await
            .unwrap();
        let hello = ServerHello::parse(&raw).unwrap();
        assert_eq!(hello.transport(), transport);
        SimLink::open(&hello, ([127, 0, 0, 1], 0).into())
            .await
            .unwrap()
    };
    let mut caller_link = open(&mut caller, Transport::Quic).await;
    let mut target_link = open(&mut target, Transport::Gcm).await;
    assert_eq!(api.request(a, b).await["status"], "pending");
    assert_eq!(api.accept(b).await["status"], "bridged");
    assert!(
        common::eventually(Duration::from_secs(3), || gw
            .presence
            .local(&b.colon())
            .and_then(|r| r.call_bridged)
            == Some(true))
        .await
    );
    // The GCM side speaks first (its address becomes known), then both ways.
    let first = synthetic_frame(5_000, 30);
    target_link.send(0, &first).await.unwrap();
    loop {
        let heard = caller_link
            .recv(Duration::from_secs(3))
            .await
            .unwrap()
            .expect("the target's first words");
        if heard.opus == first {
            break;
        }
        assert_eq!(heard.opus, SILENCE_FRAME, "only silence before it");
    }
    for (from, to, base) in [(0, 1, 600u32), (1, 0, 700)] {
        for i in base..base + 20 {
            let frame = synthetic_frame(i, 25 + (i as usize % 40));
            let (tx, rx) = if from == 0 {
                (&mut caller_link, &mut target_link)
            } else {
                (&mut target_link, &mut caller_link)
            };
            tx.send(i * 60, &frame).await.unwrap();
            let got = rx
                .recv(Duration::from_secs(3))
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("frame {i} ({from} -> {to})"));
            assert_eq!(got.opus, frame);
        }
    }
    assert_eq!(caller_link.rejected(), 0);
    assert_eq!(target_link.rejected(), 0);
    let m = gw.metrics.snapshot();
    assert_eq!(
        m.call_frames_spliced, 0,
        "nothing to splice into a QUIC channel"
    );
    assert!(m.call_frames_local >= 41, "{m:?}");
    gw.shutdown().await;
}
