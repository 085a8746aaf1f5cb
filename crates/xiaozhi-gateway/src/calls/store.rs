//! Where the call book lives: in this process (one node), or in Redis, shared by every
//! node of a cluster so that a call between devices on two nodes is one call.
//!
//! Both take a change as a closure over the whole [`CallBook`] and apply it atomically.
//! In Redis the book is one hash (`<presence.key_prefix>calls`: `version`, `book` as
//! JSON) written back with compare-and-set on its version (a Lua script): a writer that
//! lost a race reads the book again and re-applies its change, so the rules run in one
//! place (`crate::protocol::call_book`) for both stores and no lock can be left behind
//! by a node that died. Calling is a human-rate activity (a few requests per second at
//! most), so reading the whole book per change costs nothing that matters.

use std::sync::Mutex;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use crate::protocol::call_book::CallBook;

/// Attempts of one change before it gives up (each lost race costs one round trip).
/// Changes on one node are serialized, so a race is only ever lost to another node.
const CAS_ATTEMPTS: usize = 32;

/// The longest pause after a lost race (a random part of it, so that nodes that keep
/// colliding drift apart).
const CAS_BACKOFF_MAX: Duration = Duration::from_millis(8);

/// Writes the book if its stored version is still the one read. KEYS: the hash. ARGV:
/// version read (`0` when absent), new version, new book. Returns 1 if written.
const CAS_LUA: &str = r"
local stored = redis.call('HGET', KEYS[1], 'version')
if (stored or '0') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'book', ARGV[3])
return 1
";

/// Why the book could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum CallStoreError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the call book in Redis ({key}) is not readable: {reason}")]
    Malformed { key: String, reason: String },
    #[error("the call book changed under {0} attempts in a row; try again")]
    Contended(usize),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// The call book of this node or of the cluster.
pub enum CallStore {
    Memory(Mutex<CallBook>),
    Redis(RedisBook),
}

/// The book in Redis.
pub struct RedisBook {
    manager: ConnectionManager,
    key: String,
    timeout: Duration,
    cas: Script,
    /// One change at a time from this node: concurrent requests here would otherwise
    /// only take turns losing the compare-and-set to each other.
    local: tokio::sync::Mutex<()>,
}

impl CallStore {
    /// A book in this process.
    pub fn memory() -> CallStore {
        CallStore::Memory(Mutex::new(CallBook::new()))
    }

    /// A book in the Redis at `url` under `<key_prefix>calls`. Like the presence store
    /// it connects lazily, so it succeeds with Redis down.
    pub fn redis(
        url: &str,
        key_prefix: &str,
        timeout: Duration,
    ) -> Result<CallStore, CallStoreError> {
        Ok(CallStore::Redis(RedisBook {
            manager: crate::presence::redis::lazy_connection(url, timeout)?,
            key: format!("{key_prefix}calls"),
            timeout,
            cas: Script::new(CAS_LUA),
            local: tokio::sync::Mutex::new(()),
        }))
    }

    /// Applies `change` atomically and returns what it returned. `change` may run more
    /// than once (each time on a fresh copy of the book) when another node changed the
    /// book meanwhile; only its last run counts.
    pub async fn update<R>(
        &self,
        mut change: impl FnMut(&mut CallBook) -> R,
    ) -> Result<R, CallStoreError> {
        match self {
            CallStore::Memory(book) => {
                let mut book = book.lock().unwrap_or_else(|p| p.into_inner());
                Ok(change(&mut book))
            }
            CallStore::Redis(redis) => {
                let _turn = redis.local.lock().await;
                for _ in 0..CAS_ATTEMPTS {
                    let (version, mut book) = redis.read().await?;
                    let before = book.version();
                    let result = change(&mut book);
                    if book.version() == before {
                        return Ok(result);
                    }
                    if redis.write(version, &book).await? {
                        return Ok(result);
                    }
                    let pause = rand::random_range(Duration::ZERO..CAS_BACKOFF_MAX);
                    tokio::time::sleep(pause).await;
                }
                Err(CallStoreError::Contended(CAS_ATTEMPTS))
            }
        }
    }

    /// A copy of the book as it is now.
    pub async fn snapshot(&self) -> Result<CallBook, CallStoreError> {
        match self {
            CallStore::Memory(book) => Ok(book.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            CallStore::Redis(redis) => Ok(redis.read().await?.1),
        }
    }

    /// Whether the book is shared with other nodes.
    pub fn is_shared(&self) -> bool {
        matches!(self, CallStore::Redis(_))
    }
}

impl RedisBook {
    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, CallStoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CallStoreError::Timeout(self.timeout)),
        }
    }

    /// The stored version (`0` when there is no book yet) and the book.
    async fn read(&self) -> Result<(u64, CallBook), CallStoreError> {
        let mut con = self.manager.clone();
        let (version, book): (Option<String>, Option<Vec<u8>>) = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(&self.key)
                    .arg("version")
                    .arg("book")
                    .query_async(&mut con),
            )
            .await?;
        let malformed = |reason: String| CallStoreError::Malformed {
            key: self.key.clone(),
            reason,
        };
        let version = match version {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| malformed(format!("version {v:?} is not a number")))?,
        };
        let book = match book {
            None => CallBook::new(),
            Some(json) => CallBook::from_json(&json).map_err(|e| malformed(e.to_string()))?,
        };
        Ok((version, book))
    }

    /// Writes `book` if the stored version is still `read_version`.
    async fn write(&self, read_version: u64, book: &CallBook) -> Result<bool, CallStoreError> {
        let mut con = self.manager.clone();
        let mut invocation = self.cas.key(&self.key);
        invocation
            .arg(read_version.to_string())
            .arg(book.version().to_string())
            .arg(book.to_json());
        let written: i64 = self.bounded(invocation.invoke_async(&mut con)).await?;
        Ok(written == 1)
    }
}
