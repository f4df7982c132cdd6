//! Builders of kernel-faithful event sequences for the engine's tests and
//! the hot-path benchmarks (`benches/hot_path.rs`), in one place: a
//! simulated socket ([`Sock`]) whose events carry what the probes read,
//! and the clocks (jiffies with the kernel's boot offset, millisecond
//! stamps). Not part of the agent; public only so the benchmarks share it.

use std::net::SocketAddr;

use super::horizon::jiffies_to_ns;
use crate::kernel::event::{EventKind, Mechanism, NetnsSysctls, SockEvent, SockFields, TcpState};

pub const HZ: u32 = 250;
pub const MS: u64 = 1_000_000;
pub const S: u64 = 1_000_000_000;
/// Monotonic base of the tests (an hour of uptime).
pub const T0: u64 = 3_600 * S;

/// jiffies consistent with the boot offset for HZ at monotonic `ts`.
pub fn jiffies_at(hz: u32, ts: u64) -> u64 {
    let j = u128::from(ts) * u128::from(hz) / u128::from(S);
    ((1u64 << 32) - 300 * u64::from(hz)).wrapping_add(j as u64)
}

/// Monotonic ns of jiffy `j` (inverse of [`jiffies_at`]).
pub fn ts_of_jiffies(hz: u32, j: u64) -> u64 {
    let j0 = (1u64 << 32) - 300 * u64::from(hz);
    jiffies_to_ns(j - j0, hz)
}

/// A network namespace's limits with `tcp_retries2` = `retries2`.
pub fn sysctls(retries2: u32) -> NetnsSysctls {
    NetnsSysctls {
        tcp_retries2: retries2,
        tcp_orphan_retries: 0,
        tcp_rto_max_ms: None,
        ..Default::default()
    }
}

/// One simulated socket.
#[derive(Clone, Copy)]
pub struct Sock {
    pub cookie: u64,
    pub skaddr: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns: u32,
    pub sysctls: Option<NetnsSysctls>,
    pub uto: u32,
    pub orphan: bool,
    pub hz: u32,
    pub mechanism: Mechanism,
    /// `snd_una` of events that do not name one.
    pub snd_una: u32,
}

impl Sock {
    pub fn new(cookie: u64) -> Self {
        Self {
            cookie,
            skaddr: 0xffff_8880_0000_0000 + cookie * 0x1000,
            local: SocketAddr::from(([10, 0, 0, 1], 40_000 + (cookie % 20_000) as u16)),
            remote: SocketAddr::from(([10, 0, 0, 2], 8080)),
            netns: 4_026_532_000,
            sysctls: Some(sysctls(5)),
            uto: 0,
            orphan: false,
            hz: HZ,
            mechanism: Mechanism::TpBtf,
            snd_una: 1_000,
        }
    }

    /// A socket of `cookie` between `local` and `remote` in `netns`, with
    /// the default limits (`tcp_retries2` 15) and a `snd_una` of its own.
    pub fn between(cookie: u64, local: SocketAddr, remote: SocketAddr, netns: u32) -> Self {
        Self {
            local,
            remote,
            netns,
            sysctls: Some(sysctls(15)),
            snd_una: 1_000 + (cookie as u32 & 0xffff),
            ..Self::new(cookie)
        }
    }

    pub fn to(mut self, remote: &str) -> Self {
        self.remote = remote.parse().unwrap();
        self
    }

    pub fn base(&self, kind: EventKind, ts: u64) -> SockEvent {
        SockEvent {
            kind,
            mechanism: self.mechanism,
            ts_ns: ts,
            jiffies: jiffies_at(self.hz, ts),
            cookie: self.cookie,
            skaddr: self.skaddr,
            netns: self.netns,
            cgroup_id: 0,
            local: self.local,
            remote: self.remote,
            state: TcpState::Established,
            old_state: TcpState::Established,
            sock: None,
            retransmits: 0,
            rto_jiffies: 0,
            snd_una: self.snd_una,
            packets_out: 1,
            retrans_out: 0,
            total_retrans: 0,
            netns_sysctls: self.sysctls,
            orphan: self.orphan,
            rto_expired_verdict: false,
            sk_err: 0,
            ack_seq: 0,
            err_soft: 0,
            tw: None,
        }
    }

    pub fn fields(&self, pending: u32, stamp: u32, backoff: u32, ts: u64) -> SockFields {
        SockFields {
            backoff,
            probes_out: 0,
            pending,
            ca_state: 0,
            rto_max_jiffies: 0,
            user_timeout_ms: self.uto,
            retrans_stamp: stamp,
            usec_ts: false,
            snd_wnd: 65_535,
            lsndtime: 0,
            rcv_tstamp: 0,
            timer_expires: jiffies_at(self.hz, ts).saturating_sub(1),
            syn_retries: 0,
            mss_cache: 0,
            sacked_out: 0,
            keepalive: Default::default(),
            fin: Default::default(),
        }
    }

    /// `tcp_retransmit_skb`: `pending` 5 = loss probe, 1 = fast retransmit,
    /// 0 = sent by an RTO expiry.
    #[allow(clippy::too_many_arguments)]
    pub fn retransmit(
        &self,
        ts: u64,
        pending: u32,
        retransmits: u32,
        stamp: u32,
        rto: u32,
        snd_una: u32,
        backoff: u32,
    ) -> SockEvent {
        let mut e = self.base(EventKind::Retransmit, ts);
        e.sock = Some(self.fields(pending, stamp, backoff, ts));
        e.retransmits = retransmits;
        e.rto_jiffies = rto;
        e.snd_una = snd_una;
        e
    }

    /// Write timer expiry with an RTO pending.
    pub fn rto(&self, ts: u64, retransmits: u32, stamp: u32, rto: u32, snd_una: u32) -> SockEvent {
        let mut e = self.base(EventKind::WriteTimer, ts);
        e.sock = Some(self.fields(1, stamp, retransmits, ts));
        e.retransmits = retransmits;
        e.rto_jiffies = rto;
        e.snd_una = snd_una;
        e
    }

    /// Zero-window probe timer expiry.
    pub fn probe(&self, ts: u64, backoff: u32, probes_out: u32) -> SockEvent {
        let mut e = self.base(EventKind::WriteTimer, ts);
        let mut f = self.fields(3, 0, backoff, ts);
        f.snd_wnd = 0;
        f.probes_out = probes_out;
        e.sock = Some(f);
        e.packets_out = 0;
        e.rto_jiffies = 51;
        e
    }

    pub fn state(&self, ts: u64, old: TcpState, new: TcpState) -> SockEvent {
        let mut e = self.base(EventKind::State, ts);
        e.old_state = old;
        e.state = new;
        e.netns_sysctls = None;
        e
    }

    pub fn close(&self, ts: u64) -> SockEvent {
        self.state(ts, TcpState::Established, TcpState::Close)
    }

    pub fn error(&self, ts: u64, errno: u32) -> SockEvent {
        let mut e = self.base(EventKind::ErrorReport, ts);
        e.sk_err = errno;
        e.state = TcpState::Close;
        e.netns_sysctls = None;
        e
    }
}

/// A millisecond `retrans_stamp` (`tcp_time_stamp_ms`) at `ts`.
pub fn ms_stamp(ts: u64) -> u32 {
    (ts / MS) as u32
}
