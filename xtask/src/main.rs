//! `cargo xtask`: build, run and test automation for tcpstall.
//!
//! Every command first makes sure the toolchain it needs is installed (nightly
//! `rust-src`, a bpf-linker built against nightly's own LLVM, Debian packages),
//! so the README's two commands work on a fresh machine.
mod cmd;
mod image;
mod kernel_bench_vm;
mod setup;
mod util;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use xtask::vm;

use crate::cmd::vm_test::VM_TESTS;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test tcpstall (installs what it needs)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and Debian packages (idempotent).
    Setup {
        /// Only the Rust/eBPF toolchain (no Debian or PyPI packages).
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the eBPF programs and the agent (release).
    Build,
    /// Build and run the agent as root. Arguments after `--` go to `tcpstall`
    /// [default: run --log-events --listen 127.0.0.1:9977].
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Everything CI runs: unit tests, deploy checks, privileged scenario tests
    /// on this kernel (root), and the kernel matrix under QEMU.
    Test {
        /// Run only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Filter passed to the privileged scenario tests on this kernel.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the QEMU kernel matrix (it runs by default, as in CI).
        #[arg(long)]
        no_vm: bool,
        /// Also boot the oldest kernel the agent runs on (`vm::OLDEST_KERNEL`,
        /// Debian bullseye's 5.10: no sweep, no error_report probe) in the
        /// matrix, after the default kernels (about 5 more minutes).
        #[arg(long, conflicts_with = "no_vm")]
        vm_oldest: bool,
    },
    /// Measure the horizon predictor on this kernel: real blackholed
    /// connections with tcp_retries2 3, 5, 8 and TCP_USER_TIMEOUT 4 s;
    /// prints predicted vs actual ETIMEDOUT as a Markdown table.
    Accuracy,
    /// Criterion benchmarks (decoder, engine hot path, BTF start-up cost;
    /// as root also the socket sweep at 100,000 sockets). With `--kernel`,
    /// only the kernel part instead: tcpstall's kernel programs side by side
    /// with a bpftrace script on the same tracepoints (ns/run from the
    /// kernel's BPF run-time statistics, quiet and storm phases) and iperf3
    /// over veth without/with the agent, as a Markdown table (root).
    Bench {
        /// Run only the kernel bench (not criterion).
        #[arg(long)]
        kernel: bool,
        #[command(flatten)]
        opts: xtask::kernel_bench::BenchOptions,
        /// With --kernel: run the kernel bench inside these Debian kernels
        /// under QEMU instead of on this kernel (`--vm` alone: 6.1 and 6.12).
        #[arg(long, value_name = "KERNEL", num_args = 0.., requires = "kernel")]
        vm: Option<Vec<String>>,
        /// With --vm: cache for kernels and initramfs (as for vm-test).
        #[arg(long, value_name = "DIR", requires = "vm")]
        vm_cache_dir: Option<PathBuf>,
        /// With --vm: kill a guest that has not finished after this long.
        #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = vm::parse_duration)]
        vm_timeout: std::time::Duration,
        /// Criterion arguments, e.g. a benchmark name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the agent as a static binary (musl) and the FROM scratch image
    /// (Containerfile) with podman.
    Image {
        /// Image name and tag, e.g. registry.example.com/platform/tcpstall:0.1.0.
        #[arg(long, default_value = image::DEFAULT_TAG)]
        tag: String,
    },
    /// Record the engine's replay fixtures (`tcpstall-tests/fixtures/replay/`):
    /// S1 (tcp_retries2 = 3 and 5) and S2 (TCP_USER_TIMEOUT = 4 s) on this
    /// kernel and in the QEMU guests, each with its measured ETIMEDOUT
    /// (root; about 10 minutes).
    RecordFixtures {
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Collect from saved test outputs (host stdout, guest console logs)
        /// instead of running the scenarios.
        #[arg(long = "from-log", value_name = "FILE")]
        from_logs: Vec<PathBuf>,
        /// Record only these fixture tests (repeatable; default: all of
        /// `FIXTURE_TESTS`), e.g. `--test connect::connect_horizon`; the
        /// other fixtures are left as they are.
        #[arg(long = "test", value_name = "NAME")]
        only: Vec<String>,
    },
    /// Mutation testing of the pure modules with cargo-mutants (installed on
    /// demand): each target's mutants against its unit tests, in place, until
    /// done or the time budget is spent; prints the surviving mutants. Not
    /// part of CI; survivors and their reasons go to docs/testing.md.
    Mutants {
        /// Targets: engine, identity, config, incidents [default: all].
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
        /// Stop after this many minutes (all runs together, shared equally
        /// among the runs not yet started).
        #[arg(long, default_value_t = 30)]
        budget_minutes: u64,
        /// Only list the mutants (no build, no test).
        #[arg(long)]
        list: bool,
        /// Mutate only the files matching this glob (inside the target),
        /// e.g. tcpstall/src/engine/horizon/mod.rs. Repeatable: each glob is
        /// its own run with its share of the budget.
        #[arg(long, value_name = "GLOB")]
        only: Vec<String>,
    },
    /// Run the scenario tests inside Debian kernels under QEMU (TCG).
    VmTest {
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Scenario tests to run in each guest, by exact name.
        #[arg(long = "test", value_name = "FILTER", default_values = VM_TESTS)]
        tests: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { toolchain_only } => setup::run(toolchain_only),
        Cmd::Build => cmd::build::run(),
        Cmd::Run { args } => cmd::run::run(args),
        Cmd::Test {
            unit_only,
            filter,
            no_vm,
            vm_oldest,
        } => cmd::test::run(unit_only, filter, no_vm, vm_oldest),
        Cmd::Accuracy => cmd::accuracy::run(),
        Cmd::Bench {
            kernel,
            opts,
            vm,
            vm_cache_dir,
            vm_timeout,
            args,
        } => cmd::bench::run(kernel, opts, vm, vm_cache_dir, vm_timeout, args),
        Cmd::Image { tag } => image::run(&tag),
        Cmd::RecordFixtures {
            vm,
            from_logs,
            only,
        } => cmd::record_fixtures::run(vm, from_logs, only),
        Cmd::VmTest { vm, tests } => cmd::vm_test::run(vm, tests),
        Cmd::Mutants {
            targets,
            budget_minutes,
            list,
            only,
        } => cmd::mutants::run(targets, budget_minutes, list, only),
    }
}
