//! `cargo xtask bench`: the criterion benchmarks, or with `--kernel` the
//! kernel program bench (on this kernel or in QEMU guests).

use std::path::PathBuf;

use xtask::vm;

use crate::{
    cmd::build::build_agent,
    kernel_bench_vm, setup,
    util::{cargo, is_root, require_root, run_cmd, step},
};

pub fn run(
    kernel: bool,
    opts: xtask::kernel_bench::BenchOptions,
    vm: Option<Vec<String>>,
    vm_cache_dir: Option<PathBuf>,
    vm_timeout: std::time::Duration,
    args: Vec<String>,
) -> anyhow::Result<()> {
    setup::toolchain()?;
    if kernel {
        setup::debian_packages(setup::BENCH_PACKAGES)?;
        let agent = build_agent()?;
        match vm {
            None => {
                xtask::kernel_bench::check_prerequisites(&opts)?;
                let command = format!("cargo xtask bench --kernel {}", opts.to_args().join(" "));
                xtask::kernel_bench::run_and_print(&agent, &opts, &command, false)?;
            }
            Some(kernels) => {
                require_root("`cargo xtask bench --kernel --vm` (QEMU, BPF in the guests)")?;
                setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
                let mut vm_opts = vm::VmOptions::default();
                if !kernels.is_empty() {
                    vm_opts.kernels = kernels;
                }
                if let Some(d) = vm_cache_dir {
                    vm_opts.cache_dir = d;
                }
                vm_opts.timeout = vm_timeout;
                kernel_bench_vm::run(&vm_opts, &agent, &opts)?;
            }
        }
        return Ok(());
    }
    // (criterion bench in tcpstall/benches, what it measures, needs root)
    let benches = [
        ("hot_path", "criterion benchmarks (tcpstall/benches)", false),
        (
            "sweep",
            "socket sweep at 100,000 sockets (tcpstall/benches/sweep.rs)",
            true,
        ),
    ];
    for (bench, label, needs_root) in benches {
        if needs_root && !is_root() {
            eprintln!("    {label}: not run, it needs root (sudo -E cargo xtask bench)");
            continue;
        }
        step(label);
        run_cmd(
            cargo()
                .args(["bench", "-p", "tcpstall", "--bench", bench, "--"])
                .args(&args),
        )?;
    }
    eprintln!("    kernel program cost: `cargo xtask bench --kernel` (root; see --help)");
    Ok(())
}
