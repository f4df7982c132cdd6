//! The guard end to end: real processes (python3 clients and a server) in
//! network namespaces, placed in kubelet-style pod cgroups with containerd
//! state naming their pods, the real agent with a policy:
//!
//! - enforce (`shop`, 10 s user timeout, `tcp_retries2` 15 in the client's
//!   namespace): a client without timeouts gets TCP_USER_TIMEOUT 10000 at
//!   connect and, its server blackholed, fails with ETIMEDOUT 10-12 s after
//!   its write, while an unguarded client (pod `dev`, no rule) and the
//!   dry-run one in the same run are still connected then (their horizon is
//!   924.6 s: checked in the kernel's socket table, not by racing a clock);
//!   the stall API names the rule (`guarded_by`) and predicts from it;
//! - a client that set its own TCP_USER_TIMEOUT keeps it (reported as kept);
//! - a pod outside every rule is untouched and not reported;
//! - dry-run (`lab`): nothing changes, and the report lists exactly the
//!   sockets enforce changes for the same pair of clients, socket by socket;
//! - a passive socket: the server pod's rule (`db`, 7 s) arms the accepted
//!   socket;
//! - keepalive (`pool`, idle 2 s, interval 1 s, 2 probes): an idle
//!   connection without keepalive gets it and dies within the rule's
//!   keepalive horizon once its peer is blackholed.
//!
//! Privileged (root, BPF, namespaces, cgroup2): run through `cargo xtask test`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ChildStdin, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver},
    },
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpstall_tests::{
    Agent, Cgroups, Link, Proc, Scratch, TaskPod, agent_path, cgroup2_root, connect_in, ev_str,
    listen_in, make_task_pod, metric_sum, require, require_tools, run_ok, spawn_in_cgroup,
    wait_until, write_file,
};

// The same guard against psql and a real Postgres server.
#[path = "guard/psql.rs"]
mod psql;

const CLIENT: &str = r#"
import errno, json, socket, struct, sys, time
host, port, own, send = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "send"
def report(**kw):
    print(json.dumps(kw), flush=True)
s = socket.socket()
# Killed at the end of the test: reset, not orphaned with its unacknowledged
# data (retransmitted for minutes in a namespace deleted meanwhile).
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
if own:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, own)
s.connect((host, port))
report(local="%s:%d" % s.getsockname(),
       user_timeout=s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
       keepalive=s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
       keepidle=s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
       keepcnt=s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
sys.stdin.readline()
t0 = time.monotonic()
try:
    if send:
        s.sendall(b"x" * 1000)
    s.recv(1)
    report(result="eof", after=time.monotonic() - t0)
except OSError as e:
    report(result=errno.errorcode.get(e.errno, str(e.errno)), after=time.monotonic() - t0)
"#;

const SERVER: &str = r#"
import json, socket, struct, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(8)
print(json.dumps({"listening": True}), flush=True)
c, peer = ls.accept()
print(json.dumps({"local": "%s:%d" % c.getsockname(), "peer": "%s:%d" % peer,
                  "user_timeout": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)}), flush=True)
sys.stdin.readline()
"#;

/// A run's pods: a scratch directory (containerd state naming the pods),
/// their cgroups; all removed on drop (cgroups first: their processes are
/// killed).
struct Pods {
    cgroups: Cgroups,
    tmp: PathBuf,
    _scratch: Scratch,
    cg_root: PathBuf,
    /// Namespaces are `<name>-<tag><pid>`.
    tag: &'static str,
}

impl Pods {
    fn new(tag: &'static str) -> Self {
        let pid = std::process::id();
        let tmp = std::env::temp_dir().join(format!("tcpstall-guard-{tag}{pid}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap();
        Pods {
            cgroups: Cgroups::default(),
            _scratch: Scratch(tmp.clone()),
            tmp,
            cg_root: cgroup2_root(),
            tag,
        }
    }

    /// Pod `name` in namespace `<namespace>-<tag><pid>`; `idx` unique per run.
    fn pod(&mut self, idx: u32, namespace: &str, name: &str) -> TaskPod {
        let tasks = self
            .tmp
            .join("containerd/io.containerd.runtime.v2.task/k8s.io");
        let ns = format!("{namespace}-{}{}", self.tag, std::process::id());
        make_task_pod(&mut self.cgroups, &self.cg_root, &tasks, idx, &ns, name)
    }
}

/// Waits (up to 9 s: before a 10 s user timeout fires) for the stall of
/// the socket at `local` and checks that tcpstall predicts from the rule's
/// 10 s user timeout and names the rule.
fn assert_guarded_stall(agent: &Agent, local: &str, rule: &str) {
    let stall = wait_until(
        Duration::from_secs(9),
        Duration::from_millis(100),
        "the guarded client's stall",
        || {
            agent
                .stalls()
                .into_iter()
                .find(|v| v["local"] == local && v["class"] == "retransmit")
                .ok_or("not yet")
        },
    );
    assert_eq!(stall["boundary_source"], "user_timeout", "{stall}");
    assert_eq!(stall["boundary_s"].as_f64(), Some(10.0), "{stall}");
    assert_eq!(stall["guarded_by"]["rule"], rule, "{stall}");
}

/// A python process in a pod, its JSON lines on a channel.
struct Py {
    _proc: Proc,
    stdin: ChildStdin,
    lines: Receiver<Value>,
}

impl Py {
    fn next(&self, what: &str, timeout: Duration) -> Value {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("{what}: no line from the python process: {e}"))
    }

    fn go(&mut self) {
        self.stdin.write_all(b"go\n").expect("stdin");
        self.stdin.flush().expect("flush");
    }
}

fn python(netns: &str, pod: &TaskPod, script: &str, args: &[&str]) -> Py {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    let mut p = spawn_in_cgroup(
        Some(netns),
        &pod.cgroup,
        Path::new("/usr/bin/python3"),
        &all,
        Stdio::piped(),
        Stdio::piped(),
    );
    let stdin = p.0.stdin.take().expect("stdin");
    let stdout = p.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    Py {
        _proc: p,
        stdin,
        lines: rx,
    }
}

/// (rule, mode, actions, kept) of the guard's record of the socket at
/// `local`, if any.
fn record_of(guard: &Value, local: &str) -> Option<Value> {
    guard["sockets"]
        .as_array()?
        .iter()
        .find(|s| s["local"] == local)
        .cloned()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn guard_doc(agent: &Agent) -> Value {
    let (code, body) = agent.http_get("/api/v1/guard");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("guard JSON")
}

fn established_in(link_ns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            link_ns,
            "ss",
            "-tnH",
            "state",
            "established",
        ])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent with the guard policy `policy`, resolving pods from the
/// containerd state under `tmp` (the other runtimes' roots empty), plus
/// `extra` arguments.
fn agent_with_policy(tmp: &Path, policy: &Path, extra: &[&str]) -> Agent {
    let (containerd, crio) = (tmp.join("containerd"), tmp.join("crio"));
    let (kubelet, docker) = (tmp.join("kubelet"), tmp.join("docker"));
    let mut args = vec![
        "--containerd-state",
        containerd.to_str().unwrap(),
        "--crio-state",
        crio.to_str().unwrap(),
        "--kubelet-root",
        kubelet.to_str().unwrap(),
        "--docker-root",
        docker.to_str().unwrap(),
        "--guard-policy",
        policy.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Agent::start(&args)
}

/// Waits until every rule of `rules` covers a pod cgroup in the kernel map.
fn wait_rules_cover(agent: &Agent, rules: &[&str]) {
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        "the guard covering the pods' cgroups",
        || {
            let g = guard_doc(agent);
            let covered: Vec<String> = g["cgroups"]
                .as_array()
                .map(|a| a.iter().map(|c| ev_str(c, "rule").to_owned()).collect())
                .unwrap_or_default();
            if rules.iter().all(|w| covered.iter().any(|c| c == w)) {
                Ok(())
            } else {
                Err(format!("{}", g["cgroups"]))
            }
        },
    );
}

/// The preferred program (`tcpstall_guard_direct`).
#[test]
fn guard_arms_timeouts_per_pod_rule() {
    scenario(&[], "tcpstall_guard_direct");
}

/// The last fallback (`tcpstall_guard_plain`: no socket pointer passed to a
/// helper), chosen by refusing the direct one as a kernel would.
#[test]
fn guard_plain_fallback_arms_timeouts_per_pod_rule() {
    scenario(
        &["--deny-program", "tcpstall_guard_direct"],
        "tcpstall_guard_plain",
    );
}

fn scenario(extra: &[&str], program: &str) {
    require_tools();
    require(
        Path::new("/usr/bin/python3").exists(),
        "/usr/bin/python3 (the test's clients)",
        "apt-get install python3 (cargo xtask setup installs python3-pip, which pulls it in)",
    );
    let mut fx = Pods::new("g");
    let tmp = fx.tmp.clone();
    let shop = fx.pod(1, "shop", "web-1");
    let lab = fx.pod(2, "lab", "web-1");
    let dev = fx.pod(3, "dev", "web-1");
    let db = fx.pod(4, "db", "postgres-0");
    let pool = fx.pod(5, "pool", "worker-0");
    let policy = tmp.join("guard.toml");
    write_file(
        &policy,
        &format!(
            r#"mode = "enforce"

[[rule]]
name = "shop-10s"
namespace = "{}"
user_timeout = "10s"

[[rule]]
name = "lab-dry"
namespace = "{}"
user_timeout = "10s"
mode = "dry-run"

[[rule]]
name = "db-server"
namespace = "{}"
user_timeout = "7s"

[[rule]]
name = "pool-keepalive"
namespace = "{}"
keepalive = {{ idle = "2s", interval = "1s", count = 2 }}
"#,
            shop.namespace, lab.namespace, db.namespace, pool.namespace
        ),
    );

    let link = Link::new("grd", 77);
    link.a.sysctl("net.ipv4.tcp_retries2", "15");
    let agent = agent_with_policy(&tmp, &policy, extra);
    let (_, plan) = agent.http_get("/api/v1/plan");
    let plan: Value = serde_json::from_str(&plan).expect("plan JSON");
    let guard_probe = plan["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["probe"] == "guard")
        .expect("guard probe in the plan");
    assert_eq!(guard_probe["program"], program, "{guard_probe}");
    // Every rule's pod cgroup is in the kernel map before any socket.
    wait_rules_cover(
        &agent,
        &["shop-10s", "lab-dry", "db-server", "pool-keepalive"],
    );

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
    let host = link.b_ip.to_string();
    let client = |pod: &TaskPod, own: &str, mode: &str| {
        python(&link.a.name, pod, CLIENT, &[&host, "9000", own, mode])
    };
    let mut shop_plain = client(&shop, "0", "send");
    let shop_own = client(&shop, "3000", "idle");
    let mut lab_plain = client(&lab, "0", "send");
    let lab_own = client(&lab, "3000", "idle");
    let mut dev_plain = client(&dev, "0", "send");
    let mut pool_idle = client(&pool, "0", "idle");
    let t = Duration::from_secs(10);
    let c_shop_plain = shop_plain.next("shop client", t);
    let c_shop_own = shop_own.next("shop client with its own timeout", t);
    let c_lab_plain = lab_plain.next("lab client", t);
    let c_lab_own = lab_own.next("lab client with its own timeout", t);
    let c_dev = dev_plain.next("dev client", t);
    let c_pool = pool_idle.next("pool client", t);

    // What the applications see right after connect.
    assert_eq!(
        c_shop_plain["user_timeout"], 10_000,
        "enforced: {c_shop_plain}"
    );
    assert_eq!(c_shop_own["user_timeout"], 3_000, "kept: {c_shop_own}");
    assert_eq!(
        c_lab_plain["user_timeout"], 0,
        "dry-run changes nothing: {c_lab_plain}"
    );
    assert_eq!(c_lab_own["user_timeout"], 3_000, "{c_lab_own}");
    assert_eq!(c_dev["user_timeout"], 0, "outside every rule: {c_dev}");
    assert_eq!(c_dev["keepalive"], 0, "{c_dev}");
    assert_eq!(
        (
            &c_pool["keepalive"],
            &c_pool["keepidle"],
            &c_pool["keepcnt"],
            &c_pool["user_timeout"]
        ),
        (
            &Value::from(1),
            &Value::from(2),
            &Value::from(2),
            &Value::from(0)
        ),
        "keepalive rule: {c_pool}"
    );

    // Passive: the server pod's rule arms the accepted socket.
    let db_server = python(&link.b.name, &db, SERVER, &[&host, "9001"]);
    db_server.next("db server listening", t);
    let db_client = connect_in(&link.a, SocketAddr::from((link.b_ip, 9001)));
    let accepted = db_server.next("db server accepted", t);
    assert_eq!(accepted["user_timeout"], 7_000, "passive: {accepted}");
    assert_eq!(
        ev_str(&accepted, "peer"),
        db_client.local_addr().unwrap().to_string()
    );

    // The report: every socket a rule acted on, none other.
    let locals = [
        ("shop_plain", &c_shop_plain),
        ("shop_own", &c_shop_own),
        ("lab_plain", &c_lab_plain),
        ("lab_own", &c_lab_own),
        ("pool", &c_pool),
        ("db_accepted", &accepted),
    ];
    let g = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        "the guard's records of the six sockets",
        || {
            let g = guard_doc(&agent);
            let missing: Vec<&str> = locals
                .iter()
                .filter(|(_, c)| record_of(&g, ev_str(c, "local")).is_none())
                .map(|(n, _)| *n)
                .collect();
            if missing.is_empty() {
                Ok(g)
            } else {
                Err(format!("missing {missing:?}: {}", g["sockets"]))
            }
        },
    );
    let rec = |c: &Value| record_of(&g, ev_str(c, "local")).expect("record");
    let summary = |c: &Value| {
        let r = rec(c);
        (
            ev_str(&r, "rule").to_owned(),
            ev_str(&r, "mode").to_owned(),
            strs(&r["actions"]),
            strs(&r["kept"]),
        )
    };
    assert!(
        record_of(&g, ev_str(&c_dev, "local")).is_none(),
        "a pod outside every rule is not reported: {}",
        g["sockets"]
    );
    let ut = vec!["user_timeout".to_owned()];
    assert_eq!(
        summary(&c_shop_plain),
        ("shop-10s".into(), "enforce".into(), ut.clone(), vec![])
    );
    assert_eq!(
        summary(&c_shop_own),
        ("shop-10s".into(), "enforce".into(), vec![], ut.clone())
    );
    assert_eq!(rec(&c_shop_own)["found_user_timeout_ms"], 3_000);
    // Dry-run reports exactly what enforce does, socket by socket.
    let actions = |c: &Value| {
        let (_, _, a, k) = summary(c);
        (a, k)
    };
    assert_eq!(actions(&c_lab_plain), actions(&c_shop_plain));
    assert_eq!(actions(&c_lab_own), actions(&c_shop_own));
    assert_eq!(summary(&c_lab_plain).1, "dry-run");
    assert_eq!(rec(&c_lab_plain)["user_timeout_ms"], 10_000);
    let by_rule = |rule: &str| -> BTreeMap<String, Vec<String>> {
        g["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["rule"] == rule && !strs(&s["actions"]).is_empty())
            .map(|s| (ev_str(s, "local").to_owned(), strs(&s["actions"])))
            .collect()
    };
    assert_eq!(
        by_rule("lab-dry").into_values().collect::<Vec<_>>(),
        by_rule("shop-10s").into_values().collect::<Vec<_>>(),
        "the dry-run rule would change exactly what the enforce rule changed"
    );
    let db_rec = rec(&accepted);
    assert_eq!(
        (ev_str(&db_rec, "rule"), ev_str(&db_rec, "side")),
        ("db-server", "passive"),
        "{db_rec}"
    );
    let pool_rec = rec(&c_pool);
    assert_eq!(strs(&pool_rec["actions"]), vec!["keepalive"], "{pool_rec}");
    assert_eq!(
        (
            &pool_rec["keepalive_idle_s"],
            &pool_rec["keepalive_interval_s"],
            &pool_rec["keepalive_count"]
        ),
        (&Value::from(2), &Value::from(1), &Value::from(2))
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
    assert_eq!(
        count(&shop.namespace, "shop-10s", "user_timeout", "enforce"),
        Some(1.0)
    );
    assert_eq!(
        count(&shop.namespace, "shop-10s", "kept_user_timeout", "enforce"),
        Some(1.0)
    );
    assert_eq!(
        count(&lab.namespace, "lab-dry", "user_timeout", "dry-run"),
        Some(1.0)
    );
    assert_eq!(
        count(&db.namespace, "db-server", "user_timeout", "enforce"),
        Some(1.0)
    );
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

    // The blackhole: the guarded client dies at its 10 s user timeout; the
    // unguarded and the dry-run ones are still connected then.
    let _blackhole = link.b.blackhole_from(link.a_ip);
    shop_plain.go();
    lab_plain.go();
    dev_plain.go();
    pool_idle.go();
    assert_guarded_stall(&agent, ev_str(&c_shop_plain, "local"), "shop-10s");
    // `tcpstall top` shows the rule on the socket's row.
    let url = format!("http://{}", agent.listen);
    let table = run_ok(
        std::process::Command::new(agent_path()).args(["top", "--once", "--agent", &url]),
        "tcpstall top --once",
    );
    let row = table
        .lines()
        .find(|l| l.contains(ev_str(&c_shop_plain, "local")))
        .unwrap_or_else(|| panic!("top has no row for the guarded client:\n{table}"));
    assert!(
        row.split_whitespace().any(|w| w == "shop-10s"),
        "top names the guard rule on the guarded client's row:\n{table}"
    );
    let pool_end = pool_idle.next("the keepalive client's end", Duration::from_secs(20));
    let end = shop_plain.next("the guarded client's end", Duration::from_secs(30));
    assert_eq!(end["result"], "ETIMEDOUT", "{end}");
    let after = end["after"].as_f64().unwrap();
    assert!(
        (10.0..12.0).contains(&after),
        "the guarded client failed {after:.2} s after its write (10-12 s expected)"
    );
    // Keepalive: idle 2 s, then 2 probes 1 s apart, all unanswered.
    assert_eq!(pool_end["result"], "ETIMEDOUT", "{pool_end}");
    let ka_after = pool_end["after"].as_f64().unwrap();
    assert!(
        ka_after <= 2.0 + 2.0 * 1.0 + 1.0,
        "the keepalive client died {ka_after:.2} s after the blackhole (rule horizon 4 s)"
    );
    let est = established_in(&link.a.name);
    for (what, c, p) in [
        ("unguarded", &c_dev, &dev_plain),
        ("dry-run", &c_lab_plain, &lab_plain),
    ] {
        assert!(
            p.lines.try_recv().is_err(),
            "the {what} client must still hang (924.6 s horizon)"
        );
        assert!(
            est.contains(ev_str(c, "local")),
            "the {what} client's socket must still be established:\n{est}"
        );
    }
    // Clean close: every socket of the run is reset and gone at once, none
    // left orphaned (FIN-WAIT with unacknowledged data) to retransmit for
    // minutes in a namespace the next test no longer sees.
    drop(_blackhole);
    set_linger_zero(&db_client);
    drop(db_client);
    drop((
        shop_plain, shop_own, lab_plain, lab_own, dev_plain, pool_idle,
    ));
    drop(db_server);
    held.lock().unwrap().clear();
    for ns in [&link.a, &link.b] {
        let left = ns.exec("ss -tanH state all '( dport = :9000 or sport = :9000 or dport = :9001 or sport = :9001 )' | grep -v LISTEN || true");
        assert!(
            left.trim().is_empty(),
            "sockets of the test left in {} after the clients were killed:\n{left}",
            ns.name
        );
    }
    drop(agent);
}

/// SO_LINGER {on, 0}: close resets the connection and frees the socket.
fn set_linger_zero(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}
