//! Replay tests (no root): real event streams of S1 (`tcp_retries2`
//! blackhole) and S2 (`TCP_USER_TIMEOUT`) recorded on the host (6.18) and in
//! the QEMU guests (6.1, 6.12), with the ETIMEDOUT each kernel actually
//! delivered, are fed to the engine; every prediction it makes must land on
//! the measured death. The truth is the recorded kernel, not the engine's
//! model (the engine's own unit tests simulate the kernel with the engine's
//! functions; these do not).
//!
//! Fixtures: `tcpstall-tests/fixtures/replay/<kernel>-<scenario>.jsonl`, a
//! header line (kernel, scenario, HZ, the kernel's ETIMEDOUT verdict instant
//! and the application's) then the socket's events as `tcpstall run
//! --log-events` logged them. Regenerate with `cargo xtask record-fixtures`
//! (root; docs/testing.md).

use std::{net::SocketAddr, path::PathBuf};

use serde_json::Value;
use tcpstall::engine::{Engine, EngineConfig};
use tcpstall::kernel::event::{
    EventKind, Mechanism, NetnsSysctls, SockEvent, SockFields, TcpState,
};

#[path = "horizon_truth/mod.rs"]
mod horizon_truth;
use horizon_truth::KernelDeath;

/// Kernels and scenarios that must have a fixture (a lost fixture fails).
const EXPECTED: &[&str] = &[
    "6.18-s1-retries2-3",
    "6.18-s1-retries2-5",
    "6.18-s2-user-timeout-4000",
    "6.1-s1-retries2-3",
    "6.1-s1-retries2-5",
    "6.1-s2-user-timeout-4000",
    "6.12-s1-retries2-3",
    "6.12-s1-retries2-5",
    "6.12-s2-user-timeout-4000",
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/replay")
}

struct Fixture {
    name: String,
    header: Value,
    events: Vec<Value>,
}

fn load(name: &str) -> Fixture {
    let path = fixture_dir().join(format!("{name}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} missing ({e}): regenerate with `cargo xtask record-fixtures`",
            path.display()
        )
    });
    let mut lines = text.lines().map(|l| {
        serde_json::from_str::<Value>(l)
            .unwrap_or_else(|e| panic!("{}: bad line ({e}): {l}", path.display()))
    });
    let header = lines.next().expect("header line");
    assert_eq!(
        header["fixture"],
        "tcpstall replay v1",
        "{}",
        path.display()
    );
    Fixture {
        name: name.to_owned(),
        header,
        events: lines.collect(),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn u32_opt(v: &Value, k: &str) -> Option<u32> {
    v[k].as_u64().map(|x| u32::try_from(x).expect("u32 field"))
}

fn by_name<T: Copy>(
    all: impl IntoIterator<Item = T>,
    name: &str,
    f: impl Fn(T) -> &'static str,
) -> T {
    all.into_iter()
        .find(|&x| f(x) == name)
        .unwrap_or_else(|| panic!("unknown name {name:?}"))
}

fn state(name: &str) -> TcpState {
    by_name((0..14).map(TcpState::from_raw), name, TcpState::as_str)
}

/// A logged event back into the engine's input.
fn sock_event(v: &Value) -> SockEvent {
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"));
    let sock = v["pending"].as_u64().map(|pending| SockFields {
        backoff: u32_opt(v, "backoff").unwrap_or(0),
        probes_out: u32_opt(v, "probes_out").unwrap_or(0),
        pending: pending as u32,
        ca_state: u32_opt(v, "ca_state").unwrap_or(0),
        rto_max_jiffies: u32_opt(v, "rto_max_jiffies").unwrap_or(0),
        user_timeout_ms: u32_opt(v, "user_timeout_ms").unwrap_or(0),
        retrans_stamp: u32_opt(v, "retrans_stamp").unwrap_or(0),
        usec_ts: v["usec_ts"].as_bool().unwrap_or(false),
        snd_wnd: u32_opt(v, "snd_wnd").unwrap_or(0),
        lsndtime: u32_opt(v, "lsndtime").unwrap_or(0),
        rcv_tstamp: u32_opt(v, "rcv_tstamp").unwrap_or(0),
        timer_expires: v["timer_expires"].as_u64().unwrap_or(0),
        syn_retries: u32_opt(v, "syn_retries").unwrap_or(0),
        mss_cache: u32_opt(v, "mss_cache").unwrap_or(0),
        sacked_out: u32_opt(v, "sacked_out").unwrap_or(0),
        keepalive: Default::default(),
    });
    let netns_sysctls = u32_opt(v, "tcp_retries2").map(|r| NetnsSysctls {
        tcp_retries2: r,
        tcp_orphan_retries: u32_opt(v, "tcp_orphan_retries").unwrap_or(0),
        tcp_rto_max_ms: u32_opt(v, "tcp_rto_max_ms"),
        tcp_syn_retries: u32_opt(v, "tcp_syn_retries").unwrap_or(0),
        tcp_syn_linear_timeouts: u32_opt(v, "tcp_syn_linear_timeouts"),
    });
    SockEvent {
        kind: by_name(EventKind::ALL, s("kind"), EventKind::as_str),
        mechanism: by_name(
            [
                Mechanism::TpBtf,
                Mechanism::Fentry,
                Mechanism::Kprobe,
                Mechanism::TimerTracepoint,
                Mechanism::SockOps,
            ],
            s("mechanism"),
            Mechanism::as_str,
        ),
        ts_ns: u(v, "ts_ns"),
        jiffies: u(v, "jiffies"),
        cookie: u(v, "cookie"),
        skaddr: v["skaddr"].as_u64().unwrap_or(0),
        netns: u(v, "netns") as u32,
        cgroup_id: v["cgroup_id"].as_u64().unwrap_or(0),
        local: s("local").parse::<SocketAddr>().expect("local"),
        remote: s("remote").parse::<SocketAddr>().expect("remote"),
        state: state(s("state")),
        old_state: state(s("old_state")),
        sock,
        retransmits: u(v, "retransmits") as u32,
        rto_jiffies: u(v, "rto_jiffies") as u32,
        snd_una: u(v, "snd_una") as u32,
        packets_out: u(v, "packets_out") as u32,
        retrans_out: u(v, "retrans_out") as u32,
        total_retrans: u32_opt(v, "total_retrans").unwrap_or(0),
        netns_sysctls,
        orphan: v["orphan"].as_bool().unwrap_or(false),
        rto_expired_verdict: v["rto_expired_verdict"].as_bool().unwrap_or(false),
        sk_err: u(v, "sk_err") as u32,
        ack_seq: u(v, "ack_seq") as u32,
        err_soft: v["err_soft"].as_u64().unwrap_or(0) as u32,
    }
}

/// Feeds the fixture to an engine configured as `tcpstall run` is (HZ as
/// the loader reads it) and returns every distinct prediction for the flow,
/// with the event time it appeared at.
fn replay(f: &Fixture) -> Vec<(u64, u64)> {
    let hz = u32::try_from(u(&f.header, "hz")).expect("hz");
    let mut engine = Engine::new(EngineConfig {
        hz: Some(hz),
        ..EngineConfig::default()
    })
    .expect("engine config");
    let mut predictions: Vec<(u64, u64)> = Vec::new();
    let verdict = u(&f.header, "etimedout_kernel_ns");
    for v in &f.events {
        let ev = sock_event(v);
        engine.ingest(&ev);
        engine.tick(ev.ts_ns);
        if ev.ts_ns >= verdict {
            continue;
        }
        for s in engine.stalls(ev.ts_ns) {
            if let Some(p) = s.predicted_timeout_ns
                && predictions.last().is_none_or(|&(_, q)| q != p)
            {
                predictions.push((ev.ts_ns, p));
            }
        }
    }
    predictions
}

/// Every recorded kernel and scenario: each prediction the engine makes
/// from the recorded events, the first included, lands on the kernel's
/// measured ETIMEDOUT within the bound of [`KernelDeath::prediction_bound_ns`]
/// (2 jiffies, plus callback lateness the recorded expiries show, plus the
/// recorded gap from the fatal expiry to the verdict). At least 2 predictions
/// per stream, the first at least 2 s (S1) / 1 s (S2) ahead.
///
/// Mutations checked: no timer-wheel rounding in `predict_rto_death`
/// (`let wheel = false && ...`) fails the S1 fixtures (hundreds of ms early);
/// the user timeout predicted one expiry early fails the S2 fixtures
/// (about -1 s).
#[test]
fn replay_recorded_deaths_match_every_prediction() {
    let mut report = Vec::new();
    for name in EXPECTED {
        let f = load(name);
        let truth = KernelDeath::from_events(&f.events);
        assert_eq!(
            truth.verdict_ns,
            u(&f.header, "etimedout_kernel_ns"),
            "{}: header and events disagree on the verdict",
            f.name
        );
        assert!(
            truth.verdict_ns <= u(&f.header, "etimedout_app_ns"),
            "{}: the application saw ETIMEDOUT before the kernel's verdict",
            f.name
        );
        // User-timeout deaths: the clamped last RTO, as in `horizon_run`.
        let bound = truth.prediction_bound_ns()
            + if f.name.contains("-s2-") {
                truth.clamp_allowance_ns()
            } else {
                0
            };
        let preds = replay(&f);
        assert!(
            preds.len() >= 2,
            "{}: {} predictions (expected one per RTO expiry from the stall on)",
            f.name,
            preds.len()
        );
        let min_lead = if f.name.contains("-s2-") { 1.0 } else { 2.0 };
        let lead = (truth.verdict_ns - preds[0].0) as f64 / 1e9;
        assert!(
            lead >= min_lead,
            "{}: first prediction only {lead:.3} s ahead",
            f.name
        );
        for (i, &(at, p)) in preds.iter().enumerate() {
            let err = p as i128 - truth.verdict_ns as i128;
            report.push(format!(
                "{:<28} prediction {i} at -{:.3} s: error {:+.3} ms (bound {:.3} ms)",
                f.name,
                (truth.verdict_ns - at) as f64 / 1e9,
                err as f64 / 1e6,
                bound as f64 / 1e6
            ));
            assert!(
                err.unsigned_abs() <= u128::from(bound),
                "{}: prediction {i} misses the recorded ETIMEDOUT by {:+.3} ms (bound {:.3} ms)\n{}",
                f.name,
                err as f64 / 1e6,
                bound as f64 / 1e6,
                report.join("\n")
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// No stray fixture: every file in the directory is one the test replays.
#[test]
fn replay_fixture_set_is_complete() {
    let mut found: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("fixtures/replay")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".jsonl")
                .to_owned()
        })
        .collect();
    found.sort();
    let mut expected: Vec<String> = EXPECTED.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected);
}
