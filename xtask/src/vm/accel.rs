//! Choosing the QEMU accelerator: KVM when it actually runs a guest, TCG
//! otherwise.
//!
//! `/dev/kvm` can exist and answer ioctls while KVM guests never get
//! anywhere (nested virtualisation without hardware support: the guest hangs
//! before its first console line). So KVM is chosen only after a test boot:
//! the kernel under test with a minimal initramfs must reach `/init` within
//! [`PROBE_TIMEOUT`] (a Debian kernel takes about 6 s under TCG on the
//! reference machine, well under a second with working KVM).

use anyhow::Result;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use super::apt::KernelPkg;
use super::host::Tools;
use super::init::probe_init;
use super::initramfs::init_only_initrd;
use super::qemu::{Accel, boot};
use super::{VmOptions, phase};

/// `--vm-accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if a test boot under KVM works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// How long the KVM test boot may take to reach `/init`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// `KVM_GET_API_VERSION` (`_IO(KVMIO, 0x00)`) and the only version there is.
const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
const KVM_API_VERSION: libc::c_int = 12;

/// The accelerator for `choice`; `Auto` test-boots kernel `k` under KVM.
pub(super) fn choose(tools: &Tools, opts: &VmOptions, spec: &str, k: &KernelPkg) -> Result<Accel> {
    match opts.accel {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    if let Err(why) = kvm_device_ok(Path::new("/dev/kvm")) {
        phase(spec, &format!("accelerator: TCG ({why})"));
        return Ok(Accel::Tcg);
    }
    let (dir, initrd) =
        init_only_initrd(tools, opts, spec, k, "kvm-probe", probe_init(&k.release))?;
    let probe_opts = VmOptions {
        timeout: PROBE_TIMEOUT,
        smp: 1,
        memory_mb: 512,
        ..opts.clone()
    };
    phase(
        spec,
        &format!(
            "accelerator: /dev/kvm answers; test boot under KVM (limit {}s)",
            PROBE_TIMEOUT.as_secs()
        ),
    );
    let o = boot(
        tools,
        &probe_opts,
        Accel::Kvm,
        spec,
        &k.vmlinuz,
        &initrd,
        &dir.join("console.log"),
        false,
    )?;
    Ok(match o.boot_time {
        Some(t) => {
            phase(
                spec,
                &format!(
                    "accelerator: KVM (guest reached /init in {:.1}s)",
                    t.as_secs_f64()
                ),
            );
            Accel::Kvm
        }
        None => {
            phase(
                spec,
                &format!(
                    "accelerator: TCG (a KVM guest did not reach /init within {}s: {})",
                    PROBE_TIMEOUT.as_secs(),
                    o.exit
                ),
            );
            Accel::Tcg
        }
    })
}

/// `/dev/kvm` opens read-write and reports the KVM API version.
fn kvm_device_ok(dev: &Path) -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v != KVM_API_VERSION {
        return Err(format!(
            "{}: KVM_GET_API_VERSION returned {v}, expected {KVM_API_VERSION}",
            dev.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Mutation checked: `kvm_device_ok` returning Ok(()) fails both tests.
    #[test]
    fn a_missing_kvm_device_is_reported() {
        let e = kvm_device_ok(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(e.contains("/nonexistent/kvm"), "{e}");
    }

    #[test]
    fn a_non_kvm_device_is_rejected() {
        // /dev/null opens read-write but is no KVM device.
        let e = kvm_device_ok(Path::new("/dev/null")).unwrap_err();
        assert!(e.contains("KVM_GET_API_VERSION"), "{e}");
    }
}
