//! `cargo xtask record-fixtures`: the engine's replay fixtures, recorded on
//! this kernel and in the QEMU guests (or collected from saved outputs).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use xtask::vm;

use crate::{
    cmd::{
        build::{build_agent, build_scenarios},
        vm_test::vm_matrix,
    },
    setup,
    util::{require_root, step, workspace_root},
};

/// The scenarios whose event streams become replay fixtures (all in
/// `VM_TESTS`, so the guests already run them).
const FIXTURE_TESTS: &[&str] = &[
    "s1_horizon_retries2_3",
    "s1_horizon_retries2_5",
    "s2_user_timeout",
    // connect() to a blackhole: one fixture per socket (tcp_syn_retries 4,
    // TCP_SYNCNT 2, TCP_USER_TIMEOUT 5 s).
    "connect::connect_horizon",
    // Keepalive deaths: TCP_KEEPCNT 4, the netns's 3 probes, TCP_USER_TIMEOUT.
    "keepalive::keepalive_horizon",
    // An orphan retransmitting its FIN (tcp_orphan_retries 3).
    "orphan::orphan_fin_retries_3",
    // The zero-window probe path killed by TCP_USER_TIMEOUT 5 s.
    "orphan::zero_window_user_timeout_dies",
    // Orphans in FIN_WAIT2: tcp_fin_timeout 5 s, TCP_LINGER2 3 s and 63 s.
    "orphan::fin_wait2_timeouts",
];

pub fn run(vm: vm::VmOptions, from_logs: Vec<PathBuf>, only: Vec<String>) -> anyhow::Result<()> {
    if !from_logs.is_empty() {
        let mut outputs = Vec::new();
        for log in &from_logs {
            let bytes = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
            outputs.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        let _ = vm;
        fixtures::write(&outputs)?;
        return Ok(());
    }
    setup::toolchain()?;
    require_root("`cargo xtask record-fixtures` (real connections in namespaces)")?;
    setup::system_packages()?;
    setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
    let agent = build_agent()?;
    let scenarios = build_scenarios()?;
    for t in &only {
        if !FIXTURE_TESTS.contains(&t.as_str()) {
            bail!(
                "--test {t}: not a fixture test (one of {})",
                FIXTURE_TESTS.join(", ")
            );
        }
    }
    let tests: Vec<String> = FIXTURE_TESTS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
        .map(|s| s.to_string())
        .collect();
    step("replay fixtures on this kernel");
    let out = Command::new(&scenarios)
        .args(["--test-threads=1", "--nocapture", "--exact"])
        .args(&tests)
        .env("TCPSTALL_AGENT_BIN", &agent)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the horizon scenarios")?;
    if !out.status.success() {
        bail!("a horizon scenario failed on this kernel (output above)");
    }
    let mut outputs = vec![String::from_utf8_lossy(&out.stdout).into_owned()];
    let passes = vm_matrix(&vm, &agent, &tests)?;
    for r in passes.iter().flat_map(|p| &p.results) {
        let log = &r.console_log;
        outputs.push(
            String::from_utf8_lossy(
                &std::fs::read(log).with_context(|| format!("reading {}", log.display()))?,
            )
            .into_owned(),
        );
    }
    fixtures::write(&outputs)?;
    Ok(())
}

/// Replay fixtures printed by the scenarios (`REPLAY-FIXTURE <file> <json>`).
mod fixtures {
    use std::collections::BTreeMap;

    use anyhow::Context;

    /// Collects the fixtures from `outputs` and writes them.
    pub fn write(outputs: &[String]) -> anyhow::Result<()> {
        let dir = super::workspace_root().join("tcpstall-tests/fixtures/replay");
        std::fs::create_dir_all(&dir)?;
        for (file, lines) in collect(outputs)? {
            let path = dir.join(&file);
            std::fs::write(&path, lines.join("\n") + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({} lines)", path.display(), lines.len());
        }
        Ok(())
    }

    /// Fixture files and their lines from test outputs (host stdout, guest
    /// console logs). A line that is not valid JSON (a console line broken
    /// by kernel messages) fails: a fixture must be complete.
    pub fn collect(outputs: &[String]) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for out in outputs {
            for line in out.lines() {
                let Some((_, rest)) = line.split_once("REPLAY-FIXTURE ") else {
                    continue;
                };
                let (file, json) = rest
                    .trim_end()
                    .split_once(' ')
                    .ok_or_else(|| anyhow::anyhow!("malformed fixture line: {line}"))?;
                let v: serde_json::Value = serde_json::from_str(json)
                    .map_err(|e| anyhow::anyhow!("fixture {file}: broken line ({e}): {line}"))?;
                if v.get("fixture").is_some() {
                    // A header starts the file afresh (a re-run replaces it).
                    files.insert(file.to_owned(), Vec::new());
                }
                files
                    .get_mut(file)
                    .ok_or_else(|| anyhow::anyhow!("fixture {file}: events before its header"))?
                    .push(v.to_string());
            }
        }
        anyhow::ensure!(
            !files.is_empty(),
            "no REPLAY-FIXTURE lines in the test output"
        );
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    /// Every fixture test runs in the guests anyway (`VM_TESTS`), so
    /// recording its fixtures there adds no test the matrix lacks.
    #[test]
    fn every_fixture_test_is_a_vm_test() {
        for t in super::FIXTURE_TESTS {
            assert!(
                crate::cmd::vm_test::VM_TESTS.contains(t),
                "{t} is not in VM_TESTS"
            );
        }
    }
}
