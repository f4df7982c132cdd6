//! The kernel's HZ, configured or calibrated from the (monotonic ns, jiffies)
//! pair every event carries.
//!
//! Two independent estimates:
//! - the slope: jiffies advanced over monotonic time between samples at least
//!   [`MIN_SPACING_NS`] apart; the median of the recent slopes, snapped to a
//!   common HZ value, once [`MIN_SLOPES`] are in (one-off outliers such as a
//!   suspend or a late sample cannot move a median);
//! - the boot offset: `jiffies_64` starts at `INITIAL_JIFFIES` =
//!   `2^32 - 300 * HZ` when CLOCK_MONOTONIC is about 0, so
//!   `HZ ~ (jiffies - 2^32) / (t - 300 s)`: usable alone after ten minutes of
//!   uptime when it snaps cleanly, and it confirms a single slope earlier.
//!
//! Until either is available the default (250) is used; [`HzSource`] says
//! which.

use serde::Serialize;

/// HZ values kernels are built with.
const COMMON_HZ: [u32; 11] = [100, 128, 200, 250, 256, 300, 500, 512, 1000, 1024, 1200];
/// Used until calibrated.
pub const DEFAULT_HZ: u32 = 250;
/// Samples closer than this do not make a slope (2 s: +-2 jiffies of noise
/// is 1 % at HZ=100).
pub const MIN_SPACING_NS: u64 = 2_000_000_000;
/// Slopes needed for a calibrated value on their own.
pub const MIN_SLOPES: usize = 3;
const RING: usize = 15;
/// Boot-offset estimates need this much uptime (the ~1 s between the start of
/// the monotonic clock and of jiffies is then < 0.4 %).
const BOOT_MIN_UPTIME_NS: u64 = 600_000_000_000;
const BOOT_OFFSET_SECS: f64 = 300.0;
const SNAP_TOLERANCE: f64 = 0.02;
const BOOT_SNAP_TOLERANCE: f64 = 0.01;

/// Where the HZ in use comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HzSource {
    Configured,
    /// From the slope of jiffies over monotonic time.
    Calibrated,
    /// From the boot offset of jiffies (`INITIAL_JIFFIES`).
    BootOffset,
    /// Nothing known yet: [`DEFAULT_HZ`].
    #[default]
    Default,
}

impl HzSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configured => "configured",
            Self::Calibrated => "calibrated",
            Self::BootOffset => "boot_offset",
            Self::Default => "default",
        }
    }
}

/// Snaps an estimate to the nearest common HZ within `tol`, else rounds it.
pub fn snap(estimate: f64, tol: f64) -> Option<u32> {
    if !estimate.is_finite() || !(1.0..=100_000.0).contains(&estimate) {
        return None;
    }
    let nearest = COMMON_HZ
        .iter()
        .copied()
        .min_by(|a, b| {
            let da = (f64::from(*a) - estimate).abs();
            let db = (f64::from(*b) - estimate).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(DEFAULT_HZ);
    if (f64::from(nearest) - estimate).abs() <= tol * f64::from(nearest) {
        Some(nearest)
    } else {
        Some(estimate.round() as u32)
    }
}

/// HZ from a single (monotonic ns, jiffies) sample via the boot offset, if it
/// snaps to a common value.
pub fn boot_offset_estimate(ts_ns: u64, jiffies: u64) -> Option<u32> {
    if ts_ns < BOOT_MIN_UPTIME_NS {
        return None;
    }
    let secs = ts_ns as f64 / 1e9 - BOOT_OFFSET_SECS;
    let est = (jiffies as f64 - 4_294_967_296.0) / secs;
    let hz = snap(est, BOOT_SNAP_TOLERANCE)?;
    COMMON_HZ
        .contains(&hz)
        .then_some(hz)
        .filter(|&hz| (f64::from(hz) - est).abs() <= BOOT_SNAP_TOLERANCE * f64::from(hz))
}

#[derive(Clone, Debug)]
pub struct HzCalibrator {
    configured: Option<u32>,
    last: Option<(u64, u64)>,
    slopes: [f64; RING],
    n: usize,
    next: usize,
    boot: Option<u32>,
    current: u32,
    source: HzSource,
}

impl HzCalibrator {
    pub fn new(configured: Option<u32>) -> Self {
        let (current, source) = match configured {
            Some(hz) => (hz, HzSource::Configured),
            None => (DEFAULT_HZ, HzSource::Default),
        };
        Self {
            configured,
            last: None,
            slopes: [0.0; RING],
            n: 0,
            next: 0,
            boot: None,
            current,
            source,
        }
    }

    pub fn hz(&self) -> u32 {
        self.current
    }

    pub fn source(&self) -> HzSource {
        self.source
    }

    /// Feeds one sample; returns true when the HZ in use changed.
    pub fn observe(&mut self, ts_ns: u64, jiffies: u64) -> bool {
        if self.configured.is_some() || jiffies == 0 || ts_ns == 0 {
            return false;
        }
        // Re-estimating sorts the slopes: do it only when the inputs changed
        // (a new slope arrives at most every MIN_SPACING_NS), not per event.
        let mut dirty = false;
        if self.boot.is_none() {
            self.boot = boot_offset_estimate(ts_ns, jiffies);
            dirty = self.boot.is_some();
        }
        match self.last {
            None => self.last = Some((ts_ns, jiffies)),
            Some((t0, j0)) => {
                if ts_ns < t0 || jiffies < j0 {
                    // Out of order (or a rebooted clock): restart from here.
                    if ts_ns < t0.saturating_sub(MIN_SPACING_NS) || jiffies < j0 {
                        self.last = Some((ts_ns, jiffies));
                    }
                } else if ts_ns - t0 >= MIN_SPACING_NS {
                    let slope = (jiffies - j0) as f64 * 1e9 / (ts_ns - t0) as f64;
                    self.slopes[self.next] = slope;
                    self.next = (self.next + 1) % RING;
                    self.n = (self.n + 1).min(RING);
                    self.last = Some((ts_ns, jiffies));
                    dirty = true;
                }
            }
        }
        if !dirty {
            return false;
        }
        let (hz, source) = self.estimate();
        let changed = hz != self.current;
        self.current = hz;
        self.source = source;
        changed
    }

    fn median_slope(&self) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let mut v = [0.0f64; RING];
        v[..self.n].copy_from_slice(&self.slopes[..self.n]);
        let v = &mut v[..self.n];
        v.sort_by(f64::total_cmp);
        Some(v[self.n / 2])
    }

    fn estimate(&self) -> (u32, HzSource) {
        let slope = self.median_slope().and_then(|m| snap(m, SNAP_TOLERANCE));
        match (slope, self.boot) {
            (Some(hz), _) if self.n >= MIN_SLOPES => (hz, HzSource::Calibrated),
            (Some(hz), Some(boot)) if hz == boot => (hz, HzSource::Calibrated),
            (_, Some(boot)) => (boot, HzSource::BootOffset),
            _ => (DEFAULT_HZ, HzSource::Default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    fn initial_jiffies(hz: u32) -> u64 {
        (1u64 << 32) - 300 * u64::from(hz)
    }

    fn jiffies_at(hz: u32, ts_ns: u64) -> u64 {
        initial_jiffies(hz) + ts_ns * u64::from(hz) / S
    }

    #[test]
    fn configured_wins() {
        let mut c = HzCalibrator::new(Some(1000));
        assert!(!c.observe(10 * S, jiffies_at(250, 10 * S)));
        assert_eq!((c.hz(), c.source()), (1000, HzSource::Configured));
    }

    #[test]
    fn default_until_enough_data_then_calibrated() {
        let mut c = HzCalibrator::new(None);
        assert_eq!((c.hz(), c.source()), (DEFAULT_HZ, HzSource::Default));
        // Early after boot (no boot-offset estimate), HZ=1000.
        let mut t = 20 * S;
        for _ in 0..3 {
            c.observe(t, jiffies_at(1000, t));
            t += S / 2;
        }
        assert_eq!(c.source(), HzSource::Default);
        for _ in 0..20 {
            c.observe(t, jiffies_at(1000, t));
            t += S;
        }
        assert_eq!((c.hz(), c.source()), (1000, HzSource::Calibrated));
    }

    #[test]
    fn boot_offset_gives_an_early_value() {
        let mut c = HzCalibrator::new(None);
        let t = 3_600 * S;
        assert!(!c.observe(t, jiffies_at(250, t)));
        assert_eq!((c.hz(), c.source()), (250, HzSource::BootOffset));
        let mut c = HzCalibrator::new(None);
        assert!(c.observe(t, jiffies_at(1000, t)));
        assert_eq!((c.hz(), c.source()), (1000, HzSource::BootOffset));
        // One slope agreeing with it: calibrated.
        c.observe(t + 3 * S, jiffies_at(1000, t + 3 * S));
        assert_eq!((c.hz(), c.source()), (1000, HzSource::Calibrated));
        // Too early after boot: no boot estimate.
        assert_eq!(
            boot_offset_estimate(100 * S, jiffies_at(250, 100 * S)),
            None
        );
        // A clock not matching the boot offset (e.g. jiffies unknown) gives none.
        assert_eq!(boot_offset_estimate(3_600 * S, 12_345), None);
    }

    #[test]
    fn robust_to_outliers() {
        let mut c = HzCalibrator::new(None);
        let mut t = 30 * S;
        let mut j = 1_000_000u64;
        for i in 0..15 {
            c.observe(t, j);
            t += 2 * S;
            // A suspend-like jump every fifth sample.
            j += if i % 5 == 4 { 5_000 } else { 600 };
        }
        assert_eq!((c.hz(), c.source()), (300, HzSource::Calibrated));
    }

    #[test]
    fn odd_hz_is_rounded_not_snapped() {
        let mut c = HzCalibrator::new(None);
        let mut t = 30 * S;
        for _ in 0..10 {
            c.observe(t, t * 864 / S);
            t += 3 * S;
        }
        assert_eq!(c.hz(), 864);
    }

    #[test]
    fn zero_jiffies_ignored_and_out_of_order_tolerated() {
        let mut c = HzCalibrator::new(None);
        for i in 0..10 {
            c.observe(30 * S + i * 3 * S, 0);
        }
        assert_eq!(c.source(), HzSource::Default);
        let mut t = 30 * S;
        for i in 0..20u64 {
            let ts = if i % 4 == 3 { t - S / 10 } else { t };
            c.observe(ts, ts * 100 / S + 7);
            t += S;
        }
        assert_eq!((c.hz(), c.source()), (100, HzSource::Calibrated));
    }

    #[test]
    fn snapping() {
        assert_eq!(snap(249.0, 0.02), Some(250));
        assert_eq!(snap(1004.0, 0.02), Some(1000));
        assert_eq!(snap(864.2, 0.02), Some(864));
        assert_eq!(snap(f64::NAN, 0.02), None);
        assert_eq!(snap(-3.0, 0.02), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn prop_calibrates_with_jitter(
            hz in prop::sample::select(COMMON_HZ.to_vec()),
            start_s in 1u64..100_000,
            noise in prop::collection::vec(-2i64..=2, 8..30),
            gaps in prop::collection::vec(2_000u64..9_000, 30),
        ) {
            let mut c = HzCalibrator::new(None);
            let mut t = start_s * S;
            for (i, n) in noise.iter().enumerate() {
                let j = (jiffies_at(hz, t) as i64 + n) as u64;
                c.observe(t, j);
                t += gaps[i] * 1_000_000;
            }
            prop_assert_eq!(c.hz(), hz);
            prop_assert!(matches!(c.source(), HzSource::Calibrated | HzSource::BootOffset));
        }
    }
}
