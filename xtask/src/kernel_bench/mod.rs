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
mod report;
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
/// The agent's periodic sweep gaps at defaults (`tcpstall run --help`):
/// `--sweep-interval` while sweeps or events find trouble, and
/// `--sweep-interval-max` (4 x) that a quiet node backs off to.
const AGENT_SWEEP_INTERVAL_S: f64 = 60.0;
const AGENT_SWEEP_INTERVAL_MAX_S: f64 = 240.0;

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
    } else if program.contains("drop") {
        Some("kfree_skb")
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

impl TimerSplit {
    /// The TCP write timers' share of the program's runs, in percent.
    pub fn tcp_percent(&self) -> f64 {
        100.0 * self.tcp_write_timers as f64 / self.runs.max(1) as f64
    }
}

/// Which of the drop program's runs (`kfree_skb`, every packet the node
/// drops) reported an event (a packet of a socket in a loss episode: the
/// agent's `tcpstall_events_total{kind="drop"}`); the rest stopped at the
/// in-kernel filter (no owning socket, or one not in `TCPSTALL_EPISODES`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DropSplit {
    pub runs: u64,
    pub events: u64,
    /// The agent's `tcpstall_drop_probe_attached` at the phase's end (the
    /// probe is attached only while some flow is in a loss episode).
    pub attached_at_end: Option<bool>,
    /// Times the agent attached it during the phase.
    pub attaches: Option<u64>,
    /// Runs of the empty floor program on `kfree_skb` (the node's drops,
    /// whether or not tcpstall's program was attached).
    pub node_drops: Option<u64>,
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
    pub drop_split: Option<DropSplit>,
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
        self.events_of("write_timer")
    }

    fn events_of(&self, kind: &str) -> Option<f64> {
        agent_stats::sample(
            self.metrics.as_deref()?,
            &format!("tcpstall_events_total{{kind=\"{kind}\"}}"),
        )
    }
}

fn drop_split(
    tcpstall: &[(u32, String)],
    floors: &[floor::FloorProgram],
    a: &Snapshot,
    b: &Snapshot,
) -> Option<DropSplit> {
    let (id, _) = tcpstall.iter().find(|(_, n)| n.contains("drop"))?;
    let runs = progs::delta(&a.progs, &b.progs, *id).0;
    let events = (b.events_of("drop")? - a.events_of("drop")?).max(0.0) as u64;
    let sample = |s: &Snapshot, name: &str| agent_stats::sample(s.metrics.as_deref()?, name);
    let attaches = "tcpstall_drop_probe_attaches_total";
    Some(DropSplit {
        runs,
        events,
        attached_at_end: sample(b, "tcpstall_drop_probe_attached").map(|v| v > 0.0),
        attaches: sample(b, attaches)
            .zip(sample(a, attaches))
            .map(|(b, a)| (b - a).max(0.0) as u64),
        node_drops: floors
            .iter()
            .find(|f| f.tracepoint == "kfree_skb")
            .map(|f| progs::delta(&a.progs, &b.progs, f.id).0),
    })
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
        drop_split: drop_split(tcpstall, floors, a, b),
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
