//! Privileged behaviour tests through the real agent and the real kernel
//! programs: IPv6 end to end, stall clearing (zero window reopened, no ACK
//! probe), the flow-table cap, and a clean detach on SIGTERM. Run by
//! `cargo xtask test` as root with `--test-threads=1`.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::SocketAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpstall_tests::*;

/// S1 over IPv6 (tcp_retries2 = 3, which also governs IPv6): the kernel
/// programs report the v6 flow's retransmissions and RTO expiries, the agent
/// flags it with a prediction, and records its ETIMEDOUT by cookie.
/// Mutation (run): `tcpstall/src/kernel/event.rs` `addr()` decoding a v6 socket's
/// address as v4 (`None => IpAddr::V6(v6)` -> `None =>
/// IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))`) -> fails with
/// "no event of the IPv6 flow [fd00:201:80::1]:44990 -> [fd00:201:80::2]:8080".
#[test]
fn ipv6_s1_events_stall_and_prediction() {
    require_tools();
    let link = Link::new("v6", 80);
    let (a6, b6) = link_ipv6(&link, "v6", 80);
    link.a.sysctl("net.ipv4.tcp_retries2", "3");
    let mut agent = Agent::start(&[]);
    let server = SocketAddr::from((b6, 8080));
    reading_server_in(&link.b, server);
    let mut client = connect_in(&link.a, server);
    let local = client.local_addr().expect("local");
    assert!(local.is_ipv6(), "{local}");
    client.write_all(b"hello").expect("first write");
    wait_all_acked(&client, 5, Duration::from_secs(10));
    let _blackhole = blackhole6_from(&link.b, a6);
    client.write_all(&[b'x'; 1000]).expect("write");
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut flagged = None;
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let e = client.read(&mut buf).expect_err("read must fail");
        (monotonic_ns(), e.raw_os_error())
    });
    while !reader.is_finished() {
        if flagged.is_none()
            && let Some(v) = agent.stall_of(local, server)
        {
            flagged = Some((monotonic_ns(), v));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (died_ns, errno) = reader.join().expect("reader");
    assert_eq!(errno, Some(libc::ETIMEDOUT));
    let cookie = agent
        .cookie_of(local, server)
        .unwrap_or_else(|| panic!("no event of the IPv6 flow {local} -> {server}"));
    // The reader may see ETIMEDOUT before the agent has drained the ring
    // (it polls every few ms): wait for the flow's error report line.
    agent.wait_log(
        Duration::from_secs(10),
        "the IPv6 flow's error_report event",
        |v| v["message"] == "event" && v["kind"] == "error_report" && ev_u64(v, "cookie") == cookie,
    );
    let events: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| ev_u64(e, "cookie") == cookie)
        .collect();
    let kinds: BTreeSet<&str> = events.iter().map(|e| ev_str(e, "kind")).collect();
    for k in ["retransmit", "write_timer", "error_report"] {
        assert!(
            kinds.contains(k),
            "no {k} event of the IPv6 flow: {events:#?}"
        );
    }
    assert!(
        events
            .iter()
            .filter(|e| ev_str(e, "kind") == "retransmit")
            .all(|e| ev_str(e, "remote") == server.to_string()),
        "v6 addresses in every retransmit event: {events:#?}"
    );
    let (seen_ns, view) = flagged.expect("the IPv6 stall never appeared in /api/v1/stalls");
    assert!(seen_ns < died_ns);
    assert_eq!(ev_str(&view, "class"), "retransmit", "{view}");
    assert_eq!(ev_str(&view, "boundary_source"), "tcp_retries2=3", "{view}");
    assert!(
        view["predicted_timeout_ns"].is_u64(),
        "a prediction for the IPv6 flow: {view}"
    );
    let timed_out = agent.wait_timeout_of(cookie, Duration::from_secs(5));
    assert_eq!(
        ev_str(&timed_out, "remote"),
        server.to_string(),
        "{timed_out}"
    );
}

/// S4 then recovery: the receiver stops reading until the sender's window is
/// zero and the agent reports a `zero_window` stall; then it reads
/// everything again and the stall clears while the flow keeps going.
///
/// The clearing path: no kernel event reports a window reopening (the ACK
/// program reports only ACKs inside an RTO episode), so the persist episode
/// ends when its next zero-window probe is overdue by the grace (`classify`
/// and `tick`). The engine's other ways to end an episode are kept out: a
/// retransmission of the flow (tail loss probes off in the client's
/// namespace, `tcp_early_retrans = 0`, and a 64 KiB send buffer so no burst
/// overflows the veth backlog; RACK off and a high reordering threshold;
/// a run where the kernel still retransmits, after a real loss on the veth,
/// says so and does not assert the path) and the FIN acknowledged
/// (FIN_WAIT2; the writer keeps writing until the stall cleared).
/// Mutation (run): `p.next_due_ns = u64::MAX / 2;` for the next-probe
/// instant in `Engine::on_probe` (`tcpstall/src/engine/handlers.rs`) ->
/// fails with "zero_window stall still reported 10.5 s after the reader
/// resumed (probing for 2.0 s before)". Before these changes that mutation
/// did not fail it: fast retransmissions after the resume (a 30 MB window
/// burst) or the writer's FIN 3 s later ended the episode instead. Run
/// again with the small writes after the resume: fails the same way
/// (with the 64 KiB write loop it passed, a loss's retransmission ending
/// the episode at 10.1 s).
///
/// What ended the episode, in every run (a run where the kernel
/// retransmitted included): one "zero-window episode ended" line for the
/// flow (its peer and its view's cookie), between the resume and the view clearing, by the window
/// reopening (`quiet`, or `window_opened`: a probe that found the window
/// open), or by one of the flow's own retransmissions or RTO expiries when
/// the kernel retransmitted. Mutation: `return;` as the first line of
/// `Sink::persist_ended` (`tcpstall/src/engine/sink.rs`; ended, never
/// logged) -> see docs/testing.md.
#[test]
fn zero_window_stall_clears_when_the_reader_resumes() {
    require_tools();
    let link = Link::new("zwr", 81);
    link.a.sysctl("net.ipv4.tcp_early_retrans", "0");
    // A veth pair reorders: the sender transmits both from the writer's CPU
    // and from ACK processing on the other CPU, each into its own CPU's
    // backlog. RACK (and three SACKed segments past a hole) then fast-
    // retransmits a segment that was only late (a CI run saw one, ca_state
    // Recovery, right after the window reopened). With RACK off and a
    // reordering threshold above what a 128 KiB send buffer can hold in
    // flight (about 90 segments), only a real loss retransmits.
    link.a.sysctl("net.ipv4.tcp_recovery", "0");
    link.a.sysctl("net.ipv4.tcp_reordering", "300");
    // Each episode's end logged (debug) with what ended it.
    let mut agent = Agent::start(&[
        "--zero-window-after",
        "2",
        "--log-level",
        "info,tcpstall::app::logs=debug",
    ]);
    let server_addr = SocketAddr::from((link.b_ip, 8080));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // Not reading until told.
    let server = drain_server_in(&link.b, server_addr, Duration::from_secs(30), Some(rx));
    let mut client = connect_in(&link.a, server_addr);
    let local = client.local_addr().expect("local addr");
    // A small send buffer keeps every burst (the one when the window opens
    // included) far below the veth backlog: no loss, so no retransmission.
    let sndbuf: libc::c_int = 64 * 1024;
    // SAFETY: valid fd and option buffer.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&client),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&sndbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
    let mut sent = fill_send_buffer(&client);
    // Within 20 s of the window closing.
    let view = agent.wait_stall_class(local, server_addr, "zero_window", Duration::from_secs(20));
    // Taken before the reader is told: nothing of the resume precedes it.
    let resumed_ns = monotonic_ns();
    tx.send(()).expect("resume the reader");
    let resumed = Instant::now();
    // The persist interval doubles per probe: the next one is due within
    // the probing time so far plus two RTOs (< 1 s) of the resume, and the
    // engine's grace is 1 s plus half that interval. 5 s of slack on top.
    let probing_s = view["zero_window_s"].as_f64().unwrap_or(0.0);
    let bound = Duration::from_secs_f64(1.0 + 1.5 * (probing_s + 1.0) + 5.0);
    // Small writes: the flow keeps going without bursts (a continuous 64 KiB
    // write loop lost whole GSO packets on the veth, and the retransmission
    // then ended the episode before the path under test could).
    let chunk = [b'z'; 4096];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = thread::spawn({
        let stop = stop.clone();
        move || {
            // Keep the flow moving until the stall cleared (its FIN, acknowledged,
            // would end the episode too), then finish.
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                client.write_all(&chunk).expect("write after resume");
                sent += chunk.len() as u64;
                thread::sleep(Duration::from_millis(50));
            }
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            sent
        }
    });
    loop {
        if agent
            .stall_of(local, server_addr)
            .is_none_or(|v| ev_str(&v, "class") != "zero_window")
        {
            break;
        }
        assert!(
            resumed.elapsed() < bound,
            "zero_window stall still reported {:.1} s after the reader resumed \
             (probing for {probing_s:.1} s before)",
            bound.as_secs_f64()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let cleared_ns = monotonic_ns();
    assert!(
        !writer.is_finished(),
        "the stall cleared while the flow kept going"
    );
    eprintln!(
        "zero window cleared {:.2} s after the reader resumed (bound {:.1} s)",
        resumed.elapsed().as_secs_f64(),
        bound.as_secs_f64()
    );
    // In every run, the episode's end is logged for this flow, once, after
    // the resume, by what the kernel did: a probe that found the window
    // open, or the probes going quiet, else (only in a run where the kernel
    // retransmitted) that retransmission, RTO expiry or ACK, at one of the
    // flow's own events. The view leaves `zero_window` as soon as the next
    // probe is overdue (`classify` at the request's instant); the quiet end
    // is recorded by the engine's next tick, up to a tick later: the writer
    // keeps going until then (its FIN, acknowledged, would end the episode
    // as `fin_acked` first; a run did).
    // The flow: its peer (this test's own namespace and port: one flow)
    // and the cookie of its zero_window view (0 when the engine keyed it
    // by socket address: no event of it carried a cookie).
    let cookie = ev_u64(&view, "cookie");
    let is_end = |v: &Value| {
        v["message"] == "zero-window episode ended"
            && ev_str(v, "remote") == server_addr.to_string()
            && ev_u64(v, "cookie") == cookie
    };
    let end = agent.wait_log(
        Duration::from_secs(10),
        "the zero-window episode's end logged",
        is_end,
    );
    let logged_ns = monotonic_ns();
    assert!(
        !writer.is_finished(),
        "the flow kept going until the episode's end was logged"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let other_path: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| {
            ev_str(e, "local") == local.to_string()
                && (resumed_ns..=logged_ns).contains(&ev_u64(e, "ts_ns"))
                && (ev_str(e, "kind") == "retransmit"
                    || (ev_str(e, "kind") == "write_timer" && ev_u64(e, "pending") == 1))
        })
        .collect();
    // The path under test is the persist episode going quiet (or a probe
    // finding the window open). A real loss below TCP on the veth (a CI
    // run lost one 45-segment GSO packet right after the window reopened:
    // TCPSackRecovery 1, no reordering, no TCP drop counter in either
    // namespace) makes the kernel retransmit, and a retransmission
    // legitimately ends the episode too: then the end must be at one of
    // those events.
    let ends = agent.logs().into_iter().filter(is_end).count();
    assert_eq!(
        ends, 1,
        "one zero-window episode of the flow, ended once: {end}"
    );
    let (by, at_ns) = (ev_str(&end, "by").to_owned(), ev_u64(&end, "at_ns"));
    assert!(
        (resumed_ns..=logged_ns).contains(&at_ns),
        "ended at {at_ns}, not between the resume ({resumed_ns}) and its log line \
         ({logged_ns}; the view cleared at {cleared_ns}): {end}"
    );
    match by.as_str() {
        "quiet" | "window_opened" => {}
        "retransmit" | "rto_expiry" => assert!(
            other_path.iter().any(|e| ev_u64(e, "ts_ns") == at_ns),
            "ended by {by} at {at_ns}, yet no retransmission or RTO of the flow then: \
             {other_path:#?}"
        ),
        // An ACK ends it only inside an RTO episode.
        "ack" => assert!(
            !other_path.is_empty(),
            "ended by an ACK at {at_ns} without a retransmission or RTO of the flow"
        ),
        _ => panic!("the zero-window episode ended by {by}, not by the window reopening: {end}"),
    }
    if other_path.is_empty() {
        eprintln!("cleared by the window reopening ({by}; no retransmission or RTO)");
    } else {
        eprintln!(
            "the kernel retransmitted after the resume ({} events; a loss on the veth), \
             so this run does not show which path cleared the stall\n\
             client namespace counters:\n{}server namespace counters:\n{}",
            other_path.len(),
            loss_counters(&link.a),
            loss_counters(&link.b)
        );
    }
    let sent = writer.join().expect("writer");
    assert_eq!(server.join().expect("server"), sent, "all data delivered");
    assert!(
        agent.stall_of(local, server_addr).is_none(),
        "the flow is not stalled after the transfer"
    );
}

/// A namespace's non-zero TCP counters that tell a loss from reordering
/// (failure messages only).
fn loss_counters(ns: &Netns) -> String {
    ns.exec(
        "nstat -as 2>/dev/null | grep -E 'Reorder|Drop|Retrans|Loss|Recover|Prune|Backlog' || true",
    )
}

/// S1 that recovers with `--no-ack-probe`: no ACK program is attached, so
/// the stall clears by the fallback -- the next expected RTO expiry is
/// overdue (interval plus grace) -- within a bound derived from the RTO
/// schedule, instead of staying flagged forever.
/// Mutation: `return u64::MAX;` as the first line of `Engine::grace_ns`
/// (`tcpstall/src/engine/streak.rs`) -> fails with "still stalled".
#[test]
fn no_ack_probe_stall_clears_by_the_fallback() {
    require_tools();
    let link = Link::new("nap", 82);
    let mut agent = Agent::start(&["--no-ack-probe"]);
    assert!(
        !agent
            .logs()
            .iter()
            .any(|v| v["message"] == "probe attached" && v["probe"] == "ack"),
        "--no-ack-probe must not attach the ACK probe"
    );
    let mut conn = Conn::establish(&link, 8080, None);
    let (local, server_addr) = (conn.local, conn.server);
    let blackhole = link.b.blackhole_from(link.a_ip);
    conn.client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    // Let the RTO back off (the expiry that finds backoff 2 is the third,
    // about 1.4 s in), then lift the blackhole.
    agent.wait_stalled_to_backoff(local, server_addr, 2);
    let view = agent
        .stall_of(local, server_addr)
        .expect("stalled at the lift");
    drop(blackhole);
    let lifted = Instant::now();
    assert!(
        !agent.events().iter().any(|e| ev_str(e, "kind") == "ack"),
        "no ACK events without the ACK probe"
    );
    // The bound from the RTO schedule, r the view's RTO at the lift (the
    // armed one, or half of it when the last event preceded the doubling):
    // the next expiry (<= 2r away) is acknowledged; the engine expects one
    // more an interval (<= 4r) later and calls the streak stale after that
    // plus the grace (1 s + half the interval), read at its next 1 s tick;
    // 2 s of slack for the polls. CI once needed 15.0 s here with r = 1.6 s
    // and a fixed 15 s bound.
    let r = Duration::from_millis(ev_u64(&view, "rto_ms"));
    assert!(!r.is_zero(), "no RTO in the stall view: {view}");
    let bound = 2 * r + 4 * r + Duration::from_secs(1) + 2 * r + Duration::from_secs(3);
    while agent.stall_of(local, server_addr).is_some() {
        assert!(
            lifted.elapsed() < bound,
            "still stalled {bound:?} after the peer came back (no fallback clearing)"
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "cleared by the fallback {:.2} s after the blackhole was lifted (bound {bound:?}, RTO at the lift {r:?})",
        lifted.elapsed().as_secs_f64()
    );
    conn.client
        .write_all(b"after")
        .expect("write after recovery");
}

/// `--max-flows 4` through the real agent: twelve tracked flows (peer
/// closed, held in CLOSE_WAIT, which the engine tracks) one after another;
/// the table never holds more than 4, and the least recently used go:
/// `/api/v1/stalls` (close_wait after 1 s) lists the newest socket and none
/// of the first eight, and each of the first eight has its eviction logged
/// (this test's flows, by namespace and address) and counted.
/// Mutation: `self.head[ACTIVE]` -> `self.tail[ACTIVE]` in
/// `FlowTable::victim` (`tcpstall/src/engine/flow.rs`, evict the newest) ->
/// fails with "the last four CLOSE_WAIT sockets" (lists the first ones).
/// Mutation (run): `evicted.filter(|(_, f)| !f.is_active())` in
/// `FlowKeyed::insert` (`tcpstall/src/engine/flow_key.rs`: active flows'
/// evictions neither counted nor logged) -> fails with "no eviction of
/// [the eight sockets] (evicted of this test: {})"; the node-wide counter
/// alone passed on a busy host (other flows' evictions).
#[test]
fn max_flows_evicts_the_least_recently_used() {
    require_tools();
    let ns = Netns::new("tsm-mxf");
    // Each eviction logged (debug) with the flow's namespace and addresses.
    let agent = Agent::start(&[
        "--max-flows",
        "4",
        "--close-wait-after",
        "1",
        "--log-level",
        "info,tcpstall::app::logs=debug",
    ]);
    let server: SocketAddr = "127.0.0.1:9191".parse().expect("addr");
    let listener = listen_in(&ns, server);
    thread::spawn(move || {
        for s in listener.incoming() {
            drop(s); // the peer closes at once
        }
    });
    let mut held = Vec::new();
    for _ in 0..12 {
        let c = connect_in(&ns, server);
        let local = c.local_addr().expect("local");
        held.push(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.events().iter().any(|e| {
            ev_str(e, "kind") == "state"
                && ev_str(e, "state") == "CLOSE_WAIT"
                && ev_str(e, "local") == local.to_string()
        }) {
            assert!(Instant::now() < deadline, "no CLOSE_WAIT event for {local}");
            thread::sleep(Duration::from_millis(20));
        }
    }
    // No HTTP request to the agent until the listing: each one leaves a
    // CLOSE_WAIT flow of its own (the agent's side) in the table.
    thread::sleep(Duration::from_millis(1500));
    let locals: Vec<String> = held
        .iter()
        .map(|c| c.local_addr().expect("local").to_string())
        .collect();
    let listed: BTreeSet<String> = agent
        .stalls()
        .into_iter()
        .filter(|s| ev_str(s, "remote") == server.to_string() && ev_u64(s, "netns") == ns.inode())
        .map(|s| ev_str(&s, "local").to_owned())
        .collect();
    // The agent sees the whole host: another flow (outside this test) may
    // hold a slot too, so the newest socket must be listed and nothing but
    // the last four may be.
    let last_four: BTreeSet<String> = locals[8..].iter().cloned().collect();
    assert!(
        listed.is_subset(&last_four) && listed.contains(&locals[11]),
        "the last four CLOSE_WAIT sockets stay tracked (the newest at least), the first \
         eight were evicted: listed {listed:?}, last four {last_four:?}"
    );
    let m = agent.metrics();
    let tracked = metric_sum(&m, "tcpstall_flows_tracked", &[]).expect("tcpstall_flows_tracked");
    assert!(tracked <= 4.0, "{tracked} flows tracked with --max-flows 4");
    // This test's evictions, by flow: each of the first eight CLOSE_WAIT
    // sockets was evicted (and logged as such), and the node-wide counter
    // counts at least those.
    let evicted_ours: BTreeSet<String> = agent
        .logs()
        .iter()
        .filter(|v| {
            v["message"] == "flow table full: evicted a flow"
                && ev_u64(v, "netns") == ns.inode()
                && ev_str(v, "remote") == server.to_string()
        })
        .map(|v| ev_str(v, "local").to_owned())
        .collect();
    let missing: Vec<&String> = locals[..8]
        .iter()
        .filter(|l| !evicted_ours.contains(*l))
        .collect();
    assert!(
        missing.is_empty(),
        "12 flows through a table of 4: the first eight are evicted; no eviction of \
         {missing:?} (evicted of this test: {evicted_ours:?})"
    );
    let evictions = metric_sum(&m, "tcpstall_flow_evictions_total", &[])
        .expect("tcpstall_flow_evictions_total");
    assert!(
        evictions >= evicted_ours.len() as f64,
        "tcpstall_flow_evictions_total {evictions}, this test's flows alone: {}",
        evicted_ours.len()
    );
    drop(held);
}

/// The ids of loaded BPF programs named `tcpstall*`.
fn tcpstall_prog_ids() -> BTreeSet<u64> {
    let out = sh("bpftool --json prog show");
    let v: Value = serde_json::from_str(&out).expect("bpftool prog JSON");
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| ev_str(p, "name").starts_with("tcpstall"))
        .map(|p| ev_u64(p, "id"))
        .collect()
}

/// Program ids that BPF links (`bpftool link show`) and cgroup attachments
/// (`bpftool cgroup tree`) hold.
fn attached_prog_ids() -> BTreeSet<u64> {
    let links: Value =
        serde_json::from_str(&sh("bpftool --json link show")).expect("bpftool link JSON");
    let mut ids: BTreeSet<u64> = links
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| ev_u64(l, "prog_id"))
        .collect();
    let tree: Value =
        serde_json::from_str(&sh("bpftool --json cgroup tree")).expect("bpftool cgroup JSON");
    fn walk(v: &Value, ids: &mut BTreeSet<u64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, ids)),
            Value::Object(o) => {
                if let Some(id) = o.get("id").and_then(Value::as_u64) {
                    ids.insert(id);
                }
                o.values().for_each(|x| walk(x, ids));
            }
            _ => {}
        }
    }
    walk(&tree, &mut ids);
    ids
}

/// After SIGTERM nothing of the agent stays in the kernel: none of the
/// programs it loaded (including the cgroup sock_ops program, forced with
/// `--mechanism sock-ops`) is still loaded, linked or attached to a cgroup.
/// What can leak past the process: the kernel frees programs and links held
/// only by the agent's file descriptors when it exits, so only a pin in a
/// bpffs or a legacy (link-less) cgroup attachment survives it.
/// Mutation (run): pinning the sock_ops program into a mounted bpffs
/// (`p.pin(...)` before `p.attach(...)` in
/// `tcpstall/src/kernel/loader/attach.rs`, a bpffs mounted at the pin's
/// directory for the run) -> fails with "still loaded after SIGTERM:
/// [7246], still attached: []". Without a bpffs at the pin's path the pin
/// itself fails and nothing leaks (why the same mutation against
/// `/sys/fs/bpf`, not mounted on that host, passed earlier).
#[test]
fn sigterm_leaves_no_program_attached() {
    require_root();
    require(
        Command::new("bpftool").arg("version").output().is_ok(),
        "bpftool",
        "apt-get install bpftool",
    );
    let before = tcpstall_prog_ids();
    let mut agent = Agent::start(&["--mechanism", "sock-ops"]);
    let ours: BTreeSet<u64> = tcpstall_prog_ids().difference(&before).copied().collect();
    assert!(ours.len() >= 4, "the agent's programs: {ours:?}");
    let attached: BTreeSet<u64> = attached_prog_ids().intersection(&ours).copied().collect();
    assert!(
        !attached.is_empty(),
        "the running agent's programs are attached: {ours:?}"
    );
    let cgroup = sh("bpftool cgroup tree");
    assert!(
        ours.iter().any(|id| cgroup
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&id.to_string()))),
        "the sock_ops program is attached to a cgroup:\n{cgroup}"
    );
    let logs = agent.stop();
    assert!(logs.iter().any(|v| v["message"] == "tcpstall stopped"));
    // Programs are freed once their last reference goes (RCU): wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loaded: Vec<u64> = tcpstall_prog_ids().intersection(&ours).copied().collect();
        let still: Vec<u64> = attached_prog_ids().intersection(&ours).copied().collect();
        if loaded.is_empty() && still.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still loaded after SIGTERM: {loaded:?}, still attached: {still:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[path = "contract/mod.rs"]
mod contract;

/// The deploy checks' metric contract (tests/contract/mod.rs, which the
/// rules and dashboard are checked against) is what a live agent serves:
/// every `tcpstall_*` family on `/metrics` is in the contract with the same
/// type, every contract metric is served, and every sample's labels are
/// among the contract's labels for it. A labelled family is served only
/// once it has a sample, so the test gives every one a sample of its own
/// (none is exempt): a close_wait stall; a blackholed flow, stalled with a
/// prediction (retransmits, RTO expiries, per-flow and incident series),
/// then reset by its peer (stall resets); a connection from a pod of this
/// run under a dry-run guard rule (guard counts). The metrics are read
/// while the flow is stalled and again after its reset; a family served in
/// either reading counts as served.
/// Mutation (run): rename `tcpstall_flows_tracked` to
/// `tcpstall_flows_trackedx` in `tcpstall/src/serve/metrics/register.rs` -> fails with
/// "tcpstall_flows_tracked: in the contract, not served" and
/// "tcpstall_flows_trackedx (gauge): served but not in the contract".
#[test]
fn live_metrics_match_the_deploy_contract() {
    require_tools();
    let link = Link::new("mct", 84);
    link.a.sysctl("net.ipv4.tcp_retries2", "8");
    // A pod of this run (namespace unique per run) and a dry-run guard rule
    // for its namespace: the guard counts the pod's connection.
    let pid = std::process::id();
    let tmp = std::env::temp_dir().join(format!("tcpstall-contract-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let _scratch = Scratch(tmp.clone());
    let mut cgroups = Cgroups::default();
    let pod = make_task_pod(
        &mut cgroups,
        &cgroup2_root(),
        &tmp.join("containerd/io.containerd.runtime.v2.task/k8s.io"),
        1,
        &format!("contract-g{pid}"),
        "client-0",
    );
    let policy = tmp.join("guard.toml");
    write_file(
        &policy,
        &format!(
            "mode = \"dry-run\"\n\n[[rule]]\nname = \"contract-dry\"\nnamespace = \"{}\"\nuser_timeout = \"10s\"\n",
            pod.namespace
        ),
    );
    let mut args = runtime_state_args(&tmp);
    args.extend([
        "--close-wait-after".to_owned(),
        "1".to_owned(),
        "--guard-policy".to_owned(),
        policy.to_str().unwrap().to_owned(),
    ]);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A close_wait stall.
    let server = SocketAddr::from((link.b_ip, 8080));
    let listener = listen_in(&link.b, server);
    thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let client = connect_in(&link.a, server);
    let local = client.local_addr().expect("local");
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent.stall_of(local, server).is_none() {
        assert!(
            Instant::now() < deadline,
            "the close_wait stall never appeared"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // The pod's connection, counted by the guard (dry-run: unchanged).
    let pod_server = SocketAddr::from((link.b_ip, 8081));
    reading_server_in(&link.b, pod_server);
    let _pod_client = hold_connection_in(&link.a.name, &pod.cgroup, pod_server);
    let guard_labels = [("namespace", pod.namespace.as_str()), ("mode", "dry-run")];
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        "the guard never counted the pod's connection",
        || match metric_sum(
            &agent.metrics(),
            "tcpstall_guard_sockets_total",
            &guard_labels,
        ) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("tcpstall_guard_sockets_total {other:?}")),
        },
    );
    // A blackholed flow, stalled with a prediction.
    let mut conn = Conn::establish(&link, 8082, None);
    let (flow_local, flow_server) = (conn.local, conn.server);
    let blackhole = link.b.blackhole_from(link.a_ip);
    conn.client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "the blackholed flow never listed with a prediction",
        || match agent.stall_of(flow_local, flow_server) {
            Some(s) if s["seconds_to_timeout"].is_number() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let stalled_text = agent.metrics();
    // Its peer resets it: the next retransmission gets an RST.
    drop(blackhole);
    let _reset = link
        .b
        .reject_input(&format!("ip saddr {}", link.a_ip), "tcp reset");
    // Its reset logged (after the agent counted it).
    let cookie = agent
        .cookie_of(flow_local, flow_server)
        .unwrap_or_else(|| panic!("no event of {flow_local} carries its cookie"));
    agent.wait_log(
        Duration::from_secs(20),
        "the stall's end by the peer's RST",
        |v| v["message"] == "stall ended by a reset (RST)" && ev_u64(v, "cookie") == cookie,
    );
    let text = format!("{stalled_text}\n{}", agent.metrics());
    let contract = contract::contract();
    // name -> type from `# TYPE` lines.
    let mut served = std::collections::BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            let family_of_contract = contract.contains_key(name)
                || contract.contains_key(format!("{name}_total").as_str());
            if name.starts_with("tcpstall_") || family_of_contract {
                served.insert(name.to_owned(), kind.to_owned());
            }
        }
    }
    let kind_str = |k: contract::Kind| match k {
        contract::Kind::Counter => "counter",
        contract::Kind::Gauge => "gauge",
        contract::Kind::Histogram => "histogram",
    };
    // Counters are typed under their family name (`x` for `x_total`).
    let family = |name: &str| -> String { name.strip_suffix("_total").unwrap_or(name).to_owned() };
    let mut problems = Vec::new();
    for (name, (kind, _)) in &contract {
        match served.get(&family(name)).or_else(|| served.get(*name)) {
            Some(k) if k == kind_str(*kind) => {}
            Some(k) => problems.push(format!("{name}: contract {}, served {k}", kind_str(*kind))),
            None => problems.push(format!("{name}: in the contract, not served")),
        }
    }
    for (name, kind) in &served {
        let known = contract.contains_key(name.as_str())
            || contract.contains_key(format!("{name}_total").as_str());
        if !known {
            problems.push(format!("{name} ({kind}): served but not in the contract"));
        }
    }
    // Labels of every sample.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = l.rsplit_once(' ').map(|(s, _)| s).unwrap_or(l);
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let base = ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| contract.contains_key(b))
            .unwrap_or(name);
        let Some((_, allowed)) = contract.get(base) else {
            continue; // reported above
        };
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let key = pair.split('=').next().unwrap_or("").trim_matches(',');
            if key != "le" && !allowed.contains(&key) {
                problems.push(format!(
                    "{base}: label `{key}` not in the contract ({allowed:?})"
                ));
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "live /metrics vs the deploy contract:\n{}",
        problems.join("\n")
    );
    drop(client);
}

/// `remote` is the peer service: fifty connections of one client host to a
/// server whose clients stopped acknowledging are ONE incident, labelled
/// with the client's IP and the server's listening port and
/// `direction="accepted"`, not fifty (one per client ephemeral port). Real
/// sockets in two namespaces; the server's namespace has a resident process,
/// as a pod has its pause container, through which the agent reads the
/// namespace's listening sockets.
/// Mutation: `peer_service` returning `remote` for `Direction::Accepted`
/// (tcpstall/src/identity/listen.rs) -> fails with "no single incident of 50
/// sockets" listing fifty one-socket incidents.
#[test]
fn fifty_clients_of_one_stalled_server_are_one_incident() {
    require_tools();
    const N: usize = 50;
    let link = Link::new("fci", 86);
    let _pause = link.b.resident();
    let agent = Agent::start(&[]);
    let server = SocketAddr::from((link.b_ip, 8080));
    let listener = listen_in(&link.b, server);
    let clients: Vec<std::net::TcpStream> = (0..N).map(|_| connect_in(&link.a, server)).collect();
    let mut accepted: Vec<std::net::TcpStream> = (0..N)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    // The client host stops acknowledging: every server socket retransmits.
    let _blackhole = link.a.blackhole_from(link.b_ip);
    for s in &mut accepted {
        s.write_all(&[b'r'; 1000]).expect("server write");
    }
    let client_ip = format!("remote=\"{}:", link.a_ip);
    let ours = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| {
                l.starts_with("tcpstall_incident_stalled_sockets{") && l.contains(&client_ip)
            })
            .filter_map(|l| {
                let (series, v) = l.rsplit_once(' ')?;
                Some((series.to_owned(), v.parse().ok()?))
            })
            .collect()
    };
    let incidents = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        "no single incident of 50 sockets",
        || {
            let got = ours(&agent.metrics());
            if got.iter().any(|(_, v)| *v == N as f64) {
                Ok(got)
            } else {
                Err(format!("{got:#?}"))
            }
        },
    );
    assert_eq!(
        incidents.len(),
        1,
        "one incident for the client host: {incidents:#?}"
    );
    let (series, _) = &incidents[0];
    for want in [
        format!("remote=\"{}:8080\"", link.a_ip),
        "direction=\"accepted\"".to_owned(),
        "class=\"retransmit\"".to_owned(),
    ] {
        assert!(series.contains(&want), "{want} missing: {series}");
    }
    // The API names each flow's direction and peer service too.
    let flows: Vec<Value> = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "the API does not list the 50 stalled server flows",
        || {
            let all = agent.stalls();
            let ours: Vec<Value> = all
                .iter()
                .filter(|v| ev_str(v, "local") == server.to_string())
                .cloned()
                .collect();
            if ours.len() == N {
                Ok(ours)
            } else {
                Err(format!(
                    "{} of ours among {} stalls: {:#?}",
                    ours.len(),
                    all.len(),
                    all.iter().take(3).collect::<Vec<_>>()
                ))
            }
        },
    );
    for f in &flows {
        assert_eq!(f["direction"], "accepted", "{f}");
        assert_eq!(f["peer_service"], format!("{}:8080", link.a_ip), "{f}");
    }
    // Abort the server sockets (SO_LINGER 0: reset and freed at close):
    // closed normally they would linger in FIN_WAIT1, retransmitting to the
    // blackholed clients for minutes, and fill later tests' flow tables
    // (`max_flows_evicts_the_least_recently_used` runs with 4 slots).
    let abort = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    for s in &accepted {
        // SAFETY: valid fd and option buffer.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&abort as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    drop(accepted);
    drop(clients);
}

/// Liveness: with only the agent's event-loop thread stopped (ptrace
/// interrupt of the main thread, which polls the event loop; the HTTP
/// server's worker threads keep answering), `/healthz` fails once the
/// loop's heartbeat is older than `--liveness-timeout`, and passes again
/// once the thread runs. An idle agent is live: nothing happens on the node
/// during the test, the heartbeat ticks anyway.
/// Mutation: `healthz` answering `ok` without `health.liveness(..)` ->
/// fails with "/healthz never failed while the event loop was stopped".
#[test]
fn healthz_fails_while_the_event_loop_is_stopped() {
    require_tools();
    let agent = Agent::start(&["--liveness-timeout", "2"]);
    agent.wait_ready(Duration::from_secs(30));
    // Idle for longer than the timeout: still live.
    thread::sleep(Duration::from_secs(3));
    let (status, body) = agent.http_get("/healthz");
    assert_eq!(status, 200, "an idle agent is live: {body}");
    let pid = agent.pid().expect("running") as libc::pid_t;
    struct Traced(libc::pid_t);
    impl Drop for Traced {
        fn drop(&mut self) {
            // SAFETY: detaching our own tracee; resumes it.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
        }
    }
    // SAFETY: seize and interrupt the thread `pid` (the main thread only).
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
    assert_eq!(
        r,
        0,
        "PTRACE_SEIZE {pid}: {}",
        std::io::Error::last_os_error()
    );
    let traced = Traced(pid);
    // SAFETY: as above.
    let r = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) };
    assert_eq!(
        r,
        0,
        "PTRACE_INTERRUPT: {}",
        std::io::Error::last_os_error()
    );
    let mut st = 0;
    // SAFETY: waiting for our tracee's stop.
    let w = unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
    assert_eq!(w, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFSTOPPED(st),
        "the main thread did not stop: {st:#x}"
    );
    let healthz_becomes = |want: u16, what: &str| {
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(200),
            what,
            || match agent.http_get("/healthz") {
                (s, body) if s == want => Ok(body),
                (s, body) => Err(format!("{s} {body}")),
            },
        )
    };
    let body = healthz_becomes(
        503,
        "/healthz never failed while the event loop was stopped",
    );
    assert!(body.contains("no progress"), "{body}");
    drop(traced);
    healthz_becomes(200, "/healthz did not recover after the event loop resumed");
}
