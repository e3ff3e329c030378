//! Whether a run passes: thresholds a release gate sets, and the verdict on a report.
//!
//! A run fails when it crosses a threshold, and also when it could not measure what a threshold
//! is about (a loss limit over a run that delivered nothing is not met), when it measured no
//! media at all, and when any datagram failed SRTP authentication or came from anywhere but the
//! relay (the relay misdelivered or altered media: never acceptable, so not a flag). `main`
//! exits with [`EXIT_THRESHOLD`] on a failed verdict, as k6 does for crossed thresholds.

use serde::Serialize;

use crate::report::Report;

/// Exit status of a run that crossed a threshold (k6 uses the same). Other failures keep theirs:
/// 64 for bad flags or configuration, 1 for a run that could not start or finish.
pub const EXIT_THRESHOLD: i32 = 99;

/// What a run must stay within. The defaults fail a run in which any call failed and set no
/// limit on loss, latency or interruptions, whose right values depend on the machine and the
/// network between generator and relay.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Thresholds {
    /// Most loss allowed, percent of deliveries due.
    pub max_loss_percent: Option<f64>,
    /// Most one-way p99 latency allowed, ms.
    pub max_p99_ms: Option<f64>,
    /// Most calls allowed to fail (to set up, during media, or to release); 0 by default.
    pub max_failed_calls: u64,
    /// Longest media interruption any participant may see, ms.
    pub max_gap_ms: Option<f64>,
}

/// One check of the verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What is checked: `failed_calls`, `media_measured`, `decrypt_failures`,
    /// `foreign_datagrams`, `loss`, `latency_p99`, `media_gap`.
    pub check: &'static str,
    /// The flag that sets its limit, if one does.
    pub flag: Option<&'static str>,
    /// The limit, as the summary shows it.
    pub limit: String,
    /// What the run measured, as the summary shows it (`n/a` when nothing was measured).
    pub measured: String,
    /// Whether the run is within the limit.
    pub passed: bool,
}

/// The judgement of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Every check passed.
    pub passed: bool,
    /// The thresholds judged against.
    pub thresholds: Thresholds,
    /// Every check, passed or not.
    pub checks: Vec<Check>,
}

impl Verdict {
    /// The checks that failed.
    pub fn crossed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }
}

fn at_most(
    check: &'static str,
    flag: &'static str,
    limit: Option<f64>,
    measured: Option<f64>,
    unit: &str,
    digits: usize,
) -> Option<Check> {
    let limit = limit?;
    Some(Check {
        check,
        flag: Some(flag),
        limit: format!("{limit:.digits$}{unit}"),
        measured: measured.map_or("n/a".to_string(), |m| format!("{m:.digits$}{unit}")),
        // Not measured is not within a limit.
        passed: measured.is_some_and(|m| m <= limit),
    })
}

/// Judges `r` against `t`.
pub fn judge(r: &Report, t: &Thresholds) -> Verdict {
    let mut checks = vec![
        Check {
            check: "failed_calls",
            flag: Some("--max-failed-calls"),
            limit: t.max_failed_calls.to_string(),
            measured: r.calls_failed.to_string(),
            passed: r.calls_failed <= t.max_failed_calls,
        },
        Check {
            check: "media_measured",
            flag: None,
            limit: "> 0 deliveries due".into(),
            measured: format!("{} deliveries due", r.packets_expected),
            passed: r.packets_expected > 0,
        },
        Check {
            check: "decrypt_failures",
            flag: None,
            limit: "0".into(),
            measured: r.decrypt_failures.to_string(),
            passed: r.decrypt_failures == 0,
        },
        Check {
            check: "foreign_datagrams",
            flag: None,
            limit: "0".into(),
            measured: r.foreign_datagrams.to_string(),
            passed: r.foreign_datagrams == 0,
        },
    ];
    if let Some(ch) = &r.churn {
        checks.push(Check {
            check: "churn_failures",
            flag: Some("--max-failed-calls"),
            limit: t.max_failed_calls.to_string(),
            measured: ch.failed.to_string(),
            passed: ch.failed <= t.max_failed_calls,
        });
        checks.push(Check {
            check: "churn_measured",
            flag: None,
            limit: "> 0 deliveries due".into(),
            measured: format!("{} deliveries due", ch.packets_due),
            passed: ch.packets_due > 0,
        });
        checks.extend(at_most(
            "churn_loss",
            "--max-loss",
            t.max_loss_percent,
            ch.loss_ratio.map(|l| l * 100.0),
            "%",
            4,
        ));
    }
    checks.extend(at_most(
        "loss",
        "--max-loss",
        t.max_loss_percent,
        r.loss_ratio.map(|l| l * 100.0),
        "%",
        4,
    ));
    checks.extend(at_most(
        "latency_p99",
        "--max-p99-ms",
        t.max_p99_ms,
        r.latency_us.as_ref().map(|q| q.p99 / 1000.0),
        " ms",
        2,
    ));
    checks.extend(at_most(
        "media_gap",
        "--max-gap-ms",
        t.max_gap_ms,
        r.media_gap_ms.as_ref().map(|g| g.max),
        " ms",
        1,
    ));
    Verdict {
        passed: checks.iter().all(|c| c.passed),
        thresholds: t.clone(),
        checks,
    }
}

/// Parses `--max-loss`: a percentage, with or without the `%` sign (`0.1` and `0.1%` are the
/// same: one delivery in a thousand).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (say 0.1 or 0.1%)"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0 and 100 percent"));
    }
    Ok(v)
}

/// Parses a non-negative number of milliseconds.
pub fn parse_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches("ms")
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!(
            "{s:?} must be a non-negative number of milliseconds"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_and_milliseconds_parse() {
        assert_eq!(parse_percent("0.1"), Ok(0.1));
        assert_eq!(parse_percent("0.1%"), Ok(0.1));
        assert_eq!(parse_percent(" 2 % "), Ok(2.0));
        assert!(parse_percent("-1").is_err());
        assert!(parse_percent("150%").is_err());
        assert!(parse_percent("lots").is_err());
        assert_eq!(parse_ms("40"), Ok(40.0));
        assert_eq!(parse_ms("40ms"), Ok(40.0));
        assert!(parse_ms("-3").is_err());
        assert!(parse_ms("NaN").is_err());
    }

    #[test]
    fn an_unmeasured_figure_is_not_within_its_limit() {
        let c = at_most("loss", "--max-loss", Some(0.1), None, "%", 4).unwrap();
        assert!(!c.passed);
        assert_eq!(c.measured, "n/a");
        let c = at_most("loss", "--max-loss", Some(0.1), Some(0.05), "%", 4).unwrap();
        assert!(c.passed);
        assert_eq!(
            (c.limit.as_str(), c.measured.as_str()),
            ("0.1000%", "0.0500%")
        );
        assert!(at_most("loss", "--max-loss", None, Some(50.0), "%", 4).is_none());
    }
}
