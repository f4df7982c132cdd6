//! The command-line wing: arguments and the commands other than `run`.
//!
//! - [`config`]: command line (every command's arguments) and config file.
//! - [`doctor`]: `tcpstall doctor`: the probe plan for this kernel.
//! - [`top`]: `tcpstall top`: live terminal view of the local agent's stalls.
pub mod config;
pub mod doctor;
pub mod top;
