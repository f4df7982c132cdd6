//! Kubernetes helpers: exact capability sets through `setpriv` and checks
//! of `kubernetes-validate` output; a real containerd node driven through
//! the CRI API ([`containerd`], [`cri`]).

pub mod containerd;
pub mod cri;

/// `setpriv` arguments that run a program as uid 0 with exactly `caps`
/// (capability names as in a Kubernetes manifest, e.g. `NET_ADMIN`) in its
/// bounding, inheritable and ambient sets, and no_new_privs (as
/// `allowPrivilegeEscalation: false`). Ends with `--`.
pub fn setpriv_exactly(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_ascii_lowercase()))
        .collect();
    let set = format!("-all{list}");
    [
        "setpriv",
        "--no-new-privs",
        "--bounding-set",
        &set,
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Checks the output of one `kubernetes-validate --strict` run over the
/// resources `(kind, name)`: each passed, except kinds in `crd_kinds`, which
/// the tool must report as schema-less (a CRD, validated by its operator at
/// apply time), and no other warning or error. `what` names the input in
/// failure messages.
pub fn assert_kubernetes_validate(
    out: &str,
    resources: &[(String, String)],
    crd_kinds: &[&str],
    what: &str,
) {
    for (kind, name) in resources {
        if crd_kinds.contains(&kind.as_str()) {
            assert!(
                out.contains(&format!("Couldn't find schema for kind {kind}")),
                "{what}: expected kubernetes-validate to report {kind} as schema-less:\n{out}"
            );
        } else {
            assert!(
                out.contains(&format!(
                    "passed for resource {}/{name} ",
                    kind.to_lowercase()
                )),
                "{what}: {kind}/{name} did not pass kubernetes-validate --strict:\n{out}"
            );
        }
    }
    for line in out
        .lines()
        .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
    {
        assert!(
            crd_kinds
                .iter()
                .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
            "{what}: unexpected kubernetes-validate diagnostic: {line}"
        );
    }
}

/// Who the agent must name as a stalled socket's owner.
#[derive(Debug)]
pub struct ExpectedOwner<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub pod_uid: &'a str,
    pub container: &'a str,
    pub container_id: &'a str,
    pub pid: u64,
    pub comm: &'a str,
}

/// Asserts that the stall view `v` (from `/api/v1/stalls`), the flow's
/// `tcpstall_socket_stall_seconds` series and its `stall started` log line
/// (the one to `remote`) name `want`.
pub fn assert_owner_named(
    agent: &mut crate::Agent,
    v: &serde_json::Value,
    remote: std::net::SocketAddr,
    want: &ExpectedOwner,
) {
    use crate::ev_str;
    assert_eq!(ev_str(v, "pod"), want.pod, "{v}");
    assert_eq!(ev_str(v, "namespace"), want.namespace, "{v}");
    assert_eq!(ev_str(v, "container"), want.container, "{v}");
    assert_eq!(ev_str(v, "container_id"), want.container_id, "{v}");
    assert_eq!(ev_str(v, "pod_uid"), want.pod_uid, "{v}");
    assert_eq!(v["process"]["pid"].as_u64(), Some(want.pid), "{v}");
    assert_eq!(v["process"]["comm"].as_str(), Some(want.comm), "{v}");
    let local = ev_str(v, "local");
    let m = agent.metrics();
    let labels = [
        ("local", local),
        ("pod", want.pod),
        ("namespace", want.namespace),
        ("container", want.container),
    ];
    assert!(
        crate::metric_sum(&m, "tcpstall_socket_stall_seconds", &labels).is_some(),
        "no per-flow series with {labels:?}:\n{}",
        m.lines()
            .filter(|l| l.starts_with("tcpstall_socket_stall_seconds"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let line = agent.wait_log(
        std::time::Duration::from_secs(10),
        "stall started log of the flow",
        |l| l["message"] == "stall started" && l["remote"] == remote.to_string(),
    );
    assert_eq!(ev_str(&line, "pod"), want.pod, "{line}");
    assert_eq!(ev_str(&line, "namespace"), want.namespace, "{line}");
    assert_eq!(ev_str(&line, "container"), want.container, "{line}");
    assert_eq!(ev_str(&line, "pod_uid"), want.pod_uid, "{line}");
    assert_eq!(ev_str(&line, "comm"), want.comm, "{line}");
    assert_eq!(line["pid"].as_u64(), Some(want.pid), "{line}");
}
