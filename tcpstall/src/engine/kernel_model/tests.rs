//! The kernel model against documented values and against real kernels:
//! the replay fixtures (`tcpstall-tests/fixtures/replay`, event streams
//! recorded on 6.1, 6.12 and 6.18, each ending in the kernel's ETIMEDOUT).

use serde_json::Value;

use super::*;

/// Every S1 and S2 replay fixture: an established connection's RTO
/// expiries ending in ETIMEDOUT (`tcpstall-tests/tests/replay.rs` holds the
/// set complete: 6.1, 6.12 and 6.18). The other fixtures (connect,
/// keepalive, orphans, the zero window) have no loss probe or no RTO
/// streak; `replay.rs` checks them against their own kernel rules.
fn fixtures() -> Vec<String> {
    let dir = format!(
        "{}/../tcpstall-tests/fixtures/replay",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            name.trim_end_matches(".jsonl").to_owned()
        })
        .filter(|name| name.contains("-s1-") || name.contains("-s2-"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 9,
        "replay fixtures missing in {dir}: {names:?}"
    );
    names
}

/// `tcp_retries2` 15 is "924.6 seconds" (tcp(7)); the orphan default 8 is
/// ">100 seconds with minimal RTO of 200msec" (tcp_timer.c); 3 and 5 are the
/// S1 scenarios' 3.0 s and 12.6 s; `rto_max` 5 s (6.15+) makes 15 retries
/// 31 * 200 ms + 11 * 5 s = 61.2 s. Every HZ gives the same milliseconds.
#[test]
fn model_timeout_matches_the_documented_values() {
    for hz in [100, 250, 300, 1000] {
        let t = |n| tcp_model_timeout_ms(n, tcp_rto_min(hz), tcp_rto_max(hz), hz);
        assert_eq!(t(15), 924_600, "HZ {hz}");
        assert_eq!(t(8), 102_200, "HZ {hz}");
        assert_eq!(t(5), 12_600, "HZ {hz}");
        assert_eq!(t(3), 3_000, "HZ {hz}");
        assert_eq!(
            tcp_model_timeout_ms(15, tcp_rto_min(hz), 5 * hz, hz),
            61_200,
            "HZ {hz}"
        );
    }
    // tcp_orphan_retries(): "May be zero"; 8 "corresponds to >100 seconds
    // with minimal RTO of 200msec" while alive; an ICMP soft error on a
    // socket whose RTO reached rto_max: 0.
    assert_eq!(tcp_orphan_retries(0, true, 0), 8);
    assert_eq!(tcp_orphan_retries(0, false, 0), 0);
    assert_eq!(tcp_orphan_retries(3, true, 0), 3);
    assert_eq!(tcp_orphan_retries(3, false, 0), 3);
    assert_eq!(tcp_orphan_retries(3, false, 113), 0);
    assert_eq!(tcp_orphan_retries(3, true, 113), 3);
    assert_eq!(tcp_orphan_retries(0, true, 113), 8);
}

/// The wheel's levels: level 0 (delta < 63) rounds to the next jiffy, level
/// 1 (< 504) to 8 jiffies, level 2 (< 4032) to 64; the clock one ahead of
/// the callback's jiffy keeps an interval of exactly 63 on level 0.
#[test]
fn wheel_buckets_by_level() {
    assert_eq!(wheel_bucket_expiry(1_050, 1_000, 250), 1_051);
    assert_eq!(wheel_bucket_expiry(1_063, 1_000, 250), 1_064);
    assert_eq!(wheel_bucket_expiry(1_063, 1_001, 250), 1_064);
    assert_eq!(wheel_bucket_expiry(1_065, 1_001, 250), 1_072);
    assert_eq!(wheel_bucket_expiry(1_600, 1_000, 250), 1_664);
    assert_eq!(wheel_bucket_expiry(999, 1_000, 250), 1_000);
}

fn load(name: &str) -> (Value, Vec<Value>) {
    let path = format!(
        "{}/../tcpstall-tests/fixtures/replay/{name}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json line"));
    let header = lines.next().expect("header");
    (header, lines.collect())
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// What a fixture recorded: the loss probe's jiffy, the RTO expiries (write
/// timer with `icsk_pending` 1), and whether an ETIMEDOUT followed the last.
struct Recorded {
    hz: u64,
    sock: KernelSock,
    probe_jiffies: u64,
    expiries: Vec<Value>,
    /// The ETIMEDOUT report's clock (ms): after `tcp_write_timeout()` read
    /// its own.
    verdict_ms: u32,
}

fn recorded(name: &str) -> Recorded {
    let (header, events) = load(name);
    let hz = n(&header, "hz");
    let expiries: Vec<Value> = events
        .iter()
        .filter(|e| e["kind"] == "write_timer" && n(e, "pending") == 1)
        .cloned()
        .collect();
    let probe = events
        .iter()
        .find(|e| e["kind"] == "retransmit" && n(e, "pending") == 5)
        .expect("a loss probe before the first RTO");
    let verdict_ns = events
        .iter()
        .filter(|e| e["kind"] == "error_report" && n(e, "sk_err") == 110)
        .map(|e| n(e, "ts_ns"))
        .min()
        .unwrap_or_else(|| panic!("{name}: no ETIMEDOUT"));
    let first = &expiries[0];
    let rto_max_j = match n(first, "rto_max_jiffies") {
        0 => tcp_rto_max(hz),
        j => j,
    };
    Recorded {
        hz,
        sock: KernelSock {
            hz,
            tcp_retries2: first["tcp_retries2"].as_u64().unwrap_or(15) as u32,
            tcp_orphan_retries: 0,
            user_timeout_ms: n(first, "user_timeout_ms") as u32,
            orphan: first["orphan"].as_bool().unwrap_or(false),
            rto_max_j,
            sk_err_soft: first["err_soft"].as_u64().unwrap_or(0) as u32,
        },
        probe_jiffies: n(probe, "jiffies"),
        expiries,
        verdict_ms: (verdict_ns / 1_000_000) as u32,
    }
}

/// Each recorded RTO expiry against the model's rules, step by step: the
/// verdict of `tcp_write_timeout()` (alive at every expiry but the last,
/// dead at the last), the doubled RTO, the re-armed timer (with the user
/// timeout's clamp) and the jiffy the wheel ran it at (never before the
/// model's bucket; a callback can run late, at most a few jiffies here).
#[test]
fn model_rules_match_every_recorded_expiry() {
    let mut report = Vec::new();
    for name in &fixtures() {
        let r = recorded(name);
        let x = &r.expiries;
        let last = x.len() - 1;
        // The first RTO was armed from the loss probe's callback.
        let bucket = wheel_bucket_expiry(n(&x[0], "timer_expires"), r.probe_jiffies + 1, r.hz);
        assert!(
            bucket <= n(&x[0], "jiffies"),
            "{name}: first expiry before its bucket"
        );
        for (i, e) in x.iter().enumerate() {
            let now_ms = (n(e, "ts_ns") / 1_000_000) as u32;
            let stamp = n(e, "retrans_stamp") as u32;
            let rto = n(e, "rto_jiffies");
            let dead = |ms| r.sock.timed_out(n(e, "retransmits") as u32, ms, stamp, rto);
            if i == last {
                // `tcp_write_timeout()` reads the clock after our event and
                // before the report: a tie (the deadline between the two,
                // 7.3-s1-retries2-3-tie) is dead by the report's clock.
                assert!(
                    dead(now_ms) || dead(r.verdict_ms),
                    "{name}: alive at the fatal expiry {i} by the report's clock"
                );
                if !dead(now_ms) {
                    report.push(format!(
                        "{name} expiry {i}: a tie, dead by the report's clock"
                    ));
                }
                break;
            }
            // Alive by the kernel's later clock, so by the event's too.
            assert!(
                !dead(now_ms),
                "{name}: dead at expiry {i}, which it survived"
            );
            let next = &x[i + 1];
            let doubled = (rto << 1).min(r.sock.rto_max_j);
            assert_eq!(
                n(next, "rto_jiffies"),
                doubled,
                "{name}: RTO after expiry {i}"
            );
            let stamp_after = n(next, "retrans_stamp") as u32;
            let interval = r.sock.clamp_rto(doubled, now_ms, stamp_after);
            // Re-armed after the retransmission: in the callback's jiffy, or
            // (slow TCG guests) a jiffy or two later.
            let expires = n(next, "timer_expires");
            let arm_j = expires - interval;
            assert!(
                (n(e, "jiffies")..=n(e, "jiffies") + 3).contains(&arm_j),
                "{name}: timer after expiry {i} armed for {expires}, {interval} j from {arm_j}, the callback ran at {}",
                n(e, "jiffies")
            );
            let bucket = wheel_bucket_expiry(expires, (n(e, "jiffies") + 1).max(arm_j), r.hz);
            let ran = n(next, "jiffies");
            assert!(
                bucket <= ran && ran - bucket <= 3,
                "{name}: expiry {} ran at {ran}, the model's bucket is {bucket}",
                i + 1
            );
            report.push(format!("{name} expiry {}: late {} j", i + 1, ran - bucket));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The model run on its own from each fixture's first RTO (callbacks on
/// their bucket's jiffy) kills the socket at the same expiry the kernel
/// did, and its fatal expiry's jiffy differs from the recorded one by no
/// more than the callbacks' recorded lateness.
#[test]
fn model_run_dies_at_the_recorded_expiry() {
    for name in &fixtures() {
        let r = recorded(name);
        let first = &r.expiries[0];
        let (j0, ts0) = (n(first, "jiffies"), n(first, "ts_ns"));
        let jiffy_ns = |j: u64| {
            let d = (j as i128 - j0 as i128) * 1_000_000_000 / i128::from(r.hz);
            (i128::from(ts0) + d) as u64
        };
        let run = Blackholed {
            sock: r.sock,
            icsk_rto_j: n(first, "rto_jiffies"),
            icsk_retransmits: 0,
            retrans_stamp: 0,
            timer_expires: n(first, "timer_expires"),
            armed_at: r.probe_jiffies,
            from_callback: true,
            callback_latency_ns: 0,
        }
        .run(jiffy_ns, 1_000);
        assert_eq!(
            run.len(),
            r.expiries.len(),
            "{name}: the model kills at expiry {} ({:?}), the kernel at {}",
            run.len(),
            run.iter().map(|e| e.jiffies).collect::<Vec<_>>(),
            r.expiries.len()
        );
        assert!(run.last().unwrap().fatal);
        let mut lateness = 0;
        for (i, (m, k)) in run.iter().zip(&r.expiries).enumerate() {
            assert_eq!(m.rto_j, n(k, "rto_jiffies"), "{name}: RTO at expiry {i}");
            let kj = n(k, "jiffies");
            lateness = lateness.max(kj.abs_diff(m.jiffies));
        }
        // Late callbacks shift every later expiry (each re-arms from its
        // own jiffy); the recorded ones are at most 3 jiffies late.
        assert!(
            lateness <= 8,
            "{name}: model and kernel {lateness} jiffies apart"
        );
    }
}
