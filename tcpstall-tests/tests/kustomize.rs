//! The Kubernetes manifests as users apply them: every kustomization under
//! `deploy/kubernetes` (the base and each overlay, found by walking the
//! directory, so a new overlay is checked without editing this file) is
//! rendered with `kubectl kustomize` and validated with
//! `kubernetes-validate --strict` (newest schemas and Kubernetes 1.27); the
//! only documents allowed to lack a schema are CRDs (ServiceMonitor). Then the
//! least-privilege and wiring invariants of the rendered output.
//!
//! Tools are required, never skipped: kubectl (with `kubectl kustomize`) and
//! kubernetes-validate (PyPI), installed by `cargo xtask setup`.
//!
//! Run: `cargo test -p tcpstall-tests --test kustomize`.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_norway::Value as Yaml;
use tcpstall_tests::assert_kubernetes_validate;

const CRD_KINDS: &[&str] = &["ServiceMonitor"];
const KUBE_DIR: &str = "deploy/kubernetes";
const DASHBOARD: &str = "deploy/grafana/tcpstall-dashboard.json";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &str, args: &[&str], install: &str) -> (bool, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "required tool `{cmd}` cannot run ({e}): {install}; these checks are never skipped"
            )
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Directories under deploy/kubernetes with a kustomization that is not a
/// Component (components cannot be rendered alone; overlays use them).
fn kustomizations() -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![repo().join(KUBE_DIR)];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)
            .expect("read deploy/kubernetes")
            .flatten()
        {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
        let k = dir.join("kustomization.yaml");
        if let Ok(text) = fs::read_to_string(&k) {
            let doc: Yaml =
                serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", k.display()));
            if doc["kind"] != "Component" {
                let rel = dir
                    .strip_prefix(repo())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                found.push(rel);
            }
        }
    }
    found.sort();
    found
}

fn render(rel: &str) -> String {
    let (ok, out, err) = run(
        "kubectl",
        &["kustomize", rel],
        "install kubectl (it bundles kustomize)",
    );
    assert!(ok, "kubectl kustomize {rel} failed:\n{err}");
    out
}

fn documents(text: &str) -> Vec<Yaml> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Yaml::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Yaml], kind: &str) -> Option<&'a Yaml> {
    docs.iter().find(|d| d["kind"] == kind)
}

#[test]
fn every_overlay_renders_and_passes_strict_validation() {
    let dirs = kustomizations();
    for want in [
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/prometheus-operator",
        "deploy/kubernetes/overlays/kube-prometheus-stack",
    ] {
        assert!(
            dirs.iter().any(|d| d == want),
            "no kustomization {want} (found {dirs:?})"
        );
    }
    let scratch = std::env::temp_dir().join(format!("tcpstall-kustomize-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    for dir in &dirs {
        let text = render(dir);
        let docs = documents(&text);
        assert!(!docs.is_empty(), "{dir} renders nothing");
        let file = scratch.join(format!("{}.yaml", dir.replace('/', "_")));
        fs::write(&file, &text).unwrap();
        for version in [None, Some("1.27")] {
            let f = file.to_string_lossy().into_owned();
            let mut args = vec!["--strict"];
            if let Some(v) = version {
                args.extend(["-k", v]);
            }
            args.push(&f);
            let (ok, out, err) = run(
                "kubernetes-validate",
                &args,
                "python3 -m pip install kubernetes-validate",
            );
            let all = format!("{out}{err}");
            assert!(
                ok,
                "{dir}: kubernetes-validate --strict {version:?} failed:\n{all}"
            );
            let resources: Vec<(String, String)> = docs
                .iter()
                .map(|d| {
                    (
                        d["kind"].as_str().unwrap_or("?").to_owned(),
                        d["metadata"]["name"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect();
            assert_kubernetes_validate(
                &all,
                &resources,
                CRD_KINDS,
                &format!("{dir} ({version:?})"),
            );
        }
    }
    fs::remove_dir_all(&scratch).ok();
}

/// The capability list of the rendered DaemonSet (also read by the
/// privileges test, which runs the agent with exactly this set).
fn container(docs: &[Yaml]) -> &Yaml {
    &find(docs, "DaemonSet").expect("DaemonSet")["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn base_is_least_privilege() {
    let docs = documents(&render("deploy/kubernetes/base"));
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "DaemonSet",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(k), "base lacks {k}: {kinds:?}");
    }
    let c = container(&docs);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let drop: Vec<&str> = sc["capabilities"]["drop"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(drop, ["ALL"]);
    let add: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(
        add,
        BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYSLOG"]),
        "the capability set (privileges.rs proves the agent works with exactly it)"
    );
    // Every host mount read-only, and no host mount beyond what the agent reads.
    let spec = &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    let host_vols: BTreeSet<&str> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .filter_map(|v| v["name"].as_str())
        .collect();
    for m in c["volumeMounts"].as_sequence().unwrap() {
        assert_eq!(
            m["readOnly"].as_bool(),
            Some(true),
            "mount {m:?} must be read-only"
        );
    }
    let host_paths: BTreeSet<&str> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            "/sys/kernel/btf",
            "/sys/fs/cgroup",
            "/sys/kernel/tracing",
            "/proc",
            "/run/containerd/io.containerd.runtime.v2.task",
            "/run/containers/storage/overlay-containers",
            "/var/lib/kubelet/pods",
        ])
    );
    assert_eq!(host_vols.len(), host_paths.len());
    assert_eq!(spec["hostNetwork"].as_bool(), Some(false));
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false));
    // The runtime roots the agent reads are where the mounts are.
    let env: Vec<(&str, &str)> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    for (k, v) in [
        ("TCPSTALL_PROC", "/host/proc"),
        ("TCPSTALL_CONTAINERD_STATE", "/host/run/containerd"),
        ("TCPSTALL_CRIO_STATE", "/host/run/containers/storage"),
        ("TCPSTALL_KUBELET_ROOT", "/host/var/lib/kubelet"),
    ] {
        assert!(env.contains(&(k, v)), "env {k}={v} missing: {env:?}");
    }
    // NetworkPolicy: ingress only to the metrics port, no egress.
    let np = find(&docs, "NetworkPolicy").unwrap();
    let types: Vec<&str> = np["spec"]["policyTypes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    assert_eq!(np["spec"]["egress"].as_sequence().map(Vec::len), Some(0));
    let ingress = np["spec"]["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1);
    let ports = ingress[0]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"].as_str(), Some("metrics"));
    assert_eq!(c["ports"][0]["name"].as_str(), Some("metrics"));
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        find(&docs, "DaemonSet").unwrap()["spec"]["selector"]["matchLabels"]
    );
}

/// Every environment variable a rendered DaemonSet sets (base and each
/// overlay) is one `tcpstall run` reads (a variable nothing reads is dead
/// configuration that readers take for a setting), and the node name of the
/// incident series comes from the downward API.
/// Mutation: the base DaemonSet's `NODE_NAME` entry (spec.nodeName) put back
/// beside `TCPSTALL_NODE_NAME` -> fails with "deploy/kubernetes/base: the
/// DaemonSet sets NODE_NAME, which `tcpstall run` does not read".
#[test]
fn daemonset_env_is_read_by_the_agent() {
    use clap::CommandFactory;
    let cli = tcpstall::cli::config::Cli::command();
    let run = cli.find_subcommand("run").expect("`tcpstall run`");
    let read: BTreeSet<String> = run
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    assert!(read.contains("TCPSTALL_NODE_NAME"), "{read:?}");
    let mut checked = Vec::new();
    for dir in kustomizations() {
        let docs = documents(&render(&dir));
        // (The Grafana dashboard overlay renders a ConfigMap only.)
        if find(&docs, "DaemonSet").is_none() {
            continue;
        }
        let env = container(&docs)["env"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{dir}: the DaemonSet's container has no env"));
        for e in env {
            let name = e["name"].as_str().expect("env name");
            assert!(
                read.contains(name),
                "{dir}: the DaemonSet sets {name}, which `tcpstall run` does not read \
                 (it reads {read:?})"
            );
        }
        let node = env
            .iter()
            .find(|e| e["name"].as_str() == Some("TCPSTALL_NODE_NAME"))
            .unwrap_or_else(|| panic!("{dir}: TCPSTALL_NODE_NAME not set: {env:?}"));
        assert_eq!(
            node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some("spec.nodeName"),
            "{dir}: {node:?}"
        );
        checked.push(dir);
    }
    assert!(
        checked.iter().any(|d| d == "deploy/kubernetes/base"),
        "no DaemonSet checked in the base: {checked:?}"
    );
}

#[test]
fn kube_prometheus_stack_overlay() {
    let docs = documents(&render("deploy/kubernetes/overlays/kube-prometheus-stack"));
    let c = container(&docs);
    assert_eq!(
        c["image"].as_str(),
        Some("registry.example.com/platform/tcpstall:0.1.0"),
        "image override"
    );
    let sm = find(&docs, "ServiceMonitor").expect("ServiceMonitor from the component");
    assert_eq!(
        sm["metadata"]["labels"]["release"].as_str(),
        Some("kube-prometheus-stack")
    );
    assert_eq!(sm["metadata"]["namespace"].as_str(), Some("tcpstall"));
    let np = find(&docs, "NetworkPolicy").unwrap();
    let from = &np["spec"]["ingress"][0]["from"][0];
    assert_eq!(
        from["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("prometheus")
    );
    // The dashboard ConfigMap is the dashboard file, for the Grafana sidecar.
    let cm = find(&docs, "ConfigMap").expect("dashboard ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let data = cm["data"]["tcpstall-dashboard.json"]
        .as_str()
        .expect("dashboard data");
    let embedded: serde_json::Value =
        serde_json::from_str(data).expect("dashboard JSON in the ConfigMap");
    let file: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(repo().join(DASHBOARD)).unwrap()).unwrap();
    assert_eq!(embedded, file, "ConfigMap differs from {DASHBOARD}");
    // Client-side apply stores the object in an annotation (256 KiB limit).
    assert!(
        data.len() < 200 * 1024,
        "dashboard too large for `kubectl apply`: {} bytes",
        data.len()
    );
}

/// The guard is off in the base and on with its component: the policy
/// ConfigMap is mounted read-only where TCPSTALL_GUARD_POLICY points, the
/// policy parses (as the agent parses it), starts in dry-run, and the
/// capability set is the base's. Mutation: `mode = "enforce"` in the
/// component's ConfigMap fails the dry-run assertion.
#[test]
fn guard_component_mounts_a_valid_dry_run_policy() {
    let base = documents(&render("deploy/kubernetes/base"));
    let env_names = |docs: &[Yaml]| -> Vec<String> {
        container(docs)["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(
        !env_names(&base)
            .iter()
            .any(|n| n == "TCPSTALL_GUARD_POLICY"),
        "the guard must be off in the base"
    );
    let docs = documents(&render("deploy/kubernetes/overlays/guard"));
    let c = container(&docs);
    let path = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("TCPSTALL_GUARD_POLICY"))
        .and_then(|e| e["value"].as_str())
        .expect("TCPSTALL_GUARD_POLICY in the guard overlay")
        .to_owned();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str() == Some("guard-policy"))
        .expect("guard-policy mount");
    let dir = mount["mountPath"].as_str().unwrap();
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let key = path
        .strip_prefix(&format!("{dir}/"))
        .unwrap_or_else(|| panic!("{path} is not under the mount {dir}"));
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "tcpstall-guard-policy")
        .expect("policy ConfigMap");
    assert_eq!(cm["metadata"]["namespace"].as_str(), Some("tcpstall"));
    let text = cm["data"][key].as_str().expect("policy in the ConfigMap");
    let policy = tcpstall::guard::Policy::parse(text, key).expect("the shipped policy parses");
    assert!(!policy.rules.is_empty());
    assert!(
        policy
            .rules
            .iter()
            .all(|r| r.mode == tcpstall::guard::Mode::DryRun),
        "the shipped policy starts in dry-run"
    );
    let caps = |docs: &[Yaml]| container(docs)["securityContext"]["capabilities"].clone();
    assert_eq!(caps(&docs), caps(&base), "no capability beyond the base's");
}
