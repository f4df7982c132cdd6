//! The kernel's own record of a blackholed socket's death, taken from the
//! events of its RTO expiries (`write_timer`, `pending == 1`: `ts_ns`,
//! `jiffies` at the callback, `timer_expires` as armed) and its
//! `error_report` (`sk_err == 110`), and the bound a death prediction must
//! meet against it. Independent of the engine: nothing here calls it.

use serde_json::Value;

/// One RTO expiry as the kernel ran it (all fields are shown in failure
/// messages).
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)]
pub struct Expiry {
    pub ts_ns: u64,
    /// `jiffies` when the callback ran.
    pub jiffies: u64,
    /// The expiry the timer was armed for (`icsk_timeout` / `expires`).
    pub expires: u64,
    /// Jiffies this expiry ran after the timer wheel's on-time bucket (see
    /// [`on_time_jiffy`]); 0 when the expiry ran on time.
    pub late_jiffies: u64,
    /// Granularity (jiffies) of the wheel level the timer was queued in.
    pub granularity: u64,
}

#[derive(Debug)]
pub struct KernelDeath {
    /// The ETIMEDOUT verdict (`inet_sk_error_report`), monotonic ns.
    pub verdict_ns: u64,
    /// The fatal RTO expiry's callback (monotonic ns).
    pub fatal_expiry_ns: u64,
    /// HZ measured from the expiries (jiffies per second, snapped to a
    /// kernel configuration: 100, 250, 300 or 1000).
    pub hz: u64,
    pub expiries: Vec<Expiry>,
    /// `tcp_retries2` deaths (no user timeout, not orphaned, millisecond
    /// stamps): the instant `retrans_stamp + tcp_model_timeout()` (ns)
    /// and the fatal expiry's `icsk_rto` and `rto_max` (jiffies).
    pub retries_deadline: Option<RetriesDeadline>,
}

#[derive(Clone, Copy, Debug)]
pub struct RetriesDeadline {
    pub deadline_ns: u64,
    pub fatal_rto_j: u64,
    pub rto_max_j: u64,
}

/// `tcp_model_timeout()` (jiffies) for `boundary` retries from `rto_base`.
pub fn tcp_model_timeout_j(boundary: u64, rto_base: u64, rto_max: u64) -> u64 {
    let thresh = u64::from((rto_max / rto_base.max(1)).max(1).ilog2());
    if boundary <= thresh {
        ((2 << boundary) - 1) * rto_base
    } else {
        ((2 << thresh) - 1) * rto_base + (boundary - thresh) * rto_max
    }
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("event without a numeric {k}: {v}"))
}

/// `LVL_START(n)` of the timer wheel (`LVL_CLK_SHIFT` 3, `LVL_BITS` 6).
fn lvl_start(n: u32) -> u64 {
    63 << ((n - 1) * 3)
}

/// `calc_wheel_index()`: a timer armed at `clk` for `expires` is queued in
/// the level chosen by `expires - clk` and runs at the next bucket boundary
/// of that level (`(expires + LVL_GRAN) >> LVL_SHIFT << LVL_SHIFT`).
/// Returns (on-time jiffy, granularity).
pub fn on_time_jiffy(expires: u64, clk: u64, hz: u64) -> (u64, u64) {
    let depth = if hz > 100 { 9 } else { 8 };
    let delta = expires.saturating_sub(clk);
    let mut lvl = 0;
    while lvl + 1 < depth && delta >= lvl_start(lvl + 1) {
        lvl += 1;
    }
    let shift = 3 * lvl;
    (((expires >> shift) + 1) << shift, 1 << shift)
}

/// The kernel's ETIMEDOUT verdict on a socket: its error report with
/// `sk_err` ETIMEDOUT or its change to CLOSE carrying it.
/// `tcp_done_with_error()` sets `sk_err`, then `tcp_done()` (the change to
/// CLOSE), then `sk_error_report()`, in one softirq: either event dates
/// the verdict (microseconds apart), and one suffices when the other was
/// lost.
pub fn is_etimedout_verdict(e: &Value) -> bool {
    num(e, "sk_err") == 110
        && (e["kind"] == "error_report" || (e["kind"] == "state" && e["state"] == "CLOSE"))
}

impl KernelDeath {
    /// From the events of one socket (any order).
    pub fn from_events(flow: &[Value]) -> Self {
        let mut timers: Vec<&Value> = flow
            .iter()
            .filter(|e| e["kind"] == "write_timer" && num(e, "pending") == 1)
            .collect();
        timers.sort_by_key(|e| num(e, "ts_ns"));
        assert!(
            timers.len() >= 2,
            "need at least two RTO expiries of the socket: {flow:#?}"
        );
        // The error report (the recorded fixtures' verdict); the CLOSE
        // only when the report was lost.
        let first_of = |kind: &str| {
            flow.iter()
                .filter(|e| e["kind"] == kind && is_etimedout_verdict(e))
                .map(|e| num(e, "ts_ns"))
                .min()
        };
        let verdict_ns = first_of("error_report")
            .or_else(|| first_of("state"))
            .unwrap_or_else(|| panic!("no ETIMEDOUT error report or CLOSE: {flow:#?}"));
        let (f, l) = (timers[0], timers[timers.len() - 1]);
        let dj = num(l, "jiffies") - num(f, "jiffies");
        let dt = num(l, "ts_ns") - num(f, "ts_ns");
        assert!(dt > 0, "RTO expiries at one instant: {timers:#?}");
        let rate = dj as f64 * 1e9 / dt as f64;
        let hz = kernel_hz_of_rate(rate)
            .unwrap_or_else(|| panic!("jiffies advance at {rate:.1}/s, no kernel HZ: {timers:#?}"));
        let mut expiries = Vec::new();
        for (i, e) in timers.iter().enumerate() {
            let (jiffies, expires) = (num(e, "jiffies"), num(e, "timer_expires"));
            // The timer was re-armed by the previous expiry's callback.
            let (late_jiffies, granularity) = if i == 0 {
                (0, 1)
            } else {
                let clk = num(timers[i - 1], "jiffies");
                let (on_time, gran) = on_time_jiffy(expires, clk, hz);
                (jiffies.abs_diff(on_time), gran)
            };
            expiries.push(Expiry {
                ts_ns: num(e, "ts_ns"),
                jiffies,
                expires,
                late_jiffies,
                granularity,
            });
        }
        let fatal_expiry_ns = l["ts_ns"].as_u64().expect("ts");
        assert!(
            fatal_expiry_ns <= verdict_ns,
            "verdict before the fatal expiry: {flow:#?}"
        );
        let plain_retries = l["user_timeout_ms"].as_u64() == Some(0)
            && l["orphan"] == false
            && l["usec_ts"] == false
            && l["state"] == "ESTABLISHED";
        let retries_deadline = plain_retries.then(|| {
            let rto_max_j = num(l, "rto_max_jiffies");
            let timeout_j = tcp_model_timeout_j(num(l, "tcp_retries2"), hz / 5, rto_max_j);
            RetriesDeadline {
                deadline_ns: (num(l, "retrans_stamp") + timeout_j * 1000 / hz) * 1_000_000,
                fatal_rto_j: num(l, "rto_jiffies"),
                rto_max_j,
            }
        });
        Self {
            verdict_ns,
            fatal_expiry_ns,
            hz,
            expiries,
            retries_deadline,
        }
    }

    /// The deaths a prediction may name (ns, and why), each to be met
    /// within [`Self::prediction_bound_ns`]: the kernel's verdict, and when
    /// the `tcp_retries2` deadline falls within a jiffy of an expiry the
    /// other side of that tie. `tcp_write_timeout()` compares the
    /// millisecond clock it reads after the callback started (after our
    /// probe's event time) with `retrans_stamp`, read the same way at the
    /// episode's first expiry: an expiry that many jiffies after it lies in
    /// the same phase of its jiffy, and whether it kills depends on which
    /// callback ran later within it (microseconds on hardware, up to a
    /// millisecond under TCG). A model anchored on event times cannot know;
    /// recorded: 7.3-s1-retries2-3 (expiries 750 jiffies apart, the
    /// deadline 167 us after the fatal expiry's event).
    pub fn accepted_deaths_ns(&self) -> Vec<(u64, &'static str)> {
        let mut out = vec![(self.verdict_ns, "the kernel's verdict")];
        let Some(d) = self.retries_deadline else {
            return out;
        };
        let jiffy_ns = 1_000_000_000 / self.hz;
        let gap = self.verdict_ns - self.fatal_expiry_ns;
        let n = self.expiries.len();
        if self.fatal_expiry_ns.abs_diff(d.deadline_ns) <= jiffy_ns {
            // The kernel could have let it live one more RTO.
            let j = self.expiries[n - 1].jiffies;
            let rto = (2 * d.fatal_rto_j).min(d.rto_max_j);
            let (fire, _) = on_time_jiffy(j + rto, j + 1, self.hz);
            out.push((
                self.verdict_ns + (fire - j) * jiffy_ns,
                "the expiry after the fatal one (the deadline within a jiffy of it)",
            ));
        }
        if n >= 2 && self.expiries[n - 2].ts_ns.abs_diff(d.deadline_ns) <= jiffy_ns {
            out.push((
                self.expiries[n - 2].ts_ns + gap,
                "the expiry before the fatal one (the deadline within a jiffy of it)",
            ));
        }
        out
    }

    /// A prediction's error (ns) against the nearest accepted death, and
    /// which one that is.
    pub fn prediction_error(&self, predicted_ns: u64) -> (i128, &'static str) {
        self.accepted_deaths_ns()
            .into_iter()
            .map(|(d, why)| (predicted_ns as i128 - d as i128, why))
            .min_by_key(|(e, _)| e.unsigned_abs())
            .expect("the verdict is always accepted")
    }

    /// How far any death prediction made at one of these expiries may be
    /// from the verdict, from kernel semantics alone:
    ///
    /// - a prediction is anchored on an expiry's event time, which lies
    ///   somewhere in that expiry's jiffy, and so does the fatal expiry's:
    ///   2 jiffies of phase (`1/HZ` each: 4 ms at HZ 250);
    /// - a timer runs at its wheel bucket (`calc_wheel_index`: the level
    ///   from the remaining interval, granularity 8^level jiffies), never
    ///   early; a prediction models that, but not a callback that runs
    ///   after its bucket (softirq latency: often 1 jiffy on an idle NOHZ
    ///   host, tens of ms in a TCG guest). That lateness is measured here
    ///   per expiry from its own `jiffies` and `expires`. An expiry that ran
    ///   late re-arms the timer that much later; the next bucket of its
    ///   level absorbs it unless the shifted expiry crosses a bucket
    ///   boundary (then it moves by one granularity): the drift of the fatal
    ///   expiry from an on-time kernel, walked from each possible anchor,
    ///   is exact, and the worst anchor counts;
    /// - the verdict follows the fatal expiry's callback (measured gap).
    ///
    /// On time, the bound is 2 jiffies + the verdict gap: far below the
    /// wheel's rounding a model without it misses (0.3 s at
    /// `tcp_retries2 = 5`, HZ 250) or one RTO expiry (0.4 s and more).
    pub fn prediction_bound_ns(&self) -> u64 {
        self.drift_jiffies()
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
            .checked_add(2)
            .map(|j| j * (1_000_000_000 / self.hz))
            .expect("bound")
            + (self.verdict_ns - self.fatal_expiry_ns)
    }

    /// The extra a user-timeout death needs. Its fatal expiry was armed by
    /// `tcp_clamp_rto_to_user_timeout()` at the expiry before it:
    /// `expires = jiffies + msecs_to_jiffies(UTO - (tcp_time_stamp -
    /// retrans_stamp))`, from the millisecond clock at that callback, i.e.
    /// from where in its jiffy the callback ran. A prediction made before
    /// that callback models it at the phase of its own anchor, and one made
    /// at it from the event's timestamp, taken before the handler refreshes
    /// `tcp_mstamp`: either can compute a `remaining` a millisecond or a few
    /// off, so the clamped `expires` is known within one jiffy either way
    /// (the callbacks' latencies differ by less than a jiffy). When
    /// `expires - 1` or `expires + 1` falls in another bucket of the level
    /// the timer was queued in (`calc_wheel_index`), the fatal expiry
    /// moves by that difference: one granularity of the level (8 jiffies,
    /// 32 ms at HZ 250, in level 1; 1 jiffy in level 0). Returns it in ns
    /// (0 with fewer than two expiries).
    pub fn clamp_allowance_ns(&self) -> u64 {
        let n = self.expiries.len();
        if n < 2 {
            return 0;
        }
        let (fatal, armer) = (&self.expiries[n - 1], &self.expiries[n - 2]);
        let fire = |e: u64| on_time_jiffy(e, armer.jiffies, self.hz).0;
        let at = fire(fatal.expires);
        let j = fire(fatal.expires + 1)
            .abs_diff(at)
            .max(fire(fatal.expires.saturating_sub(1)).abs_diff(at));
        j * (1_000_000_000 / self.hz)
    }

    /// For each anchor expiry: how many jiffies the fatal expiry ran after
    /// where an on-time kernel (every later callback in its bucket) would
    /// have run it.
    pub fn drift_jiffies(&self) -> Vec<u64> {
        let e = &self.expiries;
        (0..e.len())
            .map(|anchor| {
                let mut drift: u64 = 0;
                for k in anchor + 1..e.len() {
                    // Armed at the previous callback (`clk`), `drift` jiffies
                    // later than an on-time kernel would have armed it.
                    let clk = e[k - 1].jiffies;
                    let (actual, _) = on_time_jiffy(e[k].expires, clk, self.hz);
                    let (on_time, _) = on_time_jiffy(
                        e[k].expires.saturating_sub(drift),
                        clk.saturating_sub(drift),
                        self.hz,
                    );
                    drift = (actual - on_time.min(actual)) + e[k].late_jiffies;
                }
                drift
            })
            .collect()
    }
}

/// The kernel HZ (100, 250, 300 or 1000) jiffies advancing at `rate` per
/// second come from: the nearest, if within 10 %.
pub fn kernel_hz_of_rate(rate: f64) -> Option<u64> {
    let hz = [100u64, 250, 300, 1000].into_iter().min_by(|a, b| {
        (*a as f64 - rate)
            .abs()
            .total_cmp(&(*b as f64 - rate).abs())
    })?;
    ((rate - hz as f64).abs() < 0.1 * hz as f64).then_some(hz)
}
