//! Sampling another process (the server) through /proc: CPU time and RSS.

use std::fs;
use std::io;

/// One observation of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// CPU time of all its threads, in seconds: the run time of its live threads from
    /// `/proc/PID/task/*/schedstat` (nanoseconds, so short windows are measured too), else
    /// utime + stime from `/proc/PID/stat` (clock ticks, usually 10 ms).
    pub cpu_seconds: f64,
    /// Resident set size (VmRSS) in bytes.
    pub rss_bytes: u64,
    /// Times its live threads went to sleep (`voluntary_ctxt_switches`, summed): each sleep is
    /// followed by a wake-up, so the difference over a window counts the server's wake-ups.
    pub sleeps: u64,
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime (clock ticks) from the contents of /proc/PID/stat.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain anything;
    // the remaining fields start after the last ')'. utime and stime are
    // fields 14 and 15, i.e. the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Time on the CPU (ns): the first field of /proc/PID/task/TID/schedstat.
pub fn parse_schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_ascii_whitespace().next()?.parse().ok()
}

/// Summed CPU time of the live threads of `pid` in seconds, if the kernel reports schedstat.
fn threads_cpu_seconds(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        match fs::read_to_string(path) {
            Ok(text) => ns += parse_schedstat_ns(&text)?,
            // A thread that exited between the listing and the read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    Some(ns as f64 / 1e9)
}

/// `voluntary_ctxt_switches` from the contents of /proc/PID/task/TID/status.
pub fn parse_status_sleeps(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:"))?;
    line["voluntary_ctxt_switches:".len()..].trim().parse().ok()
}

/// Summed voluntary context switches of the live threads of `pid` (0 if unreadable).
fn threads_sleeps(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("status")).ok())
        .filter_map(|status| parse_status_sleeps(&status))
        .sum()
}

/// VmRSS in bytes from the contents of /proc/PID/status.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_ascii_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next().unwrap_or("kB") {
        "kB" => 1024,
        "mB" | "MB" => 1024 * 1024,
        _ => 1,
    };
    Some(value * unit)
}

/// Samples process `pid`.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/{what}"));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| bad("stat"))?;
    let rss = parse_status_rss(&status).ok_or_else(|| bad("status"))?;
    let cpu_seconds = threads_cpu_seconds(pid).unwrap_or(ticks as f64 / clock_ticks_per_second());
    Ok(ProcSample { cpu_seconds, rss_bytes: rss, sleeps: threads_sleeps(pid) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_name() {
        let stat = "1234 (ring cast) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 4 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn parses_status_rss() {
        let status = "Name:\tringcast\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status), Some(2048 * 1024));
        assert_eq!(parse_status_rss("Name: x\n"), None);
    }

    #[test]
    fn parses_status_sleeps() {
        let status = "Name:\tringcast-core-0\nvoluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t5\n";
        assert_eq!(parse_status_sleeps(status), Some(1234));
        assert_eq!(parse_status_sleeps("Name: x\n"), None);
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat_ns("264181975 249947041 18795\n"), Some(264181975));
        assert_eq!(parse_schedstat_ns(""), None);
    }

    #[test]
    fn samples_self() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_seconds >= 0.0);
    }
}
