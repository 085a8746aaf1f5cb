//! The soak's own use of the real database and Redis: URLs rewritten to go through the
//! fault proxies, a database of its own per run (so the exactly-once check sees only
//! this run's rows and nothing else on the server is touched), and cleanup afterwards.

use std::net::SocketAddr;

use sqlx::Connection as _;

/// The `host:port` of a `scheme://[user[:password]@]host[:port][/path][?query]` URL, with
/// `default_port` when none is given.
pub fn authority(url: &str, default_port: u16) -> Option<(String, u16)> {
    let (_, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let hostport = &rest[..end];
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    if hostport.is_empty() {
        return None;
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((hostport.to_owned(), default_port)),
    }
}

/// The URL with its host and port replaced by `addr` (credentials, path and query kept).
pub fn with_address(url: &str, addr: SocketAddr) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let credentials = authority.rsplit_once('@').map(|(c, _)| c);
    Some(match credentials {
        Some(c) => format!("{scheme}://{c}@{addr}{tail}"),
        None => format!("{scheme}://{addr}{tail}"),
    })
}

/// The MySQL URL with its database replaced by `database` (the query kept).
pub fn with_database(url: &str, database: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    Some(match query {
        Some(q) => format!("{scheme}://{authority}/{database}?{q}"),
        None => format!("{scheme}://{authority}/{database}"),
    })
}

/// Resolves `host:port` to one socket address (IPv4 first).
pub async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| std::io::Error::other(format!("{host} resolves to nothing")))
}

/// A database name goes into SQL as an identifier: only `[a-z0-9_]` is accepted.
fn safe_name(name: &str) -> Result<&str, sqlx::Error> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(name)
    } else {
        Err(sqlx::Error::Protocol(format!(
            "unsafe database name {name:?}"
        )))
    }
}

/// Creates database `name` on the server of `url` (any database in `url` will do).
pub async fn create_database(url: &str, name: &str) -> Result<(), sqlx::Error> {
    let name = safe_name(name)?;
    let mut c = sqlx::MySqlConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"
    )))
    .execute(&mut c)
    .await?;
    c.close().await
}

/// Drops database `name` on the server of `url`.
pub async fn drop_database(url: &str, name: &str) -> Result<(), sqlx::Error> {
    let name = safe_name(name)?;
    let mut c = sqlx::MySqlConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS `{name}`"
    )))
    .execute(&mut c)
    .await?;
    c.close().await
}

/// Deletes every Redis key starting with `prefix`; how many.
pub async fn delete_redis_prefix(url: &str, prefix: &str) -> redis::RedisResult<u64> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let mut cursor = 0u64;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut con).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_authority() {
        assert_eq!(
            authority("mysql://root@127.0.0.1:3306/test", 3306),
            Some(("127.0.0.1".into(), 3306))
        );
        assert_eq!(
            authority("mysql://u:p@db.example/x?ssl-mode=disabled", 3306),
            Some(("db.example".into(), 3306))
        );
        assert_eq!(
            authority("redis://127.0.0.1:6380", 6379),
            Some(("127.0.0.1".into(), 6380))
        );
        assert_eq!(authority("redis://", 6379), None);
        assert_eq!(authority("no scheme", 6379), None);
    }

    #[test]
    fn rewrites_address_and_database() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(
            with_address("mysql://root:pw@127.0.0.1:3306/test?x=1", a).unwrap(),
            "mysql://root:pw@127.0.0.1:40000/test?x=1"
        );
        assert_eq!(
            with_address("redis://localhost/0", a).unwrap(),
            "redis://127.0.0.1:40000/0"
        );
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test", "xz_soak_1").unwrap(),
            "mysql://root@127.0.0.1:3306/xz_soak_1"
        );
        assert_eq!(
            with_database("mysql://root@h:1?a=b", "d").unwrap(),
            "mysql://root@h:1/d?a=b"
        );
    }
}
