//! `xdp-bench`: the kernel fast path side by side with the userspace relay and the bare
//! userspace forwarder, on a veth pair between two network namespaces, in one run.
//!
//! Run by `bench/xdp.sh`, which builds the topology (this process runs in the generator's
//! namespace, pinned to CPU 1; the forwarders run in the relay's, pinned to CPU 0) and passes the
//! relay namespace, the addresses and the relay device's threaded NAPI poller. For each
//! configuration and step it offers RTP-shaped datagrams over 4 flows and measures what arrives:
//!
//! - `floor`: `veil-floor` (recvmmsg, route lookup, sendmmsg: nothing else);
//! - `veil-udp`: `veil-relay --xdp off`, legs bound with real tokens over the bind exchange;
//! - `veil-xdp`: the same relay with `--xdp native` on the relay's device.
//!
//! **Relay-side CPU per packet** is the forwarder process's CPU time plus the run time of the
//! relay device's NAPI thread (`/proc/<tid>/schedstat`), where the kernel receives for every
//! configuration and where the XDP program runs, over the datagrams delivered
//! (../shared/XDP-NOTES.md: this kernel has no IRQ time accounting, so softirq work is only
//! visible on a threaded NAPI poller).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use veil_bench::proc::{Service, TempDir, wait_until};
use veil_bench::udpgen::{self, Cores, Flow, Framing, Load, Measured};
use veil_bench::veil;

#[derive(Parser, Debug)]
#[command(
    name = "xdp-bench",
    about = "The XDP fast path against userspace, on veth (bench/xdp.sh)."
)]
struct Args {
    /// The relay's network namespace (its device is the far end of this namespace's veth).
    #[arg(long)]
    relay_ns: String,
    /// The relay's device there.
    #[arg(long)]
    relay_dev: String,
    /// The relay's address.
    #[arg(long)]
    relay_ip: Ipv4Addr,
    /// The senders' address (here).
    #[arg(long)]
    send_ip: Ipv4Addr,
    /// The receivers' address (here).
    #[arg(long)]
    recv_ip: Ipv4Addr,
    /// The relay device's threaded NAPI poller (kernel thread id).
    #[arg(long)]
    napi_tid: u32,
    /// The core the forwarders and the NAPI poller are pinned to.
    #[arg(long, default_value_t = 0)]
    relay_core: usize,
    /// Configurations: floor, veil-udp, veil-xdp.
    #[arg(long, value_delimiter = ',', default_value = "floor,veil-udp,veil-xdp")]
    configs: Vec<String>,
    /// Datagram sizes, bytes.
    #[arg(long, value_delimiter = ',', default_value = "200,1200")]
    sizes: Vec<usize>,
    /// Offered rates, datagrams per second.
    #[arg(long, value_delimiter = ',', default_value = "50000,100000")]
    rates: Vec<u64>,
    /// Flows the load is spread over.
    #[arg(long, default_value_t = 4)]
    flows: usize,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 3.0)]
    window_secs: f64,
    /// Directory of the release binaries (veil-relay built with `--features xdp`, veil-floor).
    #[arg(long)]
    bin_dir: PathBuf,
    /// Also write every step as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A command run in the relay's namespace, pinned to the relay's core.
fn in_relay_ns(args: &Args, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &args.relay_ns, "taskset", "-c"])
        .arg(args.relay_core.to_string())
        .arg(args.bin_dir.join(program));
    c
}

fn bound(ip: Ipv4Addr) -> anyhow::Result<UdpSocket> {
    UdpSocket::bind(SocketAddrV4::new(ip, 0)).context("bind a generator socket")
}

/// A flow from `tx` through the forwarder at `relay` to `rx`, its sockets set up as the
/// generator needs them; `keepalive` for Veil's receiving legs.
fn flow(tx: UdpSocket, rx: UdpSocket, relay: SocketAddr, keepalive: bool) -> anyhow::Result<Flow> {
    udpgen::setup_tx(&tx)?;
    udpgen::setup_rx(&rx, false)?;
    Ok(Flow {
        tx,
        dst: relay,
        framing: Framing::Plain,
        rx,
        keepalive_to: keepalive.then_some(relay),
    })
}

struct Target {
    flows: Vec<Flow>,
    service: Service,
}

fn setup(args: &Args, config: &str, dir: &TempDir, port: u16) -> anyhow::Result<Target> {
    let relay = SocketAddr::from(SocketAddrV4::new(args.relay_ip, port));
    match config {
        "floor" => {
            let mut cmd = in_relay_ns(args, "veil-floor");
            cmd.args(["--listen", &relay.to_string()]);
            let mut flows = Vec::new();
            for _ in 0..args.flows {
                let (tx, rx) = (bound(args.send_ip)?, bound(args.recv_ip)?);
                cmd.args([
                    "--route".to_string(),
                    format!("{}={}", tx.local_addr()?, rx.local_addr()?),
                ]);
                flows.push(flow(tx, rx, relay, false)?);
            }
            let log = dir.path().join(format!("floor-{port}.log"));
            let mut service = Service::spawn("veil-floor", cmd, &log)?;
            wait_until(&mut service, Duration::from_secs(5), || {
                if std::fs::read_to_string(&log)?.contains("READY") {
                    Ok(())
                } else {
                    bail!("not ready")
                }
            })?;
            Ok(Target { flows, service })
        }
        "veil-udp" | "veil-xdp" => {
            let (keys, key_file) = veil::write_key_file(dir.path())?;
            let mut cmd = in_relay_ns(args, "veil-relay");
            cmd.args(["--key-file".as_ref(), key_file.as_os_str()])
                .args(["--udp-addr", &relay.to_string()])
                .args(["--ops-addr", &format!("{}:{}", args.relay_ip, port + 1)])
                .args(["--workers", "1", "--node-id", "bench-relay"])
                .args(["--drain-deadline-secs", "0", "--log-filter", "warn"]);
            if config == "veil-xdp" {
                cmd.args(["--xdp", "native", "--xdp-interfaces", &args.relay_dev]);
            }
            let log = dir.path().join(format!("{config}-{port}.log"));
            let mut service = Service::spawn("veil-relay", cmd, &log)?;
            let probe = bound(args.send_ip)?;
            probe.set_read_timeout(Some(Duration::from_millis(100)))?;
            wait_until(&mut service, Duration::from_secs(10), || {
                probe.send_to(&veil_relay_core::wire::keepalive(rand::random()), relay)?;
                let mut buf = [0u8; 64];
                probe.recv_from(&mut buf)?;
                Ok(())
            })?;
            let mut flows = Vec::new();
            for _ in 0..args.flows {
                let (tx, rx) = (bound(args.send_ip)?, bound(args.recv_ip)?);
                let session: u64 = rand::random();
                veil::bind_udp(&tx, relay, &veil::token(&keys, session, 0, 2))?;
                veil::bind_udp(&rx, relay, &veil::token(&keys, session, 1, 2))?;
                flows.push(flow(tx, rx, relay, true)?);
            }
            Ok(Target { flows, service })
        }
        other => bail!("unknown configuration {other:?} (floor, veil-udp, veil-xdp)"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = TempDir::new("xdp-bench")?;
    let cores = Cores {
        relay: args.relay_core,
        generator: Some(1 - args.relay_core.min(1)),
        napi: Some(args.napi_tid),
    };
    let window = Duration::from_secs_f64(args.window_secs);
    let mut rows: Vec<(String, usize, Measured)> = Vec::new();
    let mut json = Vec::new();
    println!(
        "{:<9} {:>5} {:>8} {:>10} {:>10} {:>8} {:>11} {:>11} {:>7}",
        "config",
        "size",
        "offered",
        "delivered",
        "loss",
        "cpu us",
        "of it NAPI",
        "relay util",
        "noise"
    );
    let mut port = 41000;
    for &size in &args.sizes {
        for config in &args.configs {
            port += 2;
            let target =
                setup(&args, config, &dir, port).with_context(|| format!("set up {config}"))?;
            for &rate in &args.rates {
                let load = Load {
                    rate_pps: Some(rate),
                    size,
                    burst: 1,
                    warmup: Duration::from_millis(700),
                    window,
                };
                // The NAPI thread's share, measured around the step (the window is most of it).
                let napi0 = veil_bench::cpu::thread_runtime(args.napi_tid)?;
                let proc0 = veil_bench::cpu::process_cpu(target.service.pid())?;
                let m = udpgen::run(&target.flows, &load, Some(target.service.pid()), cores)?;
                let napi = veil_bench::cpu::thread_runtime(args.napi_tid)? - napi0;
                let proc = veil_bench::cpu::process_cpu(target.service.pid())? - proc0;
                let napi_share = napi.as_secs_f64() / (napi + proc).as_secs_f64().max(1e-9);
                println!(
                    "{:<9} {:>5} {:>8} {:>10.0} {:>9.3}% {:>8.2} {:>10.0}% {:>10.0}% {:>6.0}%",
                    config,
                    size,
                    rate,
                    m.delivered_pps,
                    m.loss() * 100.0,
                    m.cpu_us_per_pkt().unwrap_or(f64::NAN),
                    napi_share * 100.0,
                    m.relay_util().unwrap_or(f64::NAN) * 100.0,
                    m.noise().unwrap_or(f64::NAN) * 100.0,
                );
                json.push(serde_json::json!({
                    "config": config, "size": size, "rate": rate,
                    "delivered_pps": m.delivered_pps, "loss": m.loss(),
                    "cpu_us_per_pkt": m.cpu_us_per_pkt(), "napi_share": napi_share,
                    "noise": m.noise(), "generator_limited": m.generator_limited(),
                }));
                rows.push((config.clone(), size, m));
            }
            drop(target);
        }
    }
    println!();
    println!("relay-side CPU per packet, as a ratio to the floor in the same run:");
    for &size in &args.sizes {
        for &rate in &args.rates {
            let cpu = |c: &str| {
                rows.iter()
                    .find(|(cfg, s, m)| cfg == c && *s == size && m.target_pps == Some(rate))
                    .and_then(|(_, _, m)| m.cpu_us_per_pkt())
            };
            if let Some(floor) = cpu("floor") {
                let r =
                    |c: &str| cpu(c).map_or("n/a".to_string(), |v| format!("{:.2}x", v / floor));
                println!(
                    "  {size:>5} B at {rate:>6}/s: floor {floor:.2} us, veil-udp {}, veil-xdp {}",
                    r("veil-udp"),
                    r("veil-xdp")
                );
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
