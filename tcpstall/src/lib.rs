//! tcpstall: finds stuck TCP connections before they hurt anyone.
//!
//! Module map (one job each):
//! - [`btf`]: reads kernel BTF (type information) to find struct field offsets.
//! - [`layout`]: the declarative table of kernel fields the programs read,
//!   resolved from BTF into a [`tcpstall_common::KernelLayout`].
//! - [`probes`]: the declarative table of probes and their fallback mechanisms.
//! - [`kernel`]: facts about the running kernel (HZ, kallsyms, privileges).
//! - [`loader`]: the only place touching `aya::Ebpf` (load, attach, fallbacks).
//! - [`reader`]: ring buffer -> owned [`event::SockEvent`]s.
//! - [`event`]: decoding raw records.
//! - [`engine`]: pure stall state machine and horizon predictor (no I/O).
//! - [`config`]: command line and config file.
//! - [`incidents`]: every stalled socket grouped by class, pod and remote.
//! - [`process`]: the agent's own CPU time and memory (/proc/self).
//! - [`identity`]: socket -> pod, container (cgroup id, runtime state) and process.
//! - [`pods`]: network namespace -> pod identity from /proc (cgroup v1 fallback).
//! - [`metrics`]: the Prometheus metric contract (prometheus-client registry).
//! - [`server`]: the HTTP server: /metrics, /healthz, /readyz, /api/v1/*.
//! - [`sweep`]: the socket sweep, agent side: records -> sockets, when to sweep.
//! - [`app`]: `tcpstall run`: wires loader, reader, engine and server together.
//! - [`top`]: `tcpstall top`: live terminal view of the local agent's stalls.
//! - [`doctor`]: `tcpstall doctor`: the probe plan for this kernel.
pub mod app;
pub mod btf;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod event;
pub mod features;
pub mod identity;
pub mod incidents;
pub mod kernel;
pub mod kfunc;
pub mod layout;
pub mod loader;
pub mod metrics;
pub mod pods;
pub mod probes;
pub mod process;
pub mod reader;
pub mod server;
pub mod sweep;
pub mod top;
