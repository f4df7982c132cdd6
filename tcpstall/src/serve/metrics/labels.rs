//! The label sets of the metric families: one struct per set (the field
//! order is the label order of the exposition), and `FlowLabels` of the
//! per-flow series built from a stall view.

use prometheus_client::encoding::EncodeLabelSet;

use crate::engine::StallView;
use crate::identity::{Direction, netns::PodIdentity, peer_service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RemoteLabels {
    pub(super) remote: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RetransmitLabels {
    pub(super) remote: String,
    pub(super) cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClassLabels {
    pub(super) class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CauseLabels {
    pub(super) cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct GuardLabels {
    pub(super) namespace: String,
    pub(super) rule: String,
    pub(super) action: &'static str,
    pub(super) mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct KindLabels {
    pub(super) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ProbeLabels {
    pub(super) probe: String,
    pub(super) mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FeatureLabels {
    pub(super) feature: &'static str,
    pub(super) state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BuildLabels {
    pub(super) version: String,
    pub(super) kernel: String,
}

/// Labels of the incident series (one stall class, owning pod and remote;
/// see [`crate::serve::incidents`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct IncidentLabels {
    pub(super) node: String,
    pub(super) class: &'static str,
    pub(super) cause: &'static str,
    pub(super) namespace: String,
    pub(super) pod: String,
    pub(super) remote: String,
    /// `initiated`, `accepted`, or empty for the overflow groups.
    pub(super) direction: &'static str,
}

/// Labels of the per-flow series (the alert rules' contract).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub class: &'static str,
    /// Why it stalls (a closed set: [`crate::engine::StallCause`]).
    pub cause: &'static str,
    pub local: String,
    /// The peer service, as in the incident series (for an accepted
    /// connection: the peer's IP and our listening port).
    pub remote: String,
    /// `initiated` or `accepted`.
    pub direction: &'static str,
    /// The peer's own address (ip:port).
    pub peer: String,
    /// Network namespace inode.
    pub netns: String,
    /// Empty when the owning pod is unknown.
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

impl FlowLabels {
    pub fn of(view: &StallView, pod: Option<&PodIdentity>, direction: Direction) -> Self {
        Self {
            class: view.class.as_str(),
            cause: view.cause.as_str(),
            local: view.local.to_string(),
            remote: peer_service(view.local, view.remote, direction).to_string(),
            direction: direction.as_str(),
            peer: view.remote.to_string(),
            netns: view.netns.to_string(),
            pod: pod.map(|p| p.pod.clone()).unwrap_or_default(),
            namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            container: pod.map(|p| p.container.clone()).unwrap_or_default(),
        }
    }
}
