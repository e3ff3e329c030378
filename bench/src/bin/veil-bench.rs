//! `veil-bench`: the side-by-side forwarding benchmark and the controller load test. See
//! `bench/README.md`; `bench/run.sh` runs everything with the intended pinning.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use veil_bench::proc::{
    Service, TempDir, free_tcp_port, free_udp_port, pinned, sibling, wait_until,
};
use veil_bench::quicgen::QuicFlows;
use veil_bench::report::{self, Step};
use veil_bench::turn::{Allocation, Credentials};
use veil_bench::udpgen::{self, Cores, Flow, Framing, Load, Measured};
use veil_bench::{cpu, ctlload, veil};
use veil_relay_core::KeyRing;

#[derive(Parser, Debug)]
#[command(
    about = "Veil benchmarks: forwarding side by side with a floor and coturn, and the controller"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Fixed packet rates through each forwarder, one datagram per send.
    Forward(ForwardArgs),
    /// The video-burst case: frames of several 1200-byte datagrams, each frame one GSO send.
    Video(ForwardArgs),
    /// AllocateSession throughput (closed loop) and latency (open loop at a fixed rate).
    Controller(ControllerArgs),
    /// Prints the machine: CPU, kernel, load, socket buffer limits.
    Info,
}

#[derive(Args, Debug, Clone)]
struct ForwardArgs {
    /// Shorter windows and no refinement of the highest lossless rate.
    #[arg(long)]
    quick: bool,
    /// Forwarders to measure: direct (no forwarder: the loopback baseline), floor, veil-udp,
    /// veil-quic, coturn, veil-turn and coturn-turn (TURN client to TURN client, ChannelData in
    /// both directions). Default: all (video: direct, floor, veil-udp, coturn).
    #[arg(long, value_delimiter = ',')]
    configs: Option<Vec<String>>,
    /// Datagram sizes, bytes. Default: 200,1200 (video: 1200).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Offered rates, datagrams per second; a final step always offers as much as possible.
    /// Default: 50000,100000,200000,400000 (video: and 800000).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u64>>,
    /// Flows (sessions of two legs, or TURN allocations) the load is spread over.
    #[arg(long, default_value_t = 4)]
    flows: usize,
    /// Datagrams per frame in the video case.
    #[arg(long, default_value_t = 8)]
    frame: usize,
    /// The core the forwarder is pinned to (this process should be pinned to another).
    #[arg(long, default_value_t = 0)]
    relay_core: usize,
    /// The rate at which CPU per packet and latency are compared in the summary.
    #[arg(long, default_value_t = 100_000)]
    reference: u64,
    /// Measurement window in seconds, overriding the default (2, or 1 with --quick): longer
    /// windows for profiling a forwarder under steady load.
    #[arg(long)]
    window_secs: Option<f64>,
    /// Enable GRO on the receiving sockets: a forwarder's GSO bursts then reach them whole, and
    /// the forwarder does not pay to split them (as it would on a NIC without UDP segmentation
    /// offload). Off by default, the conservative choice.
    #[arg(long)]
    rx_gro: bool,
    /// Also write every step as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct ControllerArgs {
    /// Shorter windows.
    #[arg(long)]
    quick: bool,
    /// Core the controller is pinned to; relays and this load client use the other.
    #[arg(long, default_value_t = 0)]
    controller_core: usize,
    /// Core for the two relays.
    #[arg(long, default_value_t = 1)]
    relay_core: usize,
    /// Requests in flight in the closed-loop run.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Rate of the open-loop latency run, allocations per second.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    veil_bench::handle_stop_signals();
    match cli.cmd {
        Cmd::Forward(a) => forward(a, false),
        Cmd::Video(a) => forward(a, true),
        Cmd::Controller(a) => controller(a),
        Cmd::Info => {
            print!("{}", machine_info());
            Ok(())
        }
    }
}

fn machine_info() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    let affinity = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    format!(
        "machine: {model}, {} CPUs, Linux {}\nload average (1/5/15 min): {}\nnet.core.rmem_max {} wmem_max {}\nthis process may run on CPUs {affinity}\n",
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count(),
        read("/proc/sys/kernel/osrelease"),
        cpu::loadavg(),
        read("/proc/sys/net/core/rmem_max"),
        read("/proc/sys/net/core/wmem_max"),
    )
}

/// The forwarder under test and what it needs kept alive.
enum Target {
    Udp {
        flows: Vec<Flow>,
        pid: Option<u32>,
        _service: Option<Service>,
    },
    Quic {
        flows: QuicFlows,
        pid: u32,
        _relay: veil::RelayProcess,
        rt: tokio::runtime::Runtime,
    },
}

impl Target {
    fn run(&self, load: &Load, cores: Cores) -> anyhow::Result<Measured> {
        match self {
            Self::Udp { flows, pid, .. } => udpgen::run(flows, load, *pid, cores),
            Self::Quic { flows, pid, rt, .. } => rt.block_on(flows.run(load, Some(*pid), cores)),
        }
    }

    /// Runs a step, and once more if another process competed for either core; keeps the
    /// quieter attempt. (Once only: on a busy machine more attempts would triple the run's
    /// length and still not find quiet.)
    fn run_quietly(&self, load: &Load, cores: Cores) -> anyhow::Result<(Measured, usize)> {
        let noise = |m: &Measured| m.noise().unwrap_or(0.0) + m.gen_noise().unwrap_or(0.0);
        let mut best = self.run(load, cores)?;
        let mut attempts = 1;
        while best.noisy() && attempts < 2 && !veil_bench::stop_requested() {
            attempts += 1;
            let m = self.run(load, cores)?;
            if noise(&m) < noise(&best) {
                best = m;
            }
        }
        Ok((best, attempts))
    }
}

/// The CPU this process is pinned to, if it is pinned to exactly one.
fn own_core() -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list"))?
        .split_once(':')?
        .1
        .trim()
        .parse()
        .ok()
}

fn socket_pair() -> anyhow::Result<(UdpSocket, UdpSocket)> {
    Ok((
        udpgen::bind_local([127, 0, 0, 1])?,
        udpgen::bind_local([127, 0, 0, 1])?,
    ))
}

fn v4(a: SocketAddr) -> anyhow::Result<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => bail!("IPv4 loopback only"),
    }
}

#[allow(clippy::too_many_arguments)]
fn setup(
    config: &str,
    rx_gro: bool,
    dir: &Path,
    keys: &KeyRing,
    key_file: &Path,
    n: usize,
    size: usize,
    core: usize,
) -> anyhow::Result<Target> {
    match config {
        "direct" => {
            let mut flows = Vec::new();
            for _ in 0..n {
                let (tx, rx) = socket_pair()?;
                udpgen::setup_tx(&tx)?;
                udpgen::setup_rx(&rx, rx_gro)?;
                flows.push(Flow {
                    dst: rx.local_addr()?,
                    tx,
                    framing: Framing::Plain,
                    rx,
                    keepalive_to: None,
                });
            }
            Ok(Target::Udp {
                flows,
                pid: None,
                _service: None,
            })
        }
        "floor" => {
            let listen: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
            let mut cmd = pinned(core, sibling("veil-floor")?);
            cmd.args(["--listen", &listen.to_string()]);
            let mut flows = Vec::new();
            for _ in 0..n {
                let (tx, rx) = socket_pair()?;
                cmd.args([
                    "--route".to_string(),
                    format!("{}={}", tx.local_addr()?, rx.local_addr()?),
                ]);
                udpgen::setup_tx(&tx)?;
                udpgen::setup_rx(&rx, rx_gro)?;
                flows.push(Flow {
                    tx,
                    dst: listen,
                    framing: Framing::Plain,
                    rx,
                    keepalive_to: None,
                });
            }
            let log = dir.join("floor.log");
            let mut svc = Service::spawn("veil-floor", cmd, &log)?;
            wait_until(&mut svc, Duration::from_secs(5), || {
                let text = std::fs::read_to_string(&log)?;
                if text.contains("READY") {
                    Ok(())
                } else {
                    bail!("not ready")
                }
            })?;
            Ok(Target::Udp {
                flows,
                pid: Some(svc.pid()),
                _service: Some(svc),
            })
        }
        "veil-udp" => {
            let relay = veil::start_relay(dir, key_file, core, None, &[])?;
            let mut flows = Vec::new();
            for _ in 0..n {
                let (tx, rx) = socket_pair()?;
                let session: u64 = rand::random();
                veil::bind_udp(&tx, relay.udp, &veil::token(keys, session, 0, 2))?;
                veil::bind_udp(&rx, relay.udp, &veil::token(keys, session, 1, 2))?;
                udpgen::setup_tx(&tx)?;
                udpgen::setup_rx(&rx, rx_gro)?;
                flows.push(Flow {
                    tx,
                    dst: relay.udp,
                    framing: Framing::Plain,
                    rx,
                    keepalive_to: Some(relay.udp),
                });
            }
            Ok(Target::Udp {
                flows,
                pid: Some(relay.service.pid()),
                _service: Some(relay.service),
            })
        }
        "veil-quic" => {
            let id = veil::quic_identity(dir)?;
            let relay = veil::start_relay(dir, key_file, core, Some(&id), &[])?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let quic = relay.quic.context("relay without QUIC")?;
            let flows = rt.block_on(QuicFlows::bind(keys, relay.udp, quic, id.sha256, n, size))?;
            Ok(Target::Quic {
                flows,
                pid: relay.service.pid(),
                _relay: relay,
                rt,
            })
        }
        "coturn" => {
            let (svc, server, creds) = start_coturn(dir, core)?;
            let mut svc = svc;
            let mut flows = Vec::new();
            for i in 0..n {
                let (tx, rx) = socket_pair()?;
                let mut alloc = if i == 0 {
                    wait_until(&mut svc, Duration::from_secs(10), || {
                        Allocation::allocate(&tx, server, &creds)
                    })?
                } else {
                    Allocation::allocate(&tx, server, &creds)?
                };
                let channel = 0x4000;
                alloc.bind_channel(&tx, channel, v4(rx.local_addr()?)?)?;
                udpgen::setup_tx(&tx)?;
                udpgen::setup_rx(&rx, rx_gro)?;
                flows.push(Flow {
                    tx,
                    dst: server,
                    framing: Framing::ChannelData(channel),
                    rx,
                    keepalive_to: None,
                });
            }
            Ok(Target::Udp {
                flows,
                pid: Some(svc.pid()),
                _service: Some(svc),
            })
        }
        // TURN client to TURN client, ChannelData in both directions: both ends allocate,
        // each binds channel 0x4000 to the other's relayed address, and the receiver gets
        // ChannelData. Veil relays from one allocation to the other in one step (a relayed
        // address is only a key); coturn sends from the sender's relayed socket to the
        // receiver's and reads it there (a relayed address is a socket).
        "veil-turn" | "coturn-turn" => {
            let (server, pid, mut svc, creds): (_, _, _, Box<dyn Fn(u64, u8) -> Credentials>) =
                if config == "veil-turn" {
                    let relay = veil::start_relay(dir, key_file, core, None, &[])?;
                    let keys = keys.clone();
                    let creds = move |session: u64, leg: u8| {
                        let c =
                            veil_protocol::turn::credentials(&veil::token(&keys, session, leg, 2));
                        Credentials {
                            key: veil_relay_core::stun::long_term_key(
                                c.username.as_bytes(),
                                veil_protocol::turn::REALM.as_bytes(),
                                c.credential.as_bytes(),
                            ),
                            username: c.username,
                        }
                    };
                    (
                        relay.udp,
                        relay.service.pid(),
                        relay.service,
                        Box::new(creds),
                    )
                } else {
                    let (svc, server, creds) = start_coturn(dir, core)?;
                    let pid = svc.pid();
                    (server, pid, svc, Box::new(move |_, _| creds.clone()))
                };
            let mut flows = Vec::new();
            for i in 0..n {
                let (tx, rx) = socket_pair()?;
                let session: u64 = rand::random();
                let (tx_creds, rx_creds) = (creds(session, 0), creds(session, 1));
                let mut a = if i == 0 {
                    wait_until(&mut svc, Duration::from_secs(10), || {
                        Allocation::allocate(&tx, server, &tx_creds)
                    })?
                } else {
                    Allocation::allocate(&tx, server, &tx_creds)?
                };
                let mut b = Allocation::allocate(&rx, server, &rx_creds)?;
                let channel = 0x4000;
                a.bind_channel(&tx, channel, v4(b.relayed)?)?;
                b.bind_channel(&rx, channel, v4(a.relayed)?)?;
                udpgen::setup_tx(&tx)?;
                udpgen::setup_rx(&rx, rx_gro)?;
                flows.push(Flow {
                    tx,
                    dst: server,
                    framing: Framing::ChannelData(channel),
                    rx,
                    keepalive_to: None,
                });
            }
            Ok(Target::Udp {
                flows,
                pid: Some(pid),
                _service: Some(svc),
            })
        }
        other => {
            bail!(
                "unknown configuration {other:?} (direct, floor, veil-udp, veil-quic, coturn, \
                 veil-turn, coturn-turn)"
            )
        }
    }
}

/// Starts coturn (Debian's `turnserver`) pinned to `core` with a config file in `dir`: loopback
/// only, UDP only, no TLS/DTLS, no CLI, a static long-term-credential user, one relay thread
/// (as the relay's one IO worker), loopback peers allowed.
fn start_coturn(dir: &Path, core: usize) -> anyhow::Result<(Service, SocketAddr, Credentials)> {
    let bin = Path::new("/usr/bin/turnserver");
    if !bin.exists() {
        bail!("coturn is not installed (apt-get install -y coturn; bench/run.sh does so as root)");
    }
    let port = free_udp_port()?;
    let creds = Credentials {
        username: "bench".into(),
        key: rand::random(),
    };
    // A relay port range away from the ephemeral ports the benchmark's sockets get.
    let conf = format!(
        "listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nlistening-port={port}\n\
         min-port=20000\nmax-port=20999\nrealm=veil.bench\nlt-cred-mech\n\
         user={}:0x{}\n\
         userdb={}\nrelay-threads=1\nno-tls\nno-dtls\nno-tcp\nno-tcp-relay\nno-cli\n\
         allow-loopback-peers\nno-multicast-peers\nno-software-attribute\n\
         pidfile={}\nlog-file=stdout\nsimple-log\n",
        creds.username,
        hex::encode(creds.key),
        dir.join("turndb").display(),
        dir.join("turnserver.pid").display(),
    );
    let conf_path = dir.join("turnserver.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = pinned(core, bin);
    cmd.arg("-c").arg(&conf_path);
    let svc = Service::spawn("coturn", cmd, &dir.join("coturn.log"))?;
    Ok((svc, SocketAddr::from(([127, 0, 0, 1], port)), creds))
}

fn forward(args: ForwardArgs, video: bool) -> anyhow::Result<()> {
    let burst = if video { args.frame.max(2) } else { 1 };
    let configs = args.configs.clone().unwrap_or_else(|| {
        let all: &[&str] = if video {
            &["direct", "floor", "veil-udp", "coturn"]
        } else {
            &[
                "direct",
                "floor",
                "veil-udp",
                "veil-quic",
                "coturn",
                "veil-turn",
                "coturn-turn",
            ]
        };
        all.iter().map(|s| s.to_string()).collect()
    });
    let sizes = args
        .sizes
        .clone()
        .unwrap_or_else(|| if video { vec![1200] } else { vec![200, 1200] });
    let rates = args.rates.clone().unwrap_or_else(|| {
        let mut r = vec![50_000, 100_000, 200_000, 400_000];
        if video {
            r.push(800_000);
        }
        r
    });
    let (warmup, mut window) = if args.quick {
        (Duration::from_millis(300), Duration::from_secs(1))
    } else {
        (Duration::from_millis(500), Duration::from_secs(2))
    };
    if let Some(w) = args.window_secs {
        window = Duration::from_secs_f64(w.clamp(0.1, 120.0));
    }
    print!("{}", machine_info());
    println!(
        "{}: flows {}, window {:?} after {:?} warmup, forwarder pinned to CPU {}, {}",
        if video { "video bursts" } else { "forwarding" },
        args.flows,
        window,
        warmup,
        args.relay_core,
        if video {
            format!("frames of {burst} datagrams, each one GSO send")
        } else {
            "one datagram per send".into()
        }
    );
    let cores = Cores {
        relay: args.relay_core,
        generator: own_core(),
        napi: None,
    };
    match cores.generator {
        Some(c) if c == args.relay_core => {
            bail!("this process runs on CPU {c}, the forwarder's: pin it elsewhere (taskset -c 1)")
        }
        Some(_) => {}
        None => println!(
            "warning: this process is not pinned to one CPU (run it with taskset -c 1): \
             the generator may compete with the forwarder"
        ),
    }
    let dir = TempDir::new(if video { "video" } else { "forward" })?;
    let (keys, key_file) = veil::write_key_file(dir.path())?;
    let mut steps: Vec<Step> = Vec::new();
    // Configurations that could not be set up or measured: reported at the end, and the
    // command fails, after printing everything it did measure.
    let mut failures: Vec<String> = Vec::new();
    println!("{}", report::step_header());
    for &size in &sizes {
        for config in &configs {
            if video && config == "veil-quic" {
                println!("{config:<10} skipped: QUIC datagrams have no GSO bursts to forward");
                continue;
            }
            let target = match setup(
                config,
                args.rx_gro,
                dir.path(),
                &keys,
                &key_file,
                args.flows,
                size,
                args.relay_core,
            ) {
                Ok(t) => t,
                Err(e) => {
                    println!("{config:<10} {size:>5} setup failed: {e:#}");
                    failures.push(format!("{config} {size}: setup: {e:#}"));
                    continue;
                }
            };
            let run_step = |rate: Option<u64>, steps: &mut Vec<Step>| -> anyhow::Result<Measured> {
                let load = Load {
                    rate_pps: rate,
                    size,
                    burst,
                    warmup,
                    window,
                };
                let (m, attempts) = target.run_quietly(&load, cores)?;
                let step = Step {
                    config: config.clone(),
                    size,
                    burst,
                    attempts,
                    m: m.clone(),
                };
                println!("{}", report::step_line(&step));
                steps.push(step);
                Ok(m)
            };
            let mut mine: Vec<Measured> = Vec::new();
            let mut failed = None;
            for rate in rates.iter().map(|r| Some(*r)).chain([None]) {
                match run_step(rate, &mut steps) {
                    Ok(m) => mine.push(m),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if failed.is_none() && !args.quick {
                // Narrow down the highest lossless rate between the fixed steps: two halvings.
                let mut lo = mine
                    .iter()
                    .filter(|m| m.passed())
                    .filter_map(|m| m.target_pps)
                    .max();
                let mut hi = mine
                    .iter()
                    .filter(|m| !m.passed())
                    .filter_map(|m| m.target_pps)
                    .filter(|f| lo.is_none_or(|l| *f > l))
                    .min();
                for _ in 0..2 {
                    let mid = match (lo, hi) {
                        (Some(l), Some(h)) => (l + h) / 2 / 5000 * 5000,
                        (None, Some(h)) => h / 2 / 1000 * 1000,
                        _ => break,
                    };
                    if mid == 0 || Some(mid) == lo {
                        break;
                    }
                    match run_step(Some(mid), &mut steps) {
                        Ok(m) if m.passed() => lo = Some(mid),
                        Ok(_) => hi = Some(mid),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                println!("{config:<10} {size:>5} failed: {e:#}");
                failures.push(format!("{config} {size}: {e:#}"));
            }
            if veil_bench::stop_requested() {
                bail!("interrupted");
            }
            drop(target);
        }
    }
    println!();
    println!(
        "summary ({}; CPU per packet is the forwarder process's utime+stime over the window \
         divided by datagrams delivered; latency is one-way, sender stamp to arrival at the \
         receiving socket; load average now {})",
        if video { "video bursts" } else { "forwarding" },
        cpu::loadavg()
    );
    print!(
        "{}",
        report::summary_table(&steps, &configs, &sizes, burst, args.reference)
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "machine": machine_info(),
            "video": video,
            "burst": burst,
            "flows": args.flows,
            "steps": report::to_json(&steps),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!(
            "{} configuration(s) failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let (warmup, window) = if args.quick {
        (Duration::from_secs(1), Duration::from_secs(3))
    } else {
        (Duration::from_secs(2), Duration::from_secs(8))
    };
    print!("{}", machine_info());
    let dir = TempDir::new("controller")?;
    let (_keys, key_file) = veil::write_key_file(dir.path())?;
    let grpc: SocketAddr = ([127, 0, 0, 1], free_tcp_port()?).into();
    let ops: SocketAddr = ([127, 0, 0, 1], free_tcp_port()?).into();
    let url = format!("http://{grpc}");
    let mut cmd = pinned(args.controller_core, sibling("veil-controller")?);
    cmd.args(["--key-file".as_ref(), key_file.as_os_str()])
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--ops-addr",
            &ops.to_string(),
        ])
        .args(["--log-filter", "warn"])
        // The benchmark is one caller measuring the controller's own capacity: no quotas.
        .args([
            "--quota-live-sessions",
            "0",
            "--quota-allocations-per-sec",
            "0",
        ]);
    let mut ctl = Service::spawn("veil-controller", cmd, &dir.path().join("controller.log"))?;
    wait_until(&mut ctl, Duration::from_secs(10), || {
        std::net::TcpStream::connect(grpc)?;
        Ok(())
    })?;
    let mut relays = Vec::new();
    for i in 0..2 {
        let rdir = dir.path().join(format!("relay-{i}"));
        std::fs::create_dir_all(&rdir)?;
        relays.push(veil::start_relay(
            &rdir,
            &key_file,
            args.relay_core,
            None,
            &[
                "--controller".into(),
                url.clone(),
                "--node-id".into(),
                format!("relay-{i}"),
                "--zone".into(),
                format!("zone-{i}"),
                "--max-legs".into(),
                "100000000".into(),
            ],
        )?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pid = ctl.pid();
    let (tput, lat) = rt.block_on(async {
        let clients = ctlload::connect(&url, args.connections.max(1)).await?;
        ctlload::wait_for_relays(&mut clients[0].clone(), Duration::from_secs(15)).await?;
        // Latency first, on a controller holding few sessions; then throughput, which leaves
        // hundreds of thousands behind (their tokens live 60 s).
        let lat = ctlload::open_loop(&clients, args.rate, warmup, window, pid).await?;
        let tput = ctlload::closed_loop(&clients, args.concurrency, warmup, window, pid).await?;
        anyhow::Ok((tput, lat))
    })?;
    ctl.check_alive()?;
    println!(
        "controller pinned to CPU {}, 2 veil-relay processes and this client on CPU {}; {} HTTP/2 connections",
        args.controller_core, args.relay_core, args.connections
    );
    println!(
        "closed loop, {} in flight, {window:?}: {:.0} allocations/s ({} errors); controller {:.1}% of a core, {:.1} us CPU per allocation; client {:.1}% of a core  [target >= 20000/s: {}]",
        tput.concurrency,
        tput.per_sec,
        tput.errors,
        tput.ctl_util * 100.0,
        tput.ctl_us_per_alloc,
        tput.client_util * 100.0,
        if tput.per_sec >= 20_000.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  allocations completed in each second of the window: {:?}",
        tput.per_second
    );
    println!(
        "open loop at {}/s, {window:?}: issued {:.0}/s ({} errors); latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; controller {:.1}% of a core  [target p99 < 5 ms: {}]",
        lat.target_per_sec,
        lat.issued_per_sec,
        lat.errors,
        lat.p50_ms,
        lat.p99_ms,
        lat.p999_ms,
        lat.max_ms,
        lat.ctl_util * 100.0,
        if lat.p99_ms < 5.0 { "met" } else { "MISSED" }
    );
    println!("load average now {}", cpu::loadavg());
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "machine": machine_info(),
            "closed_loop": {
                "concurrency": tput.concurrency,
                "allocations_per_s": tput.per_sec,
                "errors": tput.errors,
                "controller_cpu_us_per_allocation": tput.ctl_us_per_alloc,
                "controller_util": tput.ctl_util,
                "client_util": tput.client_util,
                "per_second": tput.per_second,
            },
            "open_loop": {
                "rate": lat.target_per_sec,
                "issued_per_s": lat.issued_per_sec,
                "errors": lat.errors,
                "p50_ms": lat.p50_ms,
                "p99_ms": lat.p99_ms,
                "p999_ms": lat.p999_ms,
                "max_ms": lat.max_ms,
                "controller_util": lat.ctl_util,
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    drop(relays);
    drop(ctl);
    Ok(())
}
