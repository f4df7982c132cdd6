//! The other ways the kernel gives up on a connection after ESTABLISHED:
//! an orphaned socket (closed by its application) retransmitting its data
//! and FIN to a blackholed peer (`tcp_orphan_retries`, its 0 = 8 "alive"
//! rule against `rto_max`), and the zero-window probe path (a peer that
//! stops reading: TCP_USER_TIMEOUT kills, nothing else does). Included by
//! `scenarios.rs` so the same tests run on the host and, by name
//! (`orphan::...`), in the QEMU guests.

use std::{io::Write, net::SocketAddr, thread, time::Duration};

use serde_json::Value;
use tcpstall_tests::*;

/// The accuracy the issue asks for: max(1 s, 5 % of the stall's duration).
fn bound_ns(duration_ns: u64) -> u64 {
    (duration_ns / 20).max(1_000_000_000)
}

/// Every distinct prediction the API showed, with when it was first seen.
fn predictions(views: &[(u64, Value)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (t, v) in views {
        if let Some(p) = v["predicted_timeout_ns"].as_u64()
            && out.last().is_none_or(|&(_, q)| q != p)
        {
            out.push((*t, p));
        }
    }
    out
}

/// Checks every prediction against the real end (`end_ns`) and prints the
/// README accuracy row.
fn check_predictions(name: &str, views: &[(u64, Value)], start_ns: u64, end_ns: u64) {
    let preds = predictions(views);
    let last = &views.last().expect("views").1;
    assert!(!preds.is_empty(), "{name}: no prediction: {last}");
    let bound = bound_ns(end_ns - start_ns);
    for (i, &(seen, p)) in preds.iter().enumerate() {
        let err = p as i128 - end_ns as i128;
        eprintln!(
            "{name} prediction {i}: seen {:.2} s before the end, error {:+.1} ms (bound {:.0} ms)",
            (end_ns - seen) as f64 / 1e9,
            err as f64 / 1e6,
            bound as f64 / 1e6
        );
        assert!(
            err.unsigned_abs() <= u128::from(bound),
            "{name}: prediction {i} ({p}) misses the real end ({end_ns}) by {:+.1} ms \
             (bound {:.0} ms); views: {:#?}",
            err as f64 / 1e6,
            bound as f64 / 1e6,
            views.iter().map(|(_, v)| v).collect::<Vec<_>>()
        );
    }
    let (first_seen, first_p) = preds[0];
    let last_p = preds.last().expect("a prediction").1;
    eprintln!(
        "ACCURACY-ORPHAN | {name} | {} | {:.1} s | {:.1} s | {:+.0} ms | {:+.0} ms |",
        ev_str(last, "boundary_source"),
        (end_ns - start_ns) as f64 / 1e9,
        (end_ns - first_seen) as f64 / 1e9,
        (first_p as f64 - end_ns as f64) / 1e6,
        (last_p as f64 - end_ns as f64) / 1e6,
    );
}

/// The kernel's end of the socket: its state event to CLOSE (the
/// `inet_sock_set_state` tracepoint's time), by cookie.
fn close_event_ns(agent: &Agent, cookie: u64) -> Option<u64> {
    agent
        .events()
        .iter()
        .filter(|e| {
            ev_str(e, "kind") == "state"
                && ev_u64(e, "cookie") == cookie
                && ev_str(e, "state") == "CLOSE"
        })
        .map(|e| ev_u64(e, "ts_ns"))
        .min()
}

/// An established connection whose peer is then blackholed; the client
/// writes 1000 bytes and close()s at once: the socket is orphaned in
/// FIN_WAIT1 with data and FIN unacknowledged, and the kernel retransmits
/// them under `tcp_orphan_retries` (set in the client's namespace; with
/// `rto_max_ms`, `tcp_rto_max_ms` too, before the socket exists). Checks:
/// listed while orphaned (class `retransmit`, `orphan`, FIN_WAIT1), the
/// boundary source, every prediction within max(1 s, 5 %) of the kernel's
/// CLOSE, and the socket gone from `ss` after it.
fn orphan_run(tag: &str, subnet: u8, orphan_retries: u32, rto_max_ms: Option<u32>, source: &str) {
    require_tools();
    let link = Link::new(tag, subnet);
    link.a
        .sysctl("net.ipv4.tcp_orphan_retries", &orphan_retries.to_string());
    if let Some(ms) = rto_max_ms {
        let has = link
            .a
            .exec("test -e /proc/sys/net/ipv4/tcp_rto_max_ms && echo yes || true");
        assert_eq!(
            has.trim(),
            "yes",
            "{tag}: this scenario needs net.ipv4.tcp_rto_max_ms (kernel 6.15+); \
             run it only where the kernel has it"
        );
        link.a.sysctl("net.ipv4.tcp_rto_max_ms", &ms.to_string());
    }
    let agent = Agent::start(&[]);
    let conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let mut client = conn.client;
    let t_write = monotonic_ns();
    client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    drop(client);
    let mut views: Vec<(u64, Value)> = Vec::new();
    let mut cookie = None;
    // The same flow in the per-flow series and in `tcpstall top`, checked
    // once while it is listed with a prediction.
    let mut series: Option<(f64, String)> = None;
    let end_ns = loop {
        let now = monotonic_ns();
        if let Some(v) = agent.stall_of(local, server) {
            if series.is_none() && v["seconds_to_timeout"].is_number() {
                series = orphan_series(&agent, local, server);
            }
            views.push((now, v));
        }
        cookie = cookie.or_else(|| agent.cookie_of(local, server));
        if let Some(end) = cookie.and_then(|c| close_event_ns(&agent, c)) {
            break end;
        }
        assert!(
            now - t_write < 120_000_000_000,
            "{tag}: the orphan did not die within 120 s; views: {views:#?}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    views.retain(|(t, _)| *t < end_ns);
    // The socket's recording, a replay fixture (`cargo xtask
    // record-fixtures`): its events and the kernel's end (the state change
    // to CLOSE; an orphan gets no error report).
    let flow = super::flow_events(&agent.events(), local, server);
    let header = serde_json::json!({
        "end": "close",
        "end_kernel_ns": end_ns,
        "end_app_ns": null,
        "start_ns": t_write,
        "hz": super::flow_hz(&flow),
        "tcp_orphan_retries": orphan_retries,
        "tcp_rto_max_ms": rto_max_ms,
    });
    let fixture = format!("orphan-retries-{orphan_retries}{}", {
        rto_max_ms.map_or(String::new(), |m| format!("-rto-max-{m}"))
    });
    super::print_fixture(&fixture, header, &flow);
    let name = format!("orphan tcp_orphan_retries={orphan_retries}{}", {
        rto_max_ms.map_or(String::new(), |m| format!(" tcp_rto_max_ms={m}"))
    });
    assert!(
        !views.is_empty(),
        "{name}: never listed in /api/v1/stalls before the kernel closed it"
    );
    for (_, v) in &views {
        assert_eq!(ev_str(v, "class"), "retransmit", "{name}: {v}");
        assert_eq!(v["orphan"], true, "{name}: {v}");
        assert_eq!(ev_str(v, "state"), "FIN_WAIT1", "{name}: {v}");
    }
    let last = &views.last().expect("views").1;
    assert_eq!(ev_str(last, "boundary_source"), source, "{name}: {last}");
    check_predictions(&name, &views, t_write, end_ns);
    let (to_timeout, row) =
        series.unwrap_or_else(|| panic!("{name}: never in the per-flow series and `top`"));
    assert!(to_timeout > -1.0, "{name}: {to_timeout}");
    assert!(
        row.contains("retransmit") && row.starts_with("T-"),
        "{name}: top row: {row}"
    );
    // The kernel really destroyed it (an orphan gets no error report).
    let ss = link
        .a
        .exec(&format!("ss -tanH src {local} dst {server} || true"));
    assert!(
        ss.trim().is_empty(),
        "{name}: the socket is still listed after its CLOSE: {ss}"
    );
}

/// The flow's `tcpstall_socket_seconds_to_timeout` on /metrics and its row
/// in `tcpstall top --once` (None while either is missing).
fn orphan_series(agent: &Agent, local: SocketAddr, remote: SocketAddr) -> Option<(f64, String)> {
    let (l, r) = (local.to_string(), remote.to_string());
    let secs = metric_sum(
        &agent.metrics(),
        "tcpstall_socket_seconds_to_timeout",
        &[("local", l.as_str()), ("remote", r.as_str())],
    )?;
    let out = std::process::Command::new(agent_path())
        .args([
            "top",
            "--once",
            "--agent",
            &format!("http://{}", agent.listen),
        ])
        .output()
        .expect("run tcpstall top --once");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = table.lines().find(|line| line.contains(&l))?.to_owned();
    Some((secs, row))
}

/// `tcp_orphan_retries` 3: T(3) = 3.0 s from the first retransmission,
/// about 6.2 s after the write.
#[test]
fn orphan_fin_retries_3() {
    orphan_run("or3", 171, 3, None, "tcp_orphan_retries=3");
}

/// `tcp_orphan_retries` 0 (the default) with `tcp_rto_max_ms` 1000: 0
/// means 8 while the RTO is below rto_max ("alive"); at the expiry whose
/// RTO reached 1 s, 0 means 0 and the socket dies (about 2.4 s after the
/// write, where 8 would give 7.6 s). Needs `tcp_rto_max_ms` (6.15+): host
/// only (not in the guests' VM_TESTS).
#[test]
fn orphan_retries_0_dies_when_rto_reaches_rto_max() {
    orphan_run("or0", 172, 0, Some(1_000), "tcp_orphan_retries=0");
}

/// A receiver that never reads: the client fills its send buffer, the
/// window closes and the client probes. With TCP_USER_TIMEOUT (and, where
/// the kernel has it, a per-socket TCP_RTO_MAX_MS of 1 s) the kernel kills
/// it at the first probe + UTO: listed as `zero_window`, boundary
/// `user_timeout`, predicted within max(1 s, 5 %) of the ETIMEDOUT read()
/// returns. Without a user timeout: no prediction, and the reason.
fn zero_window_run(tag: &str, subnet: u8, user_timeout_ms: Option<u32>) {
    require_tools();
    let link = Link::new(tag, subnet);
    let mut agent = Agent::start(&["--zero-window-after", "1"]);
    let server = SocketAddr::from((link.b_ip, 8080));
    // Never reads; keeps the socket open until the test ends.
    let tx = non_reading_server_in(&link.b, server);
    let client = connect_in(&link.a, server);
    let local = client.local_addr().expect("local addr");
    let per_socket_rto_max = set_rto_max_ms(&client, 1_000);
    if let Some(ms) = user_timeout_ms {
        set_user_timeout(&client, ms);
    }
    let name = format!(
        "zero window UTO {} rto_max {}",
        user_timeout_ms.map_or("-".to_owned(), |m| format!("{m} ms")),
        if per_socket_rto_max {
            "1000 ms (TCP_RTO_MAX_MS)"
        } else {
            "default (no TCP_RTO_MAX_MS on this kernel)"
        }
    );
    let t_fill = monotonic_ns();
    fill_send_buffer(&client);
    let Some(uto) = user_timeout_ms else {
        let view = agent.wait_stall_class(local, server, "zero_window", Duration::from_secs(15));
        // A few more probes (at most 1 s apart with rto_max 1 s).
        thread::sleep(Duration::from_secs(3));
        let view = agent.stall_of(local, server).unwrap_or(view);
        assert_eq!(ev_str(&view, "class"), "zero_window", "{name}: {view}");
        assert!(
            view["predicted_timeout_ns"].is_null(),
            "{name}: a live peer keeps a zero window forever without a user timeout: {view}"
        );
        assert_eq!(
            ev_str(&view, "no_prediction_reason"),
            "zero_window_without_user_timeout",
            "{name}: {view}"
        );
        let _ = tx.send(());
        return;
    };
    let death = await_read_error(client.try_clone().expect("clone"), Duration::from_secs(120));
    let mut views = agent.views_until(local, server, &death, Duration::from_millis(50));
    let (end_ns, errno) = death.join().expect("reader");
    let _ = tx.send(());
    assert_eq!(
        errno,
        Some(libc::ETIMEDOUT),
        "{name}: the user timeout must kill the zero-window sender"
    );
    views.retain(|(t, _)| *t < end_ns);
    // The socket's recording, a replay fixture (`cargo xtask
    // record-fixtures`): its events and the kernel's end (the ETIMEDOUT
    // error report) with the instant the blocked read() returned.
    super::await_etimedout_report(&mut agent, local, server);
    let flow = super::flow_events(&agent.events(), local, server);
    let header = serde_json::json!({
        "end": "read",
        "end_kernel_ns": super::etimedout_report_ns(&flow),
        "end_app_ns": end_ns,
        "start_ns": t_fill,
        "hz": super::flow_hz(&flow),
        "user_timeout_ms": uto,
        "tcp_rto_max_ms_socket": per_socket_rto_max.then_some(1_000),
    });
    super::print_fixture(&format!("zero-window-user-timeout-{uto}"), header, &flow);
    assert!(
        views
            .iter()
            .any(|(_, v)| ev_str(v, "class") == "zero_window"),
        "{name}: never listed as zero_window: {views:#?}"
    );
    let predicted: Vec<(u64, Value)> = views
        .into_iter()
        .filter(|(_, v)| !v["predicted_timeout_ns"].is_null())
        .collect();
    assert!(!predicted.is_empty(), "{name}: no prediction");
    for (_, v) in &predicted {
        assert_eq!(ev_str(v, "boundary_source"), "user_timeout", "{name}: {v}");
    }
    // The death comes UTO after the first probe, which follows the fill.
    assert!(
        end_ns - t_fill >= u64::from(uto) * 1_000_000,
        "{name}: died before the user timeout"
    );
    check_predictions(&name, &predicted, t_fill, end_ns);
}

#[test]
fn zero_window_user_timeout_dies() {
    zero_window_run("zwu", 173, Some(5_000));
}

#[test]
fn zero_window_without_user_timeout_probes_forever() {
    zero_window_run("zwn", 174, None);
}

/// One orphaned FIN_WAIT2 case of [`fin_wait2_timeouts`].
struct FinWait2Case {
    name: &'static str,
    /// The replay fixture's scenario (`fin-wait2-...`).
    fixture: &'static str,
    /// TCP_LINGER2 in seconds (None: the namespace's tcp_fin_timeout).
    linger2: Option<u32>,
    source: &'static str,
    local: SocketAddr,
    closed_ns: u64,
    /// The instant `ss` in the namespace first no longer listed it.
    gone_ns: Option<u64>,
    views: Vec<(u64, Value)>,
}

/// Orphaned FIN_WAIT2 connections (class `fin_wait2`, issue 20 item 3):
/// four connections from namespace `a` (`tcp_fin_timeout` 5 s) to a server
/// in `b` that accepts and never closes (no FIN ever comes back):
/// - `tcp_fin_timeout`: the client close()s (an orphan; its FIN ACKed);
/// - `TCP_LINGER2` 3 s set on the client socket before its close();
/// - `TCP_LINGER2` 63 s: above 60 s the keepalive timer runs `tmo` - 60 s
///   first, then the timewait socket as long again (6 s in all), predicted
///   from the change to FIN_WAIT2;
/// - a control whose peer closes right after the client: never listed.
///
/// `ss -tan` in the namespace is polled every 20 ms until each orphan is
/// gone (the real end). Asserts: listed within `fin_wait2_after` (1 s) + 1 s
/// of the close, as class `fin_wait2`, orphan, with the boundary source;
/// every prediction within max(1 s, 5 %) of the real end; the control
/// never listed. Prints the README accuracy rows.
///
/// Mutation: `engine/fin_wait2/mod.rs` `boundary_source` always
/// `Linger2` -> fails with `left: "tcp_linger2=5", right:
/// "tcp_fin_timeout=5"`.
#[test]
fn fin_wait2_timeouts() {
    require_tools();
    let link = Link::new("ofw", 64);
    link.a.sysctl("net.ipv4.tcp_fin_timeout", "5");
    let agent = Agent::start(&[]);
    let server = SocketAddr::from((link.b_ip, 8084));
    let listener = listen_in(&link.b, server);
    let open = || {
        let client = connect_in(&link.a, server);
        let (accepted, _) = listener.accept().expect("accept");
        (client.local_addr().expect("local"), client, accepted)
    };
    let (l_ft, c_ft, _a_ft) = open();
    let (l_lg, c_lg, _a_lg) = open();
    let (l_long, c_long, _a_long) = open();
    let (l_ctl, c_ctl, a_ctl) = open();
    set_tcp_linger2(&c_lg, 3);
    // Above 60 s: the keepalive timer runs 3 s on the full socket, then the
    // timewait socket 3 s more; listed and predicted from the change to
    // FIN_WAIT2 (listed within 2 s of the close: from the timewait start
    // it would be 4 s).
    set_tcp_linger2(&c_long, 63);
    let mut cases = [
        FinWait2Case {
            name: "fin_wait2 tcp_fin_timeout 5",
            fixture: "fin-wait2-fin-timeout-5",
            linger2: None,
            source: "tcp_fin_timeout=5",
            local: l_ft,
            closed_ns: monotonic_ns(),
            gone_ns: None,
            views: Vec::new(),
        },
        FinWait2Case {
            name: "fin_wait2 TCP_LINGER2 3",
            fixture: "fin-wait2-linger2-3",
            linger2: Some(3),
            source: "tcp_linger2=3",
            local: l_lg,
            closed_ns: 0,
            gone_ns: None,
            views: Vec::new(),
        },
        FinWait2Case {
            name: "fin_wait2 TCP_LINGER2 63 (keepalive timer first)",
            fixture: "fin-wait2-linger2-63",
            linger2: Some(63),
            source: "tcp_linger2=63",
            local: l_long,
            closed_ns: 0,
            gone_ns: None,
            views: Vec::new(),
        },
    ];
    drop(c_ft);
    cases[1].closed_ns = monotonic_ns();
    drop(c_lg);
    cases[2].closed_ns = monotonic_ns();
    drop(c_long);
    drop(c_ctl);
    drop(a_ctl);
    let t0 = monotonic_ns();
    let mut control_views = Vec::new();
    while cases.iter().any(|c| c.gone_ns.is_none()) {
        let ss = link.a.exec(&format!("ss -tanH dst {server} || true"));
        let now = monotonic_ns();
        let stalls = agent.stalls();
        for c in cases.iter_mut().filter(|c| c.gone_ns.is_none()) {
            if !ss.contains(&c.local.to_string()) {
                c.gone_ns = Some(now);
                continue;
            }
            if let Some(v) = stalls.iter().find(|s| {
                ev_str(s, "local") == c.local.to_string()
                    && ev_str(s, "remote") == server.to_string()
            }) {
                c.views.push((now, v.clone()));
            }
        }
        control_views.extend(
            stalls
                .iter()
                .filter(|s| ev_str(s, "local") == l_ctl.to_string())
                .cloned(),
        );
        assert!(
            now - t0 < 30_000_000_000,
            "an orphan still in `ss` 30 s after its close: {ss}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        control_views.is_empty(),
        "the control (its peer closed) was listed: {control_views:#?}"
    );
    for c in &cases {
        let end = c.gone_ns.expect("gone");
        let name = c.name;
        // The agent's log lines of this orphan (its port), for a failure.
        let its_events = || -> Vec<Value> {
            let port = c.local.port().to_string();
            agent
                .logs()
                .into_iter()
                .filter(|e| e.to_string().contains(&port))
                .collect()
        };
        let first = c.views.first().unwrap_or_else(|| {
            panic!(
                "{name}: never listed before its end ({:.2} s after the close); its events: {:#?}",
                (end - c.closed_ns) as f64 / 1e9,
                its_events()
            )
        });
        let listed_after = first.0 - c.closed_ns;
        // The one excuse for a later listing: the change to FIN_WAIT2 never
        // reached the agent (absent from its event log). Seen once in 22
        // runs in a TCG guest (Debian 7.3.4): the client's state events
        // all missing while the peer's, the keepalive timer's and the
        // timewait's came. Likeliest cause: the kernel skips a program's
        // run when it is already running on that CPU (bpf recursion_misses:
        // a softirq processing the ACK while the state program ran for
        // another socket), which the agent logs (`skipped` below). Then an orphan
        // above 60 s is seen from its keepalive timer's run (`tmo` - 60 s
        // later: the engine backdates the wait to the change, under the
        // socket's limit) or, if that is lost too, its timewait start
        // (under the timewait's own limit). An engine that ignores the
        // change it did receive still fails here.
        let entry_seen = agent.events().iter().any(|e| {
            ev_str(e, "kind") == "state"
                && ev_str(e, "state") == "FIN_WAIT2"
                && ev_str(e, "local") == c.local.to_string()
        });
        let skipped = agent.logs().iter().any(|l| {
            ev_str(l, "message").starts_with("the kernel skipped runs of tcpstall programs")
        });
        let handover_ns = c
            .linger2
            .filter(|&l| l > 60)
            .map_or(0, |l| u64::from(l - 60) * 1_000_000_000);
        let late_ok = !entry_seen && listed_after <= 2_000_000_000 + handover_ns;
        assert!(
            listed_after <= 2_000_000_000 || late_ok,
            "{name}: listed {:.2} s after the close (fin_wait2_after 1 s + 1 s; its change to FIN_WAIT2 seen: {entry_seen}; kernel skipped a run: {skipped}); first view {:#}; its events: {:#?}",
            listed_after as f64 / 1e9,
            first.1,
            its_events()
        );
        // Late: the socket's limit (recovered from the keepalive timer's
        // run) or the timewait's own (`tmo` - 60 s).
        let sources = if listed_after > 2_000_000_000 {
            test_note(&format!(
                "{name}: listed {:.2} s after the close, from the timewait start: its change to FIN_WAIT2 never reached the agent (kernel skipped a run: {skipped})",
                listed_after as f64 / 1e9
            ));
            vec![
                c.source.to_owned(),
                format!("tcp_linger2={}", c.linger2.unwrap_or(0).saturating_sub(60)),
            ]
        } else {
            vec![c.source.to_owned()]
        };
        for (_, v) in &c.views {
            assert_eq!(ev_str(v, "class"), "fin_wait2", "{name}: {v}");
            // The peer ACKed the close and never sends its FIN: the
            // remote's application, not this node or the path.
            assert_eq!(ev_str(v, "cause"), "peer_not_closing", "{name}: {v}");
            assert!(
                sources.iter().any(|s| s == ev_str(v, "boundary_source")),
                "{name}: boundary_source {:?}, expected one of {sources:?}: {v}",
                ev_str(v, "boundary_source")
            );
            assert_eq!(v["orphan"], true, "{name}: {v}");
        }
        check_predictions(name, &c.views, c.closed_ns, end);
    }
    // Each orphan's recording, a replay fixture (`cargo xtask
    // record-fixtures`): its events (the full socket's and its timewait
    // socket's, one cookie) and the kernel's end, the timewait timer's
    // expiry in the FIN_WAIT2 substate.
    let events = agent.events();
    for c in &cases {
        let flow = super::flow_events(&events, c.local, server);
        let end_ns = flow
            .iter()
            .filter(|e| ev_str(e, "kind") == "tw_timer_expire" && ev_str(e, "state") == "FIN_WAIT2")
            .map(|e| ev_u64(e, "ts_ns"))
            .min()
            .unwrap_or_else(|| panic!("{}: no timewait expiry in FIN_WAIT2: {flow:#?}", c.name));
        let header = serde_json::json!({
            "end": "tw_expire",
            "end_kernel_ns": end_ns,
            "end_app_ns": null,
            "start_ns": c.closed_ns,
            "hz": super::flow_hz(&flow),
            "tcp_fin_timeout": 5,
            "tcp_linger2": c.linger2,
        });
        super::print_fixture(c.fixture, header, &flow);
    }
}
