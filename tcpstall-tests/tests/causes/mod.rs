//! Why it stalls: one scenario per cause, each asserting on its own flow
//! (listed with the right cause and the kernel's evidence), never on a
//! node-wide total. Included by `scenarios.rs`.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tcpstall_tests::*;

/// The drop probe (`tp_btf/kfree_skb` with the drop reason, 5.17+) is
/// attached: every kernel CI runs on has it; without it local drops are
/// invisible and this test's assertions cannot hold.
fn require_drop_probe(agent: &Agent) {
    let line = agent
        .logs()
        .into_iter()
        .find(|v| v["probe"] == "drop")
        .expect("the agent logged no line about its drop probe");
    assert_eq!(
        line["message"], "probe attached",
        "the drop probe (tp_btf/kfree_skb, 5.17+) is not attached on this kernel, so local drops cannot be seen: {line}"
    );
}

/// Polls the API until the flow is listed with `cause` and `check` accepts
/// the entry; returns it and the instant (CLOCK_MONOTONIC ns) it was seen.
fn wait_cause(
    agent: &Agent,
    local: SocketAddr,
    remote: SocketAddr,
    cause: &str,
    check: impl Fn(&Value) -> bool,
) -> (Value, u64) {
    let v = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        &format!("{local} -> {remote} never listed with cause {cause}"),
        || match agent.stall_of(local, remote) {
            Some(v) if v["cause"] == cause && check(&v) => Ok(v),
            other => Err(format!("{other:?}")),
        },
    );
    (v, monotonic_ns())
}

/// The flow's write-timer expiries the agent logged strictly between `from`
/// and `to` (kernel timestamps).
fn expiries_between(agent: &Agent, cookie: u64, from: u64, to: u64) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| {
            ev_u64(e, "cookie") == cookie
                && ev_str(e, "kind") == "write_timer"
                && (from + 1..to).contains(&ev_u64(e, "ts_ns"))
        })
        .count()
}

/// local_drop: an nftables drop in the client's own output chain (what an
/// egress NetworkPolicy or a host firewall change does to an established
/// connection). The data never leaves: `tcp_write_xmit()` stops at the
/// failed transmit, and the write timer probes with it (window open,
/// nothing in flight), backing off and counting `icsk_probes_out` up to
/// `tcp_retries2` like retransmissions. The flow is listed as a retransmit
/// stall with cause `local_drop`, the kernel's drop reason and count for
/// its own packets (within two expiries of the first drop the agent
/// recorded), and a prediction that matches the kernel's ETIMEDOUT.
#[test]
fn cause_local_drop_in_the_clients_output_chain() {
    require_tools();
    let link = Link::new("ldrop", 150);
    link.a.sysctl("net.ipv4.tcp_retries2", "4");
    let mut agent = Agent::start(&[]);
    require_drop_probe(&agent);
    let conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _drop = link.a.drop_output_to(link.b_ip);
    let (_t_write, reader) = conn.write_and_await_death(Duration::from_secs(60));

    let (view, seen_ns) = wait_cause(&agent, local, server, "local_drop", |v| {
        v["cause_evidence"]["local_drops"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(ev_str(&view, "class"), "retransmit", "{view}");
    let ev = &view["cause_evidence"];
    assert_eq!(ev["drop_reason"], "NETFILTER_DROP", "{view}");
    assert_eq!(ev["circumstantial"], false, "{view}");
    assert!(
        view["predicted_timeout_ns"].as_u64().is_some(),
        "listed without its horizon: {view}"
    );
    assert_eq!(view["boundary_source"], "tcp_retries2=4", "{view}");

    // Within two expiries of the evidence: the agent's first drop record of
    // this socket, then at most two more write-timer expiries before the
    // API showed it.
    let cookie = ev_u64(&view, "cookie");
    let first_drop = agent
        .events()
        .into_iter()
        .find(|e| ev_u64(e, "cookie") == cookie && ev_str(e, "kind") == "drop")
        .unwrap_or_else(|| panic!("no drop event of socket {cookie} logged: {view}"));
    let n = expiries_between(&agent, cookie, ev_u64(&first_drop, "ts_ns"), seen_ns);
    assert!(
        n <= 2,
        "listed with its drop evidence {n} expiries after the first drop: {view}"
    );

    // The horizon: the kernel kills it at the predicted expiry.
    let (_, errno) = reader.join().expect("reader");
    assert_eq!(errno, Some(libc::ETIMEDOUT), "the socket did not time out");
    let line = agent.wait_timeout_of(cookie, Duration::from_secs(10));
    let err = line["prediction_error_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("the death had no prediction: {line}"));
    test_note(&format!("local_drop: prediction error {err:.3} s"));
    assert!(
        err.abs() < 0.1,
        "predicted ETIMEDOUT off by {err:.3} s: {line}"
    );
}
