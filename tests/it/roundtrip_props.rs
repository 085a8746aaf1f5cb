//! Round-trip properties of the encode/decode pairs whose two halves live in different
//! modules: what the gateway writes against what the other side (the firmware, the
//! speech server, the manager-api, a bus client, the history API's own client) reads,
//! using the simulators' parsers as that other side. Pairs inside one protocol module
//! are tested in that module (`crates/xiaozhi-proto/src/*.rs`, `mod props`).

use proptest::prelude::*;
use serde_json::Value;

use xiaozhi_gateway::history::query::SessionCursor;
use xiaozhi_gateway::http::history::parse_date;
use xiaozhi_gateway::protocol::control::{self, AudioParams, UdpOffer};
use xiaozhi_gateway::protocol::credentials::Verifier;
use xiaozhi_gateway::protocol::datagram::nonce_template;
use xiaozhi_gateway::protocol::mac::Mac;
use xiaozhi_gateway::protocol::topics;
use xiaozhi_gateway::protocol::upstream;
use xiaozhi_tools::simulator::audio::ServerHello;
use xiaozhi_tools::simulator::device::DeviceCredentials;
use xiaozhi_tools::simulator::upstream as mock;

proptest! {
    /// Our hello to the device, read the way the firmware reads it.
    #[test]
    fn the_firmware_reads_our_hello(
        session_id in any::<String>(),
        ip: [u8; 4],
        port: u16,
        key: [u8; 16],
        connection_id: u32,
        sample_rate: u32,
        frame_duration in 1u32..=120,
    ) {
        let server = std::net::Ipv4Addr::from(ip);
        let udp = UdpOffer {
            server: server.to_string(),
            port,
            key_hex: hex::encode(key),
            nonce_hex: hex::encode(nonce_template(connection_id)),
            encryption: xiaozhi_gateway::protocol::encryption::Encryption::Aes128Ctr,
        };
        let params = AudioParams { sample_rate, frame_duration, ..AudioParams::default() };
        let hello: Value = serde_json::from_str(&control::server_hello(&session_id, &params, &udp)).unwrap();
        let read = ServerHello::parse(&hello).unwrap();
        prop_assert_eq!(&read.session_id, &session_id);
        prop_assert_eq!(read.udp, std::net::SocketAddr::from((server, port)));
        prop_assert_eq!(read.key, key);
        prop_assert_eq!(read.connection_id(), connection_id);
        prop_assert_eq!(read.downlink_sample_rate, sample_rate);
        prop_assert_eq!(read.frame_duration, frame_duration);
    }

    /// Credentials as manager-api (the simulator) issues them pass our verifier.
    #[test]
    fn issued_credentials_verify(octets: [u8; 6], group in "[A-Za-z0-9_]{1,12}", key in "[ -~]{1,40}") {
        let mac = Mac::from_octets(octets);
        let creds = DeviceCredentials::for_mac(mac, &group, Some(key.as_bytes()));
        let identity = Verifier::Signed { key: key.into_bytes() }
            .verify(&creds.client_id, Some(&creds.username), Some(&creds.password))
            .unwrap();
        prop_assert_eq!(identity.mac, mac);
        prop_assert_eq!(identity.group, group);
    }

    /// Our token for xiaozhi-server, checked the way its AuthManager checks it.
    #[test]
    fn the_speech_server_accepts_our_token(
        secret in "[ -~]{1,40}",
        octets: [u8; 6],
        unix_secs in 0u64..4_000_000_000,
    ) {
        let mac = Mac::from_octets(octets);
        let (client_id, device_id) = (mac.underscored(), mac.colon());
        let token = upstream::token(secret.as_bytes(), &client_id, &device_id, unix_secs);
        prop_assert_eq!(
            mock::verify_token(&secret, &client_id, &device_id, &token, unix_secs),
            Ok(())
        );
        prop_assert!(mock::verify_token(&secret, &device_id, &client_id, &token, unix_secs).is_err());
    }

    /// Uplink binary frames as the speech server reads them, and its downlink frames as
    /// we read them.
    #[test]
    fn binary_frames_cross_the_websocket(
        timestamp: u32,
        sequence: u32,
        opus in proptest::collection::vec(any::<u8>(), 0..1500),
    ) {
        let mut ours = Vec::new();
        upstream::encode_audio(timestamp, &opus, &mut ours);
        prop_assert_eq!(mock::parse_uplink(&ours), Some((timestamp, &opus[..])));

        let theirs = mock::encode_downlink(sequence, timestamp, &opus);
        let frame = upstream::decode_audio(&theirs).unwrap();
        prop_assert_eq!(frame.timestamp, timestamp);
        prop_assert_eq!(&theirs[frame.payload], &opus[..]);
    }

    /// Device topics: built from a MAC, read back to the same MAC.
    #[test]
    fn device_topics_name_their_device(octets: [u8; 6]) {
        let mac = Mac::from_octets(octets);
        prop_assert_eq!(topics::parse_p2p(&topics::p2p(&mac)), Some(mac));
        prop_assert_eq!(topics::parse_admin_command(&topics::admin_command(&mac)), Some(Some(mac)));
        prop_assert_eq!(topics::parse_canonical_mac(&mac.underscored()), Some(mac));
    }

    /// The history API's session cursors: what a page hands out as `next` is read back as
    /// `before`, for any session id the API accepts (up to 64 characters of any script;
    /// docs/fuzzing.md, "Findings", has the bug this found).
    #[test]
    fn session_cursors_round_trip(
        started_at in "[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?",
        session_id in "\\PC{1,64}",
    ) {
        let cursor = SessionCursor { started_at, session_id };
        prop_assert_eq!(SessionCursor::decode(&cursor.encode()), Some(cursor));
    }

    /// The history API's dates: any day from 1000-01-01 to 9999-12-31 (the range it
    /// accepts), printed as YYYY-MM-DD, parses back to the same day.
    #[test]
    fn history_dates_round_trip(julian in first_day().to_julian_day()..=last_day().to_julian_day()) {
        let date = time::Date::from_julian_day(julian).unwrap();
        let text = format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day());
        prop_assert_eq!(parse_date(&text), Some(date));
    }
}

fn first_day() -> time::Date {
    time::Date::from_calendar_date(1000, time::Month::January, 1).unwrap()
}

fn last_day() -> time::Date {
    time::Date::from_calendar_date(9999, time::Month::December, 31).unwrap()
}

/// [`history_dates_round_trip`] covers exactly the days the API accepts.
#[test]
fn history_date_range_ends_where_the_api_stops() {
    assert_eq!(parse_date("1000-01-01"), Some(first_day()));
    assert_eq!(parse_date("9999-12-31"), Some(last_day()));
    assert_eq!(parse_date("0999-12-31"), None);
}
