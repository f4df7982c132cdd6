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
