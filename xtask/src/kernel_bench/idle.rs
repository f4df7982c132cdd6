//! The agent's own cost on a node with many idle sockets, against what a
//! user would run instead (`ss -tinoH` once a second), and the periodic
//! sweep at scale:
//!
//! - **idle**: `--idle-sockets` established loopback sockets in a
//!   namespace of the bench, held open by this process, no traffic; the
//!   agent (defaults but `--sweep-interval 0`, so the window holds no
//!   sweep) runs for `--idle`: its CPU (every thread's `schedstat`, ns)
//!   per second of wall time. Beside it, one `ss -tinoH` dump of the same
//!   namespace (CPU of the child, `getrusage`).
//! - **from idle**: single short connections 1 s apart (each reaches an
//!   asleep reader): event delivery delay, kernel timestamp to the agent's
//!   read (`tcpstall_event_delivery_seconds`).
//! - **sweep**: the agent with `--sweep-interval 2` over the same sockets
//!   and then `--sweep-sockets` of them, for `--sweep-window` twice: first
//!   alone, for the CPU per sweep (the window's CPU less the idle rate, over
//!   the sweeps run) and the sweep's wall time; then with `/healthz` asked
//!   every 5 ms (its latency) and a short connection every 100 ms (event
//!   delivery delay): the event loop while sweeps run.
//!
//! Half the connections set SO_KEEPALIVE on their accepted end (servers
//! commonly do): the sweep skips those idle sockets in the kernel; the
//! other half are idle established sockets without a timeout, which the
//! audit lists, so each is a record.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tcpstall_tests::Netns;

use super::{Delivery, agent_stats, procs::Agent, traffic::run_in};

/// Connections per listener (ephemeral ports run out at about 28,000 per
/// destination).
const PER_LISTENER: usize = 12_500;

/// Established loopback connections inside one namespace, both ends open
/// in this process; closed on drop (with the namespace).
pub struct Held {
    pub ns: Netns,
    streams: Vec<TcpStream>,
    listeners: usize,
}

fn raise_nofile(want: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur >= want {
            return Ok(());
        }
        lim.rlim_cur = want;
        lim.rlim_max = lim.rlim_max.max(want);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!(
                "raising RLIMIT_NOFILE to {want} for the bench's sockets: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn keepalive(s: &TcpStream) -> anyhow::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with an int option.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("SO_KEEPALIVE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Held {
    pub fn new(tag: &str) -> Held {
        Held {
            ns: Netns::new(tag),
            streams: Vec::new(),
            listeners: 0,
        }
    }

    pub fn sockets(&self) -> usize {
        self.streams.len()
    }

    /// Opens connections until `sockets` sockets (both ends) are held.
    pub fn grow_to(&mut self, sockets: usize) -> anyhow::Result<()> {
        raise_nofile(sockets as u64 + 16_384)?;
        while self.streams.len() < sockets {
            let n = ((sockets - self.streams.len()) / 2).clamp(1, PER_LISTENER);
            let port = 9100 + self.listeners as u16;
            self.listeners += 1;
            let got = run_in(&self.ns.name, move || {
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
                let acceptor = thread::spawn(move || -> anyhow::Result<Vec<TcpStream>> {
                    (0..n)
                        .map(|_| {
                            let s = l.accept().context("accept")?.0;
                            keepalive(&s)?;
                            Ok(s)
                        })
                        .collect()
                });
                let mut all = Vec::with_capacity(2 * n);
                for _ in 0..n {
                    all.push(
                        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                            .with_context(|| format!("connect {addr}"))?,
                    );
                }
                all.extend(
                    acceptor
                        .join()
                        .map_err(|_| anyhow::anyhow!("acceptor panicked"))??,
                );
                Ok(all)
            })?;
            self.streams.extend(got);
        }
        Ok(())
    }
}

/// CPU time (ns) of every live thread of `pid` (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).context("agent threads")? {
        let t = t?;
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Runs `f` and returns the CPU seconds the agent spent meanwhile, and the
/// wall seconds.
fn agent_cpu(agent: &Agent, f: impl FnOnce()) -> anyhow::Result<(f64, f64)> {
    let c0 = cpu_ns(agent.pid())?;
    let t0 = Instant::now();
    f();
    let wall = t0.elapsed().as_secs_f64();
    let c1 = cpu_ns(agent.pid())?;
    Ok((c1.saturating_sub(c0) as f64 / 1e9, wall))
}

/// CPU seconds of one `ss -tinoH` dump of namespace `ns` (median of 3).
fn ss_dump_cpu(ns: &str) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..3 {
        let before = children_cpu();
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-tinoH"])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running `ss` (apt-get install iproute2)")?;
        if !st.success() {
            bail!("`ss -tinoH` in {ns} failed: {st}");
        }
        v.push(children_cpu() - before);
    }
    Ok(super::iperf::median(&v))
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One short connection in `ns` (to a listener there): open, write, close.
fn one_connection(ns: &str, addr: SocketAddr) {
    let _ = run_in(ns, move || {
        use std::io::Write as _;
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.write_all(b"x")?;
        Ok(())
    });
}

/// A listener in `ns` that accepts and closes (for the short connections).
fn closing_listener(ns: &str, port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let l = run_in(ns, move || {
        TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
    })?;
    l.set_nonblocking(true)?;
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok(s) => drop(s),
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    Ok(addr)
}

fn delivery_between(before: &str, after: &str) -> Delivery {
    let b = agent_stats::buckets(before, super::DELIVERY_HISTOGRAM);
    let a = agent_stats::buckets(after, super::DELIVERY_HISTOGRAM);
    let events = a.last().map_or(0.0, |l| l.1) - b.last().map_or(0.0, |l| l.1);
    Delivery {
        events: events.max(0.0) as u64,
        p50: agent_stats::quantile(&b, &a, 0.5),
        p99: agent_stats::quantile(&b, &a, 0.99),
    }
}

fn events_total(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("tcpstall_events_total{"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug, Clone)]
pub struct Idle {
    pub sockets: usize,
    pub secs: f64,
    pub cpu_s: f64,
    /// Events the agent read in the window (other traffic on the node).
    pub events: u64,
    pub ss_dump_cpu_s: f64,
    pub from_idle: Delivery,
}

impl Idle {
    pub fn cpu_ms_per_s(&self) -> f64 {
        self.cpu_s * 1e3 / self.secs
    }
}

/// The idle phase and the from-idle delivery delay.
pub fn idle(agent_bin: &std::path::Path, held: &Held, window: Duration) -> anyhow::Result<Idle> {
    let agent = Agent::start(agent_bin, &["--sweep-interval", "0"])?;
    // Start-up (BTF, loading, the start-up sweep) is over; let it settle.
    thread::sleep(Duration::from_secs(3));
    let m0 = agent_stats::scrape(agent.listen)?;
    let (cpu_s, secs) = agent_cpu(&agent, || thread::sleep(window))?;
    let m1 = agent_stats::scrape(agent.listen)?;
    let ss_dump_cpu_s = ss_dump_cpu(&held.ns.name)?;
    let stop = Arc::new(AtomicBool::new(false));
    let addr = closing_listener(&held.ns.name, 9099, stop.clone())?;
    let m2 = agent_stats::scrape(agent.listen)?;
    for _ in 0..20 {
        one_connection(&held.ns.name, addr);
        thread::sleep(Duration::from_secs(1));
    }
    let m3 = agent_stats::scrape(agent.listen)?;
    stop.store(true, Ordering::Relaxed);
    Ok(Idle {
        sockets: held.sockets(),
        secs,
        cpu_s,
        events: (events_total(&m1) - events_total(&m0)).max(0.0) as u64,
        ss_dump_cpu_s,
        from_idle: delivery_between(&m2, &m3),
    })
}

#[derive(Debug, Clone)]
pub struct SweepCost {
    pub sockets: usize,
    pub sweeps: u64,
    pub secs: f64,
    pub cpu_s: f64,
    /// CPU seconds per sweep: the window's CPU less `idle_rate` x window,
    /// over the sweeps.
    pub cpu_per_sweep_s: f64,
    /// Mean wall time of one sweep (`tcpstall_sweep_duration_seconds`).
    pub wall_per_sweep_s: Option<f64>,
    /// `/healthz` latency while the sweeps ran: p50, p99, max (seconds),
    /// and how many answered.
    pub healthz: (f64, f64, f64, usize),
    /// Event delivery delay of a short connection every 100 ms meanwhile.
    pub delivery: Delivery,
}

fn healthz_once(listen: SocketAddr) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /healthz HTTP/1.0\r\nHost: {listen}\r\n\r\n").ok()?;
    let mut b = Vec::new();
    s.read_to_end(&mut b).ok()?;
    Some(t.elapsed().as_secs_f64())
}

fn quantile_of(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// The sweep phase at the sockets `held` holds now.
pub fn sweep(
    agent_bin: &std::path::Path,
    held: &Held,
    window: Duration,
    idle_cpu_per_s: f64,
) -> anyhow::Result<SweepCost> {
    let agent = Agent::start(agent_bin, &["--sweep-interval", "2"])?;
    thread::sleep(Duration::from_secs(1));
    let listen = agent.listen;
    // CPU: nothing else asks anything of the agent meanwhile.
    let c0 = agent_stats::scrape(listen)?;
    let (cpu_s, secs) = agent_cpu(&agent, || thread::sleep(window))?;
    let c1 = agent_stats::scrape(listen)?;
    let sweeps = agent_stats::sample(&c1, "tcpstall_sweeps_total{reason=\"interval\"}")
        .unwrap_or(0.0)
        - agent_stats::sample(&c0, "tcpstall_sweeps_total{reason=\"interval\"}").unwrap_or(0.0);
    // The event loop while sweeps run: HTTP and event delivery.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = closing_listener(&held.ns.name, 9098, stop.clone())?;
    let m0 = agent_stats::scrape(listen)?;
    let (s2, ns) = (stop.clone(), held.ns.name.clone());
    let trickle = thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            one_connection(&ns, addr);
            thread::sleep(Duration::from_millis(100));
        }
    });
    let s3 = stop.clone();
    let prober = thread::spawn(move || {
        let mut lat = Vec::new();
        while !s3.load(Ordering::Relaxed) {
            if let Some(l) = healthz_once(listen) {
                lat.push(l);
            }
            thread::sleep(Duration::from_millis(5));
        }
        lat
    });
    thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    let _ = trickle.join();
    let mut lat = prober.join().unwrap_or_default();
    let m1 = agent_stats::scrape(listen)?;
    let sum = |m: &str| agent_stats::sample(m, "tcpstall_sweep_duration_seconds_sum");
    let count = |m: &str| agent_stats::sample(m, "tcpstall_sweep_duration_seconds_count");
    let wall_per_sweep_s = match (sum(&c0), sum(&m1), count(&c0), count(&m1)) {
        (Some(s0), Some(s1), Some(c0), Some(c1)) if c1 > c0 => Some((s1 - s0) / (c1 - c0)),
        _ => None,
    };
    let sweeps = sweeps.max(0.0) as u64;
    let healthz = (
        quantile_of(&mut lat, 0.5),
        quantile_of(&mut lat, 0.99),
        lat.iter().copied().fold(0.0, f64::max),
        lat.len(),
    );
    Ok(SweepCost {
        sockets: held.sockets(),
        sweeps,
        secs,
        cpu_s,
        cpu_per_sweep_s: (cpu_s - idle_cpu_per_s * secs).max(0.0) / sweeps.max(1) as f64,
        wall_per_sweep_s,
        healthz,
        delivery: delivery_between(&m0, &m1),
    })
}
