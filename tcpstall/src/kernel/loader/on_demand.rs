//! The drop probe attached on demand ([`DropSwitch`]): `kfree_skb` runs for
//! every packet the node frees as dropped, so its program is kept loaded
//! but attached only while some socket is in a loss episode (the agent
//! decides when: `app::drop_gate`). Loading (and the verifier) happens once
//! at start-up; attaching is one `BPF_RAW_TRACEPOINT_OPEN` of the loaded
//! program, detaching is closing that link.

use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

use aya::programs::BtfTracePoint;

use super::{LoadError, chain};
use crate::kernel::probes::{self, Attach};

/// `BPF_RAW_TRACEPOINT_OPEN` (UAPI `enum bpf_cmd`): attaches a raw or BTF
/// tracepoint program, returning the link's fd.
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;

/// The loaded drop program and, while attached, its link.
pub struct DropSwitch {
    program: &'static str,
    prog: OwnedFd,
    link: Option<OwnedFd>,
}

impl DropSwitch {
    /// The program it attaches (`tcpstall_drop_direct`, ...).
    pub fn program(&self) -> &'static str {
        self.program
    }

    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    /// Attaches the program (no-op if attached).
    pub fn attach(&mut self) -> std::io::Result<()> {
        if self.link.is_some() {
            return Ok(());
        }
        // `union bpf_attr`'s `raw_tracepoint` member: the tracepoint's name
        // (NULL for a BTF tracepoint program: its target is fixed at load)
        // and the program fd.
        #[repr(C)]
        struct RawTracepointAttr {
            name: u64,
            prog_fd: u32,
            _pad: u32,
        }
        let mut attr = RawTracepointAttr {
            name: 0,
            prog_fd: self.prog.as_raw_fd() as u32,
            _pad: 0,
        };
        // SAFETY: no pointer in `attr` (the name is NULL); the kernel only
        // reads it.
        let r = unsafe { super::sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr) }?;
        // SAFETY: on success the syscall returned a new fd we own.
        self.link = Some(unsafe { OwnedFd::from_raw_fd(r as i32) });
        Ok(())
    }

    /// Detaches the program (closing the link; no-op if detached).
    pub fn detach(&mut self) {
        self.link = None;
    }
}

impl super::Loaded {
    /// The drop probe's program, loaded and detached, to attach on demand:
    /// `None` when the probe is not attached on this kernel (or is not a
    /// BTF tracepoint). Takes the program out of aya's hands (its start-up
    /// link is closed); can be taken once.
    pub fn take_drop_switch(&mut self) -> Result<Option<DropSwitch>, LoadError> {
        let Some(status) = self.plan.probes.iter().find(|p| p.probe == probes::DROP) else {
            return Ok(None);
        };
        let Some(program) = status.program else {
            return Ok(None);
        };
        let tp_btf = probes::probe(probes::DROP).is_some_and(|spec| {
            spec.candidates
                .iter()
                .any(|c| c.program == program && matches!(c.attach, Attach::TpBtf { .. }))
        });
        if !tp_btf {
            return Ok(None);
        }
        let err = |what: &str, e: &dyn std::error::Error| {
            LoadError::Map(format!("{program}: {what}: {}", chain(e)))
        };
        let Some(p) = self.ebpf.program_mut(program) else {
            return Ok(None);
        };
        let p: &mut BtfTracePoint = p.try_into().map_err(|e| err("not a tp_btf program", &e))?;
        let fd = p
            .fd()
            .map_err(|e| err("program fd", &e))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| err("duplicating the program fd", &e))?;
        // Our fd keeps the program loaded; aya's (and the start-up link)
        // are closed.
        p.unload()
            .map_err(|e| err("detaching the start-up link", &e))?;
        Ok(Some(DropSwitch {
            program,
            prog: fd,
            link: None,
        }))
    }
}
