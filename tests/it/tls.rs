//! Device MQTT over TLS: a firmware-style device completes a conversation through the
//! TLS listener, and a client that opens TCP and never sends a ClientHello neither
//! delays other devices nor stays connected past the handshake timeout.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::audio::{frame_index, synthetic_frame};
use xiaozhi_tools::simulator::device::SimDevice;

struct TlsGateway {
    gw: Gateway,
    connector: TlsConnector,
    /// The certificate the gateway started with.
    cert_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// A gateway whose TLS listener uses a fresh self-signed certificate for `localhost`,
/// and a client connector that trusts exactly that certificate.
async fn start_tls(handshake_timeout_secs: u64) -> TlsGateway {
    let dir = tempfile::tempdir().unwrap();
    let (certified, cert_path, key_path) = write_self_signed(dir.path(), "server");

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
        cert_der: certified.cert.der().to_vec(),
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

/// Writes a fresh self-signed `localhost` certificate and its key as `<name>.pem` and
/// `<name>.key` in `dir`.
fn write_self_signed(
    dir: &std::path::Path,
    name: &str,
) -> (
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    (certified, cert_path, key_path)
}

/// A TCP connection that starts a TLS handshake and stalls: the first bytes of a
/// ClientHello record, then nothing.
async fn stalled_tls(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_silent_and_stalled_clients_do_not_stop_devices_plain_or_tls() {
    let t = start_tls(30).await;
    let plain = t.gw.addrs.mqtt;
    let tls = t.gw.addrs.mqtt_tls.unwrap();
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(TcpStream::connect(plain).await.unwrap());
        held.push(stalled_tls(tls).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let plain_dev = common::device(&t.gw, 82).await;
    let plain_took = started.elapsed();
    let started = Instant::now();
    let mut tls_dev = tls_device(&t, 83).await;
    let tls_took = started.elapsed();
    println!(
        "with 200 silent + 200 stalled TLS: plain device {plain_took:?}, TLS device {tls_took:?}"
    );
    assert!(
        plain_took < Duration::from_secs(1),
        "plain device took {plain_took:?}"
    );
    assert!(
        tls_took < Duration::from_secs(1),
        "TLS device took {tls_took:?}"
    );
    let (hello, _audio) = common::conversation(&mut tls_dev).await;
    assert!(!hello.session_id.is_empty());
    // None of the 400 got anywhere.
    assert_eq!(t.gw.metrics.snapshot().device_connects, 2);
    drop(held);
    plain_dev.disconnect().await;
    t.gw.shutdown().await;
}

fn client_trusting(cert_der: &[u8]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(cert_der.to_vec().into()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(client))
}

async fn handshake_ok(connector: &TlsConnector, addr: std::net::SocketAddr) -> bool {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .is_ok()
}

/// Writes a fresh self-signed `localhost` certificate over the gateway's files; returns
/// its DER.
fn renew(t: &TlsGateway) -> Vec<u8> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    // Key first, then certificate, as a renewal tool might: the watcher may see the
    // pair half-written once and must then pick up the whole pair.
    std::fs::write(
        t._dir.path().join("server.key"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(t._dir.path().join("server.pem"), certified.cert.pem()).unwrap();
    certified.cert.der().to_vec()
}

#[tokio::test]
async fn the_certificate_reloads_on_sighup_and_on_file_change_without_dropping_devices() {
    use tokio::signal::unix::{SignalKind, signal};
    // Hold a SIGHUP listener of our own, so the signal can never take the test process
    // down before the gateway's watcher has registered.
    let _hangup = signal(SignalKind::hangup()).unwrap();
    let t = start_tls(5).await;
    let addr = t.gw.addrs.mqtt_tls.unwrap();
    let mut dev = tls_device(&t, 84).await;

    // SIGHUP: new handshakes get the new certificate; the connected device stays.
    let second = renew(&t);
    unsafe {
        libc::kill(libc::getpid(), libc::SIGHUP);
    }
    let trusts_second = client_trusting(&second);
    let mut ok = false;
    for _ in 0..40 {
        if handshake_ok(&trusts_second, addr).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the renewed certificate is served after SIGHUP");
    // A fresh client (no session to resume) that trusts only the old certificate.
    assert!(
        !handshake_ok(&client_trusting(&t.cert_der), addr).await,
        "the old one is not"
    );
    assert!(t.gw.metrics.snapshot().tls_reloads >= 1);
    let (hello, _audio) = common::conversation(&mut dev).await;
    assert!(
        !hello.session_id.is_empty(),
        "the device connected before kept going"
    );

    // A file change alone (certbot renewing in place) is picked up within the watch
    // interval.
    let third = renew(&t);
    let trusts_third = client_trusting(&third);
    let started = Instant::now();
    let mut ok = false;
    while started.elapsed() < xiaozhi_gateway::tls::WATCH_INTERVAL + Duration::from_secs(3) {
        if handshake_ok(&trusts_third, addr).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the certificate written to disk is served");

    // A broken file: the reload fails, is counted, and the last good one stays.
    std::fs::write(t._dir.path().join("server.pem"), "not a certificate").unwrap();
    unsafe {
        libc::kill(libc::getpid(), libc::SIGHUP);
    }
    assert!(
        common::eventually(Duration::from_secs(3), || t
            .gw
            .metrics
            .snapshot()
            .tls_reload_failures
            >= 1)
        .await
    );
    assert!(handshake_ok(&trusts_third, addr).await);
    t.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_listener_serves_tls_and_stalled_handshakes_delay_no_one() {
    use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
    let dir = tempfile::tempdir().unwrap();
    let (certified, cert_path, key_path) = write_self_signed(dir.path(), "broker");
    let mut config = common::test_config();
    config.broker.tls_listen = "127.0.0.1:0".parse().unwrap();
    config.broker.tls_cert = Some(cert_path);
    config.broker.tls_key = Some(key_path);
    config.broker.tls_handshake_timeout_secs = 1;
    let gw = common::start_with(config).await;
    let addr = gw.addrs.broker_tls.expect("broker TLS listener");

    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(stalled_tls(addr).await);
    }
    let connector = client_trusting(certified.cert.der());
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the broker listener");
    let mut connect = Connect::new("tls-admin");
    connect.login = Some(Login::new(common::ADMIN_USER, common::ADMIN_PASS));
    let mut out = bytes::BytesMut::new();
    connect.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut buf = bytes::BytesMut::with_capacity(64);
    let ack = loop {
        match Packet::read(&mut buf, 1024) {
            Ok(Packet::ConnAck(ack)) => break ack,
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(_) => {
                let n = tokio::time::timeout(Duration::from_secs(2), tls.read_buf(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed before CONNACK");
            }
        }
    };
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "admin client over TLS took {took:?}"
    );

    // The stalled ones are closed at the handshake timeout and counted.
    for mut s in stalled {
        let mut b = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(4), s.read(&mut b))
            .await
            .expect("closed by the gateway");
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    assert!(gw.metrics.snapshot().broker_connections_timed_out >= 100);
    gw.shutdown().await;
}
