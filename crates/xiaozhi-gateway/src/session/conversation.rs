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

use super::call_leg::{CallEvent, LegCommand, LegFrame, PeerRoute, RemoteSeal, SILENCE_FRAME};
use super::{DeviceOut, EndReason, SessionDeps};
use crate::audio::channel::{Attach, AudioChannel};
use crate::metrics::Metrics;
use crate::pipeline::{ControlMessage, ConversationEnd, ConversationIo, OpenRequest};
use crate::protocol::call_book::CallId;
use crate::protocol::control::{self, HelloRequest, QuicHelloOffer, UdpOffer};
use crate::protocol::credentials::DeviceIdentity;
use crate::protocol::datagram::nonce_template;
use crate::protocol::mac::Mac;
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
    pub control_in: crate::audio::quic::ControlIn,
    /// What the calling service asks of this conversation (become a call leg, hang up).
    pub legs: mpsc::Receiver<LegCommand>,
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
        mut legs,
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
    let mut io = ConversationIo {
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
                &hello.audio_params,
                &opened.downlink_audio,
                deps.history_max_utterance_ms,
            )
        }),
    };
    let stop = io.stop.clone();
    let idle_timeout = deps.idle_timeout;
    // The pipeline runs until the conversation ends or the calling service makes it a
    // call leg; either way it gets its moment to hang up on the speech server.
    let pipeline_end = {
        let idle = async {
            let mut tick = tokio::time::interval(IDLE_CHECK);
            loop {
                tick.tick().await;
                if channel.idle_end(idle_timeout).is_some() {
                    break;
                }
            }
        };
        tokio::pin!(idle);
        let running = opened.conversation.run(&mut io);
        tokio::pin!(running);
        let mut legs_open = true;
        let outcome = loop {
            tokio::select! {
                ended = &mut running => break Ok(match ended {
                    ConversationEnd::Finished => EndReason::PipelineFinished,
                    ConversationEnd::Failed(why) => EndReason::PipelineFailed(why),
                }),
                reason = &mut end => break Ok(reason.unwrap_or(EndReason::Shutdown)),
                _ = &mut idle => break Ok(EndReason::Idle),
                () = channel.device_left() => break Ok(EndReason::DeviceClosedTransport),
                command = legs.recv(), if legs_open => match command {
                    Some(LegCommand::Join { call, peer }) => break Err((call, peer)),
                    // Not a leg: nothing to hang up.
                    Some(LegCommand::HangUp { .. }) => {}
                    None => legs_open = false,
                },
            }
        };
        let pipeline_done = matches!(
            outcome,
            Ok(EndReason::PipelineFinished | EndReason::PipelineFailed(_))
        );
        if !pipeline_done {
            // Let the pipeline hang up (e.g. close its WebSocket) before it is dropped.
            stop.cancel();
            let _ = tokio::time::timeout(HANG_UP, &mut running).await;
        }
        outcome
    };
    let reason = match pipeline_end {
        Ok(reason) => {
            // A device being rung that leaves ends the call that rings it.
            if reason.is_departure()
                && let Some(call) = deps.call_legs.take_ringing(device.mac)
            {
                report_left(&deps, device.mac, call, &reason).await;
            }
            reason
        }
        Err((call, peer)) => {
            // What was recorded of the speech-server conversation is complete; the call
            // itself is not chat history.
            io.recorder.take();
            io.downlink.set_reflect(false);
            deps.directory
                .set_call(&device.mac, serial, Some((call, peer.clone())));
            info!(call, peer = ?peer, "conversation became a call leg");
            let (reason, call) = run_leg(
                &deps,
                device.mac,
                &mut io,
                &channel,
                LegEnds {
                    serial,
                    end: &mut end,
                    commands: &mut legs,
                    idle_timeout,
                },
                call,
                peer,
            )
            .await;
            if reason != EndReason::CallEnded {
                report_left(&deps, device.mac, call, &reason).await;
            }
            reason
        }
    };
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
            &crate::events::SessionEnd {
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
    control_in: crate::audio::quic::ControlIn,
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

/// What ends a call leg besides the call's own hang-up, and what it reports under.
struct LegEnds<'a> {
    /// The conversation's serial (for the directory).
    serial: u64,
    end: &'a mut oneshot::Receiver<EndReason>,
    commands: &'a mut mpsc::Receiver<LegCommand>,
    idle_timeout: Duration,
}

/// Runs the conversation as a leg of `call` until the call hangs it up or the device
/// leaves; returns why, and the call it was last a leg of.
async fn run_leg(
    deps: &SessionDeps,
    mac: Mac,
    io: &mut ConversationIo,
    channel: &AudioChannel,
    ends: LegEnds<'_>,
    mut call: CallId,
    mut peer: PeerRoute,
) -> (EndReason, CallId) {
    let metrics = &deps.metrics;
    let (inbound_tx, mut inbound) = mpsc::channel::<LegFrame>(super::call_leg::LEG_QUEUE);
    let own = channel.splice_target();
    deps.call_legs
        .register(mac, call, inbound_tx.clone(), own.clone());
    // The peer leg's queue, once it has registered (a local peer only).
    let mut local_peer: Option<mpsc::Sender<LegFrame>> = None;
    // Sealing to and from a peer on another node, kept for the call (its sequence must
    // never restart under the call's key).
    let mut remote: Option<RemoteSeal> = None;
    // Whether the socket seals this channel's uplink straight into the peer's channel
    // (both on this node over UDP): frames then no longer come here.
    let mut spliced = false;
    let mut tick = tokio::time::interval(IDLE_CHECK);
    let mut commands_open = true;
    let reason = loop {
        tokio::select! {
            reason = &mut *ends.end => break reason.unwrap_or(EndReason::Shutdown),
            command = ends.commands.recv(), if commands_open => match command {
                Some(LegCommand::Join { call: joined, peer: route }) => {
                    if joined != call {
                        deps.call_legs.unregister(mac, call);
                        deps.call_legs.register(mac, joined, inbound_tx.clone(), own.clone());
                        call = joined;
                    }
                    if route != peer {
                        info!(call, peer = ?route, "call leg bridged");
                        deps.directory.set_call(&mac, ends.serial, Some((call, route.clone())));
                        if spliced && let Some(own) = &own {
                            deps.audio.splice(own.connection_id, None).await;
                            spliced = false;
                        }
                    }
                    peer = route;
                    local_peer = None;
                }
                Some(LegCommand::HangUp { call: ended }) if ended == call => break EndReason::CallEnded,
                Some(LegCommand::HangUp { .. }) => {}
                None => commands_open = false,
            },
            frame = io.uplink.recv() => match frame {
                Some(frame) => match &peer {
                    PeerRoute::Ringing(_) => {
                        Metrics::inc(&metrics.call_frames_silence);
                        io.downlink.send(frame.timestamp, SILENCE_FRAME).await;
                    }
                    PeerRoute::Local(peer_mac) => {
                        // Both channels UDP on this node: from the next datagram on, the
                        // socket seals this uplink straight into the peer's downlink.
                        if !spliced
                            && let Some(own) = &own
                            && let Some(target) = deps.call_legs.splice_target(*peer_mac, call)
                        {
                            deps.audio.splice(own.connection_id, Some(target)).await;
                            spliced = true;
                        }
                        if local_peer.as_ref().is_none_or(|tx| tx.is_closed()) {
                            local_peer = deps.call_legs.inbound(*peer_mac, call);
                        }
                        match local_peer.as_ref().map(|tx| tx.try_send(LegFrame::Plain(frame))) {
                            Some(Ok(())) => Metrics::inc(&metrics.call_frames_local),
                            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                                Metrics::inc(&metrics.call_frames_dropped_queue_full);
                            }
                            _ => Metrics::inc(&metrics.call_frames_dropped_no_peer),
                        }
                    }
                    PeerRoute::Remote { mac: peer_mac, node, key, caller } => {
                        let seal = remote.get_or_insert_with(|| RemoteSeal::new(call, key, *caller));
                        let sent = seal
                            .seal(frame.timestamp, &frame.opus)
                            .is_some_and(|sealed| deps.call_legs.send_remote(node, *peer_mac, call, sealed));
                        if !sent {
                            Metrics::inc(&metrics.call_frames_dropped_no_peer);
                        }
                    }
                },
                None => break EndReason::DeviceClosedTransport,
            },
            Some(frame) = inbound.recv() => match frame {
                LegFrame::Plain(frame) => {
                    io.downlink.send(frame.timestamp, &frame.opus).await;
                }
                LegFrame::Sealed(sealed) => {
                    let opened = match (&peer, &mut remote) {
                        (PeerRoute::Remote { key, caller, .. }, remote) => remote
                            .get_or_insert_with(|| RemoteSeal::new(call, key, *caller))
                            .open(&sealed),
                        _ => None,
                    };
                    match opened {
                        Some((timestamp, opus)) => {
                            io.downlink.send(timestamp, opus).await;
                        }
                        None => Metrics::inc(&metrics.call_frames_dropped_auth),
                    }
                }
            },
            Some(_) = io.control.recv() => Metrics::inc(&metrics.call_control_ignored),
            _ = tick.tick() => {
                if let Some(reason) = channel.idle_end(ends.idle_timeout) {
                    break reason;
                }
            }
            () = channel.device_left() => break EndReason::DeviceClosedTransport,
        }
    };
    deps.call_legs.unregister(mac, call);
    (reason, call)
}

/// Tells the calling service that `mac` left `call`.
async fn report_left(deps: &SessionDeps, mac: Mac, call: CallId, reason: &EndReason) {
    if let Some(events) = &deps.call_events {
        let event = CallEvent::Left {
            mac,
            call,
            reason: reason.label(),
        };
        // The service takes events as fast as they come; the wait is bounded anyway.
        let _ = tokio::time::timeout(Duration::from_secs(1), events.send(event)).await;
    }
}
