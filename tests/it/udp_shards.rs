//! The audio port served by several sockets (`udp.shards`): the kernel steers each
//! datagram to the shard that holds its channel, so every device's audio round-trips
//! whichever shard it lands on, and the work is spread over all of them.

use crate::common;

use std::time::Duration;

use xiaozhi_tools::simulator::audio::{frame_index, synthetic_frame};

const SHARDS: usize = 4;
const DEVICES: u32 = 8;
const FRAMES: u32 = 30;

#[tokio::test]
async fn every_shard_serves_its_own_channels() {
    let mut config = common::test_config();
    config.udp.shards = SHARDS;
    let gw = common::start_with(config).await;

    let mut devices = Vec::new();
    for n in 0..DEVICES {
        let mut dev = common::device(&gw, 300 + n).await;
        let (hello, audio) = common::conversation(&mut dev).await;
        dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
            .await
            .unwrap();
        devices.push((dev, audio));
    }
    for (_, audio) in &mut devices {
        for i in 0..FRAMES {
            audio.send(i * 60, &synthetic_frame(i, 60)).await.unwrap();
        }
    }
    for (n, (_, audio)) in devices.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < FRAMES as usize {
            match audio.recv(Duration::from_secs(3)).await.unwrap() {
                Some(frame) => got.push(frame_index(&frame.opus).unwrap()),
                None => break,
            }
        }
        assert_eq!(
            got,
            (0..FRAMES).collect::<Vec<_>>(),
            "device {n}: every frame echoed, in order"
        );
        assert_eq!(audio.rejected, 0);
    }

    let m = gw.metrics.snapshot();
    assert_eq!(
        m.udp_drop_unknown_id, 0,
        "no datagram reached a shard without its channel"
    );
    assert_eq!(m.udp_rx_datagrams, u64::from(DEVICES * FRAMES));
    // Channels go to the shards in turn: each took two devices' datagrams.
    let per_shard: Vec<u64> = (0..SHARDS)
        .map(|i| {
            gw.metrics
                .udp_shards
                .datagrams
                .with_label_values(&[i.to_string().as_str()])
                .get()
        })
        .collect();
    assert_eq!(
        per_shard,
        vec![u64::from(DEVICES * FRAMES) / SHARDS as u64; SHARDS],
        "datagrams per shard"
    );
    // The split is exported.
    let text = xiaozhi_gateway::metrics::exposition::render(&gw.metrics);
    for (i, datagrams) in per_shard.iter().enumerate() {
        let line = format!("xiaozhi_udp_shard_datagrams_total{{shard=\"{i}\"}} {datagrams}");
        assert!(text.contains(&line), "{line} in /metrics");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_busy_audio_port_fails_the_start_with_the_setting_to_change() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = common::test_config();
    config.udp.listen = taken.local_addr().unwrap();
    config.udp.shards = 2;
    let err = match xiaozhi_gateway::server::Gateway::start(config).await {
        Ok(_) => panic!("the gateway started on a busy port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("udp.listen"), "{err}");
    assert!(err.contains("XZ_UDP__LISTEN"), "{err}");
}
