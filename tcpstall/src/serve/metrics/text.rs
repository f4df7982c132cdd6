//! The classic Prometheus text format (0.0.4), converted from the
//! OpenMetrics text the registry encodes (for scrapers whose `Accept`
//! header prefers `text/plain`).

use std::{collections::HashMap, fmt::Write as _};

/// Converts `prometheus-client`'s OpenMetrics text into the classic
/// Prometheus text format (version 0.0.4):
/// - `# EOF` and `# UNIT` lines are dropped;
/// - counter families are announced under their sample name (`# TYPE
///   x_total counter`; OpenMetrics names the family `x`);
/// - `_created` samples of counters and histograms are dropped (none are
///   emitted today);
/// - types without a classic equivalent: `info`/`stateset` become `gauge`,
///   `gaugehistogram` `histogram`, `unknown` `untyped`;
/// - exemplars (` # {...}` after a sample) are stripped.
///
/// Label values and numbers are written the same way in both formats. HELP
/// texts contain no backslash, quote or newline, so their escaping agrees.
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, ty)) = rest.split_once(' ')
        {
            types.insert(name, ty);
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = classic_family_name(name, types.get(name).copied());
            let _ = writeln!(out, "# HELP {name} {help}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let classic_ty = match ty {
                "counter" | "gauge" | "histogram" | "summary" => ty,
                "gaugehistogram" => "histogram",
                "info" | "stateset" => "gauge",
                _ => "untyped",
            };
            let _ = writeln!(
                out,
                "# TYPE {} {classic_ty}",
                classic_family_name(name, Some(ty))
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // A sample: strip an exemplar, drop `_created`.
        let sample = match line.find(" # ") {
            Some(i) => &line[..i],
            None => line,
        };
        let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
        if let Some(base) = sample[..name_end].strip_suffix("_created")
            && matches!(
                types.get(base).copied(),
                Some("counter" | "histogram" | "summary" | "gaugehistogram")
            )
        {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

fn classic_family_name(name: &str, ty: Option<&str>) -> String {
    match ty {
        Some("counter") => format!("{name}_total"),
        Some("info") => format!("{name}_info"),
        _ => name.to_owned(),
    }
}
