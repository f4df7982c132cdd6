//! The kernel fields the tcpstall programs read, and their resolution from BTF.
//!
//! [`FIELDS`] is the declarative table: one [`FieldDef`] per
//! [`tcpstall_common::field`] index, with the ordered candidate
//! `(struct, member path)` pairs that locate it on the kernels we know (the
//! first candidate that resolves wins: kernels rename and move fields).
//! [`resolve`] turns the table plus a kernel's BTF into a
//! [`tcpstall_common::KernelLayout`] and a per-row report for `tcpstall doctor`.
//!
//! # Encoding (what the eBPF side does with a [`FieldSpec`])
//!
//! * `size == 0`: the field is absent on this kernel; the program uses 0.
//! * otherwise read `size` bytes (1, 2, 4, 8; 16 only for the IPv6 address
//!   fields) at `offset` from the field's base object, little-endian.
//! * if `bit_len != 0` the field is a bitfield: the value is
//!   `(v >> bit_shift) & ((1 << bit_len) - 1)`. The read is the smallest
//!   naturally aligned 1/2/4/8-byte window that covers the bitfield, so
//!   `bit_shift + bit_len <= 8 * size` and `bit_len < 64` always hold. A
//!   "bitfield" that fills its whole window is encoded as a plain field.
//! * [`Access::OffsetOnly`] rows ([`field::WRITE_TIMER`]) are never read: only
//!   `offset` matters (the timer path does `container_of`). Their `size` is 8,
//!   a presence marker, not the size of the embedded `struct timer_list`.
//!
//! Bases: [`Base::Sock`] offsets are from the start of `struct sock`;
//! `inet_connection_sock` and `tcp_sock` begin with `struct sock` at offset 0
//! (checked by [`resolve`]), so their member offsets are offsets from `sock`.
//! [`Base::Net`] offsets are from `struct net`, [`Base::TimerList`] from
//! `struct timer_list`, [`Base::SkBuff`] from `struct sk_buff` and
//! [`Base::TcpSkbCb`] from `struct tcp_skb_cb` (the TCP view of
//! `sk_buff.cb`: the ACK probe reads `skb + SKB_CB + TCP_SKB_CB_ACK_SEQ`).

use std::fmt;

use tcpstall_common::{FieldSpec, KernelLayout, field};
use thiserror::Error;

use crate::kernel::btf::{Btf, BtfError, Member};

/// The object a field's offset is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    /// `struct sock` (also the start of `inet_connection_sock`, `tcp_sock`).
    Sock,
    /// `struct net`.
    Net,
    /// `struct timer_list`.
    TimerList,
    /// `struct sk_buff`.
    SkBuff,
    /// `struct tcp_skb_cb` (stored in `sk_buff.cb`).
    TcpSkbCb,
    /// `struct task_struct` (the sweep iterator's task).
    Task,
    /// `struct cgroup`.
    Cgroup,
    /// `struct kernfs_node`.
    KernfsNode,
}

impl Base {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sock => "sock",
            Self::Net => "net",
            Self::TimerList => "timer_list",
            Self::SkBuff => "sk_buff",
            Self::TcpSkbCb => "tcp_skb_cb",
            Self::Task => "task_struct",
            Self::Cgroup => "cgroup",
            Self::KernfsNode => "kernfs_node",
        }
    }
}

/// How the programs use a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A scalar read: 1, 2, 4 or 8 bytes, possibly a bitfield.
    Value,
    /// A 16-byte IPv6 address (the only 16-byte reads).
    Ipv6Addr,
    /// Only the offset is used (see the module docs); size is stored as 8.
    OffsetOnly,
}

/// One row of the field table.
#[derive(Clone, Copy, Debug)]
pub struct FieldDef {
    /// The [`tcpstall_common::field`] index.
    pub index: usize,
    /// The index constant's name (`"TP_RETRANS_STAMP"`).
    pub id: &'static str,
    /// Human name used in messages (`"tcp_sock.retrans_stamp"`).
    pub name: &'static str,
    pub base: Base,
    /// Ordered `(struct, dotted member path)` candidates; the first that
    /// resolves wins.
    pub candidates: &'static [(&'static str, &'static str)],
    /// Whether the agent refuses to run without it.
    pub required: bool,
    pub access: Access,
    /// Completes "tcpstall cannot ... on this kernel".
    pub purpose: &'static str,
    /// Version notes for `tcpstall doctor` (`"6.15+"`).
    pub note: &'static str,
}

const SOCK: &str = "sock";
const ICSK: &str = "inet_connection_sock";
const TP: &str = "tcp_sock";
const NET: &str = "net";

#[allow(clippy::too_many_arguments)]
const fn row(
    index: usize,
    id: &'static str,
    name: &'static str,
    base: Base,
    candidates: &'static [(&'static str, &'static str)],
    required: bool,
    access: Access,
    purpose: &'static str,
    note: &'static str,
) -> FieldDef {
    FieldDef {
        index,
        id,
        name,
        base,
        candidates,
        required,
        access,
        purpose,
        note,
    }
}

const REQ: bool = true;
const OPT: bool = false;
use Access::{Ipv6Addr, OffsetOnly, Value};
use Base::{Cgroup, KernfsNode, Net, SkBuff, Sock, Task, TcpSkbCb, TimerList};

/// The field table, indexed by [`tcpstall_common::field`] constants.
#[rustfmt::skip]
pub static FIELDS: [FieldDef; field::COUNT] = [
    row(field::SKC_FAMILY, "SKC_FAMILY", "sock_common.skc_family", Sock,
        &[(SOCK, "__sk_common.skc_family")], REQ, Value,
        "tell IPv4 from IPv6 sockets", ""),
    row(field::SKC_STATE, "SKC_STATE", "sock_common.skc_state", Sock,
        &[(SOCK, "__sk_common.skc_state")], REQ, Value,
        "read the TCP state", ""),
    row(field::SKC_DADDR, "SKC_DADDR", "sock_common.skc_daddr", Sock,
        &[(SOCK, "__sk_common.skc_daddr")], REQ, Value,
        "read IPv4 addresses", ""),
    row(field::SKC_RCV_SADDR, "SKC_RCV_SADDR", "sock_common.skc_rcv_saddr", Sock,
        &[(SOCK, "__sk_common.skc_rcv_saddr")], REQ, Value,
        "read IPv4 addresses", ""),
    row(field::SKC_DPORT, "SKC_DPORT", "sock_common.skc_dport", Sock,
        &[(SOCK, "__sk_common.skc_dport")], REQ, Value,
        "read ports", ""),
    row(field::SKC_NUM, "SKC_NUM", "sock_common.skc_num", Sock,
        &[(SOCK, "__sk_common.skc_num")], REQ, Value,
        "read ports", ""),
    row(field::SKC_V6_DADDR, "SKC_V6_DADDR", "sock_common.skc_v6_daddr", Sock,
        &[(SOCK, "__sk_common.skc_v6_daddr")], OPT, Ipv6Addr,
        "read IPv6 addresses", "absent without CONFIG_IPV6"),
    row(field::SKC_V6_RCV_SADDR, "SKC_V6_RCV_SADDR", "sock_common.skc_v6_rcv_saddr", Sock,
        &[(SOCK, "__sk_common.skc_v6_rcv_saddr")], OPT, Ipv6Addr,
        "read IPv6 addresses", "absent without CONFIG_IPV6"),
    row(field::SKC_COOKIE, "SKC_COOKIE", "sock_common.skc_cookie", Sock,
        &[(SOCK, "__sk_common.skc_cookie")], REQ, Value,
        "identify sockets by cookie", "atomic64_t"),
    row(field::SKC_NET, "SKC_NET", "sock_common.skc_net.net", Sock,
        &[(SOCK, "__sk_common.skc_net.net")], OPT, Value,
        "find a socket's network namespace", "absent without CONFIG_NET_NS"),
    row(field::NET_NS_INUM, "NET_NS_INUM", "net.ns.inum", Net,
        &[(NET, "ns.inum")], OPT, Value,
        "read network namespace ids", "offset from struct net"),
    row(field::NET_TCP_RETRIES2, "NET_TCP_RETRIES2", "net.ipv4.sysctl_tcp_retries2", Net,
        &[(NET, "ipv4.sysctl_tcp_retries2")], OPT, Value,
        "read per-namespace tcp_retries2", "int, u8 on newer kernels"),
    row(field::NET_TCP_ORPHAN_RETRIES, "NET_TCP_ORPHAN_RETRIES", "net.ipv4.sysctl_tcp_orphan_retries", Net,
        &[(NET, "ipv4.sysctl_tcp_orphan_retries")], OPT, Value,
        "read per-namespace tcp_orphan_retries", "int, u8 on newer kernels"),
    row(field::NET_TCP_RTO_MAX_MS, "NET_TCP_RTO_MAX_MS", "net.ipv4.sysctl_tcp_rto_max_ms", Net,
        &[(NET, "ipv4.sysctl_tcp_rto_max_ms")], OPT, Value,
        "read per-namespace tcp_rto_max_ms", "6.15+"),
    row(field::SK_FLAGS, "SK_FLAGS", "sock_common.skc_flags", Sock,
        &[(SOCK, "__sk_common.skc_flags"),
          (SOCK, "sk_flags")], REQ, Value,
        "recognise orphaned sockets (SOCK_DEAD)",
        "sk_flags is a #define for __sk_common.skc_flags"),
    row(field::SK_ERR, "SK_ERR", "sock.sk_err", Sock,
        &[(SOCK, "sk_err")], REQ, Value,
        "read socket errors", ""),
    row(field::ICSK_CA_STATE, "ICSK_CA_STATE", "inet_connection_sock.icsk_ca_state", Sock,
        &[(ICSK, "icsk_ca_state")], OPT, Value,
        "classify retransmissions by congestion state", "5-bit bitfield"),
    row(field::ICSK_RETRANSMITS, "ICSK_RETRANSMITS", "inet_connection_sock.icsk_retransmits", Sock,
        &[(ICSK, "icsk_retransmits")], REQ, Value,
        "count retransmissions", ""),
    row(field::ICSK_BACKOFF, "ICSK_BACKOFF", "inet_connection_sock.icsk_backoff", Sock,
        &[(ICSK, "icsk_backoff")], REQ, Value,
        "read the RTO backoff", ""),
    row(field::ICSK_PROBES_OUT, "ICSK_PROBES_OUT", "inet_connection_sock.icsk_probes_out", Sock,
        &[(ICSK, "icsk_probes_out")], REQ, Value,
        "count zero-window probes", ""),
    row(field::ICSK_PENDING, "ICSK_PENDING", "inet_connection_sock.icsk_pending", Sock,
        &[(ICSK, "icsk_pending")], REQ, Value,
        "tell which timer is pending", ""),
    row(field::ICSK_RTO, "ICSK_RTO", "inet_connection_sock.icsk_rto", Sock,
        &[(ICSK, "icsk_rto")], REQ, Value,
        "read the retransmission timeout", ""),
    row(field::ICSK_RTO_MAX, "ICSK_RTO_MAX", "inet_connection_sock.icsk_rto_max", Sock,
        &[(ICSK, "icsk_rto_max")], OPT, Value,
        "read the per-socket maximum RTO", "6.15+"),
    row(field::ICSK_USER_TIMEOUT, "ICSK_USER_TIMEOUT", "inet_connection_sock.icsk_user_timeout", Sock,
        &[(ICSK, "icsk_user_timeout")], REQ, Value,
        "read TCP_USER_TIMEOUT", ""),
    row(field::ICSK_TIMER_EXPIRES, "ICSK_TIMER_EXPIRES", "retransmit timer expiry", Sock,
        &[(ICSK, "icsk_timeout"),
          (ICSK, "icsk_retransmit_timer.expires"),
          (SOCK, "tcp_retransmit_timer.expires")], REQ, Value,
        "predict when the retransmit timer fires",
        "icsk_timeout <= 6.14; icsk_retransmit_timer 6.15-6.18; sk->tcp_retransmit_timer 6.19+"),
    row(field::TP_RETRANS_STAMP, "TP_RETRANS_STAMP", "tcp_sock.retrans_stamp", Sock,
        &[(TP, "retrans_stamp")], REQ, Value,
        "read retransmission timing", "ms, us with tcp_usec_ts"),
    row(field::TP_USEC_TS, "TP_USEC_TS", "tcp_sock.tcp_usec_ts", Sock,
        &[(TP, "tcp_usec_ts")], OPT, Value,
        "tell microsecond timestamps", "1-bit bitfield, 6.7+"),
    row(field::TP_SND_UNA, "TP_SND_UNA", "tcp_sock.snd_una", Sock,
        &[(TP, "snd_una")], REQ, Value,
        "read the send window", ""),
    row(field::SK_CGROUP, "SK_CGROUP", "sock.sk_cgrp_data.cgroup", Sock,
        &[(SOCK, "sk_cgrp_data.cgroup")], OPT, Value,
        "tell which cgroup (pod) a socket belongs to",
        "5.15+, CONFIG_SOCK_CGROUP_DATA; a pointer to struct cgroup"),
    row(field::TP_SND_WND, "TP_SND_WND", "tcp_sock.snd_wnd", Sock,
        &[(TP, "snd_wnd")], REQ, Value,
        "detect zero-window stalls", ""),
    row(field::TP_PACKETS_OUT, "TP_PACKETS_OUT", "tcp_sock.packets_out", Sock,
        &[(TP, "packets_out")], REQ, Value,
        "read packets in flight", ""),
    row(field::TP_RETRANS_OUT, "TP_RETRANS_OUT", "tcp_sock.retrans_out", Sock,
        &[(TP, "retrans_out")], OPT, Value,
        "read retransmitted packets in flight", ""),
    row(field::TP_TOTAL_RETRANS, "TP_TOTAL_RETRANS", "tcp_sock.total_retrans", Sock,
        &[(TP, "total_retrans")], OPT, Value,
        "read total retransmissions", ""),
    row(field::TP_LSNDTIME, "TP_LSNDTIME", "tcp_sock.lsndtime", Sock,
        &[(TP, "lsndtime")], OPT, Value,
        "read the last send time", ""),
    row(field::TP_RCV_TSTAMP, "TP_RCV_TSTAMP", "tcp_sock.rcv_tstamp", Sock,
        &[(TP, "rcv_tstamp")], OPT, Value,
        "read the last ACK time", ""),
    row(field::WRITE_TIMER, "WRITE_TIMER", "write timer (struct timer_list)", Sock,
        &[(ICSK, "icsk_retransmit_timer"),
          (SOCK, "tcp_retransmit_timer")], REQ, OffsetOnly,
        "map a write timer back to its socket",
        "offset only; icsk_retransmit_timer <= 6.18, sk->tcp_retransmit_timer 6.19+"),
    row(field::TIMER_FUNCTION, "TIMER_FUNCTION", "timer_list.function", TimerList,
        &[("timer_list", "function")], REQ, Value,
        "recognise the TCP write timer", "offset from struct timer_list"),
    row(field::SK_PROTOCOL, "SK_PROTOCOL", "sock.sk_protocol", Sock,
        &[(SOCK, "sk_protocol")], OPT, Value,
        "tell TCP sockets from others", "u16 since 5.6, an 8-bit bitfield before"),
    row(field::INET_SPORT, "INET_SPORT", "inet_sock.inet_sport", Sock,
        &[("inet_sock", "inet_sport")], OPT, Value,
        "local port after the kernel released it", "network byte order"),
    row(field::SKB_CB, "SKB_CB", "sk_buff.cb", SkBuff,
        &[("sk_buff", "cb")], OPT, OffsetOnly,
        "see ACK progress of a stalled socket", "where tcp_skb_cb lives"),
    row(field::TCP_SKB_CB_ACK_SEQ, "TCP_SKB_CB_ACK_SEQ", "tcp_skb_cb.ack_seq", TcpSkbCb,
        &[("tcp_skb_cb", "ack_seq")], OPT, Value,
        "see ACK progress of a stalled socket", ""),
    row(field::TP_KEEPALIVE_TIME, "TP_KEEPALIVE_TIME", "tcp_sock.keepalive_time", Sock,
        &[(TP, "keepalive_time")], OPT, Value,
        "show per-socket keepalive settings (risks audit)", "jiffies, 0 = netns default"),
    row(field::TP_KEEPALIVE_INTVL, "TP_KEEPALIVE_INTVL", "tcp_sock.keepalive_intvl", Sock,
        &[(TP, "keepalive_intvl")], OPT, Value,
        "show per-socket keepalive settings (risks audit)", "jiffies, 0 = netns default"),
    row(field::TP_KEEPALIVE_PROBES, "TP_KEEPALIVE_PROBES", "tcp_sock.keepalive_probes", Sock,
        &[(TP, "keepalive_probes")], OPT, Value,
        "show per-socket keepalive settings (risks audit)", "0 = netns default"),
    row(field::TASK_TGID, "TASK_TGID", "task_struct.tgid", Task,
        &[("task_struct", "tgid")], OPT, Value,
        "name the process holding a swept socket", "offset from struct task_struct"),
    row(field::TASK_COMM, "TASK_COMM", "task_struct.comm", Task,
        &[("task_struct", "comm")], OPT, OffsetOnly,
        "name the process holding a swept socket", "16 bytes; offset only"),
    row(field::CGROUP_KN, "CGROUP_KN", "cgroup.kn", Cgroup,
        &[("cgroup", "kn")], OPT, Value,
        "tell which cgroup (pod) a socket belongs to", "offset from struct cgroup"),
    row(field::KERNFS_NODE_ID, "KERNFS_NODE_ID", "kernfs_node.id", KernfsNode,
        &[("kernfs_node", "id")], OPT, Value,
        "tell which cgroup (pod) a socket belongs to",
        "u64 (the cgroup id, inode number of the cgroup directory)"),
];

// Every row sits at its own index.
const _: () = {
    let mut i = 0;
    while i < field::COUNT {
        assert!(FIELDS[i].index == i);
        assert!(!FIELDS[i].candidates.is_empty());
        i += 1;
    }
};

/// `(struct, path to its struct sock)`: structs whose offsets are used as
/// offsets from `struct sock` must start with it.
const SOCK_PREFIXES: &[(&str, &str)] = &[(ICSK, "icsk_inet.sk"), (TP, "inet_conn.icsk_inet.sk")];

/// The index constant's name for a [`field`] index (`"?"` if out of range).
pub fn field_name(index: usize) -> &'static str {
    FIELDS.get(index).map_or("?", |f| f.id)
}

/// Why the layout cannot be used on this kernel.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    #[error(
        "kernel {kernel} has no {field} (tried {}): tcpstall cannot {purpose} on this kernel",
        tried.join(", ")
    )]
    MissingField {
        field: &'static str,
        tried: Vec<String>,
        kernel: String,
        purpose: &'static str,
    },
    #[error(
        "kernel {kernel}: {field} ({candidate}) is {size} bytes; tcpstall reads only 1, 2, 4 or 8 bytes{}",
        if *ipv6 { " or a 16-byte IPv6 address" } else { "" }
    )]
    BadSize {
        field: &'static str,
        candidate: String,
        size: u32,
        ipv6: bool,
        kernel: String,
    },
    #[error(
        "kernel {kernel}: {field} ({candidate}) starts at bit {offset_bits}, not on a byte boundary"
    )]
    Unaligned {
        field: &'static str,
        candidate: String,
        offset_bits: u32,
        kernel: String,
    },
    #[error(
        "kernel {kernel}: bitfield {field} ({candidate}, {bits} bits at bit {offset_bits}) fits no aligned 1, 2, 4 or 8 byte read"
    )]
    BadBitfield {
        field: &'static str,
        candidate: String,
        offset_bits: u32,
        bits: u32,
        kernel: String,
    },
    #[error(
        "kernel {kernel}: struct {outer} does not start with struct sock ({path} is at byte {offset}); tcpstall cannot use its offsets"
    )]
    NotSockPrefixed {
        outer: &'static str,
        path: &'static str,
        offset: u32,
        kernel: String,
    },
}

/// One resolved row of the table.
#[derive(Clone, Debug)]
pub struct ResolvedRow {
    pub def: &'static FieldDef,
    /// Index into `def.candidates` of the candidate that resolved.
    pub matched: Option<usize>,
    /// What BTF said about the match.
    pub member: Option<Member>,
    /// What the programs get ([`FieldSpec::ABSENT`] if not found).
    pub spec: FieldSpec,
    /// Candidates that did not resolve, with the reason, in order.
    pub tried: Vec<String>,
}

impl ResolvedRow {
    pub fn is_present(&self) -> bool {
        self.spec.is_present()
    }

    /// `"struct.path"` of the matched candidate.
    pub fn source(&self) -> Option<String> {
        let (s, p) = self.def.candidates.get(self.matched?)?;
        Some(format!("{s}.{p}"))
    }
}

/// The resolved table for one kernel.
#[derive(Clone, Debug)]
pub struct ResolvedLayout {
    kernel: String,
    rows: Vec<ResolvedRow>,
}

impl ResolvedLayout {
    /// The kernel release this was resolved for.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The layout for [`tcpstall_common::LAYOUT_GLOBAL`]. The caller fills in
    /// `tcp_write_timer_addr`, `flags` and `ringbuf_wake_bytes` (zero here).
    pub fn layout(&self) -> KernelLayout {
        let mut l = KernelLayout::zeroed();
        for (slot, row) in l.fields.iter_mut().zip(&self.rows) {
            *slot = row.spec;
        }
        l
    }

    /// Bytes of `struct sock` from its start covering every socket field that
    /// is read ([`KernelLayout::sock_span`]); 0 when that exceeds
    /// [`tcpstall_common::SOCK_SCRATCH_BYTES`].
    pub fn sock_span(&self) -> u32 {
        let end = self
            .rows
            .iter()
            .filter(|r| r.def.base == Base::Sock && r.def.access != Access::OffsetOnly)
            .map(|r| r.spec.offset + u32::from(r.spec.size))
            .max()
            .unwrap_or(0);
        if end <= tcpstall_common::SOCK_SCRATCH_BYTES {
            end
        } else {
            0
        }
    }

    /// One row per [`field`] index, in index order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &ResolvedRow> {
        self.rows.iter()
    }

    pub fn row(&self, index: usize) -> Option<&ResolvedRow> {
        self.rows.get(index)
    }

    /// The spec for a [`field`] index ([`FieldSpec::ABSENT`] if unknown).
    pub fn spec(&self, index: usize) -> FieldSpec {
        self.rows.get(index).map_or(FieldSpec::ABSENT, |r| r.spec)
    }

    /// Whether the field (typically an optional one) exists on this kernel.
    pub fn has(&self, index: usize) -> bool {
        self.spec(index).is_present()
    }

    /// Which candidate (index into [`FieldDef::candidates`]) matched.
    pub fn matched(&self, index: usize) -> Option<usize> {
        self.rows.get(index)?.matched
    }
}

impl fmt::Display for ResolvedLayout {
    /// The `tcpstall doctor` table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {} field layout:", self.kernel)?;
        writeln!(
            f,
            "  {:<22} {:<10} {:>6} {:>4} {:>5}  SOURCE",
            "FIELD", "BASE", "OFFSET", "SIZE", "BITS"
        )?;
        for r in &self.rows {
            let d = r.def;
            let (offset, size, bits) = if r.is_present() {
                let bits = if r.spec.bit_len != 0 {
                    format!("{}:{}", r.spec.bit_shift, r.spec.bit_len)
                } else {
                    "-".to_owned()
                };
                (r.spec.offset.to_string(), r.spec.size.to_string(), bits)
            } else {
                ("-".to_owned(), "-".to_owned(), "-".to_owned())
            };
            let source = match r.source() {
                Some(s) if d.access == Access::OffsetOnly => format!("{s} (offset only)"),
                Some(s) => s,
                None if d.required => "MISSING (required)".to_owned(),
                None => "absent (optional)".to_owned(),
            };
            write!(
                f,
                "  {:<22} {:<10} {offset:>6} {size:>4} {bits:>5}  {source}",
                d.id,
                d.base.as_str()
            )?;
            if !d.note.is_empty() {
                write!(f, "  [{}]", d.note)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Turns a resolved member into the [`FieldSpec`] the programs use.
fn spec_for(
    def: &'static FieldDef,
    candidate: String,
    m: Member,
    kernel: &str,
) -> Result<FieldSpec, LayoutError> {
    let unaligned = |candidate: String| LayoutError::Unaligned {
        field: def.name,
        candidate,
        offset_bits: m.offset_bits,
        kernel: kernel.to_owned(),
    };
    if def.access == Access::OffsetOnly {
        if m.bitfield_bits != 0 {
            return Err(unaligned(candidate));
        }
        let offset = m.offset_bytes().ok_or_else(|| unaligned(candidate))?;
        return Ok(FieldSpec {
            offset,
            size: 8,
            bit_shift: 0,
            bit_len: 0,
        });
    }
    if m.bitfield_bits != 0 {
        return bitfield_spec(m.offset_bits, m.bitfield_bits).ok_or_else(|| {
            LayoutError::BadBitfield {
                field: def.name,
                candidate,
                offset_bits: m.offset_bits,
                bits: m.bitfield_bits,
                kernel: kernel.to_owned(),
            }
        });
    }
    let ipv6 = def.access == Access::Ipv6Addr;
    let size_ok = matches!(m.size_bytes, 1 | 2 | 4 | 8) || (ipv6 && m.size_bytes == 16);
    if !size_ok {
        return Err(LayoutError::BadSize {
            field: def.name,
            candidate,
            size: m.size_bytes,
            ipv6,
            kernel: kernel.to_owned(),
        });
    }
    let offset = m.offset_bytes().ok_or_else(|| unaligned(candidate))?;
    Ok(FieldSpec {
        offset,
        size: m.size_bytes as u16,
        bit_shift: 0,
        bit_len: 0,
    })
}

/// The smallest naturally aligned 1/2/4/8-byte window covering
/// `bits` bits at bit `offset_bits` (little-endian bit numbering).
fn bitfield_spec(offset_bits: u32, bits: u32) -> Option<FieldSpec> {
    if bits == 0 || bits > 64 {
        return None;
    }
    let end = u64::from(offset_bits) + u64::from(bits);
    for size in [1u32, 2, 4, 8] {
        let start = offset_bits / 8 / size * size;
        if end <= u64::from(start) * 8 + u64::from(size) * 8 {
            let shift = offset_bits - start * 8;
            let whole = shift == 0 && bits == size * 8;
            return Some(FieldSpec {
                offset: start,
                size: size as u16,
                bit_shift: if whole { 0 } else { shift as u8 },
                bit_len: if whole { 0 } else { bits as u8 },
            });
        }
    }
    None
}

/// Resolves every row of [`FIELDS`] against `btf`. `kernel_release` only
/// appears in messages. Fails on the first missing required field or on a
/// field tcpstall cannot read (bad size, unaligned).
pub fn resolve(btf: &Btf, kernel_release: &str) -> Result<ResolvedLayout, LayoutError> {
    for &(outer, path) in SOCK_PREFIXES {
        // A rename of the prefix path is not fatal; a nonzero offset is.
        if let Ok(m) = btf.member(outer, path)
            && m.offset_bits != 0
        {
            return Err(LayoutError::NotSockPrefixed {
                outer,
                path,
                offset: m.offset_bits / 8,
                kernel: kernel_release.to_owned(),
            });
        }
    }
    let mut rows = Vec::with_capacity(FIELDS.len());
    for def in &FIELDS {
        let mut tried = Vec::new();
        let mut found = None;
        for (i, &(s, p)) in def.candidates.iter().enumerate() {
            match btf.member(s, p) {
                Ok(m) => {
                    found = Some((i, m));
                    break;
                }
                Err(e) => tried.push(format!("{s}.{p}: {}", short_reason(&e))),
            }
        }
        let row = match found {
            Some((i, m)) => {
                let (s, p) = def.candidates[i];
                let spec = spec_for(def, format!("{s}.{p}"), m, kernel_release)?;
                ResolvedRow {
                    def,
                    matched: Some(i),
                    member: Some(m),
                    spec,
                    tried,
                }
            }
            None if def.required => {
                return Err(LayoutError::MissingField {
                    field: def.name,
                    tried,
                    kernel: kernel_release.to_owned(),
                    purpose: def.purpose,
                });
            }
            None => ResolvedRow {
                def,
                matched: None,
                member: None,
                spec: FieldSpec::ABSENT,
                tried,
            },
        };
        rows.push(row);
    }
    Ok(ResolvedLayout {
        kernel: kernel_release.to_owned(),
        rows,
    })
}

fn short_reason(e: &BtfError) -> String {
    match e {
        BtfError::TypeNotFound { .. } => "no such struct".to_owned(),
        BtfError::MemberNotFound { member, .. } => format!("no member {member}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
