//! CPU and memory of supervised processes, read from `/proc`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter (`R`, `S`, `Z`, ...).
    pub state: u8,
    /// Process group.
    pub pgrp: u32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

/// Parses the content of `/proc/<pid>/stat`. The command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_ascii_whitespace().collect();
    // fields[0] is field 3 of proc(5): state; pgrp is 5; utime 14; stime 15.
    Some(ProcStat {
        state: *fields.first()?.as_bytes().first()?,
        pgrp: fields.get(2)?.parse().ok()?,
        cpu_ticks: fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`.
pub fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Resident memory of `pid` in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(pages * corral_sys::page_size() as u64)
}

/// Whether a process other than a zombie is left in process group `pgid`. Zombies do not count:
/// they hold nothing, and whoever adopted them reaps them.
pub fn group_has_live_members(pgid: u32) -> bool {
    if !corral_sys::group_exists(pgid) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .any(|s| s.pgrp == pgid && s.state != b'Z')
}

/// The resident memory of whole process groups, in one pass over `/proc`: every member of
/// each of `pgids` (a worker's children count: a Node app's workers or a shell's pipeline).
pub fn group_resident_bytes<S: std::hash::BuildHasher>(
    pgids: &std::collections::HashSet<u32, S>,
) -> HashMap<u32, u64> {
    let mut sums = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return sums;
    };
    for pid in entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Some(stat) = read_stat(pid) else { continue };
        if stat.state == b'Z' || !pgids.contains(&stat.pgrp) {
            continue;
        }
        if let Some(bytes) = resident_bytes(pid) {
            *sums.entry(stat.pgrp).or_insert(0) += bytes;
        }
    }
    sums
}

/// CPU percentages from the difference between two samples.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: HashMap<u32, (Instant, u64, f64)>,
}

impl CpuSampler {
    /// Percent of one core used by `pid` since the previous call (or since it started, the first
    /// time, given its `uptime`).
    pub fn percent(&mut self, pid: u32, uptime: Duration) -> f64 {
        let Some(stat) = read_stat(pid) else {
            return 0.0;
        };
        let now = Instant::now();
        let ticks_per_second = corral_sys::clock_ticks_per_second().max(1) as f64;
        let percent = match self.last.get(&pid) {
            Some(&(at, _, percent)) if now.duration_since(at) < Duration::from_millis(250) => {
                return percent;
            }
            Some(&(at, ticks, _)) => {
                let used = stat.cpu_ticks.saturating_sub(ticks) as f64 / ticks_per_second;
                used / now.duration_since(at).as_secs_f64() * 100.0
            }
            None if uptime.is_zero() => 0.0,
            None => stat.cpu_ticks as f64 / ticks_per_second / uptime.as_secs_f64() * 100.0,
        };
        self.last.insert(pid, (now, stat.cpu_ticks, percent));
        percent
    }

    /// Forgets processes that are gone.
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.last.retain(|&pid, _| alive(pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_strange_name() {
        let line =
            "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, b'S');
        assert_eq!(stat.pgrp, 1234);
        assert_eq!(stat.cpu_ticks, 10);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(read_stat(me).is_some());
        assert!(resident_bytes(me).unwrap() > 0);
    }
}
