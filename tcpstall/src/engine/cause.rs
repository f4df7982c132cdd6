//! Why a segment was retransmitted, from the kernel state visible at the
//! `tcp_retransmit_skb` event (verified against `net/ipv4/tcp_timer.c` and
//! `tcp_output.c`, 5.4 .. 6.18):
//!
//! - `syn`: the socket is in SYN_SENT / SYN_RECV (the SYN, or the SYN-ACK
//!   of a Fast Open child);
//! - `tlp`: the loss-probe timer is running it: `tcp_write_timer_handler()`
//!   calls `tcp_send_loss_probe()` with `icsk_pending` still
//!   `ICSK_TIME_LOSS_PROBE` (5). A probe is only scheduled in the Open or
//!   CWR state, so a socket in `TCP_CA_Recovery` (3) with pending 5 (a
//!   stale loss-probe timer during SACK recovery) is `fast`;
//! - `rto`: the retransmission timer is running it (`tcp_write_timer_handler()`
//!   clears `icsk_pending` to 0 before `tcp_retransmit_timer()`), or the
//!   socket is in the `TCP_CA_Loss` state (4) that an RTO enters: the rest
//!   of the window retransmitted as ACKs arrive after the timeout;
//! - `fast`: everything else with the socket's fields known: fast
//!   retransmit / recovery (`TCP_CA_Recovery`, RACK reordering timeout with
//!   `icsk_pending` 6, SACK-driven retransmits with the RTO timer armed);
//! - `unknown`: the event carried no socket fields (sock_ops-only paths).

use serde::Serialize;
use tcpstall_common::pending;

use crate::kernel::event::{SockEvent, TcpState};

/// `icsk_ca_state` TCP_CA_Loss.
pub const TCP_CA_LOSS: u32 = 4;
/// `icsk_ca_state` TCP_CA_Recovery (fast recovery).
pub const TCP_CA_RECOVERY: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetransmitCause {
    Rto,
    Tlp,
    Fast,
    Syn,
    Unknown,
}

impl RetransmitCause {
    pub const ALL: [RetransmitCause; 5] =
        [Self::Rto, Self::Tlp, Self::Fast, Self::Syn, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rto => "rto",
            Self::Tlp => "tlp",
            Self::Fast => "fast",
            Self::Syn => "syn",
            Self::Unknown => "unknown",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Classifies from the socket state, `icsk_pending` (None: unknown) and
    /// `icsk_ca_state` (None: not read on this kernel / path).
    pub fn classify(state: TcpState, pending_now: Option<u32>, ca_state: Option<u32>) -> Self {
        if matches!(
            state,
            TcpState::SynSent | TcpState::SynRecv | TcpState::NewSynRecv
        ) {
            return Self::Syn;
        }
        let Some(p) = pending_now else {
            return Self::Unknown;
        };
        if p == 0 || ca_state == Some(TCP_CA_LOSS) {
            return Self::Rto;
        }
        if p == pending::LOSS_PROBE && ca_state != Some(TCP_CA_RECOVERY) {
            return Self::Tlp;
        }
        Self::Fast
    }

    /// The cause of a retransmit event.
    pub fn of(ev: &SockEvent) -> Self {
        Self::classify(ev.state, ev.sock.map(|s| s.pending), ca_state_of(ev))
    }
}

/// `icsk_ca_state` at the event: every program that reads the socket
/// (`SockFields`, the one snapshot) carries it; sock_ops-only events do not.
/// A kernel without the field reads 0 (Open), which classifies exactly like
/// "not known": only Loss and Recovery change a verdict.
fn ca_state_of(ev: &SockEvent) -> Option<u32> {
    ev.sock.map(|s| s.ca_state)
}

/// Per-flow retransmissions by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CauseCounts {
    pub rto: u32,
    pub tlp: u32,
    pub fast: u32,
    pub syn: u32,
    pub unknown: u32,
}

impl CauseCounts {
    pub fn add(&mut self, c: RetransmitCause) {
        let slot = match c {
            RetransmitCause::Rto => &mut self.rto,
            RetransmitCause::Tlp => &mut self.tlp,
            RetransmitCause::Fast => &mut self.fast,
            RetransmitCause::Syn => &mut self.syn,
            RetransmitCause::Unknown => &mut self.unknown,
        };
        *slot = slot.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RetransmitCause::*;

    #[test]
    fn classifies_from_kernel_state() {
        let est = TcpState::Established;
        // The RTO handler clears icsk_pending before retransmitting.
        assert_eq!(RetransmitCause::classify(est, Some(0), None), Rto);
        assert_eq!(RetransmitCause::classify(est, Some(0), Some(4)), Rto);
        // Go-back-N after an RTO: the timer is re-armed, the state is Loss.
        assert_eq!(RetransmitCause::classify(est, Some(1), Some(4)), Rto);
        // Tail loss probe: run with ICSK_TIME_LOSS_PROBE pending.
        assert_eq!(RetransmitCause::classify(est, Some(5), Some(0)), Tlp);
        assert_eq!(RetransmitCause::classify(est, Some(5), None), Tlp);
        // Fast retransmit / recovery (RTO armed), RACK reorder timeout.
        assert_eq!(RetransmitCause::classify(est, Some(1), Some(3)), Fast);
        assert_eq!(RetransmitCause::classify(est, Some(1), Some(1)), Fast);
        assert_eq!(RetransmitCause::classify(est, Some(6), Some(3)), Fast);
        // SACK recovery while a loss probe is still armed: fast.
        assert_eq!(RetransmitCause::classify(est, Some(5), Some(3)), Fast);
        assert_eq!(RetransmitCause::classify(est, Some(1), None), Fast);
        // SYN states win over everything (the SYN's RTO is a `syn`).
        for s in [TcpState::SynSent, TcpState::SynRecv] {
            assert_eq!(RetransmitCause::classify(s, Some(0), Some(4)), Syn);
            assert_eq!(RetransmitCause::classify(s, None, None), Syn);
        }
        // No socket fields (sock_ops): unknown.
        assert_eq!(RetransmitCause::classify(est, None, None), Unknown);
        // Closing states retransmit too (FIN): same rules.
        assert_eq!(
            RetransmitCause::classify(TcpState::FinWait1, Some(0), None),
            Rto
        );
        assert_eq!(
            RetransmitCause::classify(TcpState::LastAck, Some(5), None),
            Tlp
        );
    }

    /// The whole chain from the kernel's record: a retransmit snapshot as the
    /// `tcp_retransmit_skb` program writes it (`icsk_pending`, `icsk_ca_state`,
    /// state), decoded, then classified. One snapshot per cause, including
    /// the two verdicts only `icsk_ca_state` decides.
    /// Mutation: `ca_state_of` returning `None` fails the Recovery-with-a-
    /// stale-loss-probe (`tlp` instead of `fast`) and go-back-N (`fast`
    /// instead of `rto`) rows.
    #[test]
    fn classifies_decoded_snapshots() {
        use tcpstall_common::{Event, flag, kind, source};
        let snap = |state: u32, pending: u32, ca_state: u32, fields: bool| {
            let mut raw = Event::zeroed();
            raw.kind = kind::RETRANSMIT;
            raw.source = source::TP_BTF;
            raw.sock.family = 2;
            raw.sock.sport = 40000;
            raw.sock.dport = 8080;
            raw.sock.state = state as u8;
            raw.sock.pending = pending as u8;
            raw.sock.ca_state = ca_state as u8;
            raw.sock.flags = if fields { flag::SOCK_FIELDS } else { 0 };
            let ev = SockEvent::from_raw(&raw).expect("decodes");
            RetransmitCause::of(&ev)
        };
        const EST: u32 = 1;
        const SYN_SENT: u32 = 2;
        const SYN_RECV: u32 = 3;
        // RTO: the timer handler cleared icsk_pending; then go-back-N in Loss.
        assert_eq!(snap(EST, 0, 0, true), Rto);
        assert_eq!(snap(EST, 1, TCP_CA_LOSS, true), Rto);
        // Tail loss probe: ICSK_TIME_LOSS_PROBE pending, Open or CWR.
        assert_eq!(snap(EST, 5, 0, true), Tlp);
        assert_eq!(snap(EST, 5, 2, true), Tlp);
        // Fast retransmit entering Recovery while the loss probe is still
        // armed (tcp_ack retransmits before re-arming the timer), with the
        // RTO armed, and from the RACK reordering timer.
        assert_eq!(snap(EST, 5, TCP_CA_RECOVERY, true), Fast);
        assert_eq!(snap(EST, 1, TCP_CA_RECOVERY, true), Fast);
        assert_eq!(snap(EST, 6, TCP_CA_RECOVERY, true), Fast);
        assert_eq!(snap(EST, 1, 1, true), Fast);
        // SYN and SYN-ACK.
        assert_eq!(snap(SYN_SENT, 0, 0, true), Syn);
        assert_eq!(snap(SYN_RECV, 0, TCP_CA_LOSS, true), Syn);
        // No socket fields: unknown.
        assert_eq!(snap(EST, 0, 0, false), Unknown);
    }

    #[test]
    fn counts_by_cause() {
        let mut c = CauseCounts::default();
        for k in [Rto, Rto, Tlp, Fast, Syn, Unknown] {
            c.add(k);
        }
        assert_eq!(
            c,
            CauseCounts {
                rto: 2,
                tlp: 1,
                fast: 1,
                syn: 1,
                unknown: 1
            }
        );
        assert_eq!(RetransmitCause::ALL.map(|c| c.index()), [0, 1, 2, 3, 4]);
    }
}
