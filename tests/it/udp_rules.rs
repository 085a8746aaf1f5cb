//! The UDP channel's defences, over real sockets: hijack, replay and malformed datagrams
//! are dropped and counted, and never move the downlink.

use crate::common;

use std::time::Duration;

use tokio::net::UdpSocket;
use xiaozhi_gateway::protocol::cipher::PacketCipher;
use xiaozhi_gateway::protocol::datagram::Header;
use xiaozhi_tools::simulator::audio::{frame_index, synthetic_frame};

#[tokio::test]
async fn hijack_attempts_do_not_move_the_downlink() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 40).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();
    audio.send(0, &synthetic_frame(0, 40)).await.unwrap();
    assert_eq!(
        frame_index(
            &audio
                .recv(Duration::from_secs(2))
                .await
                .unwrap()
                .unwrap()
                .opus
        ),
        Some(0)
    );

    // An attacker who learned the connection id (but not the key) sends from another
    // socket: a fresh sequence, garbage payload.
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let wrong_key = PacketCipher::new(&[0x42; 16]);
    for seq in [2u32, 3, 50, 1_000_000] {
        let header = Header {
            flags: 0,
            payload_len: 40,
            connection_id: hello.connection_id(),
            timestamp: 0,
            sequence: seq,
        }
        .to_bytes();
        let mut payload = synthetic_frame(900 + seq, 40);
        wrong_key.apply(&header, &mut payload);
        let mut d = header.to_vec();
        d.extend_from_slice(&payload);
        attacker.send_to(&d, gw.addrs.udp).await.unwrap();
    }
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .udp_drop_hijack
            == 4)
        .await,
        "{:?}",
        gw.metrics.snapshot()
    );

    // The device keeps talking and keeps hearing itself; the attacker hears nothing.
    audio.send(60, &synthetic_frame(1, 40)).await.unwrap();
    assert_eq!(
        frame_index(
            &audio
                .recv(Duration::from_secs(2))
                .await
                .unwrap()
                .unwrap()
                .opus
        ),
        Some(1)
    );
    let mut buf = [0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), attacker.recv_from(&mut buf))
            .await
            .is_err(),
        "attacker got downlink audio"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn replayed_truncated_oversized_and_wrong_type_datagrams_are_dropped_and_counted() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 41).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();

    let first = audio.seal(0, &synthetic_frame(0, 40));
    audio.socket.send(&first).await.unwrap();
    assert!(audio.recv(Duration::from_secs(2)).await.unwrap().is_some());

    // Replay: the same datagram again, from the same address.
    audio.socket.send(&first).await.unwrap();
    // Truncated: shorter than the header, and shorter than its declared length.
    audio.socket.send(&first[..10]).await.unwrap();
    let second = audio.seal(60, &synthetic_frame(1, 40));
    audio.socket.send(&second[..30]).await.unwrap();
    // Oversized: larger than any audio datagram.
    let mut big = vec![1u8; 3000];
    big[4..8].copy_from_slice(&hello.connection_id().to_be_bytes());
    audio.socket.send(&big).await.unwrap();
    // Wrong type byte.
    let mut wrong_type = audio.seal(120, &synthetic_frame(2, 40));
    wrong_type[0] = 2;
    audio.socket.send(&wrong_type).await.unwrap();
    // Unknown connection id.
    let mut unknown = audio.seal(180, &synthetic_frame(3, 40));
    unknown[4..8].copy_from_slice(&(hello.connection_id() ^ 1).to_be_bytes());
    audio.socket.send(&unknown).await.unwrap();

    let ok = common::eventually(Duration::from_secs(2), || {
        let m = gw.metrics.snapshot();
        m.udp_drop_replay == 1 && m.udp_drop_malformed == 4 && m.udp_drop_unknown_id == 1
    })
    .await;
    assert!(ok, "{:?}", gw.metrics.snapshot());
    // None of it was echoed; the channel still works.
    assert!(
        audio
            .recv(Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    audio.send(240, &synthetic_frame(4, 40)).await.unwrap();
    assert_eq!(
        frame_index(
            &audio
                .recv(Duration::from_secs(2))
                .await
                .unwrap()
                .unwrap()
                .opus
        ),
        Some(4)
    );
    gw.shutdown().await;
}
