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
//! count, never a fault) and writes every field of `out` exactly once (absent
//! fields as 0), so `out` may be uninitialised ring-buffer memory; it does not
//! touch timestamps, kind or source, which belong to the record around the
//! snapshot.

use tcpstall_common::{FieldSpec, KernelLayout, SockSnapshot, field, flag};

use crate::bump;
use tcpstall_common::stat;

pub const AF_INET6: u32 = 10;
const SOCK_DEAD_BIT: u64 = 1 << 0;
/// `SOCK_KEEPOPEN` in `enum sock_flags`.
pub const SOCK_KEEPOPEN_BIT: u64 = 1 << 3;
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
        *out = [0; 16];
        return;
    }
    let addr = base.wrapping_add(spec.offset as u64) as *const u8;
    // SAFETY: bpf_probe_read_kernel copes with any address (zero-fills `out`
    // when the read faults).
    if unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_buf(addr, out) }.is_err() {
        bump(stat::READ_ERRORS);
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
    /// The cookie may be asked of the kernel (`bpf_get_socket_cookie` on
    /// the hook's typed pointer); false: only `skc_cookie` as it is.
    const COOKIE_HELPER: bool = true;
    /// The object's address (correlation only).
    fn addr(self) -> u64;
    fn is_null(self) -> bool;
    /// A field of up to 8 bytes (0 when absent).
    fn get(self, spec: &FieldSpec) -> u64;
    /// The object a pointer field points to (null when absent).
    fn follow(self, spec: &FieldSpec) -> Self;
    /// A 16-byte field (an IPv6 address; zeros when absent) into `out`.
    fn get16(self, spec: &FieldSpec, out: &mut [u8; 16]);
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
    #[inline(always)]
    fn get16(self, spec: &FieldSpec, out: &mut [u8; 16]) {
        read16(self.0, spec, out)
    }
}

/// A kernel address read with probe reads, for the last fallbacks: nothing
/// typed is passed to any helper, the cookie included (read as the socket
/// holds it). Otherwise [`Probe`].
#[derive(Clone, Copy)]
pub struct Plain(pub u64);

impl Source for Plain {
    const PLAIN_LOADS: bool = false;
    const COOKIE_HELPER: bool = false;
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
        Plain(read(self.0, spec))
    }
    #[inline(always)]
    fn get16(self, spec: &FieldSpec, out: &mut [u8; 16]) {
        read16(self.0, spec, out)
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
        if self.0.is_null() {
            return 0;
        }
        // SAFETY: loads from a BTF pointer are checked by the verifier and
        // cannot fault (exception-table loads).
        unsafe { load(self.0, spec) }
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
    /// Four 4-byte loads (`struct in6_addr` is a union with `__be32[4]`,
    /// so each load matches a member exactly).
    #[inline(always)]
    fn get16(self, spec: &FieldSpec, out: &mut [u8; 16]) {
        if spec.size != 16 || self.0.is_null() {
            *out = [0; 16];
            return;
        }
        let p = self.0.wrapping_add(spec.offset as usize).cast::<u32>();
        for i in 0..4 {
            // SAFETY: as in `get`; 4-byte loads inside a 16-byte member.
            let w = unsafe { core::ptr::read_volatile(p.wrapping_add(i)) };
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
}

/// A field of up to 8 bytes at `base + spec.offset` with a plain load of the
/// member's width (0 when absent).
///
/// # Safety
/// `base + spec.offset` must be readable for `spec.size` bytes (a BTF pointer
/// the verifier checks, or a buffer that holds the field).
#[inline(always)]
unsafe fn load(base: *const u8, spec: &FieldSpec) -> u64 {
    let p = base.wrapping_add(spec.offset as usize);
    // SAFETY: the caller's.
    let raw = unsafe {
        match spec.size {
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

/// A socket copied with one probe read into a scratch buffer
/// ([`KernelLayout::sock_span`] bytes from its start): its own fields are
/// plain loads from the copy, the objects it points to (`struct net`, the
/// cgroup) are probe-read as with [`Probe`].
#[derive(Clone, Copy)]
pub struct Copied {
    /// The copy (a map value holding at least `sock_span` bytes); null for
    /// an object reached through a pointer (not copied).
    buf: *const u8,
    addr: u64,
}

impl Copied {
    /// Copy `l.sock_span` bytes of the socket at `sk` into `scratch` (a
    /// per-CPU map value of [`tcpstall_common::SOCK_SCRATCH_BYTES`]); `None`
    /// when the layout has no span or the read faults.
    #[inline(always)]
    pub fn copy(l: &KernelLayout, sk: u64, scratch: *mut u8) -> Option<Self> {
        let span = l.sock_span;
        if sk == 0 || span == 0 || span > tcpstall_common::SOCK_SCRATCH_BYTES {
            return None;
        }
        // SAFETY: `scratch` holds SOCK_SCRATCH_BYTES >= span bytes;
        // bpf_probe_read_kernel copes with any source address.
        let r = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                scratch.cast(),
                span,
                sk as *const core::ffi::c_void,
            )
        };
        if r != 0 {
            bump(stat::READ_ERRORS);
            return None;
        }
        Some(Copied {
            buf: scratch,
            addr: sk,
        })
    }
}

impl Source for Copied {
    const PLAIN_LOADS: bool = true;
    #[inline(always)]
    fn addr(self) -> u64 {
        self.addr
    }
    #[inline(always)]
    fn is_null(self) -> bool {
        self.addr == 0
    }
    #[inline(always)]
    fn get(self, spec: &FieldSpec) -> u64 {
        if self.buf.is_null() {
            return read(self.addr, spec);
        }
        if spec.size == 0 {
            return 0;
        }
        // SAFETY: the copy holds every socket field (span from the layout).
        unsafe { load(self.buf, spec) }
    }
    #[inline(always)]
    fn follow(self, spec: &FieldSpec) -> Self {
        Copied {
            buf: core::ptr::null(),
            addr: self.get(spec),
        }
    }
    #[inline(always)]
    fn get16(self, spec: &FieldSpec, out: &mut [u8; 16]) {
        if self.buf.is_null() {
            return read16(self.addr, spec, out);
        }
        if spec.size != 16 {
            *out = [0; 16];
            return;
        }
        let p = self.buf.wrapping_add(spec.offset as usize).cast::<u32>();
        for i in 0..4 {
            // SAFETY: the copy holds the field.
            let w = unsafe { core::ptr::read_volatile(p.wrapping_add(i)) };
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
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
/// Every field of `out` is written once, in place (no zeroing first, no
/// copy through the stack); the keepalive block as zeros, which
/// [`fill_keepalive`] overwrites where it is called.
#[inline(always)]
pub fn fill_from<S: Source>(out: &mut SockSnapshot, l: &KernelLayout, sk: S, cookie: u64) {
    let f = &l.fields;
    let cookie = if cookie != 0 {
        cookie
    } else {
        sk.get(&f[field::SKC_COOKIE])
    };
    endpoints(out, l, sk);
    let mut flags = flag::SOCK_FIELDS;
    let net = sk.follow(&f[field::SKC_NET]);
    let (mut netns, mut retries2, mut orphan_retries, mut netns_rto_max_ms) = (0, 0, 0, 0);
    let (mut syn_retries, mut syn_linear, mut fin_timeout) = (0, 0, 0);
    if !net.is_null() {
        netns = net.get(&f[field::NET_NS_INUM]) as u32;
        retries2 = net.get(&f[field::NET_TCP_RETRIES2]) as u8;
        orphan_retries = net.get(&f[field::NET_TCP_ORPHAN_RETRIES]) as u8;
        netns_rto_max_ms = net.get(&f[field::NET_TCP_RTO_MAX_MS]) as u32;
        syn_retries = net.get(&f[field::NET_TCP_SYN_RETRIES]) as u8;
        syn_linear = net.get(&f[field::NET_TCP_SYN_LINEAR_TIMEOUTS]) as u8;
        fin_timeout = net.get(&f[field::NET_TCP_FIN_TIMEOUT]) as u32;
        flags |= flag::NETNS_SYSCTLS;
        if f[field::NET_TCP_SYN_LINEAR_TIMEOUTS].is_present() {
            flags |= flag::SYN_LINEAR;
        }
    }
    let mut cgroup_id = 0;
    let cgroup = sk.follow(&f[field::SK_CGROUP]);
    if !cgroup.is_null() {
        let kn = cgroup.follow(&f[field::CGROUP_KN]);
        cgroup_id = kn.get(&f[field::KERNFS_NODE_ID]);
    }
    if sk.get(&f[field::SK_FLAGS]) & SOCK_DEAD_BIT != 0 {
        flags |= flag::SOCK_DEAD;
    }

    if sk.get(&f[field::TP_USEC_TS]) != 0 {
        flags |= flag::USEC_TS;
    }
    out.cookie = cookie;
    out.skaddr = sk.addr();
    out.timer_expires = sk.get(&f[field::ICSK_TIMER_EXPIRES]);
    out.cgroup_id = cgroup_id;
    out.netns = netns;
    out.user_timeout_ms = sk.get(&f[field::ICSK_USER_TIMEOUT]) as u32;
    out.rto_jiffies = sk.get(&f[field::ICSK_RTO]) as u32;
    out.rto_max_jiffies = sk.get(&f[field::ICSK_RTO_MAX]) as u32;
    out.retrans_stamp = sk.get(&f[field::TP_RETRANS_STAMP]) as u32;
    out.snd_una = sk.get(&f[field::TP_SND_UNA]) as u32;
    out.snd_wnd = sk.get(&f[field::TP_SND_WND]) as u32;
    out.packets_out = sk.get(&f[field::TP_PACKETS_OUT]) as u32;
    out.retrans_out = sk.get(&f[field::TP_RETRANS_OUT]) as u32;
    out.total_retrans = sk.get(&f[field::TP_TOTAL_RETRANS]) as u32;
    out.lsndtime = sk.get(&f[field::TP_LSNDTIME]) as u32;
    out.rcv_tstamp = sk.get(&f[field::TP_RCV_TSTAMP]) as u32;
    out.netns_rto_max_ms = netns_rto_max_ms;
    out.sk_err = sk.get(&f[field::SK_ERR]) as u16;
    out.flags = flags;
    out.state = sk.get(&f[field::SKC_STATE]) as u8;
    out.retransmits = sk.get(&f[field::ICSK_RETRANSMITS]) as u8;
    out.backoff = sk.get(&f[field::ICSK_BACKOFF]) as u8;
    out.probes_out = sk.get(&f[field::ICSK_PROBES_OUT]) as u8;
    out.pending = sk.get(&f[field::ICSK_PENDING]) as u8;
    out.ca_state = sk.get(&f[field::ICSK_CA_STATE]) as u8;
    out.retries2 = retries2;
    out.orphan_retries = orphan_retries;
    out.syn_retries = sk.get(&f[field::ICSK_SYN_RETRIES]) as u8;
    out.netns_syn_retries = syn_retries;
    out.netns_syn_linear_timeouts = syn_linear;
    out.err_soft = sk.get(&f[field::SK_ERR_SOFT]) as u8;
    // cause2 (pmtu_blackhole evidence).
    out.mss_cache = sk.get(&f[field::TP_MSS_CACHE]) as u16;
    let sacked = sk.get(&f[field::TP_SACKED_OUT]);
    out.sacked_out = if sacked > 0xffff {
        0xffff
    } else {
        sacked as u16
    };
    // The keepalive block: zero here (ring-buffer memory holds an older
    // record's bytes); the keepalive-timer programs and the sweep fill it
    // afterwards (`fill_keepalive`).
    out.keepalive_time = 0;
    out.keepalive_intvl = 0;
    out.netns_keepalive_time = 0;
    out.netns_keepalive_intvl = 0;
    out.lrcvtime = 0;
    out.sk_timer_expires = 0;
    out.keepalive_probes = 0;
    out.netns_keepalive_probes = 0;
    // FIN_WAIT2: what `tcp_fin_time()` reads.
    out._reserved2 = 0;
    out.netns_fin_timeout = fin_timeout;
    out.linger2 = sk.get(&f[field::TP_LINGER2]) as i32;
    out._reserved3 = 0;
}

/// Whether the socket ever retransmitted (`tp->total_retrans`, which counts
/// SYN and FIN retransmissions too), is in an RTO or probe episode now
/// (`icsk_retransmits`, `icsk_probes_out`) or holds a soft error: a socket
/// the agent may be tracking, whose changes of state carry the full
/// snapshot. Fields the kernel lacks read 0 (no trouble seen).
#[inline(always)]
pub fn had_trouble<S: Source>(l: &KernelLayout, sk: S) -> bool {
    let f = &l.fields;
    sk.get(&f[field::TP_TOTAL_RETRANS]) != 0
        || sk.get(&f[field::ICSK_RETRANSMITS]) != 0
        || sk.get(&f[field::ICSK_PROBES_OUT]) != 0
        || sk.get(&f[field::SK_ERR_SOFT]) != 0
}

/// Whether `sk_err` is set (a reset, or an error the application has not
/// read yet).
#[inline(always)]
pub fn has_error<S: Source>(l: &KernelLayout, sk: S) -> bool {
    sk.get(&l.fields[field::SK_ERR]) != 0
}

/// A brief snapshot: which socket (cookie, address, endpoints) and `sk_err`;
/// every other field 0 and no `flag::SOCK_FIELDS` or `flag::NETNS_SYSCTLS`
/// (the agent decodes "socket fields not read"). For the changes of state of
/// sockets without trouble ([`had_trouble`]), which the agent only needs to
/// end or re-state a flow it tracks. The state is the caller's to write (the
/// tracepoint's new state: `skc_state` still holds the old one when the
/// state tracepoint fires). Every other field of `out` is written.
#[inline(always)]
pub fn fill_brief<S: Source>(out: &mut SockSnapshot, l: &KernelLayout, sk: S, cookie: u64) {
    let f = &l.fields;
    *out = SockSnapshot::zeroed();
    out.cookie = if cookie != 0 {
        cookie
    } else {
        sk.get(&f[field::SKC_COOKIE])
    };
    out.skaddr = sk.addr();
    endpoints(out, l, sk);
    out.sk_err = sk.get(&f[field::SK_ERR]) as u16;
}

/// The snapshot's keepalive block (issue 20, item 2) and `flag::KEEPOPEN`:
/// what `tcp_keepalive_timer()` reads. Only the keepalive-timer programs and
/// the sweep call it (after [`fill_from`]), so no other program pays for it
/// in instructions the verifier walks; every other event leaves it zero.
#[inline(always)]
pub fn fill_keepalive<S: Source>(out: &mut SockSnapshot, l: &KernelLayout, sk: S) {
    let f = &l.fields;
    let net = sk.follow(&f[field::SKC_NET]);
    if !net.is_null() {
        out.netns_keepalive_time = net.get(&f[field::NET_TCP_KEEPALIVE_TIME]) as u32;
        out.netns_keepalive_intvl = net.get(&f[field::NET_TCP_KEEPALIVE_INTVL]) as u32;
        out.netns_keepalive_probes = net.get(&f[field::NET_TCP_KEEPALIVE_PROBES]) as u8;
    }
    if sk.get(&f[field::SK_FLAGS]) & SOCK_KEEPOPEN_BIT != 0 {
        out.flags |= flag::KEEPOPEN;
    }
    out.keepalive_time = sk.get(&f[field::TP_KEEPALIVE_TIME]) as u32;
    out.keepalive_intvl = sk.get(&f[field::TP_KEEPALIVE_INTVL]) as u32;
    out.lrcvtime = sk.get(&f[field::ICSK_ACK_LRCVTIME]) as u32;
    out.sk_timer_expires = sk.get(&f[field::SK_TIMER_EXPIRES]) as u32;
    out.keepalive_probes = sk.get(&f[field::TP_KEEPALIVE_PROBES]) as u8;
}

/// A timewait socket (`struct inet_timewait_sock` at `tw`): what its
/// `struct sock_common` holds (cookie, endpoints, the namespace's inode,
/// read at the same offsets as a full socket's: both structs begin with
/// it) and `tw_substate` as the state; every other field 0, no
/// `flag::SOCK_FIELDS` (nothing of `struct sock` beyond `sock_common` is
/// read: a timewait socket is smaller). Every field of `out` is written.
#[inline(always)]
pub fn fill_timewait<S: Source>(out: &mut SockSnapshot, l: &KernelLayout, tw: S) {
    let f = &l.fields;
    *out = SockSnapshot::zeroed();
    out.cookie = tw.get(&f[field::SKC_COOKIE]);
    out.skaddr = tw.addr();
    endpoints(out, l, tw);
    let net = tw.follow(&f[field::SKC_NET]);
    if !net.is_null() {
        out.netns = net.get(&f[field::NET_NS_INUM]) as u32;
        out.netns_fin_timeout = net.get(&f[field::NET_TCP_FIN_TIMEOUT]) as u32;
    }
    out.state = tw.get(&f[field::TW_SUBSTATE]) as u8;
}

/// The family, addresses and ports of `out`.
#[inline(always)]
fn endpoints<S: Source>(out: &mut SockSnapshot, l: &KernelLayout, sk: S) {
    let f = &l.fields;
    let family = sk.get(&f[field::SKC_FAMILY]) as u32;
    let mut sport = sk.get(&f[field::SKC_NUM]) as u16;
    if sport == 0 {
        // Released already (the final CLOSE): inet_sport still holds it.
        sport = u16::from_be(sk.get(&f[field::INET_SPORT]) as u16);
    }
    if family == AF_INET6 {
        sk.get16(&f[field::SKC_V6_RCV_SADDR], &mut out.saddr);
        sk.get16(&f[field::SKC_V6_DADDR], &mut out.daddr);
    } else {
        out.saddr = v4(sk.get(&f[field::SKC_RCV_SADDR]) as u32);
        out.daddr = v4(sk.get(&f[field::SKC_DADDR]) as u32);
    }
    out.sport = sport;
    out.dport = u16::from_be(sk.get(&f[field::SKC_DPORT]) as u16);
    out.family = family as u8;
}

/// An IPv4 address (network order as loaded) in the 16-byte slot.
#[inline(always)]
fn v4(a: u32) -> [u8; 16] {
    let b = a.to_ne_bytes();
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}
