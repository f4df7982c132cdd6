//! Container ID / pod UID -> pod name, namespace and container name, from
//! node-local state that the container runtime and the kubelet keep (never
//! from a process, which may be the pod's sandbox/pause process):
//!
//! - containerd (CRI plugin): the OCI spec in each task bundle,
//!   `<containerd-state>/io.containerd.runtime.v2.task/k8s.io/<id>/config.json`,
//!   annotations `io.kubernetes.cri.*`;
//! - CRI-O: `<crio-state>/overlay-containers/<id>/userdata/config.json`,
//!   annotations `io.kubernetes.pod.*`, `io.kubernetes.container.name`;
//! - Docker (cri-dockerd): `<docker-root>/containers/<id>/config.v2.json`,
//!   labels `io.kubernetes.*`;
//! - the kubelet's pod directory `<kubelet-root>/pods/<uid>/`: `etc-hosts`
//!   (the pod's host name = pod name) and the projected service-account
//!   volume's `namespace` file, when no runtime state names the pod.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::cgroup::Runtime;

/// Where each runtime keeps its state (flags `--containerd-state`,
/// `--crio-state`, `--docker-root`, `--kubelet-root`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeRoots {
    pub containerd: PathBuf,
    pub crio: PathBuf,
    pub docker: PathBuf,
    pub kubelet: PathBuf,
}

impl Default for RuntimeRoots {
    fn default() -> Self {
        Self {
            containerd: PathBuf::from("/run/containerd"),
            crio: PathBuf::from("/run/containers/storage"),
            docker: PathBuf::from("/var/lib/docker"),
            kubelet: PathBuf::from("/var/lib/kubelet"),
        }
    }
}

/// What the runtime says about one container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
    /// Empty for a sandbox (pause) container.
    pub container: String,
    pub sandbox: bool,
}

/// Pod name and namespace from the kubelet's pod directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeletPod {
    pub pod: String,
    pub namespace: String,
}

/// Bounded caches over the runtimes' and the kubelet's files.
pub struct RuntimeState {
    roots: RuntimeRoots,
    containers: HashMap<String, ContainerMeta>,
    pods: HashMap<String, KubeletPod>,
    max_entries: usize,
}

fn annotations<'a>(doc: &'a Value, key: &str) -> impl Fn(&str) -> String + 'a {
    let map = &doc[key];
    move |k: &str| map[k].as_str().unwrap_or_default().to_owned()
}

/// containerd's task bundle `config.json` (an OCI runtime spec).
pub fn parse_containerd_spec(text: &str) -> Option<ContainerMeta> {
    let doc: Value = serde_json::from_str(text).ok()?;
    let a = annotations(&doc, "annotations");
    let kind = a("io.kubernetes.cri.container-type");
    if kind.is_empty() {
        return None;
    }
    let sandbox = kind == "sandbox";
    Some(ContainerMeta {
        pod: a("io.kubernetes.cri.sandbox-name"),
        namespace: a("io.kubernetes.cri.sandbox-namespace"),
        pod_uid: a("io.kubernetes.cri.sandbox-uid"),
        container: if sandbox {
            String::new()
        } else {
            a("io.kubernetes.cri.container-name")
        },
        sandbox,
    })
}

/// CRI-O's `userdata/config.json`.
pub fn parse_crio_config(text: &str) -> Option<ContainerMeta> {
    let doc: Value = serde_json::from_str(text).ok()?;
    let a = annotations(&doc, "annotations");
    let pod = a("io.kubernetes.pod.name");
    if pod.is_empty() {
        return None;
    }
    let sandbox = a("io.kubernetes.cri-o.ContainerType") == "sandbox";
    Some(ContainerMeta {
        pod,
        namespace: a("io.kubernetes.pod.namespace"),
        pod_uid: a("io.kubernetes.pod.uid"),
        container: if sandbox {
            String::new()
        } else {
            a("io.kubernetes.container.name")
        },
        sandbox,
    })
}

/// Docker's `config.v2.json` (containers started by cri-dockerd).
pub fn parse_docker_config(text: &str) -> Option<ContainerMeta> {
    let doc: Value = serde_json::from_str(text).ok()?;
    let labels = &doc["Config"]["Labels"];
    let l = |k: &str| labels[k].as_str().unwrap_or_default().to_owned();
    let pod = l("io.kubernetes.pod.name");
    if pod.is_empty() {
        return None;
    }
    let sandbox = l("io.kubernetes.docker.type") == "podsandbox";
    Some(ContainerMeta {
        pod,
        namespace: l("io.kubernetes.pod.namespace"),
        pod_uid: l("io.kubernetes.pod.uid"),
        container: if sandbox {
            String::new()
        } else {
            l("io.kubernetes.container.name")
        },
        sandbox,
    })
}

/// The pod's host name from the kubelet-managed `etc-hosts`: the first
/// entry after the fixed localhost block and before the HostAliases section.
pub fn parse_etc_hosts(text: &str) -> Option<String> {
    let mut seen_entries = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            if seen_entries {
                break; // "# Entries added by HostAliases."
            }
            continue;
        }
        seen_entries = true;
        let names: Vec<&str> = line.split_whitespace().skip(1).collect();
        if names.is_empty()
            || names
                .iter()
                .any(|n| *n == "localhost" || n.starts_with("ip6-"))
        {
            continue;
        }
        return names.last().map(|s| (*s).to_owned());
    }
    None
}

impl RuntimeState {
    pub fn new(roots: RuntimeRoots, max_entries: usize) -> Self {
        Self {
            roots,
            containers: HashMap::new(),
            pods: HashMap::new(),
            max_entries,
        }
    }

    fn read_first(
        paths: &[PathBuf],
        parse: fn(&str) -> Option<ContainerMeta>,
    ) -> Option<ContainerMeta> {
        paths
            .iter()
            .find_map(|p| fs::read_to_string(p).ok().and_then(|t| parse(&t)))
    }

    fn read_container(&self, id: &str, runtime: Runtime) -> Option<ContainerMeta> {
        let r = &self.roots;
        let containerd = || {
            Self::read_first(
                &[
                    r.containerd
                        .join("io.containerd.runtime.v2.task/k8s.io")
                        .join(id)
                        .join("config.json"),
                    r.containerd
                        .join("io.containerd.runtime.v1.linux/k8s.io")
                        .join(id)
                        .join("config.json"),
                ],
                parse_containerd_spec,
            )
        };
        let crio = || {
            Self::read_first(
                &[r.crio
                    .join("overlay-containers")
                    .join(id)
                    .join("userdata/config.json")],
                parse_crio_config,
            )
        };
        let docker = || {
            Self::read_first(
                &[r.docker.join("containers").join(id).join("config.v2.json")],
                parse_docker_config,
            )
        };
        match runtime {
            Runtime::Containerd => containerd(),
            Runtime::Crio => crio(),
            Runtime::Docker => docker(),
            Runtime::Unknown => containerd().or_else(crio).or_else(docker),
        }
    }

    /// What the runtime state says about container `id` (cached once found).
    pub fn container(&mut self, id: &str, runtime: Runtime) -> Option<ContainerMeta> {
        if let Some(m) = self.containers.get(id) {
            return Some(m.clone());
        }
        let meta = self.read_container(id, runtime)?;
        if self.containers.len() >= self.max_entries {
            self.containers.clear();
        }
        self.containers.insert(id.to_owned(), meta.clone());
        Some(meta)
    }

    fn read_kubelet_pod(&self, uid: &str) -> Option<KubeletPod> {
        let dir = self.roots.kubelet.join("pods").join(uid);
        let pod = fs::read_to_string(dir.join("etc-hosts"))
            .ok()
            .and_then(|t| parse_etc_hosts(&t))
            .unwrap_or_default();
        let namespace = kubelet_namespace(&dir).unwrap_or_default();
        (!pod.is_empty() || !namespace.is_empty()).then_some(KubeletPod { pod, namespace })
    }

    /// Pod name and namespace from the kubelet's pod directory (cached once found).
    pub fn kubelet_pod(&mut self, uid: &str) -> Option<KubeletPod> {
        if let Some(p) = self.pods.get(uid) {
            return Some(p.clone());
        }
        let p = self.read_kubelet_pod(uid)?;
        if self.pods.len() >= self.max_entries {
            self.pods.clear();
        }
        self.pods.insert(uid.to_owned(), p.clone());
        Some(p)
    }

    /// Forget a container whose cgroup vanished (its ID is never reused).
    pub fn forget(&mut self, id: &str) {
        self.containers.remove(id);
    }
}

/// The `namespace` file of the pod's projected service-account volume.
fn kubelet_namespace(pod_dir: &Path) -> Option<String> {
    let projected = pod_dir.join("volumes/kubernetes.io~projected");
    fs::read_dir(projected).ok()?.flatten().find_map(|e| {
        fs::read_to_string(e.path().join("namespace"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "1f2e3d4c-5b6a-4789-8abc-def012345678";

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tcpstall-rt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn containerd_spec_container_and_sandbox() {
        let c = format!(
            r#"{{"ociVersion":"1.1.0","annotations":{{
            "io.kubernetes.cri.container-type":"container",
            "io.kubernetes.cri.container-name":"app",
            "io.kubernetes.cri.sandbox-id":"{CID}",
            "io.kubernetes.cri.sandbox-name":"web-7d9f-abcde",
            "io.kubernetes.cri.sandbox-namespace":"shop",
            "io.kubernetes.cri.sandbox-uid":"{UID}"}}}}"#
        );
        let m = parse_containerd_spec(&c).unwrap();
        assert_eq!(
            m,
            ContainerMeta {
                pod: "web-7d9f-abcde".into(),
                namespace: "shop".into(),
                pod_uid: UID.into(),
                container: "app".into(),
                sandbox: false
            }
        );
        let s = r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox",
            "io.kubernetes.cri.sandbox-name":"web","io.kubernetes.cri.sandbox-namespace":"shop"}}"#;
        let m = parse_containerd_spec(s).unwrap();
        assert!(m.sandbox && m.container.is_empty() && m.pod == "web");
        assert_eq!(parse_containerd_spec(r#"{"annotations":{}}"#), None);
        assert_eq!(parse_containerd_spec("not json"), None);
    }

    #[test]
    fn crio_and_docker_configs() {
        let c = r#"{"annotations":{"io.kubernetes.pod.name":"db-0","io.kubernetes.pod.namespace":"data",
            "io.kubernetes.pod.uid":"u","io.kubernetes.container.name":"postgres",
            "io.kubernetes.cri-o.ContainerType":"container"}}"#;
        let m = parse_crio_config(c).unwrap();
        assert_eq!(
            (m.pod.as_str(), m.namespace.as_str(), m.container.as_str()),
            ("db-0", "data", "postgres")
        );
        assert!(!m.sandbox);
        let d = r#"{"Config":{"Labels":{"io.kubernetes.pod.name":"api","io.kubernetes.pod.namespace":"web",
            "io.kubernetes.container.name":"server","io.kubernetes.docker.type":"container"}}}"#;
        let m = parse_docker_config(d).unwrap();
        assert_eq!(
            (m.pod.as_str(), m.namespace.as_str(), m.container.as_str()),
            ("api", "web", "server")
        );
        assert_eq!(parse_crio_config("{}"), None);
        assert_eq!(parse_docker_config("{}"), None);
    }

    #[test]
    fn etc_hosts_names_the_pod() {
        let hosts = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                     fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n\
                     10.244.1.5\tweb-7d9f-abcde\n\n# Entries added by HostAliases.\n1.2.3.4\tfoo bar\n";
        assert_eq!(parse_etc_hosts(hosts).as_deref(), Some("web-7d9f-abcde"));
        let sub = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n10.0.0.9\tdb-0.db.data.svc.cluster.local\tdb-0\n";
        assert_eq!(parse_etc_hosts(sub).as_deref(), Some("db-0"));
        assert_eq!(parse_etc_hosts("127.0.0.1 localhost\n"), None);
    }

    #[test]
    fn reads_state_files_under_the_given_roots() {
        let root = tmp("roots");
        let roots = RuntimeRoots {
            containerd: root.join("containerd"),
            crio: root.join("crio"),
            docker: root.join("docker"),
            kubelet: root.join("kubelet"),
        };
        let bundle = roots
            .containerd
            .join("io.containerd.runtime.v2.task/k8s.io")
            .join(CID);
        fs::create_dir_all(&bundle).unwrap();
        fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.container-name":"app",
               "io.kubernetes.cri.sandbox-name":"web","io.kubernetes.cri.sandbox-namespace":"shop"}}"#,
        )
        .unwrap();
        let pod_dir = roots.kubelet.join("pods").join(UID);
        fs::create_dir_all(pod_dir.join("volumes/kubernetes.io~projected/kube-api-access-x"))
            .unwrap();
        fs::write(
            pod_dir.join("etc-hosts"),
            "127.0.0.1 localhost\n10.1.1.1\tweb\n",
        )
        .unwrap();
        fs::write(
            pod_dir.join("volumes/kubernetes.io~projected/kube-api-access-x/namespace"),
            "shop\n",
        )
        .unwrap();
        let mut st = RuntimeState::new(roots, 10);
        let m = st.container(CID, Runtime::Containerd).unwrap();
        assert_eq!((m.pod.as_str(), m.container.as_str()), ("web", "app"));
        // Unknown runtime (cgroupfs driver) tries each.
        assert_eq!(
            st.container(CID, Runtime::Unknown).unwrap().container,
            "app"
        );
        // The wrong runtime does not find it (no cross-talk), nor a missing ID.
        st.containers.clear();
        assert_eq!(st.container(CID, Runtime::Crio), None);
        assert_eq!(st.container(&"f".repeat(64), Runtime::Unknown), None);
        assert_eq!(
            st.kubelet_pod(UID),
            Some(KubeletPod {
                pod: "web".into(),
                namespace: "shop".into()
            })
        );
        assert_eq!(st.kubelet_pod("nope"), None);
        fs::remove_dir_all(&root).unwrap();
    }
}
