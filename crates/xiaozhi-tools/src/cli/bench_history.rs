//! `xiaozhi-gateway bench-history`: sustained chat-history writes (records/s) against a
//! database, or (`--fill`) a database filled with realistic rows for the history API and
//! the console to be measured against.

use std::process::ExitCode;

use clap::Args;

use crate::bench::command::print_report;
use crate::bench::history::{BenchConfig, FillConfig};

#[derive(Args)]
pub struct BenchHistoryArgs {
    /// Database to write to (its rows use MACs starting with 02:be).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    database_url: String,
    #[arg(long, default_value_t = 50_000)]
    records: u64,
    /// Fill instead of measuring the writer: write `--records` rows for `--devices`
    /// devices, user and assistant taking turns in sessions spread over the last `--days`
    /// days, with multi-row INSERTs, and leave them in the database.
    #[arg(long)]
    fill: bool,
    /// With `--fill`: how many devices the rows belong to.
    #[arg(long, default_value_t = 1000, requires = "fill")]
    devices: u32,
    /// With `--fill`: sessions start within this many days before now.
    #[arg(long, default_value_t = 30, requires = "fill")]
    days: u32,
    /// With `--fill`: the zone the times are written in, as `history.utc_offset_minutes`.
    #[arg(
        long,
        default_value_t = 480,
        allow_hyphen_values = true,
        requires = "fill"
    )]
    utc_offset_minutes: i32,
    /// With `--fill`: seeds the generated devices, sessions and texts.
    #[arg(long, default_value_t = 1, requires = "fill")]
    seed: u64,
    /// Records per transaction at most.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Opus frames of audio per record, decoded to WAV and stored (0: text only).
    #[arg(long, default_value_t = 0)]
    audio_frames: u32,
    #[arg(long)]
    json: bool,
}

pub async fn bench_history(args: BenchHistoryArgs) -> ExitCode {
    if args.fill {
        let config = FillConfig {
            database_url: args.database_url,
            rows: args.records,
            devices: args.devices,
            days: args.days,
            utc_offset_minutes: args.utc_offset_minutes,
            seed: args.seed,
        };
        return report_result(crate::bench::history::fill(config).await, args.json);
    }
    let config = BenchConfig {
        database_url: args.database_url,
        records: args.records,
        batch: args.batch,
        audio_frames: args.audio_frames,
    };
    report_result(crate::bench::history::run(config).await, args.json)
}

/// Prints a tool's report (success) or its error (failure).
fn report_result<R, E>(result: Result<R, E>, json: bool) -> ExitCode
where
    R: serde::Serialize + std::fmt::Display,
    E: std::fmt::Display,
{
    match result {
        Ok(report) => {
            print_report(&report, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
