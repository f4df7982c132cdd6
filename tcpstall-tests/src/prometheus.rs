//! Prometheus exposition and Grafana query helpers.

/// Sum of the samples of metric `name` whose labels include every `(k, v)`
/// in `labels` (Prometheus text or OpenMetrics exposition). None if absent.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let ok = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if ok && let Ok(x) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += x;
        }
    }
    found
}

/// Expands Grafana's template variables in a dashboard query so Prometheus
/// (or a parser) can take it: the interval variables (`$__rate_interval`,
/// `$__interval`, `$__range`, also as `${...}`) become `range`; a variable
/// listed in `vars` its value; any other `$name` / `${name}` becomes `all`
/// (a dashboard variable's "All" value, e.g. `.*`).
pub fn grafana_expand(expr: &str, vars: &[(&str, &str)], all: &str, range: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(p) = rest.find('$') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(e) => (&inner[..e], &inner[e + 1..]),
                None => (inner, ""),
            }
        } else {
            let e = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..e], &after[e..])
        };
        if name.is_empty() {
            out.push('$');
        } else if name.starts_with("__") {
            out.push_str(range);
        } else if let Some((_, v)) = vars.iter().find(|(k, _)| *k == name) {
            out.push_str(v);
        } else {
            out.push_str(all);
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}
