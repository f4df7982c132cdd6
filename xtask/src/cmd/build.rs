//! `cargo xtask build`, and the builds other commands need: the agent and
//! the tcpstall-tests test binaries.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::{
    setup,
    util::{cargo, run_cmd, step, workspace_root},
};

pub fn run() -> anyhow::Result<()> {
    setup::toolchain()?;
    build_agent()?;
    Ok(())
}

/// Build the agent (release) and return the binary's path.
pub fn build_agent() -> anyhow::Result<PathBuf> {
    step("building tcpstall (eBPF programs via nightly + bpf-linker, agent via stable)");
    let t = std::time::Instant::now();
    run_cmd(cargo().args(["build", "--release", "-p", "tcpstall"]))?;
    let bin = workspace_root().join("target/release/tcpstall");
    eprintln!("    built {} in {:.0?}", bin.display(), t.elapsed());
    Ok(bin)
}

/// Build the scenario test binary and return its path.
pub fn build_scenarios() -> anyhow::Result<PathBuf> {
    build_test_binary("scenarios")
}

/// Build one tcpstall-tests test target and return its executable.
pub fn build_test_binary(target: &str) -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "tcpstall-tests",
            "--test",
            target,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("building the {target} tests"))?;
    if !out.status.success() {
        bail!("building the {target} tests failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == target)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo did not report the {target} test executable"))
}
