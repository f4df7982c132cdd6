//! `tcpstall doctor`: what this kernel offers, from real load/attach attempts.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::config::DoctorArgs;
use crate::kernel::{
    facts::{self, Privileges},
    loader::{self, LoaderOptions, Plan},
};

/// Render the plan for people.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "kernel {}", plan.kernel);
    match (plan.hz, &plan.hz_source) {
        (Some(hz), Some(src)) => {
            let _ = writeln!(out, "HZ {hz} (from {src})");
        }
        _ => {
            let _ = writeln!(
                out,
                "HZ unknown (no kernel config readable): calibrated from event timestamps at run time"
            );
        }
    }
    let _ = writeln!(out, "\nprobes:");
    for p in &plan.probes {
        let chosen = p.chosen.map(|m| m.as_str()).unwrap_or("NONE");
        let _ = writeln!(
            out,
            "  {:<13} -> {:<16} {}",
            p.probe,
            chosen,
            if p.required {
                "(required)"
            } else {
                "(optional)"
            }
        );
        for a in &p.attempts {
            let verdict = match &a.error {
                // An iterator is loaded once and run per sweep.
                None if a.mechanism == crate::kernel::event::Mechanism::Sweep => {
                    "loaded".to_owned()
                }
                None => "attached".to_owned(),
                Some(e) => e.clone(),
            };
            let _ = writeln!(
                out,
                "      {:<16} {:<52} {:<28} {}",
                a.mechanism.as_str(),
                a.target,
                a.program,
                verdict
            );
        }
    }
    let _ = writeln!(out, "\nkernel fields (from BTF):\n{}", plan.fields);
    out
}

/// The drop probe is attached on demand by the agent (only while a flow is
/// in a loss episode): tried here once, attach then detach.
fn drop_on_demand(loaded: &mut loader::Loaded) -> Option<String> {
    match loaded.take_drop_switch() {
        Ok(Some(mut sw)) => Some(match sw.attach() {
            Ok(()) => {
                sw.detach();
                format!(
                    "{} attached on demand (only while a flow is in a loss episode; tcpstall_drop_probe_attached): attach and detach work",
                    sw.program()
                )
            }
            Err(e) => format!(
                "{}: attaching on demand FAILED ({e}): the agent will count tcpstall_drop_probe_attach_errors_total and not see local drops",
                sw.program()
            ),
        }),
        Ok(None) => None,
        Err(e) => Some(format!("attach on demand unavailable: {e}")),
    }
}

pub fn doctor(args: &DoctorArgs) -> anyhow::Result<()> {
    let privs = Privileges::current();
    let missing = privs.missing();
    if !privs.euid_root && !missing.is_empty() {
        anyhow::bail!(
            "doctor must load probes to test them: missing {} (run as root, e.g. `sudo tcpstall doctor`)",
            missing.join(", ")
        );
    }
    let opts = LoaderOptions {
        btf_path: args.common.btf.clone(),
        try_all: true,
        denied: args.common.deny_program.clone(),
        ..LoaderOptions::default()
    };
    let mut loaded = loader::load(&opts).context("loading probes")?;
    let drop_on_demand = drop_on_demand(&mut loaded);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&loaded.plan)?);
    } else {
        print!("{}", render(&loaded.plan));
        match loaded.sweep_program() {
            Ok(p) => println!("\nsweep iterator: {p}"),
            Err(e) => println!("\nsweep iterator: unavailable ({e})"),
        }
        if let Some(line) = &drop_on_demand {
            println!("drop probe: {line}");
        }
        println!(
            "\nprivileges: {}",
            if privs.euid_root {
                "root".to_owned()
            } else {
                "capabilities OK".to_owned()
            }
        );
        println!(
            "kprobe PMU: {}",
            if facts::has_kprobe_pmu() {
                "present"
            } else {
                "absent"
            }
        );
    }
    // Dropping `loaded` detaches every probe.
    Ok(())
}
