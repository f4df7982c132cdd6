//! Incidents: every stalled socket counted once, grouped by what an on-call
//! engineer acts on — the stall class, its cause (whose problem it is), the
//! owning pod and the peer service with the direction of the connections.
//! Fifty pooled connections from one pod to one dead database are one
//! incident with `sockets = 50`, and so are fifty connections of one client
//! host to one stalled server pod (`remote` is then the client's IP with our
//! listening port, `direction="accepted"`), so an alert on these groups
//! pages once.
//!
//! Unlike the per-flow series (only the top-K most urgent flows), the groups
//! cover every stalled socket: the sum of `sockets` over all groups of a class
//! equals the class' stalled-socket gauge. The number of groups is bounded:
//! the `max_groups` most urgent keep their own labels, the others are merged
//! per class into one overflow group (`remote = "other"`, pod and namespace
//! empty).
//!
//! Pure: no I/O; the caller supplies the views and their pod identities.

use std::collections::HashMap;

use crate::{
    engine::{StallCause, StallClass, StallView},
    identity::{Direction, netns::PodIdentity, peer_service},
};

/// The `remote` label of the overflow group.
pub const OTHER: &str = "other";

/// What an incident is keyed by (label values; empty = unknown pod).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct IncidentKey {
    pub class: StallClass,
    pub cause: StallCause,
    pub namespace: String,
    pub pod: String,
    /// The peer service ([`peer_service`]), or [`OTHER`].
    pub remote: String,
    /// Who opened the connections (`None` for the overflow groups).
    pub direction: Option<Direction>,
}

/// One group of stalled sockets.
#[derive(Clone, Debug, PartialEq)]
pub struct Incident {
    pub key: IncidentKey,
    /// Stalled sockets in the group (every one, not only the top-K).
    pub sockets: usize,
    /// The longest `stalled_for_s` in the group.
    pub oldest_stall_s: f64,
    /// The earliest predicted ETIMEDOUT, seconds from now (negative when
    /// overdue); None when no socket of the group has a prediction.
    pub earliest_timeout_s: Option<f64>,
}

impl Incident {
    fn new(key: IncidentKey) -> Self {
        Incident {
            key,
            sockets: 0,
            oldest_stall_s: 0.0,
            earliest_timeout_s: None,
        }
    }

    fn add(&mut self, sockets: usize, oldest: f64, earliest: Option<f64>) {
        self.sockets += sockets;
        self.oldest_stall_s = self.oldest_stall_s.max(oldest);
        self.earliest_timeout_s = match (self.earliest_timeout_s, earliest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Most urgent first: earliest death (groups without one after), then
    /// more sockets, then the longest stall, then the key (stable output).
    fn urgency(a: &Incident, b: &Incident) -> std::cmp::Ordering {
        let ta = a.earliest_timeout_s.unwrap_or(f64::INFINITY);
        let tb = b.earliest_timeout_s.unwrap_or(f64::INFINITY);
        ta.total_cmp(&tb)
            .then(b.sockets.cmp(&a.sockets))
            .then(b.oldest_stall_s.total_cmp(&a.oldest_stall_s))
            .then(a.key.cmp(&b.key))
    }
}

/// Groups `stalls` (each with its pod, when known) into at most
/// `max_groups` incidents plus one overflow group per class, most urgent
/// first (the overflow groups last).
pub fn aggregate<'a>(
    stalls: impl IntoIterator<Item = (&'a StallView, Option<&'a PodIdentity>, Direction)>,
    max_groups: usize,
) -> Vec<Incident> {
    let mut groups: HashMap<IncidentKey, Incident> = HashMap::new();
    for (v, pod, direction) in stalls {
        let key = IncidentKey {
            class: v.class,
            cause: v.cause,
            namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            pod: pod.map(|p| p.pod.clone()).unwrap_or_default(),
            remote: peer_service(v.local, v.remote, direction).to_string(),
            direction: Some(direction),
        };
        groups
            .entry(key.clone())
            .or_insert_with(|| Incident::new(key))
            .add(
                1,
                v.stalled_for_s,
                v.seconds_to_timeout.filter(|s| s.is_finite()),
            );
    }
    let mut all: Vec<Incident> = groups.into_values().collect();
    all.sort_by(Incident::urgency);
    if all.len() <= max_groups {
        return all;
    }
    let rest = all.split_off(max_groups);
    let mut overflow: Vec<Incident> = Vec::new();
    for i in rest {
        let slot = match overflow
            .iter()
            .position(|o| o.key.class == i.key.class && o.key.cause == i.key.cause)
        {
            Some(p) => p,
            None => {
                overflow.push(Incident::new(IncidentKey {
                    class: i.key.class,
                    cause: i.key.cause,
                    namespace: String::new(),
                    pod: String::new(),
                    remote: OTHER.to_owned(),
                    direction: None,
                }));
                overflow.len() - 1
            }
        };
        overflow[slot].add(i.sockets, i.oldest_stall_s, i.earliest_timeout_s);
    }
    overflow.sort_by(|a, b| a.key.cmp(&b.key));
    all.extend(overflow);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FlowHistory, StallClass};
    use crate::kernel::event::TcpState;

    fn view(
        class: StallClass,
        local_port: u16,
        remote: &str,
        stalled: f64,
        to: Option<f64>,
    ) -> StallView {
        StallView {
            class,
            since_ns: 0,
            stalled_for_s: stalled,
            cookie: u64::from(local_port),
            local: format!("10.0.0.1:{local_port}").parse().unwrap(),
            remote: remote.parse().unwrap(),
            netns: 1,
            cgroup_id: 0,
            state: TcpState::Established,
            retransmits: 0,
            rto_streak: 0,
            backoff: 0,
            rto_ms: 0,
            packets_out: 0,
            total_retrans: 0,
            unacked_age_s: None,
            boundary_s: None,
            boundary_source: None,
            predicted_timeout_ns: None,
            seconds_to_timeout: to,
            horizon_fraction: None,
            near_horizon: false,
            zero_window_probes: None,
            zero_window_unanswered: None,
            no_prediction_reason: None,
            zero_window_s: None,
            close_wait_age_s: None,
            orphan: false,
            user_timeout_ms: None,
            last_event_age_s: 0.0,
            history: FlowHistory::default(),
            retransmits_by_cause: Default::default(),
            cause: crate::engine::StallCause::PeerSilent,
            cause_evidence: Default::default(),
        }
    }

    fn pod(name: &str) -> PodIdentity {
        PodIdentity {
            pod: name.into(),
            namespace: "shop".into(),
            pod_uid: "uid".into(),
            container: "c".into(),
            ..Default::default()
        }
    }

    #[test]
    fn fifty_pooled_connections_to_one_remote_are_one_incident() {
        let p = pod("orders-1");
        let views: Vec<StallView> = (0..50)
            .map(|i| {
                view(
                    StallClass::Retransmit,
                    40_000 + i,
                    "10.96.20.5:5432",
                    30.0 + f64::from(i),
                    Some(200.0 - f64::from(i)),
                )
            })
            .collect();
        let got = aggregate(
            views.iter().map(|v| (v, Some(&p), Direction::Initiated)),
            100,
        );
        assert_eq!(got.len(), 1, "{got:?}");
        let i = &got[0];
        assert_eq!(i.sockets, 50);
        assert_eq!(i.key.pod, "orders-1");
        assert_eq!(i.key.namespace, "shop");
        assert_eq!(i.key.remote, "10.96.20.5:5432");
        assert_eq!(i.oldest_stall_s, 79.0);
        assert_eq!(i.earliest_timeout_s, Some(151.0));
    }

    /// Fifty clients' connections from one host to one stalled server pod:
    /// the peer's ephemeral ports differ, the peer service (peer IP, our
    /// listening port) does not. Initiated connections keep the peer port.
    /// Mutation: `peer_service` returning `remote` for `Accepted` -> 50 groups.
    #[test]
    fn fifty_clients_of_one_server_port_are_one_incident() {
        let p = pod("api-0");
        let views: Vec<StallView> = (0..50u16)
            .map(|i| {
                let mut v = view(
                    StallClass::Retransmit,
                    8080,
                    &format!("10.1.2.3:{}", 40_000 + i),
                    10.0 + f64::from(i),
                    Some(300.0),
                );
                v.cookie = u64::from(i) + 1;
                v
            })
            .collect();
        let got = aggregate(
            views.iter().map(|v| (v, Some(&p), Direction::Accepted)),
            100,
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].sockets, 50);
        assert_eq!(got[0].key.remote, "10.1.2.3:8080");
        assert_eq!(got[0].key.direction, Some(Direction::Accepted));
        let got = aggregate(
            views.iter().map(|v| (v, Some(&p), Direction::Initiated)),
            100,
        );
        assert_eq!(got.len(), 50, "initiated: one service per peer port");
    }

    #[test]
    fn groups_by_class_pod_and_remote() {
        let (a, b) = (pod("a"), pod("b"));
        let v1 = view(StallClass::Retransmit, 1, "10.0.0.9:1", 5.0, Some(50.0));
        let v2 = view(StallClass::Retransmit, 2, "10.0.0.9:1", 6.0, None);
        let v3 = view(StallClass::CloseWait, 3, "10.0.0.9:1", 70.0, None);
        let v4 = view(StallClass::Retransmit, 4, "10.0.0.8:1", 5.0, Some(9.0));
        let got = aggregate(
            [
                (&v1, Some(&a), Direction::Initiated),
                (&v2, Some(&b), Direction::Initiated),
                (&v3, Some(&a), Direction::Initiated),
                (&v4, None, Direction::Initiated),
            ],
            100,
        );
        assert_eq!(got.len(), 4);
        // Most urgent first: the unknown-pod flow dies in 9 s.
        assert_eq!(got[0].key.pod, "");
        assert_eq!(got[0].key.remote, "10.0.0.8:1");
        assert_eq!(got[1].earliest_timeout_s, Some(50.0));
        assert!(got.iter().all(|i| i.sockets == 1));
    }

    #[test]
    fn bounded_with_an_overflow_group_that_keeps_every_socket() {
        let views: Vec<StallView> = (0..30)
            .map(|i| {
                view(
                    StallClass::Retransmit,
                    i,
                    &format!("10.1.0.{i}:80"),
                    1.0,
                    Some(f64::from(i)),
                )
            })
            .chain((0..3).map(|i| {
                view(
                    StallClass::ZeroWindow,
                    100 + i,
                    &format!("10.2.0.{i}:80"),
                    9.0,
                    None,
                )
            }))
            .collect();
        let got = aggregate(views.iter().map(|v| (v, None, Direction::Initiated)), 10);
        assert_eq!(got.len(), 12, "10 groups + one overflow per class: {got:?}");
        assert_eq!(got.iter().map(|i| i.sockets).sum::<usize>(), 33);
        // The 10 most urgent keep their labels.
        for (n, i) in got[..10].iter().enumerate() {
            assert_eq!(i.key.remote, format!("10.1.0.{n}:80"));
        }
        let other_rtx = got
            .iter()
            .find(|i| i.key.remote == OTHER && i.key.class == StallClass::Retransmit)
            .unwrap();
        assert_eq!(other_rtx.sockets, 20);
        assert_eq!(other_rtx.earliest_timeout_s, Some(10.0));
        let other_zw = got
            .iter()
            .find(|i| i.key.remote == OTHER && i.key.class == StallClass::ZeroWindow)
            .unwrap();
        assert_eq!(other_zw.sockets, 3);
        assert_eq!(other_zw.earliest_timeout_s, None);
        assert_eq!(other_zw.key.pod, "");
    }
}
