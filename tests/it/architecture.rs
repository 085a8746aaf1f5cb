//! The import layering of the service and tools crates (`crates/xiaozhi-gateway/src/`,
//! `crates/xiaozhi-tools/src/`), checked: ARCHITECTURE.md's "Layers" table names every
//! top-level module's layer, and this test fails when a module imports from a layer above
//! its own, when two modules import each other (directly or around a loop), or when a
//! module is missing from the table. Between crates the compiler keeps the order (the
//! service cannot name the tools, the protocol core neither); inside a crate, this test.
//!
//! Imports are read as text: every `crate::<module>` path outside comments and string
//! literals (grouped `crate::{a::.., b::..}` included), in code, tests and macro bodies
//! alike, so nothing escapes by being written inside `tokio::select!` or a test module.
//! In the tools crate, `xiaozhi_gateway::<module>` paths count too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One import of another top-level module, where it was written.
#[derive(Debug, Clone)]
struct Import {
    from: String,
    to: String,
    at: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The "Layers" table of ARCHITECTURE.md: module -> (layer index from the bottom, name).
fn layer_table() -> BTreeMap<String, (usize, String)> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Layers\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a '## Layers' section");
    let section = section.split("\n## ").next().unwrap();
    let mut table = BTreeMap::new();
    let rows = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .collect::<Vec<_>>();
    assert!(!rows.is_empty(), "the Layers table has no rows");
    // The table lists the top layer first.
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (name, modules) = (cells[1], cells[2]);
        let layer = rows.len() - i;
        for module in modules.split(',') {
            let module = module.trim().trim_matches('`').to_string();
            assert!(!module.is_empty(), "empty module name in layer row: {row}");
            let previous = table.insert(module.clone(), (layer, name.to_string()));
            assert!(previous.is_none(), "{module} is in two layers");
        }
    }
    table
}

/// The crates whose modules the Layers table places, with the prefixes their code names
/// those modules by.
const LAYERED_CRATES: [(&str, &[&str]); 2] = [
    ("crates/xiaozhi-gateway/src", &["crate::"]),
    (
        "crates/xiaozhi-tools/src",
        &["crate::", "xiaozhi_gateway::"],
    ),
];

/// Top-level modules, as the layered crates' `lib.rs` declare them.
fn declared_modules() -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    for (dir, _) in LAYERED_CRATES {
        let lib = std::fs::read_to_string(root().join(dir).join("lib.rs")).unwrap();
        let before = modules.len();
        modules.extend(
            lib.lines()
                .filter_map(|l| l.trim().strip_prefix("pub mod "))
                .map(|m| m.trim_end_matches(';').to_string()),
        );
        assert!(modules.len() > before, "{dir}/lib.rs declares no modules");
    }
    modules
}

/// `source` with comments, string literals and char literals blanked out (newlines
/// kept, so line numbers stay right).
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !is_ident(chars[i - 1]))
        {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &chars[i..j.min(chars.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            out.push(' ');
            i += 1;
            if chars.get(i) == Some(&'\\') {
                // The escape and the escaped character ('\'' included).
                out.push_str("  ");
                i += 2;
            }
            while i < chars.len() && chars[i] != '\'' {
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The top-level modules a piece of code names through `prefix` (`crate::`), with line
/// numbers.
fn crate_paths(code: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let line_of = |pos: usize| chars[..pos].iter().filter(|&&c| c == '\n').count() + 1;
    let ident_at = |mut j: usize| {
        while chars.get(j).is_some_and(|c| c.is_whitespace()) {
            j += 1;
        }
        let start = j;
        while chars.get(j).is_some_and(|&c| is_ident(c)) {
            j += 1;
        }
        (chars[start..j].iter().collect::<String>(), j)
    };
    let needle: Vec<char> = prefix.chars().collect();
    let mut i = 0;
    while i + needle.len() <= chars.len() {
        if chars[i..i + needle.len()] != needle[..] || (i > 0 && is_ident(chars[i - 1])) {
            i += 1;
            continue;
        }
        let mut j = i + needle.len();
        while chars.get(j).is_some_and(|c| c.is_whitespace()) {
            j += 1;
        }
        if chars.get(j) == Some(&'{') {
            // crate::{a::x, b::{y, z}, c}: the first identifier of every item at depth 1.
            let mut depth = 0;
            let mut expect_item = true;
            while j < chars.len() {
                match chars[j] {
                    '{' => {
                        depth += 1;
                        expect_item = depth == 1;
                        j += 1;
                    }
                    '}' => {
                        depth -= 1;
                        j += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' => {
                        expect_item = depth == 1;
                        j += 1;
                    }
                    c if expect_item && is_ident(c) => {
                        let (name, end) = ident_at(j);
                        found.push((line_of(j), name));
                        expect_item = false;
                        j = end;
                    }
                    _ => j += 1,
                }
            }
        } else {
            let (name, end) = ident_at(j);
            if !name.is_empty() {
                found.push((line_of(j), name));
            }
            j = end;
        }
        i = j.max(i + 1);
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every import of one top-level module by another in the layered crates.
fn imports(modules: &BTreeSet<String>) -> Vec<Import> {
    let mut found = Vec::new();
    for (dir, prefixes) in LAYERED_CRATES {
        let src = root().join(dir);
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let rel = file
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let top = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" {
                continue;
            }
            assert!(
                modules.contains(&top),
                "{dir}/{rel} is in no declared module"
            );
            let code = code_only(&std::fs::read_to_string(&file).unwrap());
            // In a top-level module's root file, `super::` is the crate root: ask for
            // `crate::` there so this check sees the import (test modules excepted).
            if !rel.contains('/') || (rel.matches('/').count() == 1 && rel.ends_with("/mod.rs")) {
                let before_tests = code.split("#[cfg(test)]").next().unwrap();
                assert!(
                    !before_tests.contains("super::"),
                    "{dir}/{rel} names a sibling module through `super::`; write `crate::`"
                );
            }
            for prefix in prefixes {
                for (line, to) in crate_paths(&code, prefix) {
                    if to != top && modules.contains(&to) {
                        found.push(Import {
                            from: top.clone(),
                            to,
                            at: format!("{dir}/{rel}:{line}"),
                        });
                    }
                }
            }
        }
    }
    found
}

/// Strongly connected components with more than one module (import loops).
fn loops(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules are in one loop when each reaches the other.
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for next in edges.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for (m, r) in &reachable {
        if done.contains(*m) || !r.contains(*m) {
            continue;
        }
        let component: Vec<String> = r
            .iter()
            .filter(|n| reachable.get(n).is_some_and(|rn| rn.contains(*m)))
            .cloned()
            .collect();
        done.extend(component.iter().cloned());
        out.push(component);
    }
    out
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let table = layer_table();
    let modules = declared_modules();
    let placed: BTreeSet<String> = table.keys().cloned().collect();
    let unplaced: Vec<_> = modules.difference(&placed).collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from ARCHITECTURE.md's Layers table: {unplaced:?}"
    );
    let stale: Vec<_> = table.keys().filter(|m| !modules.contains(*m)).collect();
    assert!(
        stale.is_empty(),
        "the Layers table names modules lib.rs does not declare: {stale:?}"
    );

    let found = imports(&modules);
    assert!(
        found.len() > 100,
        "the scan found only {} imports: the reader is broken",
        found.len()
    );
    let upward: Vec<String> = found
        .iter()
        .filter(|i| table[&i.to].0 > table[&i.from].0)
        .map(|i| {
            format!(
                "{} ({}, layer {}) imports {} ({}, layer {}) at {}",
                i.from,
                table[&i.from].1,
                table[&i.from].0,
                i.to,
                table[&i.to].1,
                table[&i.to].0,
                i.at
            )
        })
        .collect();
    assert!(
        upward.is_empty(),
        "imports that point up a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn modules_import_each_other_in_one_direction_only() {
    let modules = declared_modules();
    let found = imports(&modules);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in &found {
        edges
            .entry(i.from.clone())
            .or_default()
            .insert(i.to.clone());
    }
    let loops = loops(&edges);
    let described: Vec<String> = loops
        .iter()
        .map(|members| {
            // One line per pair of modules that import each other's way round the loop,
            // with the first place each import is written.
            let mut pairs: BTreeMap<(&str, &str), &str> = BTreeMap::new();
            for i in &found {
                if members.contains(&i.from) && members.contains(&i.to) {
                    pairs.entry((&i.from, &i.to)).or_insert(&i.at);
                }
            }
            let edges: Vec<String> = pairs
                .iter()
                .map(|((from, to), at)| format!("  {from} -> {to} ({at})"))
                .collect();
            format!("{members:?}:\n{}", edges.join("\n"))
        })
        .collect();
    assert!(loops.is_empty(), "import loops:\n{}", described.join("\n"));
}

#[test]
fn the_reader_sees_paths_in_code_and_not_in_comments_or_strings() {
    let code = code_only(
        r##"
use crate::audio::x; // crate::history
/* crate::calls /* nested crate::calls */ */
let s = "crate::http \" crate::http";
let r = r#"crate::soak "quoted" crate::soak"#;
let c = '"'; let d = '\''; fn f<'a>(x: &'a str) { crate::broker::go(x) }
use crate::{
    presence::Store,
    session::{a, b::c},
    config,
};
tokio::select! { _ = crate::events::tick() => {} }
"##,
    );
    let names: Vec<String> = crate_paths(&code, "crate::")
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        names,
        ["audio", "broker", "presence", "session", "config", "events"]
    );
    let lines: Vec<usize> = crate_paths(&code, "crate::")
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    assert_eq!(lines, [2, 6, 8, 9, 10, 12]);
    // The tools crate names the service's modules by the crate's name.
    let tools = code_only("use xiaozhi_gateway::{config::Config, server};\nmy_xiaozhi_gateway::x;");
    let names: Vec<String> = crate_paths(&tools, "xiaozhi_gateway::")
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(names, ["config", "server"]);
}

#[test]
fn a_loop_is_found() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |a: &str, b: &str| {
        edges.entry(a.into()).or_default().insert(b.into());
    };
    add("a", "b");
    add("b", "c");
    add("c", "a");
    add("c", "d");
    add("d", "e");
    assert_eq!(loops(&edges), vec![vec!["a", "b", "c"]]);
}

/// Crates `xiaozhi-proto` may never depend on, directly or through another crate: async
/// runtimes, event loops, socket and network-client crates.
const NOT_IN_PROTO: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "async-io",
    "async-std",
    "smol",
    "polling",
    "hyper",
    "reqwest",
    "rumqttc",
    "rumqttd",
    "quinn",
    "sqlx",
    "redis",
];

/// The normal dependencies of a `[package]` in Cargo.lock, keyed by `name version`.
fn lock_graph(lock: &str) -> BTreeMap<String, Vec<String>> {
    let mut graph = BTreeMap::new();
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut raw = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let (name, version) = (field("name").unwrap(), field("version").unwrap());
        let deps: Vec<String> = block
            .split("dependencies = [")
            .nth(1)
            .map(|d| d.split(']').next().unwrap())
            .unwrap_or("")
            .lines()
            .map(|l| l.trim().trim_end_matches(',').trim_matches('"').to_string())
            .filter(|l| !l.is_empty())
            .collect();
        versions
            .entry(name.clone())
            .or_default()
            .push(version.clone());
        raw.push((format!("{name} {version}"), deps));
    }
    // A dependency is written `name` when only one version is locked, else `name version`.
    for (key, deps) in raw {
        let deps = deps
            .iter()
            .map(|d| {
                let mut parts = d.split(' ');
                let name = parts.next().unwrap();
                match parts.next() {
                    Some(version) => format!("{name} {version}"),
                    None => format!("{name} {}", versions[name][0]),
                }
            })
            .collect();
        graph.insert(key, deps);
    }
    graph
}

/// The `[dependencies]` (not dev-dependencies) of a crate's manifest, by name.
fn normal_dependencies(manifest: &str) -> Vec<String> {
    manifest
        .split("\n[dependencies]\n")
        .nth(1)
        .expect("the manifest has a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['.', ' ', '=']).next().unwrap().to_string())
        .collect()
}

#[test]
fn the_protocol_crate_brings_in_no_runtime_and_no_network_crate() {
    let proto = root().join("crates/xiaozhi-proto");
    let manifest = std::fs::read_to_string(proto.join("Cargo.toml")).unwrap();
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let graph = lock_graph(&lock);
    let direct = normal_dependencies(&manifest);
    assert!(
        direct.contains(&"thiserror".to_string()),
        "read the manifest wrong: {direct:?}"
    );
    let proto_key = graph
        .keys()
        .find(|k| k.starts_with("xiaozhi-proto "))
        .expect("xiaozhi-proto is in Cargo.lock")
        .clone();
    // Start from the manifest's normal dependencies (the lock lists dev-dependencies of
    // workspace crates too), as they are locked for xiaozhi-proto, then follow the lock.
    let mut stack: Vec<(String, String)> = graph[&proto_key]
        .iter()
        .filter(|d| direct.iter().any(|n| d.split(' ').next() == Some(n)))
        .map(|d| (d.clone(), "xiaozhi-proto".to_string()))
        .collect();
    assert_eq!(
        stack.len(),
        direct.len(),
        "every direct dependency is locked"
    );
    let mut seen = BTreeSet::new();
    let mut bad = Vec::new();
    while let Some((key, via)) = stack.pop() {
        if !seen.insert(key.clone()) {
            continue;
        }
        let name = key.split(' ').next().unwrap().to_string();
        if NOT_IN_PROTO.contains(&name.as_str()) {
            bad.push(format!("{key} (through {via})"));
        }
        for dep in graph.get(&key).into_iter().flatten() {
            stack.push((dep.clone(), name.clone()));
        }
    }
    assert!(
        seen.iter().any(|k| k.starts_with("serde ")),
        "walked the lock wrong: {seen:?}"
    );
    assert!(
        bad.is_empty(),
        "xiaozhi-proto must stay sans-IO, yet it depends on: {bad:?}"
    );
}

/// What code in `xiaozhi-proto` may not do outside its tests.
const NOT_IN_PROTO_CODE: &[(&str, &str)] = &[
    (
        "Instant::now",
        "reads the clock (take `now` as an argument)",
    ),
    (
        "SystemTime::now",
        "reads the clock (take `now` as an argument)",
    ),
    ("sleep(", "sleeps"),
    ("spawn", "spawns"),
    ("std::thread", "uses threads"),
    // Addresses are values (`SocketAddr`, `IpAddr`); sockets and name lookups are I/O.
    ("UdpSocket", "opens sockets"),
    ("TcpStream", "opens sockets"),
    ("TcpListener", "opens sockets"),
    ("to_socket_addrs", "looks names up"),
    ("std::fs", "touches files"),
    ("std::process", "runs processes"),
    ("tokio", "uses an async runtime"),
    (
        "thread_rng",
        "draws randomness of its own (take it as an argument)",
    ),
    (
        "OsRng",
        "draws randomness of its own (take it as an argument)",
    ),
];

#[test]
fn the_protocol_crate_reads_no_clock_and_does_no_io() {
    let src = root().join("crates/xiaozhi-proto/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found the crate's files: {files:?}");
    let mut found = Vec::new();
    for file in files {
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        let before_tests = code.split("#[cfg(test)]").next().unwrap();
        for (line_no, line) in before_tests.lines().enumerate() {
            for (pattern, what) in NOT_IN_PROTO_CODE {
                if line.contains(pattern) {
                    found.push(format!(
                        "{}:{} {what}: {}",
                        file.strip_prefix(root()).unwrap().display(),
                        line_no + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
