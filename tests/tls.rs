//! Device MQTT over TLS: a firmware-style device completes a conversation through the
//! TLS listener, and a client that opens TCP and never sends a ClientHello neither
//! delays other devices nor stays connected past the handshake timeout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use xiaozhi_gateway::server::Gateway;
use xiaozhi_gateway::simulator::audio::{frame_index, synthetic_frame};
use xiaozhi_gateway::simulator::device::SimDevice;

struct TlsGateway {
    gw: Gateway,
    connector: TlsConnector,
    _dir: tempfile::TempDir,
}

/// A gateway whose TLS listener uses a fresh self-signed certificate for `localhost`,
/// and a client connector that trusts exactly that certificate.
async fn start_tls(handshake_timeout_secs: u64) -> TlsGateway {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("server.pem");
    let key_path = dir.path().join("server.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();

    let mut config = common::test_config();
    config.mqtt.tls_cert = Some(cert_path);
    config.mqtt.tls_key = Some(key_path);
    config.mqtt.tls_handshake_timeout_secs = handshake_timeout_secs;
    let gw = common::start_with(config).await;

    let mut roots = RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsGateway {
        gw,
        connector: TlsConnector::from(Arc::new(client)),
        _dir: dir,
    }
}

async fn tls_device(t: &TlsGateway, n: u32) -> SimDevice {
    let addr =
        t.gw.addrs
            .mqtt_tls
            .expect("TLS listener is up when a cert and key are set");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = t
        .connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    SimDevice::connect_over(Box::new(tls), common::creds(n), 240)
        .await
        .expect("MQTT over TLS")
}

#[tokio::test]
async fn a_device_holds_a_conversation_over_tls() {
    let t = start_tls(5).await;
    let mut dev = tls_device(&t, 80).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();
    for i in 0..5u32 {
        audio.send(i * 60, &synthetic_frame(i, 40)).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        let frame = audio
            .recv(Duration::from_secs(3))
            .await
            .unwrap()
            .expect("echoed frame");
        got.push(frame_index(&frame.opus).unwrap());
    }
    assert_eq!(got, (0..5).collect::<Vec<_>>());
    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    t.gw.shutdown().await;
}

#[tokio::test]
async fn a_silent_tls_client_delays_no_one_and_is_dropped_after_the_timeout() {
    let t = start_tls(1).await;
    let addr = t.gw.addrs.mqtt_tls.unwrap();
    // Several clients that open TCP and never say anything.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // A real device still gets through at once.
    let started = Instant::now();
    let mut dev = tls_device(&t, 81).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "device delayed by silent clients: {:?}",
        started.elapsed()
    );
    let (_hello, _audio) = common::conversation(&mut dev).await;

    // Each silent client is closed once the handshake timeout passes.
    for mut s in silent {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed by the gateway");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "silent client got data: {read:?}"
        );
    }
    let timed_out = t.gw.metrics.snapshot().connections_timed_out;
    assert!(timed_out >= 8, "timeouts counted: {timed_out}");
    t.gw.shutdown().await;
}
