//! Per-remote aggregation (S6: one bad backend among many).
//!
//! Cumulative counters per remote IP:port live in a bounded table; when it
//! overflows, the least recently active tenth is folded into a single
//! "other" total (amortised O(log n) per new remote, no per-event
//! allocation for known remotes). Live gauges (stalled flows) are computed
//! from the flow table on demand and merged in [`build`].

use std::collections::HashMap;
use std::net::SocketAddr;

use super::output::{OtherRemotes, RemoteCounters, RemoteLive, RemoteView, RemotesView};

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    counters: RemoteCounters,
    last_ns: u64,
}

#[derive(Debug)]
pub(crate) struct RemoteTable {
    map: HashMap<SocketAddr, Entry>,
    cap: usize,
    folded: RemoteCounters,
    folded_remotes: u64,
}

impl RemoteTable {
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap: cap.max(1),
            folded: RemoteCounters::default(),
            folded_remotes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The counters of `remote`, created if needed.
    pub fn counters(&mut self, remote: SocketAddr, now_ns: u64) -> &mut RemoteCounters {
        if !self.map.contains_key(&remote) && self.map.len() >= self.cap {
            self.fold();
        }
        let e = self.map.entry(remote).or_default();
        e.last_ns = e.last_ns.max(now_ns);
        &mut e.counters
    }

    /// Folds the least recently active ~10 % into `folded`.
    fn fold(&mut self) {
        let n = (self.cap / 10).max(1);
        let mut by_age: Vec<(u64, SocketAddr)> =
            self.map.iter().map(|(k, e)| (e.last_ns, *k)).collect();
        by_age.sort_unstable();
        for (_, k) in by_age.into_iter().take(n) {
            if let Some(e) = self.map.remove(&k) {
                self.folded.add(&e.counters);
                self.folded_remotes += 1;
            }
        }
    }

    #[cfg(test)]
    pub fn get(&self, remote: &SocketAddr) -> Option<RemoteCounters> {
        self.map.get(remote).map(|e| e.counters)
    }
}

/// Merges live gauges with the counters, keeps the top `k` remotes by
/// stalled flows, then retransmits (then RTO expiries, then address for a
/// stable order), and sums the rest into `other`.
pub(crate) fn build(
    table: &RemoteTable,
    live: &HashMap<SocketAddr, RemoteLive>,
    k: usize,
) -> RemotesView {
    let mut all: Vec<RemoteView> = Vec::with_capacity(table.map.len() + live.len());
    for (remote, e) in &table.map {
        all.push(RemoteView {
            remote: *remote,
            live: live.get(remote).copied().unwrap_or_default(),
            counters: e.counters,
        });
    }
    for (remote, l) in live {
        if !table.map.contains_key(remote) {
            all.push(RemoteView {
                remote: *remote,
                live: *l,
                counters: RemoteCounters::default(),
            });
        }
    }
    all.sort_by(|a, b| {
        b.live
            .stalled_flows
            .cmp(&a.live.stalled_flows)
            .then(b.counters.retransmits.cmp(&a.counters.retransmits))
            .then(b.counters.rto_expiries.cmp(&a.counters.rto_expiries))
            .then(a.remote.cmp(&b.remote))
    });
    let mut other = OtherRemotes {
        remotes: table.folded_remotes,
        live: RemoteLive::default(),
        counters: table.folded,
    };
    let rest = if all.len() > k {
        all.split_off(k)
    } else {
        Vec::new()
    };
    for r in &rest {
        other.remotes += 1;
        other.live.add(&r.live);
        other.counters.add(&r.counters);
    }
    RemotesView { top: all, other }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, (i % 250) as u8], 8000 + i))
    }

    #[test]
    fn top_k_ordering_and_other_bucket() {
        let mut t = RemoteTable::new(100);
        for i in 0..10u16 {
            t.counters(addr(i), u64::from(i)).retransmits = u64::from(i);
        }
        let mut live = HashMap::new();
        // One remote with stalled flows wins over more retransmits.
        live.insert(
            addr(3),
            RemoteLive {
                stalled_flows: 2,
                ..Default::default()
            },
        );
        // A remote known only from live state (no counters yet).
        live.insert(
            addr(50),
            RemoteLive {
                stalled_flows: 1,
                near_timeout: 1,
                ..Default::default()
            },
        );
        let v = build(&t, &live, 4);
        let order: Vec<_> = v.top.iter().map(|r| r.remote).collect();
        assert_eq!(order, vec![addr(3), addr(50), addr(9), addr(8)]);
        assert_eq!(v.other.remotes, 7);
        assert_eq!(v.other.counters.retransmits, (0..8).sum::<u64>() - 3);
        assert_eq!(v.other.live.stalled_flows, 0);
        // K larger than everything: nothing in other.
        let v = build(&t, &live, 100);
        assert_eq!(v.top.len(), 11);
        assert_eq!(v.other, OtherRemotes::default());
    }

    #[test]
    fn bounded_table_folds_least_recent() {
        let mut t = RemoteTable::new(20);
        for i in 0..20u16 {
            t.counters(addr(i), u64::from(i)).retransmits = 1;
        }
        // Refresh the oldest one: it must survive the fold.
        t.counters(addr(0), 100).retransmits += 1;
        t.counters(addr(100), 101).retransmits = 5;
        assert!(t.len() <= 20);
        assert_eq!(t.folded_remotes, 2);
        assert_eq!(t.folded.retransmits, 2);
        assert!(t.get(&addr(1)).is_none() && t.get(&addr(2)).is_none());
        assert_eq!(t.get(&addr(0)).unwrap().retransmits, 2);
        let v = build(&t, &HashMap::new(), 5);
        assert_eq!(v.top[0].remote, addr(100));
        assert_eq!(v.other.remotes, 2 + 14);
        let total: u64 = v.top.iter().map(|r| r.counters.retransmits).sum::<u64>()
            + v.other.counters.retransmits;
        assert_eq!(total, 20 + 1 + 5);
    }
}
