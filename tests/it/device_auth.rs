//! Device credentials on the device port and the separation between device and broker
//! credentials.

use crate::common;

use std::time::Duration;

use rumqttc::mqttbytes::v4::ConnectReturnCode;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
use xiaozhi_gateway::protocol::credentials::username_for_ip;
use xiaozhi_tools::simulator::device::{DeviceCredentials, SimDevice, SimError};

#[tokio::test]
async fn protocol_vector_credentials_are_accepted() {
    let gw = common::start().await;
    // PROTOCOL.md section 2 test vector, verbatim.
    let creds = DeviceCredentials {
        client_id: "GID_test@@@aa_bb_cc_dd_ee_ff@@@aa_bb_cc_dd_ee_ff".into(),
        username: "eyJpcCI6IjE5Mi4wLjIuMTAifQ==".into(),
        password: "FfwPIt7TJgChnLuZz6sXpMkd1uSjj3fB8msdP5us6fk=".into(),
        mac: "aa_bb_cc_dd_ee_ff".parse().unwrap(),
    };
    let dev = SimDevice::connect(gw.addrs.mqtt, creds)
        .await
        .expect("vector accepted");
    assert!(
        common::eventually(Duration::from_secs(2), || gw
            .metrics
            .snapshot()
            .devices_connected
            == 1)
        .await
    );
    dev.disconnect().await;
    gw.shutdown().await;
}

async fn refused_with(
    gw: &xiaozhi_gateway::server::Gateway,
    creds: DeviceCredentials,
) -> ConnectReturnCode {
    match SimDevice::connect(gw.addrs.mqtt, creds).await {
        Err(SimError::Refused(code)) => code,
        Err(e) => panic!("expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }
}

#[tokio::test]
async fn bad_credentials_get_the_right_connack_code() {
    let gw = common::start().await;
    let good = common::creds(1);

    let wrong_password = DeviceCredentials {
        password: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
        ..good.clone()
    };
    assert_eq!(
        refused_with(&gw, wrong_password).await,
        ConnectReturnCode::BadUserNamePassword
    );

    // The Node gateway's unsigned two-part client id.
    let two_part = DeviceCredentials {
        client_id: format!("GID_test@@@{}", good.mac),
        ..good.clone()
    };
    assert_eq!(
        refused_with(&gw, two_part).await,
        ConnectReturnCode::BadClientId
    );

    let garbage_username = DeviceCredentials {
        username: "!!not base64 json!!".into(),
        ..good.clone()
    };
    assert_eq!(
        refused_with(&gw, garbage_username).await,
        ConnectReturnCode::BadUserNamePassword
    );

    let empty_password = DeviceCredentials {
        password: String::new(),
        ..good.clone()
    };
    assert_eq!(
        refused_with(&gw, empty_password).await,
        ConnectReturnCode::BadUserNamePassword
    );

    // A password signed for another username is refused too.
    let other_user = DeviceCredentials {
        username: username_for_ip("203.0.113.9"),
        ..good.clone()
    };
    assert_eq!(
        refused_with(&gw, other_user).await,
        ConnectReturnCode::BadUserNamePassword
    );

    let m = gw.metrics.snapshot();
    assert_eq!(m.auth_failed_signature, 2);
    assert_eq!(m.auth_failed_client_id, 1);
    assert_eq!(m.auth_failed_credentials, 2);
    assert_eq!(m.devices_connected, 0);
    // The good credentials still work afterwards.
    common::device(&gw, 1).await.disconnect().await;
    gw.shutdown().await;
}

async fn rumqttc_connack(
    addr: std::net::SocketAddr,
    client_id: &str,
    user: &str,
    pass: &str,
) -> Result<(), String> {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(30));
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack))))
                if ack.code == ConnectReturnCode::Success =>
            {
                return Ok(());
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => return Err(format!("{:?}", ack.code)),
            Ok(Ok(_)) => continue,
            Ok(Err(ConnectionError::ConnectionRefused(code))) => return Err(format!("{code:?}")),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timeout".into()),
        }
    }
}

#[tokio::test]
async fn device_and_broker_credentials_do_not_cross() {
    let gw = common::start().await;
    let device = common::creds(2);
    // Device credentials on the broker listener: refused.
    assert!(
        rumqttc_connack(
            gw.addrs.broker.unwrap(),
            &device.client_id,
            &device.username,
            &device.password
        )
        .await
        .is_err()
    );
    // A broker user on the device port: refused (its client id is not a device's).
    let err = rumqttc_connack(
        gw.addrs.mqtt,
        "admin-client",
        common::ADMIN_USER,
        common::ADMIN_PASS,
    )
    .await
    .unwrap_err();
    assert!(err.contains("BadClientId"), "{err}");
    // And each works where it belongs.
    rumqttc_connack(
        gw.addrs.broker.unwrap(),
        "admin-client",
        common::ADMIN_USER,
        common::ADMIN_PASS,
    )
    .await
    .expect("admin on broker listener");
    assert!(
        rumqttc_connack(
            gw.addrs.broker.unwrap(),
            "admin-client",
            common::ADMIN_USER,
            "wrong"
        )
        .await
        .is_err()
    );
    rumqttc_connack(
        gw.addrs.mqtt,
        &device.client_id,
        &device.username,
        &device.password,
    )
    .await
    .expect("device on device port");
    gw.shutdown().await;
}
