//! `cargo xtask accuracy`: the horizon predictor measured on this kernel.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{
    cmd::build::{build_agent, build_scenarios},
    setup,
    util::{require_root, step},
};

pub fn run() -> anyhow::Result<()> {
    setup::toolchain()?;
    require_root("`cargo xtask accuracy` (real connections in namespaces)")?;
    setup::system_packages()?;
    let agent = build_agent()?;
    let scenarios = build_scenarios()?;
    step(
        "blackholed connections: tcp_retries2 = 3, 5, 8 and TCP_USER_TIMEOUT = 4000 ms (about 2.5 minutes)",
    );
    let out = Command::new(&scenarios)
        .args([
            "--test-threads=1",
            "--nocapture",
            "s1_horizon",
            "s2_user_timeout",
        ])
        .env("TCPSTALL_AGENT_BIN", &agent)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("running the horizon scenarios")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rows: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ACCURACY "))
        .collect();
    println!(
        "\nkernel {}\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    println!(
        "| tcp_retries2 | TCP_USER_TIMEOUT | boundary | ETIMEDOUT after write | first prediction ahead by | its error | last prediction error | RTOs when flagged |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    if !out.status.success() {
        eprintln!("{stderr}");
        bail!("a horizon scenario failed (output above)");
    }
    Ok(())
}
