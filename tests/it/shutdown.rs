//! Graceful shutdown: live conversations get a goodbye before the gateway stops.

use crate::common;

use std::time::Duration;

#[tokio::test]
async fn shutdown_says_goodbye_to_live_sessions() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 70).await;
    let (hello, _audio) = common::conversation(&mut dev).await;
    let t0 = tokio::time::Instant::now();
    gw.shutdown().await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let bye = dev
        .recv_type("goodbye", Duration::from_secs(1))
        .await
        .expect("goodbye before close");
    assert_eq!(bye["session_id"], hello.session_id.as_str());
    assert!(dev.closed(Duration::from_secs(1)).await);
}

#[tokio::test]
async fn idle_conversation_ends_with_a_goodbye() {
    let mut config = common::test_config();
    config.udp.idle_timeout_secs = 1;
    let gw = common::start_with(config).await;
    let mut dev = common::device(&gw, 71).await;
    let (hello, _audio) = common::conversation(&mut dev).await;
    let bye = dev
        .recv_type("goodbye", Duration::from_secs(4))
        .await
        .expect("goodbye after idle");
    assert_eq!(bye["session_id"], hello.session_id.as_str());
    assert!(
        common::eventually(Duration::from_secs(1), || gw
            .metrics
            .snapshot()
            .sessions_live
            == 0)
        .await
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn disconnect_ends_the_session() {
    let gw = common::start().await;
    let mut dev = common::device(&gw, 72).await;
    let _ = common::conversation(&mut dev).await;
    assert_eq!(gw.metrics.snapshot().sessions_live, 1);
    dev.disconnect().await;
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .sessions_live
            == 0)
        .await
    );
    gw.shutdown().await;
}
