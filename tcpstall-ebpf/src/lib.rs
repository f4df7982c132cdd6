//! The kernel programs live in `main.rs` (a `bpfel-unknown-none` binary built by
//! aya-build from the agent's build script). This empty library exists so the
//! agent can name this crate as a build dependency and be rebuilt when it changes.
#![no_std]
