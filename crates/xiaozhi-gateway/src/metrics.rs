//! Every counter the gateway keeps, in one place.
//!
//! Plain relaxed atomics: incrementing one is a single uncontended instruction, cheap
//! enough for the audio path. Each drop reason has its own counter so an operator can
//! tell a hijack attempt from a slow consumer. The Prometheus exposition
//! ([`exposition`], `GET /metrics`) reads these same counters at scrape time and names
//! them by Prometheus conventions; tests read them through [`Metrics::snapshot`].
//!
//! The few latency and duration distributions ([`Histograms`]) are prometheus
//! histograms: they are observed once per conversation, upstream connect or database
//! batch, never per packet.

pub mod exposition;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// The gateway's counters and gauges.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// Latency and duration histograms (not counters: not in the snapshot).
            pub histograms: Histograms,
            /// The UDP audio path's work per shard (labelled by shard, not in the
            /// snapshot).
            pub udp_shards: UdpShardMetrics,
        }

        /// A point-in-time copy of [`Metrics`], for tests and status output.
        #[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
        pub struct MetricsSnapshot {
            $( pub $name: u64, )*
        }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Device MQTT connections currently authenticated (gauge).
    devices_connected,
    /// Device CONNECTs accepted.
    device_connects,
    /// Device CONNECTs refused, by reason.
    auth_failed_client_id,
    auth_failed_credentials,
    auth_failed_signature,
    /// Connections refused because `mqtt.max_connections` was reached.
    connections_refused_limit,
    /// Connections refused because their source address had
    /// `mqtt.max_connections_per_source` open, or connected faster than
    /// `mqtt.connect_rate_per_source`.
    connections_refused_per_source,
    connections_refused_rate,
    /// Older connections closed because the same device connected again.
    connections_replaced,
    /// Connections closed for a missing CONNECT, keep-alive or TLS handshake timeout.
    connections_timed_out,
    /// Connections closed for a malformed or forbidden packet.
    connections_protocol_errors,
    /// MQTT publishes from devices on the uplink topic.
    mqtt_messages_in,
    /// MQTT publishes to devices.
    mqtt_messages_out,
    /// Device publishes to topics other than the uplink topic (dropped).
    mqtt_dropped_foreign_topic,
    /// Messages for a device dropped because its outbound queue was full.
    mqtt_dropped_queue_full,
    /// Device publishes dropped for exceeding `mqtt.message_rate`.
    mqtt_dropped_rate_limited,
    /// Messages for a device that is not connected (dropped).
    mqtt_dropped_not_connected,
    /// Device payloads that are not JSON control messages (dropped, connection kept).
    control_malformed,
    /// Device messages that need a conversation but arrived with none.
    control_without_session,
    /// Device messages dropped because their conversation's control queue was full.
    control_queue_full,
    /// Hellos ignored because the gateway is shutting down.
    hellos_during_shutdown,
    /// Device JSON messages by type (after parsing).
    device_messages_hello,
    device_messages_listen,
    device_messages_abort,
    device_messages_goodbye,
    device_messages_mcp,
    device_messages_other,
    /// PUBACK/PUBREC/... from a device that the gateway never asked for (ignored).
    mqtt_dropped_unexpected_ack,
    /// Messages the bus publisher dropped because its queue was full.
    bus_dropped,
    /// External bus: 1 while connected to the broker, else 0 (gauge).
    bus_connected,
    /// External bus: connections to the broker lost or refused.
    bus_disconnects,
    /// External bus: messages waiting in the outgoing queue (gauge).
    bus_queued,
    /// External bus: messages for `devices/p2p/<mac_>` of a device another node holds.
    bus_p2p_elsewhere,
    /// Forwarded commands (`xiaozhi/nodes/<node>/commands`) that could not be read.
    bus_forward_malformed,
    /// Admin commands sent on to the node that holds the device.
    admin_commands_forwarded,
    /// Forwarded management-API calls the owner did not answer in time.
    admin_forward_timeouts,
    /// Presence lookups for forwarding that failed or timed out (the command ran here).
    admin_forward_lookup_failed,
    /// Broker-listener (admin/integration) clients currently connected (gauge).
    broker_clients_connected,
    /// Broker-listener CONNECTs accepted.
    broker_connects,
    /// Broker-listener CONNECTs refused for missing or wrong credentials.
    broker_auth_refused,
    /// Broker-listener publishes (and wills) refused by the role's ACL.
    broker_publish_refused,
    /// Broker-listener SUBSCRIBEs refused by the role's ACL.
    broker_subscribe_refused,
    /// Broker-listener sockets refused because the client cap was reached.
    broker_connections_refused_limit,
    /// Broker-listener connections closed for a missing CONNECT or keep-alive timeout.
    broker_connections_timed_out,
    /// Broker-listener connections closed for a malformed or forbidden packet.
    broker_protocol_errors,
    /// Admin commands dropped because the gateway's command queue was full.
    admin_commands_dropped,
    /// Hellos answered / refused.
    hellos_ok,
    hellos_refused,
    /// Conversations currently running (gauge).
    sessions_live,
    /// Conversations ended.
    sessions_ended,
    /// Device-calling requests (`/api/call/request`), by answer.
    call_requests_pending,
    call_requests_bridged,
    call_requests_offline,
    call_requests_error,
    /// Device-calling accepts (`/api/call/accept`), by answer.
    call_accepts_bridged,
    call_accepts_no_pending,
    call_accepts_caller_gone,
    call_accepts_offline,
    call_accepts_error,
    /// Calls ended, by cause.
    calls_ended_party_left,
    calls_ended_ring_timeout,
    calls_ended_max_duration,
    calls_ended_caller_gone,
    /// Conversations of this node that are call legs now (gauge).
    call_legs,
    /// Pushes queued (one per device), sent (written to the device's connection),
    /// delivered (acknowledged: wake), expired before they could be sent, failed.
    push_queued,
    push_sent,
    push_delivered,
    push_expired,
    push_failed,
    /// Push requests refused, by reason: bad input, a device nobody knows, a queue at
    /// its bound (`push.max_per_device`, `push.max_queued`), the database away.
    push_refused_invalid,
    push_refused_unknown_device,
    push_refused_queue_full,
    push_refused_unavailable,
    /// Pushes waiting for their devices, across the fleet (gauge, as of the last sweep).
    push_waiting,
    /// Clips uploaded for notify pushes: stored (mono Ogg Opus, converted from WAV or
    /// MP3 when needed), refused (not audio, not mono Ogg Opus, too long, undecodable).
    push_clips_stored,
    push_clips_refused,
    /// Call audio frames: sealed by the UDP socket straight into the peer's channel (both
    /// devices on this node over UDP), handed to a leg on this node, answered with silence
    /// (ringing), sent to and received from legs on other nodes.
    call_frames_spliced,
    call_frames_local,
    call_frames_silence,
    call_frames_remote_out,
    call_frames_remote_in,
    /// Call audio frames dropped: no leg to take them (not bridged yet, or gone), or the
    /// leg's queue was full.
    call_frames_dropped_no_peer,
    call_frames_dropped_queue_full,
    /// Call audio from another node that did not authenticate under the call's key
    /// (forged, replayed, or from an earlier call), dropped.
    call_frames_dropped_auth,
    /// Targets woken for a call (MCP `self.remote_wakeup`), and wake-ups the device did
    /// not take (no such tool, no answer, not connected).
    call_wakes_sent,
    call_wakes_failed,
    /// Calling actions sent to the node holding the device, and ones received that
    /// could not be read.
    call_actions_forwarded,
    call_actions_malformed,
    /// Device control messages (`listen`, `abort`, ...) ignored because the
    /// conversation is a call leg.
    call_control_ignored,
    /// UDP datagrams and bytes received / sent.
    udp_rx_datagrams,
    udp_rx_bytes,
    udp_tx_datagrams,
    udp_tx_bytes,
    /// Uplink datagrams dropped, by reason.
    udp_drop_malformed,
    udp_drop_unknown_id,
    udp_drop_replay,
    udp_drop_hijack,
    udp_drop_decrypt,
    udp_drop_queue_full,
    /// Uplink datagrams dropped (before decryption) for exceeding `udp.channel_rate`.
    udp_drop_rate_limited,
    /// Downlink frames dropped because the device's UDP address is not known yet.
    udp_drop_no_peer,
    /// Uplink sequence numbers skipped (lost before reaching us).
    udp_uplink_gaps,
    /// Channels whose device address moved (NAT rebinding).
    udp_rebinds,
    /// UDP socket send errors.
    udp_send_errors,
    /// Downlink frames dropped because the socket's send queue was full.
    udp_drop_send_queue_full,
    /// Downlink frames larger than one datagram (dropped).
    udp_drop_downlink_oversized,
    /// Authenticated UDP channels (AES-GCM): datagrams whose tag did not verify, and
    /// datagrams older than the replay window.
    udp_drop_auth,
    udp_drop_stale,
    /// Conversations started, by audio transport (stock AES-CTR, AES-GCM, QUIC).
    audio_sessions_ctr,
    audio_sessions_gcm,
    audio_sessions_quic,
    /// Hellos refused because the device's group requires an authenticated transport
    /// the device did not announce.
    hellos_refused_transport_policy,
    /// QUIC connections open now (gauge), and how connections ended before attaching.
    quic_connections,
    quic_attached,
    quic_handshake_failed,
    quic_refused_no_attach,
    quic_refused_unknown_token,
    quic_refused_reused_token,
    quic_refused_expired_token,
    /// QUIC connections whose conversation had already ended (closed with code 0).
    quic_refused_ended,
    /// QUIC connections refused because `quic.max_connections` were open.
    quic_refused_limit,
    /// Tokens never presented before they expired.
    quic_tokens_expired,
    /// QUIC audio datagrams and bytes, each way.
    quic_rx_datagrams,
    quic_rx_bytes,
    quic_tx_datagrams,
    quic_tx_bytes,
    /// QUIC audio datagrams or control frames that were malformed (dropped).
    quic_drop_malformed,
    /// QUIC downlink datagrams the connection could not take (dropped).
    quic_drop_send,
    /// Attached QUIC connections whose client address changed (connection migration).
    quic_migrations,
    /// Attached QUIC connections closed or lost by the device.
    quic_closed_by_device,
    /// Upstream (xiaozhi-server) WebSocket connections opened / failed, by reason.
    upstream_connects,
    upstream_failed_refused,
    upstream_failed_timeout,
    upstream_failed_auth,
    upstream_failed_handshake,
    upstream_failed_hello,
    /// Upstream conversations that ended in failure after the hello (closed mid-turn,
    /// connection lost, protocol error).
    upstream_failed_midway,
    /// Uplink frames dropped because the upstream was too slow to take them (oldest first).
    upstream_audio_dropped,
    /// Device JSON dropped because the upstream was too slow to take it.
    upstream_text_dropped,
    /// Upstream frames that were not valid (bad binary header, non-JSON text).
    upstream_malformed,
    /// Upstream MCP `initialize` / `tools/list` answered from the device tool cache.
    mcp_cache_answers,
    /// Chat-history records: stored in the database, skipped by the device's policy,
    /// written to the journal while the database was away, replayed from it.
    history_records_stored,
    history_records_skipped,
    history_records_journaled,
    history_records_replayed,
    /// Database writes that failed or timed out (the batch went to the journal).
    history_write_failures,
    /// Records lost: the recorder's queue was full, or the journal could not be written.
    history_records_lost,
    /// Records waiting for the writer (gauge) and bytes in the journal (gauge).
    history_queue_depth,
    history_journal_bytes,
    /// Uplink frames the echo pipeline did not play: over its per-turn cap, or arriving
    /// while it plays a turn back to a half-duplex device.
    echo_frames_dropped,
    /// Uplink frames the socket task played straight back (realtime echo, reflect mode).
    echo_frames_reflected,
    /// Presence transitions reported by the session layer.
    presence_transitions,
    /// Presence records written to the store.
    presence_writes,
    /// Heartbeats that refreshed this node's entries.
    presence_heartbeats,
    /// Presence store round trips that failed or timed out (the state is kept and
    /// written when the store returns).
    presence_errors,
    /// `ai_device.last_connected_at` rows updated / update failures.
    presence_last_connected_updates,
    presence_last_connected_errors,
    /// Admin commands answered, by outcome.
    admin_commands_ok,
    admin_commands_failed,
    /// Events (session, chat, upstream) not published because the event feed lagged.
    events_dropped,
    /// HTTP requests and connections refused, by reason: body over
    /// `http.max_body_bytes`, handler over `http.request_timeout_secs`, headers not sent
    /// within `http.header_timeout_secs`, over `http.max_connections`, a `/ws/admin`
    /// message over `http.ws_max_message_bytes`.
    http_rejected_body_too_large,
    http_rejected_request_timeout,
    http_rejected_header_timeout,
    http_rejected_connection_limit,
    http_rejected_ws_message_too_large,
    /// TLS certificates reloaded from disk, and reloads that failed (the previous
    /// certificate stays in use).
    tls_reloads,
    tls_reload_failures,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Relaxed);
    }

    /// Records one duration in a histogram, in seconds (a few atomic operations; for
    /// per-conversation or per-batch events, not per packet).
    pub fn observe(histogram: &Histogram, elapsed: Duration) {
        histogram.observe(elapsed.as_secs_f64());
    }
}

/// The gateway's histograms, in base units (seconds). Exported as they are by
/// [`exposition::render`].
#[derive(Debug)]
pub struct Histograms {
    /// `xiaozhi_session_duration_seconds`: how long conversations last, hello to end.
    pub session_duration: Histogram,
    /// `xiaozhi_upstream_connect_seconds`: start of the connect to the speech server's
    /// hello, for the attempts that succeeded.
    pub upstream_connect: Histogram,
    /// `xiaozhi_history_write_seconds`: one chat-history batch written to the database.
    pub history_write: Histogram,
    /// `xiaozhi_first_audio_seconds`: end of the user's speech (the device's `listen
    /// stop` or the server's `stt`, whichever comes first) to the first reply audio the
    /// gateway sends the device.
    pub first_audio: Histogram,
    /// `xiaozhi_push_delivery_seconds`: a push queued to written to its device (or, for
    /// wake, acknowledged), for pushes whose device was connected and idle.
    pub push_delivery: Histogram,
}

impl Histograms {
    /// Every histogram, for the exposition.
    pub fn all(&self) -> [&Histogram; 5] {
        [
            &self.session_duration,
            &self.upstream_connect,
            &self.history_write,
            &self.first_audio,
            &self.push_delivery,
        ]
    }
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            session_duration: histogram(
                "xiaozhi_session_duration_seconds",
                "Duration of device conversations, from the hello to their end.",
                &[
                    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                ],
            ),
            upstream_connect: histogram(
                "xiaozhi_upstream_connect_seconds",
                "Time from starting to connect to the speech server to its hello \
                 (TCP, TLS, WebSocket upgrade, hello exchange), successful attempts only.",
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            history_write: histogram(
                "xiaozhi_history_write_seconds",
                "Time to write one batch of chat-history records to the database \
                 (successful writes; failures are xiaozhi_history_write_failures_total).",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            first_audio: histogram(
                "xiaozhi_first_audio_seconds",
                "End of the user's speech (device listen stop or server stt, whichever \
                 first) to the first reply audio sent to the device.",
                &[0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0],
            ),
            push_delivery: histogram(
                "xiaozhi_push_delivery_seconds",
                "A push queued to written to its device (wake: to the device's \
                 acknowledgement), for pushes whose device was connected and idle when queued.",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
        }
    }
}

/// How the UDP audio path's work is spread over its shards (`udp.shards`): datagrams
/// each shard's socket received, and channels each holds. A shard takes its handles once
/// at start-up, so counting costs what any other counter does.
#[derive(Debug)]
pub struct UdpShardMetrics {
    /// `xiaozhi_udp_shard_datagrams_total{shard}`.
    pub datagrams: IntCounterVec,
    /// `xiaozhi_udp_shard_channels{shard}`, refreshed by each shard's sweep.
    pub channels: IntGaugeVec,
}

impl UdpShardMetrics {
    /// Both families, for the exposition.
    pub fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 2] {
        [
            Box::new(self.datagrams.clone()),
            Box::new(self.channels.clone()),
        ]
    }
}

impl Default for UdpShardMetrics {
    fn default() -> Self {
        UdpShardMetrics {
            datagrams: IntCounterVec::new(
                Opts::new(
                    "xiaozhi_udp_shard_datagrams_total",
                    "UDP audio datagrams received, by the shard (socket and receive task, \
                     udp.shards) that received them: how the audio work is spread over cores.",
                ),
                &["shard"],
            )
            // A constant, valid name and label; checked by the unit tests.
            .expect("valid counter options"),
            channels: IntGaugeVec::new(
                Opts::new(
                    "xiaozhi_udp_shard_channels",
                    "UDP audio channels routed by each shard (refreshed every few seconds).",
                ),
                &["shard"],
            )
            .expect("valid gauge options"),
        }
    }
}

/// Builds a histogram from constant options.
fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        // Only a bad name or unsorted buckets fail, and these are constants checked by
        // the unit tests.
        .expect("valid histogram options")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_build_and_observe_in_seconds() {
        let m = Metrics::default();
        Metrics::observe(&m.histograms.session_duration, Duration::from_millis(1500));
        assert_eq!(m.histograms.session_duration.get_sample_count(), 1);
        assert!((m.histograms.session_duration.get_sample_sum() - 1.5).abs() < 1e-9);
        for h in m.histograms.all() {
            let desc = &prometheus::core::Collector::desc(h)[0].fq_name;
            assert!(
                desc.starts_with("xiaozhi_") && desc.ends_with("_seconds"),
                "{desc}"
            );
        }
    }
}
