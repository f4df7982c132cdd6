//! Installs what the build and the tests need, idempotently: nightly's
//! `rust-src`, a bpf-linker linked against the nightly toolchain's own LLVM
//! (versions derived, not hard-coded), Debian packages, PyPI tools.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use xtask::have;

use crate::{run_cmd, step, workspace_root};

/// Debian packages the tests and tools need.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "prometheus",
    // amtool: the deploy tests check the Alertmanager routing example.
    "prometheus-alertmanager",
    // The `tcpstall top` test drives the terminal view in a tmux pane.
    "tmux",
    "bpftool",
    "python3-pip",
    // deploy/kubernetes: `kubectl kustomize` renders the overlays.
    "kubectl",
    // setpriv (capability-set test), unshare.
    "util-linux",
];

/// Debian packages `cargo xtask bench --kernel` needs (installed by
/// `cargo xtask setup` and by the bench itself, not by `cargo xtask test`).
pub const BENCH_PACKAGES: &[&str] = &["bpftrace", "bpftool", "iperf3", "util-linux"];

const NIGHTLY: &str = "nightly";

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    Command::new("rustup")
}

/// nightly's LLVM major version, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let vv = output(rustup().args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let v = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    v.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot parse LLVM version {v:?}"))
}

fn bpf_linker_works() -> bool {
    // rustup puts the nightly lib dir (with libLLVM) on LD_LIBRARY_PATH.
    rustup()
        .args(["run", NIGHTLY, "bpf-linker", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn toolchain() -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let toolchains = output(rustup().args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (eBPF programs need it)");
        run_cmd(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let comps =
        output(rustup().args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        step("installing rust-src for nightly (build-std for the BPF target)");
        run_cmd(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    if !bpf_linker_works() {
        install_bpf_linker()?;
    }
    if t.elapsed().as_secs() > 2 {
        eprintln!("    toolchain ready in {:.0?}", t.elapsed());
    }
    Ok(())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let major = nightly_llvm_major()?;
    let sysroot = PathBuf::from(
        output(rustup().args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?.trim(),
    );
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("libLLVM.so.{major}"))
                    || n.starts_with(&format!("libLLVM-{major}"))
            })
        })
        .with_context(|| {
            format!(
                "no libLLVM for LLVM {major} in {}: reinstall nightly",
                libdir.display()
            )
        })?;
    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so.
    let prefix = workspace_root().join("target/xtask/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    step(&format!(
        "building bpf-linker against nightly's LLVM {major} ({}) — takes about 4 minutes, once",
        lib.display()
    ));
    let feature = format!("llvm-{major}");
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features", &feature])
            .env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{major}0_PREFIX"), &prefix),
    )
    .with_context(|| {
        format!("building bpf-linker with feature {feature} failed (a newer nightly may need a newer bpf-linker)")
    })?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run under `rustup run nightly`");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn system_packages() -> anyhow::Result<()> {
    debian_packages(DEBIAN_PACKAGES)?;
    if !have("kubernetes-validate") {
        step("installing kubernetes-validate (PyPI) for manifest checks");
        run_cmd(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "kubernetes-validate",
        ]))?;
    }
    Ok(())
}

/// Install the Debian packages among `packages` that are missing.
pub fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        if !have("apt-get") {
            bail!("missing Debian packages {missing:?} and no apt-get to install them");
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}
