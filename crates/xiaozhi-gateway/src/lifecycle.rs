//! One lifecycle for every listener and the connections it accepts, after mini-redis's
//! `Listener`: a listener accepts until told to stop accepting, each connection runs in
//! a tracked task that ends when told to close, and the gateway waits for all of them
//! until one deadline, the end of `shutdown.grace_secs`.
//!
//! Before this, the listeners stopped three ways: the device listener with cancellation
//! and a task tracker, the broker listener by having its task aborted (its clients' wills
//! went out from destructors), and the QUIC endpoint after fixed waits of its own (2 s
//! for its connections, 1 s for the endpoint) whatever the grace period said. Now each
//! takes a [`Lifecycle`] and the gateway drives them all through the same three steps:
//!
//! 1. [`Lifecycle::begin_shutdown`]: accept loops end (and the deadline is known to
//!    anything that still has to wait for something, such as QUIC's final close).
//! 2. [`Lifecycle::close_connections`]: every connection is asked to close (a device
//!    hears nothing more, a broker client's will is published, an HTTP request in flight
//!    finishes).
//! 3. [`Lifecycle::wait`]: every tracked task (accept loops and connections) has ended,
//!    or the deadline passed, whichever comes first.
//!
//! The gateway keeps two: one for the device-facing and broker listeners, closed before
//! presence and chat history are written out, and one for HTTP, which keeps answering
//! (health, metrics, readiness saying "shutting down") until the end.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Shared by a set of listeners and the gateway that stops them; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Lifecycle {
    stop_accepting: CancellationToken,
    close_connections: CancellationToken,
    tasks: TaskTracker,
    deadline: Arc<OnceLock<Instant>>,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    // --- for listeners -------------------------------------------------------------

    /// Resolves when the listener must stop accepting.
    pub fn accepting_stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop_accepting.cancelled()
    }

    /// Runs `accept` (a listener's next accept) unless the listener must stop accepting
    /// first; `None` then. Every accept loop reads `while let Some(accepted) = ...`.
    pub async fn until_stopped<F: Future>(&self, accept: F) -> Option<F::Output> {
        self.stop_accepting.run_until_cancelled(accept).await
    }

    /// The listener's next connection, or `None` once it must stop accepting. Accept
    /// errors (out of file descriptors and the like) are logged and retried after a
    /// backoff that doubles from 5 ms to 1 s, so a listener never spins. `listener_name`
    /// names it in the log.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        listener_name: &'static str,
    ) -> Option<(TcpStream, SocketAddr)> {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.until_stopped(listener.accept()).await? {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    warn!(listener = listener_name, error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Whether the listener must stop accepting.
    pub fn is_stopping(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// The stop-accepting signal as a token, for a task that takes one (the admin
    /// command executor stops taking commands with the listeners).
    pub fn stop_signal(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// The signal a connection closes on (a clone of one token: cheap, `'static`).
    pub fn close_signal(&self) -> CancellationToken {
        self.close_connections.clone()
    }

    /// Runs `task` (an accept loop or a connection) as part of this lifecycle: the
    /// gateway's [`wait`](Self::wait) waits for it.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// The end of the grace period, once shutdown has begun.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    /// Waits for `future` until the deadline (for as long as it takes before shutdown
    /// began, which is never the case where this is used). `None` if the deadline came
    /// first.
    pub async fn until_deadline<F: Future>(&self, future: F) -> Option<F::Output> {
        match self.deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
            None => Some(future.await),
        }
    }

    // --- for the gateway -----------------------------------------------------------

    /// Step 1: accept loops end; `deadline` is when waiting ends, whatever is left.
    pub fn begin_shutdown(&self, deadline: Instant) {
        let _ = self.deadline.set(deadline);
        self.stop_accepting.cancel();
    }

    /// Step 2: every connection is asked to close.
    pub fn close_connections(&self) {
        self.close_connections.cancel();
    }

    /// Step 3: true once every task of this lifecycle has ended, false if the deadline
    /// came first. No task can be added after this is called.
    pub async fn wait(&self) -> bool {
        self.tasks.close();
        self.until_deadline(self.tasks.wait()).await.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn listeners_stop_accepting_then_close_then_are_waited_for() {
        let life = Lifecycle::new();
        let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel(4);
        // A listener with one connection.
        let accept = life.clone();
        life.spawn(async move {
            let close = accept.close_signal();
            let tx = closed_tx.clone();
            accept.spawn(async move {
                close.cancelled().await;
                tx.send("connection").await.unwrap();
            });
            accept.accepting_stopped().await;
            closed_tx.send("listener").await.unwrap();
        });
        tokio::task::yield_now().await;
        assert!(!life.is_stopping());
        life.begin_shutdown(Instant::now() + Duration::from_secs(5));
        assert_eq!(closed_rx.recv().await, Some("listener"));
        assert!(
            closed_rx.try_recv().is_err(),
            "connections stay until asked"
        );
        life.close_connections();
        assert!(life.wait().await);
        assert_eq!(closed_rx.recv().await, Some("connection"));
    }

    #[tokio::test]
    async fn an_accept_runs_until_the_listener_must_stop() {
        let life = Lifecycle::new();
        assert_eq!(life.until_stopped(async { 7 }).await, Some(7));
        // An accept that is waiting when the signal comes ends with None.
        let waiting = life.clone();
        let accept =
            tokio::spawn(async move { waiting.until_stopped(std::future::pending::<()>()).await });
        tokio::task::yield_now().await;
        life.begin_shutdown(Instant::now() + Duration::from_secs(5));
        assert_eq!(accept.await.unwrap(), None);
        // After it, an accept that would succeed is not run.
        assert_eq!(life.until_stopped(async { 7 }).await, None);
    }

    #[tokio::test]
    async fn waiting_ends_at_the_deadline() {
        let life = Lifecycle::new();
        life.spawn(std::future::pending::<()>());
        let start = Instant::now();
        let grace = Duration::from_millis(200);
        life.begin_shutdown(start + grace);
        life.close_connections();
        assert!(!life.wait().await, "a stuck task does not hold shutdown");
        let waited = Instant::now() - start;
        assert!(waited >= grace && waited < grace * 5, "{waited:?}");
        assert_eq!(life.deadline(), Some(start + grace));
        assert_eq!(
            life.until_deadline(std::future::pending::<()>()).await,
            None
        );
    }
}
