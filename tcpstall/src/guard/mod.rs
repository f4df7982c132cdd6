//! The guard: arms `TCP_USER_TIMEOUT` and keepalive on new connections whose
//! application left them unset, per an opt-in policy (`--guard-policy`).
//!
//! - [`policy`]: the TOML file, parsed and matched (first rule wins);
//! - this module: [`Guard`], the state between ticks: the last good policy
//!   (a reload that fails keeps it), which cgroup gets which rule (the
//!   kernel program looks the socket's cgroup id up in a hash map the agent
//!   fills from a walk of the cgroup2 tree, pods named by the identity
//!   wing), and what the kernel reported it did per socket (counted, logged
//!   once per (pod, rule), listed by `/api/v1/guard`).
//!
//! The kernel side is `tcpstall-ebpf/src/guard.rs`; the maps are handed out
//! by the loader ([`crate::kernel::loader::GuardMaps`]).

pub mod policy;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Serialize;
use tcpstall_common::guard::{GuardRecord, GuardRule, action};

pub use policy::{Mode, Policy, PolicyError, Rule, Target};

/// Socket records kept for the API and `guarded_by` (oldest dropped first).
pub const MAX_SOCKETS_KEPT: usize = 16_384;
/// (pod, rule) pairs remembered for the once-per-pair log line.
const MAX_LOGGED: usize = 65_536;

/// What one cgroup is and which rule covers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupEntry {
    pub cgroup_id: u64,
    pub path: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub rule: String,
}

/// One socket the guard acted on (or would have: dry-run).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GuardedSocket {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns: u32,
    pub cgroup_id: u64,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub rule: String,
    pub mode: Mode,
    /// `active` (connect) or `passive` (accepted).
    pub side: &'static str,
    /// What was set (enforce) or would be set (dry-run).
    pub actions: Vec<&'static str>,
    /// Values the application had set and kept (`user_timeout`, `keepalive`).
    pub kept: Vec<&'static str>,
    pub user_timeout_ms: Option<u32>,
    /// The application's own TCP_USER_TIMEOUT, when it had one.
    pub found_user_timeout_ms: Option<u32>,
    pub keepalive_idle_s: Option<u32>,
    pub keepalive_interval_s: Option<u32>,
    pub keepalive_count: Option<u32>,
    /// A `bpf_setsockopt` failed (negative errno).
    pub error: Option<i32>,
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
}

impl GuardedSocket {
    /// Changed (or would change) anything.
    pub fn changes(&self) -> bool {
        !self.actions.is_empty()
    }
}

/// A log line to write (once per (pod or cgroup, rule)).
#[derive(Clone, Debug, PartialEq)]
pub struct FirstGuard {
    pub who: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub rule: String,
    pub mode: Mode,
    pub actions: Vec<&'static str>,
}

/// Metric increments of one ingest: (namespace, rule, action, mode).
pub type Counts = Vec<(String, String, &'static str, &'static str)>;

/// The guard's state.
pub struct Guard {
    pub path: PathBuf,
    pub policy: Policy,
    /// Why the last reload failed (the policy above is still in force).
    pub last_error: Option<String>,
    pub reloads: u64,
    mtime: Option<SystemTime>,
    /// cgroup id -> (rule index, what the kernel has).
    installed: HashMap<u64, (usize, GuardRule)>,
    cgroups: HashMap<u64, CgroupEntry>,
    sockets: VecDeque<GuardedSocket>,
    by_cookie: HashMap<u64, usize>,
    /// Records pushed since start (`by_cookie` values are offsets of it).
    pushed: usize,
    logged: HashSet<(String, String)>,
}

/// A cgroup's identity as the walk found it.
pub struct Seen<'a> {
    pub id: u64,
    pub path: &'a str,
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
}

/// Map updates for the kernel: `Some(rule)` set, `None` remove.
pub type Updates = Vec<(u64, Option<GuardRule>)>;

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn actions_of(bits: u32) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut set = Vec::new();
    for (b, n) in [
        (action::USER_TIMEOUT, "user_timeout"),
        (action::KEEPALIVE, "keepalive"),
    ] {
        if bits & b != 0 {
            set.push(n);
        }
    }
    let mut kept = Vec::new();
    for (b, n) in [
        (action::KEPT_USER_TIMEOUT, "user_timeout"),
        (action::KEPT_KEEPALIVE, "keepalive"),
    ] {
        if bits & b != 0 {
            kept.push(n);
        }
    }
    (set, kept)
}

fn addr(family: u16, a: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == 10 {
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    };
    SocketAddr::new(ip, port)
}

impl Guard {
    /// Reads and parses the policy (an invalid one is the caller's error).
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let policy = read_policy(path)?;
        Ok(Self {
            path: path.to_owned(),
            policy,
            last_error: None,
            reloads: 0,
            mtime: mtime(path),
            installed: HashMap::new(),
            cgroups: HashMap::new(),
            sockets: VecDeque::new(),
            by_cookie: HashMap::new(),
            pushed: 0,
            logged: HashSet::new(),
        })
    }

    /// The file changed since the last (re)load.
    pub fn changed_on_disk(&self) -> bool {
        mtime(&self.path) != self.mtime
    }

    /// Re-reads the policy: on error the last good one stays in force and
    /// the error is returned (and kept for the API).
    pub fn reload(&mut self) -> Result<(), PolicyError> {
        self.mtime = mtime(&self.path);
        match read_policy(&self.path) {
            Ok(p) => {
                self.policy = p;
                self.last_error = None;
                self.reloads += 1;
                Ok(())
            }
            Err(e) => {
                self.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Matches every cgroup the walk found against the policy and returns
    /// what the kernel map must change (cgroups gone are removed).
    pub fn sync<'a>(&mut self, seen: impl IntoIterator<Item = Seen<'a>>) -> Updates {
        let mut want: HashMap<u64, (usize, GuardRule)> = HashMap::new();
        let mut entries = HashMap::new();
        for s in seen {
            let t = Target {
                cgroup: s.path,
                namespace: s.namespace,
                pod: s.pod,
            };
            if let Some((i, r)) = self.policy.first_match(&t) {
                want.insert(s.id, (i, r.kernel(i as u32 + 1)));
                entries.insert(
                    s.id,
                    CgroupEntry {
                        cgroup_id: s.id,
                        path: s.path.to_owned(),
                        namespace: s.namespace.map(str::to_owned),
                        pod: s.pod.map(str::to_owned),
                        rule: r.name.clone(),
                    },
                );
            }
        }
        let mut updates = Vec::new();
        for (id, (i, rule)) in &want {
            if self.installed.get(id) != Some(&(*i, *rule)) {
                updates.push((*id, Some(*rule)));
            }
        }
        for id in self.installed.keys() {
            if !want.contains_key(id) {
                updates.push((*id, None));
            }
        }
        updates.sort_by_key(|u| u.0);
        self.installed = want;
        self.cgroups = entries;
        updates
    }

    /// A cgroup's entry (rule covering it), if any.
    pub fn cgroup(&self, id: u64) -> Option<&CgroupEntry> {
        self.cgroups.get(&id)
    }

    /// Every covered cgroup, by id.
    pub fn cgroups(&self) -> Vec<&CgroupEntry> {
        let mut v: Vec<_> = self.cgroups.values().collect();
        v.sort_by_key(|c| c.cgroup_id);
        v
    }

    /// What the guard did to the socket `cookie`, if it acted on it.
    pub fn socket(&self, cookie: u64) -> Option<&GuardedSocket> {
        let off = *self.by_cookie.get(&cookie)?;
        let first = self.pushed - self.sockets.len();
        self.sockets.get(off.checked_sub(first)?)
    }

    /// Recent sockets, oldest first.
    pub fn sockets(&self) -> impl DoubleEndedIterator<Item = &GuardedSocket> {
        self.sockets.iter()
    }

    /// Folds in the kernel's records: the metric increments and the first
    /// log line of each (pod, rule).
    pub fn ingest(&mut self, records: &[GuardRecord]) -> (Counts, Vec<FirstGuard>) {
        let mut counts = Vec::new();
        let mut logs = Vec::new();
        let mut records = records.to_vec();
        records.sort_by_key(|r| r.ts_ns);
        for r in records {
            let entry = self.cgroups.get(&r.cgroup_id).cloned();
            let rule = self
                .policy
                .rules
                .get((r.rule as usize).wrapping_sub(1))
                .map_or_else(|| format!("#{}", r.rule), |x| x.name.clone());
            let mode = if r.actions & action::ENFORCED != 0 {
                Mode::Enforce
            } else {
                Mode::DryRun
            };
            let (set, kept) = actions_of(r.actions);
            let ns = entry.as_ref().and_then(|e| e.namespace.clone());
            let pod = entry.as_ref().and_then(|e| e.pod.clone());
            let s = GuardedSocket {
                cookie: r.cookie,
                local: addr(r.family, r.saddr, r.sport),
                remote: addr(r.family, r.daddr, r.dport),
                netns: r.netns,
                cgroup_id: r.cgroup_id,
                namespace: ns.clone(),
                pod: pod.clone(),
                rule: rule.clone(),
                mode,
                side: if r.actions & action::PASSIVE != 0 {
                    "passive"
                } else {
                    "active"
                },
                actions: set.clone(),
                kept: kept.clone(),
                user_timeout_ms: (r.user_timeout_ms != 0).then_some(r.user_timeout_ms),
                found_user_timeout_ms: (r.found_user_timeout_ms != 0)
                    .then_some(r.found_user_timeout_ms),
                keepalive_idle_s: (r.keepidle_s != 0).then_some(r.keepidle_s),
                keepalive_interval_s: (r.keepintvl_s != 0).then_some(r.keepintvl_s),
                keepalive_count: (r.keepcnt != 0).then_some(r.keepcnt),
                error: (r.actions & action::FAILED != 0).then_some(r.error),
                at_ns: r.ts_ns,
            };
            let ns_label = ns.clone().unwrap_or_default();
            for a in &set {
                counts.push((ns_label.clone(), rule.clone(), *a, mode.as_str()));
            }
            for a in &kept {
                let k = if *a == "user_timeout" {
                    "kept_user_timeout"
                } else {
                    "kept_keepalive"
                };
                counts.push((ns_label.clone(), rule.clone(), k, mode.as_str()));
            }
            if s.error.is_some() {
                counts.push((ns_label.clone(), rule.clone(), "failed", mode.as_str()));
            }
            let who = match (&ns, &pod) {
                (Some(n), Some(p)) if !p.is_empty() => format!("{n}/{p}"),
                _ => entry
                    .as_ref()
                    .map_or_else(|| format!("cgroup {}", r.cgroup_id), |e| e.path.clone()),
            };
            if s.changes()
                && self.logged.len() < MAX_LOGGED
                && self.logged.insert((who.clone(), rule.clone()))
            {
                logs.push(FirstGuard {
                    who,
                    namespace: ns,
                    pod,
                    rule,
                    mode,
                    actions: set,
                });
            }
            if self.sockets.len() >= MAX_SOCKETS_KEPT
                && let Some(old) = self.sockets.pop_front()
            {
                let first = self.pushed - self.sockets.len() - 1;
                if self.by_cookie.get(&old.cookie) == Some(&first) {
                    self.by_cookie.remove(&old.cookie);
                }
            }
            self.by_cookie.insert(s.cookie, self.pushed);
            self.pushed += 1;
            self.sockets.push_back(s);
        }
        (counts, logs)
    }
}

fn read_policy(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: path.display().to_string(),
        line: 0,
        message: format!("cannot read it: {e}"),
    })?;
    Policy::parse(&text, &path.display().to_string())
}
