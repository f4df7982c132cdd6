//! Builds the kernel programs (`tcpstall-ebpf`) with nightly + bpf-linker via
//! aya-build and embeds the object. `AYA_BUILD_SKIP=1` skips it (the agent then
//! refuses to load with a clear message); `cargo xtask` sets everything up.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
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
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") && !obj.exists()
    {
        std::fs::write(&obj, []).context("write placeholder eBPF object")?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tcpstall-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed: they need the nightly toolchain with rust-src and \
         bpf-linker; run `cargo xtask setup` (or any `cargo xtask` command) to install them",
    )
}
