//! `tcpstall top`: a live terminal view of the local agent's stalled sockets
//! (its `/api/v1/stalls`), most urgent first, with a countdown to ETIMEDOUT.
//!
//! The agent is polled every `--interval`; between polls the countdowns keep
//! running from the last answer. `--once` (and any stdout that is not a
//! terminal) prints one plain table instead.

use std::{
    io::{IsTerminal, Write},
    net::{SocketAddr, ToSocketAddrs},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use http_body_util::{BodyExt, Empty};
use ratatui::{
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row, Table},
};
use serde_json::Value;

use super::config::{DEFAULT_LISTEN, TopArgs};

/// One stalled socket as shown.
#[derive(Clone, Debug, PartialEq)]
pub struct StallRow {
    pub class: String,
    /// Why it stalls (`local_drop`, `peer_silent`, ...; `-` from an agent
    /// without causes).
    pub cause: String,
    /// `namespace/pod`, else the owning process, else `-`.
    pub owner: String,
    pub local: String,
    pub remote: String,
    /// The guard rule that armed the socket's timeouts (`guarded_by`):
    /// `rule`, `rule (dry-run)` when it only would have, `-` for none.
    pub guard: String,
    pub rtos: u64,
    pub retransmits: u64,
    pub stalled_for_s: f64,
    /// Seconds to the predicted ETIMEDOUT at fetch time (negative: overdue).
    pub seconds_to_timeout: Option<f64>,
}

impl StallRow {
    fn from_json(v: &Value) -> Self {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
        let owner = match (v["namespace"].as_str(), v["pod"].as_str()) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            (None, Some(pod)) => pod.to_owned(),
            _ => match &v["process"] {
                Value::Object(p) => format!(
                    "{}[{}]",
                    p.get("comm").and_then(Value::as_str).unwrap_or("?"),
                    p.get("pid").and_then(Value::as_u64).unwrap_or(0)
                ),
                Value::String(p) => p.clone(),
                _ => "-".to_owned(),
            },
        };
        StallRow {
            class: s("class"),
            cause: v["cause"].as_str().unwrap_or("-").to_owned(),
            owner,
            local: s("local"),
            remote: s("remote"),
            guard: guard_cell(&v["guarded_by"]),
            rtos: v["rto_streak"].as_u64().unwrap_or(0),
            retransmits: v["total_retrans"].as_u64().unwrap_or(0),
            stalled_for_s: v["stalled_for_s"].as_f64().unwrap_or(0.0),
            seconds_to_timeout: v["seconds_to_timeout"].as_f64(),
        }
    }

    fn matches(&self, filter: &str) -> bool {
        let f = filter.to_lowercase();
        [
            &self.class,
            &self.cause,
            &self.owner,
            &self.local,
            &self.remote,
            &self.guard,
        ]
        .iter()
        .any(|x| x.to_lowercase().contains(&f))
    }
}

/// The GUARD cell of a stall's `guarded_by` (see [`StallRow::guard`]).
fn guard_cell(g: &Value) -> String {
    match g["rule"].as_str() {
        Some(rule) if g["mode"] == "dry-run" => format!("{rule} (dry-run)"),
        Some(rule) => rule.to_owned(),
        None => "-".to_owned(),
    }
}

/// The stalls of one `/api/v1/stalls` document.
pub fn parse_stalls(doc: &str) -> anyhow::Result<Vec<StallRow>> {
    let v: Value = serde_json::from_str(doc).context("the agent's answer is not JSON")?;
    let Some(stalls) = v["stalls"].as_array() else {
        bail!("the agent's answer has no `stalls` list (not a tcpstall agent?)");
    };
    Ok(stalls.iter().map(StallRow::from_json).collect())
}

/// Sort orders, cycled with `s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    /// Soonest ETIMEDOUT first, then the longest stall (the agent's order).
    TimeToDeath,
    StallAge,
    Remote,
    Owner,
}

impl SortBy {
    fn next(self) -> Self {
        match self {
            SortBy::TimeToDeath => SortBy::StallAge,
            SortBy::StallAge => SortBy::Remote,
            SortBy::Remote => SortBy::Owner,
            SortBy::Owner => SortBy::TimeToDeath,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SortBy::TimeToDeath => "time to ETIMEDOUT",
            SortBy::StallAge => "stall age",
            SortBy::Remote => "remote",
            SortBy::Owner => "pod/process",
        }
    }
}

/// Filters and sorts `rows` for display.
pub fn arrange(rows: &[StallRow], sort: SortBy, filter: &str) -> Vec<StallRow> {
    let mut v: Vec<StallRow> = rows
        .iter()
        .filter(|r| filter.is_empty() || r.matches(filter))
        .cloned()
        .collect();
    let ttd = |r: &StallRow| r.seconds_to_timeout.unwrap_or(f64::INFINITY);
    v.sort_by(|a, b| match sort {
        SortBy::TimeToDeath => ttd(a)
            .total_cmp(&ttd(b))
            .then(b.stalled_for_s.total_cmp(&a.stalled_for_s)),
        SortBy::StallAge => b.stalled_for_s.total_cmp(&a.stalled_for_s),
        SortBy::Remote => a.remote.cmp(&b.remote).then(ttd(a).total_cmp(&ttd(b))),
        SortBy::Owner => a.owner.cmp(&b.owner).then(ttd(a).total_cmp(&ttd(b))),
    });
    v
}

/// The countdown cell: `T-12.3s` (`T+` when overdue), `never` without a
/// prediction; `elapsed` is the time since the answer was fetched.
pub fn countdown(seconds_to_timeout: Option<f64>, elapsed: f64) -> String {
    match seconds_to_timeout {
        Some(s) => {
            let left = s - elapsed;
            if left >= 0.0 {
                format!("T-{left:.1}s")
            } else {
                format!("T+{:.1}s", -left)
            }
        }
        None => "never".to_owned(),
    }
}

const HEADER: [&str; 9] = [
    "ETIMEDOUT",
    "CLASS",
    "CAUSE",
    "POD / PROCESS",
    "LOCAL",
    "REMOTE",
    "GUARD",
    "RTOS",
    "STALLED",
];

fn cells(r: &StallRow, elapsed: f64) -> [String; 9] {
    [
        countdown(r.seconds_to_timeout, elapsed),
        r.class.clone(),
        r.cause.clone(),
        r.owner.clone(),
        r.local.clone(),
        r.remote.clone(),
        r.guard.clone(),
        r.rtos.to_string(),
        format!("{:.1}s", r.stalled_for_s + elapsed),
    ]
}

/// The plain table of `--once`.
pub fn plain_table(rows: &[StallRow]) -> String {
    let body: Vec<[String; 9]> = rows.iter().map(|r| cells(r, 0.0)).collect();
    let mut widths = HEADER.map(str::len);
    for r in &body {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&HEADER.map(str::to_owned));
    for r in &body {
        out.push_str(&line(r));
    }
    out
}

/// The agent's base URL -> (socket address, host header).
pub fn agent_addr(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        bail!("--agent {url}: only http:// URLs are supported (the agent serves plain HTTP)");
    }
    let host = rest.split('/').next().unwrap_or("");
    let addr = host
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| {
            format!("--agent {url}: expected http://HOST:PORT, e.g. http://127.0.0.1:9977")
        })?;
    Ok((addr, host.to_owned()))
}

/// The default agent URL: the local listen address.
pub fn default_agent_url() -> String {
    let listen = std::env::var("TCPSTALL_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let listen = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    format!("http://{listen}")
}

/// GET `/api/v1/stalls` from the agent (hyper HTTP/1 client, 3 s limit).
async fn fetch(addr: SocketAddr, host: &str) -> anyhow::Result<String> {
    let go = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/api/v1/stalls")
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!("HTTP {status}: {}", body.trim());
        }
        anyhow::Ok(body)
    };
    match tokio::time::timeout(Duration::from_secs(3), go).await {
        Ok(r) => r,
        Err(_) => bail!("no answer within 3 s"),
    }
}

/// `tcpstall top`.
pub fn top(args: &TopArgs) -> anyhow::Result<()> {
    if !(args.interval.is_finite() && args.interval >= 0.1) {
        bail!(
            "invalid --interval {}: expected seconds >= 0.1",
            args.interval
        );
    }
    let url = args.agent.clone().unwrap_or_else(default_agent_url);
    let (addr, host) = agent_addr(&url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let get = |rt: &tokio::runtime::Runtime| -> anyhow::Result<Vec<StallRow>> {
        let doc = rt.block_on(fetch(addr, &host)).with_context(|| {
            format!(
                "no tcpstall agent answers at {url}: start `tcpstall run` on this node or pass --agent http://HOST:PORT"
            )
        })?;
        parse_stalls(&doc).with_context(|| format!("reading {url}/api/v1/stalls"))
    };
    let first = get(&rt)?;
    if args.once || !std::io::stdout().is_terminal() {
        let mut out = std::io::stdout().lock();
        out.write_all(plain_table(&arrange(&first, SortBy::TimeToDeath, "")).as_bytes())?;
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = live(&mut terminal, &rt, &get, first, &url, args.interval);
    ratatui::restore();
    result
}

struct View {
    rows: Vec<StallRow>,
    fetched: Instant,
    sort: SortBy,
    filter: String,
    editing: bool,
    error: Option<String>,
}

fn live(
    terminal: &mut ratatui::DefaultTerminal,
    rt: &tokio::runtime::Runtime,
    get: &dyn Fn(&tokio::runtime::Runtime) -> anyhow::Result<Vec<StallRow>>,
    first: Vec<StallRow>,
    url: &str,
    interval: f64,
) -> anyhow::Result<()> {
    let mut v = View {
        rows: first,
        fetched: Instant::now(),
        sort: SortBy::TimeToDeath,
        filter: String::new(),
        editing: false,
        error: None,
    };
    let interval = Duration::from_secs_f64(interval);
    loop {
        if v.fetched.elapsed() >= interval {
            match get(rt) {
                Ok(rows) => {
                    v.rows = rows;
                    v.error = None;
                }
                Err(e) => v.error = Some(format!("{e:#}")),
            }
            v.fetched = Instant::now();
        }
        terminal.draw(|f| draw(f, &v, url))?;
        if event::poll(Duration::from_millis(250))?
            && let Event::Key(k) = event::read()?
            && k.kind == KeyEventKind::Press
        {
            if v.editing {
                match k.code {
                    KeyCode::Enter => v.editing = false,
                    KeyCode::Esc => {
                        v.editing = false;
                        v.filter.clear();
                    }
                    KeyCode::Backspace => {
                        v.filter.pop();
                    }
                    KeyCode::Char(c) => v.filter.push(c),
                    _ => {}
                }
                continue;
            }
            match k.code {
                KeyCode::Char('q') => return Ok(()),
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                    return Ok(());
                }
                KeyCode::Char('s') => v.sort = v.sort.next(),
                KeyCode::Char('/') => v.editing = true,
                KeyCode::Esc if !v.filter.is_empty() => v.filter.clear(),
                KeyCode::Esc => return Ok(()),
                _ => {}
            }
        }
    }
}

fn draw(f: &mut ratatui::Frame, v: &View, url: &str) {
    let [head, table, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let rows = arrange(&v.rows, v.sort, &v.filter);
    let elapsed = v.fetched.elapsed().as_secs_f64();
    let status = match &v.error {
        Some(e) => format!("tcpstall top  {url}  ERROR: {e}"),
        None => format!(
            "tcpstall top  {url}  {} stalled socket(s){}  sort: {}{}",
            v.rows.len(),
            if rows.len() == v.rows.len() {
                String::new()
            } else {
                format!(" ({} shown)", rows.len())
            },
            v.sort.label(),
            if v.filter.is_empty() {
                String::new()
            } else {
                format!("  filter: {}", v.filter)
            }
        ),
    };
    f.render_widget(
        Paragraph::new(Line::from(status)).style(Style::new().add_modifier(Modifier::BOLD)),
        head,
    );
    let body = rows.iter().map(|r| {
        let style = match r.seconds_to_timeout.map(|s| s - elapsed) {
            Some(s) if s < 60.0 => Style::new().fg(Color::Red),
            Some(_) => Style::new().fg(Color::Yellow),
            None => Style::new(),
        };
        Row::new(cells(r, elapsed).map(Cell::from)).style(style)
    });
    let widths = [
        Constraint::Length(10),
        Constraint::Length(11),
        Constraint::Length(16),
        Constraint::Fill(2),
        Constraint::Fill(2),
        Constraint::Fill(2),
        Constraint::Fill(1),
        Constraint::Length(5),
        Constraint::Length(9),
    ];
    f.render_widget(
        Table::new(body, widths)
            .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::REVERSED))),
        table,
    );
    let help = if v.editing {
        format!("filter: {}_   (Enter apply, Esc clear)", v.filter)
    } else {
        "q quit   s sort   / filter   Esc clear filter".to_owned()
    };
    f.render_widget(Paragraph::new(help), foot);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"generated_at":"x","now_ns":1,"kernel":"k","count":3,"stalls":[
        {"class":"retransmit","local":"10.0.0.1:40000","remote":"10.0.0.9:5432","rto_streak":4,"total_retrans":6,"stalled_for_s":12.5,"seconds_to_timeout":30.0,"pod":"orders-1","namespace":"shop","cause":"local_drop","guarded_by":{"rule":"shop-30s","mode":"enforce","actions":["user_timeout"],"kept":[]}},
        {"class":"retransmit","local":"10.0.0.1:40001","remote":"10.0.0.8:443","rto_streak":2,"total_retrans":2,"stalled_for_s":40.0,"seconds_to_timeout":5.5,"process":{"pid":42,"comm":"curl"},"guarded_by":{"rule":"lab","mode":"dry-run","actions":["user_timeout"],"kept":[]}},
        {"class":"close_wait","local":"10.0.0.1:40002","remote":"10.0.0.7:80","rto_streak":0,"total_retrans":0,"stalled_for_s":90.0,"seconds_to_timeout":null}
    ]}"#;

    #[test]
    fn parses_sorts_and_filters() {
        let rows = parse_stalls(DOC).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].owner, "shop/orders-1");
        assert_eq!(rows[1].owner, "curl[42]");
        assert_eq!(rows[2].owner, "-");
        let by_death = arrange(&rows, SortBy::TimeToDeath, "");
        let locals: Vec<&str> = by_death.iter().map(|r| r.local.as_str()).collect();
        assert_eq!(
            locals,
            ["10.0.0.1:40001", "10.0.0.1:40000", "10.0.0.1:40002"]
        );
        let by_age = arrange(&rows, SortBy::StallAge, "");
        assert_eq!(by_age[0].class, "close_wait");
        let by_remote = arrange(&rows, SortBy::Remote, "");
        assert_eq!(by_remote[0].remote, "10.0.0.7:80");
        let filtered = arrange(&rows, SortBy::TimeToDeath, "ORDERS");
        assert_eq!(filtered.len(), 1);
        assert_eq!(filtered[0].remote, "10.0.0.9:5432");
        // The cause is shown and filtered on; an agent without causes: `-`.
        assert_eq!(rows[0].cause, "local_drop");
        assert_eq!(rows[1].cause, "-");
        let by_cause = arrange(&rows, SortBy::TimeToDeath, "local_drop");
        assert_eq!(by_cause.len(), 1);
        assert_eq!(by_cause[0].local, "10.0.0.1:40000");
        // The guard rule that armed the socket, dry-run marked; none: `-`.
        assert_eq!(rows[0].guard, "shop-30s");
        assert_eq!(rows[1].guard, "lab (dry-run)");
        assert_eq!(rows[2].guard, "-");
        let by_guard = arrange(&rows, SortBy::TimeToDeath, "shop-30s");
        assert_eq!(by_guard.len(), 1);
        assert_eq!(by_guard[0].local, "10.0.0.1:40000");
        assert!(parse_stalls("{}").is_err());
        assert!(parse_stalls("<html>").is_err());
    }

    #[test]
    fn countdown_runs_from_the_fetch() {
        assert_eq!(countdown(Some(30.0), 0.0), "T-30.0s");
        assert_eq!(countdown(Some(30.0), 2.5), "T-27.5s");
        assert_eq!(countdown(Some(1.0), 3.0), "T+2.0s");
        assert_eq!(countdown(None, 3.0), "never");
    }

    #[test]
    fn plain_table_has_a_header_and_one_line_per_stall() {
        let rows = parse_stalls(DOC).unwrap();
        let t = plain_table(&arrange(&rows, SortBy::TimeToDeath, ""));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("ETIMEDOUT"), "{t}");
        assert!(
            lines[1].starts_with("T-5.5s") && lines[1].contains("curl[42]"),
            "{t}"
        );
        assert!(
            lines[2].contains("shop/orders-1")
                && lines[2].contains("10.0.0.9:5432")
                && lines[2].contains("local_drop"),
            "{t}"
        );
        assert!(
            lines[0].contains("CAUSE") && lines[0].contains("GUARD"),
            "{t}"
        );
        assert!(lines[2].contains("shop-30s"), "{t}");
        assert!(
            lines[3].starts_with("never") && lines[3].contains("close_wait"),
            "{t}"
        );
    }

    #[test]
    fn agent_urls() {
        let (a, h) = agent_addr("http://127.0.0.1:9977").unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:9977");
        assert_eq!(h, "127.0.0.1:9977");
        assert!(agent_addr("127.0.0.1:1/").is_ok());
        assert!(agent_addr("https://127.0.0.1:9977").is_err());
        assert!(agent_addr("http://nohostport").is_err());
    }
}
