//! Command line (clap) and optional TOML config file. Precedence: flag >
//! environment variable > config file > built-in default.
//!
//! Adding a setting: a flag `--foo-bar` in [`RunArgs`] with
//! `env = "TCPSTALL_FOO_BAR"` and no default (an `Option`, or a `bool`
//! switch), the key `foo_bar` in [`FileConfig`], its default in
//! [`Settings::default`] (written nowhere else; the engine's come from
//! [`EngineConfig::default`]), and one line in [`Settings::merge`]:
//! `flag.or(file).unwrap_or(default)`. One exception to the variable names:
//! `--proc-root` reads `TCPSTALL_PROC`. A switch is on when any source turns
//! it on.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::{engine::EngineConfig, kernel::event::Mechanism};

const ABOUT: &str = "Finds stuck TCP connections before they hurt anyone.

tcpstall watches every TCP socket on the node through eBPF (retransmissions,
RTO and zero-window probe timers, state changes, the kernel's ETIMEDOUT
verdicts), recognises stalls (retransmission streaks, zero-window stalls,
CLOSE_WAIT leaks), predicts the instant the kernel will kill a retransmitting
socket with ETIMEDOUT (tcp_retries2 / TCP_USER_TIMEOUT), and exports all of it
as Prometheus metrics and a JSON API.";

#[derive(Debug, Parser)]
#[command(name = "tcpstall", version, about = ABOUT, long_about = ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the probes and watch TCP sockets (needs root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN).
    Run(Box<RunArgs>),
    /// Print, for the running kernel, which mechanism each probe would use and why
    /// the better ones fail, the kernel fields found in BTF, and missing privileges.
    Doctor(DoctorArgs),
    /// Live terminal view of the stalled sockets seen by the agent on this node
    /// (its /api/v1/stalls), most urgent first, with a countdown to ETIMEDOUT.
    Top(TopArgs),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The write-timer mechanisms a user can force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForceMechanism {
    Fentry,
    Kprobe,
    TimerTracepoint,
    SockOps,
}

impl From<ForceMechanism> for Mechanism {
    fn from(m: ForceMechanism) -> Self {
        match m {
            ForceMechanism::Fentry => Mechanism::Fentry,
            ForceMechanism::Kprobe => Mechanism::Kprobe,
            ForceMechanism::TimerTracepoint => Mechanism::TimerTracepoint,
            ForceMechanism::SockOps => Mechanism::SockOps,
        }
    }
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Log format.
    #[arg(long, value_enum, env = "TCPSTALL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `tcpstall=debug`.
    #[arg(long, env = "TCPSTALL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Read kernel BTF from this file instead of /sys/kernel/btf/vmlinux.
    #[arg(long, value_name = "FILE", env = "TCPSTALL_BTF")]
    pub btf: Option<PathBuf>,
    /// Treat this kernel program as refused by the kernel (repeatable, or
    /// comma separated): the probe plan falls through to the next candidate,
    /// as on a kernel whose verifier refuses it. For testing the fallbacks
    /// and working around a misbehaving program; `tcpstall doctor` lists the
    /// programs.
    #[arg(
        long,
        value_name = "PROGRAM",
        value_delimiter = ',',
        env = "TCPSTALL_DENY_PROGRAM"
    )]
    pub deny_program: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print the plan as JSON.
    #[arg(long, env = "TCPSTALL_JSON")]
    pub json: bool,
}

// `tcpstall top`: which agent to poll and how (no doc comment: clap would
// turn it into help text).
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent's HTTP address [default: the local agent, from TCPSTALL_LISTEN
    /// or the default listen address, with 0.0.0.0 read as 127.0.0.1].
    #[arg(long, value_name = "URL", env = "TCPSTALL_AGENT")]
    pub agent: Option<String>,
    /// Print one plain table and exit (also when stdout is not a terminal).
    #[arg(long, env = "TCPSTALL_ONCE")]
    pub once: bool,
    /// Seconds between polls of the agent.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 1.0,
        env = "TCPSTALL_INTERVAL"
    )]
    pub interval: f64,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// TOML config file; keys are the long flag names with `_` for `-`
    /// (e.g. `listen = "127.0.0.1:9977"`, `near_horizon_secs = 30`).
    #[arg(long, short = 'c', value_name = "FILE", env = "TCPSTALL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for /metrics, /healthz, /readyz and /api/v1/stalls [default: 0.0.0.0:9977].
    #[arg(long, value_name = "ADDR:PORT", env = "TCPSTALL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Log every kernel event as a structured line (verbose; for debugging).
    #[arg(long, env = "TCPSTALL_LOG_EVENTS")]
    pub log_events: bool,
    /// Do not attach the ACK probe (`tp_btf/tcp_probe`). It runs one read per
    /// received TCP segment and clears a recovered stall at once; without it
    /// a recovery shows when the next expected RTO is overdue.
    #[arg(long, env = "TCPSTALL_NO_ACK_PROBE")]
    pub no_ack_probe: bool,
    /// Turn on the kernel's BPF run-time accounting while the agent runs, so
    /// tcpstall_probe_runs_total and tcpstall_probe_run_seconds_total show
    /// what each kernel program costs (adds two clock reads per program run,
    /// for every BPF program on the node).
    #[arg(long, env = "TCPSTALL_PROGRAM_STATS")]
    pub program_stats: bool,
    /// Ring buffer size in bytes (power of two) [default: 4194304].
    #[arg(long, value_name = "BYTES", env = "TCPSTALL_RINGBUF_BYTES")]
    pub ringbuf_bytes: Option<u32>,
    /// Force the RTO/zero-window timer mechanism instead of the best that works.
    #[arg(long, value_enum, env = "TCPSTALL_MECHANISM")]
    pub mechanism: Option<ForceMechanism>,
    /// cgroup2 directory for the sock_ops fallback [default: the cgroup2 root].
    #[arg(long, value_name = "DIR", env = "TCPSTALL_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Maximum flows tracked; the least recently seen is evicted (counted) [default: 65536].
    #[arg(long, value_name = "N", env = "TCPSTALL_MAX_FLOWS")]
    pub max_flows: Option<usize>,
    /// Consecutive RTOs without ACK progress that make a `retransmit` stall [default: 2].
    #[arg(long, value_name = "N", env = "TCPSTALL_MIN_RTO_STREAK")]
    pub min_rto_streak: Option<u32>,
    /// A stall is "near horizon" when ETIMEDOUT is predicted within this many seconds [default: 60].
    #[arg(long, value_name = "SECS", env = "TCPSTALL_NEAR_HORIZON_SECS")]
    pub near_horizon_secs: Option<f64>,
    /// ... or when this fraction of the timeout budget is consumed [default: 0.5].
    #[arg(long, value_name = "FRACTION", env = "TCPSTALL_NEAR_HORIZON_FRACTION")]
    pub near_horizon_fraction: Option<f64>,
    /// Zero-window (persist) time before a `zero_window` stall is reported [default: 5].
    #[arg(long, value_name = "SECS", env = "TCPSTALL_ZERO_WINDOW_AFTER")]
    pub zero_window_after: Option<f64>,
    /// CLOSE_WAIT time before a `close_wait` stall is reported [default: 60].
    #[arg(long, value_name = "SECS", env = "TCPSTALL_CLOSE_WAIT_AFTER")]
    pub close_wait_after: Option<f64>,
    /// Stalled flows exported with per-flow metric series (most urgent first) [default: 50].
    #[arg(long, value_name = "N", env = "TCPSTALL_TOP_K_FLOWS")]
    pub top_k_flows: Option<usize>,
    /// Remote endpoints in the per-remote aggregation; the rest are summed [default: 100].
    #[arg(long, value_name = "N", env = "TCPSTALL_TOP_K_REMOTES")]
    pub top_k_remotes: Option<usize>,
    /// Distinct `remote` label values on counters before using `other` [default: 100].
    #[arg(long, value_name = "N", env = "TCPSTALL_MAX_REMOTE_LABELS")]
    pub max_remote_labels: Option<usize>,
    /// Root of the host's /proc, for pod identity (in a container: /host/proc) [default: /proc].
    #[arg(long, value_name = "DIR", env = "TCPSTALL_PROC")]
    pub proc_root: Option<PathBuf>,
    /// Seconds between safety-net socket sweeps while sweeps or events find
    /// trouble; 0 = sweep only at start-up and after lost events [default: 60].
    #[arg(long, value_name = "SECS", env = "TCPSTALL_SWEEP_INTERVAL")]
    pub sweep_interval: Option<f64>,
    /// On a quiet node the interval doubles after each periodic sweep that
    /// found nothing the events had missed, up to this many seconds; lost
    /// events, a stall or a sweep that finds one bring it back to
    /// --sweep-interval. Equal to --sweep-interval: a fixed interval
    /// [default: 4 x --sweep-interval].
    #[arg(long, value_name = "SECS", env = "TCPSTALL_SWEEP_INTERVAL_MAX")]
    pub sweep_interval_max: Option<f64>,
    /// Do not sweep the node's sockets at start-up (stalls in progress are
    /// then only seen from their next kernel event).
    #[arg(long, env = "TCPSTALL_NO_STARTUP_SWEEP")]
    pub no_startup_sweep: bool,
    /// Do not sweep after the kernel reports lost events (ring-buffer drops,
    /// recursion misses).
    #[arg(long, env = "TCPSTALL_NO_SWEEP_ON_LOSS")]
    pub no_sweep_on_loss: bool,
    /// Node name for the `node` label of the incident series (in a DaemonSet:
    /// spec.nodeName through the downward API) [default: the host name].
    #[arg(long, value_name = "NAME", env = "TCPSTALL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Incident groups (class, pod, remote) exported with their own labels;
    /// the rest are summed per class under remote="other" [default: 100].
    #[arg(long, value_name = "N", env = "TCPSTALL_MAX_INCIDENTS")]
    pub max_incidents: Option<usize>,
    /// containerd state directory (task bundles with the pods' annotations) [default: /run/containerd].
    #[arg(long, value_name = "DIR", env = "TCPSTALL_CONTAINERD_STATE")]
    pub containerd_state: Option<PathBuf>,
    /// CRI-O container storage state directory [default: /run/containers/storage].
    #[arg(long, value_name = "DIR", env = "TCPSTALL_CRIO_STATE")]
    pub crio_state: Option<PathBuf>,
    /// Docker root (containers started by cri-dockerd) [default: /var/lib/docker].
    #[arg(long, value_name = "DIR", env = "TCPSTALL_DOCKER_ROOT")]
    pub docker_root: Option<PathBuf>,
    /// kubelet root directory (pods/<uid>/etc-hosts) [default: /var/lib/kubelet].
    #[arg(long, value_name = "DIR", env = "TCPSTALL_KUBELET_ROOT")]
    pub kubelet_root: Option<PathBuf>,
    /// The guard's policy (TOML): arm TCP_USER_TIMEOUT / keepalive on new
    /// connections whose application left them unset, per namespace, pod or
    /// cgroup (see README "The guard"). Reloaded on SIGHUP and when the file
    /// changes; an invalid reload keeps the last good policy. Off without it.
    #[arg(long, value_name = "FILE", env = "TCPSTALL_GUARD_POLICY")]
    pub guard_policy: Option<PathBuf>,
    /// Kill switch: do not attach the guard even with --guard-policy.
    #[arg(long, env = "TCPSTALL_NO_GUARD")]
    pub no_guard: bool,
    /// `/healthz` fails (and the kubelet restarts the agent) when the event
    /// loop's heartbeat, which ticks every second even on an idle node, is
    /// older than this [default: 60].
    #[arg(long, value_name = "SECS", env = "TCPSTALL_LIVENESS_TIMEOUT")]
    pub liveness_timeout: Option<f64>,
}

/// The config file: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub log_events: Option<bool>,
    pub no_ack_probe: Option<bool>,
    pub program_stats: Option<bool>,
    pub ringbuf_bytes: Option<u32>,
    pub mechanism: Option<ForceMechanism>,
    pub cgroup: Option<PathBuf>,
    pub btf: Option<PathBuf>,
    pub max_flows: Option<usize>,
    pub min_rto_streak: Option<u32>,
    pub near_horizon_secs: Option<f64>,
    pub near_horizon_fraction: Option<f64>,
    pub zero_window_after: Option<f64>,
    pub close_wait_after: Option<f64>,
    pub top_k_flows: Option<usize>,
    pub top_k_remotes: Option<usize>,
    pub max_remote_labels: Option<usize>,
    pub proc_root: Option<PathBuf>,
    pub sweep_interval: Option<f64>,
    pub sweep_interval_max: Option<f64>,
    pub no_startup_sweep: Option<bool>,
    pub no_sweep_on_loss: Option<bool>,
    pub node_name: Option<String>,
    pub max_incidents: Option<usize>,
    pub containerd_state: Option<PathBuf>,
    pub crio_state: Option<PathBuf>,
    pub docker_root: Option<PathBuf>,
    pub kubelet_root: Option<PathBuf>,
    pub guard_policy: Option<PathBuf>,
    pub no_guard: Option<bool>,
    pub liveness_timeout: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key} {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The resolved settings for `tcpstall run`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    pub log_level: String,
    pub log_events: bool,
    pub no_ack_probe: bool,
    pub program_stats: bool,
    pub ringbuf_bytes: u32,
    pub mechanism: Option<Mechanism>,
    pub cgroup: Option<PathBuf>,
    pub btf: Option<PathBuf>,
    /// `--deny-program`.
    pub deny_programs: Vec<String>,
    pub max_flows: usize,
    pub min_rto_streak: u32,
    pub near_horizon: Duration,
    pub near_horizon_fraction: f64,
    pub zero_window_after: Duration,
    pub close_wait_after: Duration,
    pub top_k_flows: usize,
    pub top_k_remotes: usize,
    pub max_remote_labels: usize,
    pub proc_root: PathBuf,
    /// None = no periodic sweep.
    pub sweep_interval: Option<Duration>,
    /// The longest gap between periodic sweeps on a quiet node (at least
    /// `sweep_interval`; see [`crate::sweep::SweepPolicy`]).
    pub sweep_interval_max: Duration,
    pub startup_sweep: bool,
    pub sweep_on_loss: bool,
    pub node_name: String,
    pub max_incidents: usize,
    /// containerd / CRI-O / Docker / kubelet state roots.
    pub runtimes: crate::identity::RuntimeRoots,
    /// The guard's policy file (None: the guard is off).
    pub guard_policy: Option<PathBuf>,
    /// `--no-guard`: the kill switch (wins over the policy).
    pub no_guard: bool,
    /// `/healthz` fails when the event loop's heartbeat is older.
    pub liveness_timeout: Duration,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9977";

impl Default for Settings {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Settings {
            listen: SocketAddr::from_str(DEFAULT_LISTEN).expect("valid default"),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            log_events: false,
            no_ack_probe: false,
            program_stats: false,
            ringbuf_bytes: tcpstall_common::DEFAULT_RINGBUF_BYTES,
            mechanism: None,
            cgroup: None,
            btf: None,
            deny_programs: Vec::new(),
            max_flows: engine.max_flows,
            min_rto_streak: engine.min_rto_streak,
            near_horizon: Duration::from_secs_f64(engine.near_horizon_secs),
            near_horizon_fraction: engine.near_horizon_fraction,
            zero_window_after: engine.zero_window_after,
            close_wait_after: engine.close_wait_after,
            top_k_flows: 50,
            top_k_remotes: engine.top_remotes,
            max_remote_labels: 100,
            proc_root: PathBuf::from("/proc"),
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_interval_max: Duration::from_secs(240),
            startup_sweep: true,
            sweep_on_loss: true,
            node_name: String::new(),
            max_incidents: 100,
            runtimes: crate::identity::RuntimeRoots::default(),
            guard_policy: None,
            no_guard: false,
            // serve::state::LIVENESS_TIMEOUT (the server's own default).
            liveness_timeout: Duration::from_secs(60),
        }
    }
}

pub fn load_file(path: &Path) -> Result<FileConfig, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|err| SettingsError::Read {
        path: path.to_owned(),
        err,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned()
            + &e.span()
                .map(|s| format!(" (at byte {})", s.start))
                .unwrap_or_default(),
    })
}

fn secs(key: &'static str, v: f64) -> Result<Duration, SettingsError> {
    if v.is_finite() && (0.0..1e9).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(SettingsError::Invalid {
            key,
            value: v.to_string(),
            why: "expected a number of seconds >= 0",
        })
    }
}

/// `v` as a duration when given, else `default`.
fn secs_or(
    key: &'static str,
    v: Option<f64>,
    default: Duration,
) -> Result<Duration, SettingsError> {
    v.map_or(Ok(default), |v| secs(key, v))
}

fn positive(key: &'static str, v: usize) -> Result<usize, SettingsError> {
    if v == 0 {
        Err(SettingsError::Invalid {
            key,
            value: v.to_string(),
            why: "must be at least 1",
        })
    } else {
        Ok(v)
    }
}

impl Settings {
    pub fn resolve(args: &RunArgs) -> Result<Self, SettingsError> {
        let file = match &args.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(a: &RunArgs, f: FileConfig) -> Result<Self, SettingsError> {
        let d = Settings::default();
        let listen = match (a.listen, f.listen) {
            (Some(l), _) => l,
            (None, Some(s)) => SocketAddr::from_str(&s).map_err(|_| SettingsError::Invalid {
                key: "listen",
                value: s.clone(),
                why: "expected ADDR:PORT, e.g. 127.0.0.1:9977",
            })?,
            (None, None) => d.listen,
        };
        let ringbuf_bytes = a
            .ringbuf_bytes
            .or(f.ringbuf_bytes)
            .unwrap_or(d.ringbuf_bytes);
        if !ringbuf_bytes.is_power_of_two() || ringbuf_bytes < 4096 {
            return Err(SettingsError::Invalid {
                key: "ringbuf_bytes",
                value: ringbuf_bytes.to_string(),
                why: "must be a power of two >= 4096",
            });
        }
        let fraction = a
            .near_horizon_fraction
            .or(f.near_horizon_fraction)
            .unwrap_or(d.near_horizon_fraction);
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(SettingsError::Invalid {
                key: "near_horizon_fraction",
                value: fraction.to_string(),
                why: "must be in (0, 1]",
            });
        }
        let min_rto_streak = a
            .min_rto_streak
            .or(f.min_rto_streak)
            .unwrap_or(d.min_rto_streak);
        if min_rto_streak == 0 {
            return Err(SettingsError::Invalid {
                key: "min_rto_streak",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        let sweep_interval = match a.sweep_interval.or(f.sweep_interval) {
            Some(v) => Some(secs("sweep_interval", v)?).filter(|d| !d.is_zero()),
            None => d.sweep_interval,
        };
        let sweep_interval_max = match a.sweep_interval_max.or(f.sweep_interval_max) {
            Some(v) => {
                let max = secs("sweep_interval_max", v)?;
                if sweep_interval.is_some_and(|i| max < i) {
                    return Err(SettingsError::Invalid {
                        key: "sweep_interval_max",
                        value: v.to_string(),
                        why: "must be at least --sweep-interval (equal: a fixed interval)",
                    });
                }
                max
            }
            None => sweep_interval.map_or(d.sweep_interval_max, |i| i * 4),
        };
        Ok(Settings {
            listen,
            log_format: a.common.log_format.or(f.log_format).unwrap_or(d.log_format),
            log_level: a
                .common
                .log_level
                .clone()
                .or(f.log_level)
                .unwrap_or(d.log_level),
            log_events: a.log_events || f.log_events.unwrap_or(d.log_events),
            no_ack_probe: a.no_ack_probe || f.no_ack_probe.unwrap_or(d.no_ack_probe),
            program_stats: a.program_stats || f.program_stats.unwrap_or(d.program_stats),
            ringbuf_bytes,
            mechanism: a.mechanism.or(f.mechanism).map(Into::into).or(d.mechanism),
            cgroup: a.cgroup.clone().or(f.cgroup).or(d.cgroup),
            btf: a.common.btf.clone().or(f.btf).or(d.btf),
            deny_programs: a.common.deny_program.clone(),
            max_flows: positive(
                "max_flows",
                a.max_flows.or(f.max_flows).unwrap_or(d.max_flows),
            )?,
            min_rto_streak,
            near_horizon: secs_or(
                "near_horizon_secs",
                a.near_horizon_secs.or(f.near_horizon_secs),
                d.near_horizon,
            )?,
            near_horizon_fraction: fraction,
            zero_window_after: secs_or(
                "zero_window_after",
                a.zero_window_after.or(f.zero_window_after),
                d.zero_window_after,
            )?,
            close_wait_after: secs_or(
                "close_wait_after",
                a.close_wait_after.or(f.close_wait_after),
                d.close_wait_after,
            )?,
            top_k_flows: positive(
                "top_k_flows",
                a.top_k_flows.or(f.top_k_flows).unwrap_or(d.top_k_flows),
            )?,
            top_k_remotes: positive(
                "top_k_remotes",
                a.top_k_remotes
                    .or(f.top_k_remotes)
                    .unwrap_or(d.top_k_remotes),
            )?,
            max_remote_labels: positive(
                "max_remote_labels",
                a.max_remote_labels
                    .or(f.max_remote_labels)
                    .unwrap_or(d.max_remote_labels),
            )?,
            proc_root: a.proc_root.clone().or(f.proc_root).unwrap_or(d.proc_root),
            sweep_interval,
            sweep_interval_max,
            startup_sweep: !(a.no_startup_sweep || f.no_startup_sweep.unwrap_or(!d.startup_sweep)),
            sweep_on_loss: !(a.no_sweep_on_loss || f.no_sweep_on_loss.unwrap_or(!d.sweep_on_loss)),
            node_name: node_name(a.node_name.clone().or(f.node_name))?,
            guard_policy: a.guard_policy.clone().or(f.guard_policy),
            no_guard: a.no_guard || f.no_guard.unwrap_or(d.no_guard),
            max_incidents: positive(
                "max_incidents",
                a.max_incidents
                    .or(f.max_incidents)
                    .unwrap_or(d.max_incidents),
            )?,
            runtimes: crate::identity::RuntimeRoots {
                containerd: a
                    .containerd_state
                    .clone()
                    .or(f.containerd_state)
                    .unwrap_or(d.runtimes.containerd),
                crio: a
                    .crio_state
                    .clone()
                    .or(f.crio_state)
                    .unwrap_or(d.runtimes.crio),
                docker: a
                    .docker_root
                    .clone()
                    .or(f.docker_root)
                    .unwrap_or(d.runtimes.docker),
                kubelet: a
                    .kubelet_root
                    .clone()
                    .or(f.kubelet_root)
                    .unwrap_or(d.runtimes.kubelet),
            },
            liveness_timeout: match a.liveness_timeout.or(f.liveness_timeout) {
                Some(v) if v > 0.0 => secs("liveness_timeout", v)?,
                Some(v) => {
                    return Err(SettingsError::Invalid {
                        key: "liveness_timeout",
                        value: v.to_string(),
                        why: "expected a number of seconds > 0",
                    });
                }
                None => d.liveness_timeout,
            },
        })
    }
}

/// The node name: as given (non-empty, a valid label value is any UTF-8), or
/// the kernel's host name.
fn node_name(given: Option<String>) -> Result<String, SettingsError> {
    match given {
        Some(n) if n.trim().is_empty() => Err(SettingsError::Invalid {
            key: "node_name",
            value: format!("{n:?}"),
            why: "must not be empty (unset it to use the host name)",
        }),
        Some(n) => Ok(n.trim().to_owned()),
        None => Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use super::*;

    /// Serialises parsing with the test that sets `TCPSTALL_*` variables
    /// (the environment is process-wide).
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    fn env_lock() -> MutexGuard<'static, ()> {
        ENV_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn node_name_and_max_incidents() {
        let s = Settings::merge(
            &parse(&["--node-name", "node-a", "--max-incidents", "7"]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(s.node_name, "node-a");
        assert_eq!(s.max_incidents, 7);
        let err = Settings::merge(&parse(&["--node-name", " "]), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("node_name"), "{err}");
        let err = Settings::merge(&parse(&["--max-incidents", "0"]), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_incidents"), "{err}");
        let d = Settings::merge(&parse(&[]), FileConfig::default()).unwrap();
        assert_eq!(d.max_incidents, 100);
    }

    fn parse(args: &[&str]) -> RunArgs {
        let _env = env_lock();
        parse_locked(args)
    }

    fn parse_locked(args: &[&str]) -> RunArgs {
        let mut v = vec!["tcpstall", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Run(r) => *r,
            Command::Doctor(_) | Command::Top(_) => unreachable!(),
        }
    }

    /// Flag > environment > file > default, for values and switches.
    /// Mutation checked: `f.min_rto_streak.or(a.min_rto_streak)` in `merge`
    /// fails it ("environment beats file").
    #[test]
    fn precedence_flag_env_file_default() {
        let file: FileConfig = toml::from_str(
            "max_flows = 10\nmin_rto_streak = 5\ntop_k_flows = 7\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let env = [
            ("TCPSTALL_MAX_FLOWS", "20"),
            ("TCPSTALL_MIN_RTO_STREAK", "6"),
            ("TCPSTALL_LOG_EVENTS", "true"),
        ];
        let args = {
            let _env = env_lock();
            for (k, v) in env {
                // SAFETY: every test that reads the environment holds ENV_LOCK.
                unsafe { std::env::set_var(k, v) };
            }
            let args = parse_locked(&["--max-flows", "30"]);
            for (k, _) in env {
                // SAFETY: as above.
                unsafe { std::env::remove_var(k) };
            }
            args
        };
        let s = Settings::merge(&args, file).unwrap();
        let d = Settings::default();
        assert_eq!(s.max_flows, 30, "flag beats environment and file");
        assert_eq!(s.min_rto_streak, 6, "environment beats file");
        assert!(s.log_events, "a switch from the environment");
        assert_eq!(s.top_k_flows, 7, "file beats default");
        assert_eq!(s.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(s.top_k_remotes, d.top_k_remotes, "default");
        assert_eq!(s.near_horizon, d.near_horizon, "default");
    }

    /// Every flag can be set from the environment as `TCPSTALL_<FLAG>`
    /// (the one documented exception: `--proc-root` reads `TCPSTALL_PROC`).
    /// Mutation checked: dropping `env` from `--top-k-remotes` fails it.
    #[test]
    fn every_flag_has_its_environment_variable() {
        use clap::CommandFactory as _;
        let cli = Cli::command();
        let mut checked = 0;
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let expected = match long {
                    "proc-root" => "TCPSTALL_PROC".to_owned(),
                    l => format!("TCPSTALL_{}", l.replace('-', "_").to_uppercase()),
                };
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert_eq!(env.as_deref(), Some(expected.as_str()), "--{long}");
                checked += 1;
            }
        }
        assert!(checked > 20, "only {checked} flags seen");
    }

    #[test]
    fn defaults() {
        let s = Settings::merge(&parse(&[]), FileConfig::default()).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9977".parse().unwrap());
        assert_eq!(s.max_flows, 65_536);
        assert_eq!(s.min_rto_streak, 2);
        assert_eq!(s.near_horizon, Duration::from_secs(60));
        assert_eq!(s.top_k_flows, 50);
    }

    #[test]
    fn flag_beats_file() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:1\"\nmax_flows = 10\n").unwrap();
        let s = Settings::merge(&parse(&["--listen", "127.0.0.1:2"]), file).unwrap();
        assert_eq!(s.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(s.max_flows, 10);
    }

    #[test]
    fn runtime_roots() {
        let s = Settings::merge(&parse(&[]), FileConfig::default()).unwrap();
        assert_eq!(s.runtimes, crate::identity::RuntimeRoots::default());
        let file: FileConfig =
            toml::from_str("crio_state = \"/f/crio\"\nkubelet_root = \"/f/kubelet\"\n").unwrap();
        let s = Settings::merge(&parse(&["--kubelet-root", "/a/kubelet"]), file).unwrap();
        assert_eq!(s.runtimes.crio, PathBuf::from("/f/crio"));
        assert_eq!(s.runtimes.kubelet, PathBuf::from("/a/kubelet"));
        assert_eq!(s.runtimes.containerd, PathBuf::from("/run/containerd"));
    }

    /// The quiet-node ceiling of the sweep interval: 4 x the interval
    /// unless given, at least the interval (equal: fixed).
    /// Mutation: `i * 4` -> `i` in `Settings::merge` fails the defaults.
    #[test]
    fn sweep_interval_max_defaults_to_four_intervals() {
        let get = |args: &[&str]| {
            let s = Settings::merge(&parse(args), FileConfig::default()).unwrap();
            (s.sweep_interval, s.sweep_interval_max)
        };
        let secs = Duration::from_secs;
        assert_eq!(get(&[]), (Some(secs(60)), secs(240)));
        assert_eq!(get(&["--sweep-interval", "10"]), (Some(secs(10)), secs(40)));
        assert_eq!(
            get(&["--sweep-interval", "10", "--sweep-interval-max", "10"]),
            (Some(secs(10)), secs(10))
        );
        assert_eq!(get(&["--sweep-interval", "0"]).0, None);
        let e = Settings::merge(
            &parse(&["--sweep-interval", "60", "--sweep-interval-max", "30"]),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sweep_interval_max") && e.contains("--sweep-interval"),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert!(toml::from_str::<FileConfig>("bogus = 1\n").is_err());
        let bad = |args: &[&str]| {
            Settings::merge(&parse(args), FileConfig::default())
                .unwrap_err()
                .to_string()
        };
        assert!(bad(&["--ringbuf-bytes", "1000"]).contains("power of two"));
        assert!(bad(&["--near-horizon-fraction", "0"]).contains("(0, 1]"));
        assert!(bad(&["--max-flows", "0"]).contains("at least 1"));
        assert!(bad(&["--near-horizon-secs=-1"]).contains("seconds"));
        let file: FileConfig = toml::from_str("listen = \"nope\"\n").unwrap();
        assert!(
            Settings::merge(&parse(&[]), file)
                .unwrap_err()
                .to_string()
                .contains("ADDR:PORT")
        );
        assert!(Cli::try_parse_from(["tcpstall", "run", "--listen", "x"]).is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tcpstall-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "max_flows = \"many\"\n").unwrap();
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        let e = load_file(&dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
