//! The process's own resource use, for load reports.

use std::time::Duration;

/// CPU time (user plus system) this process has used so far.
pub fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec() as u64, (t.tv_usec() as u32).saturating_mul(1000))
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        // getrusage(RUSAGE_SELF) cannot fail on Linux; report nothing rather than guess.
        Err(_) => Duration::ZERO,
    }
}

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
