//! Builds the kernel programs (`tcpstall-ebpf`) with the pinned nightly +
//! bpf-linker (`ebpf-toolchain.toml` at the repository root) via aya-build and
//! embeds the object. `AYA_BUILD_SKIP=1` skips it (the agent then refuses to
//! load with a clear message); `cargo xtask` sets everything up.
use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};

const PIN_FILE: &str = "ebpf-toolchain.toml";

/// `key = "value"` from the pin file. xtask/src/setup.rs (`Pin::parse`) reads
/// the same file strictly and is unit-tested; this only looks values up.
fn pin_value<'a>(pin: &'a str, key: &str) -> anyhow::Result<&'a str> {
    pin.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .ok_or_else(|| anyhow!("{PIN_FILE}: no `{key} = \"...\"` line"))
}

/// `rustup run <toolchain> <program> <args>`'s stdout, `None` if it fails
/// (never installs: RUSTUP_AUTO_INSTALL=0).
fn rustup_run(toolchain: &str, program: &[&str]) -> Option<String> {
    let out = Command::new("rustup")
        .env("RUSTUP_AUTO_INSTALL", "0")
        .args(["run", toolchain])
        .args(program)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The installed toolchain that is the pinned nightly: `nightly-<date>`, else
/// plain `nightly` if its `rustc -vV` is the pinned commit (as in setup.rs).
/// Checks bpf-linker's version too.
fn pinned_toolchain(root: &Path) -> anyhow::Result<String> {
    let path = root.join(PIN_FILE);
    println!("cargo:rerun-if-changed={}", path.display());
    let pin = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the eBPF toolchain pin {}", path.display()))?;
    let dated = format!("nightly-{}", pin_value(&pin, "nightly")?);
    let hash = pin_value(&pin, "nightly-commit-hash")?;
    let date = pin_value(&pin, "nightly-commit-date")?;
    let linker = pin_value(&pin, "bpf-linker")?;
    let setup = "run `cargo xtask setup` (or any `cargo xtask` command) to install it";
    let mut found = Vec::new();
    let toolchain = [dated.as_str(), "nightly"]
        .into_iter()
        .find(|t| {
            let Some(vv) = rustup_run(t, &["rustc", "-vV"]) else {
                found.push(format!("no `{t}`"));
                return false;
            };
            let field = |name: &str| {
                vv.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or("?")
                    .to_owned()
            };
            let (h, d) = (field("commit-hash:"), field("commit-date:"));
            found.push(format!("`{t}` is rustc {} {d}", &h[..h.len().min(9)]));
            h == hash && d == date
        })
        .ok_or_else(|| {
            anyhow!(
                "nightly: found {}, pinned rustc {} {date} ({dated}, {PIN_FILE}): {setup}",
                found.join(", "),
                &hash[..hash.len().min(9)]
            )
        })?;
    let found = rustup_run(toolchain, &["bpf-linker", "--version"]);
    let version = found
        .as_deref()
        .and_then(|o| o.lines().find_map(|l| l.trim().strip_prefix("bpf-linker ")))
        .map(str::trim);
    if version != Some(linker) {
        bail!(
            "bpf-linker: found {}, pinned {linker} ({PIN_FILE}): {setup}",
            version.unwrap_or("none that runs under the pinned nightly")
        );
    }
    Ok(toolchain.to_owned())
}

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata {
        packages,
        workspace_root,
        ..
    } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tcpstall-ebpf")
        .ok_or_else(|| anyhow!("tcpstall-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("tcpstall-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    // Make `include_bytes!` always find a file; aya-build overwrites it.
    let obj = out_dir.join("tcpstall");
    let skip = std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true");
    if skip && !obj.exists() {
        std::fs::write(&obj, []).context("write placeholder eBPF object")?;
    }
    let need = "building the eBPF programs failed: they need the pinned nightly toolchain with \
                rust-src and bpf-linker; run `cargo xtask setup` (or any `cargo xtask` command) to \
                install them";
    // With AYA_BUILD_SKIP nothing is built, so nothing is checked either.
    let toolchain = if skip {
        String::from("nightly")
    } else {
        pinned_toolchain(workspace_root.as_std_path()).context(need)?
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tcpstall-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| format!("{need} (toolchain {toolchain}, pinned in {PIN_FILE})"))
}
