//! The kernel bench of `cargo xtask bench --kernel`, as a binary of its own:
//! `cargo xtask bench --kernel --vm` runs it inside each guest (where there
//! is no cargo) and cuts the report out of the console log.
//!
//! kernel-bench --agent PATH [BENCH OPTIONS]   (root)

use std::path::PathBuf;

use clap::Parser;
use xtask::kernel_bench::{BenchOptions, run_and_print};

#[derive(Parser)]
struct Cli {
    /// The tcpstall binary.
    #[arg(long, env = "TCPSTALL_AGENT_BIN")]
    agent: PathBuf,
    /// The command line to print in the report.
    #[arg(long, default_value = "kernel-bench")]
    shown_command: String,
    #[command(flatten)]
    opts: BenchOptions,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    run_and_print(&cli.agent, &cli.opts, &cli.shown_command, true)
}
