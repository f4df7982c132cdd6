//! The guard: a cgroup `sock_ops` program that arms the timeouts an
//! application left unset, per the rule the agent put in [`RULES`] for the
//! socket's cgroup.
//!
//! Runs at `ACTIVE_ESTABLISHED_CB` (connect completed) and
//! `PASSIVE_ESTABLISHED_CB` (accepted), never at `TCP_CONNECT_CB`: at
//! establishment an application that set its own values before connect (or
//! on its listener, inherited by accepted sockets) is seen and kept, one that
//! sets them later overwrites ours (last writer wins); the connect itself is
//! bounded by `tcp_syn_retries` and the client's own connect timeout.
//!
//! What the socket holds is read from its fields (`icsk_user_timeout`,
//! `SOCK_KEEPOPEN`, `keepalive_time`/`_intvl`/`_probes`: 0 = unset), not with
//! `bpf_getsockopt`, whose `SOL_TCP` options before 6.2 are only
//! `TCP_CONGESTION` and `TCP_SAVED_SYN`. Only unset values are filled
//! (`bpf_setsockopt`, 5.9+ for these options); with keepalive already on, the
//! application's keepalive settings are its own and left alone.
//!
//! Dry-run rules change nothing and report the same record. Every socket a
//! rule matched gets one [`GuardRecord`] in [`SOCKETS`] (keyed by cookie),
//! which the agent consumes.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
        generated::bpf_setsockopt,
    },
    macros::{map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::SockOpsContext,
};
use tcpstall_common::{
    KernelLayout, field,
    guard::{self, GuardRecord, GuardRule, action, rule_flag},
};

use crate::snapshot::SOCK_KEEPOPEN_BIT;
use crate::{AF_INET, AF_INET6, Direct, Plain, Skip, Source, layout, now, ops_field};

#[map(name = "TCPSTALL_GUARD_RULES")]
static RULES: HashMap<u64, GuardRule> = HashMap::with_max_entries(guard::MAX_RULES, 0);

#[map(name = "TCPSTALL_GUARD_SOCKETS")]
static SOCKETS: LruHashMap<u64, GuardRecord> = LruHashMap::with_max_entries(guard::MAX_SOCKETS, 0);

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;

/// The socket through the typed `tcp_sock` (`bpf_skc_to_tcp_sock` on the
/// context's `sk`), plain loads.
#[sock_ops]
pub fn tcpstall_guard_direct(ctx: SockOpsContext) -> u32 {
    let _ = try_guard::<true>(&ctx);
    1
}

/// The last fallback: the socket's address probe-read from the kernel's
/// context (`struct bpf_sock_ops_kern`, whose first member is `sk`; checked
/// against BTF by the agent), its fields probe-read; no socket pointer
/// passed to any helper.
#[sock_ops]
pub fn tcpstall_guard_plain(ctx: SockOpsContext) -> u32 {
    let _ = try_guard::<false>(&ctx);
    1
}

#[inline(always)]
fn try_guard<const DIRECT: bool>(ctx: &SockOpsContext) -> Result<(), Skip> {
    // SAFETY: the context of a sock_ops program.
    let ops = unsafe { &*ctx.ops };
    let op = ops_field(&ops.op);
    let passive = op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !passive {
        return Err(Skip);
    }
    let l = layout()?;
    if DIRECT {
        // SAFETY: an 8-byte context load of `sk` (a full socket here).
        let sk = unsafe { core::ptr::read_volatile(&ops.__bindgen_anon_2.sk) };
        if sk.is_null() {
            return Err(Skip);
        }
        // SAFETY: `sk` is the context's socket pointer, checked non-null.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
        if tp.is_null() {
            return Err(Skip);
        }
        guard_socket(ctx, l, Direct(tp as *const u8), passive)
    } else {
        // SAFETY: a probe read (copes with any address) of the kernel
        // context's first member.
        let sk = unsafe { bpf_probe_read_kernel(ctx.ops as *const u64) }.map_err(|_| Skip)?;
        if sk == 0 {
            return Err(Skip);
        }
        guard_socket(ctx, l, Plain(sk), passive)
    }
}

#[inline(always)]
fn set(ctx: &SockOpsContext, level: i32, name: i32, value: u32, err: &mut i32) {
    let mut v = value as i32;
    // SAFETY: the sock_ops context and a 4-byte value on the stack.
    let r = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            level,
            name,
            (&mut v as *mut i32).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    };
    if r != 0 && *err == 0 {
        *err = r as i32;
    }
}

#[inline(always)]
fn guard_socket<S: Source>(
    ctx: &SockOpsContext,
    l: &KernelLayout,
    sk: S,
    passive: bool,
) -> Result<(), Skip> {
    let f = &l.fields;
    let cgroup = sk.follow(&f[field::SK_CGROUP]);
    if cgroup.is_null() {
        return Err(Skip);
    }
    let cgroup_id = cgroup
        .follow(&f[field::CGROUP_KN])
        .get(&f[field::KERNFS_NODE_ID]);
    // SAFETY: a lookup by value; the rule is copied at once.
    let rule = *unsafe { RULES.get(&cgroup_id) }.ok_or(Skip)?;
    let enforce = rule.flags & rule_flag::ENFORCE != 0;
    let found_user_timeout = sk.get(&f[field::ICSK_USER_TIMEOUT]) as u32;
    let mut actions = if passive { action::PASSIVE } else { 0 };
    if enforce {
        actions |= action::ENFORCED;
    }
    let mut err = 0i32;
    if rule.user_timeout_ms != 0 {
        if found_user_timeout != 0 {
            actions |= action::KEPT_USER_TIMEOUT;
        } else {
            actions |= action::USER_TIMEOUT;
            if enforce {
                set(
                    ctx,
                    SOL_TCP,
                    TCP_USER_TIMEOUT,
                    rule.user_timeout_ms,
                    &mut err,
                );
            }
        }
    }
    let (mut idle, mut intvl, mut cnt) = (0, 0, 0);
    if rule.flags & rule_flag::KEEPALIVE != 0 {
        if sk.get(&f[field::SK_FLAGS]) & SOCK_KEEPOPEN_BIT != 0 {
            actions |= action::KEPT_KEEPALIVE;
        } else {
            // The timings first: SO_KEEPALIVE arms the timer with them.
            if rule.keepidle_s != 0 && sk.get(&f[field::TP_KEEPALIVE_TIME]) == 0 {
                actions |= action::KEEPIDLE;
                idle = rule.keepidle_s;
                if enforce {
                    set(ctx, SOL_TCP, TCP_KEEPIDLE, idle, &mut err);
                }
            }
            if rule.keepintvl_s != 0 && sk.get(&f[field::TP_KEEPALIVE_INTVL]) == 0 {
                actions |= action::KEEPINTVL;
                intvl = rule.keepintvl_s;
                if enforce {
                    set(ctx, SOL_TCP, TCP_KEEPINTVL, intvl, &mut err);
                }
            }
            if rule.keepcnt != 0 && sk.get(&f[field::TP_KEEPALIVE_PROBES]) == 0 {
                actions |= action::KEEPCNT;
                cnt = rule.keepcnt;
                if enforce {
                    set(ctx, SOL_TCP, TCP_KEEPCNT, cnt, &mut err);
                }
            }
            actions |= action::KEEPALIVE;
            if enforce {
                set(ctx, SOL_SOCKET, SO_KEEPALIVE, 1, &mut err);
            }
        }
    }
    if err != 0 {
        actions |= action::FAILED;
    }
    // SAFETY: sock_ops programs may ask for their socket's cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context of a sock_ops program.
    let ops = unsafe { &*ctx.ops };
    let family = ops_field(&ops.family);
    let mut rec = GuardRecord::zeroed();
    if family == AF_INET6 {
        for i in 0..4 {
            let s = ops_field(&ops.local_ip6[i]).to_ne_bytes();
            let d = ops_field(&ops.remote_ip6[i]).to_ne_bytes();
            rec.saddr[i * 4..i * 4 + 4].copy_from_slice(&s);
            rec.daddr[i * 4..i * 4 + 4].copy_from_slice(&d);
        }
    } else if family == AF_INET {
        rec.saddr[..4].copy_from_slice(&ops_field(&ops.local_ip4).to_ne_bytes());
        rec.daddr[..4].copy_from_slice(&ops_field(&ops.remote_ip4).to_ne_bytes());
    }
    let net = sk.follow(&f[field::SKC_NET]);
    rec.cookie = cookie;
    rec.cgroup_id = cgroup_id;
    rec.ts_ns = now().0;
    rec.rule = rule.rule;
    rec.actions = actions;
    rec.found_user_timeout_ms = found_user_timeout;
    rec.user_timeout_ms = if actions & action::USER_TIMEOUT != 0 {
        rule.user_timeout_ms
    } else {
        0
    };
    rec.keepidle_s = idle;
    rec.keepintvl_s = intvl;
    rec.keepcnt = cnt;
    rec.error = err;
    rec.netns = if net.is_null() {
        0
    } else {
        net.get(&f[field::NET_NS_INUM]) as u32
    };
    rec.family = family as u16;
    rec.sport = ops_field(&ops.local_port) as u16;
    rec.dport = u16::from_be((ops_field(&ops.remote_port) >> 16) as u16);
    let _ = SOCKETS.insert(&cookie, &rec, 0);
    Ok(())
}
