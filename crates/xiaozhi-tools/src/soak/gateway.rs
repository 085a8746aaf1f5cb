//! The gateway under test, as a child process (`<this binary> serve`).
//!
//! A separate process, so that the RSS and task counts the soak reports are the
//! gateway's alone (the fleet, the mock speech server and the proxies run in the soak's
//! process), and so that a crash of the gateway is seen as one. It is configured only
//! through `XZ_*` variables, binds ephemeral loopback ports and logs JSON to a file; the
//! bound addresses come from its `xiaozhi-gateway serving` log line, as `.ci/run` finds
//! them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the gateway gets to say it is serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the gateway could not be started.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot start the gateway ({exe}): {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("cannot open the gateway's log {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    #[error("the gateway exited with {status} before serving; its log is {log}")]
    Exited { status: ExitStatus, log: String },
    #[error(
        "the gateway did not log \"xiaozhi-gateway serving\" within {secs} s; its log is {log}"
    )]
    NotServing { secs: u64, log: String },
}

/// A running gateway process.
pub struct GatewayProcess {
    child: Child,
    pub pid: u32,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub log: PathBuf,
}

/// The device MQTT and HTTP addresses from a JSON log line, if it is the
/// `xiaozhi-gateway serving` one.
pub fn parse_serving(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = &v["fields"];
    if fields["message"] != "xiaozhi-gateway serving" {
        return None;
    }
    let addr = |k: &str| fields[k].as_str()?.parse::<SocketAddr>().ok();
    Some((addr("mqtt")?, addr("http")?))
}

impl GatewayProcess {
    /// Starts `exe serve` with `env` (and no other `XZ_*` or `RUST_LOG`), logging to
    /// `log`, and waits until it serves.
    pub async fn start(
        exe: &Path,
        env: &[(String, String)],
        log: &Path,
    ) -> Result<GatewayProcess, GatewayError> {
        let log_err = |source| GatewayError::Log {
            path: log.display().to_string(),
            source,
        };
        let file = std::fs::File::create(log).map_err(log_err)?;
        let err_file = file.try_clone().map_err(log_err)?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            if k.to_str()
                .is_some_and(|k| k.starts_with("XZ_") || k == "RUST_LOG")
            {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().map_err(|source| GatewayError::Spawn {
            exe: exe.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let shown = log.display().to_string();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(GatewayError::Exited { status, log: shown });
            }
            if let Some((mqtt, http)) = find_serving(log).await {
                return Ok(GatewayProcess {
                    child,
                    pid,
                    mqtt,
                    http,
                    log: log.to_path_buf(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GatewayError::NotServing {
                    secs: START_TIMEOUT.as_secs(),
                    log: shown,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL at once, as a crash or the OOM killer would end it; the exit status.
    pub async fn kill(mut self) -> Option<ExitStatus> {
        let _ = self.child.kill().await;
        self.child.wait().await.ok()
    }

    /// SIGTERM (a graceful shutdown), then SIGKILL after `grace`. The exit status, and
    /// whether it had to be killed.
    pub async fn stop(mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.exited() {
            return (Some(status), false);
        }
        if let Ok(pid) = i32::try_from(self.pid)
            && pid > 0
        {
            // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => (status.ok(), false),
            Err(_) => {
                let _ = self.child.kill().await;
                (self.child.wait().await.ok(), true)
            }
        }
    }
}

/// Panics in a log: how many, and the first one's location and message.
pub fn panics(log: &str) -> (u64, Option<String>) {
    let mut count = 0;
    let mut first = None;
    let mut lines = log.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("thread '") && line.contains(" panicked at ") {
            count += 1;
            if first.is_none() {
                let message = lines.next().unwrap_or_default();
                first = Some(format!("{} {message}", line.trim_end_matches(':')));
            }
        }
    }
    (count, first)
}

async fn find_serving(log: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let file = tokio::fs::File::open(log).await.ok()?;
    let mut lines = BufReader::new(file).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(found) = parse_serving(&line) {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_addresses_in_the_serving_line() {
        let line = r#"{"timestamp":"2025-01-01T00:00:00Z","level":"INFO","fields":{"message":"xiaozhi-gateway serving","mqtt":"127.0.0.1:40001","broker":"127.0.0.1:40002","udp":"127.0.0.1:40003","http":"127.0.0.1:40004","node":"soak"},"target":"xiaozhi_gateway::server"}"#;
        let (mqtt, http) = parse_serving(line).unwrap();
        assert_eq!(mqtt.port(), 40001);
        assert_eq!(http.port(), 40004);
        assert_eq!(parse_serving(r#"{"fields":{"message":"other"}}"#), None);
        assert_eq!(parse_serving("not json"), None);
    }

    #[test]
    fn counts_panics_in_the_log() {
        let log = "{\"fields\":{}}\n\nthread 'tokio-rt-worker' (2719) panicked at src/x.rs:1:2:\nJoinHandle polled after completion\nstack backtrace:\nthread 'main' panicked at src/y.rs:3:4:\nboom\n";
        let (n, first) = panics(log);
        assert_eq!(n, 2);
        assert_eq!(
            first.as_deref(),
            Some(
                "thread 'tokio-rt-worker' (2719) panicked at src/x.rs:1:2 JoinHandle polled after completion"
            )
        );
        assert_eq!(panics("all fine\n"), (0, None));
    }
}
