//! End-to-end with a real Prometheus: the real agent, Debian's `prometheus`
//! scraping it every second with the repository's alert rules
//! (deploy/prometheus/tcpstall-rules.yaml), and scenario S1 (blackholed peer,
//! tcp_retries2 = 5 in the client namespace: the kernel kills the socket about
//! 13 s after the write). Asserted through Prometheus' HTTP API: the per-flow
//! and incident series appear, `TCPStallNearTimeout` fires for the incident
//! (node, pod, remote) before the socket dies; every query of the Grafana
//! dashboard (deploy/grafana/tcpstall-dashboard.json) executes, and the
//! panels that must show the stall return it; afterwards the timeout is
//! counted and the alert resolves.
//!
//! Privileged (root, namespaces, BPF); run with `--test-threads=1`. Missing
//! tools fail the test, naming the package. `PROMETHEUS` overrides the
//! binary.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpstall_tests::*;

/// The `prometheus` binary: `$PROMETHEUS`, else from PATH.
fn require_prometheus() -> PathBuf {
    let explicit = std::env::var_os("PROMETHEUS").map(PathBuf::from);
    let found = explicit.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("prometheus"))
                .find(|p| p.is_file())
        })
    });
    require(
        found.as_ref().is_some_and(|p| p.is_file()),
        "the `prometheus` server binary (Debian package `prometheus`)",
        "apt-get install prometheus (or set PROMETHEUS=/path/to/prometheus)",
    );
    found.expect("checked")
}

/// Percent-encodes a query parameter value.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET over HTTP/1.0: Prometheus (Go) answers HTTP/1.1 requests larger than
/// 2 KiB with chunked transfer encoding, which the harness' minimal client
/// does not decode; an HTTP/1.0 request gets a plain body up to EOF.
fn http10_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read {path}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A Prometheus server on loopback with its own config and TSDB in a temp
/// directory; killed and removed on drop (its log is printed when the test
/// failed).
struct Prometheus {
    child: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus on `127.0.0.1:0` (the kernel picks a free port: no
    /// pick-then-release race with anything else on the host) and reads the
    /// address it bound from its log line `msg="Listening on" address=...`.
    fn start(binary: &Path, target: SocketAddr, rules: &Path, node: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcpstall-prom-e2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).expect("prometheus temp dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: tcpstall\n    honor_labels: true\n    \
             static_configs:\n      - targets: ['{target}']\n        labels:\n          node: {node}\n",
            rules = rules.display()
        );
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, config).expect("write prometheus.yml");
        let log = fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let requested: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={requested}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut prom = Prometheus {
            child: Some(child),
            dir,
            addr: requested,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        prom.addr = loop {
            prom.assert_alive();
            if let Some(a) = listening_address(&prom.log()) {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not log its listening address within 30 s; log:\n{}",
                prom.log()
            );
            thread::sleep(Duration::from_millis(50));
        };
        prom
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("prometheus exited ({status}); log:\n{}", self.log());
        }
    }

    /// GET a JSON API path; `data` of a successful answer.
    fn api(&mut self, path: &str) -> Value {
        self.assert_alive();
        let (status, body) =
            http10_get(self.addr, path).unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}: {status} {body}"));
        assert_eq!(v["status"], "success", "prometheus {path}: {status} {body}");
        v["data"].clone()
    }

    /// Instant query: the result vector.
    fn query(&mut self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Instant query evaluated at `at` (Unix seconds): the result, or the
    /// server's error (a query that does not execute).
    fn query_at(&mut self, promql: &str, at: f64) -> Result<Vec<Value>, String> {
        self.assert_alive();
        let path = format!("/api/v1/query?query={}&time={at:.3}", urlencode(promql));
        let (status, body) =
            http10_get(self.addr, &path).unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}: {status} {body}"));
        if v["status"] != "success" {
            return Err(format!("{status} {}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Values of `label` on series matching `selector`.
    fn label_values(&mut self, label: &str, selector: &str) -> Vec<String> {
        let data = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            urlencode(selector)
        ));
        data.as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    fn alerts(&mut self) -> Vec<Value> {
        self.api("/api/v1/alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_alive();
            if let Ok((200, _)) = http10_get(self.addr, "/-/ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within {timeout:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent target was scraped successfully, failing with
    /// the scrape error otherwise.
    fn wait_target_up(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let up = self.query("up{job=\"tcpstall\"}");
            if up.iter().any(|s| s["value"][1] == "1") {
                return;
            }
            if Instant::now() > deadline {
                let targets = self.api("/api/v1/targets");
                panic!("the tcpstall target never came up: {targets:#}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The address of Prometheus' `msg="Listening on" address=HOST:PORT` log
/// line (logged once the socket is bound), if there is one yet.
fn listening_address(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("msg=\"Listening on\""))
        .find_map(|l| {
            let a = l.split("address=").nth(1)?.split_whitespace().next()?;
            a.parse::<SocketAddr>().ok().filter(|a| a.port() != 0)
        })
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first (clean TSDB close), SIGKILL if it lingers.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- prometheus log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The node name the agent reports (--node-name) and the scrape attaches.
const NODE: &str = "e2e-node-1";

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// One query of the dashboard: (panel title, refId, expression).
struct PanelQuery {
    title: String,
    ref_id: String,
    expr: String,
}

/// Every query of every panel of deploy/grafana/tcpstall-dashboard.json,
/// with the dashboard's variables expanded: node = [`NODE`], the others
/// "All" (`.*`), interval variables 1m.
fn dashboard_queries() -> Vec<PanelQuery> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/tcpstall-dashboard.json");
    let d: Value = serde_json::from_str(&fs::read_to_string(&path).expect("dashboard"))
        .expect("dashboard JSON");
    fn panels(v: &Value, out: &mut Vec<Value>) {
        for p in v["panels"].as_array().into_iter().flatten() {
            out.push(p.clone());
            panels(p, out);
        }
    }
    let mut all = Vec::new();
    panels(&d, &mut all);
    let mut out = Vec::new();
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("target expr");
            out.push(PanelQuery {
                title: p["title"].as_str().unwrap_or("").to_owned(),
                ref_id: t["refId"].as_str().unwrap_or("").to_owned(),
                expr: grafana_expand(expr, &[("node", NODE)], ".*", "1m"),
            });
        }
    }
    assert!(out.len() > 20, "dashboard has only {} queries", out.len());
    out
}

fn value_of(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs every dashboard query at `at`; each must execute. Returns the
/// results by (title, refId).
fn run_dashboard(
    prom: &mut Prometheus,
    queries: &[PanelQuery],
    at: f64,
) -> Vec<(String, String, Vec<Value>)> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for q in queries {
        match prom.query_at(&q.expr, at) {
            Ok(r) => out.push((q.title.clone(), q.ref_id.clone(), r)),
            Err(e) => errors.push(format!(
                "panel `{}` {}: `{}`: {e}",
                q.title, q.ref_id, q.expr
            )),
        }
    }
    assert!(
        errors.is_empty(),
        "dashboard queries that do not execute:\n{}",
        errors.join("\n")
    );
    out
}

/// The results of the panel(s) titled `title` (every refId), failing when
/// the dashboard has no such panel.
fn panel<'a>(
    results: &'a [(String, String, Vec<Value>)],
    title: &str,
) -> Vec<(&'a str, &'a [Value])> {
    let r: Vec<(&str, &[Value])> = results
        .iter()
        .filter(|(t, _, _)| t == title)
        .map(|(_, id, v)| (id.as_str(), v.as_slice()))
        .collect();
    assert!(!r.is_empty(), "the dashboard has no panel `{title}`");
    r
}

fn rules_file() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/tcpstall-rules.yaml")
        .canonicalize()
        .expect("deploy/prometheus/tcpstall-rules.yaml");
    assert!(p.is_file(), "{}", p.display());
    p
}

fn secs_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// What was seen of the stalled flow, and when (CLOCK_MONOTONIC ns).
#[derive(Default)]
struct Seen {
    series: Option<(u64, Value)>,
    pending: Option<u64>,
    firing: Option<(u64, Value)>,
    agent_metrics: Option<(u64, f64)>,
    agent_stall: Option<(u64, Value)>,
}

#[test]
fn prometheus_fires_near_timeout_before_the_socket_dies() {
    require_tools();
    let prometheus_bin = require_prometheus();
    let rules = rules_file();
    let t_start = Instant::now();

    let link = Link::new("pe2e", 40);
    link.a.sysctl("net.ipv4.tcp_retries2", "5");
    let mut agent = Agent::start(&["--near-horizon-secs", "60", "--node-name", NODE]);
    let mut prom = Prometheus::start(&prometheus_bin, agent.listen, &rules, NODE);
    let queries = dashboard_queries();
    prom.wait_ready(Duration::from_secs(30));
    prom.wait_target_up(Duration::from_secs(30));
    // The rules loaded and evaluate (TCPStallNearTimeout is in the flows group).
    let groups = prom.api("/api/v1/rules");
    let rule_names: Vec<String> = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        rule_names.iter().any(|n| n == "TCPStallNearTimeout"),
        "rules not loaded: {rule_names:?}"
    );
    eprintln!(
        "TIMING prometheus ready and scraping the agent after {:.1} s",
        secs_since(t_start)
    );

    // S1: a connection, then a blackhole, then unacked data.
    let conn = Conn::establish(&link, 8080, None);
    let (local, server_addr) = (conn.local, conn.server);
    // The page is per incident (node, pod, remote); this flow is the only
    // socket to that remote.
    let near_alert_for_flow = |alerts: &[Value]| {
        alerts
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "TCPStallNearTimeout"
                    && a["labels"]["remote"] == server_addr.to_string()
            })
            .cloned()
    };
    assert!(
        near_alert_for_flow(&prom.alerts()).is_none(),
        "a healthy flow must not alert"
    );

    let blackhole = link.b.blackhole_from(link.a_ip);
    let (t_write, reader) = conn.write_and_await_death(Duration::from_secs(120));

    let series_query =
        format!("tcpstall_socket_seconds_to_timeout{{local=\"{local}\",remote=\"{server_addr}\"}}");
    let incident_query = format!(
        "tcpstall_incident_stalled_sockets{{class=\"retransmit\",remote=\"{server_addr}\"}}"
    );
    // An instant (Unix s) at which Prometheus had both the flow's series and
    // its incident: the dashboard is evaluated there.
    let mut t_dashboard: Option<f64> = None;
    let mut seen = Seen::default();
    let flow_labels = [
        ("local", local.to_string()),
        ("remote", server_addr.to_string()),
    ];
    while !reader.is_finished() {
        let now = monotonic_ns();
        if seen.series.is_none()
            && let Some(s) = prom.query(&series_query).into_iter().next()
        {
            seen.series = Some((now, s));
        }
        if t_dashboard.is_none() {
            let t = (now_unix() * 1000.0).floor() / 1000.0;
            if !prom
                .query_at(&series_query, t)
                .expect("flow query")
                .is_empty()
                && !prom
                    .query_at(&incident_query, t)
                    .expect("incident query")
                    .is_empty()
            {
                t_dashboard = Some(t);
            }
        }
        if let Some(a) = near_alert_for_flow(&prom.alerts()) {
            if seen.pending.is_none() {
                seen.pending = Some(now);
            }
            if seen.firing.is_none() && a["state"] == "firing" {
                seen.firing = Some((now, a));
            }
        }
        if seen.agent_metrics.is_none() {
            let labels: Vec<(&str, &str)> =
                flow_labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let text = agent.metrics();
            if let Some(v) = metric_sum(&text, "tcpstall_socket_seconds_to_timeout", &labels) {
                seen.agent_metrics = Some((now, v));
                // Debugging aid: keep the exposition seen during the stall.
                if let Some(path) = std::env::var_os("TCPSTALL_E2E_METRICS_DUMP") {
                    let _ = fs::write(path, &text);
                }
            }
        }
        if seen.agent_stall.is_none()
            && let Some(v) = agent.stall_of(local, server_addr)
        {
            seen.agent_stall = Some((now, v));
        }
        thread::sleep(Duration::from_millis(200));
    }
    let (died_ns, errno) = reader.join().expect("reader thread");
    assert_eq!(
        errno,
        Some(libc::ETIMEDOUT),
        "the kernel must kill the socket with ETIMEDOUT"
    );
    let after_write = |t: u64| (t.saturating_sub(t_write)) as f64 / 1e9;
    let died_s = after_write(died_ns);
    eprintln!("TIMING socket died (ETIMEDOUT) {died_s:.2} s after the write");
    assert!(
        (10.0..20.0).contains(&died_s),
        "tcp_retries2=5 should kill the socket after ~13 s, took {died_s:.2} s"
    );

    // The agent's own /metrics showed the flow during the stall.
    let (t_metrics, value) = seen
        .agent_metrics
        .expect("the agent's /metrics never showed the flow's tcpstall_socket_seconds_to_timeout");
    eprintln!(
        "TIMING agent /metrics showed the flow {:.2} s after the write (seconds_to_timeout {value:.2})",
        after_write(t_metrics)
    );
    assert!(t_metrics < died_ns);
    let (t_stall, stall) = seen
        .agent_stall
        .expect("/api/v1/stalls never listed the flow");
    assert!(t_stall < died_ns);
    assert_eq!(ev_str(&stall, "class"), "retransmit", "{stall}");
    assert_eq!(
        ev_str(&stall, "boundary_source"),
        "tcp_retries2=5",
        "{stall}"
    );
    assert!(
        ev_str(&stall, "predicted_timeout_at").ends_with('Z'),
        "wall-clock prediction: {stall}"
    );

    // Prometheus stored the per-flow series with the full label contract.
    let (t_series, series) = seen
        .series
        .expect("Prometheus never had tcpstall_socket_seconds_to_timeout for the flow");
    eprintln!(
        "TIMING series in Prometheus {:.2} s after the write: {}",
        after_write(t_series),
        series["metric"]
    );
    assert!(t_series < died_ns, "series only after the death");
    let m = &series["metric"];
    assert_eq!(m["job"], "tcpstall");
    assert_eq!(m["class"], "retransmit");
    assert_eq!(m["netns"], link.a.inode().to_string());
    let v: f64 = series["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("sample value");
    assert!(v < 60.0 && v > -5.0, "seconds_to_timeout {v}");

    // The page fired before the socket died.
    let (t_firing, alert) = seen
        .firing
        .expect("TCPStallNearTimeout never reached state firing for the flow");
    eprintln!(
        "TIMING TCPStallNearTimeout pending at {:.2} s, firing at {:.2} s after the write: {} / {}",
        after_write(seen.pending.unwrap_or(t_firing)),
        after_write(t_firing),
        alert["annotations"]["summary"],
        alert["labels"]
    );
    assert!(
        t_firing < died_ns,
        "TCPStallNearTimeout fired only {:.2} s after the death",
        (t_firing - died_ns) as f64 / 1e9
    );
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["node"], NODE, "{alert}");
    assert_eq!(alert["labels"]["class"], "retransmit", "{alert}");
    let summary = ev_str(&alert["annotations"], "summary");
    assert!(
        summary.starts_with("1 TCP connection(s) ")
            && summary.contains(&server_addr.to_string())
            && summary.contains(NODE),
        "summary gives the count, the remote and the node: {summary}"
    );
    let description = ev_str(&alert["annotations"], "description");
    assert!(
        description.contains(&format!("node {NODE}")) && description.contains("ETIMEDOUT"),
        "{description}"
    );
    assert!(
        ev_str(&alert["annotations"], "flows").contains(&local.to_string()),
        "the per-flow detail names the flow: {alert}"
    );
    assert_eq!(
        ev_str(&alert["annotations"], "api"),
        format!("http://{}/api/v1/stalls", agent.listen),
        "{alert}"
    );
    assert!(
        ev_str(&alert["annotations"], "runbook_url").ends_with("#tcpstallneartimeout"),
        "{alert}"
    );

    // Afterwards: the agent recorded this flow's death (its own line, by
    // socket cookie, with the prediction's error), Prometheus has the
    // timeout counted, the flow's series and the alert go.
    let cookie = agent
        .cookie_of(local, server_addr)
        .expect("events of the flow in the agent's log");
    let timed_out = agent.wait_timeout_of(cookie, Duration::from_secs(5));
    assert!(
        timed_out["prediction_error_s"].is_f64(),
        "the flow's prediction error is recorded: {timed_out}"
    );
    assert_eq!(ev_str(&timed_out, "evidence"), "etimedout", "{timed_out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let timeouts = loop {
        let r = prom.query("sum(tcpstall_timeouts_total{job=\"tcpstall\"})");
        let v = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if v >= 1.0 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "tcpstall_timeouts_total never reached 1 in Prometheus"
        );
        thread::sleep(Duration::from_millis(250));
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !prom.query(&series_query).is_empty() || near_alert_for_flow(&prom.alerts()).is_some() {
        assert!(
            Instant::now() < deadline,
            "the flow's series / alert outlived the socket by 15 s"
        );
        thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "TIMING timeouts_total={timeouts} seen, series and alert resolved {:.2} s after the death",
        (monotonic_ns() - died_ns) as f64 / 1e9
    );

    // The dashboard: its variables find this node and remote; every panel
    // query executes at an instant of the stall and after it; the panels
    // that must show the stall return it.
    assert!(
        prom.label_values("node", "tcpstall_build_info")
            .contains(&NODE.to_owned()),
        "$node variable"
    );
    assert!(
        prom.label_values("remote", "tcpstall_incident_stalled_sockets")
            .contains(&server_addr.to_string()),
        "$remote variable"
    );
    let t_stall =
        t_dashboard.expect("Prometheus never had the flow and its incident at one instant");
    let during = run_dashboard(&mut prom, &queries, t_stall);
    let has =
        |rows: &[Value], label: &str, value: &str| rows.iter().any(|r| r["metric"][label] == value);
    let remote_s = server_addr.to_string();
    let local_s = local.to_string();
    let mut missing = Vec::new();
    let mut need = |ok: bool, what: String| {
        if !ok {
            missing.push(what);
        }
    };
    for (title, min) in [
        ("Stalled sockets", 1.0),
        ("Sockets near timeout", 1.0),
        ("Incidents (pod x remote)", 1.0),
        ("Stalled sockets by class", 1.0),
    ] {
        for (id, rows) in panel(&during, title) {
            need(
                rows.iter().map(value_of).sum::<f64>() >= min,
                format!("`{title}` {id}: {rows:?}"),
            );
        }
    }
    for (id, rows) in panel(&during, "Earliest predicted ETIMEDOUT") {
        need(
            rows.first().is_some_and(|r| value_of(r) < 60.0),
            format!("`Earliest predicted ETIMEDOUT` {id}: {rows:?}"),
        );
    }
    for title in [
        "Stalled now: incidents by pod and remote, predicted death as a time",
        "Stalled sockets by remote",
    ] {
        for (id, rows) in panel(&during, title) {
            need(
                has(rows, "remote", &remote_s),
                format!("`{title}` {id}: {rows:?}"),
            );
        }
    }
    for title in [
        "Stalled now: most urgent flows (top-K), predicted death as a time",
        "Stalled flows, all classes (top-K)",
    ] {
        for (id, rows) in panel(&during, title) {
            need(
                has(rows, "local", &local_s),
                format!("`{title}` {id}: {rows:?}"),
            );
        }
    }
    for title in [
        "Stalled sockets by namespace/pod",
        "Earliest predicted ETIMEDOUT by namespace/pod",
        "Agent memory",
        "Agents reporting",
        "Agent build",
        "Probes attached",
        "Hang-forever risks: sockets without a timeout, by pod",
    ] {
        for (id, rows) in panel(&during, title) {
            need(!rows.is_empty(), format!("`{title}` {id}: empty"));
        }
    }
    // Every feature is on with this kernel's sweep: the panel lists none.
    for (id, rows) in panel(&during, "Features off") {
        need(rows.is_empty(), format!("`Features off` {id}: {rows:?}"));
    }
    // Predicted death as a time: ms since the epoch, within a minute; the
    // row of this test's flow (other stalls on the node, e.g. sockets of
    // earlier tests still retransmitting in deleted namespaces, have their
    // own horizons).
    for title in [
        "Stalled now: incidents by pod and remote, predicted death as a time",
        "Stalled now: most urgent flows (top-K), predicted death as a time",
    ] {
        let at = panel(&during, title)
            .into_iter()
            .flat_map(|(_, rows)| rows)
            .find(|r| r["metric"]["remote"] == remote_s.as_str() && value_of(r) > 1e12)
            .map(value_of);
        need(
            at.is_some_and(|ms| ms > (t_stall - 5.0) * 1e3 && ms < (t_stall + 60.0) * 1e3),
            format!("`{title}`: predicted death time {at:?} vs now {t_stall}"),
        );
    }
    // Counters need their range: evaluated after the socket died.
    let after = run_dashboard(&mut prom, &queries, now_unix());
    for title in [
        "Retransmits by remote (top 10)",
        "RTO expirations by remote (top 10)",
    ] {
        for (id, rows) in panel(&after, title) {
            need(
                rows.iter()
                    .any(|r| r["metric"]["remote"] == remote_s.as_str() && value_of(r) > 0.0),
                format!("`{title}` {id}: {rows:?}"),
            );
        }
    }
    for title in [
        "ETIMEDOUT verdicts",
        "ETIMEDOUT verdicts (range)",
        "Agent CPU",
        "Events by kind",
    ] {
        for (id, rows) in panel(&after, title) {
            if title == "ETIMEDOUT verdicts" && id == "B" {
                // Stalls ended by a reset, per cause: none here (the socket
                // timed out), but every cause's series exists from the start.
                need(
                    has(rows, "cause", "peer_silent"),
                    format!("`{title}` {id}: {rows:?}"),
                );
                continue;
            }
            need(
                rows.iter().any(|r| value_of(r) > 0.0),
                format!("`{title}` {id}: {rows:?}"),
            );
        }
    }
    for title in ["Socket sweeps", "Sweep duration and size"] {
        for (id, rows) in panel(&after, title) {
            // B: failures (none expected) / visited rate (may be 0); C:
            // hold overflows (none expected).
            if id != "B" && !(title == "Socket sweeps" && id == "C") {
                need(!rows.is_empty(), format!("`{title}` {id}: empty"));
            }
        }
    }
    for (id, rows) in panel(&after, "Stalls ended by outcome") {
        need(
            has(rows, "outcome", "timed_out"),
            format!("`Stalls ended by outcome` {id}: {rows:?}"),
        );
    }
    assert!(
        missing.is_empty(),
        "dashboard panels that must show the stall do not:\n{}",
        missing.join("\n")
    );
    eprintln!(
        "TIMING dashboard: {} queries executed at the stall and after it",
        queries.len()
    );
    let ended = agent.wait_log(Duration::from_secs(5), "the flow's stall end", |v| {
        v["message"] == "retransmission stall ended"
            && ev_str(v, "remote") == server_addr.to_string()
    });
    assert_eq!(
        ev_str(&ended, "outcome"),
        "timed_out",
        "the stall's end is recorded as timed_out: {ended}"
    );

    // Stop the agent while Prometheus still holds its keep-alive scrape
    // connection: graceful shutdown must not wait for it.
    drop(blackhole);
    let t_stop = Instant::now();
    let logs = agent.stop();
    eprintln!(
        "TIMING agent stopped {:.2} s after SIGTERM",
        secs_since(t_stop)
    );
    drop(prom);
    let summary = logs
        .iter()
        .find(|v| v["message"] == "tcpstall stopped")
        .expect("shutdown summary");
    assert_eq!(summary["dropped"], 0, "ring buffer drops: {summary}");
    eprintln!("TIMING whole test {:.1} s", secs_since(t_start));
}
