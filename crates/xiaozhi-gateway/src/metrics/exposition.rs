//! Prometheus text exposition of [`super::Metrics`] for `GET /metrics`.
//!
//! # Why the counters stay atomics
//!
//! The gateway counts on its hottest paths: every UDP datagram in and out, every MQTT
//! publish, every drop. There a counter must cost one relaxed `fetch_add` on a plain
//! field, with no label lookup, no hashing, no lock and no registry. So the counters
//! live in [`super::Metrics`] as `AtomicU64`s and nothing on those paths knows about
//! Prometheus.
//!
//! Exposition happens at scrape time instead: [`render`] takes a [`MetricsSnapshot`]
//! and maps it through one table ([`FAMILIES`]: name, help, type, label, counter) to
//! Prometheus families named by convention (`xiaozhi_` prefix, base units, `_total` for
//! counters, low-cardinality labels, never a per-device label). Related counters (drop
//! reasons, directions, outcomes) become one labelled family. Each scrape builds fresh
//! prometheus metrics from the snapshot in a fresh [`Registry`] (which rejects invalid
//! or duplicate names), adds the histograms of [`super::Histograms`] and the process
//! metrics, and encodes them with [`TextEncoder`]. A scrape costs a few dozen small
//! allocations every 15 s or so; the audio path pays nothing.
//!
//! A unit test fails when a counter is added to `counters!` without a row here, so the
//! exposition cannot silently fall behind.

use prometheus::core::Collector;
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tracing::warn;

use super::{Metrics, MetricsSnapshot};

/// Whether a family is a counter or a gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One series of a family: its label value (empty for an unlabelled family) and the
/// snapshot field it reads.
struct Series {
    label_value: &'static str,
    /// The field's name, for the test that every counter is exported.
    #[cfg_attr(not(test), allow(dead_code))]
    field: &'static str,
    read: fn(&MetricsSnapshot) -> u64,
}

/// One exported metric family.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    /// The one label of the family's series, if it has any.
    label: Option<&'static str>,
    series: &'static [Series],
}

/// `family!(counter "name", "help", field)` for an unlabelled family, or
/// `family!(counter "name", "help", "label" { "value" => field, ... })`.
macro_rules! family {
    ($kind:ident $name:literal, $help:literal, $field:ident) => {
        Family {
            name: $name,
            help: $help,
            kind: family!(@kind $kind),
            label: None,
            series: &[Series {
                label_value: "",
                field: stringify!($field),
                read: |s| s.$field,
            }],
        }
    };
    ($kind:ident $name:literal, $help:literal, $label:literal { $( $value:literal => $field:ident ),+ $(,)? }) => {
        Family {
            name: $name,
            help: $help,
            kind: family!(@kind $kind),
            label: Some($label),
            series: &[ $( Series {
                label_value: $value,
                field: stringify!($field),
                read: |s| s.$field,
            } ),+ ],
        }
    };
    (@kind counter) => { Kind::Counter };
    (@kind gauge) => { Kind::Gauge };
}

/// Every counter and gauge of [`Metrics`], exactly once.
static FAMILIES: &[Family] = &[
    // Devices (MQTT front end).
    family!(gauge "xiaozhi_devices_connected",
        "Device MQTT connections currently authenticated.",
        devices_connected),
    family!(counter "xiaozhi_device_connects_total",
        "Device MQTT CONNECTs accepted.",
        device_connects),
    family!(counter "xiaozhi_auth_failures_total",
    "Device MQTT CONNECTs refused, by reason: malformed client id, wrong username/password, bad signature.",
    "reason" {
        "client_id" => auth_failed_client_id,
        "credentials" => auth_failed_credentials,
        "signature" => auth_failed_signature,
    }),
    family!(counter "xiaozhi_device_connections_closed_total",
    "Device connections closed by the gateway, by reason: over mqtt.max_connections, over mqtt.max_connections_per_source, over mqtt.connect_rate_per_source, replaced by a newer connection of the same device, CONNECT/keep-alive/TLS handshake timeout, malformed or forbidden packet.",
    "reason" {
        "limit" => connections_refused_limit,
        "per_source_limit" => connections_refused_per_source,
        "connect_rate" => connections_refused_rate,
        "replaced" => connections_replaced,
        "timeout" => connections_timed_out,
        "protocol_error" => connections_protocol_errors,
    }),
    family!(counter "xiaozhi_mqtt_messages_total",
    "MQTT publishes from devices on the uplink topic (in) and to devices (out).",
    "direction" {
        "in" => mqtt_messages_in,
        "out" => mqtt_messages_out,
    }),
    family!(counter "xiaozhi_mqtt_drops_total",
    "Device MQTT messages dropped, by reason: publish to a foreign topic, device's outbound queue full, device over mqtt.message_rate, device not connected, unexpected acknowledgement.",
    "reason" {
        "foreign_topic" => mqtt_dropped_foreign_topic,
        "queue_full" => mqtt_dropped_queue_full,
        "rate_limited" => mqtt_dropped_rate_limited,
        "not_connected" => mqtt_dropped_not_connected,
        "unexpected_ack" => mqtt_dropped_unexpected_ack,
    }),
    family!(counter "xiaozhi_device_messages_total",
    "Device JSON control messages, by type (mcp replies and notifications included).",
    "type" {
        "hello" => device_messages_hello,
        "listen" => device_messages_listen,
        "abort" => device_messages_abort,
        "goodbye" => device_messages_goodbye,
        "mcp" => device_messages_mcp,
        "other" => device_messages_other,
    }),
    family!(counter "xiaozhi_control_drops_total",
    "Device control messages dropped, by reason: not a JSON control message, no conversation to take it, conversation's control queue full.",
    "reason" {
        "malformed" => control_malformed,
        "no_session" => control_without_session,
        "queue_full" => control_queue_full,
    }),
    family!(counter "xiaozhi_hellos_total",
    "Device hellos, by outcome: answered, refused, ignored during shutdown.",
    "outcome" {
        "ok" => hellos_ok,
        "refused" => hellos_refused,
        "during_shutdown" => hellos_during_shutdown,
    }),
    family!(counter "xiaozhi_bus_drops_total",
        "Messages the bus publisher dropped because its queue was full.",
        bus_dropped),
    family!(gauge "xiaozhi_bus_connected",
        "External bus: 1 while connected to the MQTT broker, else 0 (always 0 with the embedded broker).",
        bus_connected),
    family!(counter "xiaozhi_bus_disconnects_total",
        "External bus: connections to the MQTT broker lost or refused.",
        bus_disconnects),
    family!(gauge "xiaozhi_bus_queued",
        "External bus: messages waiting for the broker in the bounded outgoing queue.",
        bus_queued),
    family!(counter "xiaozhi_bus_p2p_elsewhere_total",
        "External bus: devices/p2p messages for a device another node holds (ignored here).",
        bus_p2p_elsewhere),
    family!(counter "xiaozhi_bus_forward_malformed_total",
        "Forwarded-command envelopes from other nodes that could not be read.",
        bus_forward_malformed),
    family!(counter "xiaozhi_admin_forwarded_total",
        "Admin commands and management calls sent on to the node holding the device.",
        admin_commands_forwarded),
    family!(counter "xiaozhi_admin_forward_timeouts_total",
        "Forwarded management calls the owning node did not answer in time.",
        admin_forward_timeouts),
    family!(counter "xiaozhi_admin_forward_lookup_failures_total",
        "Presence lookups for forwarding that failed or timed out (the command ran locally).",
        admin_forward_lookup_failed),
    family!(counter "xiaozhi_event_drops_total",
        "Events (session, chat, upstream) not published because the event feed lagged.",
        events_dropped),
    family!(counter "xiaozhi_http_rejected_total",
    "HTTP requests and connections refused, by reason: body over http.max_body_bytes, handler over http.request_timeout_secs, headers not sent within http.header_timeout_secs, over http.max_connections, /ws/admin message over http.ws_max_message_bytes.",
    "reason" {
        "body_too_large" => http_rejected_body_too_large,
        "request_timeout" => http_rejected_request_timeout,
        "header_timeout" => http_rejected_header_timeout,
        "connection_limit" => http_rejected_connection_limit,
        "ws_message_too_large" => http_rejected_ws_message_too_large,
    }),
    family!(counter "xiaozhi_tls_reloads_total",
    "TLS certificate reloads (SIGHUP or a changed file), by outcome; on failure the previous certificate stays in use.",
    "outcome" {
        "ok" => tls_reloads,
        "failed" => tls_reload_failures,
    }),
    // Broker listener (admin and integration clients).
    family!(gauge "xiaozhi_broker_clients_connected",
        "Broker-listener (admin/integration) clients currently connected.",
        broker_clients_connected),
    family!(counter "xiaozhi_broker_connects_total",
        "Broker-listener CONNECTs accepted.",
        broker_connects),
    family!(counter "xiaozhi_broker_auth_failures_total",
        "Broker-listener CONNECTs refused for missing or wrong credentials.",
        broker_auth_refused),
    family!(counter "xiaozhi_broker_acl_denials_total",
    "Broker-listener publishes (and wills) or subscribes refused by the role's ACL.",
    "action" {
        "publish" => broker_publish_refused,
        "subscribe" => broker_subscribe_refused,
    }),
    family!(counter "xiaozhi_broker_connections_closed_total",
    "Broker-listener connections closed by the gateway, by reason: client cap reached, CONNECT/keep-alive timeout, malformed or forbidden packet.",
    "reason" {
        "limit" => broker_connections_refused_limit,
        "timeout" => broker_connections_timed_out,
        "protocol_error" => broker_protocol_errors,
    }),
    family!(counter "xiaozhi_admin_commands_total",
    "Admin commands, by outcome: answered ok, answered with a failure, dropped because the command queue was full.",
    "outcome" {
        "ok" => admin_commands_ok,
        "failed" => admin_commands_failed,
        "dropped" => admin_commands_dropped,
    }),
    // Conversations.
    family!(gauge "xiaozhi_sessions_live",
        "Conversations currently running.",
        sessions_live),
    family!(counter "xiaozhi_sessions_ended_total",
        "Conversations ended.",
        sessions_ended),
    // Device-to-device calling.
    family!(counter "xiaozhi_call_requests_total",
    "Device-calling requests (POST /api/call/request), by the status answered: pending (the target rings), bridged (crossing requests), offline (target not connected), error (refused: busy, already calling, invalid, caller offline).",
    "status" {
        "pending" => call_requests_pending,
        "bridged" => call_requests_bridged,
        "offline" => call_requests_offline,
        "error" => call_requests_error,
    }),
    family!(counter "xiaozhi_call_accepts_total",
    "Device-calling accepts (POST /api/call/accept), by the status answered.",
    "status" {
        "bridged" => call_accepts_bridged,
        "no_pending" => call_accepts_no_pending,
        "caller_gone" => call_accepts_caller_gone,
        "offline" => call_accepts_offline,
        "error" => call_accepts_error,
    }),
    family!(counter "xiaozhi_calls_ended_total",
    "Device calls ended, by cause: a party left (goodbye, disconnect, new hello, idle), nobody answered within calls.ring_timeout_secs, calls.max_call_secs reached, the caller was gone when the target accepted.",
    "cause" {
        "party_left" => calls_ended_party_left,
        "ring_timeout" => calls_ended_ring_timeout,
        "max_duration" => calls_ended_max_duration,
        "caller_gone" => calls_ended_caller_gone,
    }),
    family!(counter "xiaozhi_push_total",
    "Pushes (one per device) by what happened: queued, sent (written to the device's connection), delivered (acknowledged by the device: wake), expired (expires_at passed first), failed.",
    "state" {
        "queued" => push_queued,
        "sent" => push_sent,
        "delivered" => push_delivered,
        "expired" => push_expired,
        "failed" => push_failed,
    }),
    family!(counter "xiaozhi_push_refused_total",
    "Push requests refused whole (nothing queued), by reason: invalid input, a device the gateway does not know, a queue at push.max_per_device or push.max_queued, the database unavailable.",
    "reason" {
        "invalid" => push_refused_invalid,
        "unknown_device" => push_refused_unknown_device,
        "queue_full" => push_refused_queue_full,
        "unavailable" => push_refused_unavailable,
    }),
    family!(counter "xiaozhi_push_clips_total",
    "Clips uploaded for notify pushes: stored (mono Ogg Opus, converted from WAV or MP3 when needed), refused (not audio, not mono Ogg Opus, too long, undecodable).",
    "result" {
        "stored" => push_clips_stored,
        "refused" => push_clips_refused,
    }),
    family!(gauge "xiaozhi_push_waiting",
        "Pushes queued for devices that are offline or busy, across every node (as of this node's last sweep).",
        push_waiting),
    family!(gauge "xiaozhi_call_legs",
        "Conversations of this node that carry a device call (a ringing caller or a bridged party).",
        call_legs),
    family!(counter "xiaozhi_call_frames_total",
    "Call audio frames: sealed by the UDP socket straight into the peer's channel (spliced: both devices on this node over UDP), to a leg on this node through its task (local), answered with silence while ringing (silence), to and from legs on other nodes over the bus (remote_out, remote_in).",
    "path" {
        "spliced" => call_frames_spliced,
        "local" => call_frames_local,
        "silence" => call_frames_silence,
        "remote_out" => call_frames_remote_out,
        "remote_in" => call_frames_remote_in,
    }),
    family!(counter "xiaozhi_call_frames_dropped_total",
    "Call audio frames dropped: no leg to take them yet or any more (no_peer), the leg's queue was full (queue_full), a frame from another node did not authenticate under the call's key (auth).",
    "reason" {
        "no_peer" => call_frames_dropped_no_peer,
        "queue_full" => call_frames_dropped_queue_full,
        "auth" => call_frames_dropped_auth,
    }),
    family!(counter "xiaozhi_call_wakes_total",
    "Call targets woken with MCP self.remote_wakeup: sent, and failed (the device has no such tool, did not answer, or is gone).",
    "outcome" {
        "sent" => call_wakes_sent,
        "failed" => call_wakes_failed,
    }),
    family!(counter "xiaozhi_call_actions_total",
    "Calling actions sent to the node holding the device (forwarded), and received ones that could not be read (malformed).",
    "outcome" {
        "forwarded" => call_actions_forwarded,
        "malformed" => call_actions_malformed,
    }),
    family!(counter "xiaozhi_call_control_ignored_total",
        "Device control messages (listen, abort, ...) ignored because the conversation carries a call.",
        call_control_ignored),
    // UDP audio.
    family!(counter "xiaozhi_udp_datagrams_total",
    "UDP audio datagrams received from (rx) and sent to (tx) devices.",
    "direction" {
        "rx" => udp_rx_datagrams,
        "tx" => udp_tx_datagrams,
    }),
    family!(counter "xiaozhi_udp_bytes_total",
    "UDP audio bytes received from (rx) and sent to (tx) devices.",
    "direction" {
        "rx" => udp_rx_bytes,
        "tx" => udp_tx_bytes,
    }),
    family!(counter "xiaozhi_udp_drops_total",
    "UDP audio datagrams dropped, by reason. Uplink: malformed, unknown connection id, replayed sequence, address hijack, decryption failure, conversation queue full, channel over udp.channel_rate; AES-GCM channels: tag did not verify (auth), older than the replay window (stale). Downlink: device address not known yet, frame larger than a datagram, socket send error, send queue full.",
    "reason" {
        "malformed" => udp_drop_malformed,
        "unknown_id" => udp_drop_unknown_id,
        "replay" => udp_drop_replay,
        "hijack" => udp_drop_hijack,
        "decrypt" => udp_drop_decrypt,
        "queue_full" => udp_drop_queue_full,
        "rate_limited" => udp_drop_rate_limited,
        "no_peer" => udp_drop_no_peer,
        "downlink_oversized" => udp_drop_downlink_oversized,
        "send_error" => udp_send_errors,
        "send_queue_full" => udp_drop_send_queue_full,
        "auth" => udp_drop_auth,
        "stale" => udp_drop_stale,
    }),
    family!(counter "xiaozhi_udp_uplink_gaps_total",
        "Uplink sequence numbers skipped (datagrams lost before reaching the gateway).",
        udp_uplink_gaps),
    family!(counter "xiaozhi_udp_rebinds_total",
        "Audio channels whose device address moved (NAT rebinding).",
        udp_rebinds),
    family!(counter "xiaozhi_audio_sessions_total",
    "Conversations started, by audio transport: ctr (stock firmware, AES-128-CTR over UDP), gcm (AES-128-GCM over UDP), quic.",
    "transport" {
        "ctr" => audio_sessions_ctr,
        "gcm" => audio_sessions_gcm,
        "quic" => audio_sessions_quic,
    }),
    family!(counter "xiaozhi_hellos_refused_transport_policy_total",
        "Hellos refused because the device's group requires an authenticated audio transport (transport.require_authenticated) and the device announced none.",
        hellos_refused_transport_policy),
    family!(gauge "xiaozhi_quic_connections",
        "QUIC audio connections open now.",
        quic_connections),
    family!(counter "xiaozhi_quic_attach_total",
    "QUIC connections by how they attached: ok, or refused (no attach frame in time, unknown / reused / expired token, quic.max_connections open), or failed the handshake.",
    "outcome" {
        "ok" => quic_attached,
        "handshake_failed" => quic_handshake_failed,
        "no_attach" => quic_refused_no_attach,
        "unknown_token" => quic_refused_unknown_token,
        "reused_token" => quic_refused_reused_token,
        "expired_token" => quic_refused_expired_token,
        "conversation_ended" => quic_refused_ended,
        "limit" => quic_refused_limit,
    }),
    family!(counter "xiaozhi_quic_tokens_expired_total",
        "QUIC session tokens never presented before they expired.",
        quic_tokens_expired),
    family!(counter "xiaozhi_quic_datagrams_total",
    "QUIC audio datagrams received from (rx) and sent to (tx) devices.",
    "direction" {
        "rx" => quic_rx_datagrams,
        "tx" => quic_tx_datagrams,
    }),
    family!(counter "xiaozhi_quic_bytes_total",
    "QUIC audio datagram payload bytes received from (rx) and sent to (tx) devices.",
    "direction" {
        "rx" => quic_rx_bytes,
        "tx" => quic_tx_bytes,
    }),
    family!(counter "xiaozhi_quic_drops_total",
    "QUIC audio dropped: malformed datagrams or control frames, downlink datagrams the connection could not take.",
    "reason" {
        "malformed" => quic_drop_malformed,
        "send_error" => quic_drop_send,
    }),
    family!(counter "xiaozhi_quic_migrations_total",
        "Attached QUIC connections whose client address changed (connection migration).",
        quic_migrations),
    family!(counter "xiaozhi_quic_closed_by_device_total",
        "Attached QUIC connections closed or lost by the device.",
        quic_closed_by_device),
    // Speech pipelines.
    family!(counter "xiaozhi_upstream_connects_total",
        "Upstream (xiaozhi-server) WebSocket conversations opened.",
        upstream_connects),
    family!(counter "xiaozhi_upstream_failures_total",
    "Upstream conversations that failed, by reason: connection refused, timeout, authentication, WebSocket handshake, hello exchange, or after the hello (midway).",
    "reason" {
        "refused" => upstream_failed_refused,
        "timeout" => upstream_failed_timeout,
        "auth" => upstream_failed_auth,
        "handshake" => upstream_failed_handshake,
        "hello" => upstream_failed_hello,
        "midway" => upstream_failed_midway,
    }),
    family!(counter "xiaozhi_upstream_drops_total",
    "Upstream traffic dropped, by reason: uplink audio or device JSON the upstream was too slow to take, invalid frames from the upstream.",
    "reason" {
        "audio_backlog" => upstream_audio_dropped,
        "text_backlog" => upstream_text_dropped,
        "malformed" => upstream_malformed,
    }),
    family!(counter "xiaozhi_mcp_cache_answers_total",
        "Upstream MCP initialize / tools/list requests answered from the device tool cache.",
        mcp_cache_answers),
    family!(counter "xiaozhi_echo_drops_total",
        "Uplink frames the echo pipeline did not play back (over its per-turn cap, or while playing to a half-duplex device).",
        echo_frames_dropped),
    family!(counter "xiaozhi_echo_reflected_total",
        "Uplink frames the UDP socket task played straight back for a realtime echo conversation, without a hand-off to the conversation.",
        echo_frames_reflected),
    // Chat history.
    family!(counter "xiaozhi_history_records_total",
    "Chat-history records, by outcome: stored in the database, skipped by the device's policy, journaled while the database was away, replayed from the journal, lost.",
    "outcome" {
        "stored" => history_records_stored,
        "skipped" => history_records_skipped,
        "journaled" => history_records_journaled,
        "replayed" => history_records_replayed,
        "lost" => history_records_lost,
    }),
    family!(counter "xiaozhi_history_write_failures_total",
        "Chat-history database writes that failed or timed out (the batch went to the journal).",
        history_write_failures),
    family!(gauge "xiaozhi_history_queue_depth",
        "Chat-history records waiting for the writer.",
        history_queue_depth),
    family!(gauge "xiaozhi_history_journal_bytes",
        "Size of the chat-history journal on disk.",
        history_journal_bytes),
    // Presence.
    family!(counter "xiaozhi_presence_transitions_total",
        "Presence transitions reported by the session layer.",
        presence_transitions),
    family!(counter "xiaozhi_presence_writes_total",
        "Presence records written to the presence store.",
        presence_writes),
    family!(counter "xiaozhi_presence_heartbeats_total",
        "Presence heartbeats that refreshed this node's entries.",
        presence_heartbeats),
    family!(counter "xiaozhi_presence_errors_total",
        "Presence store round trips that failed or timed out.",
        presence_errors),
    family!(counter "xiaozhi_presence_last_connected_updates_total",
    "ai_device.last_connected_at updates, by outcome.",
    "outcome" {
        "ok" => presence_last_connected_updates,
        "failed" => presence_last_connected_errors,
    }),
];

/// The `GET /metrics` body. Never panics: a family that cannot be registered or
/// encoded is logged and left out, and the rest is rendered.
pub fn render(metrics: &Metrics) -> String {
    let (registry, errors) = registry(metrics, FAMILIES);
    for error in &errors {
        warn!(error = %error, "metric family left out of /metrics");
    }
    let (text, errors) = encode(&registry);
    for error in &errors {
        warn!(error = %error, "metric family could not be encoded");
    }
    text
}

/// A registry holding this scrape's metrics; the errors are the families left out.
fn registry(metrics: &Metrics, families: &[Family]) -> (Registry, Vec<String>) {
    let registry = Registry::new();
    let mut errors = Vec::new();
    let snapshot = metrics.snapshot();
    for family in families {
        let collector = collector(family, &snapshot)
            .and_then(|c| registry.register(c).map_err(|e| e.to_string()));
        if let Err(e) = collector {
            errors.push(format!("{}: {e}", family.name));
        }
    }
    for histogram in metrics.histograms.all() {
        if let Err(e) = registry.register(Box::new(histogram.clone())) {
            errors.push(format!("histogram: {e}"));
        }
    }
    for shards in metrics.udp_shards.collectors() {
        if let Err(e) = registry.register(shards) {
            errors.push(format!("UDP shards: {e}"));
        }
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = registry.register(Box::new(process::Process)) {
        errors.push(format!("process metrics: {e}"));
    }
    if let Err(e) = runtime_gauges().and_then(|c| registry.register(c).map_err(|e| e.to_string())) {
        errors.push(format!("runtime metrics: {e}"));
    }
    (registry, errors)
}

/// The tokio runtime's live task count and worker count, read at scrape time (a soak
/// watches the task count for leaks). Absent outside a runtime.
fn runtime_gauges() -> Result<Box<dyn Collector>, String> {
    let vec = IntGaugeVec::new(
        Opts::new(
            "xiaozhi_runtime_tasks",
            "Tokio runtime: tasks alive (spawned and not yet finished) and worker threads.",
        ),
        &["kind"],
    )
    .map_err(|e| e.to_string())?;
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let m = handle.metrics();
        let alive = i64::try_from(m.num_alive_tasks()).unwrap_or(i64::MAX);
        let workers = i64::try_from(m.num_workers()).unwrap_or(i64::MAX);
        vec.with_label_values(&["alive"]).set(alive);
        vec.with_label_values(&["workers"]).set(workers);
    }
    Ok(Box::new(vec))
}

/// One family's prometheus metric, filled from the snapshot.
fn collector(family: &Family, snapshot: &MetricsSnapshot) -> Result<Box<dyn Collector>, String> {
    let opts = Opts::new(family.name, family.help);
    let labels: Vec<&str> = family.label.into_iter().collect();
    let values = |series: &Series| -> Vec<&'static str> {
        family
            .label
            .map(|_| series.label_value)
            .into_iter()
            .collect()
    };
    match family.kind {
        Kind::Counter => {
            let vec = IntCounterVec::new(opts, &labels).map_err(|e| e.to_string())?;
            for series in family.series {
                vec.get_metric_with_label_values(&values(series))
                    .map_err(|e| e.to_string())?
                    .inc_by((series.read)(snapshot));
            }
            Ok(Box::new(vec))
        }
        Kind::Gauge => {
            let vec = IntGaugeVec::new(opts, &labels).map_err(|e| e.to_string())?;
            for series in family.series {
                // Gauges go up and down with `fetch_add`/`fetch_sub`; reading the bits
                // as signed shows a (buggy) transient underflow as -1, not 2^64-1.
                let value = (series.read)(snapshot) as i64;
                vec.get_metric_with_label_values(&values(series))
                    .map_err(|e| e.to_string())?
                    .set(value);
            }
            Ok(Box::new(vec))
        }
    }
}

/// Encodes every gathered family, one at a time so that one bad family cannot take
/// the others with it.
fn encode(registry: &Registry) -> (String, Vec<String>) {
    let encoder = TextEncoder::new();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for family in registry.gather() {
        let mut one = Vec::new();
        match encoder.encode(std::slice::from_ref(&family), &mut one) {
            Ok(()) => out.extend_from_slice(&one),
            Err(e) => errors.push(format!("{}: {e}", family.name())),
        }
    }
    let text = String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    (text, errors)
}

/// Process metrics (CPU, memory, file descriptors, threads) of this process, from
/// `/proc`.
#[cfg(target_os = "linux")]
mod process {
    use std::sync::LazyLock;

    use prometheus::core::{Collector, Desc};
    use prometheus::process_collector::ProcessCollector;
    use prometheus::proto::MetricFamily;

    /// One collector per process: its CPU counter keeps the last value it read.
    static COLLECTOR: LazyLock<ProcessCollector> = LazyLock::new(ProcessCollector::for_self);

    /// A handle to [`COLLECTOR`] that a scrape's registry can own.
    pub(super) struct Process;

    impl Collector for Process {
        fn desc(&self) -> Vec<&Desc> {
            COLLECTOR.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            COLLECTOR.collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use super::*;
    use crate::metrics::Metrics;

    /// Fails when a counter is added to `counters!` without being exported (or the
    /// table names a counter twice).
    #[test]
    fn every_counter_is_exported_exactly_once() {
        let fields: BTreeSet<String> = match serde_json::to_value(MetricsSnapshot::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            other => panic!("snapshot is not an object: {other:?}"),
        };
        let mut exported = BTreeMap::<&str, Vec<&str>>::new();
        for family in FAMILIES {
            for series in family.series {
                exported.entry(series.field).or_default().push(family.name);
            }
        }
        let twice: Vec<_> = exported.iter().filter(|(_, f)| f.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "counters exported more than once: {twice:?}"
        );
        let exported: BTreeSet<String> = exported.keys().map(|f| f.to_string()).collect();
        let missing: Vec<_> = fields.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "counters not exported on /metrics (add them to FAMILIES): {missing:?}"
        );
        let unknown: Vec<_> = exported.difference(&fields).collect();
        assert!(
            unknown.is_empty(),
            "FAMILIES names unknown counters: {unknown:?}"
        );
    }

    #[test]
    fn families_follow_prometheus_conventions() {
        let mut names = HashSet::new();
        for family in FAMILIES {
            assert!(
                names.insert(family.name),
                "duplicate family {}",
                family.name
            );
            assert!(family.name.starts_with("xiaozhi_"), "{}", family.name);
            match family.kind {
                Kind::Counter => assert!(family.name.ends_with("_total"), "{}", family.name),
                Kind::Gauge => assert!(!family.name.ends_with("_total"), "{}", family.name),
            }
            assert!(!family.help.is_empty(), "{}", family.name);
            match family.label {
                None => assert_eq!(family.series.len(), 1, "{}", family.name),
                Some(label) => {
                    assert!(!["device", "mac", "client_id", "session"].contains(&label));
                    let mut values = HashSet::new();
                    for series in family.series {
                        assert!(!series.label_value.is_empty(), "{}", family.name);
                        assert!(
                            values.insert(series.label_value),
                            "{}: duplicate {label}={}",
                            family.name,
                            series.label_value
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn scrape_registers_everything_and_maps_values() {
        let m = Metrics::default();
        Metrics::add(&m.udp_drop_hijack, 3);
        Metrics::add(&m.udp_rx_bytes, 1234);
        Metrics::inc(&m.hellos_ok);
        Metrics::set(&m.devices_connected, 2);
        Metrics::add(&m.history_records_lost, 7);
        Metrics::observe(
            &m.histograms.upstream_connect,
            std::time::Duration::from_millis(30),
        );
        let (registry, errors) = registry(&m, FAMILIES);
        assert!(errors.is_empty(), "{errors:?}");
        let (text, errors) = encode(&registry);
        assert!(errors.is_empty(), "{errors:?}");
        for line in [
            "xiaozhi_udp_drops_total{reason=\"hijack\"} 3",
            "xiaozhi_udp_drops_total{reason=\"replay\"} 0",
            "xiaozhi_udp_bytes_total{direction=\"rx\"} 1234",
            "xiaozhi_hellos_total{outcome=\"ok\"} 1",
            "xiaozhi_devices_connected 2",
            "xiaozhi_history_records_total{outcome=\"lost\"} 7",
            "xiaozhi_upstream_connect_seconds_bucket{le=\"0.05\"} 1",
            "xiaozhi_upstream_connect_seconds_count 1",
            "xiaozhi_session_duration_seconds_count 0",
            "# TYPE xiaozhi_udp_drops_total counter",
            "# TYPE xiaozhi_devices_connected gauge",
            "# TYPE xiaozhi_history_write_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        // The same rendering through the public entry point.
        assert!(render(&m).contains("xiaozhi_udp_drops_total{reason=\"hijack\"} 3"));
    }

    #[test]
    fn a_bad_family_is_left_out_not_fatal() {
        static WITH_BAD: &[Family] = &[
            family!(counter "bad-name_total", "Not a valid name.", hellos_ok),
            family!(counter "xiaozhi_good_total", "Kept.", hellos_ok),
            family!(counter "xiaozhi_good_total", "Registered twice.", hellos_refused),
        ];
        let m = Metrics::default();
        Metrics::inc(&m.hellos_ok);
        let (registry, errors) = registry(&m, WITH_BAD);
        assert_eq!(errors.len(), 2, "{errors:?}");
        let (text, errors) = encode(&registry);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(text.lines().any(|l| l == "xiaozhi_good_total 1"), "{text}");
        assert!(
            text.contains("xiaozhi_session_duration_seconds_count 0"),
            "{text}"
        );
        // Scrapes are independent: rendering twice gives the same counter values.
        let first = render(&m);
        let second = render(&m);
        let counters = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("xiaozhi_"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(counters(&first), counters(&second));
    }
}
