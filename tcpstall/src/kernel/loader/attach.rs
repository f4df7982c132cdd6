//! Attaching one probe: each of its candidate mechanisms tried in order
//! (offered by the kernel, its fields resolved, then loaded and attached
//! for real), the first that works kept and the others' failures recorded.

use std::{fs::File, path::PathBuf};

use aya::{
    Btf as AyaBtf, Ebpf,
    programs::{BtfTracePoint, FEntry, Iter, KProbe, SockOps, links::CgroupAttachMode},
};
use tcpstall_common::KernelLayout;

use super::{Attempt, LoaderOptions, ProbeStatus, chain};
use crate::kernel::{
    facts, layout,
    probes::{Attach, Candidate, ProbeSpec},
};

pub(super) struct AttachEnv<'a> {
    pub(super) btf: &'a AyaBtf,
    pub(super) layout: &'a KernelLayout,
    /// Whether the `_cast` programs can be loaded (why not).
    pub(super) rdonly_cast: Result<(), String>,
    pub(super) timer_addr: Result<u64, String>,
    /// `tcp_keepalive_timer`'s address (the keepalive timer tracepoint).
    pub(super) keepalive_timer_addr: Result<u64, String>,
    /// `tw_timer_handler`'s address (the timewait timer tracepoints).
    pub(super) tw_timer_addr: Result<u64, String>,
    pub(super) cgroup: Option<PathBuf>,
    /// The `struct socket` offsets the sweep programs assume (why not).
    pub(super) socket_constants: Result<(), String>,
    /// `bpf_sock_ops_kern.sk` at offset 0, as the guard's plain program
    /// assumes (why not).
    pub(super) sock_ops_kern_sk: Result<(), String>,
}

pub(super) fn attach_probe(
    ebpf: &mut Ebpf,
    spec: &'static ProbeSpec,
    env: &AttachEnv<'_>,
    opts: &LoaderOptions,
    offered: &Result<bool, String>,
) -> ProbeStatus {
    let required = spec.required || offered == &Ok(true);
    let disabled = opts
        .disabled
        .iter()
        .find(|(name, _)| *name == spec.name && !required)
        .map(|&(_, why)| why);
    let mut status = ProbeStatus {
        probe: spec.name,
        required,
        disabled,
        chosen: None,
        program: None,
        attempts: Vec::new(),
    };
    let forced = if spec.name == crate::kernel::probes::WRITE_TIMER {
        opts.force_write_timer
    } else {
        None
    };
    for cand in spec.candidates {
        let mechanism = cand.attach.mechanism();
        let target = cand.attach.target();
        let error = if let Some(why) = disabled {
            Some(format!("disabled: {why}"))
        } else if let Err(why) = offered {
            Some(format!("not offered: {why}"))
        } else if opts.denied.iter().any(|d| d == cand.program) {
            Some("refused: --deny-program".to_owned())
        } else if let Some(f) = forced.filter(|f| *f != mechanism) {
            Some(format!("skipped: --mechanism {} forced", f.as_str()))
        } else if status.chosen.is_some() && !opts.try_all {
            Some("not tried: a preferred mechanism is attached".to_owned())
        } else if let Some(missing) = missing_fields(cand, env.layout) {
            Some(format!("kernel BTF lacks {missing}"))
        } else if let (true, Err(why)) = (cand.rdonly_cast, &env.rdonly_cast) {
            Some(why.clone())
        } else {
            match try_attach(ebpf, cand, env) {
                Ok(()) if status.chosen.is_none() => {
                    status.chosen = Some(mechanism);
                    status.program = Some(cand.program);
                    None
                }
                Ok(()) => {
                    // Works, but a preferred one is attached: detach again.
                    // An iterator is attached to nothing and only runs when
                    // asked, so it stays loaded (the sweep benchmark runs
                    // each one, loaded with `try_all`).
                    if !matches!(cand.attach, Attach::Iter { .. }) {
                        unload(ebpf, cand.program);
                    }
                    Some("works (not used: a preferred mechanism is attached)".to_owned())
                }
                Err(e) => Some(e),
            }
        };
        status.attempts.push(Attempt {
            mechanism,
            target,
            program: cand.program,
            error,
        });
    }
    status
}

fn missing_fields(cand: &Candidate, l: &KernelLayout) -> Option<String> {
    let missing: Vec<_> = cand
        .fields
        .iter()
        .filter(|&&f| !l.fields[f].is_present())
        .map(|&f| layout::field_name(f))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn unload(ebpf: &mut Ebpf, program: &str) {
    let Some(p) = ebpf.program_mut(program) else {
        return;
    };
    if p.fd().is_err() {
        return; // never loaded
    }
    let r = match p {
        aya::programs::Program::BtfTracePoint(p) => p.unload(),
        aya::programs::Program::FEntry(p) => p.unload(),
        aya::programs::Program::KProbe(p) => p.unload(),
        aya::programs::Program::SockOps(p) => p.unload(),
        aya::programs::Program::Iter(p) => p.unload(),
        _ => Ok(()),
    };
    if let Err(e) = r {
        tracing::warn!(program, error = %chain(&e), "unloading program failed");
    }
}

fn try_attach(ebpf: &mut Ebpf, cand: &Candidate, env: &AttachEnv<'_>) -> Result<(), String> {
    let prog = ebpf
        .program_mut(cand.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", cand.program))?;
    let result = match cand.attach {
        Attach::TpBtf { tracepoint } => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e| chain(&e))?;
            p.load(tracepoint, env.btf)
                .map_err(|e| format!("load: {}", chain(&e)))
                .and_then(|()| {
                    p.attach()
                        .map(drop)
                        .map_err(|e| format!("attach: {}", chain(&e)))
                })
        }
        Attach::TimerTracepoint {
            tracepoint,
            callback,
        } => {
            let addr = match callback {
                "tcp_keepalive_timer" => &env.keepalive_timer_addr,
                "tw_timer_handler" => &env.tw_timer_addr,
                _ => &env.timer_addr,
            };
            let addr = addr.as_ref().map_err(|e| format!("{callback}: {e}"))?;
            if *addr == 0 {
                return Err(format!("{callback} address unknown"));
            }
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e| chain(&e))?;
            p.load(tracepoint, env.btf)
                .map_err(|e| format!("load: {}", chain(&e)))
                .and_then(|()| {
                    p.attach()
                        .map(drop)
                        .map_err(|e| format!("attach: {}", chain(&e)))
                })
        }
        Attach::Fentry { function } => {
            let p: &mut FEntry = prog.try_into().map_err(|e| chain(&e))?;
            p.load(function, env.btf)
                .map_err(|e| format!("load: {}", chain(&e)))
                .and_then(|()| {
                    p.attach()
                        .map(drop)
                        .map_err(|e| format!("attach: {}", chain(&e)))
                })
        }
        Attach::Kprobe { function } => {
            let p: &mut KProbe = prog.try_into().map_err(|e| chain(&e))?;
            let pmu = facts::has_kprobe_pmu();
            p.load()
                .map_err(|e| format!("load: {}", chain(&e)))
                .and_then(|()| {
                    p.attach(function, 0).map(drop).map_err(|e| {
                        let why = chain(&e);
                        if pmu {
                            format!("attach: {why}")
                        } else {
                            format!("attach: {why} (no kprobe PMU: /sys/bus/event_source/devices/kprobe missing, CONFIG_KPROBES unset)")
                        }
                    })
                })
        }
        Attach::Iter { target } => {
            env.socket_constants.clone()?;
            let p: &mut Iter = prog.try_into().map_err(|e| chain(&e))?;
            // Loaded only: each sweep attaches it anew (one run).
            p.load(target, env.btf)
                .map_err(|e| format!("load: {}", chain(&e)))
        }
        Attach::SockOps | Attach::SockOpsGuard => {
            if cand.program == tcpstall_common::guard::PLAIN_PROGRAM {
                env.sock_ops_kern_sk.clone()?;
            }
            let dir = env.cgroup.as_ref().ok_or_else(|| {
                "no cgroup2 mount found (mount -t cgroup2 none /sys/fs/cgroup)".to_owned()
            })?;
            let f = File::open(dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
            let p: &mut SockOps = prog.try_into().map_err(|e| chain(&e))?;
            p.load()
                .map_err(|e| format!("load: {}", chain(&e)))
                .and_then(|()| {
                    // On 5.7+ aya attaches with bpf_link_create, whose cgroup
                    // links always coexist with other programs (multi
                    // semantics) and which rejects BPF_F_ALLOW_MULTI: pass 0.
                    p.attach(&f, CgroupAttachMode::Single)
                        .map(drop)
                        .map_err(|e| format!("attach to {}: {}", dir.display(), chain(&e)))
                })
        }
    };
    if result.is_err() {
        // Leave nothing half-loaded behind.
        unload(ebpf, cand.program);
    }
    result
}
