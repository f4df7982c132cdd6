//! Per-flow state and the bounded flow table.
//!
//! The table is a slab of slots with an index by [`FlowKey`] and two
//! intrusive LRU lists: "active" flows (a retransmission streak, a zero-window
//! episode, CLOSE_WAIT: what the stall views read) and "idle" ones (history
//! only). When full, the least recently used idle flow is evicted first, so a
//! quiet CLOSE_WAIT socket or a stalled flow is not pushed out by churn of
//! short healthy connections; only when every flow is active does the least
//! recently used active one go. No allocation per event once warm.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::kernel::event::{NetnsSysctls, TcpState};

use super::horizon::BoundarySource;

/// Socket identity: the cookie, or (until the cookie is known) the kernel
/// address of `struct sock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowKey {
    Cookie(u64),
    /// Provisional: merged into the cookie key when an event carries both.
    Skaddr(u64),
}

/// The kernel's retransmission episode (`tp->retrans_stamp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Episode {
    /// Raw stamp (0 = "not set yet": the first retransmission is at `start_ns`).
    pub stamp: u32,
    pub start_ns: u64,
}

/// A run of retransmissions without ACK progress.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Streak {
    pub start_ns: u64,
    pub last_event_ns: u64,
    /// Consecutive RTO expiries without ACK progress (`icsk_retransmits + 1`
    /// at the last expiry).
    pub rtos: u32,
    /// Retransmitted segments seen in this streak.
    pub retransmissions: u32,
    /// `icsk_retransmits` at the last event.
    pub last_retransmits: u32,
    pub snd_una_start: u32,
    pub snd_una_last: u32,
    pub backoff: u32,
    pub rto_jiffies: u32,
    /// When the next write-timer expiry is due at the latest (before grace):
    /// without an event by then, the streak recovered.
    pub next_due_ns: u64,
    /// The interval `next_due_ns` was derived from (for the grace).
    pub next_interval_ns: u64,
    /// The first death prediction of this streak.
    pub first_prediction: Option<Prediction>,
    /// Reached the `retransmit` class.
    pub stalled: bool,
}

/// The last RTO expiry seen: what the prediction walks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Anchor {
    pub at_ns: u64,
    pub jiffies: u64,
    /// `timer_expires` when known (0 otherwise), for de-duplication.
    pub timer_expires: u64,
    pub retransmits: u32,
    pub rto_jiffies: u32,
    /// `retransmits + 1`: which RTO of the streak this is.
    pub index: u32,
    /// Seen as a write-timer event (not inferred from an RTO retransmission).
    pub from_timer: bool,
    /// Zero window with data in flight: the kernel uses a different rule
    /// (`tcp_rtx_probe0_timed_out`), no prediction.
    pub window_shrunk: bool,
}

/// A predicted ETIMEDOUT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Prediction {
    pub death_ns: u64,
    pub made_at_ns: u64,
    pub boundary_ms: u64,
    pub source: BoundarySource,
    /// The episode start it was computed from.
    pub start_ns: u64,
}

/// A zero-window (persist) episode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Persist {
    pub since_ns: u64,
    pub first_probe_ns: u64,
    pub last_probe_ns: u64,
    /// Probe expiries seen in this episode.
    pub probes: u32,
    /// `icsk_probes_out` (unanswered probes) at the last one.
    pub probes_out: u32,
    pub backoff: u32,
    pub next_due_ns: u64,
    pub next_interval_ns: u64,
    pub stalled: bool,
    /// The peer's window was open at the last probe (`snd_wnd != 0`) with
    /// nothing in flight: the data never left this node (a failed local
    /// transmit), not a zero window.
    pub window_open: bool,
}

/// Keepalive probing of an idle socket (issue 20): the peer left the last
/// probe unanswered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Keepalive {
    /// The expiry that found the first probe unanswered.
    pub since_ns: u64,
    /// The last expiry seen, and when the next one is due.
    pub last_ns: u64,
    pub next_due_ns: u64,
    pub next_interval_ns: u64,
    /// `icsk_probes_out` at the last expiry.
    pub probes_out: u32,
    /// The prediction made at the first expiry seen.
    pub first_prediction: Option<Prediction>,
    /// Why there is no prediction (a setting could not be read).
    pub no_prediction: Option<super::horizon::NoPrediction>,
}

/// An orphan waiting in FIN_WAIT2 for its peer's FIN (issue 20, item 3):
/// its timewait timer started in the FIN_WAIT2 substate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FinWait2 {
    /// The timer's start (the timewait socket's creation).
    pub since_ns: u64,
    /// The predicted end: the timer wheel's bucket expiry.
    pub death_ns: u64,
    /// The timewait socket's address (the flow's address after the
    /// handover: the full socket's is freed and soon reused).
    pub tw_skaddr: u64,
    pub first_prediction: Prediction,
}

/// The kernel's verdict at the last write-timer expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub at_ns: u64,
    pub dead: bool,
}

/// Outcome counts of a flow's streaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct History {
    pub streaks: u32,
    pub recovered: u32,
    pub timed_out: u32,
    pub closed: u32,
    pub zero_window_episodes: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Flow {
    pub cookie: u64,
    pub skaddr: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns: u32,
    /// cgroup v2 id of the socket's cgroup (0 = unknown).
    pub cgroup_id: u64,
    pub state: TcpState,
    pub state_since_ns: u64,
    pub orphan: bool,
    pub first_seen_ns: u64,
    pub last_event_ns: u64,
    // Latest socket snapshot.
    pub retransmits: u32,
    pub backoff: u32,
    pub rto_jiffies: u32,
    pub rto_max_jiffies: u32,
    pub user_timeout_ms: u32,
    /// `icsk_syn_retries` (TCP_SYNCNT; 0 = the netns sysctl).
    pub syn_retries: u32,
    /// Unanswered keepalive probes (class `keepalive`).
    pub keepalive: Option<Keepalive>,
    /// An orphan's FIN_WAIT2 timeout running (class `fin_wait2`).
    pub fin_wait2: Option<FinWait2>,
    pub usec_ts: bool,
    pub snd_una: u32,
    pub packets_out: u32,
    pub total_retrans: u32,
    pub snd_wnd: Option<u32>,
    pub sysctls: Option<NetnsSysctls>,
    // Derived state.
    pub episode: Option<Episode>,
    pub streak: Option<Streak>,
    pub anchor: Option<Anchor>,
    /// The latest prediction made before the fatal expiry.
    pub prediction: Option<Prediction>,
    pub persist: Option<Persist>,
    pub close_wait_since_ns: Option<u64>,
    pub verdict: Option<Verdict>,
    /// The kernel killed it (ETIMEDOUT recorded).
    pub timed_out: bool,
    /// Classes already announced with `StallStarted` (bit per class).
    pub announced: u8,
    pub history: History,
    /// Retransmissions seen, by cause.
    pub retransmits_by_cause: super::cause::CauseCounts,
    /// The kernel's evidence of why the current loss episode stalls.
    pub evidence: super::why::Evidence,
}

impl Flow {
    pub fn new(
        cookie: u64,
        skaddr: u64,
        local: SocketAddr,
        remote: SocketAddr,
        ts_ns: u64,
    ) -> Self {
        Self {
            cookie,
            skaddr,
            local,
            remote,
            netns: 0,
            cgroup_id: 0,
            state: TcpState::Unknown(0),
            state_since_ns: ts_ns,
            orphan: false,
            first_seen_ns: ts_ns,
            last_event_ns: ts_ns,
            retransmits: 0,
            backoff: 0,
            rto_jiffies: 0,
            rto_max_jiffies: 0,
            user_timeout_ms: 0,
            syn_retries: 0,
            keepalive: None,
            fin_wait2: None,
            usec_ts: false,
            snd_una: 0,
            packets_out: 0,
            total_retrans: 0,
            snd_wnd: None,
            sysctls: None,
            episode: None,
            streak: None,
            anchor: None,
            prediction: None,
            persist: None,
            close_wait_since_ns: None,
            verdict: None,
            timed_out: false,
            announced: 0,
            history: History::default(),
            retransmits_by_cause: Default::default(),
            evidence: Default::default(),
        }
    }

    /// Something the stall views may report: keep it over idle flows.
    pub fn is_active(&self) -> bool {
        self.streak.is_some()
            || self.persist.is_some()
            || self.close_wait_since_ns.is_some()
            || self.keepalive.is_some()
            || self.fin_wait2.is_some()
    }

    /// In a loss episode whose packets this node may be dropping: an RTO
    /// streak, or window probes with data that never left.
    pub fn in_loss_episode(&self) -> bool {
        self.streak.is_some_and(|st| st.rtos > 0) || self.persist.is_some_and(|p| p.window_open)
    }

    /// A new loss episode: the evidence of the last one no longer applies
    /// (`sk_err_soft` and `sacked_out` are read afresh from every event; the
    /// MSS counts from the episode's next reading).
    pub fn new_episode_evidence(&mut self) {
        self.evidence = super::why::Evidence {
            soft_error: self.evidence.soft_error,
            sacked_out: self.evidence.sacked_out,
            ..Default::default()
        };
    }
}

const NIL: u32 = u32::MAX;
const IDLE: usize = 0;
const ACTIVE: usize = 1;

#[derive(Debug)]
struct Slot {
    key: FlowKey,
    flow: Option<Flow>,
    prev: u32,
    next: u32,
    tier: usize,
}

/// Bounded flow table with two-tier LRU eviction.
#[derive(Debug)]
pub(crate) struct FlowTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    index: HashMap<FlowKey, u32>,
    /// Per tier: least recently used end.
    head: [u32; 2],
    /// Per tier: most recently used end.
    tail: [u32; 2],
    len: [usize; 2],
    cap: usize,
}

impl FlowTable {
    pub fn new(cap: usize) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            head: [NIL; 2],
            tail: [NIL; 2],
            len: [0; 2],
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.len[IDLE] + self.len[ACTIVE]
    }

    pub fn active_len(&self) -> usize {
        self.len[ACTIVE]
    }

    pub fn slot_of(&self, key: &FlowKey) -> Option<u32> {
        self.index.get(key).copied()
    }

    #[cfg(test)]
    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.slot_of(key).map(|s| self.flow(s))
    }

    pub fn key(&self, slot: u32) -> FlowKey {
        self.slots[slot as usize].key
    }

    /// Whether `slot` holds a flow (not freed).
    pub fn contains_slot(&self, slot: u32) -> bool {
        self.slots
            .get(slot as usize)
            .is_some_and(|s| s.flow.is_some())
    }

    /// Panics on a free slot (a bug).
    pub fn flow(&self, slot: u32) -> &Flow {
        self.slots[slot as usize].flow.as_ref().expect("live slot")
    }

    pub fn flow_mut(&mut self, slot: u32) -> &mut Flow {
        self.slots[slot as usize].flow.as_mut().expect("live slot")
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next, tier) = {
            let s = &self.slots[slot as usize];
            (s.prev, s.next, s.tier)
        };
        if prev == NIL {
            self.head[tier] = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail[tier] = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        self.len[tier] -= 1;
    }

    fn link_tail(&mut self, slot: u32, tier: usize) {
        let old_tail = self.tail[tier];
        {
            let s = &mut self.slots[slot as usize];
            s.prev = old_tail;
            s.next = NIL;
            s.tier = tier;
        }
        if old_tail == NIL {
            self.head[tier] = slot;
        } else {
            self.slots[old_tail as usize].next = slot;
        }
        self.tail[tier] = slot;
        self.len[tier] += 1;
    }

    /// Marks the slot most recently used in the tier matching its flow.
    pub fn touch(&mut self, slot: u32) {
        let tier = if self.flow(slot).is_active() {
            ACTIVE
        } else {
            IDLE
        };
        if self.tail[tier] == slot {
            return;
        }
        self.unlink(slot);
        self.link_tail(slot, tier);
    }

    /// Moves the slot to the tier matching its flow without refreshing its
    /// recency within a tier it already is in.
    pub fn retier(&mut self, slot: u32) {
        let tier = if self.flow(slot).is_active() {
            ACTIVE
        } else {
            IDLE
        };
        if self.slots[slot as usize].tier != tier {
            self.unlink(slot);
            self.link_tail(slot, tier);
        }
    }

    /// The flow eviction would pick next.
    fn victim(&self) -> Option<u32> {
        [self.head[IDLE], self.head[ACTIVE]]
            .into_iter()
            .find(|&s| s != NIL)
    }

    /// Inserts a new flow (the key must be absent). When the table is full,
    /// the victim is removed first and returned.
    pub fn insert(&mut self, key: FlowKey, flow: Flow) -> (u32, Option<(FlowKey, Flow)>) {
        debug_assert!(!self.index.contains_key(&key));
        let mut evicted = None;
        if self.len() >= self.cap
            && let Some(v) = self.victim()
        {
            let vkey = self.key(v);
            evicted = self.remove(&vkey).map(|f| (vkey, f));
        }
        let tier = if flow.is_active() { ACTIVE } else { IDLE };
        let slot = match self.free.pop() {
            Some(s) => {
                let sl = &mut self.slots[s as usize];
                sl.key = key;
                sl.flow = Some(flow);
                s
            }
            None => {
                self.slots.push(Slot {
                    key,
                    flow: Some(flow),
                    prev: NIL,
                    next: NIL,
                    tier,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.link_tail(slot, tier);
        self.index.insert(key, slot);
        (slot, evicted)
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let slot = self.index.remove(key)?;
        self.unlink(slot);
        self.free.push(slot);
        self.slots[slot as usize].flow.take()
    }

    /// Re-keys a flow (provisional -> cookie). False when `new` is taken or
    /// `old` absent.
    pub fn rekey(&mut self, old: &FlowKey, new: FlowKey) -> bool {
        if self.index.contains_key(&new) {
            return false;
        }
        let Some(slot) = self.index.remove(old) else {
            return false;
        };
        self.slots[slot as usize].key = new;
        self.index.insert(new, slot);
        true
    }

    /// Slots of the active tier, least recently used first, into `out`.
    pub fn active_slots(&self, out: &mut Vec<u32>) {
        out.clear();
        let mut s = self.head[ACTIVE];
        while s != NIL {
            out.push(s);
            s = self.slots[s as usize].next;
        }
    }

    pub fn active(&self) -> impl Iterator<Item = &Flow> + '_ {
        let mut s = self.head[ACTIVE];
        std::iter::from_fn(move || {
            if s == NIL {
                return None;
            }
            let slot = &self.slots[s as usize];
            s = slot.next;
            slot.flow.as_ref()
        })
    }

    #[cfg(test)]
    pub fn all(&self) -> impl Iterator<Item = &Flow> + '_ {
        self.slots.iter().filter_map(|s| s.flow.as_ref())
    }

    #[cfg(test)]
    fn check(&self) {
        let mut total = 0;
        for tier in [IDLE, ACTIVE] {
            let mut n = 0;
            let mut prev = NIL;
            let mut s = self.head[tier];
            while s != NIL {
                let sl = &self.slots[s as usize];
                assert_eq!(sl.prev, prev);
                assert_eq!(sl.tier, tier);
                assert!(sl.flow.is_some());
                assert_eq!(self.index.get(&sl.key), Some(&s));
                prev = s;
                s = sl.next;
                n += 1;
            }
            assert_eq!(self.tail[tier], prev);
            assert_eq!(n, self.len[tier]);
            total += n;
        }
        assert_eq!(total, self.index.len());
        assert!(total <= self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flow(cookie: u64, active: bool) -> Flow {
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mut f = Flow::new(cookie, 0, a, a, 0);
        if active {
            f.close_wait_since_ns = Some(1);
        }
        f
    }

    #[test]
    fn lru_evicts_idle_before_active() {
        let mut t = FlowTable::new(3);
        t.insert(FlowKey::Cookie(1), flow(1, true));
        t.insert(FlowKey::Cookie(2), flow(2, false));
        t.insert(FlowKey::Cookie(3), flow(3, false));
        t.check();
        // Touch 2: 3 is now the least recently used idle flow.
        let s2 = t.slot_of(&FlowKey::Cookie(2)).unwrap();
        t.touch(s2);
        let (_, ev) = t.insert(FlowKey::Cookie(4), flow(4, false));
        assert_eq!(ev.unwrap().0, FlowKey::Cookie(3));
        let (_, ev) = t.insert(FlowKey::Cookie(5), flow(5, false));
        assert_eq!(ev.unwrap().0, FlowKey::Cookie(2));
        t.check();
        // Only active flows left besides the newest idle ones: make all active.
        for k in [4, 5] {
            let s = t.slot_of(&FlowKey::Cookie(k)).unwrap();
            t.flow_mut(s).close_wait_since_ns = Some(2);
            t.retier(s);
        }
        t.check();
        let (_, ev) = t.insert(FlowKey::Cookie(6), flow(6, true));
        assert_eq!(ev.unwrap().0, FlowKey::Cookie(1));
        assert_eq!(t.len(), 3);
        assert_eq!(t.active_len(), 3);
        t.check();
    }

    #[test]
    fn remove_rekey_and_iterate() {
        let mut t = FlowTable::new(10);
        for k in 0..5 {
            t.insert(FlowKey::Skaddr(k), flow(0, k % 2 == 0));
        }
        assert!(t.rekey(&FlowKey::Skaddr(2), FlowKey::Cookie(22)));
        assert!(!t.rekey(&FlowKey::Skaddr(2), FlowKey::Cookie(23)));
        assert!(!t.rekey(&FlowKey::Skaddr(3), FlowKey::Cookie(22)));
        assert!(t.get(&FlowKey::Cookie(22)).is_some());
        assert!(t.remove(&FlowKey::Skaddr(0)).is_some());
        assert!(t.remove(&FlowKey::Skaddr(0)).is_none());
        t.check();
        assert_eq!(t.active().count(), 2);
        assert_eq!(t.all().count(), 4);
        let mut v = Vec::new();
        t.active_slots(&mut v);
        assert_eq!(v.len(), 2);
        // Slots are reused.
        t.insert(FlowKey::Cookie(9), flow(9, false));
        assert_eq!(t.slots.len(), 5);
        t.check();
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn prop_table_invariants(ops in prop::collection::vec((0u8..4, 0u64..40, any::<bool>()), 1..300), cap in 1usize..20) {
            let mut t = FlowTable::new(cap);
            let mut evictions = 0;
            for (op, k, active) in ops {
                let key = FlowKey::Cookie(k);
                match op {
                    0 | 1 => {
                        if t.slot_of(&key).is_none() {
                            let (_, ev) = t.insert(key, flow(k, active));
                            evictions += usize::from(ev.is_some());
                        }
                    }
                    2 => { t.remove(&key); }
                    _ => {
                        if let Some(s) = t.slot_of(&key) {
                            t.flow_mut(s).close_wait_since_ns = active.then_some(1);
                            t.touch(s);
                        }
                    }
                }
                t.check();
                prop_assert!(t.len() <= cap);
            }
            let _ = evictions;
        }
    }
}
