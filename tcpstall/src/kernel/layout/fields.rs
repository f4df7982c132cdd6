//! [`FIELDS`]: the declarative table of the kernel fields the programs read,
//! one row per [`tcpstall_common::field`] index with its ordered
//! `(struct, member path)` candidates, and the structs whose offsets count
//! from `struct sock`.

use tcpstall_common::field;

use super::{Access, Base, FieldDef};

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
    row(field::SKB_SK, "SKB_SK", "sk_buff.sk", SkBuff,
        &[("sk_buff", "sk")], OPT, Value,
        "tie a packet this node dropped to its socket (cause local_drop)",
        "the owner of locally generated skbs"),
    row(field::SK_ERR_SOFT, "SK_ERR_SOFT", "sock.sk_err_soft", Sock,
        &[(SOCK, "sk_err_soft")], OPT, Value,
        "see ICMP errors on a stalled socket (cause unreachable)", "positive errno"),
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
pub(super) const SOCK_PREFIXES: &[(&str, &str)] =
    &[(ICSK, "icsk_inet.sk"), (TP, "inet_conn.icsk_inet.sk")];
