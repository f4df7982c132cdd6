//! The guard at run time: the policy reloaded on SIGHUP or when its file
//! changes, the cgroup tree walked each tick and matched (pods named by the
//! identity wing), the kernel's rule map kept in step, and what the kernel
//! program reported folded into the API, the metrics and the logs.

use std::path::Path;

use tracing::{error, info, warn};

use crate::{
    guard::{Guard, Seen},
    identity::{Identities, IdentityConfig, MAX_CGROUPS, RESCAN_AFTER, cgroup::CgroupIndex},
    kernel::loader::GuardMaps,
    serve::state::AgentState,
};

/// A walked cgroup: id, path, (namespace, pod) when it is a pod's.
type Found = (u64, String, Option<(String, String)>);

pub(super) struct GuardRunner {
    maps: GuardMaps,
    cgroups: CgroupIndex,
    ids: Identities,
    /// Map updates that failed (logged once per tick).
    pub(super) map_errors: u64,
}

impl GuardRunner {
    /// Starts the guard: the first walk and map fill happen at once.
    pub(super) fn start(
        maps: GuardMaps,
        guard: Guard,
        cfg: &IdentityConfig,
        state: &AgentState,
    ) -> Self {
        let rules = guard.policy.rules.len();
        let path = guard.path.display().to_string();
        *state.guard() = Some(guard);
        let mut r = Self {
            maps,
            cgroups: CgroupIndex::new(cfg.cgroup2_root.clone(), RESCAN_AFTER, MAX_CGROUPS),
            ids: Identities::new(cfg),
            map_errors: 0,
        };
        r.sync(state);
        info!(policy = %path, rules, "guard on");
        r
    }

    /// SIGHUP: reload now.
    pub(super) fn reload(&mut self, state: &AgentState) {
        let result = match state.guard().as_mut() {
            Some(g) => g.reload().map(|()| g.policy.rules.len()),
            None => return,
        };
        match result {
            Ok(rules) => info!(rules, "guard policy reloaded"),
            Err(e) => {
                state.metrics.guard_reload_failed();
                error!(error = %e, "guard policy reload failed; the last good policy stays in force");
            }
        }
        self.sync(state);
    }

    /// Once a tick: reload when the file changed, walk, sync, fold in.
    pub(super) fn tick(&mut self, state: &AgentState) {
        let changed = state.guard().as_ref().is_some_and(Guard::changed_on_disk);
        if changed {
            self.reload(state);
        } else {
            self.sync(state);
        }
    }

    fn sync(&mut self, state: &AgentState) {
        self.cgroups.walk();
        let ids = &mut self.ids;
        let found: Vec<Found> = self
            .cgroups
            .entries()
            .map(|(id, path)| {
                let pod = ids.pod_of_cgroup_path(path).map(|p| (p.namespace, p.pod));
                (id, path.to_owned(), pod)
            })
            .collect();
        let mut guard = state.guard();
        let Some(g) = guard.as_mut() else {
            return;
        };
        let updates = g.sync(found.iter().map(|(id, path, pod)| Seen {
            id: *id,
            path,
            namespace: pod.as_ref().map(|p| p.0.as_str()).filter(|s| !s.is_empty()),
            pod: pod.as_ref().map(|p| p.1.as_str()).filter(|s| !s.is_empty()),
        }));
        let mut failed = 0;
        for (id, rule) in updates {
            match rule {
                Some(r) => {
                    if let Err(e) = self.maps.set(id, r) {
                        failed += 1;
                        if failed == 1 {
                            warn!(cgroup_id = id, error = %e, "guard: setting a cgroup's rule failed");
                        }
                    }
                }
                None => self.maps.remove(id),
            }
        }
        self.map_errors += failed;
        let records = self.maps.drain();
        if records.is_empty() {
            return;
        }
        let (counts, logs) = g.ingest(&records);
        drop(guard);
        for (ns, rule, action, mode) in counts {
            state.metrics.guard_socket(&ns, &rule, action, mode);
        }
        for l in logs {
            info!(
                who = %l.who,
                namespace = l.namespace.as_deref().unwrap_or(""),
                pod = l.pod.as_deref().unwrap_or(""),
                rule = %l.rule,
                mode = l.mode.as_str(),
                actions = %l.actions.join(","),
                "guard: first socket of this pod under this rule"
            );
        }
    }
}

/// The policy before anything is loaded (an invalid one stops the agent
/// with its one-line error).
pub(super) fn load_policy(path: &Path) -> anyhow::Result<Guard> {
    Guard::load(path)
        .map_err(|e| anyhow::anyhow!("{e}; fix the file or run without --guard-policy"))
}
