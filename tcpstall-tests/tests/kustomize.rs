//! The Kubernetes manifests as users apply them: every kustomization under
//! `deploy/kubernetes` (the base and each overlay, found by walking the
//! directory, so a new overlay is checked without editing this file) is
//! rendered with `kubectl kustomize` and validated with
//! `kubernetes-validate --strict` (newest schemas and Kubernetes 1.27); the
//! only documents allowed to lack a schema are CRDs (ServiceMonitor,
//! PrometheusRule). Then the least-privilege and wiring invariants of the
//! rendered output, and every selector of each overlay after a namespace and
//! release rename (ServiceMonitor -> Service -> pods, PrometheusRule and
//! ServiceMonitor -> kube-prometheus-stack's selectors).
//!
//! Tools are required, never skipped: kubectl (with `kubectl kustomize`) and
//! kubernetes-validate (PyPI), installed by `cargo xtask setup`.
//!
//! Run: `cargo test -p tcpstall-tests --test kustomize`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_norway::Value as Yaml;
use tcpstall_tests::assert_kubernetes_validate;

const CRD_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];
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
    for k in ["ServiceAccount", "DaemonSet", "Service", "NetworkPolicy"] {
        assert!(kinds.contains(k), "base lacks {k}: {kinds:?}");
    }
    // The Namespace ships apart (deploy/kubernetes/namespace), so that an
    // overlay's namespace change never renames or relabels it.
    assert!(
        !kinds.contains("Namespace"),
        "the base must not carry the Namespace: {kinds:?}"
    );
    let ns = documents(&render("deploy/kubernetes/namespace"));
    assert_eq!(ns.len(), 1, "{ns:?}");
    assert_eq!(ns[0]["kind"].as_str(), Some("Namespace"));
    assert_eq!(ns[0]["metadata"]["name"].as_str(), Some("tcpstall"));
    assert_eq!(
        ns[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("privileged")
    );
    // Linux nodes of the image's architecture only.
    let node_selector =
        &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"]["nodeSelector"];
    assert_eq!(node_selector["kubernetes.io/os"].as_str(), Some("linux"));
    assert_eq!(node_selector["kubernetes.io/arch"].as_str(), Some("amd64"));
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
            "/var/lib/kubelet/pods",
        ])
    );
    // Nothing is created on the node: every host path must already exist.
    for v in spec["volumes"].as_sequence().unwrap() {
        if !v["hostPath"].is_null() {
            assert_eq!(
                v["hostPath"]["type"].as_str(),
                Some("Directory"),
                "hostPath {v:?} must be `type: Directory` (never created on the node)"
            );
        }
    }
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

/// Copies `deploy/` into a scratch directory (the overlays reference
/// `../../base`, `../../../grafana`, ... relatively) and returns the copy's
/// `deploy/kubernetes`.
fn copy_deploy(tag: &str) -> PathBuf {
    let root =
        std::env::temp_dir().join(format!("tcpstall-kustomize-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fn copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap().flatten() {
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &dst);
            } else {
                fs::copy(e.path(), &dst).unwrap();
            }
        }
    }
    copy(&repo().join("deploy"), &root.join("deploy"));
    root.join("deploy/kubernetes")
}

/// Replaces `from` by `to` at the end of lines of the kustomization at
/// `dir` (values, not keys or longer names), asserting it appears exactly
/// `n` times outside comments (one place to edit each setting).
fn edit(dir: &Path, from: &str, to: &str, n: usize) {
    let k = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&k).unwrap();
    let mut found = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| match l.strip_suffix(from) {
            Some(head) if !l.trim_start().starts_with('#') => {
                found += 1;
                format!("{head}{to}")
            }
            _ => l.to_owned(),
        })
        .collect();
    assert_eq!(
        found,
        n,
        "{}: `{from}` should appear {n} time(s) outside comments",
        k.display()
    );
    fs::write(&k, out.join("\n") + "\n").unwrap();
}

fn render_abs(dir: &Path) -> Vec<Yaml> {
    let d = dir.to_string_lossy().into_owned();
    let (ok, out, err) = run("kubectl", &["kustomize", &d], "install kubectl");
    assert!(ok, "kubectl kustomize {d} failed:\n{err}");
    documents(&out)
}

fn labels(v: &Yaml) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A Kubernetes label selector (`matchLabels` only, as the manifests use)
/// selects `target`'s labels: non-empty and every pair present.
fn selects(selector: &Yaml, target: &BTreeMap<String, String>, what: &str) {
    let want = labels(&selector["matchLabels"]);
    assert!(
        !want.is_empty() && selector["matchExpressions"].is_null(),
        "{what}: expected a matchLabels selector, got {selector:?}"
    );
    for (k, v) in &want {
        assert_eq!(
            target.get(k),
            Some(v),
            "{what}: selector {want:?} does not select {target:?}"
        );
    }
}

/// Every overlay, copied and given another namespace (and, for
/// kube-prometheus-stack, another Helm release name and stack namespace),
/// still wires up: ServiceMonitor -> Service -> agent pods in the new
/// namespace, the job label `tcpstall` the rules match, the NetworkPolicy
/// admitting the stack's Prometheus, the PrometheusRule and ServiceMonitor
/// carrying the label the stack's default `ruleSelector` /
/// `serviceMonitorSelector` match (`release: <release>`), the dashboard in
/// Grafana's namespace, and no Namespace object renamed.
/// Mutations: `namespaceSelector.matchNames: [tcpstall]` back in the
/// ServiceMonitor -> "ServiceMonitor ... selects namespaces [tcpstall]";
/// the release patch's target narrowed to `kind: ServiceMonitor` -> "the
/// PrometheusRule lacks release=prom-main".
#[test]
fn overlays_keep_their_selectors_after_a_namespace_and_release_rename() {
    const NS: &str = "observability";
    const RELEASE: &str = "prom-main";
    const STACK_NS: &str = "metrics-system";
    for (overlay, stack) in [
        ("prometheus-operator", false),
        ("kube-prometheus-stack", true),
    ] {
        let kube = copy_deploy(overlay);
        let dir = kube.join("overlays").join(overlay);
        edit(&dir, "namespace: tcpstall", &format!("namespace: {NS}"), 1);
        if stack {
            edit(
                &dir,
                "value: kube-prometheus-stack",
                &format!("value: {RELEASE}"),
                1,
            );
            // The NetworkPolicy's namespace and the dashboard's.
            edit(&dir, " monitoring", &format!(" {STACK_NS}"), 2);
        }
        let docs = render_abs(&dir);
        let what = |k: &str| format!("{overlay} (namespace {NS}): {k}");
        let one = |k: &str| {
            let all: Vec<&Yaml> = docs.iter().filter(|d| d["kind"] == k).collect();
            assert_eq!(all.len(), 1, "{}: {} objects", what(k), all.len());
            all[0]
        };
        assert!(
            find(&docs, "Namespace").is_none(),
            "{}: an overlay must not carry (and so rename) the Namespace",
            what("Namespace")
        );
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or("?");
            let want = if kind == "ConfigMap" { STACK_NS } else { NS };
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some(want),
                "{}: {:?}",
                what(kind),
                d["metadata"]
            );
        }
        let ds = one("DaemonSet");
        let pod_labels = labels(&ds["spec"]["template"]["metadata"]["labels"]);
        selects(&ds["spec"]["selector"], &pod_labels, &what("DaemonSet"));
        let svc = one("Service");
        let svc_labels = labels(&svc["metadata"]["labels"]);
        let svc_selector = labels(&svc["spec"]["selector"]);
        assert!(!svc_selector.is_empty(), "{}: no selector", what("Service"));
        for (k, v) in &svc_selector {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "{}: selects no agent pod",
                what("Service")
            );
        }
        let container_ports: BTreeSet<&str> = container(&docs)["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        let svc_ports: BTreeSet<&str> = svc["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| {
                let target = p["targetPort"].as_str().expect("named targetPort");
                assert!(
                    container_ports.contains(target),
                    "{}: targetPort {target}",
                    what("Service")
                );
                p["name"].as_str().expect("port name")
            })
            .collect();

        // ServiceMonitor -> Service, in the ServiceMonitor's namespace unless
        // it names others.
        let sm = one("ServiceMonitor");
        let sm_ns = sm["metadata"]["namespace"].as_str().unwrap();
        let nsel = &sm["spec"]["namespaceSelector"];
        let sm_namespaces: Vec<&str> = nsel["matchNames"]
            .as_sequence()
            .map(|s| s.iter().filter_map(|n| n.as_str()).collect())
            .unwrap_or_else(|| vec![sm_ns]);
        assert!(
            nsel["any"].as_bool() == Some(true)
                || sm_namespaces.contains(&svc["metadata"]["namespace"].as_str().unwrap()),
            "{}: selects namespaces {sm_namespaces:?}, the Service is in {NS}",
            what("ServiceMonitor")
        );
        selects(
            &sm["spec"]["selector"],
            &svc_labels,
            &what("ServiceMonitor"),
        );
        for ep in sm["spec"]["endpoints"].as_sequence().unwrap() {
            let port = ep["port"].as_str().expect("endpoint port name");
            assert!(
                svc_ports.contains(port),
                "{}: port {port}",
                what("ServiceMonitor")
            );
        }
        // The job label TCPStallAgentDown matches.
        let job = match sm["spec"]["jobLabel"].as_str() {
            Some(l) => svc_labels.get(l).cloned().unwrap_or_default(),
            None => svc["metadata"]["name"].as_str().unwrap().to_owned(),
        };
        assert_eq!(job, "tcpstall", "{}: job label", what("ServiceMonitor"));

        let rule = one("PrometheusRule");
        let rules_text = serde_norway::to_string(&rule["spec"]).unwrap();
        assert!(
            rules_text.contains("job=\"tcpstall\""),
            "rules match job=\"tcpstall\""
        );

        // NetworkPolicy -> agent pods; its ingress admits the Prometheus.
        let np = one("NetworkPolicy");
        selects(
            &np["spec"]["podSelector"],
            &pod_labels,
            &what("NetworkPolicy"),
        );
        if stack {
            // kube-prometheus-stack's defaults: serviceMonitorSelector and
            // ruleSelector `matchLabels: {release: <release>}` (the
            // *SelectorNilUsesHelmValues defaults), namespace selectors `{}`.
            let release = BTreeMap::from([("release".to_owned(), RELEASE.to_owned())]);
            for obj in [sm, rule] {
                let kind = obj["kind"].as_str().unwrap();
                let l = labels(&obj["metadata"]["labels"]);
                assert_eq!(
                    l.get("release").map(String::as_str),
                    Some(RELEASE),
                    "{}: the {kind} lacks release={RELEASE} ({l:?}), the stack's selector {release:?} skips it",
                    what(kind)
                );
            }
            let from = &np["spec"]["ingress"][0]["from"][0];
            let prom_ns = BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                STACK_NS.to_owned(),
            )]);
            selects(
                &from["namespaceSelector"],
                &prom_ns,
                &what("NetworkPolicy from"),
            );
            // The stack's Prometheus pods (operator-managed) carry these.
            let prom_pod = BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "prometheus".to_owned()),
                (
                    "prometheus".to_owned(),
                    format!("{STACK_NS}/{RELEASE}-prometheus"),
                ),
            ]);
            selects(&from["podSelector"], &prom_pod, &what("NetworkPolicy from"));
            let cm = one("ConfigMap");
            assert_eq!(
                cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
                Some("1")
            );
        }
        fs::remove_dir_all(kube.parent().unwrap().parent().unwrap()).ok();
    }
}

/// Shell commands of a Markdown file: every line of its ```sh blocks and
/// every inline code span that starts with a command the checks know.
fn doc_commands(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in md.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && t == "```sh";
            continue;
        }
        if in_sh {
            if !t.is_empty() && !t.starts_with('#') {
                out.push(t.to_owned());
            }
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1
                && ["kubectl ", "curl ", "tcpstall "]
                    .iter()
                    .any(|p| span.starts_with(p))
            {
                out.push(span.to_owned());
            }
        }
    }
    out
}

/// Every command of docs/runbook.md and deploy/README.md, checked where it
/// can be without a cluster: `kubectl apply -k`/`kustomize` directories
/// render; `-n`, `-l`, `ds/`, port and Pod Security label values match the
/// rendered manifests; `tcpstall ...` (also through `kubectl exec`) parses
/// with the agent's own CLI; `curl localhost:9977/<path>` names a route of
/// the agent's server; `gen-prometheusrule.sh` and `promtool` run. The rest
/// (build, registry, editor, node tools) is listed as not checkable here;
/// an unknown command fails the test so a new one gets a check.
/// Mutations: the runbook's risks command back to
/// `curl -s http://<node>:9977/api/v1/risks` -> "not checkable ... `curl`
/// to a node address"; `kubectl apply -k deploy/kubernetes/namespace` in the
/// README -> `.../namespaces` -> "kubectl kustomize
/// deploy/kubernetes/namespaces failed".
#[test]
fn every_runbook_and_deploy_readme_command_is_checked() {
    use clap::Parser as _;
    let routes: BTreeSet<String> =
        fs::read_to_string(repo().join("tcpstall/src/serve/server/mod.rs"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                Some(
                    l.trim()
                        .strip_prefix(".route(\"")?
                        .split('"')
                        .next()?
                        .to_owned(),
                )
            })
            .collect();
    assert!(routes.contains("/healthz"), "{routes:?}");
    let base = documents(&render("deploy/kubernetes/base"));
    let ds = find(&base, "DaemonSet").unwrap();
    let ns = ds["metadata"]["namespace"].as_str().unwrap().to_owned();
    let pod_labels = labels(&ds["spec"]["template"]["metadata"]["labels"]);
    let ns_doc = documents(&render("deploy/kubernetes/namespace"));
    let ns_labels = labels(&ns_doc[0]["metadata"]["labels"]);
    let ports: BTreeSet<String> = container(&base)["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["containerPort"].as_u64().map(|p| p.to_string()))
        .collect();
    let parse_cli = |args: &[&str], cmd: &str| {
        let mut argv = vec!["tcpstall"];
        argv.extend(args.iter().copied().filter(|a| !a.starts_with('|')));
        match tcpstall::cli::config::Cli::try_parse_from(&argv) {
            Ok(_) => {}
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {}
            Err(e) => panic!("`{cmd}`: the agent's CLI rejects {argv:?}: {e}"),
        }
    };
    const NOT_CHECKABLE: &[&str] = &[
        "git",
        "cargo",
        "podman",
        "cp",
        "$EDITOR",
        "lsns",
        "nsenter",
        "kubectl debug",
    ];
    let mut checked = 0;
    for doc in ["docs/runbook.md", "deploy/README.md"] {
        let md = fs::read_to_string(repo().join(doc)).unwrap();
        for raw in doc_commands(&md) {
            // Drop a trailing comment, `&`, and pipes into jq/head.
            let mut cmd = raw.split(" #").next().unwrap().trim().to_owned();
            if let Some((head, _)) = cmd.split_once(" | ") {
                cmd = head.to_owned();
            }
            cmd = cmd.trim_end_matches('&').trim().to_owned();
            if let Some(inner) = cmd.strip_prefix("POD=$(").and_then(|c| c.strip_suffix(')')) {
                cmd = inner.to_owned();
            }
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let what = format!("{doc}: `{raw}`");
            match words[0] {
                "kubectl" if words.get(1) == Some(&"debug") => continue,
                "kubectl" => {
                    let mut i = 1;
                    while i < words.len() {
                        let next = words.get(i + 1).copied().unwrap_or("<none>");
                        match words[i] {
                            "-n" => {
                                assert_eq!(next, ns, "{what}: namespace");
                                i += 1;
                            }
                            "-l" => {
                                let (k, v) = next.split_once('=').unwrap_or((next, ""));
                                assert_eq!(
                                    pod_labels.get(k).map(String::as_str),
                                    Some(v),
                                    "{what}: selects no agent pod"
                                );
                                i += 1;
                            }
                            "-k" | "kustomize" => {
                                let dir = next;
                                if !dir.starts_with('<') {
                                    // The README's copy of the example overlay.
                                    let dir = dir.replace(
                                        "overlays/mycluster",
                                        "overlays/kube-prometheus-stack",
                                    );
                                    assert!(
                                        !documents(&render(&dir)).is_empty(),
                                        "{what}: renders nothing"
                                    );
                                }
                                i += 1;
                            }
                            "--" => {
                                assert_eq!(
                                    words.get(i + 1),
                                    Some(&"tcpstall"),
                                    "{what}: exec runs the agent binary (the image has nothing else)"
                                );
                                parse_cli(&words[i + 2..], &what);
                                break;
                            }
                            w if w.starts_with("ds/") => {
                                assert_eq!(
                                    &w[3..],
                                    ds["metadata"]["name"].as_str().unwrap(),
                                    "{what}"
                                );
                            }
                            w if w.starts_with("pod-security.kubernetes.io/") => {
                                let (k, v) = w.split_once('=').unwrap();
                                assert_eq!(
                                    ns_labels.get(k).map(String::as_str),
                                    Some(v),
                                    "{what}: Pod Security level"
                                );
                            }
                            w if words[1] == "port-forward"
                                && w.chars().next().is_some_and(|c| c.is_ascii_digit()) =>
                            {
                                let remote = w.rsplit(':').next().unwrap();
                                assert!(
                                    ports.contains(remote),
                                    "{what}: port {remote} is not the agent's ({ports:?})"
                                );
                            }
                            _ => {}
                        }
                        i += 1;
                    }
                }
                "curl" => {
                    let url = words
                        .iter()
                        .find(|w| w.contains("9977"))
                        .unwrap_or_else(|| panic!("{what}: no agent URL"));
                    let path = url
                        .strip_prefix("localhost:9977")
                        .unwrap_or_else(|| panic!("not checkable: {what}: `curl` to a node address (the agent has no hostPort by default): use a port-forward to localhost:9977"));
                    assert!(
                        routes.contains(path),
                        "{what}: {path} is not a route of the agent ({routes:?})"
                    );
                }
                "tcpstall" => parse_cli(&words[1..], &what),
                "sh" => {
                    let args: Vec<&str> = words[1..]
                        .iter()
                        .copied()
                        .take_while(|w| *w != ">")
                        .collect();
                    let (ok, _, err) = run("sh", &args, "sh");
                    assert!(ok, "{what}: {err}");
                }
                "promtool" => {
                    let (ok, out, err) =
                        run("promtool", &words[1..], "the Debian package prometheus");
                    assert!(ok, "{what}: {out}{err}");
                }
                w if NOT_CHECKABLE.contains(&w) => continue,
                w => panic!(
                    "{what}: no check for `{w}` commands; add one (or list it as not checkable)"
                ),
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} commands checked");

    // The README's kubelet-root patch, applied to a copy of an overlay.
    let md = fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let snippet = md
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("kubelet-pods"))
        .expect("the kubelet-root patch in deploy/README.md");
    let kube = copy_deploy("kubelet-root");
    let dir = kube.join("overlays/prometheus-operator");
    let k = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&k).unwrap() + snippet;
    fs::write(&k, text).unwrap();
    let docs = render_abs(&dir);
    let vols = &find(&docs, "DaemonSet").unwrap()["spec"]["template"]["spec"]["volumes"];
    let kubelet = vols
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "kubelet-pods")
        .unwrap();
    assert_eq!(
        kubelet["hostPath"]["path"].as_str(),
        Some("/var/lib/k0s/kubelet/pods")
    );
    fs::remove_dir_all(kube.parent().unwrap().parent().unwrap()).ok();
}
