//! iperf3 over a veth pair (MTU 1500) between two namespaces: interleaved
//! runs without the agent, with it at defaults, and with `--no-ack-probe`.

use std::{path::Path, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail};
use tcpstall_tests::Link;

use super::procs::{Agent, NsProcess};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Without,
    Defaults,
    NoAckProbe,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Without, Mode::Defaults, Mode::NoAckProbe];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Without => "without the agent",
            Mode::Defaults => "agent at defaults (ACK probe on)",
            Mode::NoAckProbe => "agent with --no-ack-probe",
        }
    }
}

/// Gbit/s of every run, per mode (in `Mode::ALL` order).
pub struct IperfResult {
    pub runs: [Vec<f64>; 3],
    pub secs: u64,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Per-round ratios `with[r] / without[r]`: median, min, max.
pub fn paired_ratios(without: &[f64], with: &[f64]) -> (f64, f64, f64) {
    let r: Vec<f64> = without.iter().zip(with).map(|(a, b)| b / a).collect();
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(&r), lo, hi)
}

fn one_run(link: &Link, secs: u64) -> anyhow::Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &link.a.name, "iperf3", "-J", "-t"])
        .arg(secs.to_string())
        .arg("-c")
        .arg(link.b_ip.to_string())
        .output()
        .context("running iperf3 (apt-get install iperf3, or `cargo xtask setup`)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

pub fn run(agent: &Path, runs: usize, secs: u64) -> anyhow::Result<IperfResult> {
    let link = Link::new("kbip", 252);
    for (ns, dev) in [(&link.a, "va-kbip"), (&link.b, "vb-kbip")] {
        ns.exec(&format!("ip link set dev {dev} mtu 1500"));
    }
    let _server = NsProcess::start(
        &link.b.name,
        &["iperf3", "-s", "-B", &link.b_ip.to_string()],
    )?;
    thread::sleep(Duration::from_secs(1));
    let mut res = IperfResult {
        runs: [Vec::new(), Vec::new(), Vec::new()],
        secs,
    };
    for round in 0..runs {
        // Rotate the order so no mode always runs first or last.
        for k in 0..3 {
            let i = (round + k) % 3;
            let mode = Mode::ALL[i];
            let _agent = match mode {
                Mode::Without => None,
                Mode::Defaults => Some(Agent::start(agent, &[])?),
                Mode::NoAckProbe => Some(Agent::start(agent, &["--no-ack-probe"])?),
            };
            let g = one_run(&link, secs)?;
            eprintln!(
                "    iperf3 round {}/{runs}: {:<34} {g:.2} Gbit/s",
                round + 1,
                mode.label()
            );
            res.runs[i].push(g);
        }
    }
    Ok(res)
}
