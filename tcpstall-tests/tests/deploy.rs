//! Checks of the deploy artefacts (no root, no kernel features needed):
//!
//! - `deploy/prometheus/tcpstall-rules.yaml`: `promtool check rules`, the
//!   `promtool test rules` unit tests, required alerts and annotations, and
//!   only contract metric names in the expressions;
//! - `deploy/prometheus/tcpstall-prometheusrule.yaml`: generated from the plain
//!   file by `gen-prometheusrule.sh` and in sync with it (byte-for-byte and
//!   semantically), its rules valid for promtool;
//! - `deploy/prometheus/prometheus.example.yaml`: `promtool check config`;
//! - every `runbook_url` anchor (and every in-page link) exists in
//!   `docs/runbook.md`;
//! - `deploy/grafana/tcpstall-dashboard.json` parses and every query uses only
//!   the metric contract (names, labels and label values);
//! - `deploy/kubernetes/tcpstall-daemonset.yaml`: `kubernetes-validate
//!   --strict` for the core resources (the ServiceMonitor CRD has no schema
//!   and is the only document allowed to be skipped), plus the settings the
//!   agent depends on.
//!
//! External tools are required, never skipped: a missing one fails the test
//! with the package to install (promtool: Debian `prometheus`;
//! kubernetes-validate: `pip install kubernetes-validate`). `PROMTOOL` and
//! `KUBERNETES_VALIDATE` override the commands.
//!
//! Run: `cargo test -p tcpstall-tests --test deploy`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

// ---------------------------------------------------------------------------
// Paths, tools
// ---------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn path(rel: &str) -> PathBuf {
    repo().join(rel)
}

fn read(rel: &str) -> String {
    fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcpstall-deploy-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

struct Tool {
    cmd: String,
    install: &'static str,
}

impl Tool {
    fn promtool() -> Tool {
        Tool {
            cmd: std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into()),
            install: "install the Debian package `prometheus` (apt-get install -y prometheus), \
                      or set PROMTOOL=/path/to/promtool",
        }
    }

    fn kubernetes_validate() -> Tool {
        Tool {
            cmd: std::env::var("KUBERNETES_VALIDATE")
                .unwrap_or_else(|_| "kubernetes-validate".into()),
            install: "install the PyPI package `kubernetes-validate` \
                      (python3 -m pip install kubernetes-validate), \
                      or set KUBERNETES_VALIDATE=/path/to/kubernetes-validate",
        }
    }

    /// Run the tool; a missing tool fails the test with the install hint.
    fn run(&self, args: &[&str], cwd: &Path) -> Output {
        match Command::new(&self.cmd).args(args).current_dir(cwd).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "required tool `{}` not found: {}. These deploy checks are never skipped.",
                self.cmd, self.install
            ),
            Err(e) => panic!("running `{}`: {e}", self.cmd),
        }
    }

    /// Run and require success, returning stdout + stderr.
    fn ok(&self, args: &[&str], cwd: &Path) -> String {
        let out = self.run(args, cwd);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "`{} {}` failed ({}):\n{text}",
            self.cmd,
            args.join(" "),
            out.status
        );
        text
    }
}

// ---------------------------------------------------------------------------
// The metric contract
// ---------------------------------------------------------------------------

const FLOW_LABELS: &[&str] = &[
    "class",
    "local",
    "remote",
    "netns",
    "pod",
    "namespace",
    "container",
];

/// Labels attached at scrape time (job/instance by Prometheus, node/agent_pod
/// by the ServiceMonitor relabelings).
const TARGET_LABELS: &[&str] = &["job", "instance", "node", "agent_pod"];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// name -> (type, labels)
fn contract() -> BTreeMap<&'static str, (Kind, Vec<&'static str>)> {
    use Kind::*;
    let mut m = BTreeMap::new();
    m.insert(
        "tcpstall_retransmits_total",
        (Counter, vec!["remote", "cause"]),
    );
    m.insert("tcpstall_rto_expirations_total", (Counter, vec!["remote"]));
    m.insert("tcpstall_timeouts_total", (Counter, vec![]));
    m.insert("tcpstall_stalled_sockets", (Gauge, vec!["class"]));
    m.insert("tcpstall_sockets_near_timeout", (Gauge, vec![]));
    m.insert(
        "tcpstall_stall_duration_seconds",
        (Histogram, vec!["outcome"]),
    );
    m.insert(
        "tcpstall_timeout_prediction_error_seconds",
        (Histogram, vec![]),
    );
    m.insert(
        "tcpstall_socket_seconds_to_timeout",
        (Gauge, FLOW_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_socket_unacked_age_seconds",
        (Gauge, FLOW_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_socket_stall_seconds",
        (Gauge, FLOW_LABELS.to_vec()),
    );
    m.insert("tcpstall_events_total", (Counter, vec!["kind"]));
    m.insert("tcpstall_ringbuf_dropped_events_total", (Counter, vec![]));
    m.insert("tcpstall_decode_errors_total", (Counter, vec![]));
    m.insert(
        "tcpstall_probe_attached",
        (Gauge, vec!["probe", "mechanism"]),
    );
    m.insert(
        "tcpstall_probe_missed_runs_total",
        (Counter, vec!["program"]),
    );
    m.insert("tcpstall_probe_runs_total", (Counter, vec!["program"]));
    m.insert(
        "tcpstall_probe_run_seconds_total",
        (Counter, vec!["program"]),
    );
    m.insert("tcpstall_flows_tracked", (Gauge, vec![]));
    m.insert("tcpstall_flow_evictions_total", (Counter, vec![]));
    m.insert("tcpstall_build_info", (Gauge, vec!["version", "kernel"]));
    m
}

/// Closed label value sets.
fn label_values(label: &str) -> Option<&'static [&'static str]> {
    match label {
        "class" => Some(&["retransmit", "zero_window", "close_wait"]),
        "outcome" => Some(&["recovered", "timed_out", "closed"]),
        "kind" => Some(&["retransmit", "write_timer", "state", "error_report", "ack"]),
        "cause" => Some(&["rto", "tlp", "fast", "syn", "unknown"]),
        _ => None,
    }
}

/// Labels a series name may carry, or None when the name is not exported.
/// `allow_up`: Prometheus' synthetic `up` (rules only).
fn series_labels(name: &str, allow_up: bool) -> Option<BTreeSet<&'static str>> {
    let c = contract();
    let mut labels: BTreeSet<&'static str> = TARGET_LABELS.iter().copied().collect();
    if allow_up && name == "up" {
        return Some(labels);
    }
    if let Some((kind, l)) = c.get(name) {
        if *kind == Kind::Histogram {
            return None; // only the _bucket/_sum/_count series exist
        }
        labels.extend(l.iter().copied());
        return Some(labels);
    }
    for (suffix, le) in [("_bucket", true), ("_sum", false), ("_count", false)] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some((Kind::Histogram, l)) = c.get(base)
        {
            labels.extend(l.iter().copied());
            if le {
                labels.insert("le");
            }
            return Some(labels);
        }
    }
    None
}

fn all_known_labels() -> BTreeSet<&'static str> {
    let mut s: BTreeSet<&'static str> = TARGET_LABELS.iter().copied().collect();
    for (_, (_, l)) in contract() {
        s.extend(l);
    }
    s.insert("le");
    s
}

// ---------------------------------------------------------------------------
// A small PromQL scanner: finds metric names, their label matchers and
// grouping labels. Enough for the expressions in this repository; anything it
// does not understand is reported, never ignored.
// ---------------------------------------------------------------------------

const KEYWORDS: &[&str] = &[
    // aggregations
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // binary operators and modifiers
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Check one PromQL expression (Grafana variables allowed); returns problems.
fn check_promql(expr: &str, allow_up: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let known = all_known_labels();
    let b = expr.as_bytes();
    let mut i = 0;
    let mut metrics = 0;
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    let ident_end = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c == b'[' {
            // range or subquery: durations and Grafana interval variables
            match expr[i..].find(']') {
                Some(n) => i += n + 1,
                None => {
                    problems.push(format!("unclosed '[' in `{expr}`"));
                    break;
                }
            }
        } else if c == b'$' {
            // Grafana variable: $name or ${name}
            i += 1;
            if i < b.len() && b[i] == b'{' {
                match expr[i..].find('}') {
                    Some(n) => i += n + 1,
                    None => break,
                }
            } else {
                i = ident_end(i);
            }
        } else if c.is_ascii_digit() || (c == b'.' && i + 1 < b.len() && b[i + 1].is_ascii_digit())
        {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c == b'{' {
            problems.push(format!("selector without a metric name in `{expr}`"));
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let end = ident_end(i);
            let word = &expr[i..end];
            let next = skip_ws(end);
            let followed_by_paren = next < b.len() && b[next] == b'(';
            if GROUPING.contains(&word) && followed_by_paren {
                let close = match expr[next..].find(')') {
                    Some(n) => next + n,
                    None => {
                        problems.push(format!("unclosed grouping list in `{expr}`"));
                        break;
                    }
                };
                for l in expr[next + 1..close]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                {
                    if !known.contains(l) {
                        problems.push(format!(
                            "`{word} ({l})`: label `{l}` is not in the contract, in `{expr}`"
                        ));
                    }
                }
                i = close + 1;
            } else if followed_by_paren || KEYWORDS.contains(&word) {
                i = end; // function call, aggregation, operator
            } else {
                metrics += 1;
                let labels = series_labels(word, allow_up);
                if labels.is_none() {
                    problems.push(format!("`{word}` is not a contract metric, in `{expr}`"));
                }
                i = next;
                if i < b.len() && b[i] == b'{' {
                    let close = match find_selector_end(b, i) {
                        Some(n) => n,
                        None => {
                            problems.push(format!("unclosed '{{' in `{expr}`"));
                            break;
                        }
                    };
                    for (label, op, value) in
                        parse_matchers(&expr[i + 1..close], &mut problems, expr)
                    {
                        if let Some(ls) = &labels
                            && !ls.contains(label.as_str())
                        {
                            problems.push(format!(
                                "`{word}` has no label `{label}` in the contract, in `{expr}`"
                            ));
                        }
                        if op == "="
                            && let Some(vals) = label_values(&label)
                            && !vals.contains(&value.as_str())
                        {
                            problems.push(format!(
                                "`{label}=\"{value}\"` is not one of {vals:?}, in `{expr}`"
                            ));
                        }
                    }
                    i = close + 1;
                }
            }
        } else {
            i += 1; // operators, parentheses, commas
        }
    }
    if metrics == 0 {
        problems.push(format!("no metric found in `{expr}`"));
    }
    problems
}

fn skip_string(b: &[u8], start: usize) -> usize {
    let q = b[start];
    let mut j = start + 1;
    while j < b.len() {
        if b[j] == b'\\' && q != b'`' {
            j += 2;
            continue;
        }
        if b[j] == q {
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

fn find_selector_end(b: &[u8], open: usize) -> Option<usize> {
    let mut j = open + 1;
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => j = skip_string(b, j),
            b'}' => return Some(j),
            _ => j += 1,
        }
    }
    None
}

/// `a="x", b=~"y"` -> [(a, =, x), (b, =~, y)]
fn parse_matchers(
    s: &str,
    problems: &mut Vec<String>,
    expr: &str,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        let label = s[start..i].to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < b.len() && matches!(b[i], b'=' | b'!' | b'~') {
            i += 1;
        }
        let op = s[op_start..i].to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if label.is_empty() || !["=", "!=", "=~", "!~"].contains(&op.as_str()) || i >= b.len() {
            problems.push(format!("cannot parse label matchers `{{{s}}}` in `{expr}`"));
            break;
        }
        let end = skip_string(b, i);
        let value = s[i + 1..end.saturating_sub(1).max(i + 1)].to_string();
        out.push((label, op, value));
        i = end;
    }
    out
}

#[test]
fn promql_scanner_catches_mistakes() {
    // The checker must itself reject what it is meant to reject.
    assert!(
        check_promql(
            r#"sum by (class) (tcpstall_stalled_sockets{instance=~"$instance"})"#,
            false
        )
        .is_empty()
    );
    assert!(check_promql(
        r#"histogram_quantile(0.9, sum by (le, outcome) (rate(tcpstall_stall_duration_seconds_bucket[$__rate_interval])))"#,
        false
    )
    .is_empty());
    assert!(
        check_promql(
            r#"up{job="tcpstall"} == 0 or absent(up{job="tcpstall"})"#,
            true
        )
        .is_empty()
    );
    for bad in [
        "tcpstall_stalled_socket",                         // typo
        "tcpstall_stall_duration_seconds",                 // histogram base name
        r#"tcpstall_stalled_sockets{klass="retransmit"}"#, // unknown label
        r#"tcpstall_stalled_sockets{class="zerowindow"}"#, // unknown class
        "sum by (flow) (tcpstall_stalled_sockets)",        // unknown grouping label
        "rate(node_network_receive_bytes_total[5m])",      // foreign metric
        r#"up{job="tcpstall"}"#,                           // `up` outside rules
        "tcpstall_retransmits_total{remote=\"a\"",         // unclosed selector
    ] {
        assert!(
            !check_promql(bad, false).is_empty(),
            "scanner accepted `{bad}`"
        );
    }
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

const RULES: &str = "deploy/prometheus/tcpstall-rules.yaml";
const RULES_TEST: &str = "deploy/prometheus/tcpstall-rules.test.yaml";
const PROMRULE: &str = "deploy/prometheus/tcpstall-prometheusrule.yaml";
const GEN: &str = "deploy/prometheus/gen-prometheusrule.sh";
const RUNBOOK: &str = "docs/runbook.md";
const DASHBOARD: &str = "deploy/grafana/tcpstall-dashboard.json";
const MANIFEST: &str = "deploy/kubernetes/tcpstall-daemonset.yaml";
const PROM_EXAMPLE: &str = "deploy/prometheus/prometheus.example.yaml";

const REQUIRED_ALERTS: &[&str] = &[
    "TCPStallNearTimeout",
    "TCPStallPersistent",
    "TCPZeroWindowStall",
    "TCPCloseWaitLeak",
    "TCPStallAgentDown",
    "TCPStallEventsDropped",
];

struct Alert {
    name: String,
    expr: String,
    severity: String,
    annotations: BTreeMap<String, String>,
}

fn alerts(groups: &Yaml) -> Vec<Alert> {
    let mut out = Vec::new();
    for g in groups.as_sequence().expect("groups is a list") {
        for r in g["rules"].as_sequence().expect("rules is a list") {
            let Some(name) = r["alert"].as_str() else {
                continue;
            };
            let annotations = r["annotations"]
                .as_mapping()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().unwrap().to_string(),
                                v.as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Alert {
                name: name.to_string(),
                expr: r["expr"].as_str().expect("expr").to_string(),
                severity: r["labels"]["severity"].as_str().unwrap_or("").to_string(),
                annotations,
            });
        }
    }
    out
}

#[test]
fn promtool_check_rules_plain_file() {
    let out = Tool::promtool().ok(&["check", "rules", &path(RULES).to_string_lossy()], &repo());
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_test_rules() {
    // Run from the file's directory: rule_files paths are relative to it.
    let dir = path("deploy/prometheus");
    let out = Tool::promtool().ok(&["test", "rules", "tcpstall-rules.test.yaml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has at least one firing and one non-firing case.
    let tests = yaml(RULES_TEST);
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_sequence().expect("tests") {
        for a in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = a["alertname"].as_str().unwrap().to_string();
            let n = a["exp_alerts"].as_sequence().map_or(0, |s| s.len());
            if n > 0 {
                fired.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for a in alerts(&yaml(RULES)["groups"]) {
        assert!(
            fired.contains(&a.name),
            "{RULES_TEST}: no test where {} fires",
            a.name
        );
        assert!(
            silent.contains(&a.name),
            "{RULES_TEST}: no test where {} must not fire",
            a.name
        );
    }
}

#[test]
fn promtool_check_example_config() {
    // Also loads tcpstall-rules.yaml through rule_files.
    let dir = path("deploy/prometheus");
    let out = Tool::promtool().ok(&["check", "config", "prometheus.example.yaml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    let cfg = yaml(PROM_EXAMPLE);
    let job = cfg["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some("tcpstall"))
        .expect("a scrape job named tcpstall");
    assert_eq!(
        job["honor_labels"].as_bool(),
        Some(true),
        "tcpstall job must honor_labels"
    );
}

#[test]
fn rules_have_required_alerts_annotations_and_contract_metrics() {
    let all = alerts(&yaml(RULES)["groups"]);
    let names: BTreeSet<_> = all.iter().map(|a| a.name.as_str()).collect();
    for r in REQUIRED_ALERTS {
        assert!(names.contains(r), "{RULES}: missing alert {r}");
    }
    let mut problems = Vec::new();
    for a in &all {
        for key in ["summary", "description", "runbook_url"] {
            if a.annotations.get(key).is_none_or(|v| v.trim().is_empty()) {
                problems.push(format!("{}: missing annotation {key}", a.name));
            }
        }
        if !["page", "warning", "info"].contains(&a.severity.as_str()) {
            problems.push(format!("{}: severity label `{}`", a.name, a.severity));
        }
        problems.extend(
            check_promql(&a.expr, true)
                .into_iter()
                .map(|p| format!("{}: {p}", a.name)),
        );
    }
    let near = all
        .iter()
        .find(|a| a.name == "TCPStallNearTimeout")
        .unwrap();
    assert_eq!(near.severity, "page", "TCPStallNearTimeout must page");
    assert!(
        near.expr.contains("tcpstall_socket_seconds_to_timeout"),
        "{}",
        near.expr
    );
    // Flow alerts must name the flow, the pod and the remote.
    for a in all.iter().filter(|a| a.expr.contains("tcpstall_socket_")) {
        let d = &a.annotations["description"];
        for l in ["$labels.local", "$labels.remote", "$labels.pod"] {
            if !d.contains(l) {
                problems.push(format!("{}: description does not use {l}", a.name));
            }
        }
    }
    assert!(problems.is_empty(), "{RULES}:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// PrometheusRule wrapper
// ---------------------------------------------------------------------------

#[test]
fn prometheusrule_generated_and_in_sync() {
    // 1. The generator reproduces the committed file byte-for-byte.
    let out = Command::new("sh")
        .arg(path(GEN))
        .arg("--check")
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{PROMRULE} is not what {GEN} generates; run `sh {GEN}`:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. Semantically: spec.groups == groups.
    let wrapper = yaml(PROMRULE);
    assert_eq!(
        wrapper["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(wrapper["kind"].as_str(), Some("PrometheusRule"));
    assert!(
        wrapper["metadata"]["name"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
    );
    let plain = yaml(RULES);
    assert_eq!(
        wrapper["spec"]["groups"], plain["groups"],
        "{PROMRULE} spec.groups differs from {RULES} groups"
    );

    // 3. The wrapped rules are valid for Prometheus.
    let dir = scratch("promrule");
    let extracted = dir.join("extracted-rules.yaml");
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("groups".into(), wrapper["spec"]["groups"].clone());
    fs::write(&extracted, serde_yaml::to_string(&doc).unwrap()).unwrap();
    let out = Tool::promtool().ok(&["check", "rules", &extracted.to_string_lossy()], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    let _ = fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Runbook anchors
// ---------------------------------------------------------------------------

/// GitHub-style heading anchors plus explicit `<a id=..>` / `<a name=..>`.
fn runbook_anchors(md: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut fence = false;
    for line in md.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = line;
            while let Some(p) = rest.find(attr) {
                let after = &rest[p + attr.len()..];
                if let Some(e) = after.find('"') {
                    anchors.insert(after[..e].to_string());
                }
                rest = after;
            }
        }
        if let Some(h) = t.strip_prefix('#') {
            let text = h.trim_start_matches('#');
            if !text.starts_with(' ') {
                continue;
            }
            let slug: String = text
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect();
            let n = seen.entry(slug.clone()).or_insert(0);
            anchors.insert(if *n == 0 {
                slug.clone()
            } else {
                format!("{slug}-{n}")
            });
            *n += 1;
        }
    }
    anchors
}

#[test]
fn runbook_urls_resolve_to_runbook_anchors() {
    let md = read(RUNBOOK);
    let anchors = runbook_anchors(&md);
    let mut problems = Vec::new();
    for a in alerts(&yaml(RULES)["groups"]) {
        let url = &a.annotations["runbook_url"];
        match url.split_once("docs/runbook.md#") {
            Some((_, anchor)) if anchors.contains(anchor) => {}
            Some((_, anchor)) => {
                problems.push(format!("{}: anchor #{anchor} not in {RUNBOOK}", a.name))
            }
            None => problems.push(format!(
                "{}: runbook_url `{url}` does not point into {RUNBOOK}",
                a.name
            )),
        }
        if !url.starts_with("https://") {
            problems.push(format!(
                "{}: runbook_url `{url}` is not an absolute https URL",
                a.name
            ));
        }
    }
    // In-page links of the runbook itself.
    let mut rest = md.as_str();
    while let Some(p) = rest.find("](#") {
        let after = &rest[p + 3..];
        let end = after.find(')').unwrap_or(after.len());
        if !anchors.contains(&after[..end]) {
            problems.push(format!("{RUNBOOK}: broken in-page link #{}", &after[..end]));
        }
        rest = &after[end..];
    }
    assert!(
        problems.is_empty(),
        "{}\nanchors: {anchors:?}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Grafana dashboard
// ---------------------------------------------------------------------------

fn collect_exprs(v: &Json, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Json::Object(m) => {
            for (k, x) in m {
                let p = format!("{path}.{k}");
                if k == "expr"
                    && let Some(s) = x.as_str()
                {
                    out.push((p.clone(), s.to_string()));
                }
                collect_exprs(x, &p, out);
            }
        }
        Json::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect_exprs(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn panels_flat(v: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels_flat(p));
    }
    out
}

#[test]
fn dashboard_is_valid_and_uses_only_contract_metrics() {
    let text = read(DASHBOARD);
    let d: Json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: invalid JSON: {e}"));
    let mut problems = Vec::new();

    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    if !(36..=41).contains(&schema) {
        problems.push(format!("schemaVersion {schema}, expected about 39"));
    }
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |n: &str| vars.iter().find(|v| v["name"] == n).cloned();
    match var("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => problems.push("no `datasource` variable of type datasource/prometheus".into()),
    }
    let Some(instance) = var("instance") else {
        panic!("{DASHBOARD}: no `instance` variable")
    };

    // Variable query: label_values(<expr>, <label>) or plain PromQL.
    let q = instance["query"]["query"]
        .as_str()
        .or(instance["query"].as_str())
        .unwrap_or("");
    let q = q.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    {
        let (e, label) = inner.rsplit_once(',').expect("label_values(expr, label)");
        problems.extend(check_promql(e, false));
        if !all_known_labels().contains(label.trim()) {
            problems.push(format!(
                "instance variable: unknown label `{}`",
                label.trim()
            ));
        }
    } else {
        problems.extend(check_promql(q, false));
    }

    // Every panel: prometheus datasource via the variable; every expr checked.
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels_flat(&d) {
        if !ids.insert(p["id"].as_u64().expect("panel id")) {
            problems.push(format!("duplicate panel id {}", p["id"]));
        }
        titles.push(p["title"].as_str().unwrap_or("").to_lowercase());
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "panel `{}`: datasource is not ${{datasource}}",
                p["title"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel `{}` has no queries", p["title"]));
        }
        for t in &targets {
            if t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "panel `{}`: target datasource is not ${{datasource}}",
                    p["title"]
                ));
            }
            if !t["expr"].as_str().is_some_and(|e| e.contains("$instance")) {
                problems.push(format!(
                    "panel `{}`: query does not filter on $instance",
                    p["title"]
                ));
            }
        }
    }
    let mut exprs = Vec::new();
    collect_exprs(&d, "$", &mut exprs);
    for (p, e) in &exprs {
        problems.extend(
            check_promql(e, false)
                .into_iter()
                .map(|x| format!("{p}: {x}")),
        );
    }

    // The panels the on-call engineer needs, and every contract metric shown.
    for want in [
        "stalled sockets",
        "near timeout",
        "time to etimedout",
        "retransmits by remote",
        "rto expirations by remote",
        "etimedout verdicts",
        "stall duration",
        "prediction error",
        "events by kind",
        "drops",
        "probes attached",
        "flows tracked",
    ] {
        if !titles.iter().any(|t| t.contains(want)) {
            problems.push(format!("no panel titled like `{want}`"));
        }
    }
    let all: String = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for m in contract().keys() {
        if !all.contains(m) {
            problems.push(format!("contract metric {m} is not on the dashboard"));
        }
    }
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------

/// Kinds from CRDs that kubernetes-validate has no schema for.
const CRD_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

fn documents(rel: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn kubernetes_validate_strict() {
    let kv = Tool::kubernetes_validate();
    let docs = documents(MANIFEST);
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
    ] {
        assert!(
            kinds.iter().any(|x| x == k),
            "{MANIFEST}: no {k} (kinds: {kinds:?})"
        );
    }
    // The newest schemas the tool ships and an older cluster version.
    for version in [None, Some("1.27")] {
        let mut args = vec!["--strict"];
        if let Some(v) = version {
            args.extend(["-k", v]);
        }
        let file = path(MANIFEST).to_string_lossy().into_owned();
        args.push(&file);
        let out = kv.ok(&args, &repo());
        for (doc, kind) in docs.iter().zip(&kinds) {
            let name = doc["metadata"]["name"].as_str().unwrap_or("");
            let id = format!("{}/{name}", kind.to_lowercase());
            if CRD_KINDS.contains(&kind.as_str()) {
                // Documented skip: a CRD, validated by the operator at apply time.
                assert!(
                    out.contains(&format!("Couldn't find schema for kind {kind}")),
                    "expected kubernetes-validate to report {kind} as schema-less:\n{out}"
                );
            } else {
                assert!(
                    out.contains(&format!("passed for resource {id} ")),
                    "{MANIFEST}: {id} did not pass kubernetes-validate --strict ({version:?}):\n{out}"
                );
            }
        }
        for line in out
            .lines()
            .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
        {
            assert!(
                CRD_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
                "unexpected kubernetes-validate diagnostic: {line}"
            );
        }
    }
    // The PrometheusRule wrapper is a well-formed object the tool recognises
    // as a (schema-less) CRD.
    let out = kv.ok(&["--strict", &path(PROMRULE).to_string_lossy()], &repo());
    assert!(
        out.contains("Couldn't find schema for kind PrometheusRule"),
        "{out}"
    );
}

#[test]
fn daemonset_has_what_the_agent_needs() {
    let docs = documents(MANIFEST);
    let by_kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let ds = by_kind("DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostPID"].as_bool(),
        Some(true),
        "hostPID for pod identity from /proc"
    );
    let tol = spec["tolerations"].as_sequence().expect("tolerations");
    assert!(
        tol.iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null()),
        "tolerate all taints"
    );
    let c = &spec["containers"][0];
    assert_eq!(c["image"].as_str(), Some("ghcr.io/tcpstall/tcpstall:0.1.0"));
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["run", "--listen", "0.0.0.0:9977", "--log-format", "json"]
    );
    let env: BTreeMap<&str, &str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(env.get("TCPSTALL_PROC"), Some(&"/host/proc"));
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(9977));
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(c["resources"][r][k].as_str().is_some(), "resources.{r}.{k}");
        }
    }
    let sc = &c["securityContext"];
    if sc["privileged"].as_bool() != Some(true) {
        let caps: BTreeSet<&str> = sc["capabilities"]["add"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"] {
            assert!(caps.contains(cap), "capability {cap}");
        }
    }
    // Host paths mounted where the agent expects them.
    let vols: BTreeMap<&str, &str> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            )
        })
        .collect();
    for (mount, host) in [
        ("/sys/kernel/btf", "/sys/kernel/btf"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/sys/kernel/debug", "/sys/kernel/debug"),
        ("/host/proc", "/proc"),
    ] {
        let vol = mounts
            .get(mount)
            .unwrap_or_else(|| panic!("no volumeMount at {mount}"));
        assert_eq!(
            vols.get(vol),
            Some(&host),
            "{mount} must be hostPath {host}"
        );
    }

    // Service and ServiceMonitor agree on the port and the job label.
    let svc = by_kind("Service");
    assert_eq!(
        svc["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless Service"
    );
    assert_eq!(
        svc["metadata"]["name"].as_str(),
        Some("tcpstall"),
        "Service name = job label `tcpstall`"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(9977));
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    let sm = by_kind("ServiceMonitor");
    assert_eq!(sm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        svc["metadata"]["labels"]
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"], svc["spec"]["ports"][0]["name"]);
    assert_eq!(ep["path"].as_str(), Some("/metrics"));
    assert_eq!(
        ep["honorLabels"].as_bool(),
        Some(true),
        "per-flow pod/namespace labels must survive"
    );
    assert!(
        sm["spec"]["jobLabel"].is_null(),
        "jobLabel would change job=\"tcpstall\""
    );
}
