//! `GET /metrics`: Prometheus text that parses strictly, and counters that move by
//! exactly what a simulated conversation did.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use xiaozhi_gateway::server::Gateway;
use xiaozhi_tools::simulator::audio::{frame_index, synthetic_frame};

/// One parsed exposition: families by name (type and help) and every sample by series.
#[derive(Debug, Default)]
struct Exposition {
    /// Family name -> (type, help).
    families: BTreeMap<String, (String, String)>,
    /// Series (`name{sorted labels}`) -> value.
    samples: BTreeMap<String, f64>,
    /// Sample names in order of appearance.
    sample_names: Vec<String>,
}

impl Exposition {
    /// The value of a series, written `name` or `name{label="value"}`.
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }
}

/// A strict parser of the Prometheus text format (0.0.4) as the gateway writes it:
/// `# HELP` and `# TYPE` before a family's samples, each once; samples
/// `name{label="value",...} value [timestamp]`; every sample belongs to a declared
/// family (histograms through `_bucket`/`_sum`/`_count`); no series twice.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut help = BTreeMap::<String, String>::new();
    let mut types = BTreeMap::<String, String>::new();
    let mut finished = BTreeSet::<String>::new();
    let mut current: Option<String> = None;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line has no newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.is_empty() {
            return Err(format!("line {n}: empty line"));
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            match keyword {
                "HELP" | "TYPE" => {
                    let (name, value) = rest
                        .split_once(' ')
                        .ok_or(format!("line {n}: {keyword} without text"))?;
                    check_name(name).map_err(|e| format!("line {n}: {e}"))?;
                    if finished.contains(name) {
                        return Err(format!("line {n}: family {name} declared again"));
                    }
                    if current.as_deref() != Some(name)
                        && let Some(previous) = current.replace(name.to_owned())
                    {
                        finished.insert(previous);
                    }
                    let map = if keyword == "HELP" {
                        &mut help
                    } else {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&value)
                        {
                            return Err(format!("line {n}: unknown type {value}"));
                        }
                        if !help.contains_key(name) {
                            return Err(format!("line {n}: TYPE of {name} before its HELP"));
                        }
                        &mut types
                    };
                    if map.insert(name.to_owned(), value.to_owned()).is_some() {
                        return Err(format!("line {n}: second {keyword} for {name}"));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, value) = parse_sample(line).map_err(|e| format!("line {n}: {e}"))?;
        let family = family_of(&name, &types)
            .ok_or(format!("line {n}: sample {name} of no declared family"))?;
        if current.as_deref() != Some(family.as_str()) {
            return Err(format!(
                "line {n}: sample {name} outside its family's block"
            ));
        }
        if !help.contains_key(&family) {
            return Err(format!("line {n}: family {family} has no HELP"));
        }
        if name.ends_with("_bucket") && types[&family] == "histogram" && !labels.contains_key("le")
        {
            return Err(format!("line {n}: bucket without le"));
        }
        let series = if labels.is_empty() {
            name.clone()
        } else {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            format!("{name}{{{}}}", labels.join(","))
        };
        if out.samples.insert(series.clone(), value).is_some() {
            return Err(format!("line {n}: duplicate series {series}"));
        }
        out.sample_names.push(name);
    }
    for (name, kind) in types {
        let text = help.remove(&name).unwrap_or_default();
        out.families.insert(name, (kind, text));
    }
    if let Some(name) = help.keys().next() {
        return Err(format!("family {name} has HELP but no TYPE"));
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

/// The family a sample name belongs to.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_owned());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(
            types.get(base).map(String::as_str),
            Some("histogram" | "summary")
        )
        .then(|| base.to_owned())
    })
}

/// `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or(format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end = loop {
            match chars.peek() {
                Some((i, '}')) => break *i,
                None => return Err(format!("unterminated labels in {line:?}")),
                _ => {}
            }
            let mut label = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            if label.is_empty()
                || label.starts_with("__")
                || !label.chars().enumerate().all(|(i, c)| {
                    c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
                })
            {
                return Err(format!("invalid label name {label:?} in {line:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label value not quoted in {line:?}"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in {line:?}")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated label value in {line:?}")),
                }
            }
            if labels.insert(label.clone(), value).is_some() {
                return Err(format!("label {label} twice in {line:?}"));
            }
            if let Some((_, ',')) = chars.peek() {
                chars.next();
            }
        };
        rest = &body[end + 1..];
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or(format!("no space before the value in {line:?}"))?;
    let mut fields = rest.split(' ');
    let value = fields.next().unwrap_or_default();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("bad value {v:?} in {line:?}"))?,
    };
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp in {line:?}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("trailing fields in {line:?}"));
    }
    Ok((name.to_owned(), labels, value))
}

/// `GET /metrics`, checked and parsed.
async fn scrape(gw: &Gateway) -> Exposition {
    let response = reqwest::get(format!("http://{}/metrics", gw.addrs.http))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Scrapes until `f` holds (or 5 s pass); returns the last scrape.
async fn scrape_until(gw: &Gateway, f: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = scrape(gw).await;
        if f(&s) || tokio::time::Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_test_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 1\nh_sum 2.5\nh_count 1\n";
    let parsed = parse(good).unwrap();
    assert_eq!(parsed.get("a_total{x=\"2\"}"), 3.0);
    assert_eq!(parsed.get("h_count"), 1.0);
    for bad in [
        "a 1\n",                                                             // no TYPE/HELP
        "# TYPE a counter\na 1\n",                                           // no HELP
        "# HELP a A.\n# TYPE a counter\na 1\na 2\n",                         // duplicate series
        "# HELP a A.\n# TYPE a counter\na{x=1} 1\n",                         // unquoted label
        "# HELP a A.\n# TYPE a counter\na one\n",                            // bad value
        "# HELP a A.\n# TYPE a counter\na 1",                                // no final newline
        "# HELP a A.\n# TYPE a counter\n# HELP b B.\n# TYPE b gauge\na 1\n", // outside its block
        "# HELP h H.\n# TYPE h histogram\nh_bucket 1\n",                     // bucket without le
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

/// `/metrics` is well-formed Prometheus text with only gateway and process families,
/// and the process metrics are there.
#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let gw = common::start().await;
    let s = scrape(&gw).await;
    for name in &s.sample_names {
        assert!(
            name.starts_with("xiaozhi_") || name.starts_with("process_"),
            "unexpected sample {name}"
        );
    }
    for (name, (kind, help)) in &s.families {
        assert!(!help.is_empty(), "{name} has an empty HELP");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name} without _total");
        }
    }
    // No per-device labels anywhere.
    for series in s.samples.keys() {
        for label in ["mac", "device", "client_id", "session_id"] {
            assert!(!series.contains(&format!("{label}=")), "{series}");
        }
    }
    // A few families the dashboards rely on, with their types.
    for (family, kind) in [
        ("xiaozhi_devices_connected", "gauge"),
        ("xiaozhi_sessions_live", "gauge"),
        ("xiaozhi_udp_datagrams_total", "counter"),
        ("xiaozhi_udp_drops_total", "counter"),
        ("xiaozhi_auth_failures_total", "counter"),
        ("xiaozhi_hellos_total", "counter"),
        ("xiaozhi_upstream_failures_total", "counter"),
        ("xiaozhi_history_journal_bytes", "gauge"),
        ("xiaozhi_session_duration_seconds", "histogram"),
        ("xiaozhi_upstream_connect_seconds", "histogram"),
        ("xiaozhi_history_write_seconds", "histogram"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
    ] {
        let got = s.families.get(family).map(|(k, _)| k.as_str());
        assert_eq!(got, Some(kind), "{family}");
    }
    assert!(s.get("process_resident_memory_bytes") > 0.0);
    assert!(s.get("process_open_fds") > 0.0);
    assert!(s.get("process_cpu_seconds_total") >= 0.0);
    assert_eq!(s.get("xiaozhi_devices_connected"), 0.0);
    assert_eq!(s.get("xiaozhi_udp_drops_total{reason=\"hijack\"}"), 0.0);
    gw.shutdown().await;
}

/// One echo conversation moves the counters by exactly what it did.
#[tokio::test]
async fn a_conversation_moves_the_counters_by_exactly_what_happened() {
    const FRAMES: u32 = 20;
    const OPUS_LEN: usize = 40;
    const HEADER_LEN: f64 = 16.0;
    let gw = common::start().await;
    let before = scrape(&gw).await;
    assert_eq!(before.get("xiaozhi_devices_connected"), 0.0);

    let mut dev = common::device(&gw, 60).await;
    let (hello, mut audio) = common::conversation(&mut dev).await;
    dev.publish_json(&common::listen_start(&hello.session_id, "realtime"))
        .await
        .unwrap();
    // Send at the frame pace, receiving the echo in between.
    let mut received = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(60));
    let mut sent = 0u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.len() < FRAMES as usize && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tick.tick(), if sent < FRAMES => {
                audio.send(sent * 60, &synthetic_frame(sent, OPUS_LEN)).await.unwrap();
                sent += 1;
            }
            got = audio.recv(Duration::from_secs(2)) => {
                if let Some(frame) = got.unwrap() {
                    received.push(frame_index(&frame.opus).unwrap());
                }
            }
        }
    }
    assert_eq!(
        received,
        (0..FRAMES).collect::<Vec<_>>(),
        "every frame echoed"
    );
    // The turn ends after the device falls silent.
    loop {
        let tts = dev.recv_type("tts", Duration::from_secs(3)).await.unwrap();
        if tts["state"] == "stop" {
            break;
        }
    }

    let during = scrape(&gw).await;
    let delta = |series: &str| during.get(series) - before.get(series);
    assert_eq!(during.get("xiaozhi_devices_connected"), 1.0);
    assert_eq!(during.get("xiaozhi_sessions_live"), 1.0);
    assert_eq!(delta("xiaozhi_hellos_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(delta("xiaozhi_hellos_total{outcome=\"refused\"}"), 0.0);
    assert_eq!(delta("xiaozhi_device_connects_total"), 1.0);
    assert_eq!(
        delta("xiaozhi_udp_datagrams_total{direction=\"rx\"}"),
        f64::from(FRAMES)
    );
    assert_eq!(
        delta("xiaozhi_udp_datagrams_total{direction=\"tx\"}"),
        received.len() as f64
    );
    assert_eq!(
        delta("xiaozhi_udp_bytes_total{direction=\"rx\"}"),
        f64::from(FRAMES) * (HEADER_LEN + OPUS_LEN as f64)
    );
    assert!(
        delta("xiaozhi_udp_bytes_total{direction=\"tx\"}") >= received.len() as f64 * HEADER_LEN
    );
    for (series, value) in &during.samples {
        if series.starts_with("xiaozhi_udp_drops_total")
            || series.starts_with("xiaozhi_auth_failures_total")
        {
            assert_eq!(*value, before.get(series), "{series}");
        }
    }
    assert_eq!(audio.rejected, 0);
    // Nothing ended yet.
    assert_eq!(delta("xiaozhi_session_duration_seconds_count"), 0.0);

    dev.publish_json(&json!({"session_id": hello.session_id, "type": "goodbye"}))
        .await
        .unwrap();
    let ended = scrape_until(&gw, |s| {
        s.get("xiaozhi_session_duration_seconds_count")
            > before.get("xiaozhi_session_duration_seconds_count")
    })
    .await;
    let delta = |series: &str| ended.get(series) - before.get(series);
    assert_eq!(delta("xiaozhi_session_duration_seconds_count"), 1.0);
    assert_eq!(delta("xiaozhi_sessions_ended_total"), 1.0);
    assert_eq!(ended.get("xiaozhi_sessions_live"), 0.0);
    // The conversation lasted over a second (20 frames of 60 ms, then the turn end).
    assert!(delta("xiaozhi_session_duration_seconds_sum") > 1.0);
    assert_eq!(
        delta("xiaozhi_session_duration_seconds_bucket{le=\"1\"}"),
        0.0
    );
    assert_eq!(
        delta("xiaozhi_session_duration_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert_eq!(
        ended.get("xiaozhi_devices_connected"),
        1.0,
        "still connected"
    );

    dev.disconnect().await;
    let gone = scrape_until(&gw, |s| s.get("xiaozhi_devices_connected") == 0.0).await;
    assert_eq!(gone.get("xiaozhi_devices_connected"), 0.0);
    // Counters never go back.
    assert_eq!(
        gone.get("xiaozhi_udp_datagrams_total{direction=\"rx\"}")
            - before.get("xiaozhi_udp_datagrams_total{direction=\"rx\"}"),
        f64::from(FRAMES)
    );
    gw.shutdown().await;
}

/// Through the xiaozhi pipeline with chat history on (SQLite): the upstream connect
/// and the database writes are timed.
#[tokio::test]
async fn upstream_connect_and_history_writes_are_timed() {
    use xiaozhi_tools::simulator::upstream::{MockUpstream, MockUpstreamConfig};

    let dir = tempfile::tempdir().unwrap();
    let upstream = MockUpstream::start(MockUpstreamConfig::default())
        .await
        .unwrap();
    let mut config = common::test_config();
    config.pipeline.xiaozhi.urls = vec![upstream.url.clone()];
    config.history.enabled = true;
    config.history.database_url = format!("sqlite://{}", dir.path().join("h.db").display());
    config.history.journal_dir = dir.path().to_owned();
    let gw = common::start_with(config).await;
    let before = scrape(&gw).await;
    let (dev, _session) = common::converse(&gw, 61, 1).await;
    let after = scrape_until(&gw, |s| {
        s.get("xiaozhi_history_write_seconds_count") > 0.0
            && s.get("xiaozhi_session_duration_seconds_count") > 0.0
    })
    .await;
    let delta = |series: &str| after.get(series) - before.get(series);
    assert_eq!(delta("xiaozhi_upstream_connects_total"), 1.0);
    assert_eq!(delta("xiaozhi_upstream_connect_seconds_count"), 1.0);
    assert!(delta("xiaozhi_upstream_connect_seconds_sum") > 0.0);
    assert_eq!(
        delta("xiaozhi_upstream_connect_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert!(delta("xiaozhi_history_write_seconds_count") >= 1.0);
    assert!(delta("xiaozhi_history_records_total{outcome=\"stored\"}") >= 1.0);
    assert_eq!(delta("xiaozhi_history_write_failures_total"), 0.0);
    assert_eq!(delta("xiaozhi_session_duration_seconds_count"), 1.0);
    // One turn: the server's stt, then the reply's first audio frame.
    assert_eq!(delta("xiaozhi_first_audio_seconds_count"), 1.0);
    assert!(delta("xiaozhi_first_audio_seconds_sum") > 0.0);
    // hello, listen start twice (before and after the turn), goodbye, and the device's
    // answers to the gateway's MCP setup.
    assert_eq!(delta("xiaozhi_device_messages_total{type=\"hello\"}"), 1.0);
    assert_eq!(delta("xiaozhi_device_messages_total{type=\"listen\"}"), 2.0);
    assert_eq!(
        delta("xiaozhi_device_messages_total{type=\"goodbye\"}"),
        1.0
    );
    assert!(delta("xiaozhi_device_messages_total{type=\"mcp\"}") >= 1.0);
    for reason in ["refused", "timeout", "auth", "handshake", "hello", "midway"] {
        assert_eq!(
            delta(&format!(
                "xiaozhi_upstream_failures_total{{reason=\"{reason}\"}}"
            )),
            0.0,
            "{reason}"
        );
    }
    dev.disconnect().await;
    gw.shutdown().await;
}
