//! CPU time (user and kernel) and memory of any process, read from `/proc`.
//!
//! The load tool samples the process under test (and itself) at the start and end of its
//! measured window; the difference in CPU ticks over the wall time is the share of one
//! core each spent, split into user space and kernel, which is exactly the split that
//! tells a lean server (mostly kernel: socket calls) from a heavy one.

use std::time::Instant;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    /// CPU time in user space, in clock ticks.
    pub user_ticks: u64,
    /// CPU time in the kernel on the process's behalf, in clock ticks.
    pub system_ticks: u64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    pub threads: u64,
}

/// CPU used between two samples, in percent of one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CpuShare {
    pub user_percent: f64,
    pub system_percent: f64,
    pub total_percent: f64,
}

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read /proc/{pid}/{file}: {source}")]
    Read {
        pid: String,
        file: &'static str,
        source: std::io::Error,
    },
    #[error("/proc/{pid}/stat has an unexpected format")]
    Format { pid: String },
}

/// Reads process `pid` (or this process for `None`).
pub fn sample(pid: Option<u32>) -> Result<ProcSample, ProcError> {
    let pid = pid.map_or_else(|| "self".to_owned(), |p| p.to_string());
    let at = Instant::now();
    let read = |file: &'static str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| ProcError::Read {
            pid: pid.clone(),
            file,
            source,
        })
    };
    let stat = read("stat")?;
    let (user_ticks, system_ticks, threads) =
        parse_stat(&stat).ok_or_else(|| ProcError::Format { pid: pid.clone() })?;
    let status = read("status")?;
    let rss_bytes = parse_rss_kib(&status).unwrap_or(0) * 1024;
    Ok(ProcSample {
        at,
        user_ticks,
        system_ticks,
        rss_bytes,
        threads,
    })
}

/// `(utime, stime, num_threads)` from the text of `/proc/<pid>/stat`. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; utime is field 14, stime 15, threads 20.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)?, field(15)?, field(20)?))
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on every Linux we know).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The CPU share used between `a` and `b`.
pub fn cpu_between(a: &ProcSample, b: &ProcSample) -> CpuShare {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return CpuShare::default();
    }
    let hz = ticks_per_second();
    let pct = |ticks: u64| ticks as f64 / hz / wall * 100.0;
    let user_percent = pct(b.user_ticks.saturating_sub(a.user_ticks));
    let system_percent = pct(b.system_ticks.saturating_sub(a.system_ticks));
    CpuShare {
        user_percent,
        system_percent,
        total_percent: user_percent + system_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 7 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((250, 75, 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rss_is_read_from_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t   5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(5120));
    }

    #[test]
    fn this_process_can_be_sampled_and_burns_cpu() {
        let a = sample(None).unwrap();
        let mut x = 0u64;
        let until = Instant::now() + std::time::Duration::from_millis(120);
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let b = sample(None).unwrap();
        assert!(b.rss_bytes > 0 && b.threads >= 1);
        let share = cpu_between(&a, &b);
        assert!(share.total_percent > 20.0, "{share:?}");
    }
}
