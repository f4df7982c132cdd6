//! The QEMU driver: boots a kernel with an initramfs, streams and logs the
//! serial console, enforces the timeout, collects the guest's markers.

use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::host::Tools;
use super::init::{BTF_BEGIN, BTF_END};
use super::{RESULT_MARKER, VmOptions, phase, secs};

/// The QEMU accelerator a guest runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How long a guest may take to reach its `/init` (4-8 s under TCG here). A
/// guest that has printed nothing of ours by then hung in the kernel's own
/// boot, before any tcpstall code ran (seen once in CI: a 7.3 guest under TCG
/// silent for 900 s, the same kernel booting in 5 s right after). Checked by
/// hand with the limit at 2 s: both boots killed, the run fails naming both
/// console logs.
pub(super) const BOOT_HANG_LIMIT: Duration = Duration::from_secs(180);

pub(super) struct BootOutcome {
    pub marker: Option<String>,
    pub timed_out: bool,
    /// Killed because it did not reach `/init` within [`BOOT_HANG_LIMIT`].
    pub boot_hung: bool,
    pub exit: String,
    pub tail: Vec<String>,
    pub boot_time: Option<Duration>,
    pub guest_release: Option<String>,
    pub caps: Option<String>,
    /// Tests passed, summed over the libtest summaries the guest printed
    /// (None: no summary at all).
    pub tests_passed: Option<usize>,
    /// Every console line, only kept when `echo` is false (BTF dump).
    pub lines: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn boot(
    tools: &Tools,
    opts: &VmOptions,
    accel: Accel,
    spec: &str,
    vmlinuz: &Path,
    initrd: &Path,
    console_log: &Path,
    echo: bool,
) -> Result<BootOutcome> {
    if let Some(d) = console_log.parent() {
        fs::create_dir_all(d)?;
    }
    let mut log = std::io::BufWriter::new(
        File::create(console_log).with_context(|| format!("creating {}", console_log.display()))?,
    );
    let mut cmd = Command::new(&tools.qemu);
    cmd.args(["-accel", accel.name(), "-cpu", "max"])
        .args([
            "-smp",
            &opts.smp.to_string(),
            "-m",
            &opts.memory_mb.to_string(),
        ])
        .args(["-nographic", "-no-reboot"])
        // No NIC: the guest is isolated from the host network (and skips iPXE).
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // `quiet` is loglevel=4: the kernel's errors (a hung task, a soft
        // lockup, an oops) still reach the console log, its info lines do not.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", tools.qemu.display()))?;

    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(&String::from_utf8_lossy(&buf));
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);

    let deadline = start + opts.timeout;
    let mut o = BootOutcome {
        marker: None,
        timed_out: false,
        boot_hung: false,
        exit: String::new(),
        tail: Vec::new(),
        boot_time: None,
        guest_release: None,
        caps: None,
        tests_passed: None,
        lines: Vec::new(),
    };
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut marker_at: Option<Instant> = None;
    let mut in_btf = false;
    loop {
        let now = Instant::now();
        // After the marker, give the guest a while to power off by itself.
        let boot_limit = start + BOOT_HANG_LIMIT;
        let limit = match marker_at {
            Some(t) => (t + Duration::from_secs(60)).min(deadline.max(t + Duration::from_secs(10))),
            None if o.boot_time.is_none() => deadline.min(boot_limit),
            None => deadline,
        };
        if now >= limit {
            if marker_at.is_none() && o.boot_time.is_none() && now < deadline {
                o.boot_hung = true;
                phase(
                    spec,
                    &format!(
                        "the guest did not reach /init within {}s (a hang in the kernel's boot, \
                         before any tcpstall code): killing qemu",
                        BOOT_HANG_LIMIT.as_secs()
                    ),
                );
            } else if marker_at.is_none() {
                o.timed_out = true;
                phase(
                    spec,
                    &format!("timeout after {}s: killing qemu", opts.timeout.as_secs()),
                );
            } else {
                phase(
                    spec,
                    "guest did not power off after its result: killing qemu",
                );
            }
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if line.contains("TCPSTALL-VM: init started") && o.boot_time.is_none() {
                    o.boot_time = Some(start.elapsed());
                    log.flush()?;
                }
                if let Some(r) = line.split("TCPSTALL-VM: uname -r: ").nth(1) {
                    o.guest_release = Some(r.trim().to_string());
                }
                if let Some(c) = line.split("TCPSTALL-VM: ").nth(1)
                    && c.starts_with("btf=")
                {
                    o.caps = Some(c.trim().to_string());
                }
                if let Some(n) = libtest_passed(&line) {
                    o.tests_passed = Some(o.tests_passed.unwrap_or(0) + n);
                }
                if let Some(m) = line.split(RESULT_MARKER).nth(1) {
                    o.marker = Some(m.trim().to_string());
                    marker_at = Some(Instant::now());
                    log.flush()?;
                }
                if line.contains(BTF_BEGIN) {
                    in_btf = true;
                } else if line.contains(BTF_END) {
                    in_btf = false;
                }
                if echo {
                    println!("[{spec}] {line}");
                } else {
                    if !in_btf {
                        println!("[{spec}] {line}");
                    }
                    o.lines.push(line.clone());
                }
                tail.push_back(line);
                if tail.len() > 30 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    for r in readers {
        let _ = r.join();
    }
    log.flush()?;
    o.exit = status.to_string();
    o.tail = tail.into();
    phase(
        spec,
        &format!(
            "qemu finished in {:.1}s ({}), guest booted in {}",
            secs(start.elapsed()),
            o.exit,
            o.boot_time
                .map(|d| format!("{:.1}s", secs(d)))
                .unwrap_or_else(|| "?".into())
        ),
    );
    Ok(o)
}

/// The passed count of a libtest summary line
/// (`test result: ok. 5 passed; 0 failed; ...`).
fn libtest_passed(line: &str) -> Option<usize> {
    let rest = line.split("test result: ").nth(1)?;
    let (_, counts) = rest.split_once(". ")?;
    counts
        .split(';')
        .find_map(|c| c.trim().strip_suffix(" passed")?.parse().ok())
}

/// Drops CR/LF, escape sequences (SeaBIOS clears the screen) and other control
/// characters except tab.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => {
                if let Some('[') = it.next() {
                    // CSI: parameters/intermediates up to a final byte 0x40..=0x7e
                    while let Some(&n) = it.peek() {
                        it.next();
                        if ('\x40'..='\x7e').contains(&n) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi() {
        assert_eq!(
            strip_ansi("\x1bc\x1b[?7l\x1b[2JTCPSTALL-VM: x\r\n"),
            "TCPSTALL-VM: x"
        );
        assert_eq!(strip_ansi("a\tb"), "a\tb");
    }

    /// The matrix's exact-count check rests on this parse. Mutation checked
    /// end to end: `cargo xtask vm-test 6.1 --test probe_plan` (a name that
    /// matches nothing) fails with "reports 0 passed, expected exactly 1".
    #[test]
    fn libtest_summary() {
        let ok = "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 8 filtered out; finished in 61.20s";
        assert_eq!(libtest_passed(ok), Some(5));
        let none = "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 13 filtered out; finished in 0.00s";
        assert_eq!(libtest_passed(none), Some(0));
        assert_eq!(libtest_passed("running 5 tests"), None);
        assert_eq!(libtest_passed("test s1_recovery ... ok"), None);
    }
}
