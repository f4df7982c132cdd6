//! Behavioural harness of the kernel programs: trigger one socket action,
//! expect exactly these event fields. Included by `scenarios.rs` so the same
//! tests run on the host and, by name (`programs::...`), in the QEMU guests.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::PathBuf,
    process::Command,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpstall_tests::*;

/// The cgroup2 mount point (`/sys/fs/cgroup` in unified mode,
/// `/sys/fs/cgroup/unified` in hybrid mode); fails when there is none.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    let root = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    });
    require(
        root.is_some(),
        "a cgroup2 mount",
        "mount -t cgroup2 none /sys/fs/cgroup/unified",
    );
    root.expect("checked")
}

/// A cgroup directory made for one test; removed on drop.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        let dir = cgroup2_root().join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir }
    }
    fn inode(&self) -> u64 {
        std::fs::metadata(&self.dir).expect("cgroup dir").ino()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its only process (the child below) has exited by now.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The cgroup2 path of this process (`0::/path` in /proc/self/cgroup).
fn own_cgroup_inode(root: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup2 line (0::) in /proc/self/cgroup");
    let dir = root.join(rel.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .ino()
}

/// State events of sockets with this 4-tuple (either end).
fn state_events(agent: &Agent, local: SocketAddr, remote: SocketAddr) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| {
            ev_str(e, "kind") == "state"
                && ev_str(e, "local") == local.to_string()
                && ev_str(e, "remote") == remote.to_string()
        })
        .collect()
}

/// `cgroup_id` is the cgroup v2 id of the cgroup the socket was created in:
/// the inode number of that cgroup's directory on the cgroup2 mount. A
/// child process moves itself into a fresh cgroup and connects over
/// loopback; its socket must carry that cgroup's inode, and the accepted
/// socket (cloned from our listener) the inode of our own cgroup.
#[test]
fn cgroup_id_is_the_sockets_cgroup_inode() {
    require_root();
    let root = cgroup2_root();
    let cg = TestCgroup::new(&format!("tcpstall-test-{}", std::process::id()));
    let want_child = cg.inode();
    let want_self = own_cgroup_inode(&root);
    assert_ne!(want_child, want_self);
    let mut agent = Agent::start(&[]);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let server = listener.local_addr().expect("addr");
    let procs = cg.dir.join("cgroup.procs");
    let procs_c = std::ffi::CString::new(procs.to_string_lossy().as_bytes()).expect("path");
    let port = server.port();
    let mut cmd = Command::new("sleep");
    cmd.arg("3");
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            // Created after the move: the socket belongs to the new cgroup.
            // Not close-on-exec: `sleep` keeps the connection open.
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if s < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            if libc::connect(
                s,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the connecting child");
    let (accepted, client) = listener.accept().expect("accept");
    // Our FIN: the child's socket goes to CLOSE_WAIT and ours to FIN_WAIT2,
    // changes of state that carry the full snapshot (the cgroup among it)
    // even for sockets without trouble.
    accepted
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");

    let full_state = |local: SocketAddr, remote: SocketAddr, state: &str, what: &str| -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = state_events(&agent, local, remote)
                .into_iter()
                .find(|e| ev_str(e, "state") == state)
            {
                return e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {state} state event for the {what} socket {local} -> {remote}; events: {:?}",
                agent.events()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    let c = full_state(client, server, "CLOSE_WAIT", "client");
    let s = full_state(server, client, "FIN_WAIT2", "accepted");
    let _ = child.kill();
    let _ = child.wait();
    agent.stop();
    assert_eq!(
        ev_u64(&c, "cgroup_id"),
        want_child,
        "client socket: cgroup_id must be the inode of {} ({c})",
        cg.dir.display()
    );
    assert_eq!(
        ev_u64(&s, "cgroup_id"),
        want_self,
        "accepted socket: cgroup_id must be the inode of this process's cgroup ({s})"
    );
}

/// `ca_state` is `icsk_ca_state`: once the retransmit timer has fired on a
/// blackholed flow the socket is in TCP_CA_Loss (4), and every retransmit
/// event taken after the first RTO (`retransmits >= 1`) must say so.
#[test]
fn retransmit_events_carry_ca_state_loss_after_an_rto() {
    require_tools();
    let link = Link::new("pca", 61);
    let mut agent = Agent::start(&[]);
    let conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _hole = link.b.blackhole_from(link.a_ip);
    let (_, _death) = conn.write_and_await_death(Duration::from_secs(60));
    let after_rto = |agent: &Agent| -> Vec<Value> {
        agent
            .events()
            .into_iter()
            .filter(|e| {
                ev_str(e, "kind") == "retransmit"
                    && ev_str(e, "local") == local.to_string()
                    && ev_str(e, "remote") == server.to_string()
                    && ev_u64(e, "retransmits") >= 1
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let seen = after_rto(&agent);
        if seen.len() >= 2 {
            break seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than two retransmit events after an RTO for {local} -> {server}: {:?}",
            agent.events()
        );
        thread::sleep(Duration::from_millis(100));
    };
    agent.stop();
    for e in &seen {
        assert_eq!(ev_u64(e, "ca_state"), 4, "TCP_CA_Loss expected: {e}");
    }
}

// ---------------------------------------------------------------------------
// One test per kernel program: one socket action in a test namespace, then
// the exact fields the agent logged for that socket (found by its cookie,
// read with SO_COOKIE, not from the agent).

/// The kernel's cookie of a socket (`SO_COOKIE`).
fn so_cookie(s: &std::net::TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    const SO_COOKIE: libc::c_int = 57;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, buffer and length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    assert_ne!(v, 0, "SO_COOKIE returned 0");
    v
}

/// Events of socket `cookie` (in log order) once `done` holds for them;
/// fails with every event of the socket after 30 s.
fn wait_socket_events(
    agent: &Agent,
    cookie: u64,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let evs: Vec<Value> = agent
            .events()
            .into_iter()
            .filter(|e| ev_u64(e, "cookie") == cookie)
            .collect();
        if done(&evs) {
            return evs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waiting for {what} of socket {cookie}: events so far {evs:#?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The events of `kind` among `evs`, in time order.
fn of_kind_in_order(evs: &[Value], kind: &str) -> Vec<Value> {
    let mut t: Vec<Value> = evs
        .iter()
        .filter(|e| ev_str(e, "kind") == kind)
        .cloned()
        .collect();
    t.sort_by_key(|e| ev_u64(e, "ts_ns"));
    t
}

/// What every event of a socket carries: its cookie and, read from `struct
/// sock` (every program but sock_ops), the namespace's inode, the cgroup of
/// this process (the socket was created by one of its threads) and the
/// namespace's `tcp_retries2`.
struct Expect {
    cookie: u64,
    netns: u64,
    cgroup: u64,
    retries2: u64,
}

impl Expect {
    fn new(ns: &Netns, s: &std::net::TcpStream, retries2: u64) -> Self {
        Expect {
            cookie: so_cookie(s),
            netns: ns.inode(),
            cgroup: own_cgroup_inode(&cgroup2_root()),
            retries2,
        }
    }

    /// [`Expect::check`], and the event is of `conn`'s client end while
    /// ESTABLISHED.
    fn check_established(
        &self,
        e: &Value,
        kind: &str,
        mechanism: &str,
        sock_fields: bool,
        conn: &Conn,
    ) {
        let m = mechanism;
        self.check(e, kind, m, sock_fields);
        assert_eq!(ev_str(e, "local"), conn.local.to_string(), "{m} local: {e}");
        assert_eq!(
            ev_str(e, "remote"),
            conn.server.to_string(),
            "{m} remote: {e}"
        );
        assert_eq!(ev_str(e, "state"), "ESTABLISHED", "{m} state: {e}");
    }

    fn check(&self, e: &Value, kind: &str, mechanism: &str, sock_fields: bool) {
        assert_eq!(ev_str(e, "kind"), kind, "kind: {e}");
        assert_eq!(ev_str(e, "mechanism"), mechanism, "mechanism: {e}");
        assert_eq!(ev_u64(e, "cookie"), self.cookie, "cookie: {e}");
        if sock_fields {
            assert_eq!(ev_u64(e, "netns"), self.netns, "netns inode: {e}");
            assert_eq!(ev_u64(e, "cgroup_id"), self.cgroup, "cgroup id: {e}");
            assert_eq!(
                ev_u64(e, "tcp_retries2"),
                self.retries2,
                "tcp_retries2 of the namespace: {e}"
            );
        }
    }
}

/// `sock:inet_sock_set_state` of a connection without trouble, closed in
/// two steps in a namespace: the client's shutdown, then the server's close.
/// Exactly these changes of state are reported, each with the 4-tuple and
/// the cookie (state and old_state of each):
/// - client: FIN_WAIT1 -> FIN_WAIT2 with the full snapshot (netns inode,
///   cgroup id, the namespace's `tcp_retries2`), then FIN_WAIT2 -> CLOSE
///   brief;
/// - server: ESTABLISHED -> CLOSE_WAIT full, CLOSE_WAIT -> LAST_ACK and
///   LAST_ACK -> CLOSE brief;
/// - none of CLOSE -> SYN_SENT, SYN_SENT -> ESTABLISHED, SYN_RECV ->
///   ESTABLISHED, ESTABLISHED -> FIN_WAIT1 (no trouble, no use to the agent:
///   not even a ring-buffer record).
///
/// Mutations: `try_state_btf` without `ev.old_state = old_state;` -> fails
/// (host) with "waiting for FIN_WAIT2 of socket ..." (every old_state
/// UNKNOWN); `state_event` with `later_life` always true -> fails with
/// "client socket's old_state -> state" (the skipped changes reported).
#[test]
fn state_program_fields() {
    require_tools();
    let link = Link::new("pst", 62);
    link.a.sysctl("net.ipv4.tcp_retries2", "7");
    link.b.sysctl("net.ipv4.tcp_retries2", "9");
    // What `tcp_fin_time()` reads, in the full FIN_WAIT2 snapshot.
    link.a.sysctl("net.ipv4.tcp_fin_timeout", "11");
    let mut agent = Agent::start(&[]);
    let server = SocketAddr::from((link.b_ip, 8081));
    let listener = listen_in(&link.b, server);
    let client = connect_in(&link.a, server);
    let (accepted, peer) = listener.accept().expect("accept");
    let local = client.local_addr().expect("local");
    assert_eq!(peer, local);
    let c = Expect::new(&link.a, &client, 7);
    let s = Expect::new(&link.b, &accepted, 9);
    set_tcp_linger2(&client, 7);
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let has = |evs: &[Value], old: &str, new: &str| {
        evs.iter()
            .any(|e| ev_str(e, "old_state") == old && ev_str(e, "state") == new)
    };
    wait_socket_events(&agent, c.cookie, "FIN_WAIT2", |evs| {
        has(evs, "FIN_WAIT1", "FIN_WAIT2")
    });
    wait_socket_events(&agent, s.cookie, "CLOSE_WAIT", |evs| {
        has(evs, "ESTABLISHED", "CLOSE_WAIT")
    });
    drop(accepted);
    let sv = wait_socket_events(&agent, s.cookie, "LAST_ACK -> CLOSE", |evs| {
        has(evs, "LAST_ACK", "CLOSE")
    });
    let cl = wait_socket_events(&agent, c.cookie, "the end of FIN_WAIT2", |evs| {
        evs.iter().any(|e| ev_str(e, "old_state") == "FIN_WAIT2")
    });
    agent.stop();
    let transitions = |evs: &[Value]| -> Vec<(String, String)> {
        evs.iter()
            .map(|e| {
                (
                    ev_str(e, "old_state").to_owned(),
                    ev_str(e, "state").to_owned(),
                )
            })
            .collect()
    };
    let cl_t = transitions(&cl);
    assert_eq!(
        cl_t.first().map(|(a, b)| (a.as_str(), b.as_str())),
        Some(("FIN_WAIT1", "FIN_WAIT2")),
        "client socket's old_state -> state: {cl:#?}"
    );
    assert!(
        cl_t.len() <= 2 && cl_t.iter().skip(1).all(|(old, _)| old == "FIN_WAIT2"),
        "client socket's old_state -> state (one change out of FIN_WAIT2 after it): {cl:#?}"
    );
    for e in &cl {
        let full = ev_str(e, "state") == "FIN_WAIT2";
        if full {
            // TCP_LINGER2 7 s and the namespace's tcp_fin_timeout 11 s,
            // in jiffies as the kernel stores them.
            let linger2_j = e["linger2_j"].as_i64().unwrap_or(0);
            let hz = linger2_j / 7;
            assert!(
                linger2_j % 7 == 0 && [100, 250, 300, 1000].contains(&hz),
                "linger2_j of the FIN_WAIT2 snapshot (TCP_LINGER2 7 s): {e}"
            );
            assert_eq!(
                e["netns_fin_timeout_j"].as_i64(),
                Some(11 * hz),
                "netns_fin_timeout_j of the FIN_WAIT2 snapshot (tcp_fin_timeout 11 s, HZ {hz}): {e}"
            );
        }
        c.check(e, "state", "tp_btf", full);
        check_brief(e, !full);
        assert_eq!(ev_str(e, "remote"), server.to_string(), "remote: {e}");
        assert_eq!(ev_str(e, "local"), local.to_string(), "local: {e}");
    }
    let sv_t = transitions(&sv);
    let want: Vec<(String, String)> = [
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(sv_t, want, "accepted socket's old_state -> state: {sv:#?}");
    for e in &sv {
        let full = ev_str(e, "state") == "CLOSE_WAIT";
        s.check(e, "state", "tp_btf", full);
        check_brief(e, !full);
        assert_eq!(ev_str(e, "local"), server.to_string(), "local: {e}");
        assert_eq!(ev_str(e, "remote"), local.to_string(), "remote: {e}");
    }
}

/// A brief STATE event (a socket without trouble, see `snapshot::fill_brief`)
/// names the socket and its state only: no socket fields, no namespace
/// sysctls; a full one has both.
fn check_brief(e: &Value, brief: bool) {
    for key in ["user_timeout_ms", "snd_wnd", "tcp_retries2"] {
        assert_eq!(
            e.get(key).is_none_or(Value::is_null),
            brief,
            "{key} of a {} STATE event: {e}",
            if brief { "brief" } else { "full" }
        );
    }
    if brief {
        assert_eq!(ev_u64(e, "netns"), 0, "netns of a brief STATE event: {e}");
    }
}

/// A socket that retransmitted (its SYN, lost for the first 1.5 s) carries the full snapshot in every later change of state:
/// the agent may be tracking it. Mutation: `snapshot::had_trouble` without
/// its `total_retrans` test -> fails ("user_timeout_ms of a full STATE
/// event", SYN_SENT -> ESTABLISHED brief).
#[test]
fn state_events_of_a_socket_with_trouble_are_full() {
    require_tools();
    let link = Link::new("psf", 63);
    link.b.sysctl("net.ipv4.tcp_retries2", "9");
    let server = SocketAddr::from((link.b_ip, 8082));
    let listener = listen_in(&link.b, server);
    let mut agent = Agent::start(&[]);
    // The server's namespace drops the client's packets for its first 1.5 s:
    // the SYN at 0 s and its retransmission at 1 s are lost, the one at 3 s
    // connects (total_retrans 2 before SYN_SENT -> ESTABLISHED).
    let client = thread::scope(|sc| {
        let blackhole = link.b.blackhole_from(link.a_ip);
        sc.spawn(move || {
            thread::sleep(Duration::from_millis(1500));
            drop(blackhole);
        });
        connect_in(&link.a, server)
    });
    let (accepted, _) = listener.accept().expect("accept");
    let c = Expect::new(&link.a, &client, 15);
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let cl = wait_socket_events(&agent, c.cookie, "FIN_WAIT1", |evs| {
        evs.iter()
            .any(|e| ev_str(e, "kind") == "state" && ev_str(e, "state") == "FIN_WAIT1")
    });
    agent.stop();
    for e in cl
        .iter()
        .filter(|e| ev_str(e, "kind") == "state" && ev_str(e, "old_state") != "CLOSE")
    {
        check_brief(e, false);
    }
    drop(accepted);
}

/// A connection from namespace `a` (its `tcp_retries2` set) to a reading
/// server in `b`, established (first 5 bytes acknowledged) after the agent
/// started with `args`: (link, agent, connection, expected fields).
fn connected(tag: &str, subnet: u8, retries2: u64, args: &[&str]) -> (Link, Agent, Conn, Expect) {
    let link = Link::new(tag, subnet);
    link.a
        .sysctl("net.ipv4.tcp_retries2", &retries2.to_string());
    let agent = Agent::start(args);
    let conn = Conn::establish(&link, 8082, None);
    let exp = Expect::new(&link.a, &conn.client, retries2);
    (link, agent, conn, exp)
}

/// `tcp:tcp_retransmit_skb`: every retransmission of a blackholed segment
/// (the tail loss probe, then one per RTO expiry) is one event of the
/// socket with its 4-tuple, state ESTABLISHED, one packet out, backoff
/// stepping by one from 0, `retransmits` equal to it (6.1 counts the expiry
/// after retransmitting) or one more (6.6+ counts it before: the RTO handler's
/// `tcp_update_rto_stats`), the same `snd_una` throughout, and
/// the cookie, netns inode, cgroup id and `tcp_retries2` of its namespace.
/// Mutation: `tcpstall-ebpf/src/main.rs` `try_retransmit_btf`'s finish
/// `|_| {}` -> `|ev| ev.sock.state = 7` -> fails (host) with "state: left
/// CLOSE, right ESTABLISHED".
#[test]
fn retransmit_program_fields() {
    require_tools();
    let (link, mut agent, mut conn, exp) = connected("prt", 63, 11, &[]);
    let _hole = link.b.blackhole_from(link.a_ip);
    conn.client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    let evs = wait_socket_events(&agent, exp.cookie, "3 retransmissions", |evs| {
        evs.iter()
            .filter(|e| ev_str(e, "kind") == "retransmit")
            .count()
            >= 3
    });
    agent.stop();
    let rt: Vec<&Value> = evs
        .iter()
        .filter(|e| ev_str(e, "kind") == "retransmit")
        .collect();
    let una = ev_u64(rt[0], "snd_una");
    let mut last = 0;
    for e in &rt {
        exp.check(e, "retransmit", "tp_btf", true);
        assert_eq!(ev_str(e, "local"), conn.local.to_string(), "local: {e}");
        assert_eq!(ev_str(e, "remote"), conn.server.to_string(), "remote: {e}");
        assert_eq!(ev_str(e, "state"), "ESTABLISHED", "state: {e}");
        assert_eq!(ev_u64(e, "packets_out"), 1, "one segment in flight: {e}");
        assert_eq!(ev_u64(e, "snd_una"), una, "snd_una constant: {e}");
        let (backoff, count) = (ev_u64(e, "backoff"), ev_u64(e, "retransmits"));
        assert!(
            count == backoff || count == backoff + 1,
            "retransmits is backoff (counted after the retransmission, 6.1) or backoff + 1 (before it, 6.6+): {e}"
        );
        assert!(
            backoff == last || backoff == last + 1,
            "backoff steps by one per RTO expiry (from {last}): {e}"
        );
        last = backoff;
    }
    drop(conn);
}

/// `sock:inet_sk_error_report`: a blackholed socket with `tcp_retries2 = 2`
/// dies with ETIMEDOUT; exactly one error report of the socket, `sk_err` 110,
/// remote the server, local address the client's (the port may already read
/// 0: newer kernels report after `tcp_done` released it), cookie, netns
/// inode, cgroup id and `tcp_retries2` 2.
/// Mutation: `tcpstall-ebpf/src/main.rs` `try_error_report_btf`'s
/// `kind::ERROR_REPORT` -> `kind::ACK` -> fails (host) with "no error report
/// (or more than one) for socket ...: left 0, right 1".
#[test]
fn error_report_program_fields() {
    require_tools();
    let (link, mut agent, conn, exp) = connected("per", 64, 2, &[]);
    let (local, server) = (conn.local, conn.server);
    let _hole = link.b.blackhole_from(link.a_ip);
    let (_, death) = conn.write_and_await_death(Duration::from_secs(60));
    let (_, errno) = death.join().expect("reader");
    assert_eq!(errno, Some(libc::ETIMEDOUT));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reports = loop {
        let reports: Vec<Value> = agent
            .events()
            .into_iter()
            .filter(|e| ev_u64(e, "cookie") == exp.cookie && ev_str(e, "kind") == "error_report")
            .collect();
        if !reports.is_empty() || std::time::Instant::now() >= deadline {
            break reports;
        }
        thread::sleep(Duration::from_millis(50));
    };
    agent.stop();
    let all: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| ev_u64(e, "cookie") == exp.cookie)
        .collect();
    assert_eq!(
        reports.len(),
        1,
        "no error report (or more than one) for socket {}: {all:#?}",
        exp.cookie
    );
    let e = &reports[0];
    exp.check(e, "error_report", "tp_btf", true);
    assert_eq!(ev_u64(e, "sk_err"), 110, "ETIMEDOUT: {e}");
    assert_eq!(ev_str(e, "remote"), server.to_string(), "remote: {e}");
    let l: SocketAddr = ev_str(e, "local").parse().expect("local");
    assert!(
        l.ip() == local.ip() && (l.port() == local.port() || l.port() == 0),
        "local {l}, expected {local} (or port 0): {e}"
    );
}

/// `tcp:tcp_probe` (the ACK probe): a blackholed socket retransmits until
/// its RTO has fired once (`retransmits >= 1`), then the blackhole goes and
/// the peer acknowledges the 1000 bytes: exactly one ACK event, with
/// `ack_seq - snd_una == 1000` (the segment acknowledges all of it; snd_una
/// is the value before it), state ESTABLISHED, `retransmits >= 1`, the
/// 4-tuple, cookie, netns inode, cgroup id and `tcp_retries2`.
/// Mutation: `tcpstall-ebpf/src/main.rs` `try_ack_btf`: `ev.ack_seq = ack`
/// -> `ev.ack_seq = una` (both branches) -> fails (host) with "ack_seq must
/// acknowledge the 1000 bytes after snd_una: left 0, right 1000".
/// Where `bpf_rdonly_cast` exists (host, 6.12) the agent runs
/// `tcpstall_ack_cast`: the same mutation in `try_ack_cast` fails it the
/// same way (seen on the 6.18 host).
#[test]
fn ack_program_fields() {
    require_tools();
    let (link, mut agent, mut conn, exp) = connected("pak", 65, 12, &[]);
    let hole = link.b.blackhole_from(link.a_ip);
    conn.client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    wait_socket_events(&agent, exp.cookie, "an RTO expiry", |evs| {
        evs.iter()
            .any(|e| ev_str(e, "kind") == "retransmit" && ev_u64(e, "retransmits") >= 1)
    });
    drop(hole);
    wait_all_acked(&conn.client, 1005, Duration::from_secs(30));
    let evs = wait_socket_events(&agent, exp.cookie, "the ACK event", |evs| {
        evs.iter().any(|e| ev_str(e, "kind") == "ack")
    });
    agent.stop();
    let acks: Vec<&Value> = evs.iter().filter(|e| ev_str(e, "kind") == "ack").collect();
    assert_eq!(
        acks.len(),
        1,
        "one ACK event per recovered episode: {evs:#?}"
    );
    let e = acks[0];
    exp.check(e, "ack", "tp_btf", true);
    assert_eq!(ev_str(e, "local"), conn.local.to_string(), "local: {e}");
    assert_eq!(ev_str(e, "remote"), conn.server.to_string(), "remote: {e}");
    assert_eq!(ev_str(e, "state"), "ESTABLISHED", "state: {e}");
    assert!(ev_u64(e, "retransmits") >= 1, "inside the RTO episode: {e}");
    let (ack, una) = (ev_u64(e, "ack_seq") as u32, ev_u64(e, "snd_una") as u32);
    assert_eq!(
        ack.wrapping_sub(una),
        1000,
        "ack_seq must acknowledge the 1000 bytes after snd_una: {e}"
    );
    drop(conn);
}

/// The write timer, once per mechanism `doctor` reports as working on this
/// kernel (forced with `--mechanism`): a blackholed segment's first three
/// RTO expiries (`retransmits` 0, 1, 2, taken before the handler counts the
/// expiry). The repo has a known rare missed RTO expiry (README "Known
/// gaps"), so the test does not require all three: it waits for the event
/// of an expiry with `retransmits >= 2` and then checks every expiry it saw
/// up to the third: at least two of the three (one gap tolerated, as S1),
/// each expiry at most once (`retransmits` strictly increasing in time
/// order), `rto_jiffies == rto0 << retransmits` with one `rto0` for all (the
/// RTO doubles per expiry), state ESTABLISHED, the 4-tuple, cookie and netns
/// inode; the mechanisms that read `struct sock` (all but sock_ops) also
/// `backoff == retransmits`, `pending` 1 (ICSK_TIME_RETRANS), `timer_expires
/// <= jiffies` (never an early timer), cgroup id and `tcp_retries2`.
/// Mutations: `tcpstall-ebpf/src/main.rs` `try_write_timer_tp`:
/// `source::TIMER_TP` -> `source::KPROBE` -> fails (host) with "mechanism:
/// left kprobe, right timer_tracepoint";
/// Where `bpf_rdonly_cast` exists (host, 6.12) the timer tracepoint is
/// `tcpstall_write_timer_tp_cast`: the same mutation in
/// `try_write_timer_tp_cast` fails it the same way (seen on the 6.18 host).
/// `tcpstall-ebpf/src/snapshot.rs`: `out.retransmits = ... as u8` ->
/// `... as u8 + 1` (a wrong field) -> fails (host) with "timer_tracepoint:
/// rto 51 at retransmits 1 is no doubling of an initial RTO".
#[test]
fn write_timer_program_fields_per_mechanism() {
    require_tools();
    let plan = super::doctor_json();
    let working = super::working_write_timer_mechanisms(&plan);
    let hz = plan["hz"]
        .as_u64()
        .unwrap_or_else(|| panic!("doctor knows no HZ: {plan}"));
    assert!(!working.is_empty(), "no working write-timer mechanism");
    for (i, m) in working.iter().enumerate() {
        eprintln!("write timer with --mechanism {m}");
        let flag = m.replace('_', "-");
        let (link, mut agent, mut conn, exp) = connected(
            &format!("pwt{i}"),
            66 + i as u8,
            13,
            &["--mechanism", &flag],
        );
        let _hole = link.b.blackhole_from(link.a_ip);
        conn.client
            .write_all(&[b'x'; 1000])
            .expect("write into the blackhole");
        let timers = |evs: &[Value]| of_kind_in_order(evs, "write_timer");
        let evs = wait_socket_events(
            &agent,
            exp.cookie,
            "the RTO expiry with retransmits >= 2",
            |evs| timers(evs).iter().any(|e| ev_u64(e, "retransmits") >= 2),
        );
        agent.stop();
        let all = timers(&evs);
        // Every expiry seen up to the third (retransmits 0, 1, 2).
        let t: Vec<&Value> = all
            .iter()
            .filter(|e| ev_u64(e, "retransmits") <= 2)
            .collect();
        let counts: Vec<u64> = t.iter().map(|e| ev_u64(e, "retransmits")).collect();
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "{m}: each RTO expiry at most once, in order (retransmits {counts:?}): {all:#?}"
        );
        assert!(
            t.len() >= 2,
            "{m}: fewer than two of the first three RTO expiries reported (retransmits {counts:?}): {all:#?}"
        );
        let (r0, rto_first) = (ev_u64(t[0], "retransmits"), ev_u64(t[0], "rto_jiffies"));
        let rto0 = rto_first >> r0;
        assert!(
            rto0 > 0 && rto0 << r0 == rto_first,
            "{m}: rto {rto_first} at retransmits {r0} is no doubling of an initial RTO: {:#?}",
            t[0]
        );
        // The initial RTO, known without the data: the namespace's default
        // rto_min (TCP_RTO_MIN, HZ / 5) plus the smoothed RTT of a veth
        // pair, `usecs_to_jiffies(srtt + max(rttvar, rto_min))` rounded up:
        // more than HZ / 5 jiffies, and the RTT adds well under 100 ms
        // (recorded: 51-56 jiffies at HZ 250; the bound leaves a loaded TCG
        // guest room while an RTO read off by a factor of two, over 400 ms,
        // still fails).
        assert!(
            rto0 > hz / 5 && rto0 <= hz / 5 + hz / 10,
            "{m}: initial RTO {rto0} jiffies, expected ({}, {}] at HZ {hz} (200 ms plus a veth RTT): {:#?}",
            hz / 5,
            hz / 5 + hz / 10,
            t[0]
        );
        let sock_fields = m != "sock_ops";
        for e in &t {
            let k = ev_u64(e, "retransmits");
            exp.check_established(e, "write_timer", m, sock_fields, &conn);
            assert_eq!(
                ev_u64(e, "rto_jiffies"),
                rto0 << k,
                "{m}: RTO doubles (initial {rto0} jiffies): {e}"
            );
            if sock_fields {
                assert_eq!(ev_u64(e, "backoff"), k, "{m} backoff: {e}");
                assert_eq!(ev_u64(e, "pending"), 1, "{m} pending RETRANS: {e}");
                assert!(
                    ev_u64(e, "timer_expires") <= ev_u64(e, "jiffies"),
                    "{m}: expiry before its time: {e}"
                );
            }
        }
        drop(conn);
    }
}

/// The keepalive timer, once per mechanism the kernel offers (fentry,
/// kprobe, `timer_expire_entry`; each forced by denying the others'
/// programs): an idle connection to a blackholed peer with keepalive 1 s /
/// 1 s / 3 probes gives one `keepalive_timer` event per expiry, in order,
/// with probes_out 0, 1, 2, state ESTABLISHED, its 4-tuple and the cookie,
/// netns inode, cgroup id and `tcp_retries2` of its namespace: the programs
/// found the socket behind the timer (kernels whose keepalive timer is
/// `icsk_keepalive_timer`, the guests', read it there, not at `sk_timer`).
/// Mutation: `tcpstall-ebpf/src/main.rs` `try_keepalive_timer_tp` taking
/// the timer from argument 1 instead of 0 -> fails (host, where only the
/// timer tracepoint loads) with "waiting for timer_tracepoint: the
/// keepalive expiry with probes_out 2 of socket ...".
#[test]
fn keepalive_timer_program_fields_per_mechanism() {
    require_tools();
    let plan = super::doctor_json();
    let attempts = super::probe_attempts(&plan, "keepalive_timer");
    let working = super::working_mechanisms(&plan, "keepalive_timer");
    assert!(
        !working.is_empty(),
        "no working keepalive-timer mechanism: {attempts:#?}"
    );
    for (i, m) in working.iter().enumerate() {
        eprintln!("keepalive timer with {m} (the others' programs denied)");
        let mut args = Vec::new();
        for a in attempts.iter().filter(|a| ev_str(a, "mechanism") != m) {
            args.push("--deny-program");
            args.push(ev_str(a, "program"));
        }
        let (link, mut agent, conn, exp) = connected(&format!("pka{i}"), 101 + i as u8, 12, &args);
        let _hole = link.b.blackhole_from(link.a_ip);
        set_keepalive(&conn.client, Some(1), Some(1), Some(3));
        let timers = |evs: &[Value]| of_kind_in_order(evs, "keepalive_timer");
        let evs = wait_socket_events(
            &agent,
            exp.cookie,
            &format!("{m}: the keepalive expiry with probes_out 2"),
            |evs| timers(evs).iter().any(|e| ev_u64(e, "probes_out") >= 2),
        );
        let t: Vec<Value> = timers(&evs)
            .into_iter()
            .filter(|e| ev_u64(e, "probes_out") <= 2)
            .collect();
        let probes: Vec<u64> = t.iter().map(|e| ev_u64(e, "probes_out")).collect();
        // One event per expiry, in order: probes_out 0, 1, 2. One of the
        // three missing is tolerated and noted with what the agent said:
        // stop 33's second CI run lost the probes_out 2 expiry here (host,
        // after 40 other agents; never alone in 6 runs), its first run an
        // error report in `s2_user_timeout`; the cause is not found. A
        // mechanism that misses expiries as a rule, repeats one or reads
        // another socket still fails.
        assert!(
            probes.windows(2).all(|w| w[0] < w[1]) && probes.len() >= 2,
            "{m}: one event per keepalive expiry, in order: {t:#?}"
        );
        if probes.len() < 3 {
            let tuple = (
                ev_str(&t[0], "local").to_owned(),
                ev_str(&t[0], "remote").to_owned(),
            );
            let same_tuple: Vec<String> = agent
                .events()
                .iter()
                .filter(|e| {
                    ev_str(e, "local") == tuple.0
                        && ev_str(e, "remote") == tuple.1
                        && ev_u64(e, "cookie") != exp.cookie
                })
                .map(|e| e.to_string())
                .collect();
            let said: Vec<String> = agent
                .logs()
                .iter()
                .filter(|l| l["message"] != "event" && ev_str(l, "level") != "INFO")
                .map(|l| l.to_string())
                .collect();
            test_note(&format!(
                "{m}: keepalive expiries seen with probes_out {probes:?} (one lost); events of its 4-tuple under another cookie: {same_tuple:?}; the agent's warnings: {said:?}"
            ));
        }
        agent.stop();
        for e in &t {
            exp.check_established(e, "keepalive_timer", m, true, &conn);
        }
        drop(conn);
    }
}

/// The timewait timer programs (`tw_timer_start`, `tw_timer_expire`):
/// three connections from namespace `a` (`tcp_fin_timeout` 3) to a server
/// in `b` that keeps every accepted socket open:
/// - `orphan`: the client close()s, the server never closes: one start in
///   the FIN_WAIT2 substate (the socket's cookie, 4-tuple, namespace inode
///   and its `tcp_fin_timeout`, which is the requested delay;
///   the bucket expiry at or after the requested one, within an eighth of
///   the delay, which is `tcp_fin_timeout`), then one expiry in FIN_WAIT2
///   at or after that bucket, about 3 s later;
/// - `normal`: the client close()s, then the server: a start in FIN_WAIT2,
///   then the re-arm in TIME_WAIT (the peer's FIN), no expiry (TIME_WAIT
///   lasts 60 s);
/// - `shut`: the client shuts down its write side (not an orphan: a full
///   FIN_WAIT2 socket), the server closes: the TIME_WAIT socket this
///   creates is no FIN_WAIT2 timeout, no event at all.
///
/// Mutation: `tw_start_event` inserting nothing into `TCPSTALL_TW` (the
/// `TW.insert` line removed) -> fails with "waiting for the expiry of the
/// orphan's FIN_WAIT2 timeout".
#[test]
fn tw_timer_program_fields() {
    require_tools();
    let plan = super::doctor_json();
    for probe in ["tw_timer_start", "tw_timer_expire"] {
        assert!(
            !super::working_mechanisms(&plan, probe).is_empty(),
            "no working {probe} program: {:#?}",
            super::probe_attempts(&plan, probe)
        );
    }
    let link = Link::new("ptw", 63);
    link.a.sysctl("net.ipv4.tcp_fin_timeout", "3");
    let mut agent = Agent::start(&[]);
    let server = SocketAddr::from((link.b_ip, 8083));
    let listener = listen_in(&link.b, server);
    let open = |name: &str| {
        let client = connect_in(&link.a, server);
        let (accepted, _) = listener.accept().expect("accept");
        let local = client.local_addr().expect("local");
        eprintln!("{name}: {local} -> {server}, cookie {}", so_cookie(&client));
        (so_cookie(&client), local, client, accepted)
    };
    let netns = link.a.inode();
    let check = |e: &Value, kind: &str, cookie: u64, local: SocketAddr, state: &str| {
        assert_eq!(ev_str(e, "kind"), kind, "kind: {e}");
        assert_eq!(ev_str(e, "mechanism"), "timer_tracepoint", "mechanism: {e}");
        assert_eq!(ev_u64(e, "cookie"), cookie, "cookie: {e}");
        assert_eq!(ev_str(e, "local"), local.to_string(), "local: {e}");
        assert_eq!(ev_str(e, "remote"), server.to_string(), "remote: {e}");
        assert_eq!(ev_u64(e, "netns"), netns, "netns inode: {e}");
        assert_eq!(ev_str(e, "state"), state, "substate: {e}");
    };
    let tw = |e: &Value, k: &str| ev_u64(e, &format!("tw_{k}"));

    let (orphan, o_local, o_client, _o_accepted) = open("orphan");
    let (normal, n_local, n_client, n_accepted) = open("normal");
    let (shut, s_local, s_client, s_accepted) = open("shut");
    drop(o_client);
    drop(n_client);
    wait_socket_events(
        &agent,
        normal,
        "the normal close's FIN_WAIT2 start",
        |evs| !of_kind_in_order(evs, "tw_timer_start").is_empty(),
    );
    drop(n_accepted);
    s_client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    thread::sleep(Duration::from_millis(200));
    drop(s_accepted);
    let o = wait_socket_events(
        &agent,
        orphan,
        "the expiry of the orphan's FIN_WAIT2 timeout",
        |evs| !of_kind_in_order(evs, "tw_timer_expire").is_empty(),
    );
    let n = wait_socket_events(&agent, normal, "the re-arm for TIME_WAIT", |evs| {
        of_kind_in_order(evs, "tw_timer_start").len() >= 2
    });
    thread::sleep(Duration::from_millis(500));
    let all = agent.events();
    agent.stop();
    drop(s_client);

    let starts = of_kind_in_order(&o, "tw_timer_start");
    let ends = of_kind_in_order(&o, "tw_timer_expire");
    assert_eq!((starts.len(), ends.len()), (1, 1), "orphan: {o:#?}");
    let (st, en) = (&starts[0], &ends[0]);
    check(st, "tw_timer_start", orphan, o_local, "FIN_WAIT2");
    check(en, "tw_timer_expire", orphan, o_local, "FIN_WAIT2");
    let (jst, bucket, expires) = (
        ev_u64(st, "jiffies"),
        tw(st, "bucket_expiry"),
        tw(st, "expires"),
    );
    let delay = expires.saturating_sub(jst);
    assert!(
        bucket >= expires && bucket - expires <= delay / 8 + 1,
        "bucket expiry {bucket} vs requested {expires} (delay {delay} jiffies): {st}"
    );
    assert_eq!(
        tw(st, "netns_fin_timeout_j"),
        delay,
        "the namespace's tcp_fin_timeout (jiffies) is the requested delay: {st}"
    );
    let jen = ev_u64(en, "jiffies");
    assert!(
        jen >= bucket && jen - bucket < delay,
        "expiry at jiffies {jen}, bucket {bucket}, delay {delay}: {en}"
    );
    let secs = (ev_u64(en, "ts_ns") - ev_u64(st, "ts_ns")) as f64 / 1e9;
    eprintln!(
        "orphan: FIN_WAIT2 timeout ran {secs:.3} s (delay {delay} jiffies, bucket +{})",
        bucket - expires
    );
    assert!(
        (2.95..4.0).contains(&secs),
        "orphan's FIN_WAIT2 timeout (tcp_fin_timeout 3) ran {secs:.3} s: {o:#?}"
    );

    let n_starts = of_kind_in_order(&n, "tw_timer_start");
    assert_eq!(n_starts.len(), 2, "normal close: {n:#?}");
    check(&n_starts[0], "tw_timer_start", normal, n_local, "FIN_WAIT2");
    check(&n_starts[1], "tw_timer_start", normal, n_local, "TIME_WAIT");
    assert!(
        of_kind_in_order(&n, "tw_timer_expire").is_empty(),
        "normal close: no expiry within TIME_WAIT's 60 s: {n:#?}"
    );
    let s_evs: Vec<&Value> = all
        .iter()
        .filter(|e| ev_u64(e, "cookie") == shut && ev_str(e, "kind").starts_with("tw_"))
        .collect();
    assert!(
        s_evs.is_empty(),
        "shut ({s_local}): a TIME_WAIT socket of a full FIN_WAIT2 socket is no FIN_WAIT2 timeout: {s_evs:#?}"
    );
}

/// The ring's wake-up follows the reader's mode (`TCPSTALL_READER`): a
/// reader asleep on the ring's fd (as the agent is on a quiet node) is
/// woken by the kernel when a record arrives, and the record is there.
/// The wait (epoll) starts before the connection is made, so only a
/// wake-up ends it (a broken wake-up leaves it to its 30 s timeout).
/// Mutation: `emit` submitting with `BPF_RB_NO_WAKEUP` while the reader is
/// asleep (flags 0 -> NO_WAKEUP) -> "the asleep reader was not woken".
#[test]
fn ring_wakes_the_asleep_reader() {
    use tcpstall::kernel::reader::ASLEEP;
    use tcpstall::kernel::{
        event::{EventKind, SockEvent},
        loader::{self, LoaderOptions},
    };
    require_tools();
    let link = Link::new("rwk", 144);
    let server = SocketAddr::new(link.b_ip.into(), 8080);
    let listener = listen_in(&link.b, server);
    let mut loaded = loader::load(&LoaderOptions::default()).expect("loading the probes");
    let mut ring = loaded.take_events().expect("ring");
    let mut mode = loaded.take_reader_mode().expect("reader mode map");
    mode.set(0, ASLEEP, 0).expect("set the reader asleep");
    while ring.next().is_some() {}
    // epoll, not poll(2): poll re-checks the fd when it times out (and
    // would find the record without any wake-up); epoll reports the fd
    // only when the kernel woke its wait queue (or when it is added with
    // data already waiting, which other traffic on the node may cause: the
    // test holds then too).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&ring);
    // SAFETY: plain syscalls; `ep` is closed below, the ring outlives it.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        ep >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    let mut add = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 1,
    };
    let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut add) };
    assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    let poller = thread::spawn(move || {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one event slot; `ep` stays open until the join.
        unsafe { libc::epoll_wait(ep, &mut ev, 1, 30_000) }
    });
    // Let the poller block first (a wake-up before it waits is kept on
    // the epoll ready list: the test holds either way).
    thread::sleep(Duration::from_millis(300));
    let client = connect_in(&link.a, server);
    let accepted = listener.accept().expect("accept");
    // The server's FIN: the client's change to CLOSE_WAIT is reported
    // (a connection without trouble that is only opened reports nothing).
    accepted
        .0
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let ready = poller.join().expect("poller");
    // SAFETY: our epoll fd.
    unsafe { libc::close(ep) };
    assert_eq!(ready, 1, "the asleep reader was not woken within 30 s");
    // Our connection's events are in the ring (read until seen: other
    // traffic on the node shares it).
    let local = client.local_addr().expect("local");
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "no state event of our connection in the ring",
        || {
            while let Some(item) = ring.next() {
                if let Ok(ev) = SockEvent::decode(&item)
                    && ev.kind == EventKind::State
                    && ev.local == local
                    && ev.remote == server
                {
                    return Ok(());
                }
            }
            Err("not yet".to_owned())
        },
    );
    drop((client, accepted));
}

/// The per-second program statistics come from one `BPF_OBJ_GET_INFO_BY_FD`
/// per program (no fdinfo file opened and parsed every second): with
/// run-time accounting on and one connection of ours made, every program's
/// run count, run time and recursion misses read that way are at most what
/// its fdinfo says just after (the kernel's counters only grow), and the
/// state program has run (our connection changed state).
/// Mutation: `info[25]` (run_cnt) -> `info[24]` (run_time_ns) in
/// `stats::prog_info` reads a run count above the fdinfo's.
#[test]
fn program_stats_by_fd_agree_with_fdinfo() {
    use tcpstall::kernel::loader::{self, LoaderOptions};
    require_tools();
    let link = Link::new("psf", 167);
    let server = SocketAddr::new(link.b_ip.into(), 8080);
    let listener = listen_in(&link.b, server);
    let loaded = loader::load(&LoaderOptions::default()).expect("loading the probes");
    let stats = loaded
        .program_stats(true)
        .expect("program statistics with run-time accounting");
    let client = connect_in(&link.a, server);
    let accepted = listener.accept().expect("accept");
    drop((client, accepted));
    thread::sleep(Duration::from_millis(200));
    let by_fd = stats.read().expect("program info by fd");
    let fdinfo = stats.read_fdinfo().expect("program fdinfo");
    assert_eq!(by_fd.len(), fdinfo.len());
    assert!(!by_fd.is_empty(), "no attached program listed");
    for (a, b) in by_fd.iter().zip(&fdinfo) {
        assert_eq!(a.program, b.program);
        assert!(
            a.run_count <= b.run_count
                && a.run_time_ns <= b.run_time_ns
                && a.recursion_misses <= b.recursion_misses,
            "{}: by fd {a:?}, fdinfo just after {b:?}",
            a.program
        );
    }
    let state = by_fd
        .iter()
        .find(|p| p.program.starts_with("tcpstall_state"))
        .expect("a state program attached");
    assert!(
        state.run_count > 0 && state.run_time_ns > 0,
        "the state program shows no runs by fd after our connection: {state:?}"
    );
}
