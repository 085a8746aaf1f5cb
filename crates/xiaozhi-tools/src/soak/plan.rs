//! The fault schedule of a soak run, worked out before the run starts.
//!
//! Kept pure (durations in, windows out) so the layout can be unit-tested and printed
//! up front: a soak whose faults overlap, or leave no time to recover before the next
//! one or before the end, would measure nothing. The run has three parts: a warm-up
//! (the fleet ramps up and the baseline is taken), the faults spaced evenly, each given
//! at least as long again to recover, and a quiet tail so the end state is measured
//! after the last recovery, not during it.

use std::fmt;
use std::time::Duration;

/// One kind of fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Every connection to the database is cut and new ones are refused.
    Database,
    /// Every connection to Redis is cut and new ones are refused.
    Redis,
    /// Every connection to the speech server is cut and new ones are refused.
    Upstream,
    /// The mock speech server is stopped and started again on the same port.
    UpstreamRestart,
}

impl FaultKind {
    /// Every kind, in the order the plan schedules them.
    pub const ALL: [FaultKind; 4] = [
        FaultKind::Database,
        FaultKind::Redis,
        FaultKind::Upstream,
        FaultKind::UpstreamRestart,
    ];

    /// The short name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Database => "db",
            FaultKind::Redis => "redis",
            FaultKind::Upstream => "upstream",
            FaultKind::UpstreamRestart => "restart",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s.trim())
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When one fault is in force, from the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FaultWindow {
    pub kind: FaultKind,
    #[serde(serialize_with = "secs")]
    pub start: Duration,
    #[serde(serialize_with = "secs")]
    pub end: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    #[serde(serialize_with = "secs")]
    pub total: Duration,
    /// The fleet ramps up during this; the loaded baseline is taken at its end.
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    pub faults: Vec<FaultWindow>,
}

/// Why a plan cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "a {total_secs} s run is too short for {faults} fault(s) of {fault_secs} s each: \
         each needs {fault_secs} s down and as long again to recover after a {warmup_secs} s \
         warm-up (shorten --fault-secs or lengthen the run)"
    )]
    TooShort {
        total_secs: u64,
        faults: usize,
        fault_secs: u64,
        warmup_secs: u64,
    },
}

/// How long the mock speech server stays stopped when it is restarted (at most).
pub const RESTART_DOWN: Duration = Duration::from_secs(5);

/// The fault duration when none is given: a tenth of the run, between 5 s and a minute
/// (30 s for a 5-minute run, 60 s for anything from 10 minutes).
pub fn default_fault(total: Duration) -> Duration {
    (total / 10).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// The warm-up: a tenth of the run, between 20 s and 5 minutes.
pub fn warmup_for(total: Duration) -> Duration {
    (total / 10).clamp(Duration::from_secs(20), Duration::from_secs(300))
}

/// Lays out `kinds` (in that order) over a run of `total`, each cut lasting `fault`
/// (a restart lasts at most [`RESTART_DOWN`]). After the warm-up the rest of the run,
/// less a tail as long as one slot's recovery, is split into equal slots, one fault at
/// the start of each.
pub fn plan(total: Duration, fault: Duration, kinds: &[FaultKind]) -> Result<Plan, PlanError> {
    let warmup = warmup_for(total);
    if kinds.is_empty() {
        return Ok(Plan {
            total,
            warmup,
            faults: Vec::new(),
        });
    }
    let too_short = || PlanError::TooShort {
        total_secs: total.as_secs(),
        faults: kinds.len(),
        fault_secs: fault.as_secs(),
        warmup_secs: warmup.as_secs(),
    };
    // Slots for every fault plus a tail of half a slot at the end.
    let available = total.checked_sub(warmup).ok_or_else(too_short)?;
    let slot = available.mul_f64(1.0 / (kinds.len() as f64 + 0.5));
    if fault.is_zero() || slot < fault * 2 {
        return Err(too_short());
    }
    let faults = kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let start = warmup + slot * i as u32;
            let down = match kind {
                FaultKind::UpstreamRestart => fault.min(RESTART_DOWN),
                _ => fault,
            };
            FaultWindow {
                kind,
                start,
                end: start + down,
            }
        })
        .collect();
    Ok(Plan {
        total,
        warmup,
        faults,
    })
}

impl Plan {
    /// The faults in force at `t` from the start.
    pub fn active_at(&self, t: Duration) -> impl Iterator<Item = FaultKind> + '_ {
        self.faults
            .iter()
            .filter(move |w| w.start <= t && t < w.end)
            .map(|w| w.kind)
    }

    /// `db+redis`-style label of the faults in force at `t` (empty: none).
    pub fn label_at(&self, t: Duration) -> String {
        self.active_at(t)
            .map(FaultKind::name)
            .collect::<Vec<_>>()
            .join("+")
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} s run, {} s warm-up",
            self.total.as_secs(),
            self.warmup.as_secs()
        )?;
        for w in &self.faults {
            write!(
                f,
                "; {} {}-{} s",
                w.kind,
                w.start.as_secs(),
                w.end.as_secs()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn default_fault_scales_with_the_run() {
        assert_eq!(default_fault(S(300)), S(30));
        assert_eq!(default_fault(S(3600)), S(60));
        assert_eq!(default_fault(S(20)), S(5));
    }

    #[test]
    fn an_hour_with_every_fault() {
        let p = plan(S(3600), S(60), &FaultKind::ALL).unwrap();
        assert_eq!(p.warmup, S(300));
        let starts: Vec<u64> = p.faults.iter().map(|w| w.start.as_secs()).collect();
        // (3600 - 300) / 4.5 = 733.3 s per slot.
        assert_eq!(starts, [300, 1033, 1766, 2499]);
        assert_eq!(p.faults[0].end - p.faults[0].start, S(60));
        assert_eq!(p.faults[3].kind, FaultKind::UpstreamRestart);
        assert_eq!(p.faults[3].end - p.faults[3].start, RESTART_DOWN);
        // Nothing overlaps, and the last recovery ends before the run does.
        for pair in p.faults.windows(2) {
            assert!(pair[0].end + S(60) <= pair[1].start);
        }
        assert!(p.faults[3].end + S(60) <= p.total);
    }

    #[test]
    fn five_minutes_for_ci() {
        let p = plan(S(300), default_fault(S(300)), &FaultKind::ALL).unwrap();
        assert_eq!(p.warmup, S(30));
        for pair in p.faults.windows(2) {
            assert!(pair[0].end + S(30) <= pair[1].start, "{p}");
        }
        assert!(p.faults.last().unwrap().end + S(20) <= p.total, "{p}");
        assert_eq!(p.label_at(S(31)), "db");
        assert_eq!(p.label_at(S(29)), "");
        assert_eq!(p.active_at(S(299)).count(), 0);
    }

    #[test]
    fn refuses_faults_that_do_not_fit() {
        let e = plan(S(120), S(60), &FaultKind::ALL).unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        assert!(plan(S(10), S(5), &[FaultKind::Database]).is_err());
        assert!(plan(S(600), Duration::ZERO, &[FaultKind::Database]).is_err());
        assert!(plan(S(10), S(5), &[]).unwrap().faults.is_empty());
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
        }
        assert_eq!(FaultKind::parse("disk"), None);
    }
}
