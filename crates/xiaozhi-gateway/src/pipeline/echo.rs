//! The echo pipeline: plays a device's own audio back to it. Used when no upstream is
//! configured, for bring-up, demos and load tests.
//!
//! It behaves like a speech pipeline so a real device's UI goes through its states:
//! * `realtime` listening (full-duplex devices, and the simulator): each uplink frame is
//!   sent back as it arrives; the first frame of a turn is preceded by `tts start`, and
//!   `tts stop` follows once the device has been silent for `realtime_idle_ms`.
//! * `auto` / `manual` listening: a turn is collected until `listen stop` or until
//!   `max_turn_secs` of audio, then played back between `tts start` and `tts stop` (a
//!   half-duplex device stops capturing while it speaks, so echoing frame by frame would
//!   cut it off after one frame).
//!
//! In `realtime` mode, once `tts start` is out and nothing is queued, the socket task is
//! asked to play frames back itself as they arrive (`Downlink::set_reflect`). The device
//! paces them, so the same frames go out in the same order without two task hand-offs
//! each; this conversation then only watches for the end of the turn.
//!
//! Playback is paced at the frame duration: a frame goes out no earlier than one frame
//! ahead of the real-time playback clock, so the device's decode queue never floods and
//! is never starved by jitter. `abort` or a new `listen start` stops playback.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::time::Instant;

use super::{
    Conversation, ConversationEnd, ConversationIo, OpenRequest, Opened, Pipeline, PipelineError,
};
use crate::audio::UplinkFrame;
use crate::config::EchoConfig;
use crate::metrics::Metrics;
use crate::protocol::control::{self, DeviceMessage, ListenState};

/// Where an unarmed timer points (never reached: it is only polled once armed).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

/// Hard cap on frames held for one turn, whatever the config says (bounded memory).
const MAX_TURN_FRAMES: usize = 2_000;

/// The echo pipeline.
#[derive(Debug, Clone)]
pub struct EchoPipeline {
    config: EchoConfig,
    metrics: Arc<Metrics>,
}

impl EchoPipeline {
    pub fn new(config: EchoConfig, metrics: Arc<Metrics>) -> Self {
        EchoPipeline { config, metrics }
    }
}

#[async_trait]
impl Pipeline for EchoPipeline {
    fn name(&self) -> &'static str {
        "echo"
    }

    async fn open(&self, request: OpenRequest) -> Result<Opened, PipelineError> {
        let session_id = new_session_id();
        Ok(Opened {
            session_id,
            // The echo returns the device's own frames, so the downlink has exactly the
            // uplink's parameters.
            downlink_audio: request.hello.audio_params.clone(),
            conversation: Box::new(EchoConversation {
                config: self.config.clone(),
                metrics: self.metrics.clone(),
            }),
        })
    }
}

/// A random 32-hex-digit session id.
pub fn new_session_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

struct EchoConversation {
    config: EchoConfig,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Collect a turn, then play it back.
    Turn,
    /// Echo frame by frame.
    Realtime,
}

struct Echo<'a> {
    io: &'a mut ConversationIo,
    metrics: Arc<Metrics>,
    mode: Mode,
    frame: Duration,
    max_turn_frames: usize,
    realtime_idle: Duration,
    /// Frames collected for the current turn (turn mode).
    collected: Vec<UplinkFrame>,
    /// Frames waiting to be played.
    queue: VecDeque<UplinkFrame>,
    /// Between our `tts start` and `tts stop`.
    speaking: bool,
    /// When the next frame is due on the playback clock.
    clock: Option<Instant>,
    /// The socket task is reflecting the uplink for us (realtime mode, caught up).
    reflecting: bool,
}

#[async_trait]
impl Conversation for EchoConversation {
    async fn run(self: Box<Self>, io: &mut ConversationIo) -> ConversationEnd {
        let frame = Duration::from_millis(u64::from(io.uplink_audio.frame_duration));
        let max_turn_frames = ((self.config.max_turn_secs * 1000)
            / u64::from(io.uplink_audio.frame_duration).max(1))
            as usize;
        let mut echo = Echo {
            io,
            metrics: self.metrics,
            mode: Mode::Turn,
            frame,
            max_turn_frames: max_turn_frames.clamp(1, MAX_TURN_FRAMES),
            realtime_idle: Duration::from_millis(self.config.realtime_idle_ms),
            collected: Vec::new(),
            queue: VecDeque::new(),
            speaking: false,
            clock: None,
            reflecting: false,
        };
        echo.run().await
    }
}

impl Echo<'_> {
    async fn run(&mut self) -> ConversationEnd {
        // Two long-lived timers, re-armed only when needed: a frame that may go out now
        // goes out without any timer, and the realtime turn-end timer is re-armed once
        // per firing rather than once per uplink frame (timer registrations were the
        // largest user-space cost of the echo path).
        let send_timer = tokio::time::sleep(FAR_FUTURE);
        let end_timer = tokio::time::sleep(FAR_FUTURE);
        tokio::pin!(send_timer, end_timer);
        let (mut send_armed, mut end_armed) = (false, false);
        loop {
            while self
                .next_send_at(Instant::now())
                .is_some_and(|at| at <= Instant::now())
            {
                self.play_one().await;
            }
            self.reflect_when_caught_up();
            match self.next_send_at(Instant::now()) {
                Some(at) => {
                    if !send_armed || send_timer.deadline() != at {
                        send_timer.as_mut().reset(at);
                    }
                    send_armed = true;
                }
                None => send_armed = false,
            }
            match self.realtime_turn_end_at() {
                // An armed timer that fires early is re-armed below after the check.
                Some(at) if !end_armed => {
                    end_timer.as_mut().reset(at);
                    end_armed = true;
                }
                Some(_) => {}
                None => end_armed = false,
            }
            tokio::select! {
                _ = self.io.stop.cancelled() => return ConversationEnd::Finished,
                frame = self.io.uplink.recv() => match frame {
                    Some(frame) => self.on_uplink(frame),
                    None => return ConversationEnd::Finished,
                },
                msg = self.io.control.recv() => match msg {
                    Some(msg) => self.on_control(msg.message),
                    None => return ConversationEnd::Finished,
                },
                () = &mut send_timer, if send_armed => send_armed = false,
                () = &mut end_timer, if end_armed => {
                    end_armed = false;
                    if self.realtime_turn_end_at().is_some_and(|at| at <= Instant::now()) {
                        self.stop_speaking();
                    }
                }
            }
        }
    }

    fn on_uplink(&mut self, frame: UplinkFrame) {
        match self.mode {
            Mode::Realtime => {
                self.start_speaking();
                if self.queue.len() < MAX_TURN_FRAMES {
                    self.queue.push_back(frame);
                } else {
                    Metrics::inc(&self.metrics.echo_frames_dropped);
                }
            }
            Mode::Turn => {
                // A half-duplex device does not capture while it speaks; anything that
                // still arrives during playback is not part of a turn.
                if self.speaking {
                    Metrics::inc(&self.metrics.echo_frames_dropped);
                    return;
                }
                self.collected.push(frame);
                if self.collected.len() >= self.max_turn_frames {
                    self.play_turn();
                }
            }
        }
    }

    fn on_control(&mut self, msg: DeviceMessage) {
        match msg {
            DeviceMessage::Listen {
                state: ListenState::Start,
                mode,
                ..
            } => {
                // Barge-in: the user talks again, stop playing the previous turn.
                if self.speaking {
                    self.queue.clear();
                    self.stop_speaking();
                }
                self.mode = if mode.as_deref() == Some("realtime") {
                    Mode::Realtime
                } else {
                    Mode::Turn
                };
                // Audio travels by UDP and this message by MQTT, so the first frames of
                // the new turn may already be here: keep them.
                if self.mode == Mode::Realtime && !self.collected.is_empty() {
                    self.start_speaking();
                    self.queue.extend(self.collected.drain(..));
                }
            }
            DeviceMessage::Listen {
                state: ListenState::Stop,
                ..
            } if self.mode == Mode::Turn => self.play_turn(),
            DeviceMessage::Abort { .. } => {
                self.queue.clear();
                self.collected.clear();
                self.stop_speaking();
            }
            _ => {}
        }
    }

    fn play_turn(&mut self) {
        if self.collected.is_empty() {
            return;
        }
        self.start_speaking();
        self.queue.extend(self.collected.drain(..));
    }

    fn start_speaking(&mut self) {
        if !self.speaking {
            self.speaking = true;
            self.io
                .device
                .send_json(control::tts(&self.io.session_id, "start", None));
        }
    }

    /// In realtime mode, once `tts start` is out and nothing of the uplink is waiting,
    /// the socket task can play frames back itself as they arrive (`Downlink::set_reflect`):
    /// the same frames in the same order, without two task hand-offs each.
    fn reflect_when_caught_up(&mut self) {
        if !self.reflecting
            && self.mode == Mode::Realtime
            && self.speaking
            && self.queue.is_empty()
            && self.io.uplink.is_empty()
        {
            self.io.downlink.set_reflect(true);
            self.reflecting = true;
        }
    }

    fn stop_reflecting(&mut self) {
        if self.reflecting {
            self.io.downlink.set_reflect(false);
            self.reflecting = false;
        }
    }

    fn stop_speaking(&mut self) {
        // Before `tts stop`, so no frame is played back after the device was told the
        // turn is over.
        self.stop_reflecting();
        if self.speaking {
            self.speaking = false;
            self.clock = None;
            self.io
                .device
                .send_json(control::tts(&self.io.session_id, "stop", None));
        }
    }

    /// When the head of the queue may be sent: at most one frame ahead of the clock
    /// (`now` when the clock is not running).
    fn next_send_at(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        Some(match self.clock {
            Some(due) => due.checked_sub(self.frame).unwrap_or(due),
            None => now,
        })
    }

    /// In realtime mode, when the turn ends for lack of uplink audio.
    fn realtime_turn_end_at(&self) -> Option<Instant> {
        (self.speaking && self.queue.is_empty()).then(|| match self.mode {
            // The socket task stamps every accepted datagram, reflected or not.
            Mode::Realtime => Instant::from(self.io.downlink.last_uplink()) + self.realtime_idle,
            // In turn mode the turn ends as soon as the queue has drained.
            Mode::Turn => self.clock.unwrap_or_else(Instant::now),
        })
    }

    async fn play_one(&mut self) {
        let Some(frame) = self.queue.pop_front() else {
            return;
        };
        let now = Instant::now();
        // Restart the clock after an underrun, so a late frame does not license a burst.
        let due = match self.clock {
            Some(due) if due + self.frame > now => due,
            _ => now,
        };
        self.clock = Some(due + self.frame);
        self.io.downlink.send(frame.timestamp, &frame.opus).await;
    }
}
