//! Least privilege, proven: the capability list is read from the RENDERED
//! DaemonSet (`kubectl kustomize deploy/kubernetes/base`) and the real agent
//! runs with exactly that set (setpriv: bounding, inheritable and ambient
//! sets, no_new_privs, uid 0 as in the manifest), so the manifest and the
//! agent cannot drift apart:
//!
//! - `doctor --json` with the set chooses the same mechanism for every probe
//!   as the agent with full root (CAP_SYSLOG: kallsyms addresses for the
//!   write-timer probe; CAP_NET_ADMIN: sock_ops attach);
//! - an S1 stall (blackholed peer) is detected and its process named
//!   (CAP_SYS_PTRACE: the test process's /proc/<pid>/fd);
//! - `--program-stats` (needs CAP_SYS_ADMIN) fails with one line naming it;
//! - the guard's sock_ops program attaches (doctor) and the agent runs with
//!   a guard policy (`/api/v1/guard` enabled) with exactly that set.
//!
//! Privileged: run through `cargo xtask test`.

use std::{
    io::Write as _,
    net::SocketAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpstall_tests::{
    Agent, Link, agent_path, connect_in, drain_server_in, ev_str, plan_chosen, require,
    require_tools, setpriv_exactly,
};

/// The DaemonSet's `capabilities.add`, from the rendered base.
fn manifest_caps() -> Vec<String> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = Command::new("kubectl")
        .args(["kustomize", "deploy/kubernetes/base"])
        .current_dir(repo)
        .output()
        .expect("kubectl (with kustomize) is required: install kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let ds = text
        .split("\n---\n")
        .map(|d| serde_norway::from_str::<serde_norway::Value>(d).expect("YAML"))
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in the base");
    let c = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(
        c["capabilities"]["drop"][0].as_str(),
        Some("ALL"),
        "the manifest must drop all capabilities first"
    );
    let caps: Vec<String> = c["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|v| v.as_str().expect("cap name").to_owned())
        .collect();
    assert!(!caps.is_empty());
    caps
}

fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "SYSLOG" => 34,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not known to this test: add its number"),
    }
}

fn have_setpriv() {
    let ok = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require(ok, "setpriv (util-linux)", "apt-get install util-linux");
}

fn plan_mechanisms(json: &str) -> Vec<(String, String)> {
    let v: Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("doctor JSON: {e}\n{json}"));
    plan_chosen(&v)
}

#[test]
fn manifest_capabilities_run_doctor_s1_and_refuse_program_stats() {
    require_tools();
    have_setpriv();
    let caps = manifest_caps();
    assert!(
        !caps.iter().any(|c| c == "SYS_ADMIN"),
        "no CAP_SYS_ADMIN in the manifest: {caps:?}"
    );
    let wrap = setpriv_exactly(&caps);

    // 1. doctor: same plan as with full root.
    let full = Command::new(agent_path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    let limited = Command::new(&wrap[0])
        .args(&wrap[1..])
        .arg(agent_path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(
        limited.status.success(),
        "doctor with exactly {caps:?} failed:\n{}",
        String::from_utf8_lossy(&limited.stderr)
    );
    let (full, limited) = (
        plan_mechanisms(&String::from_utf8_lossy(&full.stdout)),
        plan_mechanisms(&String::from_utf8_lossy(&limited.stdout)),
    );
    assert_eq!(
        limited, full,
        "with exactly {caps:?} the agent chooses other mechanisms"
    );
    assert!(
        limited.iter().any(|(p, m)| p == "guard" && m == "sock_ops"),
        "the guard's program must attach with exactly {caps:?}: {limited:?}"
    );

    // 2. --program-stats needs more: one clear line naming the capability.
    let out = Command::new(&wrap[0])
        .args(&wrap[1..])
        .arg(agent_path())
        .args(["run", "--listen", "127.0.0.1:0", "--program-stats"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--program-stats without CAP_SYS_ADMIN must fail"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{err}");
    assert!(
        errors[0].contains("CAP_SYS_ADMIN") && errors[0].contains("--program-stats"),
        "{err}"
    );

    // 3. S1 with exactly the manifest's capabilities.
    let link = Link::new("prv", 41);
    link.a.sysctl("net.ipv4.tcp_retries2", "8");
    // A process living in the client's namespace, as a pod's pause process
    // does (killed with the namespace): /proc/<pid>/net/tcp of a process in
    // the socket's netns gives the socket's inode.
    link.a.exec("sleep 300 >/dev/null 2>&1 &");
    // The guard on, with a rule for a cgroup of nobody's.
    let policy =
        std::env::temp_dir().join(format!("tcpstall-priv-guard-{}.toml", std::process::id()));
    std::fs::write(
        &policy,
        "[[rule]]\ncgroup = \"/tcpstall-privileges-test-none\"\nuser_timeout = \"10s\"\n",
    )
    .unwrap();
    let agent = Agent::start_via(&wrap, &["--guard-policy", &policy.to_string_lossy()]);
    let (code, body) = agent.http_get("/api/v1/guard");
    let guard: Value = serde_json::from_str(&body).expect("guard JSON");
    assert_eq!(
        (code, guard["enabled"].as_bool()),
        (200, Some(true)),
        "the guard must run with exactly {caps:?}: {body}"
    );
    // The agent really runs with exactly that set.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let want = caps.iter().fold(0u64, |m, c| m | 1 << cap_bit(c));
    assert_eq!(
        eff, want,
        "agent CapEff {eff:#x}, manifest {caps:?} = {want:#x}"
    );

    let server_addr = SocketAddr::from((link.b_ip, 8080));
    let server = drain_server_in(&link.b, server_addr, Duration::from_secs(40), None);
    let mut client = connect_in(&link.a, server_addr);
    let local = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    tcpstall_tests::wait_all_acked(&client, 5, Duration::from_secs(10));
    let _blackhole = link.b.blackhole_from(link.a_ip);
    client.write_all(&[b'x'; 1000]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        if let Some(v) = agent.stall_of(local, server_addr)
            && ev_str(&v, "class") == "retransmit"
            && !v["process"].is_null()
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no retransmit stall with its process within 30 s: {:?}",
            agent.stall_of(local, server_addr)
        );
        thread::sleep(Duration::from_millis(250));
    };
    assert!(view["predicted_timeout_ns"].as_u64().is_some(), "{view}");
    assert_eq!(
        view["process"]["pid"].as_u64(),
        Some(u64::from(std::process::id())),
        "{view}"
    );
    drop(client);
    drop(agent);
    let _ = std::fs::remove_file(&policy);
    // The server thread ends on its read timeout; not waited for.
    drop(server);
}
