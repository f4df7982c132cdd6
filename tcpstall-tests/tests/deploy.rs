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
//! - `deploy/kubernetes/overlays/prometheus-operator` rendered by `kubectl
//!   kustomize`: `kubernetes-validate --strict` for the core resources (the ServiceMonitor CRD has no schema
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
use serde_norway::Value as Yaml;
use tcpstall_tests::assert_kubernetes_validate;

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
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
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

    fn amtool() -> Tool {
        Tool {
            cmd: std::env::var("AMTOOL").unwrap_or_else(|_| "amtool".into()),
            install: "install the Debian package `prometheus-alertmanager` \
                      (apt-get install -y prometheus-alertmanager), or set AMTOOL=/path/to/amtool",
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

#[path = "contract/mod.rs"]
mod contract;
use contract::{INCIDENT_LABELS, Kind, TARGET_LABELS, contract};

/// Closed label value sets.
fn label_values(label: &str) -> Option<&'static [&'static str]> {
    match label {
        "class" => Some(&[
            "retransmit",
            "zero_window",
            "close_wait",
            "connect",
            "keepalive",
            "fin_wait2",
        ]),
        "outcome" => Some(&["recovered", "timed_out", "closed"]),
        "kind" => Some(&[
            "retransmit",
            "write_timer",
            "state",
            "error_report",
            "ack",
            "drop",
            "retransmit_error",
            "keepalive_timer",
            "tw_timer_start",
            "tw_timer_expire",
        ]),
        // Retransmissions by cause (tcpstall_retransmits_total) and stalls
        // by cause (per-flow, incident and reset series): one label name,
        // two closed sets.
        "cause" => Some(&[
            "rto",
            "tlp",
            "fast",
            "syn",
            "unknown",
            "peer_silent",
            "unreachable",
            "local_drop",
            "pmtu_blackhole",
            "peer_not_reading",
            "app_not_closing",
            "peer_not_closing",
        ]),
        "reason" => Some(&["startup", "loss", "interval", "hold_overflow"]),
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
// PromQL checks with `promql-parser`: every selector's metric name, its label
// matchers and every grouping / matching label against the contract.
// Grafana's variables are expanded first (`tcpstall_tests::grafana_expand`).
// ---------------------------------------------------------------------------

use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{self, Expr, LabelModifier},
};

/// Check one PromQL expression (Grafana variables allowed); returns problems.
fn check_promql(expr: &str, allow_up: bool) -> Vec<String> {
    let expanded = tcpstall_tests::grafana_expand(expr, &[], ".*", "5m");
    let ast = match parser::parse(&expanded) {
        Ok(ast) => ast,
        Err(e) => return vec![format!("does not parse ({e}): `{expr}`")],
    };
    let mut c = Checker {
        known: all_known_labels(),
        allow_up,
        expr,
        metrics: 0,
        problems: Vec::new(),
    };
    c.walk(&ast);
    if c.metrics == 0 {
        c.problems.push(format!("no metric found in `{expr}`"));
    }
    c.problems
}

struct Checker<'a> {
    known: BTreeSet<&'static str>,
    allow_up: bool,
    expr: &'a str,
    metrics: usize,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn grouping(&mut self, what: &str, labels: &[String]) {
        for l in labels {
            if !self.known.contains(l.as_str()) {
                self.problems.push(format!(
                    "`{what} ({l})`: label `{l}` is not in the contract, in `{}`",
                    self.expr
                ));
            }
        }
    }

    fn modifier(&mut self, m: &Option<LabelModifier>) {
        match m {
            Some(LabelModifier::Include(l)) => self.grouping("by/on", &l.labels),
            Some(LabelModifier::Exclude(l)) => self.grouping("without/ignoring", &l.labels),
            None => {}
        }
    }

    fn selector(&mut self, name: Option<&str>, matchers: Vec<&Matcher>) {
        let expr = self.expr;
        let by_name = matchers
            .iter()
            .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.as_str());
        let Some(name) = name.or(by_name) else {
            self.problems
                .push(format!("selector without a metric name in `{expr}`"));
            return;
        };
        self.metrics += 1;
        let labels = series_labels(name, self.allow_up);
        if labels.is_none() {
            self.problems
                .push(format!("`{name}` is not a contract metric, in `{expr}`"));
        }
        for m in matchers.into_iter().filter(|m| m.name != "__name__") {
            if let Some(ls) = &labels
                && !ls.contains(m.name.as_str())
            {
                self.problems.push(format!(
                    "`{name}` has no label `{}` in the contract, in `{expr}`",
                    m.name
                ));
            }
            if matches!(m.op, MatchOp::Equal)
                && let Some(vals) = label_values(&m.name)
                && !vals.contains(&m.value.as_str())
            {
                self.problems.push(format!(
                    "`{}=\"{}\"` is not one of {vals:?}, in `{expr}`",
                    m.name, m.value
                ));
            }
        }
    }

    fn walk(&mut self, e: &Expr) {
        match e {
            Expr::Aggregate(a) => {
                self.modifier(&a.modifier);
                if let Some(p) = &a.param {
                    self.walk(p);
                }
                self.walk(&a.expr);
            }
            Expr::Unary(u) => self.walk(&u.expr),
            Expr::Binary(b) => {
                if let Some(m) = &b.modifier {
                    self.modifier(&m.matching);
                    if let Some(l) = m.card.labels() {
                        self.grouping("group_left/group_right", &l.labels);
                    }
                }
                self.walk(&b.lhs);
                self.walk(&b.rhs);
            }
            Expr::Paren(p) => self.walk(&p.expr),
            Expr::Subquery(s) => self.walk(&s.expr),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
            Expr::VectorSelector(vs) => {
                let ms = vs
                    .matchers
                    .matchers
                    .iter()
                    .chain(vs.matchers.or_matchers.iter().flatten())
                    .collect();
                self.selector(vs.name.as_deref(), ms);
            }
            Expr::MatrixSelector(m) => {
                let ms =
                    m.vs.matchers
                        .matchers
                        .iter()
                        .chain(m.vs.matchers.or_matchers.iter().flatten())
                        .collect();
                self.selector(m.vs.name.as_deref(), ms);
            }
            Expr::Call(c) => {
                for a in &c.args.args {
                    self.walk(a);
                }
            }
            Expr::Extension(_) => self
                .problems
                .push(format!("unexpected extension node in `{}`", self.expr)),
        }
    }
}

#[test]
fn promql_checker_catches_mistakes() {
    // The checker must itself reject what it is meant to reject.
    for good in [
        r#"sum by (class) (tcpstall_stalled_sockets{node=~"$node"})"#,
        r#"histogram_quantile(0.9, sum by (le, outcome) (rate(tcpstall_stall_duration_seconds_bucket{node=~"${node}"}[$__rate_interval])))"#,
        r#"clamp_min(tcpstall_incident_earliest_timeout_seconds{class="retransmit"}, 0) < 60"#,
        r#"tcpstall_socket_stall_seconds * on (remote) group_left (class) tcpstall_incident_stalled_sockets"#,
    ] {
        let p = check_promql(good, false);
        assert!(p.is_empty(), "rejected `{good}`: {p:?}");
    }
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
        "tcpstall_socket_stall_seconds * on (flow) tcpstall_stalled_sockets", // unknown matching label
        "rate(node_network_receive_bytes_total[5m])",                         // foreign metric
        r#"up{job="tcpstall"}"#,                                              // `up` outside rules
        "tcpstall_retransmits_total{remote=\"a\"",                            // unclosed selector
        r#"{__name__=~"tcpstall_.*"}"#,                                       // no metric name
        "sum(tcpstall_stalled_sockets",                                       // syntax error
        r#"tcpstall_incident_stalled_sockets{local="1.2.3.4:5"}"#, // per-flow label on incidents
    ] {
        assert!(
            !check_promql(bad, false).is_empty(),
            "checker accepted `{bad}`"
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
/// A kustomize overlay (base + ServiceMonitor), rendered by [`render`].
const MANIFEST: &str = "deploy/kubernetes/overlays/prometheus-operator";
const PROM_EXAMPLE: &str = "deploy/prometheus/prometheus.example.yaml";

const ALERTMANAGER_EXAMPLE: &str = "deploy/prometheus/alertmanager.example.yaml";

const REQUIRED_ALERTS: &[&str] = &[
    "TCPStallNearTimeout",
    "TCPStallPersistent",
    "TCPStallZeroWindow",
    "TCPStallCloseWaitLeak",
    "TCPStallAgentDown",
    "TCPStallEventsDropped",
    "TCPStallProbeRunsMissed",
    "TCPStallProbeDetached",
    "TCPStallFeatureUnavailable",
];

/// The stall alerts: one per incident (node, namespace, pod, remote).
const INCIDENT_ALERTS: &[&str] = &[
    "TCPStallNearTimeout",
    "TCPStallPersistent",
    "TCPStallZeroWindow",
    "TCPStallCloseWaitLeak",
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
        // kube-prometheus routes and inhibits on these three.
        if !["critical", "warning", "info"].contains(&a.severity.as_str()) {
            problems.push(format!("{}: severity label `{}`", a.name, a.severity));
        }
        // One `alertname=~"TCPStall.*"` route catches every alert.
        if !a.name.starts_with("TCPStall") {
            problems.push(format!("{}: name does not start with TCPStall", a.name));
        }
        // Pages per incident, never per flow: the per-flow series only exist
        // for the top-K flows and would page once per connection.
        if a.expr.contains("tcpstall_socket_") {
            problems.push(format!(
                "{}: expression uses the per-flow series: `{}`",
                a.name, a.expr
            ));
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
    assert_eq!(near.severity, "critical", "TCPStallNearTimeout must page");
    assert!(
        near.expr
            .contains("tcpstall_incident_earliest_timeout_seconds"),
        "{}",
        near.expr
    );
    let severities: BTreeSet<&str> = all.iter().map(|a| a.severity.as_str()).collect();
    assert_eq!(
        severities,
        BTreeSet::from(["critical", "warning", "info"]),
        "every severity level used"
    );
    // Incident alerts name the node, the pod and the remote, give the count
    // of stalled sockets and the agent's API link listing every flow.
    for name in INCIDENT_ALERTS {
        let Some(a) = all.iter().find(|a| a.name == *name) else {
            continue;
        };
        if !a.expr.contains("tcpstall_incident_") {
            problems.push(format!("{name}: not on the incident series: {}", a.expr));
        }
        let d = &a.annotations["description"];
        for l in ["$labels.node", "$labels.pod", "$labels.remote", "$count"] {
            if !d.contains(l) {
                problems.push(format!("{name}: description does not use {l}"));
            }
        }
        if !a
            .annotations
            .get("api")
            .is_some_and(|u| u.contains("/api/v1/stalls"))
        {
            problems.push(format!("{name}: no `api` annotation with /api/v1/stalls"));
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
    let mut doc = serde_norway::Mapping::new();
    doc.insert("groups".into(), wrapper["spec"]["groups"].clone());
    fs::write(&extracted, serde_norway::to_string(&doc).unwrap()).unwrap();
    let out = Tool::promtool().ok(&["check", "rules", &extracted.to_string_lossy()], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn runbook_base_url_is_configurable() {
    let base = "https://wiki.example.com/sre/tcpstall-runbook";
    let dir = scratch("runbook-base");
    let generate = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(path(GEN))
            .args(args)
            .output()
            .expect("run sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for mode in ["--plain", "--stdout"] {
        let (ok, text, err) = generate(&["--runbook-base", base, mode]);
        assert!(ok, "{GEN} --runbook-base {base} {mode}: {err}");
        let doc: Yaml = serde_norway::from_str(&text).expect("generated YAML");
        let groups = if mode == "--plain" {
            &doc["groups"]
        } else {
            &doc["spec"]["groups"]
        };
        let all = alerts(groups);
        assert_eq!(all.len(), alerts(&yaml(RULES)["groups"]).len());
        for a in &all {
            assert_eq!(
                a.annotations["runbook_url"],
                format!("{base}#{}", a.name.to_lowercase()),
                "{mode}: {}",
                a.name
            );
        }
        if mode == "--plain" {
            // Everything else unchanged and still valid for Prometheus.
            assert_eq!(
                text.replace(
                    base,
                    "https://github.com/tcpstall/tcpstall/blob/main/docs/runbook.md"
                ),
                read(RULES)
            );
            let f = dir.join("rules.yaml");
            fs::write(&f, &text).unwrap();
            let out = Tool::promtool().ok(&["check", "rules", &f.to_string_lossy()], &dir);
            assert!(out.contains("SUCCESS"), "{out}");
        }
    }
    // Bad bases are refused with a one-line reason, nothing printed.
    for bad in [
        "ftp://x/runbook",
        "https://x/a b",
        "https://x/\"q",
        "https://x/r#a",
    ] {
        let (ok, text, err) = generate(&["--runbook-base", bad, "--plain"]);
        assert!(!ok && text.is_empty(), "accepted {bad}");
        assert!(err.contains("--runbook-base"), "{err}");
    }
    // The committed file always keeps the project's runbook.
    let (ok, _, err) = generate(&["--runbook-base", base]);
    assert!(!ok && err.contains("--stdout or --plain"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Alertmanager routing example
// ---------------------------------------------------------------------------

/// A YAML sequence of strings.
fn strings(v: &Yaml) -> Vec<&str> {
    v.as_sequence()
        .expect("a sequence")
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect()
}

#[test]
fn alertmanager_example_routes_by_severity_and_inhibits() {
    let amtool = Tool::amtool();
    let file = path(ALERTMANAGER_EXAMPLE).to_string_lossy().into_owned();
    let out = amtool.ok(&["check-config", &file], &repo());
    assert!(out.contains("SUCCESS"), "{out}");
    // Where each alert of the rule file goes.
    for a in alerts(&yaml(RULES)["groups"]) {
        let want = match a.severity.as_str() {
            "critical" => "oncall-page",
            "warning" => "team-tickets",
            _ => "null",
        };
        let out = amtool.run(
            &[
                "config",
                "routes",
                "test",
                &format!("--config.file={file}"),
                &format!("alertname={}", a.name),
                &format!("severity={}", a.severity),
            ],
            &repo(),
        );
        assert!(out.status.success(), "amtool config routes test: {out:?}");
        // stdout: the receiver; stderr: a note about --alertmanager.url.
        let out = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.trim(), want, "{} ({})", a.name, a.severity);
    }
    // The page inhibits the warning of the same incident, on labels both
    // alerts carry.
    let am = yaml(ALERTMANAGER_EXAMPLE);
    let rules = am["inhibit_rules"].as_sequence().expect("inhibit_rules");
    let inhibit = rules
        .iter()
        .find(|r| {
            r["source_matchers"][0] == "alertname=\"TCPStallNearTimeout\""
                && r["target_matchers"][0] == "alertname=\"TCPStallPersistent\""
        })
        .expect("an inhibit rule NearTimeout -> Persistent");
    let equal = strings(&inhibit["equal"]);
    let mut incident: BTreeSet<&str> = INCIDENT_LABELS.iter().copied().collect();
    incident.extend(TARGET_LABELS);
    for l in &equal {
        assert!(
            incident.contains(l),
            "inhibit on `{l}`, not an incident label"
        );
    }
    for l in ["pod", "remote", "direction"] {
        assert!(
            equal.contains(&l),
            "inhibit must be per incident: {equal:?}"
        );
    }
    // One notification per incident: the stall route groups by every label
    // that tells incidents apart.
    let stall_route = am["route"]["routes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["matchers"][0] == "alertname=~\"TCPStall.*\"")
        .expect("the TCPStall route");
    let group_by = strings(&stall_route["group_by"]);
    for l in INCIDENT_LABELS.iter().filter(|l| **l != "class") {
        assert!(
            group_by.contains(l),
            "the TCPStall route must group by {l}: {group_by:?}"
        );
    }
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
    // `cause_runbook_url` (the stall alerts) ends in `#cause-{{ $labels.cause }}`:
    // every stall cause (and `reset`, counted) has its section.
    for a in alerts(&yaml(RULES)["groups"]) {
        if let Some(url) = a.annotations.get("cause_runbook_url")
            && !url.ends_with("docs/runbook.md#cause-{{ $labels.cause }}")
        {
            problems.push(format!("{}: cause_runbook_url `{url}`", a.name));
        }
    }
    for c in [
        "peer_silent",
        "unreachable",
        "local_drop",
        "pmtu_blackhole",
        "peer_not_reading",
        "app_not_closing",
        "peer_not_closing",
        "unknown",
        "reset",
    ] {
        if !anchors.contains(&format!("cause-{c}")) {
            problems.push(format!("{RUNBOOK}: no section for cause {c} (#cause-{c})"));
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
    // Selection variables: label_values(<expr>, <label>), "All" = `.*`.
    for (name, label) in [
        ("cluster", "cluster"),
        ("job", "job"),
        ("node", "node"),
        ("namespace", "namespace"),
        ("pod", "pod"),
        ("remote", "remote"),
    ] {
        let Some(v) = var(name) else {
            problems.push(format!("no `{name}` variable"));
            continue;
        };
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("")
            .trim();
        match q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|inner| inner.rsplit_once(','))
        {
            Some((e, l)) => {
                problems.extend(check_promql(e, false));
                if l.trim() != label {
                    problems.push(format!("variable {name}: label_values of `{}`", l.trim()));
                }
            }
            None => problems.push(format!("variable {name}: not label_values(expr, {label})")),
        }
        if v["includeAll"] != true || v["allValue"] != ".*" {
            problems.push(format!(
                "variable {name}: needs an All option matching `.*`"
            ));
        }
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
            let e = t["expr"].as_str().unwrap_or("");
            // Multi-cluster Prometheus: every query honours cluster and job.
            for v in ["$cluster", "$job", "$node"] {
                if !e.contains(v) {
                    problems.push(format!(
                        "panel `{}`: query does not filter on {v}",
                        p["title"]
                    ));
                }
            }
            // Series with pod and remote labels honour the whole selection.
            if e.contains("tcpstall_incident_") || e.contains("tcpstall_socket_") {
                for v in ["$namespace", "$pod", "$remote"] {
                    if !e.contains(v) {
                        problems.push(format!(
                            "panel `{}`: query does not filter on {v}: {e}",
                            p["title"]
                        ));
                    }
                }
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
        "overview",
        "stalled sockets",
        "near timeout",
        "stalled now: incidents by pod and remote",
        "predicted death as a time",
        "by namespace/pod",
        "stalled sockets by remote",
        "earliest predicted etimedout",
        "agent cpu",
        "agent memory",
        "hang-forever risks",
        "socket sweeps",
        "retransmits by remote",
        "rto expirations by remote",
        "etimedout verdicts",
        "stall duration",
        "prediction error",
        "events by kind",
        "drops",
        "probes attached",
        "flows tracked",
        "heartbeat",
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

/// `kubectl kustomize` of a kustomization directory into a scratch file;
/// returns the file's absolute path.
fn render(rel: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", &path(rel).to_string_lossy()])
        .output()
        .unwrap_or_else(|e| panic!("running `kubectl kustomize` (install kubectl): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {rel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag = format!("kustomize-{:?}", std::thread::current().id()).replace(['(', ')'], "");
    let file = scratch(&tag).join("rendered.yaml");
    fs::write(&file, &out.stdout).expect("write rendered manifest");
    file.to_string_lossy().into_owned()
}

fn documents(rel: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn kubernetes_validate_strict() {
    let kv = Tool::kubernetes_validate();
    let rendered = render(MANIFEST);
    let docs = documents(&rendered);
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    for k in [
        "ServiceAccount",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
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
        let file = rendered.clone();
        args.push(&file);
        let out = kv.ok(&args, &repo());
        let resources: Vec<(String, String)> = docs
            .iter()
            .zip(&kinds)
            .map(|(doc, kind)| {
                let name = doc["metadata"]["name"].as_str().unwrap_or("");
                (kind.clone(), name.to_owned())
            })
            .collect();
        assert_kubernetes_validate(
            &out,
            &resources,
            CRD_KINDS,
            &format!("{MANIFEST} ({version:?})"),
        );
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
    let docs = documents(&render(MANIFEST));
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
        for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYSLOG"] {
            assert!(caps.contains(cap), "capability {cap}");
        }
        assert!(!caps.contains("SYS_ADMIN"), "no CAP_SYS_ADMIN on 5.15+");
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
    // The job label is the value of the Service label named by jobLabel:
    // `tcpstall`, which TCPStallAgentDown matches.
    let job_label = sm["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(
        svc["metadata"]["labels"][job_label].as_str(),
        Some("tcpstall"),
        "jobLabel {job_label} must give job=\"tcpstall\""
    );
}
