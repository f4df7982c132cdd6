//! Developer tool: run a payload on Debian kernels under QEMU with xtask's VM
//! module, without the rest of xtask.
//!
//! cargo run -p xtask --bin vm-smoke -- --agent A --tests T [KERNEL...] [-- TEST-ARGS...]
//! cargo run -p xtask --bin vm-smoke -- --btf-only [KERNEL...]

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use xtask::vm;

/// Run a payload (agent + tests) on Debian kernels under QEMU, or extract their BTF.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    vm: vm::VmOptions,
    /// Binary installed as /bin/tcpstall in the guest.
    #[arg(long, required_unless_present_any = ["btf_only", "btf_from_guest"])]
    agent: Option<PathBuf>,
    /// Binary or script installed as /bin/tcpstall-tests-bin and run by /init.
    #[arg(long, required_unless_present_any = ["btf_only", "btf_from_guest"])]
    tests: Option<PathBuf>,
    /// Extra guest environment, NAME=VALUE.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Also extract BTF into this directory after the run (or only, with --btf-only).
    #[arg(long, value_name = "DIR")]
    btf_dir: Option<PathBuf>,
    /// Only extract BTF (to --btf-dir or .cache/btf).
    #[arg(long)]
    btf_only: bool,
    /// Exercise the fallback: read BTF inside the guest, compare with the ELF route.
    #[arg(long)]
    btf_from_guest: bool,
    /// Arguments for the test binary.
    #[arg(last = true)]
    test_args: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let btf_dir = cli.btf_dir.clone().unwrap_or_else(vm::default_btf_dir);
    if cli.btf_from_guest {
        for k in &cli.vm.kernels {
            let guest = vm::btf_from_guest_spec(&cli.vm, k)?;
            let elf = vm::extract_btf_with(
                &vm::VmOptions {
                    kernels: vec![k.clone()],
                    ..cli.vm.clone()
                },
                &btf_dir,
            )?;
            let file = std::fs::read(&elf[0])?;
            println!(
                "{k}: guest BTF {} bytes, ELF-route BTF {} bytes, identical: {}",
                guest.len(),
                file.len(),
                guest == file
            );
        }
        return Ok(());
    }
    if cli.btf_only {
        for p in vm::extract_btf_with(&cli.vm, &btf_dir)? {
            println!("{}", p.display());
        }
        return Ok(());
    }
    let extra_env = cli
        .env
        .iter()
        .map(|e| {
            let (k, v) = e
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--env {e}: expected NAME=VALUE"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let payload = vm::GuestPayload {
        agent: cli.agent.clone().unwrap(),
        tests: cli.tests.clone().unwrap(),
        test_args: cli.test_args.clone(),
        extra_env,
        extra_bins: Vec::new(),
        expected_passed: None,
    };
    let results = vm::vm_test(&cli.vm, &payload)?;
    for r in &results {
        println!(
            "{}: {} release={} boot={:?} total={:.1}s log={}",
            r.kernel,
            r.summary,
            r.release,
            r.boot_time.map(|d| d.as_secs_f64()),
            r.total_time.as_secs_f64(),
            r.console_log.display()
        );
    }
    if cli.btf_dir.is_some() {
        for p in vm::extract_btf_with(&cli.vm, &btf_dir)? {
            println!("BTF: {}", p.display());
        }
    }
    if results.iter().any(|r| !r.passed) {
        std::process::exit(1);
    }
    Ok(())
}
