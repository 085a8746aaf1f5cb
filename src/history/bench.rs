//! `xiaozhi-gateway bench-history`: sustained write throughput of the chat-history
//! writer against a real database, with the gateway's own batching, policy lookups and
//! (optionally) audio decoding. Prints records/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::journal::Journal;
use super::record::{ChatRecord, ChatType, OpusAudio, now_ms};
use super::store::Store;
use super::writer::{HistoryWriter, RecordMode, WriterSettings};
use crate::metrics::Metrics;

/// What to write.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub database_url: String,
    pub records: u64,
    pub batch: usize,
    /// Opus frames of audio per record (0: text only).
    pub audio_frames: u32,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: &'static str,
    pub records: u64,
    pub batch: usize,
    pub audio_frames: u32,
    pub stored: u64,
    pub journaled: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} records ({} stored, {} journaled), batch {}, {} audio frames each: {:.2} s, {:.0} records/s",
            self.backend,
            self.records,
            self.stored,
            self.journaled,
            self.batch,
            self.audio_frames,
            self.seconds,
            self.records_per_sec
        )
    }
}

/// Runs the benchmark; the rows it writes carry the MAC `02:be:nc:h0:00:00`-style
/// prefix `02:be` so they are easy to delete.
pub async fn run(config: BenchConfig) -> Result<BenchReport, String> {
    let store = Store::connect(&config.database_url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    let journal_dir = std::env::temp_dir().join(format!("xz-bench-journal-{}", std::process::id()));
    let journal = Journal::open(&journal_dir).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::default());
    let (events, _) = tokio::sync::broadcast::channel(16);
    let stop = CancellationToken::new();
    let settings = WriterSettings {
        batch: config.batch,
        mode: if config.audio_frames > 0 {
            RecordMode::Audio
        } else {
            RecordMode::Text
        },
        write_timeout: Duration::from_secs(30),
        ..WriterSettings::default()
    };
    let backend = store.backend();
    let (handle, task) = HistoryWriter::start(
        store,
        journal,
        settings,
        metrics.clone(),
        events,
        stop.clone(),
    );
    let frame = crate::simulator::audio::synthetic_frame(0, 60);
    let started = Instant::now();
    for i in 0..config.records {
        let audio = (config.audio_frames > 0).then(|| OpusAudio {
            sample_rate: 16_000,
            packets: vec![frame.clone(); config.audio_frames as usize],
        });
        let record = ChatRecord::new(
            // 100 devices taking turns, as a fleet does.
            format!("02:be:00:00:00:{:02x}", i % 100),
            format!("bench-session-{}", i / 20),
            if i % 2 == 0 {
                ChatType::User
            } else {
                ChatType::Assistant
            },
            format!("benchmark utterance number {i}, about as long as a sentence"),
            audio,
            now_ms(),
        );
        if !handle.record_waiting(record).await {
            return Err("writer stopped".into());
        }
    }
    drop(handle);
    stop.cancel();
    let _ = task.await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&journal_dir);
    let m = metrics.snapshot();
    Ok(BenchReport {
        backend,
        records: config.records,
        batch: config.batch,
        audio_frames: config.audio_frames,
        stored: m.history_records_stored,
        journaled: m.history_records_journaled,
        seconds,
        records_per_sec: m.history_records_stored as f64 / seconds,
    })
}
