//! Soak: the same load for a long time, watching whether the cluster's processes grow.
//!
//! A soak runs back-to-back rounds of the scenario (every call allocated, run and released each
//! round, so sessions, legs and revocations churn all along) until its duration is up, and
//! samples each watched process's resident memory and open file descriptors every few seconds:
//! `/proc` for a process on this host (this process itself with `--local`, whose cluster runs
//! in-process), or the `process_resident_memory_bytes` and `process_open_fds` series that every
//! Veil binary exports on `/metrics`.
//!
//! **The criterion.** The first half of the run is warm-up (allocator arenas, caches, connection
//! pools fill up). Over the second half, a least-squares line is fitted to each series; the
//! growth it predicts over that half must stay within `max(floor, fraction × median)` of the
//! series. A leak grows without bound and fails; a plateau, however high, passes; noise around a
//! plateau passes because the fit averages it. A soak too short to have a second half of at
//! least [`MIN_SAMPLES`] samples fails as inconclusive.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::scenario::Scenario;
use crate::{Endpoint, drive};

/// Fewest samples in the second half for a verdict.
pub const MIN_SAMPLES: usize = 6;

/// How much a series may grow over the second half of a soak.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Growth {
    /// Growth always allowed, in the series' unit (bytes, descriptors).
    pub floor: f64,
    /// Growth allowed as a fraction of the series' median over the second half.
    pub fraction: f64,
}

/// The judgement of one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    /// Samples in the second half.
    pub samples: usize,
    /// Median over the second half.
    pub median: f64,
    /// Slope of the fitted line, units per second.
    pub slope_per_sec: f64,
    /// Growth the line predicts over the second half.
    pub growth: f64,
    /// Growth allowed.
    pub allowed: f64,
    /// Whether the growth is within what is allowed.
    pub bounded: bool,
}

/// Least-squares slope of `points` (`(seconds, value)`); 0 for fewer than two distinct times.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mv = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (t, v) in points {
        num += (t - mt) * (v - mv);
        den += (t - mt) * (t - mt);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

impl Growth {
    /// Judges a whole series (`(seconds since start, value)`, in time order) by its second half.
    /// `None` if the second half has fewer than [`MIN_SAMPLES`] samples.
    pub fn judge(&self, series: &[(f64, f64)]) -> Option<Judgement> {
        let (first, last) = (series.first()?.0, series.last()?.0);
        let mid = first + (last - first) / 2.0;
        let half: Vec<(f64, f64)> = series.iter().copied().filter(|p| p.0 >= mid).collect();
        if half.len() < MIN_SAMPLES {
            return None;
        }
        let mut values: Vec<f64> = half.iter().map(|p| p.1).collect();
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        let slope_per_sec = slope(&half);
        let span = half.last().map_or(0.0, |p| p.0) - half[0].0;
        let growth = slope_per_sec * span;
        let allowed = self.floor.max(self.fraction * median);
        Some(Judgement {
            samples: half.len(),
            median,
            slope_per_sec,
            growth,
            allowed,
            bounded: growth <= allowed,
        })
    }
}

/// A process to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// This process (`--local`: the whole cluster runs in it).
    This,
    /// A process on this host, by PID.
    Pid(u32),
    /// A Veil binary's ops endpoint (`host:port`), read through its process metrics.
    Metrics(String),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::This => write!(f, "this process (in-process cluster)"),
            Self::Pid(p) => write!(f, "pid {p}"),
            Self::Metrics(a) => write!(f, "{a}/metrics"),
        }
    }
}

/// Resident memory (bytes) and open descriptors of a process on this host.
fn read_proc(pid: Option<u32>) -> anyhow::Result<(u64, u64)> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    };
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("read {dir}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {dir}/status"))?;
    let fds = std::fs::read_dir(format!("{dir}/fd"))
        .with_context(|| format!("list {dir}/fd"))?
        .count() as u64;
    Ok((rss_kib * 1024, fds))
}

/// Resident memory and open descriptors from a Veil binary's `/metrics`.
async fn read_metrics(addr: &str) -> anyhow::Result<(u64, u64)> {
    let text = crate::report::http_get(addr, "/metrics")
        .await
        .with_context(|| format!("scrape {addr}"))?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .with_context(|| format!("{addr}/metrics has no {name}"))
    };
    Ok((
        value("process_resident_memory_bytes ")? as u64,
        value("process_open_fds ")? as u64,
    ))
}

impl Probe {
    async fn sample(&self) -> anyhow::Result<(u64, u64)> {
        match self {
            Self::This => read_proc(None),
            Self::Pid(p) => read_proc(Some(*p)),
            Self::Metrics(a) => read_metrics(a).await,
        }
    }
}

/// How to soak.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long, in all.
    pub duration: Duration,
    /// Each round's length at full load (the scenario's own `duration` is ignored).
    pub round: Duration,
    /// Time between samples.
    pub interval: Duration,
    /// What to watch.
    pub probes: Vec<Probe>,
    /// Allowed resident-memory growth.
    pub rss: Growth,
    /// Allowed descriptor growth.
    pub fds: Growth,
}

/// What one watched process did.
#[derive(Debug, Clone, Serialize)]
pub struct Watched {
    /// Which process.
    pub probe: String,
    /// `(seconds, resident bytes, open descriptors)`.
    pub samples: Vec<(f64, u64, u64)>,
    /// Resident memory over the second half.
    pub rss: Option<Judgement>,
    /// Descriptors over the second half.
    pub fds: Option<Judgement>,
}

/// The outcome of a soak.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Rounds run.
    pub rounds: u64,
    /// Calls run, over all rounds.
    pub calls: u64,
    /// Calls that failed (to set up, during media, or to release).
    pub calls_failed: u64,
    /// RTP deliveries due, over all rounds.
    pub packets_expected: u64,
    /// Deliveries that never happened.
    pub packets_lost: u64,
    /// Datagrams that failed authentication or came from outside the call.
    pub decrypt_failures: u64,
    /// Datagrams from anywhere but the participant's relay.
    pub foreign_datagrams: u64,
    /// Each watched process.
    pub watched: Vec<Watched>,
    /// Why the soak failed; empty if it passed.
    pub failures: Vec<String>,
}

impl SoakReport {
    /// A readable summary.
    pub fn summary(&self) -> String {
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let mut out = format!(
            "soak: {} rounds, {} calls ({} failed), {} of {} deliveries lost ({:.4} %), {} \
             decrypt failures, {} foreign datagrams\n",
            self.rounds,
            self.calls,
            self.calls_failed,
            self.packets_lost,
            self.packets_expected,
            100.0 * self.packets_lost as f64 / self.packets_expected.max(1) as f64,
            self.decrypt_failures,
            self.foreign_datagrams,
        );
        for w in &self.watched {
            out.push_str(&format!("{} ({} samples):\n", w.probe, w.samples.len()));
            if let Some(j) = &w.rss {
                out.push_str(&format!(
                    "  resident memory: median {:.1} MiB over the second half, growth {:+.2} MiB \
                     (allowed {:.1} MiB): {}\n",
                    mib(j.median),
                    mib(j.growth),
                    mib(j.allowed),
                    if j.bounded { "bounded" } else { "GROWING" }
                ));
            }
            if let Some(j) = &w.fds {
                out.push_str(&format!(
                    "  open descriptors: median {:.0}, growth {:+.1} (allowed {:.0}): {}\n",
                    j.median,
                    j.growth,
                    j.allowed,
                    if j.bounded { "bounded" } else { "GROWING" }
                ));
            }
        }
        if self.failures.is_empty() {
            out.push_str("soak passed\n");
        } else {
            for f in &self.failures {
                out.push_str(&format!("soak FAILED: {f}\n"));
            }
        }
        out
    }
}

/// Token lifetime asked for each soak call: the API's shortest, so that released sessions and
/// their revocations expire within the soak (with the default hour they would pile up for the
/// whole of a shorter soak, and look like growth that is not a leak).
pub const SOAK_TTL_SECS: u32 = 60;

/// Runs a soak of `scenario` against `endpoint`.
pub async fn run(
    scenario: &Scenario,
    endpoint: &Endpoint,
    settings: &Settings,
) -> anyhow::Result<SoakReport> {
    if settings.interval.is_zero() || settings.duration < settings.interval * 2 {
        bail!("--duration must be at least twice --soak-interval");
    }
    let mut round = scenario.clone();
    round.duration = settings.round;
    if round.ramp_time() + round.duration + Duration::from_secs(5)
        > Duration::from_secs(u64::from(SOAK_TTL_SECS))
    {
        bail!(
            "a soak round (ramp-up plus --soak-round) must end well within the {SOAK_TTL_SECS} s \
             token lifetime soak calls use"
        );
    }
    round.validate()?;
    let started = Instant::now();
    let end = started + settings.duration;

    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let probes = settings.probes.clone();
        let interval = settings.interval;
        tokio::spawn(async move {
            let mut series: Vec<Vec<(f64, u64, u64)>> = vec![Vec::new(); probes.len()];
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return series,
                }
                let t = started.elapsed().as_secs_f64();
                for (p, s) in probes.iter().zip(series.iter_mut()) {
                    match p.sample().await {
                        Ok((rss, fds)) => s.push((t, rss, fds)),
                        Err(e) => {
                            tracing::warn!(probe = %p, error = %format!("{e:#}"), "sample failed")
                        }
                    }
                }
            }
        })
    };

    let mut report = SoakReport {
        rounds: 0,
        calls: 0,
        calls_failed: 0,
        packets_expected: 0,
        packets_lost: 0,
        decrypt_failures: 0,
        foreign_datagrams: 0,
        watched: Vec::new(),
        failures: Vec::new(),
    };
    // Rounds until the duration is up; the last one is cut to fit, or left out where what is
    // left is too short for a round of this scenario.
    while let Some(this) = next_round(
        &round,
        end.saturating_duration_since(Instant::now() + round.ramp_time()),
    ) {
        let r = drive(&this, endpoint, SOAK_TTL_SECS, false).await?;
        report.rounds += 1;
        report.calls += r.calls;
        report.calls_failed += r.calls_failed;
        report.packets_expected += r.packets_expected;
        report.packets_lost += r.packets_lost;
        report.decrypt_failures += r.decrypt_failures;
        report.foreign_datagrams += r.foreign_datagrams;
        eprintln!(
            "[{:>6.0}s] round {}: {} calls, {} of {} deliveries lost",
            started.elapsed().as_secs_f64(),
            report.rounds,
            r.calls,
            r.packets_lost,
            r.packets_expected
        );
    }
    let _ = stop.send(true);
    let series = sampler.await.context("sampler task")?;

    for (probe, samples) in settings.probes.iter().zip(series) {
        let rss: Vec<(f64, f64)> = samples.iter().map(|s| (s.0, s.1 as f64)).collect();
        let fds: Vec<(f64, f64)> = samples.iter().map(|s| (s.0, s.2 as f64)).collect();
        let w = Watched {
            probe: probe.to_string(),
            rss: settings.rss.judge(&rss),
            fds: settings.fds.judge(&fds),
            samples,
        };
        match (&w.rss, &w.fds) {
            (Some(r), Some(f)) => {
                if !r.bounded {
                    report.failures.push(format!(
                        "{}: resident memory grew {:.1} MiB over the second half (allowed {:.1} \
                         MiB)",
                        w.probe,
                        r.growth / 1048576.0,
                        r.allowed / 1048576.0
                    ));
                }
                if !f.bounded {
                    report.failures.push(format!(
                        "{}: open descriptors grew {:.1} over the second half (allowed {:.0})",
                        w.probe, f.growth, f.allowed
                    ));
                }
            }
            _ => report.failures.push(format!(
                "{}: only {} samples, too few for a verdict (need {MIN_SAMPLES} in the second \
                 half: lengthen --duration or shorten --soak-interval)",
                w.probe,
                w.samples.len()
            )),
        }
        report.watched.push(w);
    }
    if report.calls_failed > 0 {
        report
            .failures
            .push(format!("{} calls failed", report.calls_failed));
    }
    if report.decrypt_failures > 0 || report.foreign_datagrams > 0 {
        report.failures.push(format!(
            "{} datagrams failed authentication and {} came from outside the relay",
            report.decrypt_failures, report.foreign_datagrams
        ));
    }
    Ok(report)
}

/// The next round of a soak with `left` of its duration to go: `round`, cut to fit; `None`
/// where what is left is too short for a valid round (under a second, or too short for the
/// scenario's churn dwell).
fn next_round(round: &Scenario, left: Duration) -> Option<Scenario> {
    if left <= Duration::from_secs(1) {
        return None;
    }
    let mut this = round.clone();
    this.duration = round.duration.min(left);
    this.validate().is_ok().then_some(this)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last round is cut to fit, and left out where the cut would make it invalid: the
    /// 1-hour soak once ended with "churn_dwell must be ... shorter than duration" and no
    /// verdict, 111 rounds in.
    #[test]
    fn the_last_round_is_cut_to_fit_or_left_out() {
        let mut round = Scenario {
            duration: Duration::from_secs(30),
            churn: 1,
            churn_dwell: Duration::from_secs(5),
            ..Scenario::default()
        };
        round.validate().unwrap();
        assert_eq!(
            next_round(&round, Duration::from_secs(100))
                .unwrap()
                .duration,
            Duration::from_secs(30)
        );
        assert_eq!(
            next_round(&round, Duration::from_secs(10))
                .unwrap()
                .duration,
            Duration::from_secs(10)
        );
        assert!(next_round(&round, Duration::from_millis(5500)).is_none());
        assert!(next_round(&round, Duration::from_millis(900)).is_none());
        round.churn = 0;
        assert_eq!(
            next_round(&round, Duration::from_millis(5500))
                .unwrap()
                .duration,
            Duration::from_millis(5500)
        );
    }

    const MIB: f64 = 1024.0 * 1024.0;
    const RSS: Growth = Growth {
        floor: 16.0 * MIB,
        fraction: 0.05,
    };

    /// A series sampled every 5 s for 10 minutes.
    fn series(f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..=120)
            .map(|i| i as f64 * 5.0)
            .map(|t| (t, f(t)))
            .collect()
    }

    #[test]
    fn slope_fits_a_line() {
        let pts = series(|t| 3.0 * t + 7.0);
        assert!((slope(&pts) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 9.0)]), 0.0);
    }

    #[test]
    fn a_plateau_with_noise_is_bounded() {
        // 200 MiB, ±8 MiB of noise, after a warm-up that doubled it in the first half.
        let s = series(|t| {
            let warm = if t < 200.0 { t / 200.0 } else { 1.0 };
            let noise = ((t * 12.9898).sin() * 43758.5453).fract() * 16.0 - 8.0;
            (100.0 + 100.0 * warm + noise) * MIB
        });
        let j = RSS.judge(&s).unwrap();
        assert!(j.bounded, "{j:?}");
        assert!(j.growth.abs() < 8.0 * MIB, "{j:?}");
    }

    #[test]
    fn steady_growth_is_caught() {
        // A leak of 100 KiB a second: 30 MiB over the second half of ten minutes, above the
        // 16 MiB floor and 5 % of ~200 MiB.
        let s = series(|t| 150.0 * MIB + t * 100.0 * 1024.0);
        let j = RSS.judge(&s).unwrap();
        assert!(!j.bounded, "{j:?}");
        assert!(
            (j.growth - 30.0 * 100.0 * 1024.0 * 10.0).abs() < MIB,
            "{j:?}"
        );
        // Descriptors: one leaked per minute is caught over ten minutes with a floor of 4.
        let fds = Growth {
            floor: 4.0,
            fraction: 0.05,
        };
        let leak = series(|t| 40.0 + (t / 60.0).floor());
        assert!(!fds.judge(&leak).unwrap().bounded);
        let flat = series(|t| {
            40.0 + if (t as u64 / 5).is_multiple_of(7) {
                6.0
            } else {
                0.0
            }
        });
        assert!(fds.judge(&flat).unwrap().bounded);
    }

    #[test]
    fn too_few_samples_give_no_verdict() {
        let s: Vec<(f64, f64)> = (0..8).map(|i| (i as f64, 1.0)).collect();
        assert_eq!(RSS.judge(&s), None);
        assert_eq!(RSS.judge(&[]), None);
    }

    #[test]
    fn own_process_can_be_sampled() {
        let (rss, fds) = read_proc(None).unwrap();
        assert!(rss > 1024 * 1024 && fds >= 3, "{rss} {fds}");
    }
}
