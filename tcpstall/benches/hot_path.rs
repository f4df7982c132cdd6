//! Hot-path benchmarks of the agent (criterion; `cargo bench -p tcpstall`,
//! `cargo xtask bench`).
//!
//! - `decode`: ring-buffer record -> `SockEvent`.
//! - `engine_ingest_healthy`: a busy node's churn of short connections.
//! - `engine_ingest_stalls`: 1,000 blackholed flows (the S1 pattern) with the
//!   daemon's 1 s ticks; the cost of one tick with 1,000 stalled flows.
//! - `engine_stalls_query`: what a /metrics scrape or an API call costs with
//!   1,000 stalled flows among 65,536 tracked.
//! - `engine_full_table`: new flows into a full table (LRU eviction) against
//!   the same inserts into a table with room.
//! - `btf_resolve`: start-up cost (parse `/sys/kernel/btf/vmlinux`, resolve
//!   the kernel field layout).
//!
//! Before the benchmarks, the memory a tracked flow costs is printed to
//! stderr (live heap bytes counted by the allocator and the RSS difference
//! while 65,536 flows are filled in).
//!
//! Event sequences follow the kernel as the engine tests model it (HZ 250,
//! loss probe first, RTO doubling, timer-wheel rounding, 6.10+ close order).
//! Engines driven by `iter_custom` persist across iterations, so they are
//! measured warm, in a steady state; building each iteration's events is
//! not timed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tcpstall::engine::horizon::{self, BoundaryRule};
use tcpstall::engine::testkit::{
    HZ, MS, S, Sock, T0, jiffies_at, ms_stamp, sysctls, ts_of_jiffies,
};
use tcpstall::engine::{Engine, EngineConfig};
use tcpstall::kernel::btf::Btf;
use tcpstall::kernel::event::{EventKind, SockEvent, TcpState};
use tcpstall::kernel::{facts, layout};
use tcpstall_common::{EVENT_SIZE, Event, flag, kind, source};

// ----- heap accounting ------------------------------------------------------

/// The system allocator, counting live heap bytes (one relaxed atomic add
/// per allocation; the engine's hot path allocates next to nothing).
struct CountingAlloc;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to `System` unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        LIVE_BYTES.fetch_sub(l.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Resident set size from /proc/self/statm (bytes).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("/proc/self/statm: resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4_096)
}

// ----- time and sockets (the engine tests' builders, engine::testkit) -----

const US: u64 = 1_000;
/// Flow table size of the production default.
const MAX_FLOWS: usize = 65_536;
/// Kernel addresses of `struct sock`: unique per cookie (`Sock::new`), except
/// in the healthy churn, where every socket closes and the slab reuses its
/// address (`SKADDR_SLAB` slots).
const SKADDR_BASE: u64 = 0xffff_8880_0000_0000;
const SKADDR_SLAB: u64 = 1 << 16;

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        hz: Some(HZ),
        ..EngineConfig::default()
    }
}

/// splitmix64: deterministic streams.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1_000) < per_mille
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
}

/// The node's own address.
fn node(port: u16) -> SocketAddr {
    v4(10, 0, 0, 1, port)
}

/// One of `n` backends this node calls.
fn backend(i: u64) -> SocketAddr {
    v4(10, 1, (i / 250) as u8, (i % 250) as u8 + 1, 443)
}

/// Sorts a stream by time, keeping each socket's own order (stable). Sorts
/// (time, index) pairs: moving the events themselves is what a sort of
/// 50,000 of them would spend its time on.
fn by_time(v: Vec<SockEvent>) -> Vec<SockEvent> {
    let mut order: Vec<(u64, u32)> = v
        .iter()
        .enumerate()
        .map(|(i, e)| (e.ts_ns, i as u32))
        .collect();
    order.sort_unstable();
    order.iter().map(|&(_, i)| v[i as usize].clone()).collect()
}

// ----- the daemon's loop ----------------------------------------------------

/// Observations handed to the metrics side: drained after every ring-buffer
/// batch and tick, as the daemon does.
fn drain(e: &mut Engine) {
    for o in e.drain_observations() {
        black_box(o);
    }
}

/// Ring-buffer batch size (the reader's `Vec::with_capacity(1024)`).
const BATCH: usize = 1_024;

/// Feeds `events` as the daemon would: a tick every simulated second,
/// observations drained after every batch.
fn drive(e: &mut Engine, events: &[SockEvent], next_tick: &mut u64) {
    for chunk in events.chunks(BATCH) {
        for ev in chunk {
            while ev.ts_ns >= *next_tick {
                e.tick(*next_tick);
                *next_tick += S;
            }
            e.ingest(ev);
        }
        drain(e);
    }
}

/// Ticks up to and including `until`.
fn tick_until(e: &mut Engine, next_tick: &mut u64, until: u64) {
    while *next_tick <= until {
        e.tick(*next_tick);
        *next_tick += S;
        drain(e);
    }
}

// ----- generators -----------------------------------------------------------

/// A busy node: connections open and close at `rate` per second, 60 % of them
/// outgoing (to 200 backends), 40 % incoming (from 4,096 client addresses).
/// Per connection: 2 % refused (outgoing), 1 % reset, 5 % see a loss probe,
/// 1.5 % a fast retransmit, 1 % one RTO, all of which recover.
struct Healthy {
    rng: Rng,
    next_cookie: u64,
    /// Start of the next stream.
    t: u64,
}

impl Healthy {
    fn new(seed: u64, first_cookie: u64, t: u64) -> Self {
        Self {
            rng: Rng(seed),
            next_cookie: first_cookie,
            t,
        }
    }

    /// `flows` connections; returns the events in time order.
    fn stream(&mut self, flows: u64, rate: u64) -> Vec<SockEvent> {
        use TcpState::*;
        let spacing = S / rate;
        let mut out = Vec::with_capacity(flows as usize * 6);
        let mut last = self.t;
        for i in 0..flows {
            let r = &mut self.rng;
            let cookie = self.next_cookie;
            self.next_cookie += 1;
            let start = self.t + i * spacing + r.below(spacing);
            let rtt = 200 * US + r.below(5 * MS);
            let life = match r.below(100) {
                0..50 => 5 * MS + r.below(45 * MS),
                50..85 => 50 * MS + r.below(450 * MS),
                _ => 500 * MS + r.below(2_500 * MS),
            };
            let netns = 4_026_532_000 + r.below(32) as u32;
            let outgoing = r.chance(600);
            let mut s = if outgoing {
                let port = 32_768 + (cookie % 28_000) as u16;
                Sock::between(cookie, node(port), backend(r.below(200)), netns)
            } else {
                let c = r.below(4_096);
                let client = v4(
                    10,
                    2,
                    (c / 256) as u8,
                    (c % 256) as u8,
                    32_768 + r.below(28_000) as u16,
                );
                Sock::between(cookie, node(8_080), client, netns)
            };
            // Reused by the slab 65,536 connections later, long closed.
            s.skaddr = SKADDR_BASE + (cookie % SKADDR_SLAB) * 0x1000;
            let est = start + rtt;
            if outgoing {
                out.push(s.state(start, Close, SynSent));
                if r.chance(20) {
                    // ECONNREFUSED: CLOSE, then the report (6.10+ order).
                    out.push(s.state(est, SynSent, Close));
                    out.push(s.error(est + 2 * US, 111));
                    last = last.max(est + 2 * US);
                    continue;
                }
                out.push(s.state(est, SynSent, Established));
            } else {
                out.push(s.state(start, Listen, SynRecv));
                out.push(s.state(est, SynRecv, Established));
            }
            let mut end = est + life;
            let loss = r.below(1_000);
            if loss < 50 {
                // A loss probe, maybe a fast retransmit and one RTO in the
                // same episode; ACKs then flow again (no event: the streak
                // ends at FIN_WAIT2, at close or when its expiry is overdue).
                let tlp = est + life / 2;
                out.push(s.retransmit(tlp, 5, 0, 0, 51, s.snd_una, 0));
                let stamp = ms_stamp(tlp);
                let mut t = tlp;
                if loss < 15 {
                    t = tlp + rtt;
                    out.push(s.retransmit(t, 1, 0, stamp, 51, s.snd_una, 0));
                }
                if loss < 10 {
                    t = tlp + 204 * MS;
                    out.push(s.rto(t, 0, stamp, 51, s.snd_una));
                    out.push(s.retransmit(t + 5 * US, 0, 1, stamp, 51, s.snd_una, 1));
                    t += 5 * US;
                }
                end = end.max(t + 2 * rtt);
            }
            if r.chance(10) {
                // ECONNRESET.
                out.push(s.state(end, Established, Close));
                out.push(s.error(end + 2 * US, 104));
                last = last.max(end + 2 * US);
                continue;
            }
            let fin = if outgoing {
                out.push(s.state(end, Established, FinWait1));
                out.push(s.state(end + rtt, FinWait1, FinWait2));
                let t = end + rtt + 50 * US + r.below(MS);
                out.push(s.state(t, FinWait2, Close));
                t
            } else {
                out.push(s.state(end, Established, CloseWait));
                let t = end + 50 * US + r.below(2 * MS);
                out.push(s.state(t, CloseWait, LastAck));
                out.push(s.state(t + rtt, LastAck, Close));
                t + rtt
            };
            last = last.max(fin);
        }
        self.t = last + MS;
        by_time(out)
    }
}

/// Kernel-faithful blackhole (S1): the first send at `send_ts`, a loss probe,
/// then RTOs with exponential backoff and timer-wheel rounding until
/// `tcp_write_timeout()` kills the socket (retries2 5: ~13.4 s), then CLOSE and
/// the ETIMEDOUT report (6.10+ order). Timer events and retransmissions as a
/// 6.7+ kernel reports them.
fn blackhole(s: &Sock, send_ts: u64, out: &mut Vec<SockEvent>) -> u64 {
    let rto_max = 120 * u64::from(HZ);
    let max_ms = horizon::jiffies_to_msecs(rto_max, HZ);
    let rule = BoundaryRule::select(0, false, false, s.sysctls).expect("sysctls set");
    let boundary_ms = |rto_j: u64| {
        rule.at(horizon::jiffies_to_msecs(rto_j, HZ), max_ms, 200)
            .ms
    };
    let mut j = jiffies_at(HZ, send_ts);
    let (mut r, mut backoff, mut rto) = (0u32, 0u32, 51u64);
    let jt = horizon::timer_wheel_fire(j + u64::from(HZ) / 5, j, HZ);
    let tlp_ts = ts_of_jiffies(HZ, jt);
    let mut e = s.retransmit(tlp_ts, 5, 0, 0, 51, s.snd_una, 0);
    e.rto_jiffies = rto as u32;
    out.push(e);
    let stamp = tlp_ts / MS;
    j = jt;
    let mut next = horizon::timer_wheel_fire(j + rto, j, HZ);
    loop {
        j = next;
        let ts = ts_of_jiffies(HZ, j);
        let mut e = s.rto(ts, r, stamp as u32, rto as u32, s.snd_una);
        e.sock.as_mut().expect("fields").backoff = backoff;
        e.jiffies = j;
        out.push(e);
        if r > 0 && ts / MS - stamp >= boundary_ms(rto) {
            let death = ts + 20 * US;
            out.push(s.state(death, TcpState::Established, TcpState::Close));
            out.push(s.error(death + US, 110));
            return death + US;
        }
        r += 1;
        let mut e = s.retransmit(ts + 5 * US, 0, r, stamp as u32, 51, s.snd_una, r);
        e.rto_jiffies = rto as u32;
        e.sock.as_mut().expect("fields").backoff = backoff;
        e.jiffies = j;
        out.push(e);
        backoff += 1;
        rto = (rto * 2).min(rto_max);
        next = horizon::timer_wheel_fire(j + rto, j, HZ);
    }
}

/// `n` blackholed flows (cookies from `first_cookie`) to 10 backends, their
/// first sends 1 ms apart from `t`, in time order; and the last death.
fn blackholes(n: u64, first_cookie: u64, t: u64) -> (Vec<SockEvent>, u64) {
    let mut out = Vec::with_capacity(n as usize * 18);
    let mut last = t;
    for i in 0..n {
        let cookie = first_cookie + i;
        let s = Sock {
            sysctls: Some(sysctls(5)),
            ..Sock::between(
                cookie,
                node(32_768 + (cookie % 28_000) as u16),
                backend(i % 10),
                4_026_532_000,
            )
        };
        last = last.max(blackhole(&s, t + i * MS, &mut out));
    }
    (by_time(out), last)
}

/// `n` flows (cookies from `first_cookie`) that each see one loss probe and
/// recover, created at `rate` per second from `t` with the daemon's ticks;
/// all idle afterwards. Returns the time after the last tick.
fn fill_idle(
    e: &mut Engine,
    n: u64,
    first_cookie: u64,
    t: u64,
    rate: u64,
    next_tick: &mut u64,
) -> u64 {
    let spacing = S / rate;
    let mut rng = Rng(first_cookie);
    let mut batch = Vec::with_capacity(BATCH);
    let mut last = t;
    for i in 0..n {
        let cookie = first_cookie + i;
        let s = Sock::between(
            cookie,
            node(32_768 + (cookie % 28_000) as u16),
            backend(rng.below(256)),
            4_026_532_000 + (i % 32) as u32,
        );
        last = t + i * spacing;
        batch.push(s.retransmit(last, 5, 0, 0, 51, s.snd_una, 0));
        if batch.len() == BATCH {
            drive(e, &batch, next_tick);
            batch.clear();
        }
    }
    drive(e, &batch, next_tick);
    // Loss-probe streaks end (recovered) once their expiry is overdue.
    let done = last + 5 * S;
    tick_until(e, next_tick, done);
    done
}

// ----- 1. decode ------------------------------------------------------------

fn raw_bytes(ev: &Event) -> [u8; EVENT_SIZE] {
    // SAFETY: `Event` is `repr(C)` plain old data without padding (its size is
    // asserted to be EVENT_SIZE by tcpstall-common).
    unsafe { std::ptr::read_unaligned((ev as *const Event).cast::<[u8; EVENT_SIZE]>()) }
}

/// A record as the tp_btf retransmit program writes it.
fn raw_retransmit(i: u64) -> Event {
    let mut ev = Event::zeroed();
    ev.ts_ns = T0 + i * 37 * US;
    ev.jiffies = jiffies_at(HZ, ev.ts_ns);
    ev.sock.cookie = 100_000 + i;
    ev.sock.skaddr = 0xffff_8880_1234_0000 + i * 0x1000;
    ev.sock.timer_expires = ev.jiffies + 51;
    ev.kind = kind::RETRANSMIT;
    ev.source = source::TP_BTF;
    ev.sock.flags = flag::SOCK_FIELDS | flag::NETNS_SYSCTLS | flag::USEC_TS;
    ev.sock.netns = 4_026_532_008;
    ev.sock.family = 2;
    ev.sock.state = 1;
    ev.sock.sport = 40_000 + (i % 20_000) as u16;
    ev.sock.dport = 443;
    ev.sock.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
    ev.sock.daddr[..4].copy_from_slice(&[10, 1, 0, (i % 250) as u8 + 1]);
    ev.sock.retransmits = 1;
    ev.sock.backoff = 1;
    ev.sock.pending = 1;
    ev.sock.rto_jiffies = 102;
    ev.sock.retrans_stamp = 3_600_000_123;
    ev.sock.snd_una = 1_000_000;
    ev.sock.snd_wnd = 65_535;
    ev.sock.packets_out = 10;
    ev.sock.retrans_out = 1;
    ev.sock.total_retrans = 3;
    ev.sock.lsndtime = ev.jiffies as u32;
    ev.sock.rcv_tstamp = ev.jiffies as u32 - 60;
    ev.sock.retries2 = 15;
    ev.sock.orphan_retries = 0;
    ev
}

/// A mixed ring-buffer batch: 60 % state changes (no socket fields), 25 %
/// retransmissions, 10 % write-timer expiries, 5 % error reports; 80 % IPv4,
/// 10 % IPv6, 10 % v4-mapped IPv6.
fn raw_batch(n: u64) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(n as usize * EVENT_SIZE);
    for i in 0..n {
        let mut ev = raw_retransmit(i);
        match rng.below(100) {
            0..60 => {
                ev.kind = kind::STATE;
                ev.sock.flags = 0;
                ev.old_state = 2;
                ev.sock.state = 1;
            }
            60..85 => {}
            85..95 => ev.kind = kind::WRITE_TIMER,
            _ => {
                ev.kind = kind::ERROR_REPORT;
                ev.sock.flags = 0;
                ev.sock.sk_err = 104;
            }
        }
        match rng.below(10) {
            0 => {
                ev.sock.family = 10;
                ev.sock.saddr = "fd00::1".parse::<Ipv6Addr>().expect("v6").octets();
                ev.sock.daddr = "fd00:1::7".parse::<Ipv6Addr>().expect("v6").octets();
            }
            1 => {
                ev.sock.family = 10;
                ev.sock.saddr = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
                ev.sock.daddr = Ipv4Addr::new(10, 1, 0, 9).to_ipv6_mapped().octets();
            }
            _ => {}
        }
        out.extend_from_slice(&raw_bytes(&ev));
    }
    out
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    let one = raw_bytes(&raw_retransmit(1));
    assert!(SockEvent::decode(&one).is_ok(), "the sample record decodes");
    g.throughput(Throughput::Elements(1));
    g.bench_function("retransmit_ipv4", |b| {
        b.iter(|| SockEvent::decode(black_box(&one[..])))
    });
    const N: u64 = 1_024;
    let batch = raw_batch(N);
    assert!(
        batch
            .chunks(EVENT_SIZE)
            .all(|r| SockEvent::decode(r).is_ok())
    );
    let mut out: Vec<SockEvent> = Vec::with_capacity(N as usize);
    g.throughput(Throughput::Elements(N));
    g.bench_function("mixed_batch_1024", |b| {
        b.iter(|| {
            out.clear();
            for rec in black_box(&batch[..]).chunks_exact(EVENT_SIZE) {
                if let Ok(ev) = SockEvent::decode(rec) {
                    out.push(ev);
                }
            }
            black_box(out.len())
        })
    });
    g.finish();
}

// ----- 2. healthy churn -------------------------------------------------------

fn bench_healthy(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_ingest_healthy");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    // HZ known (CONFIG_HZ readable: the usual case) ...
    healthy_case(&mut g, "10k_flows_churn", engine_cfg());
    // ... and not: the engine calibrates HZ from every event's (ts, jiffies).
    let calibrating = EngineConfig {
        hz: None,
        ..engine_cfg()
    };
    healthy_case(&mut g, "10k_flows_churn_hz_calibrating", calibrating);
    g.finish();
}

fn healthy_case(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    cfg: EngineConfig,
) {
    const FLOWS: u64 = 10_000;
    const RATE: u64 = 10_000;
    let mut e = Engine::new(cfg).expect("config");
    let mut gen_ = Healthy::new(42, 1, T0);
    let mut next_tick = T0 + S;
    // Warm: tables, the closed-flow ring (4,096) and the remote counters.
    for _ in 0..3 {
        let ev = gen_.stream(FLOWS, RATE);
        drive(&mut e, &ev, &mut next_tick);
    }
    let sample = gen_.stream(FLOWS, RATE);
    let per_stream = sample.len() as u64;
    drive(&mut e, &sample, &mut next_tick);
    // Each iteration's count varies by well under 1 % around this one.
    g.throughput(Throughput::Elements(per_stream));
    let mut ran = false;
    g.bench_function(name, |b| {
        ran = true;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let ev = gen_.stream(FLOWS, RATE);
                let t = Instant::now();
                drive(&mut e, &ev, &mut next_tick);
                total += t.elapsed();
            }
            total
        })
    });
    if !ran {
        return;
    }
    let st = e.stats();
    eprintln!(
        "engine_ingest_healthy/{name}: {FLOWS} connections -> {per_stream} events per iteration \
         ({:.1} per connection); after the run: {} events, {} flows created, {} tracked, \
         {} remotes, {} recently closed, {} streaks (recovered {}, closed {}), {} stalls, HZ {} ({})",
        per_stream as f64 / FLOWS as f64,
        st.events,
        st.flows_created,
        st.flows_tracked,
        st.remotes_tracked,
        st.recently_closed,
        st.streaks_started,
        st.streaks_recovered,
        st.streaks_closed,
        st.stalls_started,
        st.hz,
        st.hz_source.as_str(),
    );
}

// ----- 3. blackholed flows + ticks --------------------------------------------

/// 64,536 idle flows and 1,000 blackholed ones that are mid-streak (stalled,
/// nothing overdue) at the returned instant.
fn stalled_engine() -> (Engine, u64) {
    let mut e = Engine::new(engine_cfg()).expect("config");
    let mut next_tick = T0 + S;
    let idle = (MAX_FLOWS - 1_000) as u64;
    let t = fill_idle(&mut e, idle, 1, T0, 20_000, &mut next_tick);
    let start = t + 10 * S;
    let (ev, _) = blackholes(1_000, 10_000_000, start);
    // The last flow's first send is 999 ms after the first: 3 s after that
    // every flow is at its 3rd or 4th RTO.
    let now = start + 999 * MS + 3 * S;
    let upto = ev.partition_point(|e| e.ts_ns <= now);
    drive(&mut e, &ev[..upto], &mut next_tick);
    tick_until(&mut e, &mut next_tick, now);
    let g = e.gauges(now);
    assert_eq!(g.flows_tracked, MAX_FLOWS, "fixture: table size");
    assert_eq!(g.stalled.total(), 1_000, "fixture: stalled flows");
    assert_eq!(e.stats().flows_active, 1_000, "fixture: active flows");
    (e, now)
}

fn bench_stalls(c: &mut Criterion) {
    const FLOWS: u64 = 1_000;
    let mut g = c.benchmark_group("engine_ingest_stalls");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));

    let mut e = Engine::new(engine_cfg()).expect("config");
    let mut cookie = 1;
    let mut t = T0;
    let mut next_tick = T0 + S;
    // One iteration: the whole life of 1,000 blackholed flows, with the
    // daemon's ticks until their closes are settled. Returns the time, the
    // events and the ticks.
    let mut run = |e: &mut Engine| -> (Duration, usize, u64) {
        let (ev, death) = blackholes(FLOWS, cookie, t);
        cookie += FLOWS;
        let first_tick = next_tick;
        let start = Instant::now();
        drive(e, &ev, &mut next_tick);
        tick_until(e, &mut next_tick, death + 3 * S);
        let d = start.elapsed();
        t = next_tick + 500 * MS;
        (d, ev.len(), (next_tick - first_tick) / S)
    };
    let (_, n, ticks) = run(&mut e);
    let st = e.stats();
    assert_eq!(st.timeouts, FLOWS, "every blackholed flow times out");
    assert_eq!(st.timeouts_predicted, FLOWS, "and each was predicted");
    eprintln!(
        "engine_ingest_stalls: {FLOWS} blackholed flows (retries2 5, ~13.4 s each) -> {n} events and {ticks} ticks per iteration; mean |prediction error| {:.4} s",
        st.mean_abs_prediction_error_s.unwrap_or(f64::NAN)
    );
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("1000_blackholed_with_ticks", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run(&mut e).0).sum())
    });
    g.finish();

    // One daemon tick with 1,000 stalled flows among 65,536 tracked (tick
    // walks the active flows only; nothing is overdue, so it is repeatable).
    let (mut e, now) = stalled_engine();
    let mut g = c.benchmark_group("engine_ingest_stalls");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("tick_1000_stalled_of_65536", |b| {
        b.iter(|| e.tick(black_box(now)))
    });
    g.finish();
    assert_eq!(e.gauges(now).stalled.total(), 1_000, "tick changed nothing");
}

// ----- 4. views ---------------------------------------------------------------

fn bench_query(c: &mut Criterion) {
    let (e, now) = stalled_engine();
    let mut g = c.benchmark_group("engine_stalls_query");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("stalls_1000_of_65536", |b| {
        b.iter(|| e.stalls(black_box(now)))
    });
    g.bench_function("gauges_1000_of_65536", |b| {
        b.iter(|| e.gauges(black_box(now)))
    });
    g.bench_function("remotes_1000_of_65536", |b| {
        b.iter(|| e.remotes(black_box(now)))
    });
    g.finish();
}

// ----- 5. full table ----------------------------------------------------------

fn bench_full_table(c: &mut Criterion) {
    /// New flows per iteration (each a loss probe of a new connection).
    const NEW: u64 = 8_192;
    /// Iterations run before measuring (8 turnovers of the table): the cost
    /// per insert rises over the first ~100 iterations before it settles
    /// (hash tables and LRU order churned into their steady state).
    const CHURN: u64 = 64;
    let mut g = c.benchmark_group("engine_full_table");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(NEW));

    // New flows at 20,000/s; between iterations (not timed) their streaks go
    // stale and the daemon's ticks move them to the idle tier.
    fn new_flows(cookie: u64, t: u64) -> Vec<SockEvent> {
        (0..NEW)
            .map(|i| {
                let c = cookie + i;
                let s = Sock::between(
                    c,
                    node(32_768 + (c % 28_000) as u16),
                    backend(c % 256),
                    4_026_532_000 + (c % 32) as u32,
                );
                s.retransmit(t + i * 50 * US, 5, 0, 0, 51, s.snd_una, 0)
            })
            .collect()
    }

    // Full: every new flow evicts the least recently used idle flow.
    {
        let mut e = Engine::new(engine_cfg()).expect("config");
        let mut next_tick = T0 + S;
        let mut t = fill_idle(&mut e, MAX_FLOWS as u64, 1, T0, 20_000, &mut next_tick);
        assert_eq!(e.flows_tracked(), MAX_FLOWS);
        let mut cookie = MAX_FLOWS as u64 + 1;
        let mut step = |e: &mut Engine| -> Duration {
            let ev = new_flows(cookie, t);
            cookie += NEW;
            let start = Instant::now();
            drive(e, &ev, &mut next_tick);
            let d = start.elapsed();
            t = ev.last().expect("events").ts_ns + 5 * S;
            tick_until(e, &mut next_tick, t);
            d
        };
        for _ in 0..CHURN {
            step(&mut e);
        }
        assert_eq!(
            e.stats().flows_evicted,
            CHURN * NEW,
            "one eviction per new flow"
        );
        g.bench_function("new_flow_evicting", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| step(&mut e)).sum())
        });
        let st = e.stats();
        assert_eq!(st.flows_tracked, MAX_FLOWS);
        assert_eq!(
            st.flows_evicted,
            st.flows_created - MAX_FLOWS as u64,
            "one eviction per new flow"
        );
        assert_eq!(st.streaks_evicted, 0, "only idle flows were evicted");
    }

    // Room: the same inserts into a table 8,192 short of full (the new flows
    // are closed and settled between iterations, not timed).
    {
        let mut e = Engine::new(engine_cfg()).expect("config");
        let mut next_tick = T0 + S;
        let base = (MAX_FLOWS as u64) - NEW;
        let mut t = fill_idle(&mut e, base, 1, T0, 20_000, &mut next_tick);
        let mut cookie = MAX_FLOWS as u64 + 1;
        let mut step = |e: &mut Engine| -> Duration {
            let ev = new_flows(cookie, t);
            cookie += NEW;
            let start = Instant::now();
            drive(e, &ev, &mut next_tick);
            let d = start.elapsed();
            let end = ev.last().expect("events").ts_ns + MS;
            let closes: Vec<SockEvent> = ev
                .iter()
                .enumerate()
                .map(|(i, open)| {
                    let mut c = open.clone();
                    c.kind = EventKind::State;
                    c.sock = None;
                    c.netns_sysctls = None;
                    c.old_state = TcpState::Established;
                    c.state = TcpState::Close;
                    c.ts_ns = end + i as u64 * US;
                    c.jiffies = jiffies_at(HZ, c.ts_ns);
                    c
                })
                .collect();
            drive(e, &closes, &mut next_tick);
            t = end + 5 * S;
            tick_until(e, &mut next_tick, t);
            assert_eq!(e.flows_tracked() as u64, base, "back to the base size");
            d
        };
        for _ in 0..CHURN {
            step(&mut e);
        }
        g.bench_function("new_flow_no_eviction", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| step(&mut e)).sum())
        });
        assert_eq!(e.stats().flows_evicted, 0, "no eviction with room");
    }
    g.finish();
}

// ----- 6. start-up ------------------------------------------------------------

fn bench_btf(c: &mut Criterion) {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if !path.exists() {
        panic!(
            "btf_resolve: {} does not exist: this benchmark needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (the agent itself needs it too)",
            path.display()
        );
    }
    let release = facts::release();
    let btf =
        Btf::from_file(path).unwrap_or_else(|e| panic!("btf_resolve: {}: {e}", path.display()));
    let resolved = layout::resolve(&btf, &release)
        .unwrap_or_else(|e| panic!("btf_resolve: layout on {release}: {e}"));
    eprintln!(
        "btf_resolve: kernel {release}: {} BTF types, {} layout rows",
        btf.type_count(),
        resolved.rows().len()
    );
    let mut g = c.benchmark_group("btf_resolve");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("from_file_and_resolve", |b| {
        b.iter(|| {
            let btf = Btf::from_file(black_box(path)).expect("BTF");
            layout::resolve(&btf, &release).expect("layout")
        })
    });
    g.bench_function("resolve_only", |b| {
        b.iter(|| layout::resolve(black_box(&btf), &release).expect("layout"))
    });
    g.finish();
}

// ----- memory ---------------------------------------------------------------

/// Prints the memory a tracked flow costs: an engine is filled with 65,536
/// flows (each with a recovered loss-probe episode, as most tracked flows
/// are), observations drained as the daemon does. Not a timed benchmark.
fn report_memory(_: &mut Criterion) {
    let n = MAX_FLOWS as u64;
    let heap0 = live_bytes();
    let rss0 = rss_bytes();
    let mut e = Engine::new(engine_cfg()).expect("config");
    let heap_empty = live_bytes();
    let mut next_tick = T0 + S;
    fill_idle(&mut e, n, 1, T0, 20_000, &mut next_tick);
    let heap1 = live_bytes();
    let rss1 = rss_bytes();
    let st = e.stats();
    assert_eq!(st.flows_tracked, MAX_FLOWS);
    let heap = (heap1 - heap_empty) as f64;
    let rss = rss1.saturating_sub(rss0) as f64;
    eprintln!(
        "memory: {} flows tracked ({} remotes, {} netns): heap {:.1} MiB = {:.0} bytes/flow (allocator count); \
         RSS +{:.1} MiB = {:.0} bytes/flow; empty engine {} bytes",
        st.flows_tracked,
        st.remotes_tracked,
        st.netns_known,
        heap / (1 << 20) as f64,
        heap / n as f64,
        rss / (1 << 20) as f64,
        rss / n as f64,
        heap_empty - heap0,
    );
    drop(e);
}

criterion_group!(
    benches,
    report_memory,
    bench_decode,
    bench_healthy,
    bench_stalls,
    bench_query,
    bench_full_table,
    bench_btf
);
criterion_main!(benches);
