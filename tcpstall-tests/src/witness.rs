//! The ftrace witness of kernel tracepoints ([`TraceWitness`]) and its
//! per-socket record ([`Witnessed`]).

use std::{net::SocketAddr, path::PathBuf, process::Command};

use crate::{
    net::run_suffix,
    util::{require_root, run_ok, sh_quiet},
};

/// One tracepoint hit as an ftrace instance recorded it ([`TraceWitness`]).
#[derive(Debug, Clone)]
pub struct WitnessHit {
    /// `mono` trace clock: the clock of `bpf_ktime_get_ns` (and of the
    /// agent's `ts_ns`), printed with microsecond resolution.
    pub ts_ns: u64,
    pub cpu: u32,
    /// The event's name, e.g. `tcp_retransmit_skb`.
    pub event: String,
    /// The event's printed `key=value` fields.
    pub fields: std::collections::HashMap<String, String>,
    /// The line as the instance printed it (task, CPU, context flags).
    pub line: String,
}

impl WitnessHit {
    pub fn field(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }

    /// A pointer field (`timer=`, `skaddr=`; printed unhashed).
    pub fn addr(&self, k: &str) -> Option<u64> {
        u64::from_str_radix(self.field(k).trim_start_matches("0x"), 16).ok()
    }

    /// Parses one line of an instance's `trace` file
    /// (`comm-pid [cpu] flags secs.usecs: event: k=v ...`); None for the
    /// header and anything else.
    pub fn parse(line: &str) -> Option<Self> {
        if line.starts_with('#') {
            return None;
        }
        let mut tokens = line.split_whitespace();
        let mut cpu = None;
        let mut ts_ns = None;
        for t in tokens.by_ref() {
            if let Some(c) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                cpu = c.parse().ok();
            } else if let (Some(ts), Some(_)) = (t.strip_suffix(':'), cpu) {
                let (s, frac) = ts.split_once('.')?;
                let frac_ns: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
                ts_ns = Some(s.parse::<u64>().ok()? * 1_000_000_000 + frac_ns);
                break;
            }
        }
        let event = tokens.next()?.strip_suffix(':')?.to_string();
        let fields = tokens
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Self {
            ts_ns: ts_ns?,
            cpu: cpu?,
            event,
            fields,
            line: line.trim().to_string(),
        })
    }
}

/// An independent witness of kernel tracepoints: an ftrace instance of the
/// test's own (`/sys/kernel/tracing/instances/<name>`), with trace clock
/// `mono`, unhashed pointers, no overwriting, and the given events enabled
/// with their filters. The kernel calls its probe from the same tracepoint
/// call as the agent's programs, so a hit the witness recorded and the agent
/// has no event for is the agent's loss, and one neither saw never reached any
/// probe. The instance is removed on drop (and tracefs unmounted again if
/// this guard mounted it), also when the test fails; the global trace
/// buffer and other instances are not touched.
pub struct TraceWitness {
    dir: PathBuf,
    unmount: Option<PathBuf>,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl TraceWitness {
    /// `events`: `("timer/timer_expire_entry", Some("function == 0x..."))`.
    pub fn start(name: &str, events: &[(&str, Option<String>)]) -> Self {
        require_root();
        let root = PathBuf::from(TRACEFS);
        let mut unmount = None;
        if !root.join("instances").is_dir() {
            run_ok(
                Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]),
                "mounting tracefs (the test's tracepoint witness)",
            );
            unmount = Some(root.clone());
        }
        let dir = root
            .join("instances")
            .join(format!("{name}{}", run_suffix()));
        let _ = std::fs::remove_dir(&dir);
        if let Err(e) = std::fs::create_dir(&dir) {
            if let Some(m) = &unmount {
                sh_quiet(&format!("umount {}", m.display()));
            }
            panic!(
                "prerequisite missing: an ftrace instance at {} ({e}). Fix: a kernel with CONFIG_TRACING and tracefs",
                dir.display()
            );
        }
        let w = Self { dir, unmount };
        w.write("trace_clock", "mono");
        w.write("buffer_size_kb", "4096");
        w.write("options/overwrite", "0");
        w.write("options/hash-ptr", "0");
        for (event, filter) in events {
            if let Some(f) = filter {
                w.write(&format!("events/{event}/filter"), f);
            }
            w.write(&format!("events/{event}/enable"), "1");
        }
        w.write("tracing_on", "1");
        w
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        std::fs::write(&path, value).unwrap_or_else(|e| {
            panic!(
                "the tracepoint witness: writing {value:?} to {}: {e}",
                path.display()
            )
        });
    }

    /// Stops recording and returns every hit, or why the record is not
    /// complete (the instance overran or dropped events).
    pub fn finish(&self) -> Result<Vec<WitnessHit>, String> {
        self.write("tracing_on", "0");
        let mut lost = Vec::new();
        if let Ok(cpus) = std::fs::read_dir(self.dir.join("per_cpu")) {
            for cpu in cpus.flatten() {
                let stats = std::fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
                for line in stats.lines() {
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let n: u64 = v.trim().parse().unwrap_or(0);
                    if (k == "overrun" || k == "dropped events") && n > 0 {
                        lost.push(format!("{}: {k} {n}", cpu.file_name().to_string_lossy()));
                    }
                }
            }
        }
        if !lost.is_empty() {
            return Err(format!("the witness lost hits ({})", lost.join(", ")));
        }
        let text = std::fs::read_to_string(self.dir.join("trace"))
            .map_err(|e| format!("reading the witness's trace: {e}"))?;
        Ok(text.lines().filter_map(WitnessHit::parse).collect())
    }
}

impl Drop for TraceWitness {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("tracing_on"), "0");
        let _ = std::fs::write(self.dir.join("events/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(m) = &self.unmount {
            sh_quiet(&format!("umount {}", m.display()));
        }
    }
}

/// A kernel symbol's address from `/proc/kallsyms` (None when absent or
/// hidden: `kptr_restrict` prints zeros).
pub fn kallsyms_addr(symbol: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (addr, _kind, name) = (it.next()?, it.next()?, it.next()?);
        (name == symbol && it.next().is_none())
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

/// What reached the tracepoints of one socket in a time window, by the
/// [`TraceWitness`]: write-timer expiries and retransmissions.
#[derive(Debug, Clone, Copy, Default)]
pub struct WitnessSeen {
    pub timer_hits: usize,
    pub retransmits: usize,
    /// The witness's record is complete and ties timer hits to sockets.
    pub reliable: bool,
}

impl WitnessSeen {
    /// Nothing of the socket reached any probe in the window, by a complete
    /// record.
    pub fn reached_no_probe(&self) -> bool {
        self.reliable && self.timer_hits == 0 && self.retransmits == 0
    }
}

impl std::fmt::Display for WitnessSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} write-timer expiries and {} retransmissions{}",
            self.timer_hits,
            self.retransmits,
            if self.reliable {
                ""
            } else {
                " (record incomplete)"
            }
        )
    }
}

/// A finished [`TraceWitness`] record of `timer_expire_entry` (filtered to
/// `tcp_write_timer`) and `tcp_retransmit_skb`, per socket: a socket's
/// address comes from its retransmissions (`skaddr`, with `saddr` and
/// `sport`), its write timer's address is that plus the timer's offset in the
/// socket, which is read off the record itself (an expiry's retransmission
/// follows its timer hit on the same CPU within a millisecond).
pub struct Witnessed {
    hits: Vec<WitnessHit>,
    timer_offset: Option<u64>,
    /// Why the record cannot clear a gap (None: it can).
    pub lost: Option<String>,
}

impl Witnessed {
    pub fn new(record: Result<Vec<WitnessHit>, String>) -> Self {
        let hits = match record {
            Ok(h) => h,
            Err(e) => {
                return Self {
                    hits: Vec::new(),
                    timer_offset: None,
                    lost: Some(e),
                };
            }
        };
        let mut offsets = std::collections::HashMap::<u64, usize>::new();
        for (i, t) in hits.iter().enumerate() {
            if t.event != "timer_expire_entry" || t.field("function") != "tcp_write_timer" {
                continue;
            }
            let next = hits[i + 1..]
                .iter()
                .take_while(|h| h.ts_ns <= t.ts_ns + 1_000_000)
                .find(|h| h.cpu == t.cpu);
            let retransmit = next.filter(|r| r.event == "tcp_retransmit_skb");
            if let (Some(sk), Some(timer)) =
                (retransmit.and_then(|r| r.addr("skaddr")), t.addr("timer"))
            {
                *offsets.entry(timer.wrapping_sub(sk)).or_default() += 1;
            }
        }
        let timer_offset = offsets.into_iter().max_by_key(|&(_, n)| n).map(|(o, _)| o);
        let lost = timer_offset
            .is_none()
            .then(|| "no write-timer hit followed by its retransmission: timer hits cannot be tied to sockets".to_string());
        Self {
            hits,
            timer_offset,
            lost,
        }
    }

    /// Retransmissions the witness saw in `[lo_ns, hi_ns)` (every socket
    /// its filter lets through).
    pub fn retransmits_between(&self, lo_ns: u64, hi_ns: u64) -> usize {
        self.hits
            .iter()
            .filter(|h| h.event == "tcp_retransmit_skb" && (lo_ns..hi_ns).contains(&h.ts_ns))
            .count()
    }

    /// The hits of the socket at `local`: its retransmissions (by `saddr`
    /// and `sport`) and its write-timer hits (by the timer's address: the
    /// socket's `skaddr` plus the timer offset), and whether timer hits could
    /// be tied to it.
    fn socket_hits(&self, local: SocketAddr) -> (Vec<&WitnessHit>, bool) {
        let (ip, port) = (local.ip().to_string(), local.port().to_string());
        let is_retransmit = |h: &WitnessHit| {
            h.event == "tcp_retransmit_skb" && h.field("saddr") == ip && h.field("sport") == port
        };
        let sk = self
            .hits
            .iter()
            .find(|h| is_retransmit(h))
            .and_then(|h| h.addr("skaddr"));
        let timer = sk.zip(self.timer_offset).map(|(s, o)| s.wrapping_add(o));
        let hits = self
            .hits
            .iter()
            .filter(|h| {
                is_retransmit(h)
                    || (timer.is_some()
                        && h.event == "timer_expire_entry"
                        && h.addr("timer") == timer)
            })
            .collect();
        (hits, timer.is_some())
    }

    /// The witness's lines of the socket at `local` in `[lo_ns, hi_ns)`
    /// (its timer hits and retransmissions), for a gap report.
    pub fn lines_in_window(&self, local: SocketAddr, lo_ns: u64, hi_ns: u64) -> Vec<String> {
        let (hits, _) = self.socket_hits(local);
        hits.into_iter()
            .filter(|h| (lo_ns..hi_ns).contains(&h.ts_ns))
            .map(|h| h.line.clone())
            .collect()
    }

    /// What of the socket at `local` reached the tracepoints in
    /// `[lo_ns, hi_ns)` (microsecond resolution).
    pub fn in_window(&self, local: SocketAddr, lo_ns: u64, hi_ns: u64) -> WitnessSeen {
        let (hits, timer_known) = self.socket_hits(local);
        let in_window: Vec<&WitnessHit> = hits
            .into_iter()
            .filter(|h| (lo_ns..hi_ns).contains(&h.ts_ns))
            .collect();
        let count = |event: &str| in_window.iter().filter(|h| h.event == event).count();
        WitnessSeen {
            timer_hits: count("timer_expire_entry"),
            retransmits: count("tcp_retransmit_skb"),
            reliable: self.lost.is_none() && timer_known,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{WitnessHit, Witnessed};
    use std::net::SocketAddr;

    /// Mutation: `frac:0<9` padding dropped (`frac.parse()` as is) -> the
    /// microseconds come out as nanoseconds and the timestamp check fails.
    #[test]
    fn parses_trace_lines() {
        let h = WitnessHit::parse(
            "          <idle>-0       [001] ..s2. 11794.904093: tcp_retransmit_skb: skbaddr=ffff888296869000 skaddr=ffff88818443ef00 family=AF_INET sport=38738 dport=8090 saddr=10.201.91.1 state=TCP_ESTABLISHED err=0",
        )
        .expect("a hit");
        assert_eq!(h.ts_ns, 11_794_904_093_000);
        assert_eq!(h.cpu, 1);
        assert_eq!(h.event, "tcp_retransmit_skb");
        assert_eq!(h.field("sport"), "38738");
        assert_eq!(h.addr("skaddr"), Some(0xffff_8881_8443_ef00));
        let t = WitnessHit::parse(
            " kworker/0:1-42 [000] ..s1. 5.000001: timer_expire_entry: timer=ffff88818443f350 function=tcp_write_timer now=4297840958 baseclk=4297840958",
        )
        .expect("a hit");
        assert_eq!((t.ts_ns, t.cpu), (5_000_001_000, 0));
        assert_eq!(t.addr("timer"), Some(0xffff_8881_8443_f350));
        assert!(WitnessHit::parse("# tracer: nop").is_none());
        assert!(
            WitnessHit::parse("#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION")
                .is_none()
        );
    }

    fn line(cpu: u32, us: u64, body: &str) -> String {
        format!(
            "  <idle>-0 [{cpu:03}] ..s1. {}.{:06}: {body}",
            us / 1_000_000,
            us % 1_000_000
        )
    }

    fn expiry(cpu: u32, us: u64, sk: u64, sport: u16) -> [String; 2] {
        [
            line(
                cpu,
                us,
                &format!(
                    "timer_expire_entry: timer={:x} function=tcp_write_timer now=1 baseclk=1",
                    sk + 0x450
                ),
            ),
            line(
                cpu,
                us + 2,
                &format!(
                    "tcp_retransmit_skb: skbaddr=ffff1 skaddr={sk:x} family=AF_INET sport={sport} dport=8090 saddr=10.0.0.1 daddr=10.0.0.2 state=TCP_ESTABLISHED err=0"
                ),
            ),
        ]
    }

    /// The timer's offset in the socket is read off timer-then-retransmit
    /// pairs, each socket's hits are its own, and a window with nothing of
    /// the socket reached no probe only by a complete record.
    /// Mutations (in `Witnessed::socket_hits` / `in_window`):
    /// `h.addr("timer") == timer` dropped -> fails with the other socket's
    /// expiries counted (5, not 3); `reliable: true` always -> fails: the
    /// lost record clears the gap.
    #[test]
    fn witnessed_per_socket_windows() {
        let (a, b) = (0xffff_8881_0000_0000u64, 0xffff_8881_0000_8000u64);
        let mut lines = Vec::new();
        lines.extend(expiry(0, 1_000_000, a, 1000));
        lines.extend(expiry(1, 1_000_100, b, 2000));
        lines.extend(expiry(0, 2_000_000, a, 1000));
        // Socket a's third expiry reached no probe; b's did.
        lines.extend(expiry(1, 3_000_100, b, 2000));
        lines.extend(expiry(0, 4_000_000, a, 1000));
        let hits = lines.iter().filter_map(|l| WitnessHit::parse(l)).collect();
        let w = Witnessed::new(Ok(hits));
        assert!(w.lost.is_none(), "{:?}", w.lost);
        let sa: SocketAddr = "10.0.0.1:1000".parse().expect("addr");
        let all = w.in_window(sa, 0, u64::MAX);
        assert_eq!((all.timer_hits, all.retransmits), (3, 3));
        let gap = w.in_window(sa, 2_500_000_000, 3_500_000_000);
        assert!(gap.reached_no_probe(), "{gap}");
        let seen = w.in_window(sa, 1_500_000_000, 2_500_000_000);
        assert_eq!((seen.timer_hits, seen.retransmits), (1, 1));
        assert!(!seen.reached_no_probe());
        let lost = Witnessed::new(Err("overrun".into()));
        assert!(
            !lost
                .in_window(sa, 2_500_000_000, 3_500_000_000)
                .reached_no_probe()
        );
    }
}
