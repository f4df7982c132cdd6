//! The guard in every kernel (the host and each QEMU guest of the matrix):
//! std sockets only (no python, no Postgres in the guests), each created
//! with the test process moved into a kubelet-style pod cgroup (the socket
//! is the cgroup's, as a pod's process' would be), the real agent with a
//! policy naming the pods by namespace:
//!
//! - enforce (`shop`, 5 s user timeout, `tcp_retries2` 15 in the clients'
//!   namespace): a socket without timeouts reads back TCP_USER_TIMEOUT 5000
//!   right after connect and, its server blackholed, its `read()` fails with
//!   ETIMEDOUT 5-7 s after its write, while the stall API predicted from the
//!   rule's 5 s and named it (`guarded_by`);
//! - a socket that set its own TCP_USER_TIMEOUT before connect keeps it
//!   (reported as kept);
//! - a socket in a pod outside every rule, and one in the test's own
//!   cgroup, are untouched and not reported; the unguarded one is still
//!   established when the guarded one died (its horizon is 924.6 s);
//! - dry-run (`lab`): nothing changes (still established too), and the
//!   report lists exactly the sockets enforce changed for the same pair,
//!   socket by socket;
//! - a passive socket: the server pod's rule (`db`, 6 s) arms the socket
//!   `accept()` returns (its listener was created in the pod);
//! - keepalive (`pool`, idle 2 s, interval 1 s, 2 probes): an idle socket
//!   gets keepalive on with those values and dies within the rule's
//!   keepalive horizon once its peer is blackholed;
//! - metrics per (namespace, rule, action, mode) and one log line per (pod,
//!   rule).
//!
//! A kernel without the `bpf_setsockopt` options the guard needs (BTF
//! function `tcp_sock_set_keepidle_locked`, found in the running kernel's
//! BTF here, as the agent does) must say so in doctor and keep the guard
//! off: checked instead of the above there.
//!
//! The host also runs the same guard against psql and Postgres
//! (tests/guard.rs). Privileged: root, BPF, namespaces, cgroup2.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpstall_tests::*;

/// The enforce rule's user timeout (s).
const UTO_S: u64 = 5;
/// The server pod's rule (s).
const PASSIVE_UTO_S: u64 = 6;
/// The keepalive rule: idle, interval (s), probes.
const KA: (u32, u32, u32) = (2, 1, 2);

/// The BTF function whose presence marks the `bpf_setsockopt` options the
/// guard sets from sock_ops (the agent's `GUARD_SETSOCKOPT_FUNC`).
const SETSOCKOPT_FUNC: &str = "tcp_sock_set_keepidle_locked";

fn kernel_offers_the_guard() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("/sys/kernel/btf/vmlinux");
    let needle = [b"\0", SETSOCKOPT_FUNC.as_bytes(), b"\0"].concat();
    let offered = btf.windows(needle.len()).any(|w| w == needle.as_slice());
    eprintln!("GUARD OFFERED | {SETSOCKOPT_FUNC} in BTF: {offered}");
    offered
}

/// The preferred program (`tcpstall_guard_direct`).
#[test]
fn guard_arms_timeouts_per_pod_rule() {
    scenario("gdk", 97, &[], "tcpstall_guard_direct");
}

/// The last fallback (`tcpstall_guard_plain`: no socket pointer passed to a
/// helper), chosen by refusing the direct one as a kernel would.
#[test]
fn guard_plain_fallback_arms_timeouts_per_pod_rule() {
    scenario(
        "gdp",
        98,
        &["--deny-program", "tcpstall_guard_direct"],
        "tcpstall_guard_plain",
    );
}

fn int(s: &impl std::os::fd::AsRawFd, level: i32, opt: i32) -> i32 {
    sockopt_int(s, level, opt)
}

fn user_timeout(s: &impl std::os::fd::AsRawFd) -> i32 {
    int(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)
}

/// A client connection without timeouts (SO_LINGER {on, 0} only).
fn plain_client(ns: &Netns, server: SocketAddr) -> TcpStream {
    let s = connect_in(ns, server);
    set_linger_zero(&s);
    s
}

/// `(actions, kept)` of a record.
fn actions(rec: &Value) -> (Vec<String>, Vec<String>) {
    (json_strs(&rec["actions"]), json_strs(&rec["kept"]))
}

/// Where the kernel lacks the guard's setsockopt options: doctor names the
/// function and says the guard stays off, the agent with a policy runs
/// with the guard off, and a socket in a covered pod is left as it is.
fn guard_stays_off(fx: &mut TaskPods, tag: &str, subnet: u8, extra: &[&str]) {
    let doctor = run_ok(
        std::process::Command::new(agent_path())
            .arg("doctor")
            .args(extra),
        "tcpstall doctor",
    );
    let lines: Vec<&str> = doctor
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("guard "))
        .skip(1)
        .take_while(|l| l.starts_with("      "))
        .collect();
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.contains(SETSOCKOPT_FUNC) && l.contains("the guard stays off")),
        "doctor must say why the guard is off on this kernel:\n{doctor}"
    );
    let shop = fx.pod(1, "shop", "web-1");
    let policy = fx.tmp.join("guard.toml");
    write_file(
        &policy,
        &format!(
            "mode = \"enforce\"\n[[rule]]\nname = \"shop\"\nnamespace = \"{}\"\nuser_timeout = \"{UTO_S}s\"\n",
            shop.namespace
        ),
    );
    let agent = fx.agent_with_policy(&policy, extra);
    let g = agent.guard();
    assert_eq!(g["enabled"], false, "{g}");
    assert!(
        ev_str(&g, "off_reason").contains(SETSOCKOPT_FUNC),
        "the guard API says why it is off: {g}"
    );
    let link = Link::new(tag, subnet);
    let server = SocketAddr::from((link.b_ip, 9000));
    let listener = listen_in(&link.b, server);
    let c = in_cgroup(&shop.cgroup, || plain_client(&link.a, server));
    let _accepted = listener.accept().expect("accept");
    assert_eq!(user_timeout(&c), 0, "the guard is off: nothing set");
}

fn scenario(tag: &'static str, subnet: u8, extra: &[&str], program: &str) {
    require_tools();
    let mut fx = TaskPods::new(tag);
    if !kernel_offers_the_guard() {
        guard_stays_off(&mut fx, tag, subnet, extra);
        return;
    }
    let shop = fx.pod(1, "shop", "web-1");
    let lab = fx.pod(2, "lab", "web-1");
    let dev = fx.pod(3, "dev", "web-1");
    let db = fx.pod(4, "db", "postgres-0");
    let pool = fx.pod(5, "pool", "worker-0");
    let policy = fx.tmp.join("guard.toml");
    write_file(
        &policy,
        &format!(
            r#"mode = "enforce"

[[rule]]
name = "shop-enforce"
namespace = "{}"
user_timeout = "{UTO_S}s"

[[rule]]
name = "lab-dry"
namespace = "{}"
user_timeout = "{UTO_S}s"
mode = "dry-run"

[[rule]]
name = "db-server"
namespace = "{}"
user_timeout = "{PASSIVE_UTO_S}s"

[[rule]]
name = "pool-keepalive"
namespace = "{}"
keepalive = {{ idle = "{}s", interval = "{}s", count = {} }}
"#,
            shop.namespace, lab.namespace, db.namespace, pool.namespace, KA.0, KA.1, KA.2
        ),
    );

    let link = Link::new(tag, subnet);
    link.a.sysctl("net.ipv4.tcp_retries2", "15");
    let agent = fx.agent_with_policy(&policy, extra);
    let (_, plan) = agent.http_get("/api/v1/plan");
    let plan: Value = serde_json::from_str(&plan).expect("plan JSON");
    let guard_probe = plan["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .find(|p| p["probe"] == "guard")
        .expect("guard probe in the plan");
    assert_eq!(guard_probe["program"], program, "{guard_probe}");
    // Every rule's pod cgroup is in the kernel map before any socket.
    agent.wait_guard_covers(&["shop-enforce", "lab-dry", "db-server", "pool-keepalive"]);

    // The server the clients talk to: the test's own (no rule covers it).
    let server = SocketAddr::from((link.b_ip, 9000));
    let listener = listen_in(&link.b, server);
    let held = Arc::new(Mutex::new(Vec::new()));
    let holder = held.clone();
    thread::spawn(move || {
        for s in listener.incoming() {
            match s {
                Ok(s) => {
                    set_linger_zero(&s);
                    holder.lock().unwrap().push(s);
                }
                Err(_) => break,
            }
        }
    });
    let own_ms = 3_000;
    let (shop_plain, shop_own) = in_cgroup(&shop.cgroup, || {
        (
            plain_client(&link.a, server),
            connect_with_user_timeout_in(&link.a, server, own_ms),
        )
    });
    let (lab_plain, lab_own) = in_cgroup(&lab.cgroup, || {
        (
            plain_client(&link.a, server),
            connect_with_user_timeout_in(&link.a, server, own_ms),
        )
    });
    let dev_plain = in_cgroup(&dev.cgroup, || plain_client(&link.a, server));
    let pool_idle = in_cgroup(&pool.cgroup, || plain_client(&link.a, server));
    let local = |s: &TcpStream| s.local_addr().expect("local addr").to_string();

    // What the applications read back right after connect.
    assert_eq!(user_timeout(&shop_plain), 1000 * UTO_S as i32, "enforced");
    assert_eq!(user_timeout(&shop_own), own_ms as i32, "kept");
    assert_eq!(user_timeout(&lab_plain), 0, "dry-run changes nothing");
    assert_eq!(user_timeout(&lab_own), own_ms as i32);
    assert_eq!(user_timeout(&dev_plain), 0, "outside every rule");
    assert_eq!(int(&dev_plain, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
    assert_eq!(
        [
            int(&pool_idle, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            int(&pool_idle, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            int(&pool_idle, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            int(&pool_idle, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            user_timeout(&pool_idle),
        ],
        [1, KA.0 as i32, KA.1 as i32, KA.2 as i32, 0],
        "keepalive rule: SO_KEEPALIVE, idle, interval, count, user timeout"
    );

    // Passive: the server pod's rule arms the accepted socket (its listener
    // was created in the pod); the client, in the test's own cgroup, is
    // untouched.
    let db_addr = SocketAddr::from((link.b_ip, 9001));
    let db_listener: TcpListener = in_cgroup(&db.cgroup, || listen_in(&link.b, db_addr));
    let db_client = plain_client(&link.a, db_addr);
    let (accepted, peer) = db_listener.accept().expect("accept");
    set_linger_zero(&accepted);
    assert_eq!(peer, db_client.local_addr().unwrap());
    assert_eq!(
        user_timeout(&accepted),
        1000 * PASSIVE_UTO_S as i32,
        "passive"
    );
    assert_eq!(user_timeout(&db_client), 0, "the test's own cgroup");

    // The report: every socket a rule acted on, none other.
    let locals = [
        ("shop_plain", local(&shop_plain)),
        ("shop_own", local(&shop_own)),
        ("lab_plain", local(&lab_plain)),
        ("lab_own", local(&lab_own)),
        ("pool", local(&pool_idle)),
        ("db_accepted", local(&accepted)),
    ];
    let g = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        "the guard's records of the six sockets",
        || {
            let g = agent.guard();
            let missing: Vec<&str> = locals
                .iter()
                .filter(|(_, l)| guard_record(&g, l).is_none())
                .map(|(n, _)| *n)
                .collect();
            if missing.is_empty() {
                Ok(g)
            } else {
                Err(format!("missing {missing:?}: {}", g["sockets"]))
            }
        },
    );
    let rec = |s: &TcpStream| guard_record(&g, &local(s)).expect("record");
    let summary = |s: &TcpStream| {
        let r = rec(s);
        let (a, k) = actions(&r);
        (
            ev_str(&r, "rule").to_owned(),
            ev_str(&r, "mode").to_owned(),
            a,
            k,
        )
    };
    for (what, s) in [
        ("outside every rule", &dev_plain),
        ("own cgroup", &db_client),
    ] {
        assert!(
            guard_record(&g, &local(s)).is_none(),
            "a socket {what} is not reported: {}",
            g["sockets"]
        );
    }
    let ut = vec!["user_timeout".to_owned()];
    assert_eq!(
        summary(&shop_plain),
        ("shop-enforce".into(), "enforce".into(), ut.clone(), vec![])
    );
    assert_eq!(
        summary(&shop_own),
        ("shop-enforce".into(), "enforce".into(), vec![], ut.clone())
    );
    assert_eq!(rec(&shop_own)["found_user_timeout_ms"], own_ms);
    // Dry-run reports exactly what enforce does, socket by socket.
    assert_eq!(actions(&rec(&lab_plain)), actions(&rec(&shop_plain)));
    assert_eq!(actions(&rec(&lab_own)), actions(&rec(&shop_own)));
    assert_eq!(summary(&lab_plain).1, "dry-run");
    assert_eq!(rec(&lab_plain)["user_timeout_ms"], 1000 * UTO_S);
    let by_rule = |rule: &str| -> BTreeMap<String, Vec<String>> {
        g["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["rule"] == rule && !json_strs(&s["actions"]).is_empty())
            .map(|s| (ev_str(s, "local").to_owned(), json_strs(&s["actions"])))
            .collect()
    };
    assert_eq!(
        by_rule("lab-dry").into_values().collect::<Vec<_>>(),
        by_rule("shop-enforce").into_values().collect::<Vec<_>>(),
        "the dry-run rule would change exactly what the enforce rule changed"
    );
    let db_rec = rec(&accepted);
    assert_eq!(
        (ev_str(&db_rec, "rule"), ev_str(&db_rec, "side")),
        ("db-server", "passive"),
        "{db_rec}"
    );
    let pool_rec = rec(&pool_idle);
    assert_eq!(
        json_strs(&pool_rec["actions"]),
        vec!["keepalive"],
        "{pool_rec}"
    );
    assert_eq!(
        (
            &pool_rec["keepalive_idle_s"],
            &pool_rec["keepalive_interval_s"],
            &pool_rec["keepalive_count"]
        ),
        (&Value::from(KA.0), &Value::from(KA.1), &Value::from(KA.2))
    );

    // Metrics: one socket per action.
    let m = agent.metrics();
    let count = |ns: &str, rule: &str, action: &str, mode: &str| {
        metric_sum(
            &m,
            "tcpstall_guard_sockets_total",
            &[
                ("namespace", ns),
                ("rule", rule),
                ("action", action),
                ("mode", mode),
            ],
        )
    };
    for (ns, rule, action, mode) in [
        (&shop.namespace, "shop-enforce", "user_timeout", "enforce"),
        (
            &shop.namespace,
            "shop-enforce",
            "kept_user_timeout",
            "enforce",
        ),
        (&lab.namespace, "lab-dry", "user_timeout", "dry-run"),
        (&db.namespace, "db-server", "user_timeout", "enforce"),
    ] {
        assert_eq!(count(ns, rule, action, mode), Some(1.0), "{rule} {action}");
    }
    assert_eq!(
        count(&dev.namespace, "", "user_timeout", "enforce"),
        None,
        "nothing for the pod outside the rules"
    );
    // One log line per (pod, rule).
    let first: Vec<Value> = agent
        .logs()
        .into_iter()
        .filter(|l| {
            l["message"] == "guard: first socket of this pod under this rule"
                && l["namespace"] == shop.namespace.as_str()
        })
        .collect();
    assert_eq!(first.len(), 1, "{first:?}");

    // The blackhole: the guarded socket dies at its rule's user timeout;
    // the unguarded and the dry-run ones are still established then.
    let blackhole = link.b.blackhole_from(link.a_ip);
    let mut writes = Vec::new();
    for s in [&shop_plain, &lab_plain, &dev_plain] {
        let mut s = s;
        s.write_all(&[b'x'; 1000])
            .expect("write into the blackhole");
        writes.push(monotonic_ns());
    }
    let t_blackhole = writes[0];
    let pool_reader = await_read_error(
        pool_idle.try_clone().expect("clone"),
        Duration::from_secs(30),
    );
    let shop_reader = await_read_error(
        shop_plain.try_clone().expect("clone"),
        Duration::from_secs(30),
    );
    let shop_addr: SocketAddr = shop_plain.local_addr().unwrap();
    let views = agent.views_until(shop_addr, server, &shop_reader, Duration::from_millis(50));
    let (died_ns, errno) = shop_reader.join().expect("reader");
    assert_eq!(errno, Some(libc::ETIMEDOUT), "the guarded socket's end");
    let after = (died_ns - writes[0]) as f64 / 1e9;
    assert!(
        (UTO_S as f64..UTO_S as f64 + 2.0).contains(&after),
        "the guarded socket failed {after:.2} s after its write ({UTO_S}-{} s expected)",
        UTO_S + 2
    );
    // The prediction followed the rule's boundary, and the stall named it.
    let last = views
        .iter()
        .rev()
        .find(|(t, _)| *t < died_ns)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("the agent never listed the guarded socket's stall"));
    assert_eq!(last["boundary_source"], "user_timeout", "{last}");
    assert_eq!(last["boundary_s"].as_f64(), Some(UTO_S as f64), "{last}");
    assert_eq!(last["guarded_by"]["rule"], "shop-enforce", "{last}");
    // Keepalive: idle, then the probes an interval apart, all unanswered.
    let (pool_died, pool_errno) = pool_reader.join().expect("keepalive reader");
    assert_eq!(
        pool_errno,
        Some(libc::ETIMEDOUT),
        "the keepalive socket's end"
    );
    let horizon = (KA.0 + KA.1 * KA.2) as f64;
    let ka_after = (pool_died.saturating_sub(t_blackhole)) as f64 / 1e9;
    assert!(
        ka_after <= horizon + 1.0,
        "the keepalive socket died {ka_after:.2} s after the blackhole (rule horizon {horizon} s)"
    );
    let est = link.a.exec("ss -tnH state established");
    for (what, s) in [("unguarded", &dev_plain), ("dry-run", &lab_plain)] {
        let mut s = s;
        s.set_nonblocking(true).expect("nonblocking");
        let r = s.read(&mut [0u8; 1]);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "the {what} socket must still hang (924.6 s horizon): read gave {r:?}"
        );
        assert!(
            est.contains(&local(s)),
            "the {what} socket must still be established:\n{est}"
        );
    }
    // Clean close: every socket of the run is reset and gone at once.
    drop(blackhole);
    drop((
        shop_plain,
        shop_own,
        lab_plain,
        lab_own,
        dev_plain,
        pool_idle,
        db_client,
        accepted,
        db_listener,
    ));
    held.lock().unwrap().clear();
    for ns in [&link.a, &link.b] {
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(100),
            "the run's sockets gone after close",
            || {
                let left = ns.exec(
                    "ss -tanH state all '( dport = :9000 or sport = :9000 or dport = :9001 or sport = :9001 )' | grep -v LISTEN || true",
                );
                if left.trim().is_empty() {
                    Ok(())
                } else {
                    Err(left)
                }
            },
        );
    }
}
