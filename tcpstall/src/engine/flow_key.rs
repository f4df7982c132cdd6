//! Flow keys: which flow an event belongs to (cookie, or the kernel
//! address of `struct sock` until the cookie is known), provisional-flow
//! merging, address reuse and eviction.

use std::net::SocketAddr;

use crate::kernel::event::SockEvent;

use super::flow::{Flow, FlowKey};
use super::{Engine, Observation};

/// Two endpoints are compatible unless both are known and differ.
fn same_remote(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().is_unspecified() || b.ip().is_unspecified() || a == b
}

/// The last-known address, keeping a known port when the event reads 0
/// (`skc_num` reads 0 at ESTABLISHED -> CLOSE).
pub(super) fn merge_addr(old: SocketAddr, new: SocketAddr) -> SocketAddr {
    if new.ip().is_unspecified() {
        return old;
    }
    if new.port() == 0 && new.ip() == old.ip() {
        return old;
    }
    new
}

impl Engine {
    /// Finds (or, with `create`, makes) the flow of an event.
    pub(super) fn resolve(&mut self, ev: &SockEvent, create: bool) -> Option<u32> {
        if ev.cookie != 0 && ev.skaddr != 0 {
            if let Some(&c) = self.skaddr_map.get(&ev.skaddr)
                && c != ev.cookie
            {
                // The kernel reused the address: that socket is gone.
                self.skaddr_map.remove(&ev.skaddr);
                self.sink.stats.skaddr_reuses += 1;
                if let Some(s) = self.flows.slot_of(&FlowKey::Cookie(c))
                    && self.flows.flow(s).skaddr == ev.skaddr
                {
                    self.close_slot(s, ev.ts_ns, true);
                }
            }
            if let Some(ps) = self.flows.slot_of(&FlowKey::Skaddr(ev.skaddr)) {
                self.merge_provisional(ps, ev);
            }
        }
        let key = if ev.cookie != 0 {
            FlowKey::Cookie(ev.cookie)
        } else if ev.skaddr != 0 {
            match self.skaddr_map.get(&ev.skaddr).copied() {
                Some(c) => match self.flows.slot_of(&FlowKey::Cookie(c)) {
                    Some(s) if same_remote(self.flows.flow(s).remote, ev.remote) => {
                        FlowKey::Cookie(c)
                    }
                    Some(s) => {
                        // Stale mapping: the address now holds another socket.
                        self.sink.stats.skaddr_reuses += 1;
                        self.close_slot(s, ev.ts_ns, true);
                        FlowKey::Skaddr(ev.skaddr)
                    }
                    None => {
                        self.skaddr_map.remove(&ev.skaddr);
                        FlowKey::Skaddr(ev.skaddr)
                    }
                },
                None => FlowKey::Skaddr(ev.skaddr),
            }
        } else {
            self.sink.stats.events_unattributed += 1;
            return None;
        };
        if let Some(s) = self.flows.slot_of(&key) {
            if let FlowKey::Skaddr(_) = key
                && !same_remote(self.flows.flow(s).remote, ev.remote)
            {
                // A provisional flow whose address was reused.
                self.close_slot(s, ev.ts_ns, true);
            } else {
                self.learn_skaddr(s, ev);
                return Some(s);
            }
        }
        if !create {
            return None;
        }
        let flow = Flow::new(ev.cookie, ev.skaddr, ev.local, ev.remote, ev.ts_ns);
        let (slot, evicted) = self.flows.insert(key, flow);
        self.sink.stats.flows_created += 1;
        if let Some((_, f)) = evicted {
            self.on_evicted(f);
        }
        self.learn_skaddr(slot, ev);
        Some(slot)
    }

    fn learn_skaddr(&mut self, slot: u32, ev: &SockEvent) {
        if ev.cookie == 0 || ev.skaddr == 0 {
            return;
        }
        let f = self.flows.flow_mut(slot);
        if f.skaddr != ev.skaddr || !self.skaddr_map.contains_key(&ev.skaddr) {
            if f.skaddr != 0
                && f.skaddr != ev.skaddr
                && self.skaddr_map.get(&f.skaddr) == Some(&f.cookie)
            {
                self.skaddr_map.remove(&f.skaddr);
            }
            f.skaddr = ev.skaddr;
            self.skaddr_map.insert(ev.skaddr, ev.cookie);
        }
    }

    /// A provisional (cookie-less) flow meets an event with its cookie.
    fn merge_provisional(&mut self, ps: u32, ev: &SockEvent) {
        let pkey = FlowKey::Skaddr(ev.skaddr);
        if !same_remote(self.flows.flow(ps).remote, ev.remote) {
            self.close_slot(ps, ev.ts_ns, true);
            return;
        }
        let ckey = FlowKey::Cookie(ev.cookie);
        self.sink.stats.provisional_merges += 1;
        if self.flows.rekey(&pkey, ckey) {
            let f = self.flows.flow_mut(ps);
            f.cookie = ev.cookie;
            return;
        }
        // Both exist: fold the provisional one into the cookie flow.
        let Some(p) = self.flows.remove(&pkey) else {
            return;
        };
        let Some(cs) = self.flows.slot_of(&ckey) else {
            return;
        };
        let c = self.flows.flow_mut(cs);
        if c.streak.is_none() && p.streak.is_some() {
            c.streak = p.streak;
            c.anchor = p.anchor;
            c.prediction = p.prediction;
            c.verdict = p.verdict;
        }
        if c.episode.is_none() {
            c.episode = p.episode;
        }
        if c.persist.is_none() {
            c.persist = p.persist;
        }
        if c.close_wait_since_ns.is_none() {
            c.close_wait_since_ns = p.close_wait_since_ns;
        }
        c.announced |= p.announced;
        c.history.streaks += p.history.streaks;
        c.history.recovered += p.history.recovered;
        c.history.timed_out += p.history.timed_out;
        c.history.closed += p.history.closed;
        c.history.zero_window_episodes += p.history.zero_window_episodes;
        c.first_seen_ns = c.first_seen_ns.min(p.first_seen_ns);
        self.flows.touch(cs);
    }

    fn on_evicted(&mut self, f: Flow) {
        let s = &mut self.sink.stats;
        s.flows_evicted += 1;
        if f.streak.is_some() {
            s.streaks_evicted += 1;
        }
        if f.skaddr != 0 && self.skaddr_map.get(&f.skaddr) == Some(&f.cookie) {
            self.skaddr_map.remove(&f.skaddr);
        }
        let active = f.is_active();
        self.sink.emit(Observation::FlowEvicted {
            netns: f.netns,
            local: f.local,
            remote: f.remote,
            active,
        });
    }
}
