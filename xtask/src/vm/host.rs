//! Host tools the VM flow runs, and file helpers (cache lock, atomic write).

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::VM_DEBIAN_PACKAGES;

pub(super) struct Tools {
    pub apt_get: PathBuf,
    pub apt_cache: PathBuf,
    pub dpkg: PathBuf,
    pub dpkg_deb: PathBuf,
    pub depmod: PathBuf,
    pub ldd: PathBuf,
    pub gzip: PathBuf,
    pub xz: PathBuf,
    pub zstd: PathBuf,
    pub busybox: PathBuf,
    pub dash: PathBuf,
    pub bash: PathBuf,
    pub qemu: PathBuf,
    pub ip: PathBuf,
    pub ss: PathBuf,
    pub tc: PathBuf,
    pub nft: PathBuf,
}

impl Tools {
    pub(super) fn find() -> Result<Tools> {
        Ok(Tools {
            apt_get: require_tool("apt-get", "apt")?,
            apt_cache: require_tool("apt-cache", "apt")?,
            dpkg: require_tool("dpkg", "dpkg")?,
            dpkg_deb: require_tool("dpkg-deb", "dpkg")?,
            depmod: require_tool("depmod", "kmod")?,
            ldd: require_tool("ldd", "libc-bin")?,
            gzip: require_tool("gzip", "gzip")?,
            xz: require_tool("xz", "xz-utils")?,
            zstd: require_tool("zstd", "zstd")?,
            busybox: require_tool("busybox", "busybox-static")?,
            dash: require_tool("dash", "dash")?,
            bash: require_tool("bash", "bash")?,
            qemu: require_tool("qemu-system-x86_64", "qemu-system-x86")?,
            ip: require_tool("ip", "iproute2")?,
            ss: require_tool("ss", "iproute2")?,
            tc: require_tool("tc", "iproute2")?,
            nft: require_tool("nft", "nftables")?,
        })
    }
}

fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if let Ok(m) = fs::metadata(&p)
            && m.is_file()
            && m.permissions().mode() & 0o111 != 0
        {
            return Ok(p);
        }
    }
    bail!(
        "`{name}` not found: install the Debian package `{package}` \
         (apt-get install {package}; the VM tests need: {})",
        VM_DEBIAN_PACKAGES.join(" ")
    )
}

pub(super) fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

pub(super) fn lock_cache(cache: &Path) -> Result<File> {
    let path = cache.join("lock");
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "==> waiting for {} (another VM run is using the cache)",
                path.display()
            );
            f.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(f)
}

pub(super) fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}
