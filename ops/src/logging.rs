//! Logging set-up, done once in `main`.

use tracing_subscriber::EnvFilter;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Caps on third-party targets, whatever the filter says, because they log client addresses:
/// quinn-udp's send-error warning prints the destination of the failed datagram (Veil counts
/// those errors in its own metrics instead), and quinn's debug and trace events print peer
/// addresses (its warnings and errors do not).
const SILENCED: &[&str] = &["quinn_udp=off", "quinn_proto=warn", "quinn=warn"];

/// Builds the filter for `spec` (`EnvFilter` syntax, for example `info` or
/// `veil_relay=debug,info`), with the [`SILENCED`] targets turned off.
pub fn filter(spec: &str) -> anyhow::Result<EnvFilter> {
    let mut filter = EnvFilter::try_new(spec)
        .map_err(|e| anyhow::anyhow!("--log-filter {spec:?} is not a valid filter: {e}"))?;
    for directive in SILENCED {
        filter = filter.add_directive(directive.parse().expect("static directive"));
    }
    Ok(filter)
}

/// Installs the global subscriber, writing to standard error.
pub fn init(format: LogFormat, spec: &str) -> anyhow::Result<()> {
    let filter = filter(spec)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("logging already initialised: {e}"))
}
