//! Redis presence: production and scale-out.
//!
//! Every gateway node writes its own devices; any node, the management API or an
//! operator's dashboard can read all of them. Entries of a node that dies stop being
//! refreshed and expire on their own, so a crash never leaves devices "online" forever.
//!
//! # Key layout
//!
//! With `P` the configured key prefix (e.g. `xiaozhi:`) and MACs in colon form,
//! lowercase:
//!
//! | Key | Type | Contents |
//! |---|---|---|
//! | `P dev:<mac>` | hash | `state` (`offline`/`online`/`in_session`/`in_call`), `node`, `client_id`, `group`, `remote`, `connected_at_ms`, `last_seen_ms`, and when known `board`, `firmware`, `session_id`, `session_since_ms`, `call_peer`, `call_bridged` (`1`/`0`) (absent fields are not stored). Expires (`PEXPIRE`) after the connected TTL (online, in_session; refreshed by heartbeats) or the offline TTL (offline, kept for "last seen"). |
//! | `P online` | sorted set | member: MAC of a connected device; score: unix ms its entry expires (last write or heartbeat + connected TTL). Members whose score has passed are stale and are pruned by `list`. |
//! | `P known` | sorted set | member: MAC of every device with an entry, connected or offline; score: unix ms its `dev:` hash expires (the writer's clock: the later of now and `last_seen_ms`, plus the TTL the hash took). Kept by the write, heartbeat and reconcile scripts; read (and members whose score has passed pruned) by `fleet`. A refused offline write leaves it alone. Deployments older than this set have none: `fleet` then shows the connected devices (it also reads `P online`) and each offline device once it is written again. |
//! | `P node:<node>` | set | MACs the node holds as connected (what a restarted node must mark offline). Expires after the connected TTL, refreshed by the node's writes and heartbeats. |
//! | `P nodes` | sorted set | member: node id; score: unix ms of its latest heartbeat (or restart). For operators and scale-out. |
//!
//! Writes that depend on who owns an entry run as Lua scripts, so the check and the
//! update are atomic: an offline write applies only if the entry is missing or names
//! the writing node, a heartbeat refreshes only the node's own connected entries, and
//! the restart reconcile marks offline only what still names the node. A batch of
//! writes or heartbeats goes out as one pipeline: one round trip.
//!
//! The reconcile script derives the device keys from the node's set, so this layout
//! needs a single Redis (standalone, or a failover pair behind one address), not Redis
//! Cluster.
//!
//! # Outages
//!
//! [`RedisPresence::connect`] does not contact Redis: the connection is made on first
//! use and remade after a failure, so the gateway starts and serves devices with Redis
//! down and resumes writing once it is back (the
//! [`tracker`](super::tracker::PresenceTracker) rewrites everything then). Every call is
//! bounded by the configured timeout, connection attempts included: a Redis that is
//! down, refusing or stuck turns into an error within about that time, never a hang.
//!
//! `list` and `fleet` decide which entries have expired with this host's clock (the
//! scores are computed from the writers' clocks too), so nodes' clocks should be roughly
//! in sync (NTP); a skew only shifts when a crashed node's devices disappear from
//! listings. The hash itself expires by Redis's clock, and `fleet` shows only what the
//! hash holds, so a skew never shows an expired connected entry.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{
    Client, ErrorKind, FromRedisValue, Pipeline, RedisError, Script, ServerErrorKind, Value,
};

use super::fleet::{FleetPage, FleetQuery, fleet_page};
use super::{
    PresenceError, PresencePage, PresenceQuery, PresenceRecord, PresenceState, PresenceStore, Ttls,
};

/// Writes one record. KEYS: dev hash, online zset, the record node's set, known zset.
/// ARGV: mac, state, node, ttl ms, online deadline ms, known deadline ms (when the hash
/// expires), then field/value pairs.
/// Returns 1 if written, 0 if an offline write was refused (entry of another node).
const WRITE_LUA: &str = r"
local connected = ARGV[2] ~= 'offline'
if not connected then
  -- Whatever happens to the entry, this node no longer holds the device.
  redis.call('SREM', KEYS[3], ARGV[1])
  local stored = redis.call('HGET', KEYS[1], 'node')
  if stored and stored ~= ARGV[3] then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1])
if connected then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
";

/// Refreshes one device. KEYS: dev hash, online zset, known zset. ARGV: node, now ms,
/// ttl ms, deadline ms (online and known), mac. Returns 1 if refreshed, 0 if not this
/// node's connected entry.
const HEARTBEAT_LUA: &str = r"
local stored = redis.call('HMGET', KEYS[1], 'node', 'state')
if stored[1] ~= ARGV[1] or not stored[2] or stored[2] == 'offline' then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[1], 'last_seen_ms', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return 1
";

/// Marks offline what a restarted node held. KEYS: the node's set, online zset, nodes
/// zset, known zset. ARGV: node, now ms, offline ttl ms, dev key prefix (`P dev:`),
/// known deadline ms (now + offline ttl).
/// Returns how many entries were marked.
const RECONCILE_LUA: &str = r"
local count = 0
for _, mac in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[4] .. mac
  local stored = redis.call('HMGET', key, 'node', 'state')
  if stored[1] == ARGV[1] and stored[2] and stored[2] ~= 'offline' then
    redis.call('HDEL', key, 'session_id', 'session_since_ms', 'call_peer', 'call_bridged')
    redis.call('HSET', key, 'state', 'offline', 'last_seen_ms', ARGV[2])
    redis.call('PEXPIRE', key, ARGV[3])
    redis.call('ZREM', KEYS[2], mac)
    redis.call('ZADD', KEYS[4], ARGV[5], mac)
    count = count + 1
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return count
";

/// Entries fetched per round trip by `list` and `fleet`.
const LIST_CHUNK: usize = 1000;

/// Reconnection attempts per connection (after the first), and the first backoff.
const RETRIES: usize = 1;
const RETRY_DELAY: Duration = Duration::from_millis(50);

/// A connection to the Redis at `url` that is made on first use and remade after
/// failures, every call bounded by `timeout`: a gateway starts with Redis down. Fails
/// only on a malformed URL. Presence and the call book (`crate::calls::store`) share it.
pub fn lazy_connection(url: &str, timeout: Duration) -> redis::RedisResult<ConnectionManager> {
    let client = Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(RETRIES)
        .set_min_delay(RETRY_DELAY)
        .set_max_delay(timeout);
    ConnectionManager::new_lazy_with_config(client, config)
}

/// Presence in Redis (see the module docs for the key layout).
pub struct RedisPresence {
    manager: ConnectionManager,
    prefix: String,
    timeout: Duration,
    write: Script,
    heartbeat: Script,
    reconcile: Script,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may carry a password: leave it out.
        f.debug_struct("RedisPresence")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// A store on the Redis at `url` (`redis://[user:password@]host:port/db`), keys
    /// prefixed with `key_prefix`, every call bounded by `timeout`.
    ///
    /// This is the constructor to use: it only parses the URL and never contacts Redis,
    /// so it succeeds with Redis down; the connection is made on first use and remade
    /// after failures. It fails only on a malformed URL (or `rediss://`, TLS not being
    /// built in). Must be called within a Tokio runtime.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        timeout: Duration,
    ) -> Result<RedisPresence, PresenceError> {
        let manager = lazy_connection(url, timeout)?;
        Ok(RedisPresence {
            manager,
            prefix: key_prefix.to_owned(),
            timeout,
            write: Script::new(WRITE_LUA),
            heartbeat: Script::new(HEARTBEAT_LUA),
            reconcile: Script::new(RECONCILE_LUA),
        })
    }

    fn dev_key(&self, mac: &str) -> String {
        format!("{}dev:{mac}", self.prefix)
    }

    fn online_key(&self) -> String {
        format!("{}online", self.prefix)
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    fn known_key(&self) -> String {
        format!("{}known", self.prefix)
    }

    /// The entries of `macs` that `keep` accepts, in the order of `macs`, fetched with
    /// `HGETALL` in slices of [`LIST_CHUNK`] (one round trip each, so each stays small
    /// and within the timeout however many devices there are). Missing entries are left
    /// out; a malformed one is skipped with a warning naming `reader` (one bad entry
    /// must not hide every other device). Redis failing is an error.
    async fn records(
        &self,
        macs: &[String],
        reader: &'static str,
        keep: impl Fn(&PresenceRecord) -> bool + Send + Sync,
    ) -> Result<Vec<PresenceRecord>, PresenceError> {
        let mut records = Vec::with_capacity(macs.len());
        for chunk in macs.chunks(LIST_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|mac| self.dev_key(mac)).collect();
            let mut pipe = Pipeline::with_capacity(keys.len());
            for key in &keys {
                pipe.cmd("HGETALL").arg(key);
            }
            // Per-key errors come back as values: one bad key must not fail the read.
            pipe.ignore_errors();
            let replies: Vec<Value> = self.query(&pipe).await?;
            for ((key, mac), reply) in keys.iter().zip(chunk).zip(replies) {
                match parse_record(key, mac, reply) {
                    Ok(Some(record)) if keep(&record) => records.push(record),
                    Ok(_) => {}
                    Err(error @ PresenceError::Malformed { .. }) => {
                        tracing::warn!(%error, "presence {reader} skips an entry");
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(records)
    }

    /// Runs `pipe` within the timeout (connecting included). A pipeline calling a script
    /// Redis does not have cached (first use, or Redis restarted) is retried once after
    /// loading the scripts. Every command here is idempotent, so running part of a
    /// pipeline twice, or retrying one that timed out after Redis applied it, is harmless.
    async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, PresenceError> {
        let run = async {
            let mut con = self.manager.clone();
            match pipe.query_async(&mut con).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    for script in [&self.write, &self.heartbeat, &self.reconcile] {
                        script.load_async(&mut con).await?;
                    }
                    pipe.query_async(&mut con).await
                }
                result => result,
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(timed_out(self.timeout)),
        }
    }
}

fn timed_out(timeout: Duration) -> PresenceError {
    let error = io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no answer within {} ms", timeout.as_millis()),
    );
    PresenceError::Redis(RedisError::from(error))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `EVALSHA` of `script` as a pipeline command (keys, then args).
fn evalsha(pipe: &mut Pipeline, script: &Script, keys: &[&str]) {
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys);
}

/// The hash fields of a record, as stored (optional fields only when present).
fn fields(record: &PresenceRecord) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("state", record.state.as_str().to_owned()),
        ("node", record.node.clone()),
        ("client_id", record.client_id.clone()),
        ("group", record.group.clone()),
        ("remote", record.remote.clone()),
        ("connected_at_ms", record.connected_at_ms.to_string()),
        ("last_seen_ms", record.last_seen_ms.to_string()),
    ];
    let optional = [
        ("board", record.board.clone()),
        ("firmware", record.firmware.clone()),
        ("session_id", record.session_id.clone()),
        (
            "session_since_ms",
            record.session_since_ms.map(|v| v.to_string()),
        ),
        ("call_peer", record.call_peer.clone()),
        (
            "call_bridged",
            record.call_bridged.map(|b| u8::from(b).to_string()),
        ),
    ];
    fields.extend(
        optional
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| (name, v))),
    );
    fields
}

/// Parses the reply to `HGETALL key` for `mac` (from a pipeline run with
/// `ignore_errors`, so a server error for this key arrives here as a value); an empty
/// hash (missing key) is `None`.
fn parse_record(
    key: &str,
    mac: &str,
    reply: Value,
) -> Result<Option<PresenceRecord>, PresenceError> {
    let malformed = |reason: String| PresenceError::Malformed {
        key: key.to_owned(),
        reason,
    };
    let reply = match reply {
        // Some other type stored under the key: bad data, like a bad field.
        Value::ServerError(e) if e.code() == "WRONGTYPE" => {
            return Err(malformed("not a hash".to_owned()));
        }
        // Anything else (loading, out of memory...) is Redis failing, not the entry.
        Value::ServerError(e) => return Err(PresenceError::Redis(e.into())),
        reply => reply,
    };
    let mut hash = HashMap::<String, String>::from_redis_value(reply)
        .map_err(|e| malformed(format!("not a hash of text fields: {e}")))?;
    if hash.is_empty() {
        return Ok(None);
    }
    let mut required = |name: &str| {
        hash.remove(name)
            .ok_or_else(|| malformed(format!("field {name} is missing")))
    };
    let number = |name: &str, value: String| {
        value
            .parse::<i64>()
            .map_err(|_| malformed(format!("field {name} is not an integer: {value:?}")))
    };
    let state = required("state")?;
    let state = PresenceState::parse(&state)
        .ok_or_else(|| malformed(format!("field state is not a state: {state:?}")))?;
    let node = required("node")?;
    let client_id = required("client_id")?;
    let group = required("group")?;
    let remote = required("remote")?;
    let connected_at_ms = number("connected_at_ms", required("connected_at_ms")?)?;
    let last_seen_ms = number("last_seen_ms", required("last_seen_ms")?)?;
    let session_since_ms = match hash.remove("session_since_ms") {
        Some(value) => Some(number("session_since_ms", value)?),
        None => None,
    };
    Ok(Some(PresenceRecord {
        mac_address: mac.to_owned(),
        state,
        node,
        client_id,
        group,
        remote,
        board: hash.remove("board"),
        firmware: hash.remove("firmware"),
        session_id: hash.remove("session_id"),
        session_since_ms,
        call_peer: hash.remove("call_peer"),
        call_bridged: hash.remove("call_bridged").map(|v| v == "1"),
        connected_at_ms,
        last_seen_ms,
    }))
}

#[async_trait::async_trait]
impl PresenceStore for RedisPresence {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn write(&self, records: &[PresenceRecord], ttls: Ttls) -> Result<(), PresenceError> {
        if records.is_empty() {
            return Ok(());
        }
        let online = self.online_key();
        let connected_ms = millis(ttls.connected);
        let offline_ms = millis(ttls.offline);
        let known = self.known_key();
        let now = unix_ms_now();
        let mut pipe = Pipeline::with_capacity(records.len());
        for record in records {
            let mac = &record.mac_address;
            let ttl_ms = if record.state.is_connected() {
                connected_ms
            } else {
                offline_ms
            };
            let deadline = record.last_seen_ms.saturating_add(connected_ms);
            // The hash expires `ttl_ms` after this write, whenever the record was made
            // (a record rewritten after an outage may be old): never score it earlier.
            let expires = now.max(record.last_seen_ms).saturating_add(ttl_ms);
            let keys = [
                self.dev_key(mac),
                online.clone(),
                self.node_key(&record.node),
                known.clone(),
            ];
            evalsha(&mut pipe, &self.write, &keys.each_ref().map(String::as_str));
            pipe.arg(mac)
                .arg(record.state.as_str())
                .arg(&record.node)
                .arg(ttl_ms)
                .arg(deadline)
                .arg(expires);
            for (name, value) in fields(record) {
                pipe.arg(name).arg(value);
            }
            pipe.ignore();
        }
        self.query::<()>(&pipe).await
    }

    async fn heartbeat(
        &self,
        node: &str,
        macs: &[String],
        now_ms: i64,
        ttls: Ttls,
    ) -> Result<(), PresenceError> {
        let (online, known) = (self.online_key(), self.known_key());
        let ttl_ms = millis(ttls.connected);
        let deadline = now_ms.saturating_add(ttl_ms);
        let mut pipe = Pipeline::with_capacity(macs.len() + 2);
        for mac in macs {
            let dev = self.dev_key(mac);
            evalsha(&mut pipe, &self.heartbeat, &[&dev, &online, &known]);
            pipe.arg(node)
                .arg(now_ms)
                .arg(ttl_ms)
                .arg(deadline)
                .arg(mac)
                .ignore();
        }
        pipe.cmd("PEXPIRE")
            .arg(self.node_key(node))
            .arg(ttl_ms)
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.nodes_key())
            .arg(now_ms)
            .arg(node)
            .ignore();
        self.query::<()>(&pipe).await
    }

    async fn reconcile(&self, node: &str, now_ms: i64, ttls: Ttls) -> Result<usize, PresenceError> {
        let (set, online, nodes, known) = (
            self.node_key(node),
            self.online_key(),
            self.nodes_key(),
            self.known_key(),
        );
        let offline_ms = millis(ttls.offline);
        let mut pipe = Pipeline::new();
        evalsha(&mut pipe, &self.reconcile, &[&set, &online, &nodes, &known]);
        pipe.arg(node)
            .arg(now_ms)
            .arg(offline_ms)
            .arg(self.dev_key(""))
            .arg(now_ms.saturating_add(offline_ms));
        let (count,): (i64,) = self.query(&pipe).await?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    async fn get(&self, mac_address: &str) -> Result<Option<PresenceRecord>, PresenceError> {
        let mac = mac_address.to_ascii_lowercase();
        let key = self.dev_key(&mac);
        let mut pipe = Pipeline::new();
        pipe.cmd("HGETALL").arg(&key);
        pipe.ignore_errors();
        let (reply,): (Value,) = self.query(&pipe).await?;
        parse_record(&key, &mac, reply)
    }

    async fn get_many(
        &self,
        mac_addresses: &[String],
    ) -> Result<Vec<Option<PresenceRecord>>, PresenceError> {
        if mac_addresses.is_empty() {
            return Ok(Vec::new());
        }
        let macs: Vec<String> = mac_addresses
            .iter()
            .map(|m| m.to_ascii_lowercase())
            .collect();
        let mut pipe = Pipeline::new();
        for mac in &macs {
            pipe.cmd("HGETALL").arg(self.dev_key(mac));
        }
        pipe.ignore_errors();
        let replies: Vec<Value> = self.query(&pipe).await?;
        macs.iter()
            .zip(replies)
            .map(|(mac, reply)| parse_record(&self.dev_key(mac), mac, reply))
            .collect()
    }

    async fn list(&self, query: &PresenceQuery) -> Result<PresencePage, PresenceError> {
        let online = self.online_key();
        let now = unix_ms_now();
        let mut pipe = Pipeline::new();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&online)
            .arg(format!("({now}"))
            .arg("+inf");
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&online)
            .arg("-inf")
            .arg(now)
            .ignore();
        let (mut macs,): (Vec<String>,) = self.query(&pipe).await?;
        if let Some(prefix) = &query.mac_prefix {
            let prefix = prefix.to_ascii_lowercase();
            macs.retain(|mac| mac.starts_with(&prefix));
        }
        let mut matching = self
            .records(&macs, "list", |record| query.matches(record))
            .await?;
        matching.sort_unstable_by(|a, b| a.mac_address.cmp(&b.mac_address));
        Ok(super::memory::page(matching, query))
    }

    async fn fleet(&self, query: &FleetQuery, now_ms: i64) -> Result<FleetPage, PresenceError> {
        let (known, online) = (self.known_key(), self.online_key());
        let live = format!("({now_ms}");
        let mut pipe = Pipeline::new();
        pipe.cmd("ZRANGEBYSCORE").arg(&known).arg(&live).arg("+inf");
        // Connected devices of nodes that predate the known set (a rolling upgrade):
        // normally all of them are known already, and the union below drops the repeats.
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&online)
            .arg(&live)
            .arg("+inf");
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&known)
            .arg("-inf")
            .arg(now_ms)
            .ignore();
        let (mut macs, connected): (Vec<String>, Vec<String>) = self.query(&pipe).await?;
        macs.extend(connected);
        macs.sort_unstable();
        macs.dedup();
        // Every entry counts, so all are read; the hash is the truth (an entry expired
        // since its score was set is simply missing).
        let records = self.records(&macs, "fleet", |_| true).await?;
        Ok(fleet_page(&records, query))
    }

    async fn ping(&self) -> Result<(), PresenceError> {
        let mut pipe = Pipeline::new();
        pipe.cmd("PING");
        let (_pong,): (String,) = self.query(&pipe).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(pairs: &[(&str, &str)]) -> Value {
        Value::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| [k, v])
                .map(|s| Value::BulkString(s.as_bytes().to_vec()))
                .collect(),
        )
    }

    const FULL: &[(&str, &str)] = &[
        ("state", "in_session"),
        ("node", "n1"),
        ("client_id", "GID_test@@@aa_bb_cc_dd_ee_ff"),
        ("group", "GID_test"),
        ("remote", "10.0.0.1:5000"),
        ("board", "esp32-s3"),
        ("session_id", "s1"),
        ("session_since_ms", "1500"),
        ("connected_at_ms", "1000"),
        ("last_seen_ms", "2000"),
    ];

    #[test]
    fn parses_a_stored_hash_and_round_trips_fields() {
        let record = parse_record("k", "aa:bb:cc:dd:ee:ff", hash(FULL))
            .unwrap()
            .unwrap();
        assert_eq!(record.state, PresenceState::InSession);
        assert_eq!(record.session_since_ms, Some(1500));
        assert_eq!(record.firmware, None);
        let mut stored: Vec<_> = fields(&record)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        stored.sort();
        let mut expected: Vec<_> = FULL
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expected.sort();
        assert_eq!(stored, expected);
    }

    #[test]
    fn missing_hash_is_none_and_bad_fields_are_malformed() {
        assert!(
            parse_record("k", "m", Value::Array(vec![]))
                .unwrap()
                .is_none()
        );
        let broken = [
            ("state", "sleeping"),
            ("last_seen_ms", "soon"),
            ("session_since_ms", "x"),
        ];
        for (field, value) in broken {
            let pairs: Vec<_> = FULL
                .iter()
                .map(|&(k, v)| if k == field { (k, value) } else { (k, v) })
                .collect();
            match parse_record("xz:dev:m", "m", hash(&pairs)) {
                Err(PresenceError::Malformed { key, reason }) => {
                    assert_eq!(key, "xz:dev:m");
                    assert!(reason.contains(field), "{reason}");
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        let without_node: Vec<_> = FULL.iter().copied().filter(|(k, _)| *k != "node").collect();
        assert!(matches!(
            parse_record("k", "m", hash(&without_node)),
            Err(PresenceError::Malformed { .. })
        ));
        assert!(matches!(
            parse_record("k", "m", Value::Int(3)),
            Err(PresenceError::Malformed { .. })
        ));
    }
}
