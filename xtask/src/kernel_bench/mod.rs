//! `cargo xtask bench --kernel`: what tcpstall's kernel programs cost per
//! run, side by side with a bpftrace script counting the same tracepoints
//! per 4-tuple, measured by the kernel's BPF run-time statistics in one run;
//! and iperf3 throughput over veth without the agent, with it at defaults
//! and with `--no-ack-probe`. Printed as Markdown.
//!
//! Phases, all in namespaces created here (removed on every path out):
//! 1. quiet: ordinary traffic only (a paced bulk stream, a new connection
//!    every 10 ms): the timer program sees almost only non-TCP timers and
//!    the ACK probe only sockets outside an RTO episode;
//! 2. storm: the same plus `--flows` established flows blackholed at the
//!    peer, `tcp_retries2` set inside their namespace;
//! 3. iperf3: interleaved runs, agent restarted for each.
//!
//! Run-time statistics are on only while the agent runs with
//! `--program-stats` (it holds the `BPF_ENABLE_STATS` fd); no sysctl of the
//! host is touched. bpftrace gets its own tracefs mount in a private mount
//! namespace.

mod agent_stats;
mod floor;
mod idle;
mod iperf;
mod procs;
mod progs;
mod traffic;

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tcpstall_common::stat;
use tcpstall_tests::Link;

use crate::{have, vm::parse_duration};

/// Printed around the report by the in-guest run, so the host can cut it
/// out of the console log.
pub const REPORT_BEGIN: &str = "TCPSTALL-KERNEL-BENCH-BEGIN";
pub const REPORT_END: &str = "TCPSTALL-KERNEL-BENCH-END";

/// Goals the report checks.
const GOAL_TIMER_QUIET_NS: f64 = 60.0;
const GOAL_ACK_QUIET_NS: f64 = 40.0;
const GOAL_IPERF_RATIO: f64 = 0.99;
const GOAL_IDLE_CPU_MS_PER_S: f64 = 0.5;
const GOAL_DELIVERY_P99_S: f64 = 0.020;
const GOAL_SWEEP_CPU_S: f64 = 0.3;

/// Options of `cargo xtask bench --kernel` (also passed to the guests).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Blackholed flows in the storm.
    #[arg(long, value_name = "N", default_value_t = 400)]
    pub flows: usize,
    /// Length of the storm phase.
    #[arg(long, value_name = "DURATION", default_value = "40s", value_parser = parse_duration)]
    pub storm: Duration,
    /// Length of the quiet phase (ordinary traffic, no storm).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub quiet: Duration,
    /// `net.ipv4.tcp_retries2` inside the storm's namespace.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub retries2: u32,
    /// Pace of the ordinary bulk stream, Mbit/s.
    #[arg(long, value_name = "MBIT", default_value_t = 200)]
    pub bulk_mbit: u64,
    /// iperf3 runs per mode (interleaved).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub iperf_runs: usize,
    /// Length of each iperf3 run, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 8)]
    pub iperf_secs: u64,
    /// Skip the iperf3 part.
    #[arg(long)]
    pub no_iperf: bool,
    /// Idle established sockets held while the agent's idle cost is measured.
    #[arg(long, value_name = "N", default_value_t = 15_000)]
    pub idle_sockets: usize,
    /// Length of the idle window.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Sockets for the sweep at scale (the sweep is also measured at
    /// `--idle-sockets`).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub sweep_sockets: usize,
    /// Length of each sweep window (sweeps every 2 s).
    #[arg(long, value_name = "DURATION", default_value = "16s", value_parser = parse_duration)]
    pub sweep_window: Duration,
    /// Skip the idle and sweep phases.
    #[arg(long)]
    pub no_idle: bool,
}

impl BenchOptions {
    /// The same options as command-line arguments (for the guest run).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("--flows={}", self.flows),
            format!("--storm={}s", self.storm.as_secs()),
            format!("--quiet={}s", self.quiet.as_secs()),
            format!("--retries2={}", self.retries2),
            format!("--bulk-mbit={}", self.bulk_mbit),
            format!("--iperf-runs={}", self.iperf_runs),
            format!("--iperf-secs={}", self.iperf_secs),
        ];
        if self.no_iperf {
            v.push("--no-iperf".into());
        }
        v.push(format!("--idle-sockets={}", self.idle_sockets));
        v.push(format!("--idle={}s", self.idle.as_secs()));
        v.push(format!("--sweep-sockets={}", self.sweep_sockets));
        v.push(format!("--sweep-window={}s", self.sweep_window.as_secs()));
        if self.no_idle {
            v.push("--no-idle".into());
        }
        v
    }
}

/// One-line errors for what the bench cannot run without.
pub fn check_prerequisites(opts: &BenchOptions) -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask bench --kernel` needs root (BPF programs, network namespaces): run it as root, e.g. `sudo -E cargo xtask bench --kernel`"
        );
    }
    let mut need = vec![
        ("bpftrace", "bpftrace"),
        ("bpftool", "bpftool"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("unshare", "util-linux"),
        ("ss", "iproute2"),
    ];
    if !opts.no_iperf {
        need.push(("iperf3", "iperf3"));
    }
    for (cmd, pkg) in need {
        if !have(cmd) {
            bail!(
                "`{cmd}` not found: the kernel bench needs it (`cargo xtask setup` installs it, or apt-get install {pkg})"
            );
        }
    }
    Ok(())
}

/// The tracepoint a tcpstall program sits on, for the programs bpftrace has
/// a counterpart for.
fn tracepoint_of(program: &str) -> Option<&'static str> {
    if program.contains("retransmit") {
        Some("tcp_retransmit_skb")
    } else if program.contains("state") {
        Some("inet_sock_set_state")
    } else if program.contains("ack") {
        Some("tcp_probe")
    } else if program.contains("write_timer_tp") {
        Some("timer_expire_entry")
    } else {
        None
    }
}

/// (runs, ns/run) over a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub runs: u64,
    pub time_ns: u64,
}

impl Cost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.time_ns as f64 / self.runs as f64)
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub program: String,
    pub tracepoint: Option<&'static str>,
    pub tcpstall: Cost,
    pub bpftrace: Option<Cost>,
    /// The empty reference program on the same tracepoint ([`floor`]).
    pub floor: Option<Cost>,
}

/// Which of the timer-tracepoint program's runs were TCP write timers (the
/// filter lets them through: an event, or `TIMER_NOT_DUE` for tail loss
/// probes, reorder and stale timers); the rest took the non-TCP path.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimerSplit {
    pub runs: u64,
    pub tcp_write_timers: u64,
}

/// Event delivery delay (kernel timestamp to the agent's read) over a
/// phase, from the agent's `tcpstall_event_delivery_seconds`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivery {
    pub events: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Phase {
    pub secs: f64,
    pub rows: Vec<Row>,
    pub timer_split: Option<TimerSplit>,
    pub delivery: Option<Delivery>,
}

/// The histogram the agent observes each event's delivery delay in.
const DELIVERY_HISTOGRAM: &str = "tcpstall_event_delivery_seconds";

/// Kernel program counters, the agent's `/metrics` and its programs'
/// `TCPSTALL_STATS` at one instant.
struct Snapshot {
    progs: HashMap<u32, progs::ProgStat>,
    metrics: Option<String>,
    stats: Option<[u64; stat::COUNT as usize]>,
}

impl Snapshot {
    fn take(agent: &procs::Agent, map_ids: &[u32]) -> anyhow::Result<Snapshot> {
        let progs = progs::all()?;
        let metrics = agent_stats::scrape(agent.listen)
            .map_err(|e| eprintln!("    (agent /metrics not read: {e:#})"))
            .ok();
        let stats = agent_stats::stats_map(map_ids)
            .map_err(|e| eprintln!("    (TCPSTALL_STATS not read: {e:#})"))
            .ok();
        Ok(Snapshot {
            progs,
            metrics,
            stats,
        })
    }

    fn write_timer_events(&self) -> Option<f64> {
        agent_stats::sample(
            self.metrics.as_deref()?,
            "tcpstall_events_total{kind=\"write_timer\"}",
        )
    }
}

fn timer_split(tcpstall: &[(u32, String)], a: &Snapshot, b: &Snapshot) -> Option<TimerSplit> {
    let (id, _) = tcpstall
        .iter()
        .find(|(_, n)| n.contains("write_timer_tp"))?;
    let runs = progs::delta(&a.progs, &b.progs, *id).0;
    let not_due = b.stats?[stat::TIMER_NOT_DUE as usize]
        .saturating_sub(a.stats?[stat::TIMER_NOT_DUE as usize]);
    let events = (b.write_timer_events()? - a.write_timer_events()?).max(0.0) as u64;
    Some(TimerSplit {
        runs,
        tcp_write_timers: not_due + events,
    })
}

fn delivery(a: &Snapshot, b: &Snapshot) -> Option<Delivery> {
    let before = agent_stats::buckets(a.metrics.as_deref()?, DELIVERY_HISTOGRAM);
    let after = agent_stats::buckets(b.metrics.as_deref()?, DELIVERY_HISTOGRAM);
    if after.is_empty() {
        return None;
    }
    let events = after.last().map_or(0.0, |l| l.1) - before.last().map_or(0.0, |l| l.1);
    Some(Delivery {
        events: events.max(0.0) as u64,
        p50: agent_stats::quantile(&before, &after, 0.5),
        p99: agent_stats::quantile(&before, &after, 0.99),
    })
}

pub struct Report {
    pub opts: BenchOptions,
    pub idle: Option<idle::Idle>,
    pub sweeps: Vec<idle::SweepCost>,
    pub quiet: Phase,
    pub storm: Phase,
    pub bpftrace_maps: procs::BpftraceMaps,
    pub ordinary_bytes: u64,
    pub ordinary_connections: u64,
    pub iperf: Option<iperf::IperfResult>,
}

fn phase_rows(
    tcpstall: &[(u32, String)],
    bt: &procs::Bpftrace,
    floors: &[floor::FloorProgram],
    a: &Snapshot,
    b: &Snapshot,
    secs: f64,
) -> Phase {
    let cost = |id| {
        let (runs, time_ns) = progs::delta(&a.progs, &b.progs, id);
        Cost { runs, time_ns }
    };
    let floor_of = |tp: &str| {
        floors
            .iter()
            .find(|f| f.tracepoint == tp)
            .map(|f| cost(f.id))
    };
    let mut rows: Vec<Row> = tcpstall
        .iter()
        .map(|(id, name)| {
            let tp = tracepoint_of(name);
            Row {
                program: name.clone(),
                tracepoint: tp,
                tcpstall: cost(*id),
                bpftrace: tp.and_then(|t| bt.program(t)).map(cost),
                floor: tp.and_then(floor_of),
            }
        })
        .collect();
    // bpftrace's tracepoints that no tcpstall program sits on here (the write
    // timer is an fentry program where the kernel allows it).
    for (tp, id) in &bt.programs {
        if !rows.iter().any(|r| r.tracepoint == Some(tp.as_str())) {
            let tp = procs::BPFTRACE_TRACEPOINTS
                .iter()
                .copied()
                .find(|t| *t == tp.as_str())
                .unwrap_or("?");
            rows.push(Row {
                program: "- (not on this tracepoint)".into(),
                tracepoint: Some(tp),
                tcpstall: Cost::default(),
                bpftrace: Some(cost(*id)),
                floor: floor_of(tp),
            });
        }
    }
    // Programs with a bpftrace counterpart first, in the script's order.
    rows.sort_by_key(|r| {
        r.tracepoint
            .and_then(|t| procs::BPFTRACE_TRACEPOINTS.iter().position(|x| *x == t))
            .unwrap_or(usize::MAX)
    });
    Phase {
        secs,
        rows,
        timer_split: timer_split(tcpstall, a, b),
        delivery: delivery(a, b),
    }
}

fn wait_with_progress(what: &str, d: Duration, mut status: impl FnMut() -> String) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let left = d.saturating_sub(t0.elapsed());
        thread::sleep(left.min(Duration::from_secs(5)));
        eprintln!(
            "    {what}: {:>3.0}/{:.0} s  {}",
            t0.elapsed().as_secs_f64(),
            d.as_secs_f64(),
            status()
        );
    }
}

/// The whole bench on the running kernel.
pub fn run(agent: &Path, opts: &BenchOptions) -> anyhow::Result<Report> {
    check_prerequisites(opts)?;
    let step = |m: &str| eprintln!("\x1b[1m==> {m}\x1b[0m");

    let (idle_result, sweeps) = if opts.no_idle {
        (None, Vec::new())
    } else {
        step(&format!(
            "idle: {} established loopback sockets (half with SO_KEEPALIVE), the agent alone for {:.0} s, then single connections 1 s apart",
            opts.idle_sockets,
            opts.idle.as_secs_f64()
        ));
        let mut held = idle::Held::new("kbidle");
        held.grow_to(opts.idle_sockets)?;
        let i = idle::idle(agent, &held, opts.idle)?;
        eprintln!(
            "    agent CPU {:.3} ms/s, one `ss -tinoH` dump {:.1} ms, from idle p99 {:?}",
            i.cpu_ms_per_s(),
            i.ss_dump_cpu_s * 1e3,
            i.from_idle.p99
        );
        let mut sweeps = Vec::new();
        for n in [opts.idle_sockets, opts.sweep_sockets] {
            step(&format!(
                "sweep every 2 s at {n} sockets, 2 x {:.0} s",
                opts.sweep_window.as_secs_f64()
            ));
            held.grow_to(n)?;
            let c = idle::sweep(agent, &held, opts.sweep_window, i.cpu_s / i.secs)?;
            eprintln!(
                "    {} sweeps, {:.3} CPU-s each, /healthz max {:.1} ms",
                c.sweeps,
                c.cpu_per_sweep_s,
                c.healthz.2 * 1e3
            );
            sweeps.push(c);
        }
        (Some(i), sweeps)
    };

    step(&format!(
        "kernel bench: namespaces, {} storm flows (tcp_retries2 = {} in their namespace), ordinary traffic",
        opts.flows, opts.retries2
    ));
    let ordinary_link = Link::new("kbnt", 250);
    let storm_link = Link::new("kbst", 251);
    let mut storm = traffic::Storm::establish(&storm_link, opts.flows, opts.retries2)?;
    let ordinary = traffic::Ordinary::start(&ordinary_link, opts.bulk_mbit)?;

    step(
        "starting the agent (--program-stats: kernel run-time statistics on while it runs) and bpftrace",
    );
    let before_agent = progs::all()?;
    let agent_guard = procs::Agent::start(agent, &["--program-stats"])?;
    let mut map_ids = Vec::new();
    let mut tcpstall: Vec<(u32, String)> = progs::all()?
        .into_iter()
        .filter(|(id, p)| p.name.starts_with("tcpstall") && !before_agent.contains_key(id))
        .map(|(id, p)| {
            map_ids.extend(p.map_ids);
            (id, p.name)
        })
        .collect();
    tcpstall.sort();
    if tcpstall.is_empty() {
        bail!("no tcpstall programs appeared in `bpftool prog show` after the agent started");
    }
    let bt = procs::Bpftrace::start()?;
    eprintln!(
        "    tcpstall programs: {}; bpftrace programs: {}",
        tcpstall
            .iter()
            .map(|(id, n)| format!("{n} ({id})"))
            .collect::<Vec<_>>()
            .join(", "),
        bt.programs
            .iter()
            .map(|(n, id)| format!("{n} ({id})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let floors = floor::attach_all(&procs::BPFTRACE_TRACEPOINTS)?;
    eprintln!(
        "    floor: empty raw-tracepoint programs (r0 = 0; exit) on {}",
        floors
            .iter()
            .map(|f| format!("{} ({})", f.tracepoint, f.id))
            .collect::<Vec<_>>()
            .join(", ")
    );
    thread::sleep(Duration::from_secs(2));

    step(&format!(
        "quiet phase: ordinary traffic only, {:.0} s",
        opts.quiet.as_secs_f64()
    ));
    let bytes0 = ordinary.bytes.load(Ordering::Relaxed);
    let conns0 = ordinary.connections.load(Ordering::Relaxed);
    let s0 = Snapshot::take(&agent_guard, &map_ids)?;
    let t0 = Instant::now();
    wait_with_progress("quiet", opts.quiet, || {
        format!(
            "{} ordinary connections",
            ordinary.connections.load(Ordering::Relaxed) - conns0
        )
    });
    let s1 = Snapshot::take(&agent_guard, &map_ids)?;
    let quiet = phase_rows(
        &tcpstall,
        &bt,
        &floors,
        &s0,
        &s1,
        t0.elapsed().as_secs_f64(),
    );

    step(&format!(
        "storm phase: {} flows blackholed, {:.0} s",
        opts.flows,
        opts.storm.as_secs_f64()
    ));
    let retransmit_id = tcpstall
        .iter()
        .find(|(_, n)| n.contains("retransmit"))
        .map(|(id, _)| *id);
    let t1 = Instant::now();
    storm.blackhole()?;
    wait_with_progress("storm", opts.storm, || match retransmit_id {
        Some(id) => {
            let now = progs::all().unwrap_or_default();
            format!(
                "{} retransmissions seen by tcpstall",
                progs::delta(&s1.progs, &now, id).0
            )
        }
        None => String::new(),
    });
    let s2 = Snapshot::take(&agent_guard, &map_ids)?;
    let storm_phase = phase_rows(
        &tcpstall,
        &bt,
        &floors,
        &s1,
        &s2,
        t1.elapsed().as_secs_f64(),
    );
    drop(floors);
    let ordinary_bytes = ordinary.bytes.load(Ordering::Relaxed) - bytes0;
    let ordinary_connections = ordinary.connections.load(Ordering::Relaxed) - conns0;
    step("stopping bpftrace (it prints its maps)");
    let bpftrace_maps = bt.finish();
    drop(agent_guard);
    drop(storm);
    drop(ordinary);
    drop(storm_link);
    drop(ordinary_link);

    let iperf = if opts.no_iperf {
        None
    } else {
        step(&format!(
            "iperf3 over veth (MTU 1500): {} x {} s per mode, interleaved",
            opts.iperf_runs, opts.iperf_secs
        ));
        Some(iperf::run(agent, opts.iperf_runs, opts.iperf_secs)?)
    };
    Ok(Report {
        opts: opts.clone(),
        idle: idle_result,
        sweeps,
        quiet,
        storm: storm_phase,
        bpftrace_maps,
        ordinary_bytes,
        ordinary_connections,
        iperf,
    })
}

fn ns(c: Option<f64>) -> String {
    c.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn ratio(r: &Row) -> Option<f64> {
    Some(r.tcpstall.ns_per_run()? / r.bpftrace?.ns_per_run()?)
}

fn floor_ns(r: &Row) -> Option<f64> {
    r.floor?.ns_per_run()
}

/// tcpstall's ns/run minus the floor on the same tracepoint.
fn above_floor(r: &Row) -> Option<f64> {
    Some(r.tcpstall.ns_per_run()? - floor_ns(r)?)
}

fn phase_table(out: &mut String, p: &Phase) {
    let _ = writeln!(
        out,
        "| tracepoint | tcpstall program | tcpstall runs | tcpstall ns/run | floor ns/run | tcpstall above floor | bpftrace runs | bpftrace ns/run | ratio |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &p.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.tracepoint.unwrap_or("-"),
            r.program,
            r.tcpstall.runs,
            ns(r.tcpstall.ns_per_run()),
            ns(floor_ns(r)),
            ns(above_floor(r)),
            r.bpftrace
                .map_or_else(|| "-".into(), |b| b.runs.to_string()),
            ns(r.bpftrace.and_then(|b| b.ns_per_run())),
            ratio(r).map_or_else(|| "-".into(), |x| format!("{x:.2}")),
        );
    }
    if let Some(t) = p.timer_split {
        let _ = writeln!(
            out,
            "\nTimer program runs: {} of {} were TCP write timers ({:.2} %: RTO / zero-window probe events and `TIMER_NOT_DUE` skips such as tail loss probes), the rest took the non-TCP path.",
            t.tcp_write_timers,
            t.runs,
            100.0 * t.tcp_write_timers as f64 / t.runs.max(1) as f64
        );
    }
    if let Some(d) = p.delivery {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{:.1} ms", v * 1e3));
        let _ = writeln!(
            out,
            "\nEvent delivery (kernel timestamp to the agent's read, `{DELIVERY_HISTOGRAM}`, bucket-interpolated): {} events, p50 {}, p99 {}.",
            d.events,
            ms(d.p50),
            ms(d.p99)
        );
    }
}

/// The non-TCP path of the timer program alone, from the two phases: each
/// phase's average is `(1 - f) * a + f * b` with `f` the share of TCP write
/// timers; two phases with different `f` give `a` (assuming each path
/// costs the same in both phases). None when the shares are too close to
/// separate.
fn timer_non_tcp_estimate(quiet: &Phase, storm: &Phase) -> Option<(f64, f64)> {
    let avg = |p: &Phase| {
        p.rows
            .iter()
            .find(|r| r.program.contains("write_timer_tp"))?
            .tcpstall
            .ns_per_run()
    };
    let share = |p: &Phase| {
        let t = p.timer_split?;
        (t.runs > 0).then(|| t.tcp_write_timers as f64 / t.runs as f64)
    };
    let (aq, as_, fq, fs) = (avg(quiet)?, avg(storm)?, share(quiet)?, share(storm)?);
    if fs - fq < 0.005 {
        return None;
    }
    let a = (aq * fs - as_ * fq) / (fs - fq);
    let b = (as_ - (1.0 - fs) * a) / fs;
    Some((a, b))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let n = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or_else(String::new, |kb| {
            format!(", {:.1} GiB", kb as f64 / 1048576.0)
        });
    format!("{n} x {model}{mem}")
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Report {
    /// The Markdown report: environment, both phases, iperf3, goals.
    pub fn markdown(&self, command: &str) -> String {
        let mut o = String::new();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let _ = writeln!(
            o,
            "kernel {kernel}; machine {}; {}; `{command}`\n",
            machine(),
            date()
        );
        self.idle_markdown(&mut o);
        let _ = writeln!(
            o,
            "Storm phase: {} blackholed flows (tcp_retries2 = {}) for {:.0} s, plus ordinary traffic:\n",
            self.opts.flows, self.opts.retries2, self.storm.secs
        );
        phase_table(&mut o, &self.storm);
        let _ = writeln!(
            o,
            "\nQuiet phase: ordinary traffic only ({:.0} Mbit/s paced bulk stream, {} short connections over both phases) for {:.0} s; the timer program sees non-TCP timers, the ACK probe sockets outside an RTO episode:\n",
            self.ordinary_bytes as f64 * 8.0 / 1e6 / (self.quiet.secs + self.storm.secs),
            self.ordinary_connections,
            self.quiet.secs
        );
        phase_table(&mut o, &self.quiet);
        let _ = writeln!(
            o,
            "\nFloor: an empty program (`r0 = 0; exit`) on each tracepoint, loaded by the bench itself with bpf(2) as a raw tracepoint program: dispatched and accounted exactly like tcpstall's `tp_btf` programs (both run through `__bpf_trace_run`), so it is what any program on that hook costs in `run_time_ns` on this machine (the two clock reads around the call and the indirect call). Not bpftrace `{{}}` bodies: bpftrace attaches classic tracepoints, whose accounting differs, and needs minutes of LLVM under TCG. The goals are absolute ns/run; the \"above floor\" column is what tcpstall's own instructions add."
        );
        match &self.bpftrace_maps.keys {
            Some(keys) => {
                let _ = writeln!(
                    o,
                    "\nbpftrace map keys at the end (4-tuples; timers for `timer`; printed in {:.0} s): {}",
                    self.bpftrace_maps.secs,
                    keys.iter()
                        .map(|(m, n)| format!("{m} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "\nbpftrace did not finish printing its maps within {:.0} s of SIGINT (killed; its costs above come from the kernel's counters, read before)",
                    self.bpftrace_maps.secs
                );
            }
        }
        if let Some(ip) = &self.iperf {
            let base = iperf::median(&ip.runs[0]);
            let _ = writeln!(
                o,
                "\niperf3 over veth (MTU 1500), {} interleaved runs of {} s per mode:\n",
                ip.runs[0].len(),
                ip.secs
            );
            let _ = writeln!(o, "| mode | median Gbit/s | min | max | median / without |");
            let _ = writeln!(o, "|---|---:|---:|---:|---:|");
            for (i, m) in iperf::Mode::ALL.iter().enumerate() {
                let r = &ip.runs[i];
                let min = r.iter().copied().fold(f64::INFINITY, f64::min);
                let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let _ = writeln!(
                    o,
                    "| {} | {:.2} | {min:.2} | {max:.2} | {:.3} |",
                    m.label(),
                    iperf::median(r),
                    iperf::median(r) / base
                );
            }
            for i in [1, 2] {
                let (med, lo, hi) = iperf::paired_ratios(&ip.runs[0], &ip.runs[i]);
                let _ = writeln!(
                    o,
                    "\n{} / without, per round (the two runs of a round are back to back): median {med:.3}, spread {lo:.3}-{hi:.3}",
                    iperf::Mode::ALL[i].label()
                );
            }
        }
        let _ = writeln!(o, "\nGoals:\n");
        for line in self.goals() {
            let _ = writeln!(o, "- {line}");
        }
        o
    }

    /// The idle and sweep phases' section of the report.
    fn idle_markdown(&self, o: &mut String) {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{:.1} ms", v * 1e3));
        if let Some(i) = &self.idle {
            let _ = writeln!(
                o,
                "Idle: {} established loopback sockets (half with SO_KEEPALIVE), no traffic of the bench, agent at defaults but `--sweep-interval 0` for {:.0} s: **{:.3} ms CPU per second** (every thread's schedstat; {} events from other traffic on the node read meanwhile). One `ss -tinoH` dump of the same sockets: {:.1} ms CPU, so polling with `ss` once a second costs {:.0}x the idle agent.\n",
                i.sockets,
                i.secs,
                i.cpu_ms_per_s(),
                i.events,
                i.ss_dump_cpu_s * 1e3,
                i.ss_dump_cpu_s * 1e3 / i.cpu_ms_per_s().max(1e-6)
            );
            let _ = writeln!(
                o,
                "From idle: 20 single connections 1 s apart, {} events, delivery delay (kernel timestamp to the agent's read) p50 {}, p99 {}.\n",
                i.from_idle.events,
                ms(i.from_idle.p50),
                ms(i.from_idle.p99)
            );
        }
        if !self.sweeps.is_empty() {
            let _ = writeln!(
                o,
                "Periodic sweep (`--sweep-interval 2`), the agent alone, then with `/healthz` every 5 ms and a short connection every 100 ms (the event loop while sweeps run):\n"
            );
            let _ = writeln!(
                o,
                "| sockets | sweeps | CPU-s per sweep | wall per sweep | /healthz p50 / p99 / max | events | delivery p50 / p99 |"
            );
            let _ = writeln!(o, "|---:|---:|---:|---:|---|---:|---|");
            for c in &self.sweeps {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.3} | {} | {:.1} / {:.1} / {:.1} ms ({} answers) | {} | {} / {} |",
                    c.sockets,
                    c.sweeps,
                    c.cpu_per_sweep_s,
                    ms(c.wall_per_sweep_s),
                    c.healthz.0 * 1e3,
                    c.healthz.1 * 1e3,
                    c.healthz.2 * 1e3,
                    c.healthz.3,
                    c.delivery.events,
                    ms(c.delivery.p50),
                    ms(c.delivery.p99)
                );
            }
            if let (Some(i), Some(c)) = (&self.idle, self.sweeps.first()) {
                let _ = writeln!(
                    o,
                    "\nAt the default `--sweep-interval 60`, the idle agent at {} sockets costs about {:.3} ms CPU per second with its sweep ({:.3} + {:.3} / 60 s).",
                    c.sockets,
                    i.cpu_ms_per_s() + c.cpu_per_sweep_s * 1e3 / 60.0,
                    i.cpu_ms_per_s(),
                    c.cpu_per_sweep_s * 1e3
                );
            }
            let _ = writeln!(o);
        }
    }

    fn goals(&self) -> Vec<String> {
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        let mut g = Vec::new();
        if let Some(i) = &self.idle {
            let v = i.cpu_ms_per_s();
            g.push(format!(
                "idle agent at {} sockets <= {GOAL_IDLE_CPU_MS_PER_S} ms CPU per second: {v:.3}, {}",
                i.sockets,
                verdict(v <= GOAL_IDLE_CPU_MS_PER_S)
            ));
            if let Some(p) = i.from_idle.p99 {
                g.push(format!(
                    "event delivery p99 from idle <= {:.0} ms: {:.1} ms, {}",
                    GOAL_DELIVERY_P99_S * 1e3,
                    p * 1e3,
                    verdict(p <= GOAL_DELIVERY_P99_S)
                ));
            }
        }
        for (name, p) in [("storm", &self.storm), ("quiet", &self.quiet)] {
            if let Some(p99) = p.delivery.and_then(|d| d.p99) {
                g.push(format!(
                    "event delivery p99 in the {name} phase <= {:.0} ms: {:.1} ms, {}",
                    GOAL_DELIVERY_P99_S * 1e3,
                    p99 * 1e3,
                    verdict(p99 <= GOAL_DELIVERY_P99_S)
                ));
            }
        }
        if let Some(c) = self.sweeps.last() {
            g.push(format!(
                "periodic sweep at {} sockets <= {GOAL_SWEEP_CPU_S} CPU-s: {:.3}, {}",
                c.sockets,
                c.cpu_per_sweep_s,
                verdict(c.cpu_per_sweep_s <= GOAL_SWEEP_CPU_S)
            ));
        }
        for r in self
            .storm
            .rows
            .iter()
            .filter(|r| r.bpftrace.is_some() && r.program.starts_with("tcpstall"))
        {
            match ratio(r) {
                Some(x) => g.push(format!(
                    "{} ({}) costs <= bpftrace in the storm: ratio {x:.2}, {}",
                    r.program,
                    r.tracepoint.unwrap_or("-"),
                    verdict(x <= 1.0)
                )),
                None => g.push(format!(
                    "{} ({}): no runs in the storm, not measured",
                    r.program,
                    r.tracepoint.unwrap_or("-")
                )),
            }
        }
        let quiet = |tp: &str| {
            self.quiet
                .rows
                .iter()
                .find(|r| r.tracepoint == Some(tp))
                .and_then(|r| r.tcpstall.ns_per_run())
        };
        let timer_program = self
            .quiet
            .rows
            .iter()
            .find(|r| r.program.contains("write_timer"))
            .map(|r| r.program.as_str());
        let quiet_row = |tp: &str| self.quiet.rows.iter().find(|r| r.tracepoint == Some(tp));
        let floor_note = |tp: &str| {
            quiet_row(tp)
                .and_then(|r| Some((above_floor(r)?, floor_ns(r)?)))
                .map_or_else(
                    || " (no floor measured)".into(),
                    |(above, f)| format!(" ({above:.0} ns above the {f:.0} ns floor of an empty program on the same tracepoint)"),
                )
        };
        match (quiet("timer_expire_entry"), timer_program) {
            (Some(v), _) => {
                let mut line = format!(
                    "write-timer program on non-TCP timers (quiet phase) <= {GOAL_TIMER_QUIET_NS:.0} ns/run (absolute): {v:.0}{}, {}",
                    floor_note("timer_expire_entry"),
                    verdict(v <= GOAL_TIMER_QUIET_NS)
                );
                if let Some(t) = self.quiet.timer_split {
                    let _ = write!(
                        line,
                        "; this average includes {} TCP write timers among {} runs ({:.2} %)",
                        t.tcp_write_timers,
                        t.runs,
                        100.0 * t.tcp_write_timers as f64 / t.runs.max(1) as f64
                    );
                } else {
                    line.push_str("; this average includes the TCP write timers the filter lets through (not separable here: TCPSTALL_STATS or /metrics not read)");
                }
                match timer_non_tcp_estimate(&self.quiet, &self.storm) {
                    Some((a, b)) => {
                        let _ = write!(
                            line,
                            "; non-TCP path alone, solved from both phases' averages and TCP shares: about {a:.0} ns/run (TCP write timers about {b:.0}; an estimate, {})",
                            verdict(a <= GOAL_TIMER_QUIET_NS)
                        );
                    }
                    None if self.quiet.timer_split.is_some() => line.push_str(
                        "; the two phases' TCP shares are too close to solve for the non-TCP path alone",
                    ),
                    None => {}
                }
                g.push(line);
            }
            (None, Some(p)) if !p.contains("write_timer_tp") => g.push(format!(
                "write-timer program on non-TCP timers: not applicable, the write timer is {p}, which runs for TCP write timers only"
            )),
            _ => g.push("write-timer program on timer_expire_entry not attached or not run: not measured".into()),
        }
        match quiet("tcp_probe") {
            Some(v) => g.push(format!(
                "ACK probe outside an RTO episode (quiet phase) <= {GOAL_ACK_QUIET_NS:.0} ns/run (absolute): {v:.0}{}, {}",
                floor_note("tcp_probe"),
                verdict(v <= GOAL_ACK_QUIET_NS)
            )),
            None => g.push("ACK probe not attached or not run: not measured".into()),
        }
        if let Some(ip) = &self.iperf {
            let r = iperf::median(&ip.runs[1]) / iperf::median(&ip.runs[0]);
            g.push(format!(
                "iperf3 with the agent at defaults >= {GOAL_IPERF_RATIO} of without (medians): {r:.3}, {}",
                verdict(r >= GOAL_IPERF_RATIO)
            ));
        }
        g
    }
}

/// Runs the bench and prints the report on stdout (between the markers
/// when `markers`, for the guest console).
pub fn run_and_print(
    agent: &Path,
    opts: &BenchOptions,
    command: &str,
    markers: bool,
) -> anyhow::Result<()> {
    let report = run(agent, opts).context("kernel bench")?;
    let md = report.markdown(command);
    if markers {
        println!("{REPORT_BEGIN}");
    }
    println!("\n{md}");
    if markers {
        println!("{REPORT_END}");
    }
    Ok(())
}
