//! The bench report as Markdown: each phase's table (ours against
//! bpftrace and the empty-program floor), the goals as ratios, the idle,
//! delivery, sweep and iperf3 figures, and the machine it ran on.

use super::*;

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
            t.tcp_percent()
        );
    }
    if let Some(d) = p.drop_split {
        let node = d
            .node_drops
            .map_or_else(String::new, |n| format!(" The node dropped {n} packets in this phase (runs of the empty floor program on kfree_skb)."));
        let gate = format!(
            " The agent attaches the drop program only while some flow is in a loss episode (and 30 s after): attached at the phase's end: {}, attaches in the phase: {}.",
            d.attached_at_end
                .map_or("-", |a| if a { "yes" } else { "no" }),
            d.attaches.map_or_else(|| "-".into(), |n| n.to_string())
        );
        if d.runs == 0 {
            let _ = writeln!(
                out,
                "\nDrop program runs: 0: not attached in this phase (no flow in a loss episode), so it cost nothing per drop.{node}{gate}"
            );
        } else {
            let _ = writeln!(
                out,
                "\nDrop program runs: {} of {} reported a packet of a socket in a loss episode (an event: cause evidence); the rest stopped at the in-kernel filter (no owning socket, or its cookie not in TCPSTALL_EPISODES).{node}{gate}",
                d.events, d.runs
            );
        }
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
    two_path_estimate(quiet, storm, "write_timer_tp", |p| {
        let t = p.timer_split?;
        (t.runs > 0).then(|| t.tcp_write_timers as f64 / t.runs as f64)
    })
}

/// The drop program's filter path (no event) and reporting path, the same
/// way from the share of runs that reported an event.
fn drop_filter_estimate(quiet: &Phase, storm: &Phase) -> Option<(f64, f64)> {
    two_path_estimate(quiet, storm, "drop", |p| {
        let d = p.drop_split?;
        (d.runs > 0).then(|| d.events as f64 / d.runs as f64)
    })
}

/// `(a, b)`: the cost of a program's runs without and with the second path,
/// from each phase's average and share `f` of second-path runs.
fn two_path_estimate(
    quiet: &Phase,
    storm: &Phase,
    program: &str,
    share: impl Fn(&Phase) -> Option<f64>,
) -> Option<(f64, f64)> {
    let avg = |p: &Phase| {
        p.rows
            .iter()
            .find(|r| r.program.contains(program))?
            .tcpstall
            .ns_per_run()
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
        let drop_estimate = drop_filter_estimate(&self.quiet, &self.storm);
        if drop_estimate.is_some_and(|(f, r)| f < 0.0 || r < 0.0) {
            let _ = writeln!(
                o,
                "\nDrop program (kfree_skb): the two phases' averages do not separate the filter exit from a reported drop (a negative solution: the per-run cost moved between the phases by more than the share of reported drops explains, e.g. a hook run too rarely to stay in cache); read the quiet phase's row, where no drop was reported, as the filter exit's cost."
            );
        } else if let Some((filter, report)) = drop_estimate {
            let _ = writeln!(
                o,
                "\nDrop program (kfree_skb), solved from both phases' averages and shares of reported drops: about {filter:.0} ns per run that stops at the filter (every drop on the node while no socket of it is in a loss episode), about {report:.0} ns per reported drop (an estimate). The bpftrace counterpart counts drops per location and reason (`@drop[args->location, args->reason]`), with no socket filter."
            );
        }
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
                "Periodic sweep (`--sweep-interval 2 --sweep-interval-max 2`), the agent alone, then with `/healthz` every 5 ms and a short connection every 100 ms (the event loop while sweeps run):\n"
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
                    "\nAt defaults, the idle agent at {} sockets with its periodic sweep: on a quiet node (the gap backed off to `--sweep-interval-max`, {:.0} s) about **{:.3} ms CPU per second** ({:.3} + {:.3} / {:.0} s); while sweeps or events find trouble (every `--sweep-interval`, {:.0} s) {:.3} ms per second ({:.3} + {:.3} / {:.0} s).",
                    c.sockets,
                    AGENT_SWEEP_INTERVAL_MAX_S,
                    i.cpu_ms_per_s() + c.cpu_per_sweep_s * 1e3 / AGENT_SWEEP_INTERVAL_MAX_S,
                    i.cpu_ms_per_s(),
                    c.cpu_per_sweep_s * 1e3,
                    AGENT_SWEEP_INTERVAL_MAX_S,
                    AGENT_SWEEP_INTERVAL_S,
                    i.cpu_ms_per_s() + c.cpu_per_sweep_s * 1e3 / AGENT_SWEEP_INTERVAL_S,
                    i.cpu_ms_per_s(),
                    c.cpu_per_sweep_s * 1e3,
                    AGENT_SWEEP_INTERVAL_S,
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
                "idle agent at {} sockets <= {GOAL_IDLE_CPU_MS_PER_S} ms CPU per second (sweep off): {v:.3}, {}",
                i.sockets,
                verdict(v <= GOAL_IDLE_CPU_MS_PER_S)
            ));
            if let Some(c) = self.sweeps.first().filter(|c| c.sockets == i.sockets) {
                let d = v + c.cpu_per_sweep_s * 1e3 / AGENT_SWEEP_INTERVAL_MAX_S;
                g.push(format!(
                    "idle agent at {} sockets at defaults (quiet node: periodic sweep every {AGENT_SWEEP_INTERVAL_MAX_S:.0} s) <= {GOAL_IDLE_CPU_MS_PER_S} ms CPU per second: {d:.3}, {}",
                    i.sockets,
                    verdict(d <= GOAL_IDLE_CPU_MS_PER_S)
                ));
            }
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
                        t.tcp_percent()
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
