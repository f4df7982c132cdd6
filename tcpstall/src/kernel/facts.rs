//! Facts about the running kernel and process that the loader needs: HZ,
//! symbol addresses, privileges, cgroup2 mount, clocks. Read from /proc and
//! /sys; nothing here trusts the kernel version number.

use std::{
    fs,
    io::{self, BufRead, BufReader, Read},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: io::Error },
    #[error("symbol {0} not found in /proc/kallsyms")]
    NoSymbol(String),
    #[error(
        "/proc/kallsyms shows zeroed addresses (kptr_restrict): run as root with CAP_SYSLOG or set kernel.kptr_restrict=1 or lower"
    )]
    SymbolsHidden,
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Which kernel config file gave `CONFIG_HZ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HzConfigFile {
    ProcConfigGz,
    BootConfig,
}

/// `CONFIG_HZ` from /proc/config.gz or /boot/config-$(uname -r); `None` when
/// neither is readable (the engine then calibrates from event timestamps).
pub fn hz() -> Option<(u32, HzConfigFile)> {
    if let Ok(f) = fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .is_ok()
            && let Some(hz) = parse_config_hz(&text)
        {
            return Some((hz, HzConfigFile::ProcConfigGz));
        }
    }
    let boot = format!("/boot/config-{}", release());
    if let Ok(text) = fs::read_to_string(boot)
        && let Some(hz) = parse_config_hz(&text)
    {
        return Some((hz, HzConfigFile::BootConfig));
    }
    None
}

pub fn parse_config_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|hz| (24..=10_000).contains(hz))
}

/// Address of a kernel text symbol from /proc/kallsyms.
pub fn kallsyms_lookup(symbol: &str) -> Result<u64, KernelError> {
    kallsyms_lookup_in(Path::new("/proc/kallsyms"), symbol)
}

pub fn kallsyms_lookup_in(path: &Path, symbol: &str) -> Result<u64, KernelError> {
    let f = fs::File::open(path).map_err(|err| KernelError::Read {
        path: path.to_owned(),
        err,
    })?;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|err| KernelError::Read {
            path: path.to_owned(),
            err,
        })?;
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        // Text symbols only ("t"/"T"); modules append "[mod]" which we ignore.
        if name == symbol && (ty == "t" || ty == "T") {
            let addr =
                u64::from_str_radix(addr, 16).map_err(|_| KernelError::NoSymbol(symbol.into()))?;
            if addr == 0 {
                return Err(KernelError::SymbolsHidden);
            }
            return Ok(addr);
        }
    }
    Err(KernelError::NoSymbol(symbol.to_owned()))
}

/// Capabilities relevant to loading BPF programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    pub euid_root: bool,
    pub cap_sys_admin: bool,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_net_admin: bool,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

impl Privileges {
    pub fn current() -> Self {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let mut p = Self::from_status(&status);
        // SAFETY: geteuid has no preconditions.
        p.euid_root = unsafe { libc::geteuid() } == 0;
        p
    }

    pub fn from_status(status: &str) -> Self {
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        let has = |c: u32| cap_eff & (1u64 << c) != 0;
        Privileges {
            euid_root: false,
            cap_sys_admin: has(CAP_SYS_ADMIN),
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_net_admin: has(CAP_NET_ADMIN),
        }
    }

    /// Names of the capabilities missing to load and attach every probe.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.cap_sys_admin {
            if !self.cap_bpf {
                m.push("CAP_BPF");
            }
            if !self.cap_perfmon {
                m.push("CAP_PERFMON");
            }
        }
        if !self.cap_net_admin && !self.cap_sys_admin {
            m.push("CAP_NET_ADMIN");
        }
        m
    }
}

/// The cgroup2 mount point (for sock_ops), from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_root(&info)
}

pub fn parse_cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let fstype = post.split_ascii_whitespace().next()?;
        let mount_point = pre.split_ascii_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Whether perf has a kprobe PMU (CONFIG_KPROBES); aya needs it to attach.
pub fn has_kprobe_pmu() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// CLOCK_REALTIME - CLOCK_MONOTONIC in ns, to show kernel timestamps as wall time.
pub fn realtime_offset_ns() -> i128 {
    let ts = |clock| {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(clock, &mut t) };
        t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
    };
    ts(libc::CLOCK_REALTIME) - ts(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC now, in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config_hz() {
        assert_eq!(
            parse_config_hz("# x\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(parse_config_hz("CONFIG_HZ_1000=y\n"), None);
        assert_eq!(parse_config_hz("CONFIG_HZ=abc\n"), None);
        assert_eq!(parse_config_hz("CONFIG_HZ=0\n"), None);
    }

    #[test]
    fn parses_capabilities() {
        let p = Privileges::from_status("Name:\tx\nCapEff:\t000001ffffffffff\n");
        assert!(p.cap_bpf && p.cap_perfmon && p.cap_sys_admin && p.cap_net_admin);
        assert!(p.missing().is_empty());
        let p = Privileges::from_status("CapEff:\t0000000000000000\n");
        assert_eq!(p.missing(), vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        // CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN without CAP_SYS_ADMIN is enough.
        let p = Privileges::from_status(&format!(
            "CapEff:\t{:016x}\n",
            (1u64 << 39) | (1u64 << 38) | (1u64 << 12)
        ));
        assert!(p.missing().is_empty());
    }

    #[test]
    fn finds_cgroup2_mount() {
        let mi = "22 1 0:21 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw\n\
                  30 22 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_root(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_root("22 1 0:21 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn kallsyms_parsing() {
        let dir = std::env::temp_dir().join(format!("tcpstall-kallsyms-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("kallsyms");
        fs::write(
            &p,
            "ffffffff81000000 T _text\nffffffff81a00010 t tcp_write_timer\nffffffff81a00020 d tcp_write_timer_data\n",
        )
        .unwrap();
        assert_eq!(
            kallsyms_lookup_in(&p, "tcp_write_timer").unwrap(),
            0xffffffff81a00010
        );
        assert!(matches!(
            kallsyms_lookup_in(&p, "nope"),
            Err(KernelError::NoSymbol(_))
        ));
        fs::write(&p, "0000000000000000 t tcp_write_timer\n").unwrap();
        assert!(matches!(
            kallsyms_lookup_in(&p, "tcp_write_timer"),
            Err(KernelError::SymbolsHidden)
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
