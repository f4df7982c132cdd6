//! The agent's own CPU time and memory, from `/proc/self` (the standard
//! `process_cpu_seconds_total` / `process_resident_memory_bytes` of
//! Prometheus clients), read at each scrape.

use std::fs;

/// One reading of the agent process' resource use.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessSample {
    /// User + system CPU time since the process started, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
}

/// Reads `/proc/self/stat` and `/proc/self/statm`; None when unreadable.
pub fn sample() -> Option<ProcessSample> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    parse(&stat, &statm, ticks, page)
}

/// `stat`: fields 14 and 15 (utime, stime, in clock ticks) after the
/// parenthesised command name (which may contain spaces); `statm`: field 2
/// (resident pages).
pub fn parse(stat: &str, statm: &str, ticks_per_s: i64, page_bytes: i64) -> Option<ProcessSample> {
    if ticks_per_s <= 0 || page_bytes <= 0 {
        return None;
    }
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts at field 3 (state): utime is field 14 -> index 11.
    let mut f = after_comm.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcessSample {
        cpu_seconds: (utime + stime) as f64 / ticks_per_s as f64,
        resident_bytes: resident.saturating_mul(page_bytes as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_command_name() {
        let stat = "4242 (tcp stall) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 50 0 0 20 0 3 0 100 123456 789 18446744073709551615";
        let statm = "30000 789 500 100 0 2000 0\n";
        let s = parse(stat, statm, 100, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.resident_bytes, 789 * 4096);
        assert_eq!(parse("garbage", statm, 100, 4096), None);
        assert_eq!(parse(stat, statm, 0, 4096), None);
    }

    #[test]
    fn reads_this_process() {
        let s = sample().expect("/proc/self readable");
        assert!(s.resident_bytes > 0);
        assert!(s.cpu_seconds >= 0.0);
    }
}
