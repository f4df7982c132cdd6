//! Harness for the integration tests: network namespaces joined by veth
//! pairs, nftables blackholes, sockets created inside a namespace, and the
//! real agent as a child process. Every resource is owned by a guard that
//! removes it on drop, also when a test fails.
//!
//! Which test files need root: `scenarios`, `behaviour`, `sweep`, `top`,
//! `k8s`, `containerd`, `guard`, `image`, `privileges` and `prometheus_e2e` run the
//! real agent and the kernel programs (`cargo xtask test` runs them as root); `deploy`,
//! `kustomize` and `replay` need no root.
//!
//! Prerequisites are checked loudly: a missing one fails the test with a line
//! naming it and the fix; nothing is skipped.
//!
//! Modules, by concern (every item is re-exported here, so tests
//! `use tcpstall_tests::*;`):
//!
//! - [`util`]: `require*`, command runners, [`wait_until`], the monotonic
//!   clock, test notes;
//! - [`net`]: namespaces, links, veth, blackholes, connections;
//! - [`agent`]: the [`Agent`] harness and its event readers;
//! - [`witness`]: the ftrace [`TraceWitness`];
//! - [`prometheus`]: exposition and Grafana query helpers;
//! - [`k8s`]: `setpriv` and `kubernetes-validate` helpers; a CRI client
//!   ([`k8s::cri`]) and a private containerd node ([`k8s::containerd`]);
//!   kubelet-style pod cgroups, processes started in them and sockets
//!   created in them ([`in_cgroup`]), containerd task specs and a run's pods
//!   ([`TaskPods`], the guard's tests).

pub mod agent;
pub mod k8s;
pub mod net;
pub mod prometheus;
pub mod util;
pub mod witness;

pub use agent::*;
pub use k8s::*;
pub use net::*;
pub use prometheus::*;
pub use util::*;
pub use witness::*;
