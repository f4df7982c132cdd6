//! The socket snapshot: the ONE place that reads a `struct sock` into a
//! [`SockSnapshot`]. Every program that reports a socket calls [`fill`]; a
//! field is added or fixed here (plus its row in the agent's `layout.rs` and
//! its decoding in `event.rs`), never per program.
//!
//! # How another program uses it
//!
//! ```ignore
//! use crate::snapshot;
//! let l = crate::layout()?;                 // offsets resolved from BTF
//! // `sk_ptr`: a BTF `struct sock *` (tp_btf argument, bpf_sock_from_file(f)->sk, ...)
//! let cookie = unsafe { bpf_get_socket_cookie(sk_ptr) }; // 0 if no typed pointer
//! let sk = sk_ptr as u64;                   // or `crate::arg_scalar(ctx, n)`
//! if !snapshot::is_tcp(l, sk) { return Err(Skip) }
//! let mut rec = MyRecord::zeroed();         // any #[repr(C)] record embedding a SockSnapshot
//! snapshot::fill(&mut rec.sock, l, sk, cookie);
//! ```
//!
//! [`fill`] only reads (with `bpf_probe_read_kernel`, which tolerates any
//! address: a bad pointer yields zeroed fields and a `stat::READ_ERRORS`
//! count, never a fault) and writes `out`; it does not touch timestamps, kind
//! or source, which belong to the record around the snapshot. `out` must be
//! zeroed (or freshly reserved and zeroed) by the caller: absent optional
//! fields are left as they are.

use tcpstall_common::{FieldSpec, KernelLayout, SockSnapshot, field, flag};

use crate::bump;
use tcpstall_common::stat;

pub const AF_INET6: u32 = 10;
const SOCK_DEAD_BIT: u64 = 1 << 0;
const IPPROTO_TCP: u32 = 6;

/// Read a field of up to 8 bytes at `base + spec.offset` (0 when the kernel
/// lacks the field or the read faults; faults are counted).
#[inline(always)]
pub fn read(base: u64, spec: &FieldSpec) -> u64 {
    let size = spec.size as u64;
    if size == 0 || base == 0 {
        return 0;
    }
    let addr = base.wrapping_add(spec.offset as u64) as *const u64;
    // SAFETY: bpf_probe_read_kernel copes with any address.
    let raw = match unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr) } {
        Ok(v) => v,
        Err(_) => {
            bump(stat::READ_ERRORS);
            return 0;
        }
    };
    // Keep the low `size` bytes (little endian), branch-free for the verifier.
    let drop = 64u64.saturating_sub(size.min(8) * 8);
    let value = (raw << drop) >> drop;
    if spec.bit_len == 0 {
        value
    } else {
        (value >> spec.bit_shift) & (u64::MAX >> (64 - spec.bit_len as u64))
    }
}

#[inline(always)]
fn read16(base: u64, spec: &FieldSpec, out: &mut [u8; 16]) {
    if spec.size != 16 || base == 0 {
        return;
    }
    let addr = base.wrapping_add(spec.offset as u64) as *const [u8; 16];
    // SAFETY: bpf_probe_read_kernel copes with any address.
    match unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(addr) } {
        Ok(v) => *out = v,
        Err(_) => bump(stat::READ_ERRORS),
    }
}

/// Whether `sk` is a TCP socket (kernels where the protocol cannot be read:
/// trust the hook).
#[inline(always)]
pub fn is_tcp(l: &KernelLayout, sk: u64) -> bool {
    let f = &l.fields[field::SK_PROTOCOL];
    !f.is_present() || read(sk, f) as u32 == IPPROTO_TCP
}

/// Fill `out` from the `struct sock` at address `sk`. `cookie` is the socket
/// cookie when the caller could ask the kernel for it
/// (`bpf_get_socket_cookie` needs a typed pointer); 0 reads `skc_cookie`.
#[inline(always)]
pub fn fill(out: &mut SockSnapshot, l: &KernelLayout, sk: u64, cookie: u64) {
    let f = &l.fields;
    out.skaddr = sk;
    out.cookie = if cookie != 0 {
        cookie
    } else {
        read(sk, &f[field::SKC_COOKIE])
    };
    let family = read(sk, &f[field::SKC_FAMILY]) as u32;
    out.family = family;
    out.state = read(sk, &f[field::SKC_STATE]) as u32;
    out.sport = read(sk, &f[field::SKC_NUM]) as u16;
    if out.sport == 0 {
        // Released already (the final CLOSE): inet_sport still holds it.
        out.sport = u16::from_be(read(sk, &f[field::INET_SPORT]) as u16);
    }
    out.dport = u16::from_be(read(sk, &f[field::SKC_DPORT]) as u16);
    if family == AF_INET6 {
        read16(sk, &f[field::SKC_V6_RCV_SADDR], &mut out.saddr);
        read16(sk, &f[field::SKC_V6_DADDR], &mut out.daddr);
    } else {
        out.saddr[..4].copy_from_slice(&(read(sk, &f[field::SKC_RCV_SADDR]) as u32).to_ne_bytes());
        out.daddr[..4].copy_from_slice(&(read(sk, &f[field::SKC_DADDR]) as u32).to_ne_bytes());
    }

    let net = read(sk, &f[field::SKC_NET]);
    if net != 0 {
        out.netns = read(net, &f[field::NET_NS_INUM]) as u32;
        out.retries2 = read(net, &f[field::NET_TCP_RETRIES2]) as u32;
        out.orphan_retries = read(net, &f[field::NET_TCP_ORPHAN_RETRIES]) as u32;
        out.netns_rto_max_ms = read(net, &f[field::NET_TCP_RTO_MAX_MS]) as u32;
        out.flags |= flag::NETNS_SYSCTLS;
    }
    let cgroup = read(sk, &f[field::SK_CGROUP]);
    if cgroup != 0 {
        let kn = read(cgroup, &f[field::CGROUP_KN]);
        out.cgroup_id = read(kn, &f[field::KERNFS_NODE_ID]);
    }

    if read(sk, &f[field::SK_FLAGS]) & SOCK_DEAD_BIT != 0 {
        out.flags |= flag::SOCK_DEAD;
    }
    out.retransmits = read(sk, &f[field::ICSK_RETRANSMITS]) as u32;
    out.backoff = read(sk, &f[field::ICSK_BACKOFF]) as u32;
    out.probes_out = read(sk, &f[field::ICSK_PROBES_OUT]) as u32;
    out.pending = read(sk, &f[field::ICSK_PENDING]) as u32;
    out.ca_state = read(sk, &f[field::ICSK_CA_STATE]) as u32;
    out.rto_jiffies = read(sk, &f[field::ICSK_RTO]) as u32;
    out.rto_max_jiffies = read(sk, &f[field::ICSK_RTO_MAX]) as u32;
    out.user_timeout_ms = read(sk, &f[field::ICSK_USER_TIMEOUT]) as u32;
    out.timer_expires = read(sk, &f[field::ICSK_TIMER_EXPIRES]);
    out.retrans_stamp = read(sk, &f[field::TP_RETRANS_STAMP]) as u32;
    if read(sk, &f[field::TP_USEC_TS]) != 0 {
        out.flags |= flag::USEC_TS;
    }
    out.snd_una = read(sk, &f[field::TP_SND_UNA]) as u32;
    out.snd_wnd = read(sk, &f[field::TP_SND_WND]) as u32;
    out.packets_out = read(sk, &f[field::TP_PACKETS_OUT]) as u32;
    out.retrans_out = read(sk, &f[field::TP_RETRANS_OUT]) as u32;
    out.total_retrans = read(sk, &f[field::TP_TOTAL_RETRANS]) as u32;
    out.lsndtime = read(sk, &f[field::TP_LSNDTIME]) as u32;
    out.rcv_tstamp = read(sk, &f[field::TP_RCV_TSTAMP]) as u32;
    out.sk_err = read(sk, &f[field::SK_ERR]) as u32;
    out.flags |= flag::SOCK_FIELDS;
}
