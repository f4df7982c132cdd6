//! The serving wing: what the agent exposes while it runs.
//!
//! - [`state`]: [`state::AgentState`] (everything the event loop and the
//!   server share) and [`state::Health`] (what `/readyz` answers from).
//! - [`server`]: the HTTP server: /metrics, /healthz, /readyz, /api/v1/*.
//! - [`metrics`]: the Prometheus metric contract (prometheus-client registry).
//! - [`incidents`]: every stalled socket grouped by class, pod and remote.
//! - [`self_stats`]: the agent's own CPU time and memory (/proc/self).
pub mod incidents;
pub mod metrics;
pub mod self_stats;
pub mod server;
pub mod state;
