//! The task of one conversation.
//!
//! Opens the audio channel and the pipeline, answers the device's hello, runs the
//! pipeline's conversation, and ends on whichever comes first: the pipeline returning,
//! an end request from the manager (device goodbye, disconnect, replacement, shutdown)
//! or the idle timeout. The audio channel lease is dropped on the way out, which frees
//! the connection id.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{DeviceOut, EndReason, SessionDeps};
use crate::audio::channel::{Attach, AudioChannel};
use crate::metrics::Metrics;
use crate::pipeline::{ControlMessage, ConversationEnd, ConversationIo, OpenRequest};
use crate::protocol::control::{self, HelloRequest, QuicHelloOffer, UdpOffer};
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::datagram::nonce_template;
use crate::protocol::negotiation::{self, AudioTransport, Offered};

/// How often the idle timeout is checked.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long a pipeline may take to hang up once the session ends its conversation.
const HANG_UP: Duration = Duration::from_secs(1);

pub(crate) struct ConversationStart {
    /// Tells this conversation apart from the device's earlier and later ones.
    pub serial: u64,
    pub device: Arc<DeviceIdentity>,
    pub hello: HelloRequest,
    pub control: mpsc::Receiver<ControlMessage>,
    pub end: oneshot::Receiver<EndReason>,
    /// Where control JSON from a QUIC control stream goes (the manager's queue).
    pub control_in: crate::quic::ControlIn,
}

/// Runs one conversation to its end and returns why it ended.
pub(crate) async fn run(deps: Arc<SessionDeps>, start: ConversationStart) -> EndReason {
    let ConversationStart {
        serial,
        device,
        hello,
        control,
        mut end,
        control_in,
    } = start;
    let mut out = DeviceOut::new(device.mac, deps.sink.clone());
    let started = tokio::time::Instant::now();
    let entry = deps.directory.get(&device.mac);
    let remote = entry.as_ref().map(|e| e.remote);
    let mcp = entry.map(|e| e.mcp);

    let transport = negotiation::choose(
        &hello.features,
        Offered {
            udp_aead: deps.transports.udp_aead,
            quic: deps.quic.is_some(),
        },
        &device.group,
        deps.transports
            .require_authenticated
            .contains(&device.group),
    );
    let transport = match transport {
        Ok(t) => t,
        Err(refused) => {
            Metrics::inc(&deps.metrics.hellos_refused);
            Metrics::inc(&deps.metrics.hellos_refused_transport_policy);
            warn!(reason = %refused, "hello refused by transport policy");
            out.send_json(control::alert(None, &refused.to_string()));
            out.send_json(control::goodbye(""));
            return EndReason::PipelineFailed(refused.to_string());
        }
    };

    // Everything up to the hello reply can be cut short by an end request too.
    let setup = async {
        let channel = open_channel(&deps, transport, control_in)
            .await
            .map_err(|e| (false, e))?;
        let opened = deps
            .pipeline
            .open(OpenRequest {
                device: device.clone(),
                hello: hello.clone(),
                remote,
            })
            .await
            .map_err(|e| (true, e.message))?;
        Ok::<_, (bool, String)>((channel, opened))
    };
    let (mut channel, opened) = tokio::select! {
        r = setup => match r {
            Ok(v) => v,
            Err((upstream, message)) => {
                Metrics::inc(&deps.metrics.hellos_refused);
                warn!(reason = %message, "conversation could not be opened");
                if upstream && let Some(events) = &deps.events {
                    events.upstream_failed(&device.mac, &message);
                }
                out.send_json(control::alert(None, &message));
                // The device has no session id yet; the one it holds while waiting for
                // our hello is empty, and firmware closes on a goodbye that matches it.
                out.send_json(control::goodbye(""));
                return EndReason::PipelineFailed(message);
            }
        },
        reason = &mut end => return reason.unwrap_or(EndReason::Shutdown),
    };

    let session_id = opened.session_id.clone();
    let span = tracing::Span::current();
    span.record("session_id", session_id.as_str());
    out.send_json(server_hello(
        &deps,
        &session_id,
        &opened.downlink_audio,
        &channel,
    ));
    if let Some(stream) = channel.control_stream() {
        out = out.with_stream(stream);
    }
    Metrics::inc(&deps.metrics.hellos_ok);
    Metrics::inc(&deps.metrics.sessions_live);
    Metrics::inc(match channel.attach.label() {
        "gcm" => &deps.metrics.audio_sessions_gcm,
        "quic" => &deps.metrics.audio_sessions_quic,
        _ => &deps.metrics.audio_sessions_ctr,
    });
    deps.directory
        .set_conversation(&device.mac, serial, Some(session_id.clone()));
    info!(%session_id, transport = channel.attach.label(), channel = ?channel.attach, pipeline = deps.pipeline.name(), "conversation started");
    if let Some(events) = &deps.events {
        events.session_started(
            &device.mac,
            &session_id,
            deps.pipeline.name(),
            channel.attach.label(),
        );
    }

    let (uplink, downlink) = channel.take_io();
    let io = ConversationIo {
        session_id: session_id.clone(),
        uplink,
        control,
        downlink,
        device: out.clone(),
        uplink_audio: hello.audio_params.clone(),
        downlink_audio: opened.downlink_audio.clone(),
        mcp,
        stop: CancellationToken::new(),
        recorder: deps.history.clone().map(|history| {
            crate::history::recorder::ConversationRecorder::new(
                history,
                device.mac.colon(),
                session_id.clone(),
                hello.audio_params.sample_rate,
                opened.downlink_audio.sample_rate,
                deps.history_max_packets,
            )
        }),
    };
    let stop = io.stop.clone();
    let idle_timeout = deps.idle_timeout;
    let idle = async {
        let mut tick = tokio::time::interval(IDLE_CHECK);
        loop {
            tick.tick().await;
            if channel.idle_for() >= idle_timeout {
                break;
            }
        }
    };
    let running = opened.conversation.run(io);
    tokio::pin!(running);
    let reason = tokio::select! {
        ended = &mut running => match ended {
            ConversationEnd::Finished => EndReason::PipelineFinished,
            ConversationEnd::Failed(why) => EndReason::PipelineFailed(why),
        },
        reason = &mut end => reason.unwrap_or(EndReason::Shutdown),
        _ = idle => EndReason::Idle,
        () = channel.device_left() => EndReason::DeviceClosedTransport,
    };
    if !matches!(
        reason,
        EndReason::PipelineFinished | EndReason::PipelineFailed(_)
    ) {
        // Let the pipeline hang up (e.g. close its WebSocket) before it is dropped.
        stop.cancel();
        let _ = tokio::time::timeout(HANG_UP, &mut running).await;
    }
    let stats = channel.stats();
    drop(channel);
    deps.directory.set_conversation(&device.mac, serial, None);

    if let EndReason::PipelineFailed(why) = &reason {
        out.send_json(control::alert(Some(&session_id), why));
    }
    if reason.tell_device() {
        out.send_json(control::goodbye(&session_id));
    }
    Metrics::dec(&deps.metrics.sessions_live);
    Metrics::inc(&deps.metrics.sessions_ended);
    let duration_ms = started.elapsed().as_millis() as u64;
    Metrics::observe(
        &deps.metrics.histograms.session_duration,
        Duration::from_millis(duration_ms),
    );
    info!(
        %session_id,
        reason = reason.label(),
        duration_ms,
        uplink_packets = stats.uplink_packets,
        uplink_bytes = stats.uplink_bytes,
        downlink_packets = stats.downlink_packets,
        downlink_bytes = stats.downlink_bytes,
        dropped = stats.dropped,
        "conversation ended"
    );
    if let Some(events) = &deps.events {
        events.session_ended(
            &device.mac,
            &crate::admin::events::SessionEnd {
                session_id: &session_id,
                reason: reason.label(),
                duration_ms,
                stats,
            },
        );
    }
    reason
}

/// Opens the conversation's audio channel on the chosen transport.
async fn open_channel(
    deps: &SessionDeps,
    transport: AudioTransport,
    control_in: crate::quic::ControlIn,
) -> Result<AudioChannel, String> {
    match (transport, &deps.quic) {
        (AudioTransport::Udp(encryption), _) => deps
            .audio
            .open_channel(encryption)
            .await
            .map_err(|e| e.to_string()),
        (AudioTransport::Quic, Some(quic)) => Ok(quic.open_channel(Some(control_in))),
        (AudioTransport::Quic, None) => Err("QUIC was chosen but is not enabled".to_owned()),
    }
}

/// Our hello for the channel's transport.
fn server_hello(
    deps: &SessionDeps,
    session_id: &str,
    downlink_audio: &control::AudioParams,
    channel: &AudioChannel,
) -> String {
    match &channel.attach {
        Attach::Quic { token, offer } => control::quic_server_hello(
            session_id,
            downlink_audio,
            &QuicHelloOffer {
                server: deps.udp_public_host.clone(),
                port: offer.port,
                cert_sha256: offer.cert_sha256,
                token: *token,
                token_ttl_ms: offer.token_ttl_ms,
            },
        ),
        Attach::Udp {
            connection_id,
            key,
            encryption,
        } => control::server_hello(
            session_id,
            downlink_audio,
            &UdpOffer {
                server: deps.udp_public_host.clone(),
                port: deps.udp_public_port,
                key_hex: hex::encode(key),
                nonce_hex: hex::encode(nonce_template(*connection_id)),
                encryption: *encryption,
            },
        ),
    }
}
