//! CPU time of a process, as the kernel accounts it.

use std::time::Duration;

use anyhow::Context;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, `sysconf(_SC_CLK_TCK)`): 100 on
/// every Linux architecture this runs on.
const USER_HZ: u64 = 100;

/// User plus system CPU time that process `pid` has used, all its threads together
/// (`/proc/<pid>/stat` fields 14 `utime` and 15 `stime`).
///
/// The kernel accounts it at its tick (4 ms at `CONFIG_HZ=250`), so a window should hold a few
/// hundred ticks of work for a figure within a percent. Without `CONFIG_IRQ_TIME_ACCOUNTING`
/// (the case on the measurement machine), softirq work done in the process's own context, such
/// as loopback delivery of what it sends, is charged to it too.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_stat(&stat).with_context(|| format!("parse /proc/{pid}/stat"))
}

/// Run time of thread `tid` (any thread, a kernel thread such as a NAPI poller too), from
/// `/proc/<tid>/schedstat`: nanoseconds the scheduler counted it on a CPU, not tick-sampled.
pub fn thread_runtime(tid: u32) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat"))
        .with_context(|| format!("read /proc/{tid}/schedstat"))?;
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("parse /proc/{tid}/schedstat: {text:?}"))?;
    Ok(Duration::from_nanos(ns))
}

/// CPU time of this process.
pub fn self_cpu() -> anyhow::Result<Duration> {
    process_cpu(std::process::id())
}

fn parse_stat(stat: &str) -> Option<Duration> {
    // The command name (field 2) is parenthesised and may hold spaces: fields count from the
    // last ')'. After it come field 3 (state) onwards.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_nanos(
        (utime + stime) * (1_000_000_000 / USER_HZ),
    ))
}

/// Time CPU `core` has spent busy (user, nice, system, irq, softirq, steal: everything but idle
/// and iowait) since boot, from `/proc/stat`. Compared with the pinned relay's own CPU time over
/// the same window, it shows how much of that core went to other processes: the noise in a
/// figure.
pub fn core_busy(core: usize) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .with_context(|| format!("no {name} line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0))
        .sum();
    Ok(Duration::from_nanos(busy * (1_000_000_000 / USER_HZ)))
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Resident set size of this process (`VmRSS` in `/proc/self/status`), bytes.
pub fn self_rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("malformed VmRSS line")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "1234 (veil relay) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_stat(line), Some(Duration::from_millis(3250)));
    }

    #[test]
    fn reads_its_own_figures() {
        assert!(self_cpu().is_ok());
        assert!(self_rss_bytes().unwrap() > 0);
    }
}
