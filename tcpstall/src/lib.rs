//! tcpstall: finds stuck TCP connections before they hurt anyone.
//!
//! Wings (one job each), bottom to top; a wing only uses the wings below it
//! (checked by the `layering` unit test):
//! - [`kernel`]: BTF, the field layout, the probe table, kfuncs, kernel
//!   facts, the loader (the only place touching `aya::Ebpf`), the ring-buffer
//!   reader and the decoded [`kernel::event::SockEvent`].
//! - [`engine`]: pure stall state machine and horizon predictor (no I/O); of
//!   the kernel wing it uses only the decoded event type.
//! - [`sweep`]: the socket sweep, agent side: records -> sockets, when to
//!   sweep, the hang-forever audit, the sweep cycle, the features built on it.
//! - [`identity`]: socket -> pod, container (cgroup id, runtime state),
//!   process; network namespace -> pod as the cgroup v1 fallback.
//! - [`guard`]: the opt-in guard: its policy (which cgroups, pods and
//!   namespaces get which TCP_USER_TIMEOUT / keepalive), the rules handed to
//!   its kernel program, and what that program reports it did.
//! - [`serve`]: the shared agent state and health, the HTTP server, the
//!   Prometheus metric contract, incidents, the agent's own CPU and memory.
//! - [`cli`]: command line and config file, `tcpstall doctor`, `tcpstall top`.
//! - [`app`]: `tcpstall run`: wires loader, reader, engine, sweep and server
//!   together.
pub mod app;
pub mod cli;
pub mod engine;
pub mod guard;
pub mod identity;
pub mod kernel;
pub mod serve;
pub mod sweep;

#[cfg(test)]
mod layering;
