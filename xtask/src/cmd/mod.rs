//! One module per `cargo xtask` subcommand (`setup` and `image` live in
//! their own top-level modules, which other commands use too).

pub mod accuracy;
pub mod bench;
pub mod build;
pub mod mutants;
pub mod record_fixtures;
pub mod run;
pub mod test;
pub mod vm_test;
