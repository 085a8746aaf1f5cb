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

/// One thread's CPU time so far, from `/proc/<pid>/task/<tid>/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSample {
    pub tid: u32,
    /// The thread's name (`comm`), e.g. `tokio-runtime-w`.
    pub name: String,
    /// User plus kernel time, in clock ticks.
    pub ticks: u64,
}

/// One thread's share of a core over a window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ThreadShare {
    pub tid: u32,
    pub name: String,
    pub total_percent: f64,
}

/// Every thread of process `pid`. Threads that exit while they are read are skipped.
pub fn sample_threads(pid: u32) -> Result<Vec<ThreadSample>, ProcError> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|source| ProcError::Read {
        pid: pid.to_string(),
        file: "task",
        source,
    })?;
    let mut threads = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(name), Some((user, system, _))) = (parse_comm(&stat), parse_stat(&stat)) else {
            continue;
        };
        threads.push(ThreadSample {
            tid,
            name,
            ticks: user + system,
        });
    }
    threads.sort_by_key(|t| t.tid);
    Ok(threads)
}

/// Each thread's share of a core between two readings `wall_secs` apart, busiest first;
/// threads below `min_percent` are left out.
pub fn thread_shares(
    a: &[ThreadSample],
    b: &[ThreadSample],
    wall_secs: f64,
    min_percent: f64,
) -> Vec<ThreadShare> {
    if wall_secs <= 0.0 {
        return Vec::new();
    }
    let hz = ticks_per_second();
    let mut shares: Vec<ThreadShare> = b
        .iter()
        .map(|t| {
            let before = a.iter().find(|x| x.tid == t.tid).map_or(0, |x| x.ticks);
            ThreadShare {
                tid: t.tid,
                name: t.name.clone(),
                total_percent: t.ticks.saturating_sub(before) as f64 / hz / wall_secs * 100.0,
            }
        })
        .filter(|s| s.total_percent >= min_percent)
        .collect();
    shares.sort_by(|x, y| y.total_percent.total_cmp(&x.total_percent));
    shares
}

/// The command name (field 2, between the first `(` and the last `)`).
fn parse_comm(stat: &str) -> Option<String> {
    Some(stat[stat.find('(')? + 1..stat.rfind(')')?].to_owned())
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
    fn thread_names_keep_their_spaces_and_parentheses() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 7 0";
        assert_eq!(parse_comm(stat).as_deref(), Some("my (odd) name"));
    }

    #[test]
    fn a_busy_thread_is_seen_busier_than_an_idle_one() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, mpsc};

        let pid = std::process::id();
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = mpsc::channel();
        let busy = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("xz-busy-test".into())
                .spawn(move || {
                    let _ = started_tx.send(());
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
                .unwrap()
        };
        // The thread has named itself before it signals.
        started_rx.recv().unwrap();
        let a = sample_threads(pid).unwrap();
        let started = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(400));
        let b = sample_threads(pid).unwrap();
        let wall = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        let shares = thread_shares(&a, &b, wall, 0.0);
        let busy = shares
            .iter()
            .find(|s| s.name == "xz-busy-test")
            .unwrap_or_else(|| panic!("the busy thread is listed: {shares:?}"));
        assert!(busy.total_percent > 30.0, "{shares:?}");
        // Busiest first, and this thread (asleep) well below it.
        assert_eq!(shares[0].name, "xz-busy-test", "{shares:?}");
        let me = own_thread_id();
        let mine = shares
            .iter()
            .find(|s| s.tid == me)
            .map_or(0.0, |s| s.total_percent);
        assert!(mine < busy.total_percent / 2.0, "{shares:?}");
    }

    /// This thread's id, as `/proc/<pid>/task` names it.
    fn own_thread_id() -> u32 {
        // `/proc/thread-self` links to `<pid>/task/<tid>`.
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        link.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    #[test]
    fn shares_are_per_thread_and_busiest_first() {
        let t = |tid, ticks| ThreadSample {
            tid,
            name: format!("t{tid}"),
            ticks,
        };
        let hz = ticks_per_second();
        let a = [t(1, 0), t(2, 0), t(3, 0)];
        let b = [
            t(1, hz as u64 / 10),
            t(2, hz as u64),
            t(3, 0),
            t(4, hz as u64 / 2),
        ];
        let shares = thread_shares(&a, &b, 1.0, 1.0);
        let got: Vec<(u32, i64)> = shares
            .iter()
            .map(|s| (s.tid, s.total_percent.round() as i64))
            .collect();
        assert_eq!(got, vec![(2, 100), (4, 50), (1, 10)]);
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
