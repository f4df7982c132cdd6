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

/// Where the snapshot's fields come from: a kernel address read with
/// `bpf_probe_read_kernel` ([`Probe`]: any address, one helper call per
/// field) or a BTF-typed pointer read with plain loads ([`Direct`]: the
/// verifier checks each constant offset against the kernel's BTF and turns
/// the load into a fault-tolerant one; no helper call).
pub trait Source: Copy {
    /// Reads cost a plain load each (no helper call).
    const PLAIN_LOADS: bool;
    /// The object's address (correlation only).
    fn addr(self) -> u64;
    fn is_null(self) -> bool;
    /// A field of up to 8 bytes (0 when absent).
    fn get(self, spec: &FieldSpec) -> u64;
    /// The object a pointer field points to (null when absent).
    fn follow(self, spec: &FieldSpec) -> Self;
}

/// A kernel address read with probe reads.
#[derive(Clone, Copy)]
pub struct Probe(pub u64);

impl Source for Probe {
    const PLAIN_LOADS: bool = false;
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn is_null(self) -> bool {
        self.0 == 0
    }
    #[inline(always)]
    fn get(self, spec: &FieldSpec) -> u64 {
        read(self.0, spec)
    }
    #[inline(always)]
    fn follow(self, spec: &FieldSpec) -> Self {
        Probe(read(self.0, spec))
    }
}

/// A BTF-typed pointer (a `tcp_sock` from `bpf_skc_to_tcp_sock`, or a pointer
/// loaded from one of its members) read with plain loads. Offsets and sizes
/// come from the read-only layout, so the verifier sees constants and checks
/// each load against the member at that offset: a layout that disagrees with
/// the kernel's BTF fails to load (and the agent falls back to [`Probe`]).
/// Pointer values are never shifted or masked (the verifier rejects such
/// arithmetic on pointers).
#[derive(Clone, Copy)]
pub struct Direct(pub *const u8);

impl Source for Direct {
    const PLAIN_LOADS: bool = true;
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0 as u64
    }
    #[inline(always)]
    fn is_null(self) -> bool {
        self.0.is_null()
    }
    #[inline(always)]
    fn get(self, spec: &FieldSpec) -> u64 {
        let size = spec.size;
        if size == 0 || self.0.is_null() {
            return 0;
        }
        let p = self.0.wrapping_add(spec.offset as usize);
        // SAFETY: loads from a BTF pointer are checked by the verifier and
        // cannot fault (exception-table loads); the width is the member's.
        let raw = unsafe {
            match size {
                1 => u64::from(core::ptr::read_volatile(p)),
                2 => u64::from(core::ptr::read_volatile(p.cast::<u16>())),
                4 => u64::from(core::ptr::read_volatile(p.cast::<u32>())),
                8 => core::ptr::read_volatile(p.cast::<u64>()),
                _ => 0,
            }
        };
        if spec.bit_len == 0 {
            raw
        } else {
            (raw >> spec.bit_shift) & (u64::MAX >> (64 - spec.bit_len as u64))
        }
    }
    #[inline(always)]
    fn follow(self, spec: &FieldSpec) -> Self {
        if spec.size != 8 || self.0.is_null() {
            return Direct(core::ptr::null());
        }
        let p = self.0.wrapping_add(spec.offset as usize);
        // SAFETY: as in `get`; the member is a pointer.
        Direct(unsafe { core::ptr::read_volatile(p.cast::<*const u8>()) })
    }
}

/// Whether `sk` is a TCP socket (kernels where the protocol cannot be read:
/// trust the hook).
#[inline(always)]
pub fn is_tcp(l: &KernelLayout, sk: u64) -> bool {
    let f = &l.fields[field::SK_PROTOCOL];
    !f.is_present() || read(sk, f) as u32 == IPPROTO_TCP
}

/// Fill `out` from the `struct sock` at address `sk` with probe reads (any
/// address). `cookie` is the socket cookie when the caller could ask the
/// kernel for it (`bpf_get_socket_cookie` needs a typed pointer); 0 reads
/// `skc_cookie`.
#[inline(always)]
pub fn fill(out: &mut SockSnapshot, l: &KernelLayout, sk: u64, cookie: u64) {
    fill_from(out, l, Probe(sk), cookie)
}

/// Fill `out` from the socket `sk` (probe reads or direct loads, see
/// [`Source`]); otherwise as [`fill`].
#[inline(always)]
pub fn fill_from<S: Source>(out: &mut SockSnapshot, l: &KernelLayout, sk: S, cookie: u64) {
    let f = &l.fields;
    out.skaddr = sk.addr();
    out.cookie = if cookie != 0 {
        cookie
    } else {
        sk.get(&f[field::SKC_COOKIE])
    };
    let family = sk.get(&f[field::SKC_FAMILY]) as u32;
    out.family = family;
    out.state = sk.get(&f[field::SKC_STATE]) as u32;
    out.sport = sk.get(&f[field::SKC_NUM]) as u16;
    if out.sport == 0 {
        // Released already (the final CLOSE): inet_sport still holds it.
        out.sport = u16::from_be(sk.get(&f[field::INET_SPORT]) as u16);
    }
    out.dport = u16::from_be(sk.get(&f[field::SKC_DPORT]) as u16);
    if family == AF_INET6 {
        read16(sk.addr(), &f[field::SKC_V6_RCV_SADDR], &mut out.saddr);
        read16(sk.addr(), &f[field::SKC_V6_DADDR], &mut out.daddr);
    } else {
        out.saddr[..4].copy_from_slice(&(sk.get(&f[field::SKC_RCV_SADDR]) as u32).to_ne_bytes());
        out.daddr[..4].copy_from_slice(&(sk.get(&f[field::SKC_DADDR]) as u32).to_ne_bytes());
    }

    let net = sk.follow(&f[field::SKC_NET]);
    if !net.is_null() {
        out.netns = net.get(&f[field::NET_NS_INUM]) as u32;
        out.retries2 = net.get(&f[field::NET_TCP_RETRIES2]) as u32;
        out.orphan_retries = net.get(&f[field::NET_TCP_ORPHAN_RETRIES]) as u32;
        out.netns_rto_max_ms = net.get(&f[field::NET_TCP_RTO_MAX_MS]) as u32;
        out.flags |= flag::NETNS_SYSCTLS;
    }
    let cgroup = sk.follow(&f[field::SK_CGROUP]);
    if !cgroup.is_null() {
        let kn = cgroup.follow(&f[field::CGROUP_KN]);
        out.cgroup_id = kn.get(&f[field::KERNFS_NODE_ID]);
    }

    if sk.get(&f[field::SK_FLAGS]) & SOCK_DEAD_BIT != 0 {
        out.flags |= flag::SOCK_DEAD;
    }
    out.retransmits = sk.get(&f[field::ICSK_RETRANSMITS]) as u32;
    out.backoff = sk.get(&f[field::ICSK_BACKOFF]) as u32;
    out.probes_out = sk.get(&f[field::ICSK_PROBES_OUT]) as u32;
    out.pending = sk.get(&f[field::ICSK_PENDING]) as u32;
    out.ca_state = sk.get(&f[field::ICSK_CA_STATE]) as u32;
    out.rto_jiffies = sk.get(&f[field::ICSK_RTO]) as u32;
    out.rto_max_jiffies = sk.get(&f[field::ICSK_RTO_MAX]) as u32;
    out.user_timeout_ms = sk.get(&f[field::ICSK_USER_TIMEOUT]) as u32;
    out.timer_expires = sk.get(&f[field::ICSK_TIMER_EXPIRES]);
    out.retrans_stamp = sk.get(&f[field::TP_RETRANS_STAMP]) as u32;
    if sk.get(&f[field::TP_USEC_TS]) != 0 {
        out.flags |= flag::USEC_TS;
    }
    out.snd_una = sk.get(&f[field::TP_SND_UNA]) as u32;
    out.snd_wnd = sk.get(&f[field::TP_SND_WND]) as u32;
    out.packets_out = sk.get(&f[field::TP_PACKETS_OUT]) as u32;
    out.retrans_out = sk.get(&f[field::TP_RETRANS_OUT]) as u32;
    out.total_retrans = sk.get(&f[field::TP_TOTAL_RETRANS]) as u32;
    out.lsndtime = sk.get(&f[field::TP_LSNDTIME]) as u32;
    out.rcv_tstamp = sk.get(&f[field::TP_RCV_TSTAMP]) as u32;
    out.sk_err = sk.get(&f[field::SK_ERR]) as u32;
    out.flags |= flag::SOCK_FIELDS;
}
