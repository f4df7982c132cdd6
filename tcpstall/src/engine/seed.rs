//! Seeding the engine from sweep snapshots ([`EventKind::Sweep`]).
//!
//! A sweep snapshot is the state of one socket at one instant, taken outside
//! any kernel event (at start-up, after lost events, periodically). It is
//! folded in so that the flow looks as if it had been watched from the start:
//!
//! - **RTO backoff** (`icsk_pending == ICSK_TIME_RETRANS`,
//!   `icsk_retransmits > 0`, not a SYN state): a streak with `icsk_retransmits` RTOs already
//!   had, its episode from `retrans_stamp`, and an anchor at the last RTO
//!   expiry, reconstructed exactly from the pending timer: the expiry that
//!   armed it ran at `timer_expires - icsk_rto` (jiffies) and the RTO it saw
//!   was `icsk_rto / 2` (or `rto_max` when capped). The death prediction is
//!   then the same walk a watched flow gets.
//! - **zero-window probing** (`icsk_pending == ICSK_TIME_PROBE0`, window 0):
//!   a persist episode whose first probe is reconstructed from the backoff.
//! - **CLOSE_WAIT**: since the last segment received (`rcv_tstamp`, the FIN).
//! - **keepalive probing** (established, nothing in flight, keepalive
//!   probes unanswered): the pending keepalive timer (`sk_timer.expires`) is
//!   the next expiry; the walk starts there with the probes out now.
//!
//! Rules: a snapshot never creates a second flow for a socket (flows are
//! keyed by cookie), never resurrects one that closed or timed out, and never
//! rolls back what events already told (a snapshot with no more RTOs than the
//! streak has is ignored for the streak).

use tcpstall_common::pending;

use super::{
    Engine, PersistEnd, StallClass,
    flow::{Anchor, FlowKey, Persist, Prediction, Verdict},
    horizon,
};
use crate::kernel::event::{SockEvent, TcpState};

/// What a snapshot shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotClass {
    /// In RTO backoff (consecutive RTO expiries without ACK progress).
    RtoBackoff,
    /// Zero-window probing.
    ZeroWindow,
    /// The peer closed, the application did not.
    CloseWait,
    /// Keepalive probes unanswered (nothing in flight).
    Keepalive,
}

/// Classifies a sweep snapshot (None: nothing the engine tracks).
pub fn classify_snapshot(ev: &SockEvent) -> Option<SnapshotClass> {
    let sock = ev.sock?;
    match ev.state {
        TcpState::Close | TcpState::TimeWait | TcpState::Listen | TcpState::Unknown(_) => {
            return None;
        }
        _ => {}
    }
    if sock.pending == pending::RETRANS
        && ev.retransmits > 0
        && !super::streak::is_syn_state(ev.state)
        && ev.packets_out > 0
    {
        return Some(SnapshotClass::RtoBackoff);
    }
    if sock.pending == pending::PROBE0 && sock.snd_wnd == 0 {
        return Some(SnapshotClass::ZeroWindow);
    }
    if ev.state == TcpState::CloseWait {
        return Some(SnapshotClass::CloseWait);
    }
    if sock.pending == 0 && super::keepalive::unanswered(ev, &sock) {
        return Some(SnapshotClass::Keepalive);
    }
    None
}

impl Engine {
    pub(super) fn on_sweep(&mut self, ev: &SockEvent) {
        let Some(class) = classify_snapshot(ev) else {
            return;
        };
        let Some(sock) = ev.sock else {
            return;
        };
        // A socket nothing has asked the cookie of yet (the sweep's plain
        // fallback reads `skc_cookie` as it is) is keyed by its address
        // until an event names its cookie (`resolve` merges the two).
        if ev.cookie == 0 && ev.skaddr == 0 {
            self.sink.stats.sweep_ignored += 1;
            return;
        }
        // Never resurrect a flow that closed.
        if self.closed.iter().any(|c| c.is_socket_of(ev)) {
            self.sink.stats.sweep_ignored += 1;
            return;
        }
        let existing = if ev.cookie != 0 {
            self.flows.slot_of(&FlowKey::Cookie(ev.cookie))
        } else {
            self.resolve(ev, false)
        };
        if let Some(slot) = existing {
            let f = self.flows.flow(slot);
            // Timed out, or events newer than the snapshot: nothing to learn.
            if f.timed_out || f.last_event_ns > ev.ts_ns {
                self.sink.stats.sweep_ignored += 1;
                return;
            }
        }
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
        }
        let seeded = match class {
            SnapshotClass::RtoBackoff => self.seed_rto(slot, ev),
            SnapshotClass::ZeroWindow => self.seed_persist(slot, ev, sock.backoff),
            SnapshotClass::Keepalive => self.seed_keepalive(slot, ev),
            SnapshotClass::CloseWait => {
                let hz = self.hz.hz();
                let f = self.flows.flow_mut(slot);
                if f.close_wait_since_ns.is_none() {
                    // The FIN is the last segment a CLOSE_WAIT socket receives
                    // (besides ACKs of our data): rcv_tstamp.
                    let age_j = (ev.jiffies as u32).wrapping_sub(sock.rcv_tstamp);
                    let age = if sock.rcv_tstamp == 0 || age_j > i32::MAX as u32 {
                        0
                    } else {
                        horizon::jiffies_to_ns(u64::from(age_j), hz)
                    };
                    f.close_wait_since_ns = Some(ev.ts_ns.saturating_sub(age));
                    f.state_since_ns = ev.ts_ns.saturating_sub(age);
                    true
                } else {
                    false
                }
            }
        };
        if seeded {
            if existing.is_some() {
                self.sink.stats.sweep_repaired += 1;
            } else {
                self.sink.stats.sweep_seeded += 1;
            }
        }
        self.flows.retier(slot);
        self.flows.touch(slot);
    }

    /// A keepalive-probing socket: the walk starts at the pending timer's
    /// expiry (`sk_timer.expires`, rounded by the timer wheel as armed one
    /// interval earlier), with the probes out now and the time since the
    /// last receive then.
    fn seed_keepalive(&mut self, slot: u32, ev: &SockEvent) -> bool {
        let Some(sock) = ev.sock else {
            return false;
        };
        if self.flows.flow(slot).keepalive.is_some() {
            return false;
        }
        let hz = self.hz.hz();
        let now32 = ev.jiffies as u32;
        let ahead = sock.keepalive.timer_expires.wrapping_sub(now32);
        let ahead = if ahead > i32::MAX as u32 {
            0
        } else {
            u64::from(ahead)
        };
        let mut next_j = ev.jiffies.saturating_add(ahead);
        if self.cfg.timer_wheel {
            let ka = sock.keepalive;
            let intvl = if ka.intvl_j != 0 {
                ka.intvl_j
            } else {
                ka.netns.map_or(0, |n| n.1)
            };
            next_j =
                horizon::rearmed_timer_fire(next_j, next_j.saturating_sub(u64::from(intvl)), hz);
        }
        let elapsed = super::keepalive::elapsed_since_receive(ev.jiffies, &sock)
            .saturating_add(next_j - ev.jiffies);
        let at_ns = self.jiffy_instant(ev, next_j);
        self.keepalive_at(slot, ev, &sock, elapsed, at_ns, next_j);
        true
    }

    /// The monotonic instant of jiffy `j`, from a (ts, jiffies) pair.
    fn jiffy_instant(&self, ev: &SockEvent, j: u64) -> u64 {
        let hz = self.hz.hz();
        if j <= ev.jiffies {
            ev.ts_ns
                .saturating_sub(horizon::jiffies_to_ns(ev.jiffies - j, hz))
        } else {
            ev.ts_ns
                .saturating_add(horizon::jiffies_to_ns(j - ev.jiffies, hz))
        }
    }

    fn seed_rto(&mut self, slot: u32, ev: &SockEvent) -> bool {
        let Some(sock) = ev.sock else {
            return false;
        };
        let r = ev.retransmits;
        let known = self.flows.flow(slot).streak.map_or(0, |st| st.rtos);
        if r <= known {
            return false;
        }
        let hz = self.hz.hz();
        let max_j = self.rto_max_j(self.flows.flow(slot));
        let rto = u64::from(ev.rto_jiffies.max(1));
        // The RTO the last expiry saw (before it doubled): rto/2, or rto_max
        // itself once capped (both double to the current value).
        let prev_rto = if rto >= max_j { max_j } else { rto.div_ceil(2) };
        let (last_j, next_j) = if sock.timer_expires != 0 {
            (sock.timer_expires.saturating_sub(rto), sock.timer_expires)
        } else {
            (ev.jiffies, ev.jiffies.saturating_add(rto))
        };
        let last_ns = self.jiffy_instant(ev, last_j).min(ev.ts_ns);
        let mut next_ns = self.jiffy_instant(ev, next_j);
        if self.cfg.timer_wheel && sock.timer_expires != 0 {
            next_ns = self.jiffy_instant(ev, horizon::rearmed_timer_fire(next_j, last_j, hz));
        }
        let f = self.flows.flow_mut(slot);
        Self::end_persist(f, &mut self.sink, ev.ts_ns, (PersistEnd::Sweep, ev.ts_ns));
        let recovered = f.streak.is_some_and(|st| Self::acked(&st, ev));
        let st = Self::roll_streak(f, &mut self.sink, ev, recovered, false);
        st.rtos = r;
        st.last_retransmits = r;
        if ev.snd_una != 0 {
            st.snd_una_last = ev.snd_una;
            if st.snd_una_start == 0 {
                st.snd_una_start = ev.snd_una;
            }
        }
        st.last_event_ns = ev.ts_ns;
        st.backoff = sock.backoff;
        st.rto_jiffies = ev.rto_jiffies;
        st.next_due_ns = next_ns.max(ev.ts_ns);
        st.next_interval_ns = horizon::jiffies_to_ns(rto, hz);
        f.anchor = Some(Anchor {
            at_ns: last_ns,
            jiffies: last_j,
            timer_expires: 0,
            retransmits: r - 1,
            rto_jiffies: prev_rto as u32,
            index: r,
            from_timer: false,
            window_shrunk: sock.snd_wnd == 0 && ev.packets_out > 0,
        });
        // It retransmitted at that expiry: not fatal.
        f.verdict = Some(Verdict {
            at_ns: last_ns,
            dead: false,
        });
        f.retransmits = r;
        f.backoff = sock.backoff;
        f.rto_jiffies = ev.rto_jiffies;
        self.update_prediction(slot);
        self.check_retransmit_stall(slot, ev.ts_ns);
        true
    }

    fn seed_persist(&mut self, slot: u32, ev: &SockEvent, backoff: u32) -> bool {
        let Some(sock) = ev.sock else {
            return false;
        };
        if self.flows.flow(slot).persist.is_some() {
            return false;
        }
        let hz = self.hz.hz();
        let max_ms = horizon::jiffies_to_msecs(self.rto_max_j(self.flows.flow(slot)), hz);
        let rto_ms = horizon::jiffies_to_msecs(u64::from(ev.rto_jiffies), hz);
        let next_ns = if sock.timer_expires != 0 {
            self.jiffy_instant(ev, sock.timer_expires).max(ev.ts_ns)
        } else {
            ev.ts_ns
        };
        // Probes sent with backoff 0..b-1, then the pending one.
        let mut first_ns = next_ns;
        let mut last_interval = horizon::persist_next_interval_ms(rto_ms, 0, max_ms);
        for b in 0..backoff.min(64) {
            last_interval = horizon::persist_next_interval_ms(rto_ms, b, max_ms);
            first_ns = first_ns.saturating_sub(last_interval * horizon::NSEC_PER_MSEC);
        }
        let base_ms = rto_ms.max(horizon::TCP_RTO_MIN_MS).min(max_ms.max(1));
        let since = first_ns
            .saturating_sub(base_ms * horizon::NSEC_PER_MSEC)
            .min(ev.ts_ns);
        let f = self.flows.flow_mut(slot);
        // With a user timeout, tcp_probe_timer() aborts at the probe expiry
        // UTO after the first probe: predicted at once, as a probe event
        // would (`on_probe`).
        let first_probe_ns = first_ns.min(ev.ts_ns);
        let uto = f.user_timeout_ms;
        f.prediction =
            horizon::predict_persist_death(first_probe_ns, ev.ts_ns, uto).map(|death| Prediction {
                death_ns: death,
                made_at_ns: ev.ts_ns,
                boundary_ms: u64::from(uto),
                source: horizon::BoundarySource::UserTimeout,
                start_ns: first_probe_ns,
            });
        f.history.zero_window_episodes += 1;
        f.persist = Some(Persist {
            since_ns: since,
            first_probe_ns,
            last_probe_ns: next_ns
                .saturating_sub(last_interval * horizon::NSEC_PER_MSEC)
                .min(ev.ts_ns),
            probes: backoff.max(sock.probes_out),
            probes_out: sock.probes_out,
            backoff,
            next_due_ns: next_ns,
            next_interval_ns: last_interval * horizon::NSEC_PER_MSEC,
            stalled: false,
            // Seeded only for a zero window (see `classify_snapshot`).
            window_open: false,
        });
        let _ = StallClass::ZeroWindow;
        true
    }
}
