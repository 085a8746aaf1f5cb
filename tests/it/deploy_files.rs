//! The deployment files hold together: every PromQL expression in the Grafana dashboard and
//! the alert rules names only metrics and labels the gateway exports; docker-compose,
//! Prometheus and Grafana provisioning parse, agree with each other, and mount only files
//! that exist in the repo.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use xiaozhi_gateway::metrics::Metrics;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Series names the gateway exports, each with its label names and the values seen.
fn exported() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let text = xiaozhi_gateway::metrics::exposition::render(&Metrics::default());
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap();
        let labels = out.entry(line[..end].to_owned()).or_default();
        if let Some(body) = line[end..].strip_prefix('{') {
            let body = &body[..body.find('}').unwrap()];
            for pair in body.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap();
                labels
                    .entry(k.to_owned())
                    .or_default()
                    .insert(v.trim_end_matches('"').to_owned());
            }
        }
    }
    out
}

/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn identifiers(expr: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < bytes.len()
                && ((bytes[i] as char).is_ascii_alphanumeric() || bytes[i] == b'_')
            {
                i += 1;
            }
            out.push((start, expr[start..i].to_owned()));
        } else if c == '"' {
            // Skip string literals (label values, regexes).
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += 1;
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// Checks one PromQL expression: its metric names are exported, every label matcher
/// names a label that metric has (with a value it takes), and every `by (...)` label
/// exists on the metrics the expression aggregates.
fn check_expr(
    expr: &str,
    where_: &str,
    exported: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
) -> usize {
    let metrics: Vec<(usize, String)> = identifiers(expr)
        .into_iter()
        .filter(|(_, id)| id.starts_with("xiaozhi_") || id.starts_with("process_"))
        .collect();
    for (at, name) in &metrics {
        let labels = exported
            .get(name)
            .unwrap_or_else(|| panic!("{where_}: {name} is not exported (in {expr})"));
        // Label matchers right after the name.
        let rest = &expr[at + name.len()..];
        if let Some(body) = rest.strip_prefix('{') {
            let body = &body[..body.find('}').unwrap()];
            for matcher in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let (label, value) = matcher.split_once('=').unwrap();
                let label = label.trim_end_matches(['!', '=', '~']).trim();
                if TARGET_LABELS.contains(&label) {
                    continue;
                }
                let values = labels
                    .get(label)
                    .unwrap_or_else(|| panic!("{where_}: {name} has no label {label} (in {expr})"));
                let value = value
                    .trim_start_matches(['=', '~'])
                    .trim()
                    .trim_matches('"');
                if !matcher.contains('~') {
                    assert!(
                        values.contains(value),
                        "{where_}: {name}{{{label}}} never takes {value:?} (in {expr})"
                    );
                }
            }
        }
    }
    // `by (a, b)`: every aggregated metric must carry the labels.
    let mut rest = expr;
    while let Some(pos) = rest.find("by (") {
        let inner = &rest[pos + 4..];
        let close = inner.find(')').unwrap();
        for label in inner[..close].split(',').map(str::trim) {
            if TARGET_LABELS.contains(&label) {
                continue;
            }
            for (_, name) in &metrics {
                let has = exported[name].contains_key(label);
                assert!(
                    has,
                    "{where_}: by ({label}) but {name} has no such label (in {expr})"
                );
            }
        }
        rest = &inner[close..];
    }
    metrics.len()
}

#[test]
fn dashboard_queries_use_only_exported_metrics_and_labels() {
    let exported = exported();
    assert!(exported.contains_key("xiaozhi_session_duration_seconds_bucket"));
    let dashboard: Json =
        serde_json::from_str(&read("grafana/dashboards/xiaozhi-gateway.json")).unwrap();
    assert_eq!(dashboard["title"], "xiaozhi gateway");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "prometheus", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                check_expr(expr, title, &exported) > 0,
                "{title}: no metric in {expr}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} queries");
}

#[test]
fn alert_rules_use_only_exported_metrics_and_labels() {
    let exported = exported();
    let rules = yaml("prometheus/alerts.yml");
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            assert!(rule["labels"]["severity"].is_string(), "{name}");
            assert!(rule["annotations"]["summary"].is_string(), "{name}");
            // `up` is Prometheus's own; everything else must be ours.
            if !expr.starts_with("up{") {
                assert!(check_expr(expr, name, &exported) > 0, "{name}");
            }
            names.push(name.to_owned());
        }
    }
    for wanted in [
        "XiaozhiUdpAudioNotArriving",
        "XiaozhiUpstreamFailing",
        "XiaozhiHistoryJournalGrowing",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{names:?}");
    }
}

#[test]
fn the_checker_catches_renamed_metrics_and_labels() {
    let exported = exported();
    let bad =
        |expr: &str| std::panic::catch_unwind(|| check_expr(expr, "test", &exported)).is_err();
    assert!(
        bad("rate(xiaozhi_udp_datagram_total[1m])"),
        "renamed metric"
    );
    assert!(
        bad(r#"xiaozhi_udp_datagrams_total{dir="rx"}"#),
        "unknown label"
    );
    assert!(
        bad(r#"xiaozhi_udp_datagrams_total{direction="up"}"#),
        "unknown value"
    );
    assert!(
        bad("sum by (reason) (rate(xiaozhi_udp_datagrams_total[1m]))"),
        "unknown by label"
    );
    assert!(!bad(
        r#"sum by (direction) (rate(xiaozhi_udp_datagrams_total{direction="rx",job="x"}[1m]))"#
    ));
}

#[test]
fn compose_prometheus_and_grafana_agree_and_mount_what_exists() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().unwrap();
    let gateways = ["gateway", "gateway-a", "gateway-b"];
    let all = [
        "gateway",
        "mysql",
        "redis",
        "prometheus",
        "grafana",
        "emqx",
        "haproxy",
        "gateway-a",
        "gateway-b",
    ];
    for name in all {
        let service = &compose["services"][name];
        assert!(service.is_mapping(), "service {name}");
        let networks: Vec<&str> = service["networks"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} names its network"))
            .iter()
            .filter_map(|n| n.as_str())
            .collect();
        assert_eq!(networks, ["xiaozhi"], "{name} is on the one network");
        // One gateway in profile single, the cluster in profile scale, the rest in both.
        let profiles: Vec<&str> = service["profiles"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        let want: &[&str] = match name {
            "gateway" => &["single"],
            "emqx" | "haproxy" | "gateway-a" | "gateway-b" => &["scale"],
            _ => &[],
        };
        assert_eq!(profiles, want, "{name}'s profiles");
        if !gateways.contains(&name) {
            assert!(
                service["healthcheck"]["test"].is_sequence(),
                "{name} has a health check"
            );
        }
    }
    assert_eq!(services.len(), all.len());
    assert_eq!(compose["networks"].as_mapping().unwrap().len(), 1);
    // Every bind mount exists in the repo; every named volume is declared.
    let volumes = compose["volumes"].as_mapping().unwrap();
    let mut mounts = BTreeMap::new();
    for (name, service) in services {
        for v in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = v.as_str().unwrap();
            let (source, target) = spec.split_once(':').unwrap();
            let target = target.trim_end_matches(":ro");
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    repo(path).exists(),
                    "{name:?} mounts ./{path}, which is not in the repo"
                );
                mounts.insert(target.to_owned(), path.to_owned());
            } else {
                assert!(
                    volumes.contains_key(source),
                    "{name:?}: volume {source} is not declared"
                );
            }
        }
    }
    // The gateway's ports, as README documents them.
    let ports: Vec<&str> = compose["services"]["gateway"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for port in ["1883/tcp", "8883/tcp", "8884/udp", "8007/tcp", "1884/tcp"] {
        assert!(
            ports.iter().any(|p| p.ends_with(&format!(":{port}"))),
            "{port} in {ports:?}"
        );
    }
    let dockerfile = read("Dockerfile");
    for port in ["1883/tcp", "8883/tcp", "8884/udp", "8007/tcp", "1884/tcp"] {
        assert!(dockerfile.contains(port), "Dockerfile exposes {port}");
    }
    // The database and Redis are addressed by service name.
    let env = &compose["services"]["gateway"]["environment"];
    assert!(
        env["XZ_HISTORY__DATABASE_URL"]
            .as_str()
            .unwrap()
            .contains("@mysql:3306/")
    );
    assert_eq!(
        env["XZ_PRESENCE__REDIS_URL"].as_str().unwrap(),
        "redis://redis:6379/0"
    );

    // Scale: both nodes on EMQX with their own ids and UDP ports, devices through HAProxy.
    let mut udp_ports = BTreeSet::new();
    for (node, service) in [("gw-a", "gateway-a"), ("gw-b", "gateway-b")] {
        let env = &compose["services"][service]["environment"];
        assert_eq!(env["XZ_NODE__ID"].as_str(), Some(node));
        assert_eq!(env["XZ_BUS__MODE"].as_str(), Some("external"));
        assert_eq!(env["XZ_BUS__URL"].as_str(), Some("mqtt://emqx:1883"));
        assert_eq!(
            env["XZ_PRESENCE__REDIS_URL"].as_str(),
            Some("redis://redis:6379/0")
        );
        let public = env["XZ_UDP__PUBLIC_PORT"].as_str().unwrap();
        let ports: Vec<&str> = compose["services"][service]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        assert!(
            ports.contains(&format!("{public}:8884/udp").as_str()),
            "{service} publishes the UDP port it announces: {ports:?}"
        );
        udp_ports.insert(public.to_owned());
    }
    assert_eq!(udp_ports.len(), 2, "each node its own UDP port");
    let haproxy = read("deploy/scale/haproxy.cfg");
    for backend in ["gateway-a:1883", "gateway-b:1883"] {
        assert!(haproxy.contains(backend), "HAProxy balances over {backend}");
    }
    assert_eq!(
        compose["services"]["haproxy"]["ports"][0].as_str(),
        Some("1883:1883/tcp")
    );

    // Prometheus scrapes the gateway service on its HTTP port and loads the mounted rules.
    let prometheus = yaml("prometheus/prometheus.yml");
    let sd = &prometheus["scrape_configs"][0]["dns_sd_configs"][0];
    let names: Vec<&str> = sd["names"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert_eq!(names, gateways, "every gateway service is scraped");
    assert_eq!(sd["port"].as_u64(), Some(8007));
    assert_eq!(
        prometheus["scrape_configs"][0]["metrics_path"].as_str(),
        Some("/metrics")
    );
    for rule_file in prometheus["rule_files"].as_sequence().unwrap() {
        let path = rule_file.as_str().unwrap();
        assert!(
            mounts.contains_key(path),
            "{path} is mounted into the Prometheus container"
        );
    }
    assert!(mounts.contains_key("/etc/prometheus/prometheus.yml"));

    // Grafana: the datasource the dashboard uses, pointing at the Prometheus service; the
    // dashboards provider reads the mounted dashboards folder.
    let datasource = yaml("grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        datasource["datasources"][0]["uid"].as_str(),
        Some("prometheus")
    );
    assert_eq!(
        datasource["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let provider = yaml("grafana/provisioning/dashboards/xiaozhi.yml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let mounted = mounts
        .get(path)
        .unwrap_or_else(|| panic!("{path} is not mounted"));
    assert!(repo(mounted).join("xiaozhi-gateway.json").exists());
    assert!(mounts.contains_key("/etc/grafana/provisioning"));
}

/// Runs Prometheus's own `promtool` (installed by `.ci/run`).
fn promtool(args: &[&str]) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo(""))
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_config_the_rules_and_every_dashboard_query() {
    promtool(&[
        "check",
        "config",
        "--syntax-only",
        "prometheus/prometheus.yml",
    ]);
    promtool(&["check", "rules", "prometheus/alerts.yml"]);
    // The alerts fire (and stay silent) on synthetic series as intended.
    promtool(&["test", "rules", "prometheus/tests/alerts_test.yml"]);
    // Every dashboard query as a recording rule, so promtool parses its PromQL.
    let dashboard: Json =
        serde_json::from_str(&read("grafana/dashboards/xiaozhi-gateway.json")).unwrap();
    let mut rules = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            rules.push(serde_json::json!({
                "record": format!("dashboard:query_{}", rules.len()),
                "expr": t["expr"],
            }));
        }
    }
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard_rules.yml");
    // JSON is YAML.
    std::fs::write(&path, file.to_string()).unwrap();
    promtool(&["check", "rules", path.to_str().unwrap()]);
}
