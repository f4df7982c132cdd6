//! Engine settings, their defaults and their validation.

use std::time::Duration;

/// Engine settings. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// The kernel's HZ; None = calibrate from event (ts, jiffies) pairs.
    pub hz: Option<u32>,
    /// Flow table bound (LRU eviction beyond, counted). Default 65,536.
    pub max_flows: usize,
    /// Consecutive RTOs without ACK progress for the `retransmit` class. Default 2.
    pub min_rto_streak: u32,
    /// Persist timer running this long -> `zero_window`. Default 5 s.
    pub zero_window_after: Duration,
    /// In CLOSE_WAIT this long -> `close_wait`. Default 60 s.
    pub close_wait_after: Duration,
    /// An orphan's FIN_WAIT2 timeout is listed (class `fin_wait2`) once it
    /// ran this long without the peer's FIN. Default 1 s.
    pub fin_wait2_after: Duration,
    /// Near horizon when the predicted death is this close. Default 60 s.
    pub near_horizon_secs: f64,
    /// ... or this share of the boundary is consumed, in (0, 1]. Default 0.5.
    pub near_horizon_fraction: f64,
    /// Remotes listed by [`Engine::remotes`]; the rest is summed. Default 100.
    pub top_remotes: usize,
    /// Remotes with their own cumulative counters. Default 16,384.
    pub max_remotes: usize,
    /// Fixed part of the grace after an expected expiry. Default 1 s.
    pub stale_grace: Duration,
    /// Proportional part (of the expected interval). Default 0.5.
    pub stale_grace_factor: f64,
    /// How long a closed flow waits for its error report before its streak
    /// is settled. Default 2 s.
    pub close_settle: Duration,
    /// Closed flows remembered to match a late error report. Default 4,096.
    pub recently_closed: usize,
    /// Observations kept until drained (oldest dropped, counted). Default 100,000.
    pub max_observations: usize,
    /// Model the kernel timer wheel's rounding of future expiries. Default true.
    pub timer_wheel: bool,
    /// The kernel shows this node's drops of a socket's packets (the drop
    /// probe is attached): silence is then `peer_silent`, else `unknown`.
    /// Default true.
    pub drops_visible: bool,
    /// `enum skb_drop_reason` names of the running kernel, by value (from
    /// its BTF, without the `SKB_DROP_REASON_` prefix). Default empty.
    pub drop_reason_names: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            hz: None,
            max_flows: 65_536,
            min_rto_streak: 2,
            zero_window_after: Duration::from_secs(5),
            close_wait_after: Duration::from_secs(60),
            fin_wait2_after: Duration::from_secs(1),
            near_horizon_secs: 60.0,
            near_horizon_fraction: 0.5,
            top_remotes: 100,
            max_remotes: 16_384,
            stale_grace: Duration::from_secs(1),
            stale_grace_factor: 0.5,
            close_settle: Duration::from_secs(2),
            recently_closed: 4_096,
            max_observations: 100_000,
            timer_wheel: true,
            drops_visible: true,
            drop_reason_names: Vec::new(),
        }
    }
}

/// A nonsensical [`EngineConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineConfigError {
    #[error("max_flows must be at least 1")]
    MaxFlows,
    #[error("hz must be between 1 and 100000, got {0}")]
    Hz(u32),
    #[error("min_rto_streak must be at least 1")]
    MinRtoStreak,
    #[error("near_horizon_fraction must be in (0, 1], got {0}")]
    NearHorizonFraction(f64),
    #[error("near_horizon_secs must be finite and >= 0, got {0}")]
    NearHorizonSecs(f64),
    #[error("top_remotes must be at least 1")]
    TopRemotes,
    #[error("max_remotes ({max_remotes}) must be at least top_remotes ({top_remotes})")]
    MaxRemotes {
        max_remotes: usize,
        top_remotes: usize,
    },
    #[error("stale_grace_factor must be finite and >= 0, got {0}")]
    StaleGraceFactor(f64),
    #[error("recently_closed must be at least 1")]
    RecentlyClosed,
    #[error("max_observations must be at least 1")]
    MaxObservations,
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), EngineConfigError> {
        if self.max_flows == 0 {
            return Err(EngineConfigError::MaxFlows);
        }
        if let Some(hz) = self.hz
            && !(1..=100_000).contains(&hz)
        {
            return Err(EngineConfigError::Hz(hz));
        }
        if self.min_rto_streak == 0 {
            return Err(EngineConfigError::MinRtoStreak);
        }
        let f = self.near_horizon_fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(EngineConfigError::NearHorizonFraction(f));
        }
        if !(self.near_horizon_secs.is_finite() && self.near_horizon_secs >= 0.0) {
            return Err(EngineConfigError::NearHorizonSecs(self.near_horizon_secs));
        }
        if self.top_remotes == 0 {
            return Err(EngineConfigError::TopRemotes);
        }
        if self.max_remotes < self.top_remotes {
            return Err(EngineConfigError::MaxRemotes {
                max_remotes: self.max_remotes,
                top_remotes: self.top_remotes,
            });
        }
        if !(self.stale_grace_factor.is_finite() && self.stale_grace_factor >= 0.0) {
            return Err(EngineConfigError::StaleGraceFactor(self.stale_grace_factor));
        }
        if self.recently_closed == 0 {
            return Err(EngineConfigError::RecentlyClosed);
        }
        if self.max_observations == 0 {
            return Err(EngineConfigError::MaxObservations);
        }
        Ok(())
    }
}
