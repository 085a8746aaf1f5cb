//! The HTTP listener: our own accept loop around hyper, so the limits a public port
//! needs are ours to set.
//!
//! `axum::serve` offers no header timeout and no connection cap, so a client that opens
//! connections and trickles headers (slow-loris) could hold sockets and memory for as
//! long as it likes. Here:
//!
//! * at most `http.max_connections` connections are open; further ones are closed on
//!   accept and counted;
//! * a request's headers must arrive within `http.header_timeout_secs` (hyper's
//!   `header_read_timeout`), and headers are bounded by [`MAX_HEADER_BYTES`];
//! * each connection's requests see their peer address as axum's `ConnectInfo`, as
//!   before;
//! * on shutdown every connection is asked to finish its request in flight and close
//!   (WebSocket connections, once upgraded, end with their own tasks).
//!
//! The per-request rules (body size, handler time) are layers on the router
//! ([`super::limits_layer`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::lifecycle::Lifecycle;
use crate::limits::OffenderLog;
use crate::metrics::Metrics;

/// Largest request head (request line and headers) hyper buffers.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `life` says stop accepting; each connection finishes
/// its request in flight and closes when `life` closes connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    metrics: Arc<Metrics>,
    life: Lifecycle,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut warned = OffenderLog::new(Duration::from_secs(600), 4096);
    while let Some((stream, remote)) = life.accept(&listener, "HTTP").await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            Metrics::inc(&metrics.http_rejected_connection_limit);
            if warned.should_warn(remote.ip(), std::time::Instant::now()) {
                warn!(%remote, max = limits.max_connections, "HTTP connection refused: http.max_connections open (further refusals from this address are counted, not logged, for 10 minutes)");
            }
            continue;
        };
        let app = app.clone();
        let metrics = metrics.clone();
        let close = life.close_signal();
        life.spawn(async move {
            let _permit = permit;
            serve_connection(stream, remote, app, limits, metrics, close).await;
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    limits: ServeLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        app.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        r = connection.as_mut() => r,
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            Metrics::inc(&metrics.http_rejected_header_timeout);
            debug!(%remote, "HTTP client did not send its headers in time; closed");
        } else {
            debug!(%remote, error = %e, "HTTP connection ended with an error");
        }
    }
}
