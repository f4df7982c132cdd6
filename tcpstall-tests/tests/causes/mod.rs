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
    // Loaded at start-up and attached on demand (a tp_btf program), or
    // attached for good (any other mechanism).
    assert!(
        line["message"] == PROBE_ON_DEMAND || line["message"] == "probe attached",
        "the drop probe (tp_btf/kfree_skb, 5.17+) is not attached on this kernel, so local drops cannot be seen: {line}"
    );
}

/// Polls the API until the flow is listed with `cause` and `check` accepts
/// the entry; returns it and the instant (CLOCK_MONOTONIC ns) the agent
/// computed that listing (`since_ns` + `stalled_for_s`: the agent's clock, so
/// "within two expiries" measures the agent, not how long this poll's HTTP
/// round trip took on a loaded host or under TCG, where expiries kept coming
/// in between).
fn wait_cause(
    agent: &Agent,
    local: SocketAddr,
    remote: SocketAddr,
    cause: &str,
    check: impl Fn(&Value) -> bool,
) -> (Value, u64) {
    let deadline = monotonic_ns() + 20_000_000_000;
    let mut last = None;
    while monotonic_ns() < deadline {
        match agent.stall_of(local, remote) {
            Some(v) if v["cause"] == cause && check(&v) => {
                let listed = listed_at(&v).unwrap_or_else(monotonic_ns);
                return (v, listed);
            }
            other => last = other.or(last),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The flow's own record, for the failure message.
    let events: Vec<String> = agent
        .events()
        .iter()
        .filter(|e| {
            ev_str(e, "local") == local.to_string() || ev_str(e, "remote") == remote.to_string()
        })
        .map(|e| {
            format!(
                "{} ack_seq={} err_soft={}",
                fmt_event(e),
                ev_u64(e, "ack_seq"),
                ev_u64(e, "err_soft")
            )
        })
        .collect();
    panic!(
        "{local} -> {remote} never listed with cause {cause} in 20 s; last listed: {last:?}; its events:\n{}",
        events.join("\n")
    )
}

/// When the agent computed a stall view (CLOCK_MONOTONIC ns).
fn listed_at(v: &Value) -> Option<u64> {
    let since = v["since_ns"].as_u64()?;
    let age = v["stalled_for_s"].as_f64()?;
    Some(since + (age * 1e9).round() as u64)
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

    // The drop probe is attached on demand, when the agent reads the
    // episode's first expiry: that expiry's own drop (in the same
    // tcp_write_timer() run) comes before the attach and is missed; the
    // next expiry's is the first seen. So the first drop recorded follows
    // the first expiry by at most two expiries (one, unless the agent read
    // the first one late).
    let first_expiry = agent
        .events()
        .into_iter()
        .find(|e| ev_u64(e, "cookie") == cookie && ev_str(e, "kind") == "write_timer")
        .unwrap_or_else(|| panic!("no write-timer expiry of socket {cookie} logged: {view}"));
    let n = expiries_between(
        &agent,
        cookie,
        ev_u64(&first_expiry, "ts_ns"),
        ev_u64(&first_drop, "ts_ns"),
    );
    assert!(
        n <= 2,
        "the drop probe saw this socket's first drop {n} expiries after the episode began (attached too late): {view}"
    );
    // Attached while this flow is in its episode, and says so.
    let (status, body) = agent.http_get("/api/v1/plan");
    assert_eq!(status, 200, "{body}");
    let plan: Value = serde_json::from_str(&body).expect("plan JSON");
    let dp = &plan["drop_probe"];
    assert_eq!(
        dp["attached"], true,
        "drop probe not attached during the stall: {dp}"
    );
    assert!(dp["attaches"].as_u64().unwrap_or(0) >= 1, "{dp}");
    assert!(
        agent
            .metrics()
            .lines()
            .any(|l| l == "tcpstall_drop_probe_attached 1"),
        "tcpstall_drop_probe_attached is not 1 during the stall"
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

/// The flow's events (its cookie) from the agent's log, in order.
fn events_of(agent: &Agent, cookie: u64) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| ev_u64(e, "cookie") == cookie)
        .collect()
}

/// unreachable: the peer's side rejects the client's segments with an ICMP
/// error (`reject_with`, in the server's namespace). `tcp_v4_err()` /
/// `tcp_v6_err()` store the soft error in `sk_err_soft` (the RTO backoff is
/// reverted, RFC 6069) and the kernel keeps retransmitting: the flow is
/// listed as a retransmit stall with cause `unreachable` and the errno,
/// within two write-timer expiries of the first event that carried it.
fn unreachable_scenario(
    link: &Link,
    client_ip: std::net::IpAddr,
    server: SocketAddr,
    reject: &str,
) {
    let mut agent = Agent::start(&[]);
    let mut conn = Conn::establish_to(link, server, None);
    let local = conn.local;
    let family = if client_ip.is_ipv4() { "ip" } else { "ip6" };
    let _reject = link
        .b
        .reject_input(&format!("{family} saddr {client_ip}"), reject);
    std::io::Write::write_all(&mut conn.client, &[b'x'; 1000]).expect("write");

    let (view, seen_ns) = wait_cause(&agent, local, server, "unreachable", |v| {
        v["class"] == "retransmit"
    });
    let ev = &view["cause_evidence"];
    assert_eq!(ev["soft_error"], "EHOSTUNREACH", "{view}");
    assert_eq!(ev["circumstantial"], false, "{view}");
    let cookie = ev_u64(&view, "cookie");
    let events = events_of(&agent, cookie);
    let first = events
        .iter()
        .find(|e| ev_u64(e, "err_soft") != 0)
        .unwrap_or_else(|| panic!("no event of socket {cookie} carried sk_err_soft: {view}"));
    assert_eq!(ev_u64(first, "err_soft"), 113, "{first}");
    let n = expiries_between(&agent, cookie, ev_u64(first, "ts_ns"), seen_ns);
    assert!(
        n <= 2,
        "listed as unreachable {n} expiries after the soft error was seen: {view}"
    );
    let _ = agent.stop();
}

#[test]
fn cause_unreachable_icmp_host_unreachable() {
    require_tools();
    let link = Link::new("unr4", 151);
    let server = SocketAddr::from((link.b_ip, 8080));
    unreachable_scenario(
        &link,
        link.a_ip.into(),
        server,
        "icmp type host-unreachable",
    );
}

/// The same over IPv6 (`addr-unreachable` is EHOSTUNREACH in
/// `icmpv6_err_convert()`).
#[test]
fn cause_unreachable_icmpv6_address_unreachable() {
    require_tools();
    let link = Link::new("unr6", 152);
    let (a6, b6) = link_ipv6(&link, "unr6", 152);
    let server = SocketAddr::from((b6, 8080));
    unreachable_scenario(&link, a6.into(), server, "icmpv6 type addr-unreachable");
}

/// reset: a stall ended by an RST (the peer restarted, or a middlebox that
/// lost the connection's state answers with one). Silent first (cause
/// `peer_silent`: no ACK, no ICMP, no local drop), then the peer's side
/// answers the next retransmission with a TCP reset (the reject rule put
/// ahead of the blackhole atomically: no retransmission slips through
/// between the two): `tcp_reset()` sets
/// ECONNRESET and closes the socket. The agent logs the stall's end by reset
/// with the cause it had, and the flow is already gone from the API when
/// that line is logged (the close and the reset are one event).
#[test]
fn cause_reset_ends_a_silent_stall() {
    require_tools();
    let link = Link::new("rst", 153);
    let mut agent = Agent::start(&[]);
    require_drop_probe(&agent);
    let mut conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _silent = link.b.blackhole_from(link.a_ip);
    std::io::Write::write_all(&mut conn.client, &[b'x'; 1000]).expect("write");
    let (view, _) = wait_cause(&agent, local, server, "peer_silent", |v| {
        v["class"] == "retransmit"
    });
    let ev = &view["cause_evidence"];
    assert_eq!(ev["circumstantial"], true, "{view}");
    assert!(
        ev["local_drops"].is_null() && ev["soft_error"].is_null(),
        "{view}"
    );
    let cookie = ev_u64(&view, "cookie");
    // The reset rule goes ahead of the blackhole in one change: removing
    // the blackhole first let a retransmission through (and acknowledged)
    // before the reset rule was in, in the 6.1 guest.
    let _reset = link
        .b
        .reject_input_first(&format!("ip saddr {}", link.a_ip), "tcp reset");
    // The RST answers the next retransmission: at most the socket's current
    // (backed-off) RTO away, which under TCG can exceed any fixed wait.
    let rto_ms = agent
        .stall_of(local, server)
        .map_or(view["rto_ms"].as_u64().unwrap_or(0), |v| {
            v["rto_ms"].as_u64().unwrap_or(0)
        });
    let wait = Duration::from_millis(rto_ms) + Duration::from_secs(20);
    let deadline = monotonic_ns() + wait.as_nanos() as u64;
    let close = loop {
        let found = agent.events().into_iter().find(|v| {
            ev_u64(v, "cookie") == cookie
                && ev_str(v, "kind") == "state"
                && ev_str(v, "state") == "CLOSE"
        });
        if let Some(v) = found {
            break v;
        }
        if monotonic_ns() > deadline {
            let events: Vec<String> = agent
                .events()
                .iter()
                .filter(|e| {
                    ev_u64(e, "cookie") == cookie
                        || ev_str(e, "local") == local.to_string()
                        || ev_str(e, "remote") == server.to_string()
                })
                .map(|e| format!("{} cookie={} {e}", fmt_event(e), ev_u64(e, "cookie")))
                .collect();
            panic!(
                "no CLOSE of socket {cookie} within {wait:?} of the reset rule; still listed: {:?}; its events:\n{}",
                agent.stall_of(local, server),
                events.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        ev_u64(&close, "sk_err"),
        104,
        "closed without ECONNRESET: {close}"
    );
    // Events are logged as read, observations after the batch is folded
    // in: the reset line follows the CLOSE event's line.
    let line = agent.wait_log(Duration::from_secs(5), "the stall's end by reset", |v| {
        v["message"] == "stall ended by a reset (RST)" && ev_u64(v, "cookie") == cookie
    });
    assert_eq!(ev_str(&line, "cause"), "peer_silent", "{line}");
    assert_eq!(ev_str(&line, "class"), "retransmit", "{line}");
    assert_eq!(ev_u64(&line, "errno"), 104, "{line}");
    assert!(
        agent.stall_of(local, server).is_none(),
        "the reset flow is still listed"
    );
    let mut buf = [0u8; 8];
    let err = std::io::Read::read(&mut conn.client, &mut buf).expect_err("read after RST");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "{err}");
}

/// A connection through a path-MTU black hole: packets from the client
/// longer than 1200 bytes vanish in the server's namespace (no ICMP), with
/// `net.ipv4.tcp_mtu_probing` = `probing` in the client's namespace. The
/// client's device sends one MSS per packet (`gso_max_segs 1`: what a NIC's
/// segmentation puts on the wire), so the path sees real segment sizes. The
/// client writes five full segments and a small tail: the tail gets through
/// and the server SACKs it, the full-size head is lost on every
/// retransmission. Returns the agent, the connection and the flow as first
/// listed with cause `pmtu_blackhole` (asserted: within two write-timer
/// expiries of the first event that showed the SACK).
fn pmtu_scenario(tag: &str, subnet: u8, probing: &str) -> (Agent, Link, Conn, Value, u32, u64) {
    let link = Link::new(tag, subnet);
    link.a.sysctl("net.ipv4.tcp_mtu_probing", probing);
    link.a
        .exec(&format!("ip link set dev va-{tag} gso_max_segs 1"));
    // No drop probe needed: the MSS change and the SACKs are decided before
    // the silence that only drop tracing can tell from a local drop.
    let agent = Agent::start(&[]);
    let mut conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let mss = tcp_info(&conn.client).tcpi_snd_mss;
    assert!(
        mss + 52 > 1200,
        "the path's MSS {mss} already fits the black hole: no scenario"
    );
    let hole = link.b.drop_larger_from(link.a_ip, 1200);
    std::mem::forget(hole); // removed with the namespace
    let total = 5 * mss as usize + 200;
    std::io::Write::write_all(&mut conn.client, &vec![b'x'; total]).expect("write");

    let (view, seen_ns) = wait_cause(&agent, local, server, "pmtu_blackhole", |v| {
        v["class"] == "retransmit"
    });
    let cookie = ev_u64(&view, "cookie");
    let first = events_of(&agent, cookie)
        .into_iter()
        .find(|e| ev_u64(e, "sacked_out") != 0)
        .unwrap_or_else(|| panic!("no event of socket {cookie} showed a SACK: {view}"));
    let n = expiries_between(&agent, cookie, ev_u64(&first, "ts_ns"), seen_ns);
    assert!(
        n <= 2,
        "listed as pmtu_blackhole {n} expiries after the SACK was seen: {view}"
    );
    (agent, link, conn, view, mss, total as u64)
}

/// pmtu_blackhole with `tcp_mtu_probing` 0: the kernel never lowers the
/// MSS, the stall cannot recover; the cause rests on the SACKs of the small
/// tail (circumstantial, and the API says so), with the MSS in use.
#[test]
fn cause_pmtu_blackhole_without_mtu_probing() {
    require_tools();
    let (_agent, _link, _conn, view, mss, _) = pmtu_scenario("pmtu0", 154, "0");
    let ev = &view["cause_evidence"];
    assert_eq!(ev["circumstantial"], true, "{view}");
    assert!(ev["sacked_out"].as_u64().unwrap_or(0) >= 1, "{view}");
    assert_eq!(ev["mss"].as_u64(), Some(mss.into()), "{view}");
    assert!(ev["mss_lowered"].is_null(), "{view}");
    assert!(ev["local_drops"].is_null(), "{view}");
}

/// pmtu_blackhole with `tcp_mtu_probing` 1: after `tcp_retries1` timeouts
/// `tcp_mtu_probing()` enables probing and lowers the MSS to
/// `tcp_base_mss`; the next retransmission fits through the hole and the
/// flow recovers. The stall's end carries the kernel's evidence (the MSS
/// lowered, from the MSS in use to one whose packets fit), and every byte
/// reaches the server.
#[test]
fn cause_pmtu_blackhole_with_mtu_probing_lowers_the_mss() {
    require_tools();
    let (mut agent, _link, conn, view, mss, total) = pmtu_scenario("pmtu1", 155, "1");
    let cookie = ev_u64(&view, "cookie");
    let end = agent.wait_log(Duration::from_secs(20), "the stall's end", |v| {
        v["message"] == "retransmission stall ended" && ev_u64(v, "cookie") == cookie
    });
    assert_eq!(ev_str(&end, "outcome"), "recovered", "{end}");
    assert_eq!(ev_u64(&end, "mss_from"), u64::from(mss), "{end}");
    let to = ev_u64(&end, "mss_to");
    assert!(
        to > 0 && to + 52 <= 1200,
        "the MSS was not lowered to fit the black hole: {end}"
    );
    // 5 bytes of the first exchange, then the whole write.
    wait_all_acked(&conn.client, 5 + total, Duration::from_secs(10));
}
