//! Per-program run counts and run time as the kernel keeps them
//! (`bpf_prog_info.run_cnt` / `run_time_ns`, read with `bpftool --json`), and
//! which tracepoint each of a process's perf-event attachments is on.

use std::{collections::HashMap, process::Command};

use anyhow::{Context as _, bail};

/// One program's kernel counters at one instant.
#[derive(Debug, Clone, Default)]
pub struct ProgStat {
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    /// Maps the program uses.
    pub map_ids: Vec<u32>,
}

pub fn bpftool_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .context("running bpftool (apt-get install bpftool, or `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {} JSON", args.join(" ")))
}

/// Every loaded program by id.
pub fn all() -> anyhow::Result<HashMap<u32, ProgStat>> {
    let v = bpftool_json(&["prog", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let id = p["id"].as_u64()? as u32;
            Some((
                id,
                ProgStat {
                    name: p["name"].as_str().unwrap_or_default().to_owned(),
                    // Absent while zero.
                    run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                    run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                    map_ids: p["map_ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| Some(m.as_u64()? as u32))
                        .collect(),
                },
            ))
        })
        .collect())
}

/// (program id, tracepoint name) of every tracepoint attachment held by `pid`.
pub fn tracepoints_of(pid: u32) -> anyhow::Result<Vec<(u32, String)>> {
    let v = bpftool_json(&["perf", "list"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["pid"].as_u64() == Some(u64::from(pid)))
        .filter_map(|a| {
            Some((
                a["prog_id"].as_u64()? as u32,
                a["tracepoint"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// Runs and run time of `id` between two snapshots.
pub fn delta(
    before: &HashMap<u32, ProgStat>,
    after: &HashMap<u32, ProgStat>,
    id: u32,
) -> (u64, u64) {
    let a = after.get(&id).cloned().unwrap_or_default();
    let b = before.get(&id).cloned().unwrap_or_default();
    (
        a.run_cnt.saturating_sub(b.run_cnt),
        a.run_time_ns.saturating_sub(b.run_time_ns),
    )
}
