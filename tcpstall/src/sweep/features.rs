//! What the agent does on this node, and why a feature is off: the socket
//! sweep and the features built on it. Pure: decided from the loader's
//! outcome and the settings, logged at start-up, exported as
//! `tcpstall_feature{feature,state}` and alerted on (`state="off_kernel"`).

/// Where a feature stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureState {
    On,
    /// Turned off by the operator (the flag or setting that did it).
    OffConfig(&'static str),
    /// The kernel (or a refused program) leaves it out: the reason.
    OffKernel(String),
}

impl FeatureState {
    /// The `state` label.
    pub fn as_str(&self) -> &'static str {
        match self {
            FeatureState::On => "on",
            FeatureState::OffConfig(_) => "off_config",
            FeatureState::OffKernel(_) => "off_kernel",
        }
    }

    /// Every value of the `state` label.
    pub const STATES: [&'static str; 3] = ["on", "off_config", "off_kernel"];
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureStatus {
    /// The `feature` label.
    pub name: &'static str,
    /// What it gives, for the start-up log.
    pub what: &'static str,
    pub state: FeatureState,
}

/// The socket sweep itself.
pub const SWEEP: &str = "sweep";
/// Stalls already in progress when the agent starts.
pub const STARTUP_RECONCILE: &str = "startup_reconcile";
/// A sweep after the kernel reports lost events.
pub const REPAIR_AFTER_LOSS: &str = "repair_after_loss";
/// The hang-forever audit (`/api/v1/risks`), from every sweep.
pub const RISK_AUDIT: &str = "risk_audit";

/// The features, from the sweep program that loaded (`Err`: why none did)
/// and the sweep settings.
pub fn features(
    sweep: &Result<&'static str, String>,
    startup_sweep: bool,
    sweep_on_loss: bool,
    periodic_sweep: bool,
) -> Vec<FeatureStatus> {
    let kernel = |s: &Result<&'static str, String>| match s {
        Ok(_) => None,
        Err(why) => Some(FeatureState::OffKernel(format!("no socket sweep: {why}"))),
    };
    let gated = |on: bool, flag: &'static str| {
        kernel(sweep).unwrap_or(if on {
            FeatureState::On
        } else {
            FeatureState::OffConfig(flag)
        })
    };
    vec![
        FeatureStatus {
            name: SWEEP,
            what: "every TCP socket's state read from the kernel (iter/task_file)",
            state: kernel(sweep).unwrap_or(FeatureState::On),
        },
        FeatureStatus {
            name: STARTUP_RECONCILE,
            what: "stalls already in progress at start-up",
            state: gated(startup_sweep, "--no-startup-sweep"),
        },
        FeatureStatus {
            name: REPAIR_AFTER_LOSS,
            what: "stalls whose events were lost (ring buffer full) repaired by a sweep",
            state: gated(sweep_on_loss, "--no-sweep-on-loss"),
        },
        FeatureStatus {
            name: RISK_AUDIT,
            what: "sockets without a timeout (/api/v1/risks, tcpstall_sockets_without_timeout)",
            state: gated(
                startup_sweep || sweep_on_loss || periodic_sweep,
                "--no-startup-sweep with --sweep-interval 0 and --no-sweep-on-loss",
            ),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(v: &[FeatureStatus]) -> Vec<(&'static str, &'static str)> {
        v.iter().map(|f| (f.name, f.state.as_str())).collect()
    }

    /// A kernel without a loadable sweep turns every sweep feature off for
    /// the kernel's reason (never "config"), whatever the settings; with a
    /// sweep, the settings decide.
    /// Mutation: `gated` ignoring the sweep's outcome (`if on { On } else
    /// { OffConfig }` alone) fails the first assertion (`startup_reconcile`
    /// "on" on a kernel without a sweep).
    #[test]
    fn sweep_outcome_and_settings_decide() {
        let none: Result<&'static str, String> = Err("the kernel has no bpf_sock_from_file".into());
        let v = features(&none, true, true, true);
        assert_eq!(
            states(&v),
            vec![
                (SWEEP, "off_kernel"),
                (STARTUP_RECONCILE, "off_kernel"),
                (REPAIR_AFTER_LOSS, "off_kernel"),
                (RISK_AUDIT, "off_kernel"),
            ]
        );
        match &v[1].state {
            FeatureState::OffKernel(why) => assert!(why.contains("bpf_sock_from_file"), "{why}"),
            s => panic!("{s:?}"),
        }
        let ok: Result<&'static str, String> = Ok("tcpstall_sweep_plain");
        assert!(
            features(&ok, true, true, true)
                .iter()
                .all(|f| f.state == FeatureState::On)
        );
        let v = features(&ok, false, true, false);
        assert_eq!(v[1].state, FeatureState::OffConfig("--no-startup-sweep"));
        assert_eq!(v[3].state, FeatureState::On);
        let v = features(&ok, false, false, false);
        assert_eq!(v[2].state.as_str(), "off_config");
        assert_eq!(v[3].state.as_str(), "off_config");
        assert_eq!(v[0].state, FeatureState::On);
    }
}
