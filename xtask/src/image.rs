//! `cargo xtask image`: the agent as a static binary (musl) in a FROM scratch
//! image built by podman (Containerfile at the repository root).
//!
//! Static route: Rust's `x86_64-unknown-linux-musl` target (rustup std, the
//! self-contained musl CRT; the agent has no C dependencies), giving a
//! static-pie executable that runs with nothing else in the image.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    setup,
    util::{cargo, run_cmd, step, workspace_root},
};

pub const TARGET: &str = "x86_64-unknown-linux-musl";
pub const DEFAULT_TAG: &str = "localhost/tcpstall:dev";

/// Debian packages the image build needs.
pub const IMAGE_DEBIAN_PACKAGES: &[&str] = &["podman", "binutils"];

/// `cargo xtask image`: the toolchain, then [`build`] with `tag`.
pub fn run(tag: &str) -> anyhow::Result<()> {
    setup::toolchain()?;
    build(tag)?;
    Ok(())
}

fn ensure_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        step(&format!(
            "installing the Rust std for {TARGET} (static binary)"
        ));
        run_cmd(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    Ok(())
}

/// Build the static agent and return its path.
pub fn build_static() -> anyhow::Result<PathBuf> {
    ensure_target()?;
    step(&format!("building the static agent ({TARGET})"));
    run_cmd(cargo().args(["build", "--release", "-p", "tcpstall", "--target", TARGET]))?;
    let bin = workspace_root()
        .join("target")
        .join(TARGET)
        .join("release/tcpstall");
    if !bin.exists() {
        bail!("cargo did not produce {}", bin.display());
    }
    Ok(bin)
}

/// Build the image `tag`; returns its size in bytes.
pub fn build(tag: &str) -> anyhow::Result<u64> {
    setup::debian_packages(IMAGE_DEBIAN_PACKAGES)?;
    let bin = build_static()?;
    // The build context holds only the binary (stripped) and nothing else.
    let ctx = workspace_root().join("target/xtask/image-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx).with_context(|| format!("creating {}", ctx.display()))?;
    let staged = ctx.join("tcpstall");
    std::fs::copy(&bin, &staged).with_context(|| format!("copying {}", bin.display()))?;
    run_cmd(Command::new("strip").arg(&staged))?;
    step(&format!("podman build {tag} (FROM scratch)"));
    run_cmd(
        Command::new("podman")
            .args(["build", "--quiet", "--file"])
            .arg(workspace_root().join("Containerfile"))
            .args(["--tag", tag])
            .arg(&ctx),
    )?;
    let out = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output()
        .context("podman image inspect")?;
    let size: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("podman image inspect {tag}: no size"))?;
    eprintln!(
        "    image {tag}: {:.1} MB ({size} bytes)",
        size as f64 / 1_000_000.0
    );
    Ok(size)
}
