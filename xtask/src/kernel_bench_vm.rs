//! `cargo xtask bench --kernel --vm`: the kernel bench inside Debian kernels
//! under QEMU. The guest runs the `kernel-bench` binary with the host's
//! bpftrace, bpftool and iperf3 (and every library `ldd` lists for them) in
//! its initramfs; the report is cut out of each console log.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use xtask::{
    kernel_bench::{BenchOptions, REPORT_BEGIN, REPORT_END},
    vm,
};

use crate::util::{cargo, run_cmd, step, workspace_root};

fn which(cmd: &str) -> anyhow::Result<PathBuf> {
    xtask::which(cmd)
        .with_context(|| format!("`{cmd}` not found on the host: `cargo xtask setup` installs it"))
}

fn build_kernel_bench() -> anyhow::Result<PathBuf> {
    step("building the kernel-bench binary (xtask)");
    run_cmd(cargo().args(["build", "--release", "-p", "xtask", "--bin", "kernel-bench"]))?;
    Ok(workspace_root().join("target/release/kernel-bench"))
}

/// The report lines between the markers of a console log.
pub fn report_of(log: &str) -> Option<Vec<String>> {
    let mut lines = log.lines().map(|l| l.trim_end_matches('\r'));
    lines.find(|l| l.trim() == REPORT_BEGIN)?;
    let mut out = Vec::new();
    for l in lines {
        if l.trim() == REPORT_END {
            return Some(out);
        }
        out.push(l.to_owned());
    }
    None
}

pub fn run(vm_opts: &vm::VmOptions, agent: &Path, opts: &BenchOptions) -> anyhow::Result<()> {
    let bench = build_kernel_bench()?;
    let mut extra_bins = Vec::new();
    for tool in ["bpftrace", "bpftool", "iperf3"] {
        extra_bins.push((which(tool)?, format!("bin/{tool}")));
    }
    let mut vm_opts = vm_opts.clone();
    // bpftrace brings LLVM and clang: about 250 MiB unpacked in the guest.
    vm_opts.memory_mb = vm_opts.memory_mb.max(4096);
    let mut test_args = opts.to_args();
    test_args.push(format!(
        "--shown-command=cargo xtask bench --kernel --vm {} {}",
        vm_opts.kernels.join(" "),
        opts.to_args().join(" ")
    ));
    let payload = vm::GuestPayload {
        agent: agent.to_path_buf(),
        tests: bench,
        test_args,
        extra_env: Vec::new(),
        extra_bins,
        expected_passed: None,
    };
    step(&format!(
        "kernel bench under QEMU: {} (TCG is slow in absolute terms: read the ratios)",
        vm_opts.kernels.join(", ")
    ));
    let results = vm::vm_test(&vm_opts, &payload)?;
    let mut failed = Vec::new();
    for r in &results {
        println!("\n### Guest {} ({})\n", r.kernel, r.release);
        let log = std::fs::read(&r.console_log).unwrap_or_default();
        match report_of(&String::from_utf8_lossy(&log)) {
            Some(lines) => {
                for l in lines {
                    println!("{l}");
                }
            }
            None => {
                println!(
                    "(no report: {}; console log {})",
                    r.summary,
                    r.console_log.display()
                );
                failed.push(r.kernel.clone());
            }
        }
        if !r.passed {
            failed.push(r.kernel.clone());
        }
    }
    failed.dedup();
    if !failed.is_empty() {
        bail!(
            "the kernel bench failed in guest(s) {} (console logs under {})",
            failed.join(", "),
            vm_opts.cache_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: end the report at `REPORT_BEGIN` instead of `REPORT_END`
    /// in `report_of`: the first assertion fails (None).
    #[test]
    fn report_is_cut_between_the_markers() {
        let log = format!(
            "boot\r\n{REPORT_BEGIN}\r\n| a |\r\n\r\n{REPORT_END}\r\nTCPSTALL-VM-RESULT: PASS\n"
        );
        assert_eq!(
            report_of(&log),
            Some(vec!["| a |".to_owned(), String::new()])
        );
        assert_eq!(report_of(&format!("{REPORT_BEGIN}\n| a |\n")), None);
        assert_eq!(report_of("nothing"), None);
    }
}
