//! What a soak leaves behind: `soak.csv` (one row per sample: memory, tasks, devices,
//! sessions, history, the faults in force), `summary.json` (the figures and the verdict)
//! and the text summary printed at the end.
//!
//! The CSV is the plot's input (`console/scripts/plot-soak.mjs` renders it to PNG), so
//! its columns are fixed and named in [`CSV_HEADER`]; the fault column holds the faults
//! in force (`db`, `redis+upstream`, empty for none) so the plot can shade them without
//! knowing the plan.

use std::fmt;
use std::io::{self, Write};

use super::check::Tally;
use super::fault_proxy::ProxyStats;
use super::fleet::FleetSnapshot;
use super::plan::Plan;

/// The CSV's columns, in order.
pub const CSV_HEADER: &str = "t_secs,phase,fault,rss_kb,hwm_kb,cpu_percent,tasks_alive,\
devices_connected,sessions_live,fleet_connected,conversations,turns_completed,\
journal_bytes,records_stored,records_journaled,records_lost";

/// One sample of the run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t_secs: f64,
    /// `idle` (before the fleet), `load`, `drain` (after the fleet stopped).
    pub phase: &'static str,
    /// Faults in force, `+`-separated.
    pub fault: String,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// The gateway's CPU since the previous sample, in percent of one core.
    pub cpu_percent: f64,
    pub tasks_alive: u64,
    /// The gateway's gauges.
    pub devices_connected: u64,
    pub sessions_live: u64,
    /// The fleet's view.
    pub fleet_connected: u64,
    pub conversations: u64,
    pub turns_completed: u64,
    pub journal_bytes: u64,
    pub records_stored: u64,
    pub records_journaled: u64,
    pub records_lost: u64,
}

impl Sample {
    /// The sample as one CSV line (no newline), columns as in [`CSV_HEADER`].
    pub fn csv_line(&self) -> String {
        format!(
            "{:.1},{},{},{},{},{:.1},{},{},{},{},{},{},{},{},{},{}",
            self.t_secs,
            self.phase,
            self.fault,
            self.rss_kb,
            self.hwm_kb,
            self.cpu_percent,
            self.tasks_alive,
            self.devices_connected,
            self.sessions_live,
            self.fleet_connected,
            self.conversations,
            self.turns_completed,
            self.journal_bytes,
            self.records_stored,
            self.records_journaled,
            self.records_lost,
        )
    }
}

/// Appends samples to `soak.csv` as they come, so a run that dies leaves its data.
pub struct CsvWriter<W: Write> {
    out: W,
}

impl<W: Write> CsvWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        writeln!(out, "{CSV_HEADER}")?;
        out.flush()?;
        Ok(CsvWriter { out })
    }

    pub fn push(&mut self, sample: &Sample) -> io::Result<()> {
        writeln!(self.out, "{}", sample.csv_line())?;
        self.out.flush()
    }
}

/// Smallest, largest, first and last of one figure over a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Span {
    pub first: u64,
    pub last: u64,
    pub min: u64,
    pub max: u64,
}

impl Span {
    /// Over the samples `pick` reads; `None` if there are none.
    pub fn of<'a>(
        samples: impl IntoIterator<Item = &'a Sample>,
        pick: impl Fn(&Sample) -> u64,
    ) -> Option<Span> {
        let mut it = samples.into_iter().map(pick);
        let first = it.next()?;
        let mut span = Span {
            first,
            last: first,
            min: first,
            max: first,
        };
        for v in it {
            span.last = v;
            span.min = span.min.min(v);
            span.max = span.max.max(v);
        }
        Some(span)
    }
}

/// The figures of the whole run and the verdict.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub devices: u32,
    pub minutes: f64,
    pub plan: Option<Plan>,
    /// Idle gateway before the fleet connected.
    pub idle_start_rss_kb: u64,
    pub idle_start_tasks: u64,
    /// Loaded, at the end of the warm-up (the baseline growth is measured from).
    pub loaded_start_rss_kb: u64,
    pub loaded_start_tasks: u64,
    /// Loaded, at the last sample before the fleet stopped.
    pub loaded_end_rss_kb: u64,
    pub loaded_end_tasks: u64,
    /// Idle again after the fleet left and the history drained.
    pub idle_end_rss_kb: u64,
    pub idle_end_tasks: u64,
    pub max_rss_kb: u64,
    pub hwm_kb: u64,
    pub max_tasks: u64,
    pub mean_cpu_percent: f64,
    pub fleet: FleetSnapshot,
    pub check: Option<Tally>,
    /// Whether the gateway settled after the load: no session, no device, nothing
    /// queued for or journaled by the history writer.
    pub journal_drained: bool,
    /// The gateway's gauges at the end of the drain.
    pub settle_state: String,
    pub drain_secs: f64,
    pub records_journaled: u64,
    pub records_replayed: u64,
    pub records_lost: u64,
    pub write_failures: u64,
    pub upstream_failures: u64,
    pub proxies: Vec<(String, ProxyStats)>,
    pub upstream_restarts: u32,
    pub gateway_exit: Option<String>,
    /// Panics the gateway logged (a task that panicked; the process may have lived on),
    /// and the first one's message.
    pub gateway_panics: u64,
    pub first_panic: Option<String>,
    /// Why the run failed (empty: it passed).
    pub failures: Vec<String>,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak: {} devices, {:.1} min", self.devices, self.minutes)?;
        if let Some(plan) = &self.plan {
            writeln!(f, "plan:           {plan}")?;
        }
        writeln!(
            f,
            "RSS:            idle {:.1} MB -> loaded {:.1} MB (warm-up end) -> {:.1} MB (load end), max {:.1} MB, HWM {:.1} MB, idle again {:.1} MB",
            mb(self.idle_start_rss_kb),
            mb(self.loaded_start_rss_kb),
            mb(self.loaded_end_rss_kb),
            mb(self.max_rss_kb),
            mb(self.hwm_kb),
            mb(self.idle_end_rss_kb),
        )?;
        writeln!(
            f,
            "tasks:          idle {} -> loaded {} -> {} (load end), max {}, idle again {}",
            self.idle_start_tasks,
            self.loaded_start_tasks,
            self.loaded_end_tasks,
            self.max_tasks,
            self.idle_end_tasks
        )?;
        writeln!(
            f,
            "gateway CPU:    {:.1}% of a core on average under load",
            self.mean_cpu_percent
        )?;
        let s = &self.fleet;
        writeln!(
            f,
            "fleet:          {} connects ({} failed), {} conversations ({} refused, {} ended by the gateway), {} turns complete, {} cut short, {} leaves ({} as new devices)",
            s.connects,
            s.connect_failures,
            s.conversations,
            s.refused,
            s.ended_by_gateway,
            s.turns_completed,
            s.turns_cut,
            s.leaves,
            s.new_devices
        )?;
        writeln!(
            f,
            "history:        {} journaled, {} replayed, {} lost, {} failed writes; settled after the load: {} ({:.0} s)",
            self.records_journaled,
            self.records_replayed,
            self.records_lost,
            self.write_failures,
            self.journal_drained,
            self.drain_secs
        )?;
        if let Some(t) = &self.check {
            writeln!(
                f,
                "records:        {} conversations checked, {} expected, {} stored, {} missing, {} duplicated, {} of cut-short turns, {} unexpected",
                t.conversations,
                t.records_expected,
                t.records_stored,
                t.missing,
                t.duplicated,
                t.partial_stored,
                t.unexpected
            )?;
            for e in &t.examples {
                writeln!(f, "  {e}")?;
            }
        }
        for (name, p) in &self.proxies {
            writeln!(
                f,
                "proxy {name:<9} {} passed, {} refused while cut, {} cut",
                p.passed, p.refused, p.cut
            )?;
        }
        writeln!(
            f,
            "upstream:       {} restart(s), {} connect/relay failures seen by the gateway",
            self.upstream_restarts, self.upstream_failures
        )?;
        if let Some(exit) = &self.gateway_exit {
            writeln!(f, "gateway exit:   {exit}")?;
        }
        if let Some(first) = &self.first_panic {
            writeln!(
                f,
                "gateway panics: {} (first: {first})",
                self.gateway_panics
            )?;
        }
        if self.passed() {
            write!(f, "verdict:        PASS")
        } else {
            write!(f, "verdict:        FAIL: {}", self.failures.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_match_the_header() {
        let s = Sample {
            t_secs: 12.34,
            phase: "load",
            fault: "db+redis".into(),
            rss_kb: 51_200,
            hwm_kb: 60_000,
            cpu_percent: 21.25,
            tasks_alive: 900,
            devices_connected: 660,
            sessions_live: 300,
            fleet_connected: 660,
            conversations: 10,
            turns_completed: 25,
            journal_bytes: 0,
            records_stored: 50,
            records_journaled: 0,
            records_lost: 0,
        };
        let line = s.csv_line();
        assert_eq!(line.split(',').count(), CSV_HEADER.split(',').count());
        assert!(
            line.starts_with("12.3,load,db+redis,51200,60000,21.2,900,660,300,"),
            "{line}"
        );
        let mut out = Vec::new();
        let mut w = CsvWriter::new(&mut out).unwrap();
        w.push(&s).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, [CSV_HEADER, line.as_str()]);
    }

    #[test]
    fn spans_follow_a_figure() {
        let samples: Vec<Sample> = [5u64, 9, 3, 7]
            .iter()
            .map(|&v| Sample {
                rss_kb: v,
                ..Sample::default()
            })
            .collect();
        let span = Span::of(&samples, |s| s.rss_kb).unwrap();
        assert_eq!(
            span,
            Span {
                first: 5,
                last: 7,
                min: 3,
                max: 9
            }
        );
        assert_eq!(Span::of(&[], |s| s.rss_kb), None);
    }

    #[test]
    fn the_summary_says_why_it_failed() {
        let mut s = Summary {
            devices: 10,
            ..Summary::default()
        };
        assert!(s.to_string().ends_with("PASS"));
        s.failures.push("2 records missing".into());
        assert!(!s.passed());
        assert!(s.to_string().contains("FAIL: 2 records missing"));
    }
}
