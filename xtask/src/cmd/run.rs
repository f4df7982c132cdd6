//! `cargo xtask run`: build and run the agent as root.

use std::process::Command;

use anyhow::bail;

use crate::{
    cmd::build::build_agent,
    setup,
    util::{require_root, step},
};

pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    setup::toolchain()?;
    let bin = build_agent()?;
    require_root("running the agent")?;
    let args = if args.is_empty() {
        ["run", "--log-events", "--listen", "127.0.0.1:9977"]
            .map(String::from)
            .to_vec()
    } else {
        args
    };
    step(&format!("running {} {}", bin.display(), args.join(" ")));
    let err = std::os::unix::process::CommandExt::exec(Command::new(&bin).args(&args));
    bail!("could not exec {}: {err}", bin.display());
}
