//! connect() to a dead backend (SYN_SENT): listed as class `connect` from the
//! first SYN retransmission, with the instant the kernel gives up predicted
//! from `icsk_syn_retries ?: tcp_syn_retries`, `tcp_syn_linear_timeouts`
//! (where the kernel has it), the initial RTO and TCP_USER_TIMEOUT. Included
//! by `scenarios.rs` so the same tests run on the host and, by name
//! (`connect::...`), in the QEMU guests, each kernel against its own rules.

use std::{net::SocketAddr, thread, time::Duration};

use serde_json::Value;
use tcpstall_tests::*;

/// One connect() of a run.
struct Case {
    name: &'static str,
    /// The replay fixture's scenario (`<kernel>-<fixture>.jsonl`).
    fixture: &'static str,
    local_port: u16,
    opts: ConnectOpts,
    /// The boundary source the API must name.
    source: &'static str,
}

/// What happened to one case.
struct Outcome {
    start_ns: u64,
    end_ns: u64,
    views: Vec<(u64, Value)>,
}

/// The accuracy the issue asks for: max(1 s, 5 % of the connect's duration).
fn bound_ns(duration_ns: u64) -> u64 {
    (duration_ns / 20).max(1_000_000_000)
}

fn linear_timeouts_in(ns: &Netns) -> Option<u32> {
    let out = ns.exec("cat /proc/sys/net/ipv4/tcp_syn_linear_timeouts 2>/dev/null || true");
    out.trim().parse().ok()
}

/// Runs every case at once (one agent, one blackholed link whose client
/// namespace has `tcp_syn_retries` = `netns_syn_retries` when given) and
/// checks each: ETIMEDOUT from connect(), listed as `connect` within 3 s,
/// the boundary source, and every distinct prediction the API showed within
/// [`bound_ns`] of the instant connect() failed.
fn connect_run(tag: &str, subnet: u8, netns_syn_retries: Option<u32>, cases: &[Case]) {
    require_tools();
    let link = Link::new(tag, subnet);
    if let Some(n) = netns_syn_retries {
        link.a.sysctl("net.ipv4.tcp_syn_retries", &n.to_string());
    }
    let linear = linear_timeouts_in(&link.a);
    let mut agent = Agent::start(&[]);
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let remote = SocketAddr::from((link.b_ip, 8080));
    let threads: Vec<_> = cases
        .iter()
        .map(|c| {
            let local = SocketAddr::from((link.a_ip, c.local_port));
            spawn_connect_in(&link.a, local, remote, c.opts)
        })
        .collect();
    let mut views: Vec<Vec<(u64, Value)>> = vec![Vec::new(); cases.len()];
    while threads.iter().any(|t| !t.is_finished()) {
        let now = monotonic_ns();
        let stalls = agent.stalls();
        for (i, c) in cases.iter().enumerate() {
            let local = SocketAddr::from((link.a_ip, c.local_port)).to_string();
            if let Some(v) = stalls
                .iter()
                .find(|s| ev_str(s, "local") == local && ev_str(s, "remote") == remote.to_string())
            {
                views[i].push((now, v.clone()));
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let outcomes: Vec<Outcome> = threads
        .into_iter()
        .zip(views)
        .zip(cases)
        .map(|((t, views), c)| {
            let (start_ns, end_ns, errno) = t.join().expect("connect thread");
            assert_eq!(
                errno,
                Some(libc::ETIMEDOUT),
                "{}: connect() to a blackhole must fail with ETIMEDOUT",
                c.name
            );
            Outcome {
                start_ns,
                end_ns,
                views: views.into_iter().filter(|(t, _)| *t < end_ns).collect(),
            }
        })
        .collect();
    // Each socket's recording, a replay fixture (`cargo xtask
    // record-fixtures`): its events and the kernel's end (the ETIMEDOUT
    // error report) with the instant connect() returned.
    for (c, o) in cases.iter().zip(&outcomes) {
        let local = SocketAddr::from((link.a_ip, c.local_port));
        super::await_etimedout_report(&mut agent, local, remote);
        let flow = super::flow_events(&agent.events(), local, remote);
        let header = serde_json::json!({
            "end": "connect",
            "end_kernel_ns": super::etimedout_report_ns(&flow),
            "end_app_ns": o.end_ns,
            "start_ns": o.start_ns,
            "hz": super::flow_hz(&flow),
            "tcp_syn_retries": netns_syn_retries,
            "tcp_syn_linear_timeouts": linear,
            "syncnt": c.opts.syncnt,
            "user_timeout_ms": c.opts.user_timeout_ms,
        });
        super::print_fixture(c.fixture, header, &flow);
    }
    for (c, o) in cases.iter().zip(&outcomes) {
        check_case(c, o, linear);
    }
}

fn check_case(c: &Case, o: &Outcome, linear: Option<u32>) {
    let name = c.name;
    let (first_at, first) = o.views.first().unwrap_or_else(|| {
        panic!("{name}: never listed in /api/v1/stalls before connect() failed")
    });
    let listed_after_s = (first_at - o.start_ns) as f64 / 1e9;
    assert!(
        listed_after_s <= 3.0,
        "{name}: listed {listed_after_s:.2} s after connect(), want <= 3 s: {first}"
    );
    for (_, v) in &o.views {
        assert_eq!(ev_str(v, "class"), "connect", "{name}: {v}");
        assert_eq!(ev_str(v, "state"), "SYN_SENT", "{name}: {v}");
    }
    let mut predictions: Vec<(u64, u64)> = Vec::new();
    for (t, v) in &o.views {
        if let Some(p) = v["predicted_timeout_ns"].as_u64()
            && predictions.last().is_none_or(|&(_, q)| q != p)
        {
            predictions.push((*t, p));
        }
    }
    let last = &o.views.last().expect("views").1;
    assert!(!predictions.is_empty(), "{name}: no prediction: {last}");
    assert_eq!(ev_str(last, "boundary_source"), c.source, "{name}: {last}");
    let duration = o.end_ns - o.start_ns;
    let bound = bound_ns(duration);
    for (i, &(seen, p)) in predictions.iter().enumerate() {
        let err = p as i128 - o.end_ns as i128;
        eprintln!(
            "CONNECT {name} prediction {i}: seen {:.2} s before the failure, error {:+.1} ms \
             (bound {:.0} ms)",
            (o.end_ns - seen) as f64 / 1e9,
            err as f64 / 1e6,
            bound as f64 / 1e6
        );
        assert!(
            err.unsigned_abs() <= u128::from(bound),
            "{name}: prediction {i} ({p}) misses connect()'s failure ({}) by {:+.1} ms \
             (bound {:.0} ms); views: {:#?}",
            o.end_ns,
            err as f64 / 1e6,
            bound as f64 / 1e6,
            o.views.iter().map(|(_, v)| v).collect::<Vec<_>>()
        );
    }
    let (first_seen, first_p) = predictions[0];
    let last_p = predictions.last().expect("a prediction").1;
    eprintln!(
        "ACCURACY-CONNECT | {name} | linear {} | {} | {:.1} s | {:.1} s | {:+.0} ms | {:+.0} ms |",
        linear.map_or("absent".to_owned(), |l| l.to_string()),
        c.source,
        duration as f64 / 1e9,
        (o.end_ns - first_seen) as f64 / 1e9,
        (first_p as f64 - o.end_ns as f64) / 1e6,
        (last_p as f64 - o.end_ns as f64) / 1e6,
    );
}

/// `tcp_syn_retries` 4 in the client's namespace (35 s with 6.5+'s four
/// linear SYN timeouts, 31 s without), plus, at the same time, TCP_SYNCNT 2
/// on a socket (7 s either way) and TCP_USER_TIMEOUT 5 s (5 s).
#[test]
fn connect_horizon() {
    connect_run(
        "cn4",
        141,
        Some(4),
        &[
            Case {
                name: "tcp_syn_retries=4",
                fixture: "connect-syn-retries-4",
                local_port: 41_001,
                opts: ConnectOpts::default(),
                source: "tcp_syn_retries=4",
            },
            Case {
                name: "TCP_SYNCNT=2",
                fixture: "connect-syncnt-2",
                local_port: 41_002,
                opts: ConnectOpts {
                    syncnt: Some(2),
                    user_timeout_ms: None,
                },
                source: "tcp_syncnt=2",
            },
            Case {
                name: "TCP_USER_TIMEOUT=5000",
                fixture: "connect-user-timeout-5000",
                local_port: 41_003,
                opts: ConnectOpts {
                    syncnt: None,
                    user_timeout_ms: Some(5_000),
                },
                source: "user_timeout",
            },
        ],
    );
}

/// The default `tcp_syn_retries` (6) of a new namespace: 131 s with linear
/// SYN timeouts (6.5+), 127 s without. Host only (too long for the guests'
/// budget; `connect_horizon` covers their rules).
#[test]
fn connect_horizon_default_syn_retries() {
    connect_run(
        "cn6",
        142,
        None,
        &[Case {
            name: "tcp_syn_retries=6 (default)",
            fixture: "connect-syn-retries-6",
            local_port: 42_001,
            opts: ConnectOpts::default(),
            source: "tcp_syn_retries=6",
        }],
    );
}
