//! Pushes to devices nobody is talking to: `notify` (play a clip), `wake` (the device asks
//! its speech server, so "text in, the agent speaks"), `custom`, `alert`, `reboot`.
//!
//! The gateway holds every device's MQTT connection, so it is where a push can reach an
//! idle device. A push is queued in the history database first ([`store`]: it survives
//! restarts and every node of a cluster sees it), then delivered by the node that holds
//! its device, once the device is connected and idle ([`delivery`]), until `expires_at`.
//! Every state change is an event on the bus (`xiaozhi/devices/<mac_>/push`) and
//! `/ws/admin`.
//!
//! The rules of the request and of the device's messages are sans-IO in
//! `protocol::push`; this module is the I/O: targets resolved through presence, the queue,
//! the delivery task. Every way in (HTTP, the MQTT admin command, the Redis RPC, the CLI
//! through HTTP) calls [`PushService::submit`].

pub mod clip;
pub mod delivery;
pub mod redis_rpc;
pub mod store;

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::PushConfig;
use crate::events::{EventPublisher, PushEvent};
use crate::history::record::{new_id, now_ms};
use crate::history::store::StoreError;
use crate::metrics::Metrics;
use crate::presence::fleet::FleetQuery;
use crate::presence::tracker::PresenceTracker;
use crate::protocol::mac::Mac;
use crate::protocol::push::{self, InvalidPush, PushLimits, PushRequest, PushState, Target};
use delivery::Hint;
use store::{InsertError, PushFilter, PushRow, PushStore};

/// Why a push request was refused (nothing was queued).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("invalid push: {0}")]
    Invalid(#[from] InvalidPush),
    #[error(
        "unknown device(s): {0} (the gateway has not seen them within presence.offline_retention_secs)"
    )]
    UnknownDevice(String),
    #[error("no device matches the target")]
    NoDevices,
    #[error("queue full: {0}")]
    QueueFull(String),
    #[error("push store unavailable: {0}")]
    Unavailable(String),
    #[error("clip refused: {0}")]
    Clip(#[from] clip::ClipError),
}

impl PushError {
    /// The error code the HTTP API and the admin command answer with.
    pub fn code(&self) -> &'static str {
        match self {
            PushError::Invalid(_) => "invalid_push",
            PushError::UnknownDevice(_) | PushError::NoDevices => "unknown_device",
            PushError::QueueFull(_) => "queue_full",
            PushError::Unavailable(_) => "unavailable",
            PushError::Clip(_) => "invalid_clip",
        }
    }
}

impl From<StoreError> for PushError {
    fn from(e: StoreError) -> Self {
        PushError::Unavailable(e.to_string())
    }
}

/// What a request queued.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Submitted {
    /// The request's id: every device's push carries it (`GET /api/push?batch_id=`).
    pub batch_id: String,
    pub kind: &'static str,
    /// How many devices (one push each).
    pub devices: usize,
    /// Each device's push id, for requests of at most [`LISTED_IDS`] devices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pushes: Vec<PushRef>,
    pub expires_ms: i64,
}

/// One device's push in a [`Submitted`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushRef {
    pub id: String,
    pub mac_address: String,
}

/// Requests for more devices than this answer with the batch id only.
pub const LISTED_IDS: usize = 100;

/// Takes push requests and answers questions about pushes; the delivery task does the
/// sending.
pub struct PushService {
    store: PushStore,
    presence: PresenceTracker,
    events: EventPublisher,
    metrics: Arc<Metrics>,
    settings: PushConfig,
    hints: mpsc::Sender<Hint>,
    /// Where devices fetch uploaded clips (no trailing slash).
    clip_base_url: String,
    /// Transcodes running at once (each takes a core for a moment).
    transcodes: tokio::sync::Semaphore,
}

/// A clip uploaded for notify pushes (`POST /api/push/clips`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadedClip {
    pub id: String,
    /// What to put in a notify push's `audio_url`.
    pub audio_url: String,
    pub duration_ms: u64,
    /// Bytes served (mono Ogg Opus).
    pub bytes: usize,
    /// What was uploaded: `ogg_opus` (kept as it is), `wav` or `mp3` (converted).
    pub from: &'static str,
    pub expires_ms: i64,
}

/// Transcodes at once, at most.
const MAX_TRANSCODES: usize = 2;

impl PushService {
    pub fn new(
        store: PushStore,
        presence: PresenceTracker,
        events: EventPublisher,
        metrics: Arc<Metrics>,
        settings: PushConfig,
        hints: mpsc::Sender<Hint>,
        clip_base_url: String,
    ) -> Self {
        PushService {
            store,
            presence,
            events,
            metrics,
            settings,
            hints,
            clip_base_url: clip_base_url.trim_end_matches('/').to_owned(),
            transcodes: tokio::sync::Semaphore::new(MAX_TRANSCODES),
        }
    }

    /// Largest clip upload, in bytes (`push.max_clip_bytes`).
    pub fn max_clip_bytes(&self) -> usize {
        self.settings.max_clip_bytes
    }

    /// Checks an upload, converts it to mono Ogg Opus when it is WAV or MP3, and keeps
    /// it in the store for `push.clip_ttl_secs` under an unguessable id.
    pub async fn upload_clip(&self, bytes: bytes::Bytes) -> Result<UploadedClip, PushError> {
        let max_ms = self.settings.max_clip_secs.saturating_mul(1000);
        let prepared = {
            let _permit = self
                .transcodes
                .acquire()
                .await
                .map_err(|_| PushError::Unavailable("shutting down".into()))?;
            tokio::task::spawn_blocking(move || clip::prepare(&bytes, max_ms))
                .await
                .map_err(|e| PushError::Unavailable(format!("clip conversion: {e}")))?
        };
        let clip = match prepared {
            Ok(c) => c,
            Err(e) => {
                Metrics::inc(&self.metrics.push_clips_refused);
                tracing::info!(error = %e, "clip refused");
                return Err(e.into());
            }
        };
        let id = new_id();
        let now = now_ms();
        let expires_ms =
            now.saturating_add((self.settings.clip_ttl_secs as i64).saturating_mul(1000));
        self.store
            .insert_clip(
                &id,
                &clip.ogg,
                clip.duration_ms,
                clip.from.name(),
                now,
                expires_ms,
            )
            .await?;
        Metrics::inc(&self.metrics.push_clips_stored);
        tracing::info!(
            id,
            from = clip.from.name(),
            bytes = clip.ogg.len(),
            duration_ms = clip.duration_ms,
            "clip stored"
        );
        Ok(UploadedClip {
            audio_url: format!("{}/push/clips/{id}.ogg", self.clip_base_url),
            id,
            duration_ms: clip.duration_ms,
            bytes: clip.ogg.len(),
            from: clip.from.name(),
            expires_ms,
        })
    }

    /// A clip to serve, if it exists and has not expired.
    pub async fn clip(&self, id: &str) -> Result<Option<Vec<u8>>, PushError> {
        Ok(self.store.clip(id, now_ms()).await?)
    }

    pub fn limits(&self) -> PushLimits {
        PushLimits {
            max_message_bytes: self.settings.max_message_bytes,
            max_devices: self.settings.max_devices_per_request,
            max_ttl_secs: self.settings.max_ttl_secs,
        }
    }

    /// Checks a request, resolves its devices and queues one push per device, all or
    /// nothing; delivery starts at once for devices that are connected and idle.
    /// `device`: the device a topic or URL names (it stands for `to`); `source`: where the
    /// request came from (`http`, `mqtt`, `redis`).
    pub async fn submit(
        &self,
        body: &Value,
        device: Option<Mac>,
        source: &'static str,
    ) -> Result<Submitted, PushError> {
        let result = self.try_submit(body, device, source).await;
        if let Err(e) = &result {
            let counter = match e {
                PushError::Invalid(_) => &self.metrics.push_refused_invalid,
                PushError::UnknownDevice(_) | PushError::NoDevices => {
                    &self.metrics.push_refused_unknown_device
                }
                PushError::QueueFull(_) => &self.metrics.push_refused_queue_full,
                PushError::Unavailable(_) | PushError::Clip(_) => {
                    &self.metrics.push_refused_unavailable
                }
            };
            Metrics::inc(counter);
            tracing::info!(source, code = e.code(), error = %e, "push refused");
        }
        result
    }

    async fn try_submit(
        &self,
        body: &Value,
        device: Option<Mac>,
        source: &'static str,
    ) -> Result<Submitted, PushError> {
        let limits = self.limits();
        let PushRequest {
            kind,
            target,
            expiry,
        } = push::parse_request(body, device, &limits)?;
        let now = now_ms();
        let expires_ms = push::expires_at_ms(expiry, now, self.settings.default_ttl_secs, &limits)?;
        let macs = self.resolve(&target).await?;
        let batch_id = new_id();
        let fields = kind.to_stored();
        let rows: Vec<PushRow> = macs
            .iter()
            .map(|mac| PushRow {
                id: new_id(),
                batch_id: batch_id.clone(),
                mac_address: mac.clone(),
                kind: kind.name().to_owned(),
                fields: fields.clone(),
                state: PushState::Queued,
                error: None,
                node: None,
                source: source.to_owned(),
                created_ms: now,
                expires_ms,
                updated_ms: now,
            })
            .collect();
        self.store
            .insert(
                &rows,
                self.settings.max_per_device,
                self.settings.max_queued,
            )
            .await
            .map_err(|e| match e {
                InsertError::Store(e) => PushError::Unavailable(e.to_string()),
                full => PushError::QueueFull(full.to_string()),
            })?;
        Metrics::add(&self.metrics.push_queued, rows.len() as u64);
        for row in &rows {
            self.event(row, PushState::Queued, None);
        }
        self.events.push_queued(&batch_id, rows.len());
        // Delivery here now; other nodes start from the `push_queued` event, and every
        // node's sweep catches what a lost hint missed.
        if self.hints.try_send(Hint::Batch(batch_id.clone())).is_err() {
            tracing::debug!(
                batch_id,
                "push delivery busy: the next sweep picks the batch up"
            );
        }
        tracing::info!(
            batch_id,
            kind = kind.name(),
            devices = rows.len(),
            source,
            "push queued"
        );
        Ok(Submitted {
            batch_id,
            kind: kind.name(),
            devices: rows.len(),
            pushes: if rows.len() <= LISTED_IDS {
                rows.iter()
                    .map(|r| PushRef {
                        id: r.id.clone(),
                        mac_address: r.mac_address.clone(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            expires_ms,
        })
    }

    /// The devices a target names (colon form): listed devices must be known to presence
    /// (connected, or offline within its retention); a group or the fleet is every device
    /// presence remembers.
    async fn resolve(&self, target: &Target) -> Result<Vec<String>, PushError> {
        let store = self.presence.store();
        let unavailable = |e: crate::presence::PresenceError| PushError::Unavailable(e.to_string());
        match target {
            Target::Devices(macs) => {
                let names: Vec<String> = macs.iter().map(Mac::colon).collect();
                let mut unknown = Vec::new();
                for chunk in names.chunks(1000) {
                    let found = store.get_many(chunk).await.map_err(unavailable)?;
                    for (name, record) in chunk.iter().zip(found) {
                        if record.is_none() && self.presence.local(name).is_none() {
                            unknown.push(name.clone());
                        }
                    }
                }
                if !unknown.is_empty() {
                    let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
                    return Err(PushError::UnknownDevice(format!(
                        "{}{}",
                        shown.join(", "),
                        if unknown.len() > 5 {
                            format!(" and {} more", unknown.len() - 5)
                        } else {
                            String::new()
                        }
                    )));
                }
                Ok(names)
            }
            Target::Group(_) | Target::Fleet => {
                let mut out = Vec::new();
                let mut query = FleetQuery {
                    limit: crate::presence::MAX_PAGE,
                    ..FleetQuery::default()
                };
                loop {
                    let page = store.fleet(&query, now_ms()).await.map_err(unavailable)?;
                    out.extend(
                        page.devices
                            .into_iter()
                            .filter(|r| match target {
                                Target::Group(g) => r.group == *g,
                                _ => true,
                            })
                            .map(|r| r.mac_address),
                    );
                    if out.len() as u64 > self.settings.max_queued {
                        return Err(PushError::QueueFull(format!(
                            "the target names more than push.max_queued ({}) devices",
                            self.settings.max_queued
                        )));
                    }
                    match page.next {
                        Some(next) => query.after = Some(next),
                        None => break,
                    }
                }
                if out.is_empty() {
                    return Err(PushError::NoDevices);
                }
                Ok(out)
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<PushRow>, PushError> {
        Ok(self.store.get(id).await?)
    }

    pub async fn list(&self, filter: &PushFilter) -> Result<Vec<PushRow>, PushError> {
        Ok(self.store.list(filter).await?)
    }

    /// A request refused before it reached [`PushService::submit`] (a way in that could
    /// not translate it), counted with the others.
    pub fn refused_invalid(&self) {
        Metrics::inc(&self.metrics.push_refused_invalid);
    }

    /// Another node queued a batch (its `push_queued` event): deliver what is ours.
    pub fn batch_queued_elsewhere(&self, batch_id: String) {
        let _ = self.hints.try_send(Hint::Batch(batch_id));
    }

    fn event(&self, row: &PushRow, state: PushState, error: Option<&str>) {
        emit(&self.events, row, state, error);
    }
}

/// Publishes a push's state change.
pub(crate) fn emit(events: &EventPublisher, row: &PushRow, state: PushState, error: Option<&str>) {
    let Ok(mac) = row.mac_address.parse::<Mac>() else {
        return;
    };
    events.push_state(
        &mac,
        PushEvent {
            id: row.id.clone(),
            batch_id: row.batch_id.clone(),
            mac_address: row.mac_address.clone(),
            kind: row.kind.clone(),
            state: state.as_str(),
            error: error.map(str::to_owned),
            node: events.node().to_owned(),
            at_ms: now_ms(),
        },
    );
}
