//! xtask's library part: the QEMU kernel matrix (`vm`), shared by the
//! `xtask` command and the `vm-smoke` developer tool, and the kernel
//! program bench (`kernel_bench`), run by `cargo xtask bench --kernel` on
//! the host and by the `kernel-bench` binary inside the guests.

pub mod kernel_bench;
pub mod vm;

use std::{path::PathBuf, process::Command};

/// Where `cmd` is on `PATH` (`command -v`), if anywhere.
pub fn which(cmd: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !p.is_empty()).then(|| PathBuf::from(p))
}

/// Whether `cmd` is on `PATH`.
pub fn have(cmd: &str) -> bool {
    which(cmd).is_some()
}
