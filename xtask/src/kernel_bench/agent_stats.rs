//! What the running agent itself reports: its `/metrics` (event counts by
//! kind, the event delivery histogram) and its programs' per-CPU counters
//! (`TCPSTALL_STATS`, read with `bpftool map dump`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tcpstall_common::{STATS_MAP, stat};

/// The agent's `/metrics` in the classic text format.
pub fn scrape(listen: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(10))
        .with_context(|| format!("connecting to the agent's /metrics at {listen}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {listen}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .context("reading the agent's /metrics")?;
    match body.split_once("\r\n\r\n") {
        Some((head, text)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(text.to_owned())
        }
        _ => bail!(
            "the agent's /metrics answered: {}",
            body.lines().next().unwrap_or("")
        ),
    }
}

/// The value of the sample `series` (name with its labels exactly as
/// exposed, e.g. `tcpstall_events_total{kind="ack"}`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.starts_with(' ')
            .then(|| rest.split_whitespace().next()?.parse().ok())?
    })
}

/// Cumulative buckets (upper bound, count) of histogram `name`.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// Quantile `q` of the observations between two readings of the same
/// cumulative histogram, interpolated linearly inside its bucket (as
/// PromQL's `histogram_quantile`); None without observations. A quantile in
/// the `+Inf` bucket is reported as the largest finite bound.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let d: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - b)
        })
        .collect();
    let total = d.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, n) in &d {
        if *n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = n - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (*le, *n);
    }
    None
}

/// The `TCPSTALL_STATS` counters summed over CPUs, from the map used by
/// the programs `prog_map_ids` lists.
pub fn stats_map(map_ids: &[u32]) -> anyhow::Result<[u64; stat::COUNT as usize]> {
    let shown = super::progs::bpftool_json(&["map", "show"])?;
    let id = shown
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"].as_str() == Some(STATS_MAP))
        .filter_map(|m| m["id"].as_u64())
        .find(|id| map_ids.contains(&(*id as u32)))
        .with_context(|| format!("no {STATS_MAP} map among the agent's programs' maps"))?;
    let dump = super::progs::bpftool_json(&["map", "dump", "id", &id.to_string()])?;
    let mut out = [0u64; stat::COUNT as usize];
    for entry in dump.as_array().into_iter().flatten() {
        let Some(key) = number(&entry["key"]) else {
            continue;
        };
        let Some(slot) = out.get_mut(key as usize) else {
            continue;
        };
        for v in entry["values"].as_array().into_iter().flatten() {
            *slot += number(&v["value"]).unwrap_or(0);
        }
    }
    Ok(out)
}

/// A number as bpftool prints it: plain (with BTF) or little-endian hex
/// bytes (`["0x01", "0x00", ...]`, without).
fn number(v: &serde_json::Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let bytes = v.as_array()?;
    let mut n = 0u64;
    for (i, b) in bytes.iter().enumerate().take(8) {
        let b = u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
        n |= b << (8 * i);
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: drop the `- b` (use the cumulative count after, not the
    /// difference) in `quantile`: the p50 comes out near 5.5 ms, not 10.
    #[test]
    fn quantile_of_the_difference_between_two_readings() {
        let before = [
            (0.001, 100.0),
            (0.01, 100.0),
            (0.05, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let after = [
            (0.001, 100.0),
            (0.01, 200.0),
            (0.05, 300.0),
            (f64::INFINITY, 300.0),
        ];
        // 200 new observations: 100 in (1, 10] ms, 100 in (10, 50] ms.
        let p50 = quantile(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p75 = quantile(&before, &after, 0.75).unwrap();
        assert!((p75 - 0.03).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn samples_and_buckets_from_the_text_format() {
        let text = "# TYPE x histogram\nx_bucket{le=\"0.005\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_count 4\ntcpstall_events_total{kind=\"ack\"} 7\ntcpstall_events_total{kind=\"ackx\"} 9\n";
        assert_eq!(buckets(text, "x"), vec![(0.005, 3.0), (f64::INFINITY, 4.0)]);
        assert_eq!(
            sample(text, "tcpstall_events_total{kind=\"ack\"}"),
            Some(7.0)
        );
        assert_eq!(sample(text, "tcpstall_events_total{kind=\"none\"}"), None);
        assert_eq!(
            number(&serde_json::json!(["0x01", "0x02", "0x00"])),
            Some(0x0201)
        );
    }
}
