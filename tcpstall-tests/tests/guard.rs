//! The guard against real applications, on the host: a real `psql` to a
//! real Postgres server (tests/guard/psql.rs), the clients in kubelet-style
//! pod cgroups with containerd state naming their pods, the real agent with
//! a policy.
//!
//! The guard's kernel behaviour with std sockets (enforce, an application's
//! own value kept, a pod outside the rules, dry-run, passive sockets,
//! keepalive, metrics; both guard programs) is in the scenarios binary
//! (tests/guard_kernel), which also runs in every QEMU guest of the matrix.
//!
//! Privileged (root, BPF, namespaces, cgroup2): run through `cargo xtask test`.

use std::time::Duration;

use tcpstall_tests::{Agent, agent_path, run_ok, wait_until};

// The guard against psql and a real Postgres server.
#[path = "guard/psql.rs"]
mod psql;

/// Waits (up to 9 s: before a 10 s user timeout fires) for the stall of
/// the socket at `local` and checks that tcpstall predicts from the rule's
/// 10 s user timeout and names the rule, in the API and in `tcpstall top`.
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
    // `tcpstall top` shows the rule on the socket's row.
    let url = format!("http://{}", agent.listen);
    let table = run_ok(
        std::process::Command::new(agent_path()).args(["top", "--once", "--agent", &url]),
        "tcpstall top --once",
    );
    let row = table
        .lines()
        .find(|l| l.contains(local))
        .unwrap_or_else(|| panic!("top has no row for the guarded client:\n{table}"));
    assert!(
        row.split_whitespace().any(|w| w == rule),
        "top names the guard rule on the guarded client's row:\n{table}"
    );
}
