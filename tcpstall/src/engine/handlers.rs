//! Event handlers: retransmissions, write-timer expiries (RTO and persist),
//! state changes and ACKs. Error reports and closes are in `close`.

use crate::kernel::event::{EventKind, Mechanism, SockEvent, TcpState};

use super::flow::{Anchor, Persist, Prediction, Verdict};
use super::horizon::{self, BoundarySource, NSEC_PER_MSEC};
use super::streak::seq_after;
use super::{Engine, Observation, PersistEnd, StallClass, StreakOutcome, dur_ns, why};

/// Two reports of the same RTO expiry (two mechanisms) within this window.
const DUPLICATE_WINDOW_NS: u64 = 100 * NSEC_PER_MSEC;

impl Engine {
    /// Window within which two reports belong to the same RTO expiry (the
    /// retransmission follows its expiry in the same handler, or when the
    /// owner releases the socket): 100 ms, at most half the RTO.
    fn same_expiry_window(&self, rto_jiffies: u32) -> u64 {
        DUPLICATE_WINDOW_NS.min(self.j_to_ns(u64::from(rto_jiffies.max(1))) / 2)
    }

    pub(super) fn on_retransmit(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        // Sent by an RTO expiry: the write timer handler clears
        // icsk_pending before tcp_retransmit_timer(). Loss probes run with
        // pending 5, fast retransmits with the RTO timer pending (1).
        let rto_ctx = ev.sock.is_some_and(|s| s.pending == 0);
        let cause = super::cause::RetransmitCause::of(ev);
        let remote = {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            f.retransmits_by_cause.add(cause);
            f.remote
        };
        self.sink.stats_retransmit(remote, rto_ctx, cause, ev.ts_ns);

        // Which RTO this retransmission belongs to. Kernels before 6.7
        // increment icsk_retransmits after the retransmission, 6.7+
        // (tcp_update_rto_stats) before it: the value is r or r + 1 for the
        // expiry that saw r. Matched against the expiry just reported when
        // there is one (which also tells the kernel's order), else derived
        // with the learned order (unknown: assume "after", which can only
        // make a stall show one RTO late, never early).
        let v = ev.retransmits;
        let mut same_rto = false;
        let mut idx = 0;
        if rto_ctx {
            let f = self.flows.flow(slot);
            if let Some(a) = f.anchor
                && ev.ts_ns.saturating_sub(a.at_ns) <= self.same_expiry_window(a.rto_jiffies)
                && (v == a.retransmits || v == a.retransmits.saturating_add(1))
            {
                same_rto = true;
                idx = a.index;
                if a.from_timer {
                    self.rto_retx_incremented = Some(v == a.retransmits.saturating_add(1));
                }
            } else if v == 0 {
                self.rto_retx_incremented = Some(false);
                idx = 1;
            } else if self.rto_retx_incremented == Some(false) {
                idx = v.saturating_add(1);
            } else {
                idx = v;
            }
        }

        let hz = self.hz.hz();
        let max_j = self.rto_max_j(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        Self::end_persist(
            f,
            &mut self.sink,
            ev.ts_ns,
            (PersistEnd::Retransmit, ev.ts_ns),
        );
        let recovered = f.streak.is_some_and(|st| Self::acked(&st, ev)) && !same_rto;
        let st = Self::roll_streak(f, &mut self.sink, ev, recovered, same_rto);
        st.retransmissions = st.retransmissions.saturating_add(1);
        if ev.snd_una != 0 {
            st.snd_una_last = ev.snd_una;
        }
        st.last_event_ns = ev.ts_ns;
        if let Some(s) = ev.sock {
            st.backoff = s.backoff;
        }
        if ev.rto_jiffies != 0 {
            st.rto_jiffies = ev.rto_jiffies;
        }
        if rto_ctx {
            // Keep the expiry's own count (r): the increment may or may not
            // have happened yet.
            st.last_retransmits = idx.saturating_sub(1);
            st.rtos = st.rtos.max(idx);
        } else if Self::knows_retransmits(ev) {
            st.last_retransmits = v;
            st.rtos = st.rtos.max(v);
        }
        let rto = u64::from(st.rto_jiffies.max(1));
        let interval_j = if rto_ctx { (rto * 2).min(max_j) } else { rto };
        let interval = horizon::jiffies_to_ns(interval_j, hz);
        if !same_rto {
            st.next_due_ns = ev.ts_ns.saturating_add(interval);
            st.next_interval_ns = interval;
        }
        let st_rto = st.rto_jiffies;
        if rto_ctx {
            Self::after_rto(f, idx, st_rto, max_j);
        }
        // An RTO expiry no timer event reported: anchor the walk here.
        if rto_ctx && !same_rto {
            f.anchor = Some(Anchor {
                at_ns: ev.ts_ns,
                jiffies: ev.jiffies,
                timer_expires: 0,
                retransmits: idx.saturating_sub(1),
                rto_jiffies: ev.rto_jiffies,
                index: idx,
                from_timer: false,
                window_shrunk: f.snd_wnd == Some(0) && ev.packets_out > 0,
            });
            // It retransmitted, so it was not fatal.
            f.verdict = Some(Verdict {
                at_ns: ev.ts_ns,
                dead: false,
            });
            let remote = f.remote;
            self.sink.rto_expiry(remote, idx, ev.ts_ns);
            self.update_prediction(slot);
        }
        self.check_retransmit_stall(slot, ev.ts_ns);
        self.flows.touch(slot);
    }

    pub(super) fn on_rto(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        let idx = ev.retransmits.saturating_add(1);
        let expires = ev.sock.map_or(0, |s| s.timer_expires);
        // The same expiry reported twice (two mechanisms): keep the kernel's
        // own verdict if this one carries it, count nothing.
        let dup = {
            let f = self.flows.flow(slot);
            f.streak.is_some()
                && f.anchor.is_some_and(|a| {
                    a.index == idx
                        && ((expires != 0 && a.timer_expires == expires)
                            || ev.ts_ns.abs_diff(a.at_ns) <= self.same_expiry_window(a.rto_jiffies))
                })
        };
        if dup {
            let f = self.flows.flow_mut(slot);
            // Its socket fields may be richer (sock_ops reported first).
            Self::absorb(f, ev);
            if let Some(a) = f.anchor.as_mut() {
                if ev.mechanism == Mechanism::SockOps {
                    f.verdict = Some(Verdict {
                        at_ns: a.at_ns,
                        dead: ev.rto_expired_verdict,
                    });
                }
                if a.timer_expires == 0 {
                    a.timer_expires = expires;
                }
            }
            self.sink.stats.timer_events_duplicate += 1;
            return;
        }
        let remote = {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            f.remote
        };
        self.sink.rto_expiry(remote, idx, ev.ts_ns);
        let hz = self.hz.hz();
        let max_j = self.rto_max_j(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        Self::end_persist(
            f,
            &mut self.sink,
            ev.ts_ns,
            (PersistEnd::RtoExpiry, ev.ts_ns),
        );
        let recovered = f
            .streak
            .is_some_and(|st| Self::acked(&st, ev) || idx <= st.rtos);
        let st = Self::roll_streak(f, &mut self.sink, ev, recovered, false);
        st.rtos = idx;
        st.last_retransmits = ev.retransmits;
        if ev.snd_una != 0 {
            st.snd_una_last = ev.snd_una;
        }
        st.last_event_ns = ev.ts_ns;
        if let Some(s) = ev.sock {
            st.backoff = s.backoff;
        }
        if ev.rto_jiffies != 0 {
            st.rto_jiffies = ev.rto_jiffies;
        }
        let rto = u64::from(st.rto_jiffies.max(1));
        let interval = horizon::jiffies_to_ns((rto * 2).min(max_j), hz);
        st.next_due_ns = ev.ts_ns.saturating_add(interval);
        st.next_interval_ns = interval;
        f.anchor = Some(Anchor {
            at_ns: ev.ts_ns,
            jiffies: ev.jiffies,
            timer_expires: expires,
            retransmits: ev.retransmits,
            rto_jiffies: st.rto_jiffies,
            index: idx,
            from_timer: true,
            window_shrunk: f.snd_wnd == Some(0) && ev.packets_out > 0,
        });
        let verdict = self.rto_verdict(self.flows.flow(slot), ev);
        let settle = dur_ns(self.cfg.close_settle);
        let f = self.flows.flow_mut(slot);
        if verdict != Some(true) {
            // (A fatal expiry neither retransmits nor backs off.)
            Self::after_rto(f, idx, ev.rto_jiffies, max_j);
        }
        f.verdict = verdict.map(|dead| Verdict {
            at_ns: ev.ts_ns,
            dead,
        });
        if verdict == Some(true) {
            // The socket dies at this expiry: keep the prediction made
            // before it (the accuracy figure); expect the error report /
            // close within the settle time.
            if let Some(st) = f.streak.as_mut() {
                st.next_due_ns = ev.ts_ns;
                st.next_interval_ns = settle;
            }
        } else {
            self.update_prediction(slot);
        }
        self.check_retransmit_stall(slot, ev.ts_ns);
        self.flows.touch(slot);
    }

    pub(super) fn on_probe(&mut self, ev: &SockEvent) {
        let Some(sock) = ev.sock else {
            self.sink.stats.timer_events_ignored += 1;
            return;
        };
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        let remote = {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            f.remote
        };
        self.sink
            .remotes
            .counters(remote, ev.ts_ns)
            .zero_window_probes += 1;
        self.sink.emit(Observation::ZeroWindowProbe { remote });
        let hz = self.hz.hz();
        let max_ms = horizon::jiffies_to_msecs(self.rto_max_j(self.flows.flow(slot)), hz);
        let sys = self.sysctls_of(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        if ev.packets_out == 0
            && let Some(st) = f.streak
        {
            // Persist means nothing in flight: the retransmissions were acked.
            Self::end_streak(
                f,
                &mut self.sink,
                StreakOutcome::Recovered,
                st.last_event_ns,
            );
        }
        // The peer's window is open and nothing is in flight, yet the timer
        // probes: the data never left this node (`tcp_write_xmit()` stopped
        // at a failed transmit; `tcp_send_probe0()` counts each failed try
        // in `icsk_probes_out` and backs off). A window too small for the
        // next segment looks the same until the peer answers a probe, which
        // resets `icsk_probes_out`: the episode starts at the first probe
        // that found the previous one unanswered.
        let window_open = sock.snd_wnd != 0;
        // A probe that finds the window open under a zero-window episode:
        // the peer's window reopened (its reader resumed) and the episode
        // ends here, logged, instead of turning into an open-window episode
        // that would end unlogged. What follows may start a new episode
        // (data that never left).
        if f.persist.is_some_and(|p| !p.window_open) && window_open {
            Self::end_persist(
                f,
                &mut self.sink,
                ev.ts_ns,
                (PersistEnd::WindowOpened, ev.ts_ns),
            );
        }
        if f.persist.is_none() && window_open && (ev.packets_out != 0 || sock.probes_out == 0) {
            self.flows.touch(slot);
            return;
        }
        if f.persist.is_none() && f.streak.is_none() {
            f.new_episode_evidence();
        }
        let p = f.persist.get_or_insert(Persist {
            since_ns: ev.ts_ns,
            first_probe_ns: ev.ts_ns,
            last_probe_ns: ev.ts_ns,
            probes: 0,
            probes_out: 0,
            backoff: 0,
            next_due_ns: ev.ts_ns,
            next_interval_ns: 0,
            stalled: false,
            window_open,
        });
        p.window_open = window_open;
        if p.probes == 0 && !window_open {
            f.history.zero_window_episodes += 1;
        }
        p.probes = p.probes.saturating_add(1);
        p.last_probe_ns = ev.ts_ns;
        p.probes_out = sock.probes_out;
        p.backoff = sock.backoff;
        let rto_ms = horizon::jiffies_to_msecs(u64::from(ev.rto_jiffies), hz);
        let interval =
            horizon::persist_next_interval_ms(rto_ms, sock.backoff, max_ms) * NSEC_PER_MSEC;
        p.next_due_ns = ev.ts_ns.saturating_add(interval);
        p.next_interval_ns = interval;
        let (first, probes) = (p.first_probe_ns, p.probes);
        // Unanswered probes of data that never left count like RTO
        // expiries: a `retransmit` stall from `min_rto_streak` on.
        if window_open
            && sock.probes_out.saturating_add(1) >= self.cfg.min_rto_streak
            && f.announced & StallClass::Retransmit.bit() == 0
        {
            p.stalled = true;
            f.announced |= StallClass::Retransmit.bit();
            self.sink
                .stall_started(StallClass::Retransmit, f.cookie, f.remote, ev.ts_ns);
        }
        // tcp_probe_timer(): UTO since the first probe, or too many
        // unanswered probes (orphans: the orphan rule).
        let uto = f.user_timeout_ms;
        let uto_dead = uto != 0
            && probes > 1
            && ev.ts_ns.saturating_sub(first) >= u64::from(uto) * NSEC_PER_MSEC;
        // (limit, orphan no longer alive)
        let limits = sys.map(|s| {
            if f.orphan {
                // tcp_probe_timer(): alive =
                // `inet_csk_rto_backoff(icsk, rto_max) < rto_max`.
                let backed_off = rto_ms
                    .checked_shl(sock.backoff)
                    .filter(|&v| v >> sock.backoff == rto_ms)
                    .unwrap_or(u64::MAX);
                let alive = backed_off.min(max_ms) < max_ms;
                (
                    horizon::effective_orphan_retries(
                        s.tcp_orphan_retries,
                        alive,
                        ev.err_soft != 0,
                    ),
                    !alive,
                )
            } else {
                (s.tcp_retries2, false)
            }
        });
        let limit = limits.map(|(l, _)| l);
        // `icsk_probes_out >= max_probes`, and for an orphan no longer
        // alive also `icsk_backoff >= max_probes` (probes the peer answered
        // reset `icsk_probes_out`, not the backoff).
        let count_dead = limits
            .is_some_and(|(l, not_alive)| sock.probes_out >= l || (not_alive && sock.backoff >= l));
        f.verdict = Some(Verdict {
            at_ns: ev.ts_ns,
            dead: uto_dead || count_dead,
        });
        if !(uto_dead || count_dead) {
            f.prediction =
                horizon::predict_persist_death(first, ev.ts_ns, uto).map(|death| Prediction {
                    death_ns: death,
                    made_at_ns: ev.ts_ns,
                    boundary_ms: u64::from(uto),
                    source: BoundarySource::UserTimeout,
                    start_ns: first,
                });
            // Data that never left: the peer cannot answer, so the count
            // rule (`icsk_probes_out >= limit`) kills it like a silent
            // peer's retransmissions.
            if window_open
                && uto == 0
                && let (Some(limit), Some(s)) = (limit, sys)
            {
                let walk = horizon::ProbeWalk {
                    at_ns: ev.ts_ns,
                    at_jiffies: ev.jiffies,
                    probes_out: sock.probes_out,
                    backoff: sock.backoff,
                    rto_ms,
                    rto_max_ms: max_ms,
                    limit,
                    backoff_cap: s.tcp_retries2,
                    hz,
                    timer_wheel: self.cfg.timer_wheel,
                };
                f.prediction = horizon::predict_probe_count_death(&walk).map(|death| Prediction {
                    death_ns: death,
                    made_at_ns: ev.ts_ns,
                    boundary_ms: death.saturating_sub(first) / NSEC_PER_MSEC,
                    source: if f.orphan {
                        BoundarySource::OrphanRetries(limit)
                    } else {
                        BoundarySource::Retries2(limit)
                    },
                    start_ns: first,
                });
            }
        }
        self.flows.touch(slot);
    }

    /// This node dropped a packet of the socket (`skb:kfree_skb`) or failed
    /// to send a retransmission (6.17+): evidence for the stall's cause.
    pub(super) fn on_local_drop(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, false) else {
            return;
        };
        let f = self.flows.flow_mut(slot);
        f.last_event_ns = f.last_event_ns.max(ev.ts_ns);
        if let Some(s) = &ev.sock {
            f.evidence.observe(s, ev.err_soft);
        }
        if ev.kind == EventKind::Drop {
            f.evidence.drop(ev.ack_seq);
        } else {
            f.evidence.send_error(ev.ack_seq as i32);
        }
        self.flows.touch(slot);
    }

    pub(super) fn on_state(&mut self, ev: &SockEvent) {
        // An orphan whose FIN was ACKed, waiting above 60 s: its timewait
        // timer starts only after the keepalive timer's first part.
        let fin_wait2_entry = (ev.state == TcpState::FinWait2 && ev.orphan)
            .then_some(ev.sock)
            .flatten()
            .and_then(|s| {
                super::fin_wait2::entry_fate(&s, ev.rto_jiffies, ev.jiffies, self.hz.hz())
            });
        let create = ev.state == TcpState::CloseWait || fin_wait2_entry.is_some();
        let Some(slot) = self.resolve(ev, create) else {
            return;
        };
        // `tcp_reset()` sets `sk_err` (ECONNRESET, EPIPE in CLOSE_WAIT)
        // before `tcp_done()` moves the socket to CLOSE: a stall ended by
        // the peer's (or a middlebox's) RST. The flow leaves the views at
        // once, as any close; the reset is counted with the cause it had.
        if ev.state == TcpState::Close
            && matches!(ev.sk_err, why::ECONNRESET | why::EPIPE)
            && let Some(class) = self.classify(self.flows.flow(slot), ev.ts_ns)
        {
            let f = self.flows.flow(slot);
            let (cause, _) = self.cause_of(f, class);
            let (cookie, remote) = (f.cookie, f.remote);
            self.sink.stats.stalls_reset += 1;
            self.sink.emit(Observation::StallReset {
                class,
                cause,
                cookie,
                remote,
                errno: ev.sk_err,
            });
        }
        let f = self.flows.flow_mut(slot);
        Self::absorb(f, ev);
        if f.state != ev.state {
            f.state_since_ns = ev.ts_ns;
        }
        f.state = ev.state;
        if ev.state == TcpState::CloseWait {
            f.close_wait_since_ns.get_or_insert(ev.ts_ns);
        } else {
            f.close_wait_since_ns = None;
            f.announced &= !StallClass::CloseWait.bit();
        }
        match ev.state {
            // An orphan handed over to its timewait socket (FIN_WAIT2
            // substate): the full socket closes, the connection lives on
            // until its timewait timer's expiry or the peer's FIN.
            TcpState::Close if f.fin_wait2.is_some() => {
                f.state = TcpState::FinWait2;
                // The full socket's address is freed now and soon holds
                // another socket: the flow goes by the timewait socket's.
                let (cookie, tw) = (f.cookie, f.fin_wait2.map_or(0, |fw| fw.tw_skaddr));
                if tw != 0 {
                    f.skaddr = tw;
                }
                if self.skaddr_map.get(&ev.skaddr) == Some(&cookie) {
                    self.skaddr_map.remove(&ev.skaddr);
                }
                if tw != 0 && cookie != 0 {
                    self.skaddr_map.insert(tw, cookie);
                }
            }
            TcpState::Close => {
                self.close_slot(slot, ev.ts_ns, false);
                return;
            }
            // Our FIN acknowledged / both FINs done: nothing unacked left.
            TcpState::FinWait2 | TcpState::TimeWait => {
                if let Some(st) = f.streak {
                    Self::end_streak(
                        f,
                        &mut self.sink,
                        StreakOutcome::Recovered,
                        st.last_event_ns,
                    );
                }
                Self::end_persist(
                    f,
                    &mut self.sink,
                    ev.ts_ns,
                    (PersistEnd::FinAcked, ev.ts_ns),
                );
                if let Some(fate) = fin_wait2_entry {
                    self.on_fin_wait2_entry(slot, ev, fate, ev.ts_ns);
                }
            }
            _ => {}
        }
        self.flows.touch(slot);
    }

    /// The peer acknowledged new data while the socket was in an RTO
    /// episode: the streak ends as recovered now, not when the next expected
    /// expiry is overdue. (The event fires before the kernel processes the
    /// segment: `snd_una` is the old value, `ack_seq` the new one.)
    pub(super) fn on_ack(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, false) else {
            return;
        };
        let f = self.flows.flow_mut(slot);
        f.last_event_ns = f.last_event_ns.max(ev.ts_ns);
        if ev.ack_seq != 0 {
            f.snd_una = ev.ack_seq;
        }
        // A segment acknowledging new data also ends any persist episode.
        Self::end_persist(f, &mut self.sink, ev.ts_ns, (PersistEnd::Ack, ev.ts_ns));
        if f.streak.is_some_and(|st| {
            st.snd_una_last == 0 || ev.ack_seq == 0 || seq_after(ev.ack_seq, st.snd_una_last)
        }) {
            f.retransmits = 0;
            f.backoff = 0;
            Self::end_streak(f, &mut self.sink, StreakOutcome::Recovered, ev.ts_ns);
            self.sink.stats.acks_recovered += 1;
        }
        self.flows.touch(slot);
    }
}
