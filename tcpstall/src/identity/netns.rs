//! Network namespace -> pod identity, from the host's /proc (in a DaemonSet:
//! `--proc-root /host/proc` with `hostPID: true`).
//!
//! Only the fallback for sockets without a usable cgroup id (cgroup v1-only
//! hosts): the primary source is the rest of [`crate::identity`]
//! ([`super::cgroup`], [`super::runtime`]), from the socket's own cgroup. A
//! network namespace is shared by a pod's containers (and by every
//! hostNetwork pod), so this can name only the pod, not the container.
//!
//! For each process: `/proc/PID/ns/net` gives the netns inode; its cgroup path
//! gives the pod UID and container ID (systemd and cgroupfs drivers); the pod
//! name is the container's `HOSTNAME` (Kubernetes sets it to the pod name) and
//! the namespace comes from the service-account mount when present. The map
//! is rebuilt at most every `refresh` and only when asked, so an idle agent
//! never scans /proc.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PodIdentity {
    /// Pod name (from HOSTNAME), or empty.
    pub pod: String,
    /// Kubernetes namespace, or empty.
    pub namespace: String,
    /// Pod UID from the cgroup path.
    pub pod_uid: String,
    /// Container name, or empty when unknown.
    pub container: String,
    /// Container ID (the runtime's, 64 hex digits; 12 from the netns
    /// fallback), or empty.
    pub container_id: String,
}

pub struct PodResolver {
    proc_root: PathBuf,
    refresh: Duration,
    last_scan: Option<Instant>,
    by_netns: HashMap<u64, PodIdentity>,
}

/// Extract (pod UID, container ID) from one line of /proc/PID/cgroup.
pub fn parse_cgroup_line(line: &str) -> Option<(String, String)> {
    let path = line.rsplit(':').next()?;
    if !path.contains("kubepods") {
        return None;
    }
    let mut uid = None;
    let mut container = String::new();
    for seg in path.split('/') {
        // systemd: kubepods-burstable-pod<uid with _>.slice; cgroupfs: pod<uid>
        let seg_trim = seg.strip_suffix(".slice").unwrap_or(seg);
        if let Some(i) = seg_trim.rfind("pod") {
            let cand = &seg_trim[i + 3..];
            if cand.len() >= 32
                && cand
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
            {
                uid = Some(cand.replace('_', "-"));
                continue;
            }
        }
        // systemd: cri-containerd-<id>.scope / crio-<id>.scope / docker-<id>.scope
        let seg_scope = seg.strip_suffix(".scope").unwrap_or(seg);
        let id = seg_scope.rsplit('-').next().unwrap_or(seg_scope);
        if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
            container = id[..12].to_owned();
        }
    }
    uid.map(|u| (u, container))
}

fn read_environ_var(path: &Path, key: &str) -> Option<String> {
    let data = fs::read(path).ok()?;
    data.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        kv.strip_prefix(key)?.strip_prefix('=').map(str::to_owned)
    })
}

fn netns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

impl PodResolver {
    pub fn new(proc_root: impl Into<PathBuf>, refresh: Duration) -> Self {
        Self {
            proc_root: proc_root.into(),
            refresh,
            last_scan: None,
            by_netns: HashMap::new(),
        }
    }

    /// Identity of the pod owning network namespace `netns` (inode), if any.
    pub fn lookup(&mut self, netns: u64, now: Instant) -> Option<&PodIdentity> {
        let stale = self
            .last_scan
            .is_none_or(|t| now.duration_since(t) >= self.refresh);
        if stale && !self.by_netns.contains_key(&netns) {
            self.scan();
            self.last_scan = Some(now);
        }
        self.by_netns.get(&netns)
    }

    /// Rebuild the map from /proc. Processes that vanish mid-scan are skipped.
    pub fn scan(&mut self) {
        let mut map = HashMap::new();
        let Ok(dir) = fs::read_dir(&self.proc_root) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let base = self.proc_root.join(pid);
            let Some(inode) = fs::read_link(base.join("ns/net"))
                .ok()
                .and_then(|l| netns_inode(&l.to_string_lossy()))
            else {
                continue;
            };
            if map.contains_key(&inode) {
                continue;
            }
            let Ok(cgroup) = fs::read_to_string(base.join("cgroup")) else {
                continue;
            };
            let Some((pod_uid, container)) = cgroup.lines().find_map(parse_cgroup_line) else {
                continue;
            };
            let pod = read_environ_var(&base.join("environ"), "HOSTNAME").unwrap_or_default();
            let namespace = fs::read_to_string(
                base.join("root/var/run/secrets/kubernetes.io/serviceaccount/namespace"),
            )
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
            map.insert(
                inode,
                PodIdentity {
                    pod,
                    namespace,
                    pod_uid,
                    container: String::new(),
                    container_id: container,
                },
            );
        }
        self.by_netns = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f2e3d4c-5b6a-4789-8abc-def012345678";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_systemd_and_cgroupfs_paths() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(
            parse_cgroup_line(&systemd),
            Some((UID.to_owned(), CID[..12].to_owned()))
        );
        let cgroupfs = format!("12:memory:/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(
            parse_cgroup_line(&cgroupfs),
            Some((UID.to_owned(), CID[..12].to_owned()))
        );
        assert_eq!(
            parse_cgroup_line("0::/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(parse_cgroup_line(""), None);
    }

    #[test]
    fn resolves_from_a_fake_proc_tree() {
        let root = std::env::temp_dir().join(format!("tcpstall-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let pid = root.join("4242");
        fs::create_dir_all(pid.join("ns")).unwrap();
        fs::create_dir_all(pid.join("root/var/run/secrets/kubernetes.io/serviceaccount")).unwrap();
        std::os::unix::fs::symlink("net:[4026532999]", pid.join("ns/net")).unwrap();
        fs::write(
            pid.join("cgroup"),
            format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"),
        )
        .unwrap();
        fs::write(pid.join("environ"), b"PATH=/bin\0HOSTNAME=web-7d9f-abcde\0").unwrap();
        fs::write(
            pid.join("root/var/run/secrets/kubernetes.io/serviceaccount/namespace"),
            "shop\n",
        )
        .unwrap();
        // A host process without a pod, and junk entries.
        let host = root.join("1");
        fs::create_dir_all(host.join("ns")).unwrap();
        std::os::unix::fs::symlink("net:[4026531840]", host.join("ns/net")).unwrap();
        fs::write(host.join("cgroup"), "0::/init.scope\n").unwrap();
        fs::create_dir_all(root.join("self")).unwrap();

        let mut r = PodResolver::new(&root, Duration::from_secs(10));
        let now = Instant::now();
        let id = r.lookup(4026532999, now).cloned().expect("pod found");
        assert_eq!(id.pod, "web-7d9f-abcde");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.pod_uid, UID);
        assert_eq!(id.container_id, &CID[..12]);
        assert_eq!(id.container, "");
        assert!(r.lookup(4026531840, now).is_none());
        assert!(r.lookup(1, now).is_none());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_proc_root_is_harmless() {
        let mut r = PodResolver::new("/nonexistent/proc", Duration::from_secs(1));
        assert!(r.lookup(1, Instant::now()).is_none());
    }
}
