//! The guard at run time: the policy reloaded on SIGHUP or when its file
//! changes, the cgroup tree walked each tick and matched (pods named by the
//! identity wing), the kernel's rule map kept in step, and what the kernel
//! program reported folded into the API, the metrics and the logs.

use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::{
    guard::{Guard, Seen},
    identity::{
        Identities, IdentityConfig, MAX_CGROUPS, RESCAN_AFTER, cgroup::CgroupIndex,
        cgroup_watch::CgroupWatch,
    },
    kernel::loader::GuardMaps,
    serve::state::AgentState,
};

/// A walked cgroup: id, path, (namespace, pod) when it is a pod's.
type Found = (u64, String, Option<(String, String)>);

/// The longest the guard goes without walking the cgroup tree, changed or
/// not (a cgroup made through another mount of the hierarchy is not seen by
/// the inotify watches).
const FULL_WALK_EVERY: Duration = Duration::from_secs(30);

pub(super) struct GuardRunner {
    maps: GuardMaps,
    cgroups: CgroupIndex,
    ids: Identities,
    /// Map updates that failed (logged once per tick).
    pub(super) map_errors: u64,
    /// Watches on the walked tree (None: not watching, walk every tick).
    watch: Option<CgroupWatch>,
    last_walk: Option<Instant>,
    /// The last walk left a pod's cgroup without a pod name (the runtime's
    /// state may come later): walk again next tick.
    unresolved: bool,
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
            watch: None,
            last_walk: None,
            unresolved: false,
        };
        r.sync(state, true);
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
        self.sync(state, true);
    }

    /// Once a tick: reload when the file changed, walk when the cgroup tree
    /// may have changed, sync, fold in.
    pub(super) fn tick(&mut self, state: &AgentState) {
        let changed = state.guard().as_ref().is_some_and(Guard::changed_on_disk);
        if changed {
            self.reload(state);
        } else {
            let walk = self.walk_due(Instant::now());
            self.sync(state, walk);
        }
    }

    /// Whether the tree must be walked now: not watched, a pod's cgroup
    /// unresolved last time, [`FULL_WALK_EVERY`] passed, or the watches saw
    /// a cgroup made, removed or moved.
    fn walk_due(&self, now: Instant) -> bool {
        let Some(w) = &self.watch else {
            return true;
        };
        // Drained first, so a change is not reported again after the walk.
        let changed = w.changed();
        changed
            || self.unresolved
            || self
                .last_walk
                .is_none_or(|t| now.saturating_duration_since(t) >= FULL_WALK_EVERY)
    }

    /// Walks the cgroup tree and keeps the kernel's rule map in step with it
    /// (`walk`), then folds in what the kernel program reported.
    fn sync(&mut self, state: &AgentState, walk: bool) {
        if walk {
            self.walk_and_set_rules(state);
        }
        self.fold_in(state);
    }

    fn walk_and_set_rules(&mut self, state: &AgentState) {
        // A cgroup made between the walk and its watch is found by the next
        // full walk (FULL_WALK_EVERY).
        self.watch = None;
        self.cgroups.walk();
        let dirs = self.cgroups.dirs();
        self.watch = CgroupWatch::new(dirs.iter().map(|d| d.as_path()));
        self.last_walk = Some(Instant::now());
        let ids = &mut self.ids;
        let found: Vec<Found> = self
            .cgroups
            .entries()
            .map(|(id, path)| {
                let pod = ids.pod_of_cgroup_path(path).map(|p| (p.namespace, p.pod));
                (id, path.to_owned(), pod)
            })
            .collect();
        self.unresolved = found
            .iter()
            .any(|(_, _, pod)| pod.as_ref().is_some_and(|(ns, _)| ns.is_empty()));
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
    }

    fn fold_in(&mut self, state: &AgentState) {
        let records = self.maps.drain();
        if records.is_empty() {
            return;
        }
        let mut guard = state.guard();
        let Some(g) = guard.as_mut() else {
            return;
        };
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
