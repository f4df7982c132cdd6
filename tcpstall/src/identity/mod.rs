//! Who owns a socket: the pod and container (from the socket's cgroup and
//! the runtimes' node-local state) and the process holding it.
//!
//! - [`cgroup`]: cgroup id -> cgroup path -> pod UID + container ID;
//! - [`runtime`]: container ID / pod UID -> pod name, namespace, container
//!   name (containerd, CRI-O, Docker state; the kubelet's pod directory);
//! - [`process`]: socket -> pid and command, for stalled flows only;
//! - [`netns`]: network namespace -> pod, from /proc (the fallback below);
//! - [`listen`]: which side opened a connection (a local listening port
//!   means accepted), for the peer-service `remote` label.
//!
//! Sockets without a cgroup id, and every socket on a cgroup v1-only host
//! (no cgroup2 mount; the kernel reports the v2 root for every socket), fall
//! back to the network namespace lookup of [`netns`].

pub mod cgroup;
pub mod cgroup_watch;
pub mod listen;
pub mod netns;
pub mod process;
pub mod runtime;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

pub use listen::{Direction, peer_service};
pub use process::{ProcessInfo, SocketKey};
pub use runtime::RuntimeRoots;

use netns::{PodIdentity, PodResolver};

/// The pod and the process owning a stalled socket.
pub(crate) type Owner = (Option<PodIdentity>, Option<ProcessInfo>);

/// How long a resolved cgroup walk or /proc scan is reused before a miss
/// triggers another.
pub const RESCAN_AFTER: Duration = Duration::from_secs(2);
/// Bounds of the caches.
pub const MAX_CGROUPS: usize = 200_000;
pub const MAX_CACHED: usize = 8_192;

/// Where to look (all paths as seen by the agent).
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The host's /proc (`--proc-root`).
    pub proc_root: PathBuf,
    /// The cgroup2 mount (None: cgroup v1-only host).
    pub cgroup2_root: Option<PathBuf>,
    pub runtimes: RuntimeRoots,
    /// Reuse of a netns -> pod map (fallback) before a rescan.
    pub netns_refresh: Duration,
}

/// A flow to identify.
#[derive(Clone, Copy, Debug)]
pub struct FlowRef {
    pub netns: u32,
    /// cgroup v2 id of the socket (0 = unknown).
    pub cgroup_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl FlowRef {
    /// The identity lookup key of a stalled flow.
    pub fn of(v: &crate::engine::StallView) -> Self {
        Self {
            netns: v.netns,
            cgroup_id: v.cgroup_id,
            local: v.local,
            remote: v.remote,
        }
    }

    /// The lookup key of a socket known by its owner only (the audit's
    /// per-pod counts): the addresses play no part in pod identity.
    pub fn owner(netns: u32, cgroup_id: u64) -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        Self {
            netns,
            cgroup_id,
            local: any,
            remote: any,
        }
    }
}

pub struct Identities {
    cgroups: cgroup::CgroupIndex,
    runtime: runtime::RuntimeState,
    procs: process::ProcessResolver,
    netns: PodResolver,
    listen: listen::ListenIndex,
}

impl Identities {
    pub fn new(cfg: &IdentityConfig) -> Self {
        Self {
            cgroups: cgroup::CgroupIndex::new(cfg.cgroup2_root.clone(), RESCAN_AFTER, MAX_CGROUPS),
            runtime: runtime::RuntimeState::new(cfg.runtimes.clone(), MAX_CACHED),
            procs: process::ProcessResolver::new(&cfg.proc_root, MAX_CACHED, RESCAN_AFTER * 5),
            netns: PodResolver::new(&cfg.proc_root, cfg.netns_refresh),
            listen: listen::ListenIndex::new(&cfg.proc_root),
        }
    }

    /// The socket's cgroup path relative to the cgroup2 root, if known.
    pub fn cgroup_path(&mut self, cgroup_id: u64, now: Instant) -> Option<String> {
        self.cgroups.path(cgroup_id, now).map(str::to_owned)
    }

    /// The pod and container owning the flow's socket, if it is a pod's.
    pub fn pod(&mut self, f: &FlowRef, now: Instant) -> Option<PodIdentity> {
        match self.cgroups.path(f.cgroup_id, now).map(str::to_owned) {
            // The v2 root: a host process. (Pods always have their own
            // cgroup on a node with a cgroup2 mount; the network namespace
            // would name whichever hostNetwork pod it finds first.)
            Some(p) if p == "/" => None,
            Some(p) => self.by_cgroup(&p),
            None if f.cgroup_id == 0 || self.cgroups.root().is_none() => self.by_netns(f, now),
            // A cgroup that vanished (its pod is gone): unknown.
            None => None,
        }
    }

    /// Who opened the flow's connection (its local port listening in its
    /// namespace: accepted).
    pub fn direction(&mut self, f: &FlowRef, now: Instant) -> Direction {
        self.listen.direction(f.netns, f.local, now)
    }

    /// The pod owning a network namespace (for views keyed by netns only;
    /// names the pod, not the container: see [`crate::identity::netns`]).
    pub fn lookup(&mut self, netns: u64, now: Instant) -> Option<&PodIdentity> {
        self.netns.lookup(netns, now)
    }

    /// The pod and container a cgroup path (relative to the cgroup2 root)
    /// belongs to, if it is a pod's (the guard's matching).
    pub fn pod_of_cgroup_path(&mut self, path: &str) -> Option<PodIdentity> {
        self.by_cgroup(path)
    }

    fn by_netns(&mut self, f: &FlowRef, now: Instant) -> Option<PodIdentity> {
        self.netns.lookup(u64::from(f.netns), now).cloned()
    }

    fn by_cgroup(&mut self, path: &str) -> Option<PodIdentity> {
        let k = cgroup::parse_kubelet_path(path)?;
        let meta = k
            .container_id
            .as_deref()
            .and_then(|id| self.runtime.container(id, k.runtime));
        let (pod, namespace, container) = match meta {
            Some(m) => (m.pod, m.namespace, m.container),
            None => {
                let kp = self.runtime.kubelet_pod(&k.pod_uid).unwrap_or_default();
                (kp.pod, kp.namespace, String::new())
            }
        };
        Some(PodIdentity {
            pod,
            namespace,
            pod_uid: k.pod_uid,
            container,
            container_id: k.container_id.unwrap_or_default(),
        })
    }

    /// The process holding the flow's socket (stalled flows only: this may
    /// scan /proc; results are cached).
    pub fn process(&mut self, f: &FlowRef, now: Instant) -> Option<ProcessInfo> {
        let rel = self
            .cgroups
            .path(f.cgroup_id, now)
            .filter(|p| *p != "/")
            .map(|p| p.trim_start_matches('/').to_owned());
        let dir = rel.and_then(|p| self.cgroups.root().map(|r| r.join(p)));
        self.procs.resolve(
            SocketKey {
                netns: f.netns,
                local: f.local,
                remote: f.remote,
            },
            dir.as_deref(),
            now,
        )
    }

    /// Record a socket owner learnt from another source (kernel iterator).
    pub fn learn_process(&mut self, key: SocketKey, info: ProcessInfo, now: Instant) {
        self.procs.learn(key, info, now);
    }
}
