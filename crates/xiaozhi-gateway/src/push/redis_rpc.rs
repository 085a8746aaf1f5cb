//! The official gateway's Redis RPC as a way in: tools written to drive it
//! (`{"method":"forward","clientId":...,"params":{<message>}}`, 78/xiaozhi-esp32
//! `docs/notify.md`) push through us unchanged.
//!
//! That document gives the request and its answer (`{"success": true}`) but not the Redis
//! keys, so the transport is ours and documented: requests are `RPUSH`ed to the list
//! `push.redis_rpc_key`, each node takes them with `BLPOP` (so each is taken once,
//! whichever node of a cluster is free), and a request with `reply_to` gets its answer
//! `RPUSH`ed to that list (kept 5 minutes): `{"id"?, "success": true, "push_id",
//! "batch_id"}` or `{"id"?, "success": false, "error", "message"}`. The translation is
//! `protocol::push::from_forward_rpc`; the push is then queued like any other.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{PushError, PushService};
use crate::protocol::push;

/// How long one `BLPOP` waits before it looks at the stop signal again, in seconds.
const POLL_SECS: f64 = 1.0;
/// How long an answer waits in its `reply_to` list.
const REPLY_TTL_SECS: i64 = 300;
/// Longest request taken (a device message is at most `push.max_message_bytes`).
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Takes requests from `key` until stopped; reconnects with backoff while Redis is away.
pub async fn run(url: String, key: String, service: Arc<PushService>, stop: CancellationToken) {
    let client = match redis::Client::open(url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "push.redis_rpc_url is not a Redis URL; the Redis RPC is off");
            return;
        }
    };
    let mut backoff = Duration::from_millis(200);
    info!(key, "push: taking the official gateway's Redis RPC");
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = client.get_multiplexed_async_connection() => c,
        };
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "push Redis RPC: cannot reach Redis; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        conn.set_response_timeout(Duration::from_secs_f64(POLL_SECS + 5.0));
        backoff = Duration::from_millis(200);
        loop {
            let taken: redis::RedisResult<Option<(String, Vec<u8>)>> = tokio::select! {
                _ = stop.cancelled() => return,
                r = conn.blpop(&key, POLL_SECS) => r,
            };
            match taken {
                Ok(Some((_, request))) => {
                    let (reply_to, answer) = answer(&service, &request).await;
                    if let Some(list) = reply_to {
                        let written: redis::RedisResult<()> = redis::pipe()
                            .rpush(&list, answer.to_string())
                            .ignore()
                            .expire(&list, REPLY_TTL_SECS)
                            .ignore()
                            .query_async(&mut conn)
                            .await;
                        if let Err(e) = written {
                            warn!(error = %e, list, "push Redis RPC: could not write an answer");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "push Redis RPC: lost Redis; reconnecting");
                    break;
                }
            }
        }
    }
}

/// The answer to one request, and where it goes.
async fn answer(service: &PushService, request: &[u8]) -> (Option<String>, Value) {
    let parsed: Option<Value> = (request.len() <= MAX_REQUEST_BYTES)
        .then(|| serde_json::from_slice(request).ok())
        .flatten();
    let Some(rpc) = parsed else {
        warn!(
            bytes = request.len(),
            "push Redis RPC: a request that is not JSON (or too large) was dropped"
        );
        return (
            None,
            json!({"success": false, "error": "invalid_push", "message": "not JSON"}),
        );
    };
    let id = rpc.get("id").cloned();
    let reply_to = rpc
        .get("reply_to")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .map(str::to_owned);
    let result = match push::from_forward_rpc(&rpc) {
        Ok(body) => service.submit(&body, None, "redis").await,
        Err(e) => {
            // Counted like any refused request.
            service.refused_invalid();
            Err(PushError::Invalid(e))
        }
    };
    let mut answer = match result {
        Ok(submitted) => json!({
            "success": true,
            "push_id": submitted.pushes.first().map(|p| p.id.clone()),
            "batch_id": submitted.batch_id,
        }),
        Err(e) => json!({"success": false, "error": e.code(), "message": e.to_string()}),
    };
    if let Some(id) = id {
        answer["id"] = id;
    }
    (reply_to, answer)
}
