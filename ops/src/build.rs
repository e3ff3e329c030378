//! `veil_build_info`: which build a process runs, as the usual Prometheus info gauge (value 1,
//! the build in its labels), so that a rollout's progress and a mixed-version cluster show on
//! a dashboard and in queries (`veil_build_info * on (instance) group_left (version) ...`).

use prometheus::{IntGaugeVec, Opts, Registry};

/// The commit the binaries were built from: `VEIL_COMMIT` in the build's environment (the
/// Dockerfile passes it as a build argument), else `unknown`. Read at compile time, so the
/// binary needs no `.git` and no file at run time.
pub const COMMIT: &str = match option_env!("VEIL_COMMIT") {
    Some(c) if !c.is_empty() => c,
    _ => "unknown",
};

/// Registers `veil_build_info{version, commit}` = 1 in `registry`. `version` is the binary's
/// own (`env!("CARGO_PKG_VERSION")` of its crate).
pub fn register(registry: &Registry, version: &str) -> prometheus::Result<()> {
    let info = IntGaugeVec::new(
        Opts::new(
            "veil_build_info",
            "The build this process runs (always 1): its version and the commit it was built from.",
        ),
        &["version", "commit"],
    )?;
    registry.register(Box::new(info.clone()))?;
    info.with_label_values(&[version, COMMIT]).set(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_one_series_valued_one() {
        use prometheus::Encoder;
        let r = Registry::new();
        register(&r, "1.2.3").unwrap();
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [format!(
                "veil_build_info{{commit=\"{COMMIT}\",version=\"1.2.3\"}} 1"
            )]
        );
    }
}
