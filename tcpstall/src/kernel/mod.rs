//! The kernel wing: everything that reads the running kernel or talks to the
//! eBPF programs, and nothing above it (no engine, no server).
//!
//! - [`btf`]: reads kernel BTF (type information) to find struct field offsets.
//! - [`layout`]: the declarative table of kernel fields the programs read,
//!   resolved from BTF into a [`tcpstall_common::KernelLayout`].
//! - [`probes`]: the declarative table of probes and their fallback mechanisms.
//! - [`kfunc`]: writes the running kernel's kfunc BTF ids into the object.
//! - [`facts`]: facts about the running kernel (HZ, kallsyms, privileges).
//! - [`loader`]: the only place touching `aya::Ebpf` (load, attach, fallbacks).
//! - [`reader`]: ring buffer -> owned [`event::SockEvent`]s.
//! - [`event`]: decoding raw records into owned, validated events.
pub mod btf;
pub mod event;
pub mod facts;
pub mod kfunc;
pub mod layout;
pub mod loader;
pub mod probes;
pub mod reader;
