//! cgroup v2 id -> cgroup path, and the kubelet's naming of pod and container
//! cgroups.
//!
//! The cgroup id the kernel reports for a socket (`sk_cgrp_data`) is the
//! inode number of the cgroup's directory on cgroup2fs. [`CgroupIndex`] walks
//! the cgroup2 mount (from `/proc/self/mountinfo`: `/sys/fs/cgroup` on a
//! pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one) into an
//! id -> path map, and walks again on a miss, at most once per
//! `min_rescan` and never beyond `max_entries` directories.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The container runtime named by a kubelet cgroup's scope prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    /// cgroupfs driver: the path does not say which runtime.
    Unknown,
}

/// What a kubelet cgroup path says about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeletCgroup {
    /// Pod UID with dashes (the systemd driver writes `_`).
    pub pod_uid: String,
    /// Full container ID (64 hex digits), when the cgroup is a container's
    /// (not the pod-level cgroup).
    pub container_id: Option<String>,
    pub runtime: Runtime,
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parse a cgroup path (relative to the cgroup2 root, e.g.
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
/// or `/kubepods/burstable/pod<uid>/<id>`). None when it is not a pod's.
pub fn parse_kubelet_path(path: &str) -> Option<KubeletCgroup> {
    let mut segs = path.split('/').filter(|s| !s.is_empty());
    let first = segs.next()?;
    if first != "kubepods.slice" && first != "kubepods" {
        // Some distributions nest the kubelet tree (e.g. under a
        // `kubelet.slice`); find the kubepods root anywhere in the path.
        let at = path.find("/kubepods")?;
        return parse_kubelet_path(&path[at..]);
    }
    let mut pod_uid = None;
    let mut container_id = None;
    let mut runtime = Runtime::Unknown;
    for seg in segs {
        if pod_uid.is_none() {
            // systemd: kubepods[-<qos>]-pod<uid with _>.slice; cgroupfs: pod<uid>
            let s = seg.strip_suffix(".slice").unwrap_or(seg);
            if let Some(i) = s.rfind("pod") {
                let cand = s[i + 3..].replace('_', "-");
                if is_uid(&cand) {
                    pod_uid = Some(cand);
                }
            }
            continue;
        }
        // The first level below the pod cgroup is the container's.
        let (rt, id) = if let Some(scope) = seg.strip_suffix(".scope") {
            match scope.rsplit_once('-') {
                Some((prefix, id)) => (
                    match prefix {
                        "cri-containerd" => Runtime::Containerd,
                        "crio" | "crio-conmon" => Runtime::Crio,
                        "docker" => Runtime::Docker,
                        _ => Runtime::Unknown,
                    },
                    id,
                ),
                None => (Runtime::Unknown, scope),
            }
        } else {
            (Runtime::Unknown, seg)
        };
        if is_container_id(id) {
            container_id = Some(id.to_ascii_lowercase());
            runtime = rt;
        }
        break;
    }
    Some(KubeletCgroup {
        pod_uid: pod_uid?,
        container_id,
        runtime,
    })
}

/// How soon a miss on an id above every id seen so far walks again. cgroup2
/// ids only grow (kernfs allocates them cyclically upwards, with a
/// generation above), so such an id is a cgroup created since the last walk:
/// a pod that stalls right after it started must not wait out `min_rescan`
/// (its `stall started` line is resolved once).
pub const NEW_CGROUP_RESCAN: Duration = Duration::from_millis(100);

/// cgroup id -> path (relative to the cgroup2 root, starting with `/`).
pub struct CgroupIndex {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    last_walk: Option<Instant>,
    /// The highest id seen by a walk or looked up after one: a miss above
    /// it walks again after [`NEW_CGROUP_RESCAN`], once per new id.
    newest: u64,
    min_rescan: Duration,
    max_entries: usize,
    /// Walks done (for tests and logs).
    pub walks: u64,
}

impl CgroupIndex {
    /// `root`: the cgroup2 mount point (None on a cgroup v1-only host).
    pub fn new(root: Option<PathBuf>, min_rescan: Duration, max_entries: usize) -> Self {
        Self {
            root,
            by_id: HashMap::new(),
            last_walk: None,
            newest: 0,
            min_rescan,
            max_entries,
            walks: 0,
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The path of cgroup `id`, walking the hierarchy again on a miss (at
    /// most once per `min_rescan`, or per [`NEW_CGROUP_RESCAN`] for an id
    /// newer than every id seen).
    pub fn path(&mut self, id: u64, now: Instant) -> Option<&str> {
        if id == 0 || self.root.is_none() {
            return None;
        }
        if !self.by_id.contains_key(&id) && self.needs_walk(id, now) {
            self.walk();
            self.last_walk = Some(now);
            // Not found now, it walks again only after `min_rescan` (a
            // cgroup that vanished at once, or an id from elsewhere).
            self.newest = self.newest.max(id);
        }
        self.by_id.get(&id).map(String::as_str)
    }

    /// Every cgroup of the last walk (id, path).
    pub fn entries(&self) -> impl Iterator<Item = (u64, &str)> {
        self.by_id.iter().map(|(id, p)| (*id, p.as_str()))
    }

    /// The directory of every cgroup of the last walk.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let Some(root) = &self.root else {
            return Vec::new();
        };
        self.by_id
            .values()
            .map(|rel| root.join(rel.trim_start_matches('/')))
            .collect()
    }

    /// Whether a miss on `id` at `now` walks the hierarchy again.
    fn needs_walk(&self, id: u64, now: Instant) -> bool {
        let Some(last) = self.last_walk else {
            return true;
        };
        let since = now.saturating_duration_since(last);
        since >= self.min_rescan || (id > self.newest && since >= NEW_CGROUP_RESCAN)
    }

    /// Rebuild the map (depth first; directories that vanish are skipped).
    pub fn walk(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        self.walks += 1;
        let mut map = HashMap::new();
        let mut stack = vec![(root.clone(), String::from("/"))];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            map.insert(meta.ino(), rel.clone());
            if map.len() >= self.max_entries {
                tracing::warn!(
                    max = self.max_entries,
                    root = %root.display(),
                    "cgroup hierarchy larger than the index bound: some cgroups stay unresolved"
                );
                break;
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((e.path(), child));
                }
            }
        }
        self.newest = map.keys().copied().fold(self.newest, u64::max);
        self.by_id = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f2e3d4c-5b6a-4789-8abc-def012345678";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn systemd_driver_every_qos_and_runtime() {
        let u = UID.replace('-', "_");
        for (qos_dirs, rt_prefix, rt) in [
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                "cri-containerd",
                Runtime::Containerd,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
                ),
                "crio",
                Runtime::Crio,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice"),
                "docker",
                Runtime::Docker,
            ),
        ] {
            let p = format!("{qos_dirs}/{rt_prefix}-{CID}.scope");
            assert_eq!(
                parse_kubelet_path(&p),
                Some(KubeletCgroup {
                    pod_uid: UID.into(),
                    container_id: Some(CID.into()),
                    runtime: rt
                }),
                "{p}"
            );
            // The pod-level cgroup itself: pod, no container.
            let pod = parse_kubelet_path(&qos_dirs).expect(&qos_dirs);
            assert_eq!((pod.pod_uid.as_str(), pod.container_id), (UID, None));
        }
    }

    #[test]
    fn cgroupfs_driver_every_qos() {
        for p in [
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            format!("/kubepods/besteffort/pod{UID}/{CID}"),
            format!("/kubepods/pod{UID}/{CID}"),
        ] {
            let k = parse_kubelet_path(&p).expect(&p);
            assert_eq!(k.pod_uid, UID);
            assert_eq!(k.container_id.as_deref(), Some(CID));
            assert_eq!(k.runtime, Runtime::Unknown);
        }
    }

    #[test]
    fn a_cgroup_newer_than_the_last_walk_is_walked_for_at_once() {
        let root = std::env::temp_dir().join(format!("tcpstall-cg-new-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("old")).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let mut idx = CgroupIndex::new(Some(root.clone()), Duration::from_secs(2), 100);
        let t0 = Instant::now();
        idx.walk();
        idx.last_walk = Some(t0);
        // The decision, on ids around the newest seen.
        idx.newest = 1000;
        let ms = Duration::from_millis;
        assert!(idx.needs_walk(1001, t0 + ms(100)), "new id: walk");
        assert!(
            !idx.needs_walk(1001, t0 + ms(50)),
            "new id: not within 100 ms"
        );
        assert!(
            !idx.needs_walk(999, t0 + ms(1999)),
            "old id: not within min_rescan"
        );
        assert!(
            idx.needs_walk(999, t0 + ms(2000)),
            "old id: after min_rescan"
        );
        // A pod's cgroup created after the walk (its id above every id seen;
        // inode numbers of this test's directories need not grow, so the
        // newest is set below it): found 100 ms after the walk, not 2 s.
        fs::create_dir_all(root.join("kubepods/pod")).unwrap();
        let pod = ino(&root.join("kubepods/pod"));
        idx.newest = pod - 1;
        assert_eq!(idx.path(pod, t0 + ms(150)), Some("/kubepods/pod"));
        assert_eq!(idx.walks, 2);
        // A new id that is nowhere walks once, then waits for min_rescan.
        let gone = idx.newest + 1_000_000;
        assert_eq!(idx.path(gone, t0 + ms(300)), None);
        assert_eq!(idx.path(gone, t0 + ms(500)), None);
        assert_eq!(idx.walks, 3);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn not_a_pod() {
        for p in [
            "/",
            "/user.slice/user-0.slice/session-1.scope",
            "/system.slice/containerd.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/podnotauid/x",
            "",
        ] {
            assert_eq!(parse_kubelet_path(p), None, "{p}");
        }
        // A nested kubelet tree still parses.
        let nested = format!("/kubelet.slice/kubepods/pod{UID}/{CID}");
        assert_eq!(parse_kubelet_path(&nested).unwrap().pod_uid, UID);
    }

    #[test]
    fn index_walks_on_miss_and_is_rate_limited() {
        let root = std::env::temp_dir().join(format!("tcpstall-cgidx-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("a/b")).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let mut idx = CgroupIndex::new(Some(root.clone()), Duration::from_secs(5), 100);
        let t0 = Instant::now();
        assert_eq!(idx.path(ino(&root.join("a/b")), t0), Some("/a/b"));
        assert_eq!(idx.path(ino(&root), t0), Some("/"));
        assert_eq!(idx.walks, 1);
        fs::create_dir_all(root.join("c")).unwrap();
        let c = ino(&root.join("c"));
        // A miss on an id not above the newest seen (a vanished cgroup)
        // walks again, but not twice within min_rescan.
        assert!(idx.newest >= 1 && !idx.by_id.contains_key(&1));
        assert_eq!(idx.path(1, t0), None);
        assert_eq!(idx.walks, 1);
        assert_eq!(idx.path(c, t0 + Duration::from_secs(6)), Some("/c"));
        assert_eq!(idx.walks, 2);
        assert_eq!(idx.path(0, t0), None);
        // Bounded.
        let mut small = CgroupIndex::new(Some(root.clone()), Duration::ZERO, 2);
        small.walk();
        assert_eq!(small.by_id.len(), 2);
        fs::remove_dir_all(&root).unwrap();
        // No cgroup2 mount: nothing, no walk.
        let mut none = CgroupIndex::new(None, Duration::ZERO, 10);
        assert_eq!(none.path(1, t0), None);
        assert_eq!(none.walks, 0);
    }
}
