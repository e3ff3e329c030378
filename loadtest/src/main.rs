//! `veil-loadtest`: see `veil-loadtest --help`.

use std::path::PathBuf;
use std::time::Duration;

use veil_loadtest::gate::{self, Thresholds};
use veil_loadtest::scenario::{self, FailoverMode, Profile, Scenario, SrtpSuite, TransportMode};
use veil_loadtest::{Config, Target};

/// veil-loadtest: drives realistic calls with real SRTP through a Veil cluster and reports loss,
/// latency, jitter and media gaps, and where any loss happened. With --local it starts a whole
/// cluster in this process first. Every run stops by itself after its duration.
///
/// Exit status: 0 when every check passed; 99 when the run crossed a threshold (--max-*), any
/// datagram failed SRTP authentication or came from anywhere but the relay, or no media was
/// measured; 64 for bad flags or a bad scenario; 1 when the run could not start or finish.
#[derive(clap::Parser, Debug)]
#[command(name = "veil-loadtest", version)]
struct Flags {
    /// Start a local cluster (controller and relays on loopback) in this process and test it.
    #[arg(long, conflicts_with = "controller")]
    local: bool,

    /// Relays in the local cluster.
    #[arg(long, default_value_t = 1)]
    local_relays: usize,

    /// Controller replicas in the local cluster (1 to 5), sharing their sessions; each RPC goes
    /// to one of them.
    #[arg(long, default_value_t = 1, requires = "local")]
    local_controllers: usize,

    /// Controller gRPC URL of an existing cluster; several, comma-separated, for replicas (each
    /// RPC goes to one of them).
    #[arg(
        long,
        env = "VEIL_LOADTEST_CONTROLLER",
        required_unless_present = "local"
    )]
    controller: Option<String>,

    /// Bearer token for the controller (signaling role).
    #[arg(long, env = "VEIL_LOADTEST_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Relay ops endpoints (host:port, comma-separated) to compare figures with their metrics.
    #[arg(long, value_delimiter = ',')]
    relay_metrics: Vec<String>,

    /// Scenario file (JSON); flags given explicitly override nothing in it.
    #[arg(long, conflicts_with_all = ["calls", "participants", "churn", "churn_dwell", "duration", "ramp_up", "profile", "transport", "srtp", "failover"])]
    scenario: Option<PathBuf>,

    /// Concurrent calls.
    #[arg(long)]
    calls: Option<usize>,

    /// Participants per call (2 to 16).
    #[arg(long)]
    participants: Option<usize>,

    /// Participants who join each call while it runs and leave it again (AddParticipant at a
    /// random time of full load, RemoveParticipant --churn-dwell later); their media is
    /// measured apart, in the report's `churn` figures. Participants and joiners of a call are
    /// at most 16 together.
    #[arg(long)]
    churn: Option<usize>,

    /// How long each joiner (--churn) stays in the call, for example `2s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    churn_dwell: Option<Duration>,

    /// How long calls run at full load, for example `20s` or `2m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Calls started per second while ramping up.
    #[arg(long)]
    ramp_up: Option<f64>,

    /// Media profiles, weighted: `audio`, `video`, `screen`, or a mix like `audio=8,video=2`.
    #[arg(long, value_parser = |s: &str| scenario::parse_mix(s).map(Mix))]
    profile: Option<Mix>,

    /// Transport of the participants' legs.
    #[arg(long, value_enum)]
    transport: Option<TransportMode>,

    /// SRTP protection profile.
    #[arg(long, value_enum)]
    srtp: Option<SrtpSuite>,

    /// How legs fail over when their relay dies: `cold` binds on the backup after 1 s of
    /// silence; `hot` keeps legs bound on the backup too and switches after 150 ms, with no
    /// bind (hot standby; each leg holds a second, media-less leg on the backup, a second
    /// connection for QUIC legs).
    #[arg(long, value_enum)]
    failover: Option<FailoverMode>,

    /// The sessions' TTL asked of AllocateSession, seconds: 60 to 86400, or 0 for the API's
    /// default (an hour). A call that outlives it is ended by the relays (its tokens expire).
    #[arg(long, default_value_t = 0, conflicts_with = "soak")]
    ttl_secs: u32,

    /// Local addresses participants bind, as `A-B` (IPv4 range) or a comma-separated list.
    #[arg(long, value_parser = |s: &str| scenario::parse_ip_pool(s).map(Pool))]
    client_ip_pool: Option<Pool>,

    /// Write the JSON report here.
    #[arg(long)]
    report_json: Option<PathBuf>,

    /// Write the HTML report (plots, works offline) here.
    #[arg(long)]
    report_html: Option<PathBuf>,

    /// No progress line.
    #[arg(long)]
    quiet: bool,

    /// Fail (exit 99) if more than this share of deliveries is lost, percent (`0.1` or `0.1%`).
    /// No limit by default.
    #[arg(long, value_name = "PERCENT", value_parser = gate::parse_percent)]
    max_loss: Option<f64>,

    /// Fail (exit 99) if the one-way latency p99 exceeds this many milliseconds.
    #[arg(long, value_name = "MS", value_parser = gate::parse_ms)]
    max_p99_ms: Option<f64>,

    /// Fail (exit 99) if more calls than this fail (to set up, during media, or to release).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_failed_calls: u64,

    /// Fail (exit 99) if any participant's longest media interruption exceeds this many
    /// milliseconds. No limit by default.
    #[arg(long, value_name = "MS", value_parser = gate::parse_ms)]
    max_gap_ms: Option<f64>,

    /// Soak: run the scenario in back-to-back rounds for --duration (say `10m`), sampling the
    /// watched processes' resident memory and open descriptors every --soak-interval, and fail
    /// (exit 1) if either grows over the second half of the run. With --local the process
    /// watched is this one (the cluster runs in it); otherwise --soak-pid, --relay-metrics and
    /// --controller-metrics say what to watch.
    #[arg(long, conflicts_with_all = ["report_json", "report_html"])]
    soak: bool,

    /// Time between soak samples.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", requires = "soak")]
    soak_interval: Duration,

    /// Length of each soak round at full load (calls are allocated and released every round).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s", requires = "soak")]
    soak_round: Duration,

    /// PIDs of processes on this host to watch during a soak (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "soak")]
    soak_pid: Vec<u32>,

    /// Controller ops endpoints (host:port, comma-separated) to watch during a soak, through
    /// their process metrics (relays: --relay-metrics).
    #[arg(long, value_delimiter = ',', requires = "soak")]
    controller_metrics: Vec<String>,

    /// Resident-memory growth always allowed over the second half of a soak, MiB.
    #[arg(long, default_value_t = 16.0, requires = "soak")]
    soak_max_rss_growth_mib: f64,

    /// Open-descriptor growth always allowed over the second half of a soak.
    #[arg(long, default_value_t = 16.0, requires = "soak")]
    soak_max_fd_growth: f64,

    /// Growth allowed beyond those floors, as a fraction of each series' median.
    #[arg(long, default_value_t = 0.05, requires = "soak")]
    soak_growth_fraction: f64,

    /// Log filter.
    #[arg(long, env = "VEIL_LOG", default_value = "warn")]
    log_filter: String,

    /// Validate the flags, the environment and the scenario file, print the effective scenario,
    /// target and thresholds (the token redacted), and exit: 0 if valid, 64 naming the field if
    /// not. Starts nothing and contacts no controller.
    #[arg(long)]
    check_config: bool,
}

/// A parsed `--profile` (a newtype, so clap takes it as one value).
#[derive(Debug, Clone)]
struct Mix(Vec<(Profile, u32)>);

/// A parsed `--client-ip-pool`.
#[derive(Debug, Clone)]
struct Pool(Vec<std::net::IpAddr>);

impl Flags {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        if !(1..=5).contains(&self.local_controllers) {
            anyhow::bail!("--local-controllers must be from 1 to 5");
        }
        let mut s = match &self.scenario {
            Some(path) => Scenario::from_file(path)?,
            None => Scenario {
                calls: if self.local { 4 } else { 10 },
                duration: Duration::from_secs(if self.local { 5 } else { 10 }),
                ..Scenario::default()
            },
        };
        if let Some(v) = self.calls {
            s.calls = v;
        }
        if let Some(v) = self.participants {
            s.participants = v;
        }
        if let Some(v) = self.churn {
            s.churn = v;
        }
        if let Some(v) = self.churn_dwell {
            s.churn_dwell = v;
        }
        if let Some(v) = self.duration {
            s.duration = v;
        }
        if let Some(v) = self.ramp_up {
            s.ramp_up_per_sec = v;
        }
        if let Some(v) = &self.profile {
            s.mix = v.0.clone();
        }
        if let Some(v) = self.transport {
            s.transport = v;
        }
        if let Some(v) = self.srtp {
            s.srtp = v;
        }
        if let Some(v) = self.failover {
            s.failover = v;
        }
        if let Some(v) = &self.client_ip_pool {
            s.client_ips = v.0.clone();
        } else if self.local && self.scenario.is_none() {
            s.client_ips = scenario::parse_ip_pool("127.0.0.2-127.0.0.254").expect("static pool");
        }
        s.validate()?;
        Ok(s)
    }
}

#[tokio::main]
async fn main() {
    let flags: Flags = veil_ops::parse_flags();
    if let Err(e) = veil_ops::logging::init(veil_ops::logging::LogFormat::Text, &flags.log_filter) {
        veil_ops::config_error(&e);
    }
    let scenario = flags
        .scenario()
        .unwrap_or_else(|e| veil_ops::config_error(&e));
    if flags.check_config {
        check_config(&flags, &scenario).print_and_exit();
    }
    let target = if flags.local {
        Target::Local {
            relays: flags.local_relays.max(1),
            controllers: flags.local_controllers,
        }
    } else {
        Target::Remote {
            controller: flags
                .controller
                .clone()
                .expect("clap requires --controller without --local"),
            token: flags.token.clone(),
            relay_metrics: flags.relay_metrics.clone(),
        }
    };
    if flags.soak {
        soak(&flags, scenario, target).await;
        return;
    }
    let cfg = Config {
        scenario,
        target,
        progress: !flags.quiet,
        thresholds: Thresholds {
            max_loss_percent: flags.max_loss,
            max_p99_ms: flags.max_p99_ms,
            max_failed_calls: flags.max_failed_calls,
            max_gap_ms: flags.max_gap_ms,
        },
        ttl_seconds: flags.ttl_secs,
    };
    let report = match veil_loadtest::run(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    print!("{}", report.summary());
    if let Some(path) = &flags.report_json {
        let json = serde_json::to_string_pretty(&report).expect("report serialises");
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("error: --report-json {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    if let Some(path) = &flags.report_html
        && let Err(e) = std::fs::write(path, veil_loadtest::html::render(&report))
    {
        eprintln!("error: --report-html {}: {e}", path.display());
        std::process::exit(1);
    }
    if !report.verdict.passed {
        std::process::exit(gate::EXIT_THRESHOLD);
    }
}

/// `--soak`: runs the soak, prints its summary, exits 1 if it failed.
async fn soak(flags: &Flags, scenario: Scenario, target: Target) {
    use veil_loadtest::soak::{self, Growth, Probe};
    let mut probes: Vec<Probe> = Vec::new();
    if matches!(target, Target::Local { .. }) {
        probes.push(Probe::This);
    }
    probes.extend(flags.soak_pid.iter().map(|p| Probe::Pid(*p)));
    probes.extend(
        flags
            .relay_metrics
            .iter()
            .chain(&flags.controller_metrics)
            .map(|a| Probe::Metrics(a.trim_start_matches("http://").to_string())),
    );
    if probes.is_empty() {
        veil_ops::config_error(&anyhow::anyhow!(
            "--soak against a remote cluster needs something to watch: --soak-pid, \
             --relay-metrics or --controller-metrics"
        ));
    }
    if !(flags.soak_growth_fraction >= 0.0 && flags.soak_max_rss_growth_mib >= 0.0) {
        veil_ops::config_error(&anyhow::anyhow!(
            "--soak-growth-fraction and --soak-max-rss-growth-mib must not be negative"
        ));
    }
    let settings = soak::Settings {
        duration: scenario.duration,
        round: flags.soak_round,
        interval: flags.soak_interval,
        probes,
        rss: Growth {
            floor: flags.soak_max_rss_growth_mib * 1024.0 * 1024.0,
            fraction: flags.soak_growth_fraction,
        },
        fds: Growth {
            floor: flags.soak_max_fd_growth,
            fraction: flags.soak_growth_fraction,
        },
    };
    let result = async {
        let (cluster, endpoint) = veil_loadtest::connect(&target).await?;
        let report = soak::run(&scenario, &endpoint, &settings).await;
        if let Some(c) = cluster {
            c.shutdown().await?;
        }
        report
    }
    .await;
    match result {
        Ok(report) => {
            print!("{}", report.summary());
            if !report.failures.is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// What `--check-config` prints.
fn check_config(flags: &Flags, s: &Scenario) -> veil_ops::check::Effective {
    let mix: Vec<String> = s
        .mix
        .iter()
        .map(|(p, w)| format!("{p:?}={w}").to_lowercase())
        .collect();
    let ms = |v: Option<f64>| v.map(|x| format!("{x} ms"));
    veil_ops::check::Effective::new("veil-loadtest")
        .set(
            "target",
            if flags.local {
                format!(
                    "--local, {} relays, {} controller replica(s)",
                    flags.local_relays.max(1),
                    flags.local_controllers
                )
            } else {
                flags.controller.clone().unwrap_or_default()
            },
        )
        .secret("token", usize::from(flags.token.is_some()))
        .list("relay-metrics", &flags.relay_metrics)
        .set("calls", s.calls)
        .set("participants", s.participants)
        .set("churn", s.churn)
        .set("churn-dwell", humantime::format_duration(s.churn_dwell))
        .set("ttl-secs", flags.ttl_secs)
        .set("duration", humantime::format_duration(s.duration))
        .set("ramp-up", format!("{} calls/s", s.ramp_up_per_sec))
        .list("profile", &mix)
        .set("transport", format!("{:?}", s.transport).to_lowercase())
        .set("srtp", s.srtp.rfc_name())
        .set(
            "client-ip-pool",
            format!("{} addresses", s.client_ips.len()),
        )
        .opt("max-loss", flags.max_loss.map(|x| format!("{x}%")))
        .opt("max-p99-ms", ms(flags.max_p99_ms))
        .set("max-failed-calls", flags.max_failed_calls)
        .opt("max-gap-ms", ms(flags.max_gap_ms))
        .opt(
            "report-json",
            flags.report_json.as_ref().map(|p| p.display().to_string()),
        )
        .opt(
            "report-html",
            flags.report_html.as_ref().map(|p| p.display().to_string()),
        )
}
