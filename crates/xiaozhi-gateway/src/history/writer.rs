//! The write-behind writer: records from every conversation go through one bounded
//! queue to one task that batches them into transactions.
//!
//! Recording never waits for the database. When a write fails or takes longer than
//! `write_timeout`, the batch goes to the on-disk journal and so does everything after
//! it, to keep order, until a replay has moved the whole journal into the database
//! (tried every `retry_interval`, and at start, so a journal left by a previous run is
//! replayed too). The device's recording policy (`chat_history_conf`) is looked up at
//! write time, cached for a minute, and decides whether audio is decoded and kept.
//!
//! Shutdown drains: the queue is closed, what is in it is written (or journaled), and
//! the task ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::audio::{WAV_HEADER_LEN, packet_samples_48k};
use super::decoder::WavDecoder;
use super::journal::Journal;
use super::record::{ChatRecord, OpusAudio};
use super::store::{DevicePolicy, Store, StoreError, StoredRecord};
use crate::metrics::Metrics;

pub use crate::config::RecordMode;

/// Writer settings (from `history.*`).
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub queue: usize,
    pub batch: usize,
    pub write_timeout: Duration,
    pub retry_interval: Duration,
    /// For devices outside manager-api's tables.
    pub mode: RecordMode,
    /// Offset of the time zone `created_at` is written in, minutes east of UTC.
    pub utc_offset_minutes: i32,
    /// Threads that decode recorded audio to WAV (`history.decode_threads`).
    pub decode_threads: usize,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            queue: 10_000,
            batch: 256,
            write_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_secs(5),
            mode: RecordMode::Audio,
            utc_offset_minutes: 480,
            decode_threads: 1,
        }
    }
}

/// A stored record, for live consumers (the admin feed).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredEvent {
    pub mac_address: String,
    pub agent_id: Option<String>,
    pub session_id: String,
    pub chat_type: u8,
    pub content: String,
    pub has_audio: bool,
    pub created_at: String,
}

/// Where conversations hand their records; cheap to clone.
#[derive(Clone)]
pub struct HistoryHandle {
    tx: mpsc::Sender<ChatRecord>,
    metrics: Arc<Metrics>,
}

impl HistoryHandle {
    /// Queues a record, waiting for room (for load generators; conversations use
    /// [`record`](Self::record), which never waits).
    pub async fn record_waiting(&self, record: ChatRecord) -> bool {
        self.tx.send(record).await.is_ok()
    }

    /// Queues a record without waiting. A full queue loses the record (counted): it
    /// only fills if the journal's disk cannot keep up.
    pub fn record(&self, record: ChatRecord) {
        match self.tx.try_send(record) {
            Ok(()) => Metrics::set(
                &self.metrics.history_queue_depth,
                (self.tx.max_capacity() - self.tx.capacity()) as u64,
            ),
            Err(_) => {
                Metrics::inc(&self.metrics.history_records_lost);
                warn!("chat-history queue full; record lost");
            }
        }
    }
}

/// The writer task and its state.
pub struct HistoryWriter {
    rx: mpsc::Receiver<ChatRecord>,
    store: Store,
    journal: Journal,
    decoder: WavDecoder,
    settings: WriterSettings,
    metrics: Arc<Metrics>,
    policies: HashMap<String, (Instant, DevicePolicy)>,
    events: broadcast::Sender<StoredEvent>,
    /// Where in the journal the replay has got to.
    replayed_to: u64,
    database_down: bool,
    /// Set once the schema is in place: the `content` length limit, if any.
    ready: Option<Option<usize>>,
    /// Whether manager-api's device and agent tables are there, and since when we know.
    managed: Option<(Instant, bool)>,
}

/// Most WAV bytes one transaction carries (and so the most decoded audio in memory):
/// a batch of long utterances is written in several transactions rather than holding
/// tens of megabytes of PCM at once.
const MAX_WAV_BYTES_IN_FLIGHT: u64 = 4 << 20;

/// Policies are looked up again after this long.
const POLICY_TTL: Duration = Duration::from_secs(60);
/// Records moved from the journal per replay step.
const REPLAY_CHUNK: usize = 512;

impl HistoryWriter {
    /// Starts the writer and its decoding threads; returns the handle for conversations
    /// and the task, or why the threads could not be started.
    pub fn start(
        store: Store,
        journal: Journal,
        settings: WriterSettings,
        metrics: Arc<Metrics>,
        events: broadcast::Sender<StoredEvent>,
        stop: CancellationToken,
    ) -> std::io::Result<(HistoryHandle, JoinHandle<()>)> {
        let decoder = WavDecoder::start(settings.decode_threads)?;
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        Metrics::set(&metrics.history_journal_bytes, journal.len());
        let writer = HistoryWriter {
            rx,
            store,
            journal,
            decoder,
            settings,
            metrics: metrics.clone(),
            policies: HashMap::new(),
            events,
            replayed_to: 0,
            database_down: false,
            ready: None,
            managed: None,
        };
        let task = tokio::spawn(writer.run(stop));
        Ok((HistoryHandle { tx, metrics }, task))
    }

    async fn run(mut self, stop: CancellationToken) {
        if !self.journal.is_empty() {
            info!(bytes = self.journal.len(), path = %self.journal.path().display(), "replaying the chat-history journal");
            self.replay().await;
        }
        let mut retry = tokio::time::interval(self.settings.retry_interval);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(self.settings.batch);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled(), if !self.rx.is_closed() => self.rx.close(),
                n = self.rx.recv_many(&mut batch, self.settings.batch) => {
                    if n == 0 {
                        break;
                    }
                    Metrics::set(&self.metrics.history_queue_depth, self.rx.len() as u64);
                    let records = std::mem::take(&mut batch);
                    self.handle(records).await;
                }
                _ = retry.tick(), if !self.journal.is_empty() => self.replay().await,
            }
        }
        if !self.journal.is_empty() {
            self.replay().await;
        }
        if !self.journal.is_empty() {
            info!(
                bytes = self.journal.len(),
                "chat-history journal kept for the next start"
            );
        }
    }

    /// Writes a batch, or journals it when the journal is in use or the write fails.
    async fn handle(&mut self, records: Vec<ChatRecord>) {
        if !self.journal.is_empty() {
            self.journal_batch(&records);
            return;
        }
        match self.write(&records).await {
            Ok(()) => {}
            Err(e) => {
                Metrics::inc(&self.metrics.history_write_failures);
                if !self.database_down {
                    warn!(error = %e, "chat-history database unavailable; recording to the journal until it returns");
                    self.database_down = true;
                }
                self.journal_batch(&records);
            }
        }
    }

    fn journal_batch(&mut self, records: &[ChatRecord]) {
        match self.journal.append(records) {
            Ok(()) => Metrics::add(
                &self.metrics.history_records_journaled,
                records.len() as u64,
            ),
            Err(e) => {
                Metrics::add(&self.metrics.history_records_lost, records.len() as u64);
                warn!(error = %e, lost = records.len(), "chat-history journal cannot be written; records lost");
            }
        }
        Metrics::set(&self.metrics.history_journal_bytes, self.journal.len());
    }

    /// Moves the journal into the database, chunk by chunk; stops at the first failure.
    async fn replay(&mut self) {
        loop {
            let chunk = match self.journal.read_from(self.replayed_to, REPLAY_CHUNK) {
                Ok(chunk) => chunk,
                Err(e) => {
                    warn!(error = %e, "chat-history journal cannot be read");
                    return;
                }
            };
            if chunk.records.is_empty() {
                break;
            }
            if let Err(e) = self.write(&chunk.records).await {
                Metrics::inc(&self.metrics.history_write_failures);
                tracing::debug!(error = %e, "journal replay deferred");
                return;
            }
            Metrics::add(
                &self.metrics.history_records_replayed,
                chunk.records.len() as u64,
            );
            self.replayed_to = chunk.next;
        }
        if let Err(e) = self.journal.clear() {
            warn!(error = %e, "chat-history journal cannot be emptied");
            return;
        }
        self.replayed_to = 0;
        Metrics::set(&self.metrics.history_journal_bytes, 0);
        if self.database_down {
            info!("chat-history database is back; journal replayed");
            self.database_down = false;
        }
    }

    /// Applies policies, decodes audio and writes the records: in one transaction, or
    /// in several when their audio would hold more than [`MAX_WAV_BYTES_IN_FLIGHT`] of
    /// WAV at once. Each database step must finish within the write timeout; decoding
    /// (on the low-priority decoder threads) is not timed, so a busy audio path slows
    /// recording down instead of sending it to the journal. A failure after some
    /// transactions went through journals the whole batch: the store ignores the
    /// records it already has when the journal is replayed.
    async fn write(&mut self, records: &[ChatRecord]) -> Result<(), StoreError> {
        let timeout = self.settings.write_timeout;
        let timed = |_: tokio::time::error::Elapsed| StoreError::Sql(sqlx::Error::PoolTimedOut);
        let (mut rows, mut audio) = tokio::time::timeout(timeout, self.prepare(records))
            .await
            .map_err(timed)??;
        let mut done = 0;
        while done < rows.len() {
            // The rows of this transaction: up to the WAV budget (at least one).
            let mut end = done;
            let mut wav_bytes = 0u64;
            while end < rows.len() {
                let next = audio[end].as_ref().map_or(0, |a| wav_size(&a.packets));
                if end > done && wav_bytes + next > MAX_WAV_BYTES_IN_FLIGHT {
                    break;
                }
                wav_bytes += next;
                end += 1;
            }
            for (row, audio) in rows[done..end].iter_mut().zip(&mut audio[done..end]) {
                if let Some(audio) = audio.take() {
                    row.wav = self.decoder.decode(audio).await;
                }
            }
            let chunk = &mut rows[done..end];
            let started = Instant::now();
            let new = tokio::time::timeout(timeout, self.store.write_batch(chunk))
                .await
                .map_err(timed)??;
            Metrics::observe(&self.metrics.histograms.history_write, started.elapsed());
            Metrics::add(&self.metrics.history_records_stored, new as u64);
            for r in chunk.iter_mut() {
                let _ = self.events.send(StoredEvent {
                    mac_address: r.mac_address.clone(),
                    agent_id: r.agent_id.clone(),
                    session_id: r.session_id.clone(),
                    chat_type: r.chat_type as u8,
                    content: r.content.clone(),
                    has_audio: r.wav.is_some(),
                    created_at: r.created_at.clone(),
                });
                // Stored: the WAV need not stay in memory until the whole batch is.
                r.wav = None;
            }
            done = end;
        }
        Ok(())
    }

    /// The rows to store (each with the audio to decode for it, when its device's policy
    /// keeps audio), after the schema is in place and each device's policy is known.
    async fn prepare(
        &mut self,
        records: &[ChatRecord],
    ) -> Result<(Vec<StoredRecord>, Vec<Option<OpusAudio>>), StoreError> {
        let content_limit = match self.ready {
            Some(limit) => limit,
            None => {
                // The database may have been away at start: migrate when it is here.
                self.store.migrate().await?;
                let limit = self.store.content_limit().await?;
                self.ready = Some(limit);
                limit
            }
        };
        let mut rows = Vec::with_capacity(records.len());
        let mut audio = Vec::with_capacity(records.len());
        for record in records {
            let (agent_id, keep_text, keep_audio) = match self.policy(&record.mac_address).await? {
                DevicePolicy::Unmanaged => match self.settings.mode {
                    RecordMode::Off => (None, false, false),
                    RecordMode::Text => (None, true, false),
                    RecordMode::Audio => (None, true, true),
                },
                DevicePolicy::Unknown => (None, false, false),
                DevicePolicy::Agent { agent_id, conf } => (Some(agent_id), conf >= 1, conf >= 2),
            };
            if !keep_text {
                Metrics::inc(&self.metrics.history_records_skipped);
                continue;
            }
            audio.push(record.audio.as_ref().filter(|_| keep_audio).cloned());
            rows.push(StoredRecord {
                record_id: record.record_id.clone(),
                mac_address: record.mac_address.clone(),
                agent_id,
                session_id: record.session_id.clone(),
                chat_type: record.chat_type,
                content: match content_limit {
                    Some(limit) => record.content.chars().take(limit).collect(),
                    None => record.content.clone(),
                },
                wav: None,
                created_at: format_time(record.created_at_ms, self.settings.utc_offset_minutes),
            });
        }
        Ok((rows, audio))
    }

    async fn policy(&mut self, mac: &str) -> Result<DevicePolicy, StoreError> {
        if let Some((at, policy)) = self.policies.get(mac)
            && at.elapsed() < POLICY_TTL
        {
            return Ok(policy.clone());
        }
        let managed = match self.managed {
            Some((at, managed)) if at.elapsed() < POLICY_TTL => managed,
            _ => {
                let managed = self.store.managed().await?;
                self.managed = Some((Instant::now(), managed));
                managed
            }
        };
        let policy = match managed {
            false => DevicePolicy::Unmanaged,
            true => self.store.agent_policy(mac).await?,
        };
        if self.policies.len() > 100_000 {
            self.policies.clear();
        }
        self.policies
            .insert(mac.to_owned(), (Instant::now(), policy.clone()));
        Ok(policy)
    }
}

/// Bytes of the WAV file `packets` decode to (16 kHz mono s16 plus the header).
fn wav_size(packets: &super::opus_packets::OpusPackets) -> u64 {
    let mut last = 2_880;
    let samples_48k: u64 = packets
        .iter()
        .map(|p| {
            last = packet_samples_48k(p).unwrap_or(last);
            u64::from(last)
        })
        .sum();
    samples_48k / 3 * 2 + WAV_HEADER_LEN as u64
}

/// `YYYY-MM-DD HH:MM:SS.mmm` for unix milliseconds at a UTC offset.
pub fn format_time(unix_ms: i64, utc_offset_minutes: i32) -> String {
    let offset = time::UtcOffset::from_whole_seconds(utc_offset_minutes * 60)
        .unwrap_or(time::UtcOffset::UTC);
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(offset);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_in_the_configured_zone() {
        // 2023-11-14 22:13:20.123 UTC
        let ms = 1_700_000_000_123;
        assert_eq!(format_time(ms, 0), "2023-11-14 22:13:20.123");
        assert_eq!(format_time(ms, 480), "2023-11-15 06:13:20.123");
        assert_eq!(format_time(ms, -300), "2023-11-14 17:13:20.123");
    }
}
