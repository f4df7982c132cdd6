//! Privileged scenario tests: real kernel, real namespaces, real agent.
//! Run by `cargo xtask test` as root with `--test-threads=1` (kernel state
//! such as probes and namespaces is shared).

use std::{
    io::{ErrorKind, Read, Write},
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpstall_tests::*;

/// Behavioural harness of the kernel programs (one socket action, exact fields).
#[path = "programs/mod.rs"]
mod programs;

/// connect() to a dead backend: listed and predicted (SYN_SENT).
#[path = "connect/mod.rs"]
mod connect;

/// Idle connections whose keepalive probes go unanswered: listed and
/// predicted (class `keepalive`).
#[path = "keepalive/mod.rs"]
mod keepalive;
/// Orphans retransmitting their FIN, and the zero-window probe path.
#[path = "orphan/mod.rs"]
mod orphan;

/// The guard in every kernel: per-pod rules arm the timeouts sockets lack.
#[path = "guard_kernel/mod.rs"]
mod guard_kernel;

/// Why it stalls: one scenario per cause.
#[path = "causes/mod.rs"]
mod causes;

/// The kernel's record of a socket's death and the prediction bound.
#[path = "horizon_truth/mod.rs"]
mod horizon_truth;
use horizon_truth::KernelDeath;

/// Events of one flow: the socket cookies seen with its client 4-tuple, then
/// every event of those sockets (the local port reads 0 once the kernel has
/// released it, e.g. in the final CLOSE).
fn flow_events(events: &[Value], local: SocketAddr, remote: SocketAddr) -> Vec<Value> {
    let cookies: std::collections::HashSet<u64> = events
        .iter()
        .filter(|e| {
            ev_str(e, "local") == local.to_string() && ev_str(e, "remote") == remote.to_string()
        })
        .map(|e| ev_u64(e, "cookie"))
        .filter(|&c| c != 0)
        .collect();
    events
        .iter()
        .filter(|e| cookies.contains(&ev_u64(e, "cookie")))
        .cloned()
        .collect()
}

/// S1 (foundation part): blackholed peer with unacked data; the client
/// namespace has tcp_retries2 = 5 so the kernel kills the socket after ~13 s.
#[test]
fn s1_blackhole_events_end_to_end() {
    require_tools();
    let link = Link::new("s1e", 11);
    link.a.sysctl("net.ipv4.tcp_retries2", "5");
    let mut agent = Agent::start(&[]);

    let server_addr = SocketAddr::from((link.b_ip, 8080));
    // Reads until the peer vanishes (the blackhole hides the client's
    // death, so the idle timeout ends it).
    let server = drain_server_in(&link.b, server_addr, Duration::from_secs(30), None);
    let mut client = connect_in(&link.a, server_addr);
    let local = client.local_addr().expect("local addr");
    client.write_all(b"hello").expect("first write");
    wait_all_acked(&client, 5, Duration::from_secs(10));

    let blackhole = link.b.blackhole_from(link.a_ip);
    let t0 = Instant::now();
    client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let err = client
        .read(&mut buf)
        .expect_err("read must fail with ETIMEDOUT");
    let died_after = t0.elapsed();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ETIMEDOUT),
        "expected ETIMEDOUT, got {err}"
    );
    assert!(err.kind() == ErrorKind::TimedOut);
    assert!(
        died_after > Duration::from_secs(10) && died_after < Duration::from_secs(20),
        "retries2=5 should kill the socket after ~13 s, took {died_after:?}"
    );

    // The error report follows the death immediately; give the reader a moment.
    agent.wait_log(Duration::from_secs(5), "ETIMEDOUT error report", |v| {
        v["message"] == "event"
            && ev_str(v, "kind") == "error_report"
            && ev_str(v, "remote") == server_addr.to_string()
    });
    drop(blackhole);
    drop(client);
    let logs = agent.stop();
    let events: Vec<Value> = logs
        .iter()
        .filter(|v| v["message"] == "event")
        .cloned()
        .collect();
    let flow = flow_events(&events, local, server_addr);
    for e in &flow {
        eprintln!("{}", fmt_event(e));
    }

    // Nothing lost.
    let summary = logs
        .iter()
        .find(|v| v["message"] == "tcpstall stopped")
        .expect("shutdown summary");
    assert_eq!(summary["dropped"], 0, "ring buffer drops: {summary}");
    // The kernel skipped none of our programs' runs (recursion protection:
    // a tracepoint program does not run while another BPF program or a BPF
    // map syscall holds `bpf_prog_active` on that CPU).
    assert_eq!(
        summary["missed_runs"], 0,
        "kernel-skipped program runs: {summary}"
    );
    assert!(ev_u64(summary, "submitted") > 0);

    // Retransmit events for exactly this 4-tuple with rising backoff.
    let retrans: Vec<&Value> = flow
        .iter()
        .filter(|e| ev_str(e, "kind") == "retransmit")
        .collect();
    assert!(
        retrans.len() >= 5,
        "expected >= 5 retransmits, got {}: {flow:#?}",
        retrans.len()
    );
    let backoffs: Vec<u64> = retrans.iter().map(|e| ev_u64(e, "backoff")).collect();
    assert!(
        backoffs.windows(2).all(|w| w[1] >= w[0]),
        "backoff must not fall: {backoffs:?}"
    );
    assert!(
        backoffs.last() > backoffs.first(),
        "backoff must rise: {backoffs:?}"
    );
    for e in &retrans {
        assert_eq!(
            ev_u64(e, "tcp_retries2"),
            5,
            "netns sysctl read from struct net: {e}"
        );
        assert_eq!(ev_u64(e, "netns"), link.a.inode(), "netns inode: {e}");
        assert_ne!(ev_u64(e, "cookie"), 0, "socket cookie: {e}");
    }

    // RTO timer events: pending RETRANS; icsk_retransmits, icsk_backoff and
    // icsk_rto move together (rto = first rto << backoff steps), which checks
    // the three BTF offsets against each other. Expected: 6 expiries for
    // retries2 = 5. The relation holds across an expiry the agent did not
    // see, so one gap is tolerated and reported with the events around it
    // (a rare unexplained miss, see the README's known gaps); more fail.
    let timers: Vec<&Value> = flow
        .iter()
        .filter(|e| ev_str(e, "kind") == "write_timer" && ev_u64(e, "pending") == 1)
        .collect();
    assert!(
        timers.len() >= 5,
        "expected >= 5 RTO timer events (6 expiries): {flow:#?}"
    );
    let first = timers[0];
    let (rto0, backoff0, count0) = (
        ev_u64(first, "rto_jiffies"),
        ev_u64(first, "backoff"),
        ev_u64(first, "retransmits"),
    );
    assert!(rto0 > 0, "first RTO: {first}");
    let steps: Vec<(u64, u64, u64)> = timers
        .iter()
        .map(|e| {
            (
                ev_u64(e, "backoff"),
                ev_u64(e, "retransmits"),
                ev_u64(e, "rto_jiffies"),
            )
        })
        .collect();
    for &(backoff, count, rto) in &steps {
        assert!(backoff >= backoff0, "backoff fell: {steps:?}");
        let k = backoff - backoff0;
        assert_eq!(
            rto,
            rto0 << k,
            "RTO doubles per backoff step (backoff, retransmits, rto): {steps:?}"
        );
        assert_eq!(
            count,
            count0 + k,
            "retransmits count with backoff: {steps:?}"
        );
    }
    let gaps: Vec<(u64, u64)> = steps
        .windows(2)
        .filter(|w| w[1].0 != w[0].0 + 1)
        .map(|w| (w[0].0, w[1].0))
        .collect();
    if !gaps.is_empty() {
        test_note(&format!(
            "s1_blackhole_events_end_to_end: RTO expiries not seen between backoff steps {gaps:?} (tolerated: one); summary {summary}"
        ));
        let (lo, hi) = (
            ev_u64(first, "ts_ns"),
            ev_u64(timers[timers.len() - 1], "ts_ns"),
        );
        eprintln!(
            "RTO expiries not seen between backoff steps {gaps:?} (agent summary, with the programs' own skip counters: {summary}); every event in that window:"
        );
        for v in events
            .iter()
            .filter(|v| (lo..=hi).contains(&ev_u64(v, "ts_ns")))
        {
            eprintln!("  {v}");
        }
    }
    assert!(
        gaps.len() <= 1 && gaps.iter().all(|&(a, b)| b == a + 2),
        "backoff steps must be consecutive (at most one expiry unseen): {steps:?}"
    );
    // retrans_stamp is set by the episode's first retransmission: every RTO
    // expiry after the first one sees it.
    assert!(
        timers
            .iter()
            .skip(1)
            .all(|e| ev_u64(e, "retrans_stamp") != 0),
        "retrans_stamp set: {timers:#?}"
    );

    // The state change to CLOSE (with the real local port, although the
    // kernel has released it by then) and the kernel's ETIMEDOUT verdict.
    assert!(
        flow.iter().any(|e| ev_str(e, "kind") == "state"
            && ev_str(e, "state") == "CLOSE"
            && ev_str(e, "local") == local.to_string()),
        "state change to CLOSE: {flow:#?}"
    );
    assert!(
        flow.iter()
            .any(|e| ev_str(e, "kind") == "error_report" && ev_u64(e, "sk_err") == 110),
        "ETIMEDOUT error report: {flow:#?}"
    );

    drop(server); // detached: it ends on its read timeout
}

/// A healthy connection: the agent sees its state changes but no retransmission.
/// Request/response: every segment is acknowledged at once by the reply (a
/// bulk transfer may legitimately end with a tail loss probe when the last
/// ACK is delayed, and a TLP is a retransmission).
#[test]
fn healthy_connection_has_no_retransmits() {
    require_tools();
    let link = Link::new("ok", 12);
    let mut agent = Agent::start(&[]);
    let server_addr = SocketAddr::from((link.b_ip, 8081));
    let listener = listen_in(&link.b, server_addr);
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 1024];
        let mut rounds = 0;
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => {
                    s.write_all(&buf).expect("echo");
                    rounds += 1;
                }
                Err(_) => break rounds,
            }
        }
    });
    let mut client = connect_in(&link.a, server_addr);
    client.set_nodelay(true).expect("nodelay");
    let local = client.local_addr().expect("local addr");
    let mut reply = [0u8; 1024];
    for i in 0..200u32 {
        let msg = [(i % 251) as u8; 1024];
        client.write_all(&msg).expect("write");
        client.read_exact(&mut reply).expect("read echo");
        assert_eq!(reply, msg);
    }
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert_eq!(server.join().expect("server"), 200);
    drop(client);
    agent.wait_log(
        Duration::from_secs(5),
        "state events of the healthy flow",
        |v| {
            v["message"] == "event"
                && ev_str(v, "kind") == "state"
                && ev_str(v, "local") == local.to_string()
                && ev_str(v, "state") == "FIN_WAIT2"
        },
    );
    thread::sleep(Duration::from_millis(500));
    let events = agent.events();
    let flow = flow_events(&events, local, server_addr);
    assert!(
        flow.iter().any(|e| ev_str(e, "kind") == "state"),
        "the agent must see the healthy flow's state changes"
    );
    let bad: Vec<_> = flow
        .iter()
        .filter(|e| matches!(ev_str(e, "kind"), "retransmit" | "write_timer"))
        .collect();
    assert!(bad.is_empty(), "healthy flow must not retransmit: {bad:#?}");
}

// ---------------------------------------------------------------------------
// The stall engine, observed through the running agent's API.

/// One S1/S2 run: what the agent said and what the kernel did.
struct HorizonRun {
    retries2: Option<u32>,
    user_timeout_ms: Option<u32>,
    boundary_s: f64,
    boundary_source: String,
    /// Seconds from the first unanswered write to the ETIMEDOUT.
    actual_after_write_s: f64,
    /// Last prediction before death minus actual death (seconds).
    error_s: f64,
    first_streak: u64,
    near_before_death: bool,
}

/// Prints this run as a replay fixture (`REPLAY-FIXTURE <file> <json>`
/// lines: a header with the kernel, the scenario and the measured death,
/// then the socket's events as the agent logged them), which
/// `cargo xtask record-fixtures` collects from the host's and the guests'
/// output into `tcpstall-tests/fixtures/replay/`.
fn print_replay_fixture(
    retries2: Option<u32>,
    user_timeout_ms: Option<u32>,
    truth: &KernelDeath,
    app_etimedout_ns: u64,
    write_ns: u64,
    flow: &[Value],
) {
    let scenario = match (retries2, user_timeout_ms) {
        (_, Some(ms)) => format!("s2-user-timeout-{ms}"),
        (Some(r), None) => format!("s1-retries2-{r}"),
        (None, None) => "s1-retries2-default".to_owned(),
    };
    let header = serde_json::json!({
        "tcp_retries2": retries2,
        "user_timeout_ms": user_timeout_ms,
        "hz": truth.hz,
        "etimedout_kernel_ns": truth.verdict_ns,
        "etimedout_app_ns": app_etimedout_ns,
        "write_ns": write_ns,
    });
    print_fixture(&scenario, header, flow);
}

/// Prints one socket's recording as a replay fixture: `header` (the
/// scenario's own fields) with the fixture tag, the kernel and the scenario
/// added, then the socket's events as the agent logged them, in time order
/// and without the log line's own fields. The file is
/// `<kernel series>-<scenario>.jsonl`.
fn print_fixture(scenario: &str, mut header: Value, flow: &[Value]) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let series: Vec<&str> = release.trim().split(['.', '-']).take(2).collect();
    let file = format!("{}-{scenario}.jsonl", series.join("."));
    let h = header.as_object_mut().expect("fixture header is an object");
    h.insert("fixture".into(), "tcpstall replay v1".into());
    h.insert("kernel".into(), release.trim().into());
    h.insert("scenario".into(), scenario.into());
    println!("REPLAY-FIXTURE {file} {header}");
    let mut evs: Vec<&Value> = flow.iter().collect();
    evs.sort_by_key(|e| ev_u64(e, "ts_ns"));
    for e in evs {
        let mut e = e.clone();
        if let Some(o) = e.as_object_mut() {
            for k in [
                "timestamp",
                "level",
                "target",
                "message",
                "threadName",
                "threadId",
            ] {
                o.remove(k);
            }
        }
        println!("REPLAY-FIXTURE {file} {e}");
    }
}

/// The kernel's HZ from one socket's events: jiffies against
/// CLOCK_MONOTONIC between its first and last event (at least 1 s apart),
/// rounded to the nearest HZ a kernel can have.
fn flow_hz(flow: &[Value]) -> u64 {
    let mut evs: Vec<&Value> = flow.iter().filter(|e| e["jiffies"].is_u64()).collect();
    evs.sort_by_key(|e| ev_u64(e, "ts_ns"));
    let (f, l) = (evs.first().expect("events"), evs.last().expect("events"));
    let dt = ev_u64(l, "ts_ns") - ev_u64(f, "ts_ns");
    assert!(dt >= 1_000_000_000, "events span only {dt} ns: no HZ");
    let rate = (ev_u64(l, "jiffies") - ev_u64(f, "jiffies")) as f64 * 1e9 / dt as f64;
    horizon_truth::kernel_hz_of_rate(rate)
        .unwrap_or_else(|| panic!("jiffies advance at {rate:.1}/s, no kernel HZ"))
}

/// The kernel's ETIMEDOUT verdict for one socket: its first error report
/// with `sk_err` 110 (`inet_sk_error_report`), if the agent logged one.
fn etimedout_report_ns(flow: &[Value]) -> Option<u64> {
    flow.iter()
        .filter(|e| ev_str(e, "kind") == "error_report" && ev_u64(e, "sk_err") == 110)
        .map(|e| ev_u64(e, "ts_ns"))
        .min()
}

/// Waits (up to 10 s) for the agent to log the ETIMEDOUT error report of
/// the socket `local` -> `remote`, so a fixture printed afterwards has it.
fn await_etimedout_report(agent: &mut Agent, local: SocketAddr, remote: SocketAddr) {
    let (l, r) = (local.to_string(), remote.to_string());
    agent.wait_log(
        Duration::from_secs(10),
        &format!("the ETIMEDOUT error report of {l} -> {r}"),
        |v| {
            v["message"] == "event"
                && ev_str(v, "kind") == "error_report"
                && ev_str(v, "remote") == r
                && ev_u64(v, "sk_err") == 110
                && ev_str(v, "local") == l
        },
    );
}

/// Build a blackholed connection (S1; S2 with `user_timeout_ms`) and follow
/// the agent's view of it until the kernel kills the socket.
///
/// Every distinct prediction the API showed (polled every 25 ms, the first
/// included) must match the kernel's ETIMEDOUT verdict instant (the
/// socket's `inet_sk_error_report` event) within
/// [`KernelDeath::prediction_bound_ns`]: 2 jiffies of phase, plus timer
/// callback lateness measured from the expiry events against the timer
/// wheel's bucket of that expiry's level, plus the measured gap from the
/// fatal expiry to the verdict (about 8 ms at HZ 250 when on time); with a
/// user timeout also [`KernelDeath::clamp_allowance_ns`]: the clamped last
/// RTO is known to a prediction only within one jiffy, which moves the fatal
/// expiry by a wheel granularity when that jiffy straddles a bucket boundary
/// (seen once in the 6.1 guest: -31.4 ms against an 8.5 ms bound).
/// Mutations checked (host, HZ 250): no timer-wheel rounding in
/// `predict_rto_death` fails retries2=3/5 and S2 with -176/-432/-20 ms;
/// the user timeout predicted one expiry early fails S2 with -1088 ms.
fn horizon_run(
    tag: &str,
    subnet: u8,
    retries2: Option<u32>,
    user_timeout_ms: Option<u32>,
) -> HorizonRun {
    require_tools();
    let link = Link::new(tag, subnet);
    if let Some(r) = retries2 {
        link.a.sysctl("net.ipv4.tcp_retries2", &r.to_string());
    }
    let mut agent = Agent::start(&[]);
    let conn = Conn::establish(&link, 8080, user_timeout_ms);
    let (local, server_addr) = (conn.local, conn.server);
    assert!(
        agent.stall_of(local, server_addr).is_none(),
        "S3: an idle healthy connection must not be flagged"
    );
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let (t_write, reader) = conn.write_and_await_death(Duration::from_secs(200));

    // Fast enough to see every prediction: the shortest RTO interval here
    // is about 400 ms (the second expiry).
    let mut views = agent.views_until(local, server_addr, &reader, Duration::from_millis(25));
    let (died_ns, errno) = reader.join().expect("reader");
    assert_eq!(
        errno,
        Some(libc::ETIMEDOUT),
        "the kernel must kill the socket with ETIMEDOUT"
    );
    // Only views taken before the death count.
    views.retain(|(t, _)| *t < died_ns);
    assert!(
        !views.is_empty(),
        "the agent never reported the stalled flow"
    );
    let first = &views[0].1;
    assert_eq!(ev_str(first, "class"), "retransmit", "{first}");
    let first_streak = ev_u64(first, "rto_streak");
    assert!(
        first_streak <= 3,
        "classified only after {first_streak} RTOs: {first}"
    );

    let last = &views.last().expect("views").1;
    let boundary_s = last["boundary_s"].as_f64().expect("boundary_s");
    let boundary_source = ev_str(last, "boundary_source").to_owned();

    // Every distinct prediction the API showed, in order, with when it was
    // first seen.
    let mut predictions: Vec<(u64, u64)> = Vec::new();
    for (t, v) in &views {
        if let Some(p) = v["predicted_timeout_ns"].as_u64()
            && predictions.last().is_none_or(|&(_, q)| q != p)
        {
            predictions.push((*t, p));
        }
    }
    assert!(
        !predictions.is_empty(),
        "no predicted timeout while stalled: {last}"
    );
    // The kernel's own record of this socket's RTO expiries and verdict
    // (the agent logs the verdict after the application may have seen it):
    // its error report or, from the same softirq microseconds before it,
    // its change to CLOSE with `sk_err` ETIMEDOUT (`tcp_done_with_error()`;
    // a CI run once never got the error report within 30 s).
    agent.wait_log(
        Duration::from_secs(60),
        "the flow's ETIMEDOUT verdict",
        |v| {
            v["message"] == "event"
                && horizon_truth::is_etimedout_verdict(v)
                && ev_str(v, "remote") == server_addr.to_string()
        },
    );
    let flow = flow_events(&agent.events(), local, server_addr);
    let truth = KernelDeath::from_events(&flow);
    assert!(
        truth.verdict_ns <= died_ns,
        "the kernel's ETIMEDOUT ({}) after the application saw it ({died_ns})",
        truth.verdict_ns
    );
    print_replay_fixture(retries2, user_timeout_ms, &truth, died_ns, t_write, &flow);
    let clamp_ns = if user_timeout_ms.is_some() {
        truth.clamp_allowance_ns()
    } else {
        0
    };
    let bound_ns = truth.prediction_bound_ns() + clamp_ns;
    for (i, &(seen, p)) in predictions.iter().enumerate() {
        let (err_ns, against) = truth.prediction_error(p);
        eprintln!(
            "PREDICTION {i}: seen {:.3} s before death, error {:+.3} ms against {against} (bound \
             {:.3} ms, of it {:.3} ms for the user-timeout clamp, HZ {})",
            truth.verdict_ns.saturating_sub(seen) as f64 / 1e9,
            err_ns as f64 / 1e6,
            bound_ns as f64 / 1e6,
            clamp_ns as f64 / 1e6,
            truth.hz
        );
        assert!(
            err_ns.unsigned_abs() <= u128::from(bound_ns),
            "prediction {i} of {} misses the kernel's ETIMEDOUT by {:+.3} ms (bound {:.3} ms \
             from HZ {} and the observed timer lateness; accepted deaths {:?}, the tcp_retries2 \
             deadline {:?}); expiries: {:#?}",
            predictions.len(),
            err_ns as f64 / 1e6,
            bound_ns as f64 / 1e6,
            truth.hz,
            truth.accepted_deaths_ns(),
            truth.retries_deadline,
            truth.expiries
        );
    }
    let predicted = predictions.last().expect("a prediction").1;
    let error_s = (predicted as f64 - truth.verdict_ns as f64) / 1e9;
    // The first prediction: how far ahead the agent knew.
    let (first_at, first_pred) = predictions[0];
    let first_error_s = (first_pred as f64 - truth.verdict_ns as f64) / 1e9;
    let lead_s = (died_ns - first_at) as f64 / 1e9;
    let near_before_death = views.iter().any(|(_, v)| v["near_horizon"] == true);
    assert!(near_before_death, "near_horizon never raised before death");

    // The agent's own record of this flow's death (by cookie), not a
    // node-wide counter that an earlier test could have moved.
    let cookie = agent
        .cookie_of(local, server_addr)
        .expect("the flow's socket cookie in the agent's event log");
    let timed_out = agent.wait_timeout_of(cookie, Duration::from_secs(3));
    assert_eq!(
        ev_str(&timed_out, "evidence"),
        "etimedout",
        "the flow's death line: {timed_out}"
    );
    let verdict = agent.events().into_iter().any(|e| {
        ev_str(&e, "kind") == "error_report"
            && ev_str(&e, "remote") == server_addr.to_string()
            && ev_u64(&e, "sk_err") == 110
    });
    assert!(verdict, "the flow's ETIMEDOUT verdict was not seen");
    let run = HorizonRun {
        retries2,
        user_timeout_ms,
        boundary_s,
        boundary_source,
        actual_after_write_s: (died_ns - t_write) as f64 / 1e9,
        error_s,
        first_streak,
        near_before_death,
    };
    eprintln!(
        "ACCURACY | {} | {} | {:.1} s | {:.2} s | {:.2} s | {:+.1} ms | {:+.1} ms | {} |",
        run.retries2
            .map(|r| r.to_string())
            .unwrap_or("15 (default)".into()),
        run.user_timeout_ms
            .map(|u| format!("{u} ms"))
            .unwrap_or("-".into()),
        run.boundary_s,
        run.actual_after_write_s,
        lead_s,
        first_error_s * 1e3,
        run.error_s * 1e3,
        run.first_streak,
    );
    run
}

#[test]
fn s1_horizon_retries2_3() {
    let r = horizon_run("h3", 21, Some(3), None);
    assert_eq!(r.boundary_source, "tcp_retries2=3");
    assert!(
        (r.boundary_s - 3.0).abs() < 0.01,
        "T(3) = 3.0 s, got {}",
        r.boundary_s
    );
}

#[test]
fn s1_horizon_retries2_5() {
    let r = horizon_run("h5", 22, Some(5), None);
    assert_eq!(r.boundary_source, "tcp_retries2=5");
    assert!(
        (r.boundary_s - 12.6).abs() < 0.01,
        "T(5) = 12.6 s, got {}",
        r.boundary_s
    );
    assert!(r.near_before_death);
}

#[test]
fn s1_horizon_retries2_8() {
    let r = horizon_run("h8", 23, Some(8), None);
    assert_eq!(r.boundary_source, "tcp_retries2=8");
    assert!(
        (r.boundary_s - 102.2).abs() < 0.01,
        "T(8) = 102.2 s, got {}",
        r.boundary_s
    );
}

/// S2: TCP_USER_TIMEOUT replaces tcp_retries2 (left at its default here).
#[test]
fn s2_user_timeout() {
    let r = horizon_run("uto", 24, None, Some(4000));
    assert_eq!(r.boundary_source, "user_timeout");
    assert!(
        (r.boundary_s - 4.0).abs() < 0.01,
        "UTO 4 s, got {}",
        r.boundary_s
    );
    assert!(
        r.actual_after_write_s < 10.0,
        "UTO must kill long before 924 s"
    );
}

/// S1 that recovers: the peer comes back after four RTOs. The ACK probe
/// (`tp_btf/tcp_probe`) sees the first segment acknowledging the stuck data
/// and the stall clears at once, instead of when the next expected RTO is
/// overdue (several seconds here, minutes at large RTOs).
#[test]
fn s1_recovery_clears_the_stall_at_once() {
    require_tools();
    let link = Link::new("rec", 13);
    let mut agent = Agent::start(&[]);
    let mut conn = Conn::establish(&link, 8080, None);
    let (local, server_addr) = (conn.local, conn.server);
    let blackhole = link.b.blackhole_from(link.a_ip);
    conn.client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");

    // Flagged as a retransmit stall, then kept blocked until the fourth RTO
    // (backoff 3: the next expiry is 1.6 s later, so recovery by staleness
    // would take about 3.2 s + 1 s + 1.6 s of grace).
    agent.wait_stalled_to_backoff(local, server_addr, 3);
    let stalled = agent
        .stall_of(local, server_addr)
        .expect("flagged while the peer is unreachable");
    assert_eq!(ev_str(&stalled, "class"), "retransmit", "{stalled}");
    drop(blackhole);

    // The next RTO retransmission gets through; its ACK is reported.
    let ack = agent.wait_log(Duration::from_secs(15), "the ACK event", |v| {
        v["message"] == "event"
            && ev_str(v, "kind") == "ack"
            && ev_str(v, "local") == local.to_string()
            && ev_str(v, "remote") == server_addr.to_string()
    });
    let ack_ns = ev_u64(&ack, "ts_ns");
    let (una, ack_seq) = (
        ev_u64(&ack, "snd_una") as u32,
        ev_u64(&ack, "ack_seq") as u32,
    );
    assert_eq!(
        ack_seq.wrapping_sub(una),
        1000,
        "the ACK covers exactly the 1000 stuck bytes: {ack}"
    );
    assert!(
        ev_u64(&ack, "retransmits") >= 4,
        "sent during the RTO episode: {ack}"
    );

    // The stall is gone from the API well before the fallback could clear
    // it: the next expected expiry (3.2 s after this retransmission) overdue
    // by its grace (1 s + half the 3.2 s interval) is about 5.8 s after the
    // ACK; the bound leaves a loaded machine 2.5 s for delivery and polling.
    let mut cleared_ns = None;
    while monotonic_ns() < ack_ns + 3_000_000_000 {
        if agent.stall_of(local, server_addr).is_none() {
            cleared_ns = Some(monotonic_ns());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let cleared_ns = cleared_ns.expect("the stall was still reported 3 s after the ACK");
    let after_ack_ms = cleared_ns.saturating_sub(ack_ns) as f64 / 1e6;
    assert!(
        after_ack_ms < 2_500.0,
        "the stall cleared {after_ack_ms:.0} ms after the ACK (staleness, not the ACK probe)"
    );
    // The flow's own record of the outcome (not the node-wide
    // `outcome="recovered"` counter, which any earlier flow can satisfy):
    // after this flow's ACK event (its cookie), the streak to its remote
    // ends as recovered. The observation names the remote, not the socket;
    // this flow is the only one to it in this agent's namespaces.
    let cookie = ev_u64(&ack, "cookie");
    let logs = agent.logs();
    let after_ack = logs
        .iter()
        .position(|v| {
            v["message"] == "event" && ev_u64(v, "cookie") == cookie && v["kind"] == "ack"
        })
        .expect("the ACK event in the log");
    let ended = logs[after_ack..]
        .iter()
        .find(|v| {
            v["message"] == "retransmission stall ended"
                && ev_str(v, "remote") == server_addr.to_string()
        })
        .unwrap_or_else(|| panic!("no end of the flow's stall logged after its ACK"));
    assert_eq!(ev_str(ended, "outcome"), "recovered", "{ended}");
    assert!(
        ev_u64(ended, "rtos") >= 4,
        "ended after the RTO streak: {ended}"
    );

    // And the connection works again.
    conn.client
        .write_all(b"after")
        .expect("write after recovery");
    let logs = agent.stop();
    let summary = logs
        .iter()
        .find(|v| v["message"] == "tcpstall stopped")
        .expect("shutdown summary");
    assert_eq!(summary["dropped"], 0, "ring buffer drops: {summary}");
}

/// S4: the receiver stops reading; the sender runs zero-window probes.
#[test]
fn s4_zero_window() {
    require_tools();
    let link = Link::new("zw", 25);
    let agent = Agent::start(&["--zero-window-after", "3"]);
    let server_addr = SocketAddr::from((link.b_ip, 8080));
    // Never reads; keeps the socket open until the test ends.
    let tx = non_reading_server_in(&link.b, server_addr);
    let client = connect_in(&link.a, server_addr);
    let local = client.local_addr().expect("local addr");
    let t0 = Instant::now();
    fill_send_buffer(&client);
    // Within 15 s of the window closing.
    let view = agent.wait_stall_class(local, server_addr, "zero_window", Duration::from_secs(15));
    assert!(
        t0.elapsed() < Duration::from_secs(13),
        "zero_window reported too late"
    );
    assert!(
        view["predicted_timeout_ns"].is_null(),
        "a live peer's zero window must not predict ETIMEDOUT: {view}"
    );
    assert!(view["seconds_to_timeout"].is_null(), "{view}");
    assert_eq!(view["near_horizon"], false);
    assert!(ev_u64(&view, "zero_window_probes") >= 1, "{view}");
    assert!(
        view["zero_window_s"].as_f64().unwrap_or(0.0) >= 3.0,
        "{view}"
    );
    // Why (issue 21): the peer's application does not read, from the zero
    // window the flow's own probes saw.
    assert_eq!(ev_str(&view, "cause"), "peer_not_reading", "{view}");
    // Keyed by its cookie, although only the write timer (which cannot
    // create one) saw its trouble: the state program gave the socket its
    // cookie when it opened.
    assert_ne!(ev_u64(&view, "cookie"), 0, "no cookie: {view}");
    assert!(
        ev_str(&view["cause_evidence"], "summary").contains("zero window"),
        "{view}"
    );
    let _ = tx.send(());
}

/// S5: the peer closed; the local application never noticed (CLOSE_WAIT).
#[test]
fn s5_close_wait() {
    require_tools();
    let link = Link::new("cw", 26);
    let agent = Agent::start(&["--close-wait-after", "2"]);
    let server_addr = SocketAddr::from((link.b_ip, 8080));
    let listener = listen_in(&link.b, server_addr);
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        drop(s); // the peer (a proxy, say) closes
    });
    let client = connect_in(&link.a, server_addr);
    let local = client.local_addr().expect("local addr");
    server.join().expect("server");
    let view = agent.wait_stall_class(local, server_addr, "close_wait", Duration::from_secs(10));
    assert_eq!(ev_str(&view, "state"), "CLOSE_WAIT");
    assert!(
        view["close_wait_age_s"].as_f64().unwrap_or(0.0) >= 2.0,
        "{view}"
    );
    assert!(view["predicted_timeout_ns"].is_null());
    // Why (issue 21): the local application has not closed its socket.
    assert_eq!(ev_str(&view, "cause"), "app_not_closing", "{view}");
    assert!(
        ev_str(&view["cause_evidence"], "summary").contains("has not closed"),
        "{view}"
    );
    drop(client);
    // Closing the socket ends the stall.
    wait_until(
        Duration::from_secs(5),
        Duration::from_millis(200),
        "close_wait stall outlived the socket",
        || match agent.stall_of(local, server_addr) {
            None => Ok(()),
            Some(view) => Err(view),
        },
    );
}

/// S6: one bad backend among four; the per-remote view names only it.
#[test]
fn s6_one_bad_backend() {
    require_tools();
    let client_ns = Netns::new("tsc-s6");
    let backends: Vec<Netns> = (0..4).map(|i| Netns::new(&format!("tsb-s6-{i}"))).collect();
    let addrs: Vec<(std::net::Ipv4Addr, SocketAddr)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (c_ip, b_ip) = veth_between(&client_ns, b, &format!("s6{i}"), 60 + i as u8);
            (c_ip, SocketAddr::from((b_ip, 9000)))
        })
        .collect();
    let agent = Agent::start(&[]);
    let mut clients = Vec::new();
    for (b, (_, addr)) in backends.iter().zip(&addrs) {
        let listener = listen_in(b, *addr);
        thread::spawn(move || {
            while let Ok((mut s, _)) = listener.accept() {
                thread::spawn(move || drain(&mut s, Duration::from_secs(30)));
            }
        });
        for _ in 0..2 {
            clients.push((connect_in(&client_ns, *addr), *addr));
        }
    }
    let bad = 2;
    let _blackhole = backends[bad].blackhole_from(addrs[bad].0);
    for (c, _) in clients.iter_mut() {
        c.write_all(&[b'q'; 512]).expect("write");
    }
    // Healthy backends keep getting traffic while the bad one stalls.
    let bad_remote = addrs[bad].1.to_string();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(300),
        "the bad backend's 2 flows were not both flagged",
        || {
            for (c, addr) in clients.iter_mut() {
                if addr.to_string() != bad_remote {
                    c.write_all(b"ping").expect("healthy write");
                }
            }
            let stalls: Vec<Value> = agent
                .stalls()
                .into_iter()
                .filter(|s| {
                    addrs
                        .iter()
                        .any(|(_, a)| ev_str(s, "remote") == a.to_string())
                })
                .collect();
            let stalled_bad = stalls
                .iter()
                .filter(|s| ev_str(s, "remote") == bad_remote)
                .count();
            let others: Vec<_> = stalls
                .iter()
                .filter(|s| ev_str(s, "remote") != bad_remote)
                .collect();
            assert!(others.is_empty(), "healthy backends flagged: {others:#?}");
            if stalled_bad == 2 {
                Ok(())
            } else {
                Err(format!("{stalls:#?}"))
            }
        },
    );
    // Per-remote aggregation: only the bad backend has stalled flows / RTOs.
    let (status, body) = agent.http_get("/api/v1/remotes");
    assert_eq!(status, 200, "{body}");
    let remotes: Value = serde_json::from_str(&body).expect("remotes JSON");
    let with_stalls: Vec<String> = remotes["top"]
        .as_array()
        .expect("top")
        .iter()
        .filter(|r| {
            addrs
                .iter()
                .any(|(_, a)| ev_str(r, "remote") == a.to_string())
        })
        .filter(|r| ev_u64(r, "stalled_flows") > 0)
        .map(|r| ev_str(r, "remote").to_owned())
        .collect();
    assert_eq!(with_stalls, vec![bad_remote.clone()], "{remotes:#}");
    let m = agent.metrics();
    assert!(
        metric_sum(
            &m,
            "tcpstall_rto_expirations_total",
            &[("remote", &bad_remote)]
        )
        .unwrap_or(0.0)
            > 0.0
    );
    for (i, (_, a)) in addrs.iter().enumerate() {
        if i != bad {
            let rtos = metric_sum(
                &m,
                "tcpstall_rto_expirations_total",
                &[("remote", &a.to_string())],
            );
            assert!(rtos.unwrap_or(0.0) == 0.0, "healthy backend {a} has RTOs");
        }
    }
    drop(clients);
}

/// S7: a bulk transfer that loses packets but keeps moving is not a stall.
/// Phase 1: 10 s with 1 % random loss (fast retransmits, counted). Phase 2,
/// loss removed: two 150 ms blackouts, each costing exactly one RTO expiry
/// (the tail loss probe, sent after 2 x srtt, is lost in the blackout; the
/// RTO fires at least 200 ms after it, when the path is back, and that
/// retransmission is acknowledged) -- a streak of one, below the default
/// `min_rto_streak` of 2. Asserted from the agent's own record of the flow
/// (its cookie): RTO expiries occurred, and no "stall started" line at all
/// (not a sample every 500 ms) unless the flow really had two consecutive
/// expiries (a lost retransmission under random loss); no error verdict.
/// Mutation: `min_rto_streak: 2` -> `1` in `tcpstall/src/engine/config.rs`
/// (flag after one RTO) -> fails with "lossy but healthy flow flagged".
#[test]
fn s7_lossy_but_healthy() {
    require_tools();
    let link = Link::new("s7", 27);
    let agent = Agent::start(&[]);
    let server_addr = SocketAddr::from((link.b_ip, 8080));
    let server = drain_server_in(&link.b, server_addr, Duration::from_secs(30), None);
    let mut client = connect_in(&link.a, server_addr);
    let local = client.local_addr().expect("local addr");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let chunk = vec![b'b'; 64 * 1024];
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.write_all(&chunk).expect("bulk write");
                sent += chunk.len() as u64;
                thread::sleep(Duration::from_millis(2));
            }
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            sent
        })
    };
    link.b.random_loss(1);
    thread::sleep(Duration::from_secs(10));
    link.b.exec("nft delete table inet tcpstall_loss");
    thread::sleep(Duration::from_secs(1));
    for _ in 0..2 {
        let blackout = link.b.blackhole_from(link.a_ip);
        thread::sleep(Duration::from_millis(150));
        drop(blackout);
        thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = writer.join().expect("writer");
    assert_eq!(server.join().expect("server"), sent, "all data delivered");
    thread::sleep(Duration::from_millis(300));

    let flow = flow_events(&agent.events(), local, server_addr);
    let cookie = flow
        .iter()
        .map(|e| ev_u64(e, "cookie"))
        .find(|&c| c != 0)
        .expect("events of the flow");
    let retrans = flow
        .iter()
        .filter(|e| ev_str(e, "kind") == "retransmit")
        .count();
    assert!(retrans > 0, "1 % loss must cause retransmissions");
    // RTO expiries of this flow (pending = ICSK_TIME_RETRANS), as the agent
    // saw them.
    let rtos: Vec<&Value> = flow
        .iter()
        .filter(|e| ev_str(e, "kind") == "write_timer" && ev_u64(e, "pending") == 1)
        .collect();
    assert!(
        rtos.len() >= 2,
        "the blackouts must cost the flow RTO expiries (one each), saw {}",
        rtos.len()
    );
    // Random loss can, rarely, also drop the retransmission an RTO sent:
    // then the next expiry of that episode has icsk_retransmits >= 1, a
    // real streak of two, and flagging it is right. Any other "stall
    // started" for this flow is a false alarm. The log keeps the agent's
    // order: events and stall lines interleaved as it processed them.
    let logs = agent.logs();
    let mut streak_of_two = false;
    let mut false_alarms = Vec::new();
    for v in &logs {
        if v["message"] == "event"
            && ev_u64(v, "cookie") == cookie
            && ev_str(v, "kind") == "write_timer"
            && ev_u64(v, "pending") == 1
            && ev_u64(v, "retransmits") >= 1
        {
            streak_of_two = true;
        }
        if v["message"] == "stall started" && ev_u64(v, "cookie") == cookie && !streak_of_two {
            false_alarms.push(v.clone());
        }
    }
    assert!(
        false_alarms.is_empty(),
        "lossy but healthy flow flagged as stalled without two consecutive RTO expiries \
         ({} RTO expiries): {false_alarms:#?}",
        rtos.len()
    );
    let single = rtos
        .iter()
        .filter(|e| ev_u64(e, "retransmits") == 0)
        .count();
    assert!(
        single >= 2,
        "each blackout costs one RTO expiry starting an episode (retransmits 0): {rtos:#?}"
    );
    let verdicts: Vec<&Value> = flow
        .iter()
        .filter(|e| ev_str(e, "kind") == "error_report")
        .collect();
    assert!(
        verdicts.is_empty(),
        "lossy flow got an error verdict: {verdicts:#?}"
    );
    eprintln!(
        "S7: sent {sent} bytes, {retrans} retransmissions, {} RTO expiries, no stall",
        rtos.len()
    );
}

/// What the running kernel offers for each write-timer mechanism, found
/// without the agent: vmlinux BTF names, /proc/kallsyms, the kprobe PMU and
/// the cgroup2 mount. Returns the mechanisms (in the plan's order) whose
/// prerequisites are all present, each with the evidence.
fn offered_write_timer_mechanisms() -> Vec<(&'static str, String)> {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    let btf_has = |name: &str| {
        let needle = [b"\0", name.as_bytes(), b"\0"].concat();
        btf.windows(needle.len()).any(|w| w == needle.as_slice())
    };
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").expect("/proc/kallsyms");
    let ksym = |name: &str| {
        kallsyms
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(name))
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let cgroup2 = mountinfo.lines().any(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|t| t.starts_with("cgroup2 "))
    });
    let kprobe_pmu = std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    let handler = "tcp_write_timer_handler";
    let mut out = Vec::new();
    let mut offer = |m: &'static str, ok: bool, why: String| {
        eprintln!("OFFERED {m:<16} {ok} ({why})");
        if ok {
            out.push((m, why));
        }
    };
    // A BPF trampoline on a kernel function: its BTF and ftrace direct calls.
    offer(
        "fentry",
        btf_has(handler) && ksym("register_ftrace_direct") && ksym(handler),
        format!(
            "BTF {handler}: {}, register_ftrace_direct: {}",
            btf_has(handler),
            ksym("register_ftrace_direct")
        ),
    );
    offer(
        "kprobe",
        kprobe_pmu && ksym(handler),
        format!(
            "kprobe PMU: {kprobe_pmu}, {handler} in kallsyms: {}",
            ksym(handler)
        ),
    );
    offer(
        "timer_tracepoint",
        btf_has("btf_trace_timer_expire_entry") && ksym("tcp_write_timer"),
        format!(
            "BTF btf_trace_timer_expire_entry: {}, tcp_write_timer in kallsyms: {}",
            btf_has("btf_trace_timer_expire_entry"),
            ksym("tcp_write_timer")
        ),
    );
    offer("sock_ops", cgroup2, format!("cgroup2 mounted: {cgroup2}"));
    out
}

/// `tcpstall doctor --json`.
fn doctor_json() -> Value {
    let out = run_ok(
        std::process::Command::new(agent_path()).args(["doctor", "--json"]),
        "tcpstall doctor --json",
    );
    serde_json::from_str(&out).expect("doctor JSON")
}

/// The write-timer mechanisms `doctor` reports as working, in plan order.
fn working_write_timer_mechanisms(plan: &Value) -> Vec<String> {
    working_mechanisms(plan, "write_timer")
}

/// The attempts of `probe` in `doctor`'s plan.
fn probe_attempts<'a>(plan: &'a Value, probe: &str) -> &'a Vec<Value> {
    plan["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .find(|p| p["probe"] == probe)
        .unwrap_or_else(|| panic!("{probe} in the plan: {plan}"))["attempts"]
        .as_array()
        .expect("attempts")
}

/// The mechanisms of `probe` that `doctor` reports as working, in plan
/// order.
fn working_mechanisms(plan: &Value, probe: &str) -> Vec<String> {
    probe_attempts(plan, probe)
        .iter()
        .filter(|a| a["error"].is_null() || ev_str(a, "error").starts_with("works"))
        .map(|a| ev_str(a, "mechanism").to_owned())
        .fold(Vec::new(), |mut v: Vec<String>, m| {
            if !v.contains(&m) {
                v.push(m);
            }
            v
        })
}

/// The probe plan, pinned: the set of write-timer mechanisms that attach is
/// exactly the set whose prerequisites this kernel offers (found without the
/// agent, see [`offered_write_timer_mechanisms`]), so a mechanism that
/// silently stops working fails here; the chosen one is the first of them.
/// In the QEMU guests (Debian 6.1 / 6.12) that is all four, fentry chosen.
/// On a host whose security policy refuses tracing programs at load time
/// (this workplace's 6.18 VM: fentry's prerequisites are there, the load is
/// refused with EPERM) fentry must fail exactly that way.
/// Mutation: in `tcpstall/src/kernel/probes.rs` give the kprobe candidate the
/// function `tcp_write_timer_handlerx` -> fails in the guests ("working
/// mechanisms [fentry, timer_tracepoint, sock_ops] != offered [...]").
#[test]
fn probe_plan_prefers_best_available_mechanism() {
    require_root();
    let plan = doctor_json();
    let probes = plan["probes"].as_array().expect("probes");
    for p in probes {
        eprintln!("PLAN {} -> {}", ev_str(p, "probe"), p["chosen"]);
        for a in p["attempts"].as_array().expect("attempts") {
            eprintln!("PLAN     {:<16} {}", ev_str(a, "mechanism"), a["error"]);
        }
    }
    for name in ["retransmit", "state", "write_timer"] {
        let p = probes
            .iter()
            .find(|p| p["probe"] == name)
            .expect("probe in plan");
        assert!(
            !p["chosen"].is_null(),
            "required probe {name} not attached: {p}"
        );
    }
    let wt = probes
        .iter()
        .find(|p| p["probe"] == "write_timer")
        .expect("write_timer");
    let attempts = wt["attempts"].as_array().expect("attempts");
    // A mechanism may have several program variants (tried in order).
    let mut tried: Vec<&str> = attempts.iter().map(|a| ev_str(a, "mechanism")).collect();
    tried.dedup();
    assert_eq!(
        tried,
        ["fentry", "kprobe", "timer_tracepoint", "sock_ops"],
        "every write-timer mechanism is tried, in preference order: {wt}"
    );
    let in_vm = std::env::var_os("TCPSTALL_IN_VM").is_some();
    let mut offered: Vec<&str> = offered_write_timer_mechanisms()
        .iter()
        .map(|(m, _)| *m)
        .collect();
    let fentry = attempts
        .iter()
        .find(|a| a["mechanism"] == "fentry")
        .expect("fentry attempt");
    let refused_by_policy = ev_str(fentry, "error").starts_with("load: ")
        && ev_str(fentry, "error").contains("Operation not permitted");
    if !in_vm && offered.contains(&"fentry") && refused_by_policy {
        eprintln!("fentry: offered by the kernel, refused at load by this host's policy: {fentry}");
        offered.retain(|m| *m != "fentry");
    }
    let working = working_write_timer_mechanisms(&plan);
    assert_eq!(
        working, offered,
        "working mechanisms != offered by this kernel: {wt}"
    );
    assert_eq!(
        ev_str(wt, "chosen"),
        working[0],
        "chosen must be the best working one: {wt}"
    );
    if in_vm {
        assert_eq!(
            working,
            ["fentry", "kprobe", "timer_tracepoint", "sock_ops"],
            "Debian guest kernels offer every write-timer mechanism: {wt}"
        );
    }
    if !offered.contains(&"kprobe") {
        let kp = attempts
            .iter()
            .find(|a| a["mechanism"] == "kprobe")
            .expect("kprobe attempt");
        assert!(
            ev_str(kp, "error").contains("kprobe"),
            "kprobe failure must say why: {kp}"
        );
    }
}

/// S1 (tcp_retries2 = 3) once with every write-timer mechanism `doctor`
/// reports as working, forced with `--mechanism`: the agent attaches exactly
/// that one, sees the flow's RTO expiries through it, flags the stall before
/// the death and records the flow's own ETIMEDOUT (by socket cookie).
/// Mutation: `tcpstall/src/kernel/loader/attach.rs` ignoring the forced mechanism (the plan
/// picks the best) -> fails with "forced sock_ops, attached timer_tracepoint".
#[test]
fn s1_with_every_working_write_timer_mechanism() {
    require_tools();
    let working = working_write_timer_mechanisms(&doctor_json());
    assert!(!working.is_empty(), "no working write-timer mechanism");
    for (i, m) in working.iter().enumerate() {
        eprintln!("S1 with --mechanism {m}");
        let link = Link::new(&format!("mech{i}"), 70 + i as u8);
        link.a.sysctl("net.ipv4.tcp_retries2", "3");
        // The flag takes the kebab-case spelling of doctor's names.
        let mut agent = Agent::start(&["--mechanism", &m.replace('_', "-")]);
        let attached = agent.wait_log(Duration::from_secs(5), "write_timer attach line", |v| {
            v["message"] == "probe attached" && v["probe"] == "write_timer"
        });
        assert_eq!(
            ev_str(&attached, "mechanism"),
            m,
            "forced {m}, attached {}",
            ev_str(&attached, "mechanism")
        );
        let conn = Conn::establish(&link, 8080, None);
        let (local, server) = (conn.local, conn.server);
        let _blackhole = link.b.blackhole_from(link.a_ip);
        let (_, reader) = conn.write_and_await_death(Duration::from_secs(60));
        let (died_ns, errno) = reader.join().expect("reader");
        assert_eq!(errno, Some(libc::ETIMEDOUT), "{m}: ETIMEDOUT expected");
        let flow = flow_events(&agent.events(), local, server);
        let cookie = flow
            .iter()
            .map(|e| ev_u64(e, "cookie"))
            .find(|&c| c != 0)
            .unwrap_or_else(|| panic!("{m}: no event of the flow: {flow:#?}"));
        let timed_out = agent.wait_log(Duration::from_secs(5), "the flow's ETIMEDOUT", |v| {
            v["message"] == "socket timed out (ETIMEDOUT)" && ev_u64(v, "cookie") == cookie
        });
        let started = agent
            .logs()
            .into_iter()
            .find(|v| v["message"] == "stall started" && ev_u64(v, "cookie") == cookie)
            .unwrap_or_else(|| panic!("{m}: the flow was never flagged ({timed_out})"));
        assert_eq!(ev_str(&started, "class"), "retransmit", "{m}: {started}");
        let flow = flow_events(&agent.events(), local, server);
        let timers: Vec<&Value> = flow
            .iter()
            .filter(|e| ev_str(e, "kind") == "write_timer")
            .collect();
        assert!(
            timers.iter().all(|e| ev_str(e, "mechanism") == m),
            "{m}: timer events from another mechanism: {timers:#?}"
        );
        let counts: std::collections::BTreeSet<u64> =
            timers.iter().map(|e| ev_u64(e, "retransmits")).collect();
        assert!(
            counts.len() >= 3
                && timers
                    .iter()
                    .all(|e| ev_u64(e, "ts_ns") <= died_ns + 1_000_000_000),
            "{m}: expected the flow's RTO expiries (>= 3 distinct retransmit counts) before its death: {timers:#?}"
        );
        let summary = agent.stop();
        let summary = summary
            .iter()
            .find(|v| v["message"] == "tcpstall stopped")
            .expect("shutdown summary");
        assert_eq!(summary["dropped"], 0, "{m}: ring buffer drops: {summary}");
    }
}

/// S1 with only the last fallback of every probe, as on a kernel build
/// whose verifier refuses everything else (`--deny-program` for every other
/// candidate doctor lists, `--mechanism sock-ops` for the write timer): the
/// `_plain` programs (no socket pointer passed to any helper, the cookie as
/// the socket holds it) attach, and the agent still flags the stall before
/// the death and records the flow's own ETIMEDOUT.
/// Mutation: `Plain::get` returning 0 (`tcpstall-ebpf/src/snapshot.rs`)
/// -> "the plain retransmit program reported nothing" (its events carry no
/// socket: only sock_ops's reach the flow).
#[test]
fn s1_with_the_last_fallback_of_every_probe() {
    require_tools();
    let plan = doctor_json();
    let mut deny = Vec::new();
    let mut last = std::collections::BTreeMap::new();
    for p in plan["probes"].as_array().expect("probes") {
        let probe = ev_str(p, "probe").to_owned();
        let attempts = p["attempts"].as_array().expect("attempts");
        if probe == "write_timer" {
            continue;
        }
        let (tail, rest) = attempts.split_last().expect("candidates");
        deny.extend(rest.iter().map(|a| ev_str(a, "program").to_owned()));
        last.insert(probe, ev_str(tail, "program").to_owned());
    }
    let deny = deny.join(",");
    eprintln!("LAST FALLBACKS {last:?}; denied {deny}");
    let link = Link::new("plain", 77);
    link.a.sysctl("net.ipv4.tcp_retries2", "3");
    // The guard attaches only with a policy: a dry-run one whose rule
    // matches nothing here, so its last fallback is attached too.
    let scratch =
        Scratch(std::env::temp_dir().join(format!("tcpstall-plain-{}", std::process::id())));
    let policy = scratch.0.join("guard.toml");
    write_file(
        &policy,
        "mode = \"dry-run\"\n\n[[rule]]\nname = \"none\"\nnamespace = \"tcpstall-test-no-such-namespace\"\nuser_timeout = \"30s\"\n",
    );
    let mut agent = Agent::start(&[
        "--deny-program",
        &deny,
        "--mechanism",
        "sock-ops",
        "--guard-policy",
        policy.to_str().expect("UTF-8 path"),
    ]);
    for (probe, program) in &last {
        let attached = agent.wait_log(Duration::from_secs(5), "attach lines", |v| {
            (v["message"] == "probe attached" || v["message"] == PROBE_ON_DEMAND)
                && v["probe"] == probe.as_str()
        });
        assert_eq!(ev_str(&attached, "program"), program, "{attached}");
        assert!(
            program.ends_with("_plain"),
            "{probe}: last fallback {program}"
        );
    }
    let conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let (_, reader) = conn.write_and_await_death(Duration::from_secs(60));
    let (_, errno) = reader.join().expect("reader");
    assert_eq!(errno, Some(libc::ETIMEDOUT));
    let flow = flow_events(&agent.events(), local, server);
    let cookie = flow
        .iter()
        .map(|e| ev_u64(e, "cookie"))
        .find(|&c| c != 0)
        .unwrap_or_else(|| panic!("no event of the flow with a cookie: {flow:#?}"));
    assert!(
        flow.iter().any(|e| ev_str(e, "kind") == "retransmit"),
        "the plain retransmit program reported nothing: {flow:#?}"
    );
    let timed_out = agent.wait_log(Duration::from_secs(5), "the flow's ETIMEDOUT", |v| {
        v["message"] == "socket timed out (ETIMEDOUT)" && ev_u64(v, "cookie") == cookie
    });
    let started = agent
        .logs()
        .into_iter()
        .find(|v| v["message"] == "stall started" && v["remote"] == server.to_string())
        .unwrap_or_else(|| panic!("the flow was never flagged ({timed_out})"));
    assert_eq!(ev_str(&started, "class"), "retransmit", "{started}");
    let summary = agent.stop();
    let summary = summary
        .iter()
        .find(|v| v["message"] == "tcpstall stopped")
        .expect("shutdown summary");
    assert_eq!(summary["dropped"], 0, "ring buffer drops: {summary}");
}

/// Without privileges, and with bad input, the agent exits non-zero with one
/// clear line naming the problem and the fix (no panic, no backtrace).
#[test]
fn bad_privileges_and_input_fail_with_one_clear_line() {
    require_root();
    require(
        std::path::Path::new("/usr/bin/setpriv").exists(),
        "setpriv (to drop privileges)",
        "apt-get install util-linux",
    );
    let run = |args: &[&str], unprivileged: bool| {
        let mut c = if unprivileged {
            let mut c = std::process::Command::new("/usr/bin/setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(agent_path());
            c
        } else {
            std::process::Command::new(agent_path())
        };
        let out = c.args(args).output().expect("run tcpstall");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let one_line = |stderr: &str| {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };

    let (code, err) = run(&["run", "--listen", "127.0.0.1:0"], true);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(
        err.contains("CAP_BPF") && err.contains("run as root"),
        "{err}"
    );

    let (code, err) = run(&["doctor"], true);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(err.contains("sudo tcpstall doctor"), "{err}");

    let dir = std::env::temp_dir().join(format!("tcpstall-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nmax_flowz = 3\n").expect("write");
    let (code, err) = run(&["run", "--config", cfg.to_str().expect("utf8")], false);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(
        err.contains("bad.toml") && err.contains("max_flowz"),
        "{err}"
    );
    let (code, err) = run(&["run", "--config", "/nonexistent/tcpstall.toml"], false);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert_eq!(
        err.matches("No such file").count(),
        1,
        "cause printed once: {err}"
    );
    let (code, err) = run(&["run", "--ringbuf-bytes", "1000"], false);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(err.contains("power of two"), "{err}");
    let (code, err) = run(&["run", "--mechanism", "telepathy"], false);
    assert_eq!(code, Some(2), "clap usage error: {err}");
    assert!(
        err.contains("telepathy") && err.contains("possible values"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Hunt for unseen RTO expiries: 120 blackholed connections in a namespace
/// with `tcp_rto_max_ms = 1000` and `tcp_retries2 = 20` (T = 19.4 s, about
/// 21 expiries each: some 2,500 RTO expiries in 20 s). Every expiry of every
/// socket must produce its write-timer event: the first (`retransmits` 0),
/// each next one (`icsk_retransmits` steps by one from event to event) and
/// the fatal one (the last event's count is the verdict's); the kernel must
/// report no skipped program runs (`missed_runs == 0`), the ring buffer no
/// drops and the agent no malformed record. Each gap is reported with the
/// socket state in the events before and after it (see [`rto_storm`]).
///
/// An ftrace instance of the test's own ([`TraceWitness`]) records the same
/// tracepoints (`timer_expire_entry` for `tcp_write_timer`,
/// `tcp_retransmit_skb` to the server port) from the same tracepoint calls.
/// Each gap is classified by what reached the probes between the two
/// expiries around it:
/// - the agent has a retransmit event there (its timer program alone
///   missed the expiry): the agent's loss, fails;
/// - nothing of the socket reached any probe, by a complete witness record
///   that saw at least every expiry the agent saw on that socket:
///   `icsk_retransmits` moved on without the tracepoints firing for anyone,
///   printed as `KERNEL-SIDE GAPS` and counted, not failed;
/// - the witness saw retransmissions of the socket there that the agent
///   has no event for (the same check covers the first expiries, from the
///   attach to the first expiry seen): fails, unless the kernel's own run count
///   of the agent's retransmit program (the agent runs with
///   `--program-stats`; `program_runs` in its shutdown summary) is below
///   the retransmissions the witness saw for the storm's sockets while the
///   programs were attached, by at least the retransmissions of those gaps:
///   then the kernel did not run the program there (with no recursion miss
///   counted), printed as `RUNS THE KERNEL DID NOT MAKE`, not failed.
///
/// On a fresh machine (a CI run, and a fresh-clone run here) the storm has
/// shown the third kind: all the timers one CPU handled at one jiffy (76 or
/// 120 sockets) missed by both programs, no skip or drop counted, the
/// witness seeing every one.
///
/// Mutations checked: the third kind with the kernel running every program
/// (the 5th expiry's timer and retransmit events of each socket left out of
/// the check) fails with "in between the agent has 0 retransmit events, the
/// witness 1 write-timer expiries and 1 retransmissions ... (the kernel ran
/// the retransmit program 2520 times for 2520 witnessed retransmissions)";
/// the first RTO expiry's timer and retransmit events left out fails with
/// "first expiry(ies) unseen: first event has retransmits 1; before it the
/// agent has 1 retransmit events, the witness 3 write-timer expiries and 2
/// retransmissions ... (the kernel ran the retransmit program 2520 times
/// ...)"; its timer event alone left out fails with "... the agent has 2
/// retransmit events, the witness ... 2 retransmissions".
/// Needs `net.ipv4.tcp_rto_max_ms` (6.15+): run on the host, not in the
/// 6.1/6.12 guests.
/// Measured on 6.18 (host): 2,520 expiries, 0 gaps, 0 missed runs, 0 drops.
/// Mutation checked: one expiry event per flow left out of the check
/// (`timers.remove(timers.len() / 2)` after sorting) fails with the gap
/// report ("retransmits 9 -> 11 (1 unseen); in between the agent has 1
/// retransmit events, the witness 1 write-timer expiries and 1
/// retransmissions").
#[test]
fn rto_expiry_storm_every_expiry_seen() {
    rto_storm("storm", 91, false);
}

/// The storm of [`rto_expiry_storm_every_expiry_seen`] with the agent
/// started while every flow is already inside its RTO episode (the write
/// into the blackhole 1 s before the start): expiries before the programs
/// attach are invisible by design, so each flow's first expiry seen may have
/// any count, but from there on every expiry, the fatal one included, must
/// have its event (no expiry lost to the attach itself or to the first
/// events after it). Host only, like the storm.
/// Mutation checked: as the storm's (one event per flow left out) -> fails
/// with the gap report.
#[test]
fn rto_expiry_storm_agent_started_mid_episode() {
    rto_storm("stormm", 92, true);
}

/// The RTO storm (see [`rto_expiry_storm_every_expiry_seen`]), in named
/// steps: [`StormRun::drive`] makes the flows stall and die with the agent
/// and the witness recording, [`StormCheck::flow`] compares each flow's
/// events with the witness, [`StormCheck::kernel_runs`] weighs unseen
/// retransmissions against the kernel's run count, then the findings are
/// printed ([`StormCheck::report`]) and asserted ([`StormCheck::assert_clean`]).
/// `agent_mid_episode`: start the agent 1 s after the flows entered their
/// RTO episodes instead of before they connect. A gap is reported with the
/// event before and after it (backoff, retransmits, timer_expires, jiffies,
/// mechanism), every event of the socket between them, and whether the
/// before-event's timer was due (`expires <= jiffies`).
fn rto_storm(tag: &str, subnet: u8, agent_mid_episode: bool) {
    let run = StormRun::drive(tag, subnet, agent_mid_episode);
    let mut check = StormCheck::default();
    for local in &run.locals {
        check.flow(&run, *local);
    }
    check.kernel_runs(&run);
    check.report(&run);
    check.assert_clean(&run);
}

/// Flows of the RTO storm.
const STORM_FLOWS: usize = 120;
/// The storm's server port (the witness filters on it).
const STORM_PORT: u16 = 8090;

/// What one RTO storm left to check: the agent's logs and the witness's
/// records.
struct StormRun {
    tag: String,
    agent_mid_episode: bool,
    server: SocketAddr,
    /// Each flow's client address.
    locals: Vec<SocketAddr>,
    /// When the agent's programs were attached and detached (monotonic).
    attached_ns: u64,
    detached_ns: u64,
    summary: Value,
    malformed: Vec<Value>,
    events: Vec<Value>,
    witness: Witnessed,
}

impl StormRun {
    /// Sets the storm up (a link, RTO max 1 s, retries2 20 in the client's
    /// namespace, the witness, the agent with `--program-stats`), stalls
    /// [`STORM_FLOWS`] flows into a blackhole, waits until every one has
    /// died with ETIMEDOUT and the agent logged the last verdict, and stops
    /// the agent.
    fn drive(tag: &str, subnet: u8, agent_mid_episode: bool) -> Self {
        require_tools();
        let link = Link::new(tag, subnet);
        require(
            std::path::Path::new("/proc/sys/net/ipv4/tcp_rto_max_ms").exists(),
            "net.ipv4.tcp_rto_max_ms (Linux 6.15+) for a fast RTO storm",
            "run this test on a 6.15+ kernel (the host), not in the 6.1/6.12 guests",
        );
        link.a.sysctl("net.ipv4.tcp_rto_max_ms", "1000");
        link.a.sysctl("net.ipv4.tcp_retries2", "20");
        // The witness: every TCP write-timer expiry and every retransmission to
        // the server port, as an ftrace instance of the test's own records them
        // from the same tracepoint calls the agent's programs run in.
        let witness = TraceWitness::start(
            &format!("tcpstall-{tag}"),
            &[
                (
                    "timer/timer_expire_entry",
                    kallsyms_addr("tcp_write_timer").map(|a| format!("function == {a:#x}")),
                ),
                (
                    "tcp/tcp_retransmit_skb",
                    Some(format!("dport == {STORM_PORT}")),
                ),
            ],
        );
        // `--program-stats`: the kernel counts each program's runs, which tells
        // whether it ran the agent's programs for what the witness saw.
        const AGENT_ARGS: &[&str] = &["--program-stats"];
        let mut agent = (!agent_mid_episode).then(|| Agent::start(AGENT_ARGS));
        let mut attached_ns = monotonic_ns();
        let server = SocketAddr::from((link.b_ip, STORM_PORT));
        reading_server_in(&link.b, server);
        let mut conns = Vec::new();
        for _ in 0..STORM_FLOWS {
            let mut c = connect_in(&link.a, server);
            c.write_all(b"hello").expect("first write");
            conns.push(c);
        }
        for c in &conns {
            wait_all_acked(c, 5, Duration::from_secs(30));
        }
        let locals: Vec<SocketAddr> = conns
            .iter()
            .map(|c| c.local_addr().expect("local"))
            .collect();
        let blackhole = link.b.blackhole_from(link.a_ip);
        let readers: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                c.write_all(&[b'x'; 1000])
                    .expect("write into the blackhole");
                thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(120)))
                        .expect("timeout");
                    let mut buf = [0u8; 16];
                    c.read(&mut buf).expect_err("read must fail").raw_os_error()
                })
            })
            .collect();
        if agent_mid_episode {
            thread::sleep(Duration::from_secs(1));
            agent = Some(Agent::start(AGENT_ARGS));
            attached_ns = monotonic_ns();
        }
        let mut agent = agent.expect("agent started");
        for r in readers {
            assert_eq!(r.join().expect("reader"), Some(libc::ETIMEDOUT));
        }
        agent.wait_log(Duration::from_secs(30), "the last verdict", |v| {
            v["message"] == "event"
                && ev_str(v, "kind") == "error_report"
                && locals
                    .last()
                    .is_some_and(|l| ev_str(v, "local") == l.to_string())
        });
        drop(blackhole);
        let detached_ns = monotonic_ns();
        let logs = agent.stop();
        let summary = logs
            .iter()
            .find(|v| v["message"] == "tcpstall stopped")
            .expect("shutdown summary")
            .clone();
        let with = |m: &str| -> Vec<Value> {
            logs.iter().filter(|v| v["message"] == m).cloned().collect()
        };
        StormRun {
            tag: tag.to_owned(),
            agent_mid_episode,
            server,
            locals,
            attached_ns,
            detached_ns,
            summary,
            malformed: with("malformed event from the kernel"),
            events: with("event"),
            witness: Witnessed::new(witness.finish()),
        }
    }

    /// The socket's events by cookie, plus those of its 4-tuple without
    /// one (a timer event before any program asked for the cookie), in
    /// time order.
    fn flow(&self, local: SocketAddr) -> Vec<Value> {
        let mut flow = flow_events(&self.events, local, self.server);
        flow.extend(
            self.events
                .iter()
                .filter(|e| {
                    ev_u64(e, "cookie") == 0
                        && ev_str(e, "local") == local.to_string()
                        && ev_str(e, "remote") == self.server.to_string()
                })
                .cloned(),
        );
        flow.sort_by_key(|e| ev_u64(e, "ts_ns"));
        flow
    }
}

/// An unseen stretch the kernel's run count may explain: what, the event
/// before it (if any) and after it.
type Unrun = (String, Option<Value>, Value);

/// The storm's findings, flow by flow, then against the kernel's run count.
#[derive(Default)]
struct StormCheck {
    expiries: usize,
    /// Expiries without an event that nothing explains: the test fails.
    gaps: Vec<String>,
    /// Expiries whose tracepoints reached neither the agent nor the witness.
    blackouts: Vec<String>,
    /// Gaps the witness saw and both of the agent's programs missed: the
    /// agent's loss unless the kernel's run count shows it did not run them.
    unrun: Vec<Unrun>,
    unrun_retransmits: usize,
    /// Sockets where the witness saw fewer expiries than the agent.
    unwitnessed: Vec<String>,
    /// Flows per retransmit count of the first expiry seen.
    first_seen: std::collections::BTreeMap<u64, usize>,
    /// Runs of the retransmit program and witnessed retransmissions while
    /// attached ([`Self::kernel_runs`]).
    runs: usize,
    witnessed: usize,
    unrun_tolerated: bool,
}

/// A gap's report: the event before and after it, whether the before
/// event's timer was due, and every event of the socket in between.
fn gap_report(
    local: SocketAddr,
    flow: &[Value],
    what: &str,
    before: Option<&Value>,
    after: Option<&Value>,
) -> String {
    let (lo, hi) = (
        before.map_or(0, |e| ev_u64(e, "ts_ns")),
        after.map_or(u64::MAX, |e| ev_u64(e, "ts_ns")),
    );
    let between: Vec<String> = flow
        .iter()
        .filter(|e| (lo..=hi).contains(&ev_u64(e, "ts_ns")))
        .map(fmt_event)
        .collect();
    let due = before.map(|e| ev_u64(e, "timer_expires") <= ev_u64(e, "jiffies"));
    format!(
        "{local}: {what}\n  before: {}\n  after:  {}\n  before-event timer due: {due:?}\n  events of the socket from before to after:\n    {}",
        before.map_or("-".into(), fmt_event),
        after.map_or("-".into(), fmt_event),
        between.join("\n    ")
    )
}

impl StormCheck {
    /// One flow: its RTO expiries in order against the witness (the first
    /// expiries before the attach, every step between two expiries, the
    /// fatal expiry against the ETIMEDOUT verdict).
    fn flow(&mut self, run: &StormRun, local: SocketAddr) {
        let witness = &run.witness;
        let flow = run.flow(local);
        let timers: Vec<&Value> = flow
            .iter()
            .filter(|e| ev_str(e, "kind") == "write_timer" && ev_u64(e, "pending") == 1)
            .collect();
        // The agent's retransmit events of this socket in [lo, hi).
        let our_retransmits = |lo: u64, hi: u64| {
            flow.iter()
                .filter(|e| {
                    ev_str(e, "kind") == "retransmit" && (lo..hi).contains(&ev_u64(e, "ts_ns"))
                })
                .count()
        };
        let verdict = flow
            .iter()
            .find(|e| ev_str(e, "kind") == "error_report" && ev_u64(e, "sk_err") == 110);
        let Some(verdict) = verdict else {
            panic!("{local}: no ETIMEDOUT verdict logged")
        };
        self.expiries += timers.len();
        let (Some(first), Some(last)) = (timers.first(), timers.last()) else {
            panic!("{local}: no RTO expiry seen: {flow:#?}")
        };
        *self
            .first_seen
            .entry(ev_u64(first, "retransmits"))
            .or_default() += 1;
        if !run.agent_mid_episode && ev_u64(first, "retransmits") != 0 {
            // From the attach to the first expiry seen: the tail-loss probe's
            // retransmission and those of the unseen expiries.
            let (lo, hi) = (run.attached_ns, ev_u64(first, "ts_ns") - 50_000_000);
            let ours = our_retransmits(lo, hi);
            let seen = witness.in_window(local, lo, hi);
            let what = format!(
                "first expiry(ies) unseen: first event has retransmits {}; before it the agent has {ours} retransmit events, the witness {seen}",
                ev_u64(first, "retransmits")
            );
            let lines = witness.lines_in_window(local, lo, hi);
            if seen.reliable && seen.retransmits > ours {
                self.unrun_retransmits += seen.retransmits - ours;
                self.unrun.push((
                    format!(
                        "{local}: {what}:\n    witness: {}",
                        lines.join("\n    witness: ")
                    ),
                    None,
                    Value::clone(first),
                ));
            } else {
                self.gaps.push(gap_report(
                    local,
                    &flow,
                    &format!("{what}:\n    witness: {}", lines.join("\n    witness: ")),
                    None,
                    Some(first),
                ));
            }
        }
        // The witness clears a gap only for a socket where it saw at least
        // every expiry the agent saw (a witness that sees nothing clears
        // nothing).
        let witness_total = witness.in_window(local, 0, u64::MAX);
        if witness_total.timer_hits < timers.len() {
            self.unwitnessed.push(format!(
                "{local}: {witness_total}, the agent {} expiries",
                timers.len()
            ));
        }
        for w in timers.windows(2) {
            let (a, b) = (ev_u64(w[0], "retransmits"), ev_u64(w[1], "retransmits"));
            if b == a + 1 {
                continue;
            }
            // Between the two expiries' own handling (RTOs here are
            // 200 ms or more apart, an expiry's retransmission follows
            // its timer within microseconds): what reached a probe there.
            let (lo, hi) = (
                ev_u64(w[0], "ts_ns") + 50_000_000,
                ev_u64(w[1], "ts_ns") - 50_000_000,
            );
            let ours = our_retransmits(lo, hi);
            let seen = witness.in_window(local, lo, hi);
            let what = format!(
                "retransmits {a} -> {b} ({} unseen); in between the agent has {ours} retransmit events, the witness {seen}",
                b.saturating_sub(a + 1)
            );
            let lines = witness.lines_in_window(local, lo, hi);
            if ours == 0 && seen.reached_no_probe() && witness_total.timer_hits >= timers.len() {
                self.blackouts.push(format!("{local}: {what}"));
            } else if seen.reliable && seen.retransmits > ours {
                self.unrun_retransmits += seen.retransmits - ours;
                self.unrun.push((
                    format!(
                        "{local}: {what}:\n    witness: {}",
                        lines.join("\n    witness: ")
                    ),
                    Some(Value::clone(w[0])),
                    Value::clone(w[1]),
                ));
            } else {
                self.gaps.push(gap_report(
                    local,
                    &flow,
                    &format!("{what}:\n    witness: {}", lines.join("\n    witness: ")),
                    Some(w[0]),
                    Some(w[1]),
                ));
            }
        }
        // The fatal expiry: the handler gives up before counting it, so
        // the verdict carries the count of the last expiry's event.
        if ev_u64(last, "retransmits") != ev_u64(verdict, "retransmits")
            || ev_u64(verdict, "ts_ns") < ev_u64(last, "ts_ns")
        {
            self.gaps.push(gap_report(
                local,
                &flow,
                "the fatal expiry unseen (last event != verdict)",
                Some(last),
                Some(verdict),
            ));
        }
        assert!(
            timers.len() >= if run.agent_mid_episode { 10 } else { 15 },
            "{local}: only {} expiries seen",
            timers.len()
        );
    }

    /// The kernel's run count of the retransmit program against the
    /// retransmissions of the storm's sockets the witness saw while the
    /// programs were attached (other sockets' retransmissions only add
    /// runs): unseen retransmissions are tolerated only as runs the kernel
    /// did not make; otherwise each is a gap.
    fn kernel_runs(&mut self, run: &StormRun) {
        self.runs = ev_str(&run.summary, "program_runs")
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.starts_with("tcpstall_retransmit"))
            .map(|(_, v)| v.parse::<usize>().unwrap_or(0))
            .sum::<usize>();
        self.witnessed = run
            .witness
            .retransmits_between(run.attached_ns, run.detached_ns);
        let kernel_skipped = self.witnessed.saturating_sub(self.runs);
        self.unrun_tolerated = !self.unrun.is_empty()
            && run.witness.lost.is_none()
            && kernel_skipped >= self.unrun_retransmits;
        if self.unrun.is_empty() {
            return;
        }
        if self.unrun_tolerated {
            eprintln!(
                "RUNS THE KERNEL DID NOT MAKE: the witness saw {} retransmissions of the storm's sockets while the agent's programs were attached, the kernel ran the agent's retransmit program {} times (no recursion miss counted): {kernel_skipped} runs not made, which covers the {} retransmissions of these gaps:\n{}",
                self.witnessed,
                self.runs,
                self.unrun_retransmits,
                self.unrun
                    .iter()
                    .map(|(w, _, _)| w.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        } else {
            for (what, before, after) in &self.unrun {
                self.gaps.push(format!(
                    "{what}\n  (the kernel ran the retransmit program {} times for {} witnessed retransmissions)\n  before: {}\n  after:  {}",
                    self.runs,
                    self.witnessed,
                    before.as_ref().map_or("-".into(), fmt_event),
                    fmt_event(after)
                ));
            }
        }
    }

    /// The storm's summary line on stderr and in the test notes (printed
    /// after `cargo xtask test` whether it passed or not), and the
    /// kernel-side gaps, if any.
    fn report(&self, run: &StormRun) {
        let (runs, witnessed) = (self.runs, self.witnessed);
        let tolerated = if self.unrun_tolerated {
            self.unrun.len()
        } else {
            0
        };
        let summary = &run.summary;
        eprintln!(
            "RTO storm{}: {} flows, {} expiries seen, {} gaps, {} expiries that reached no probe (the witness: {}), {tolerated} gaps in runs the kernel did not make (retransmit program runs {runs}, witnessed retransmissions {witnessed}), first count seen per flow {:?}, malformed {}; summary {summary}",
            if run.agent_mid_episode {
                " (agent started mid-episode)"
            } else {
                ""
            },
            run.locals.len(),
            self.expiries,
            self.gaps.len(),
            self.blackouts.len(),
            run.witness.lost.clone().unwrap_or_else(|| format!(
                "complete, {} sockets where it saw fewer expiries than the agent{}",
                self.unwitnessed.len(),
                if self.unwitnessed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.unwitnessed.join("; "))
                }
            )),
            self.first_seen,
            run.malformed.len(),
        );
        test_note(&format!(
            "{}: {} flows, {} expiries seen, {} gaps failed, {} kernel-side (no probe reached), {tolerated} in runs the kernel did not make; retransmit program runs {runs} for {witnessed} witnessed retransmissions; witness {}; submitted {}, dropped {}, missed_runs {}, timer_not_due {}",
            run.tag,
            run.locals.len(),
            self.expiries,
            self.gaps.len(),
            self.blackouts.len(),
            run.witness.lost.as_deref().unwrap_or("complete"),
            summary["submitted"],
            summary["dropped"],
            summary["missed_runs"],
            summary["timer_not_due"],
        ));
        if !self.blackouts.is_empty() {
            eprintln!(
                "KERNEL-SIDE GAPS: RTO expiries the kernel handled (icsk_retransmits moved on) whose tracepoints reached neither the agent's programs nor the ftrace witness:\n{}",
                self.blackouts.join("\n")
            );
        }
    }

    /// No drop, no missed run, no malformed record, no gap.
    fn assert_clean(&self, run: &StormRun) {
        let summary = &run.summary;
        assert_eq!(summary["dropped"], 0, "ring buffer drops: {summary}");
        assert_eq!(
            summary["missed_runs"], 0,
            "kernel-skipped program runs: {summary}"
        );
        assert!(
            run.malformed.is_empty(),
            "malformed records: {:#?}",
            run.malformed
        );
        if !self.gaps.is_empty() {
            // What else ran on the machine: other agents, other BPF programs.
            eprintln!(
                "processes: {}\nBPF programs loaded: {}",
                sh(
                    "ps -eo pid,etimes,comm,args | grep -E 'tcpstall|bpftrace|podman|conmon' | grep -v grep || true"
                ),
                sh(
                    "bpftool prog list 2>/dev/null | grep -E '^[0-9]+:' | awk '{print $2, $4}' | sort | uniq -c || true"
                ),
            );
        }
        assert!(
            self.gaps.is_empty(),
            "RTO expiries without an event:\n{}",
            self.gaps.join("\n")
        );
    }
}

/// The agent's start-up line names the sweep iterator it loaded: the one
/// `tcpstall doctor` reports for this kernel (the direct-load program, or its
/// probe-read twin where the verifier refuses direct loads), so a test's
/// output (`AGENT sweep program: ...`, also in the QEMU guests' logs) says
/// which one ran.
/// Mutation: the `sweep = ...` field dropped from the `tcpstall running`
/// line (`tcpstall/src/app.rs`) -> fails with "the start-up line does not
/// name the sweep program doctor reports (tcpstall_sweep_direct)".
#[test]
fn startup_line_names_the_sweep_program() {
    require_tools();
    let text = run_ok(
        std::process::Command::new(agent_path()).arg("doctor"),
        "tcpstall doctor",
    );
    let chosen = text
        .lines()
        .find_map(|l| l.strip_prefix("sweep iterator: "))
        .unwrap_or_else(|| panic!("doctor names no sweep iterator:\n{text}"));
    assert!(
        chosen.starts_with("tcpstall_sweep"),
        "doctor: sweep iterator {chosen}"
    );
    let mut agent = Agent::start(&[]);
    let logs = agent.stop();
    let running = logs
        .iter()
        .find(|v| v["message"] == "tcpstall running")
        .expect("the start-up line");
    assert_eq!(
        ev_str(running, "sweep"),
        chosen,
        "the start-up line does not name the sweep program doctor reports ({chosen}): {running}"
    );
}
