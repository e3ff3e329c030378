//! coturn's own TURN load tool, `turnutils_uclient` (Debian's `coturn` package, installed by
//! scripts/test.sh; without it this test fails, never skips), runs 100 clients through a real
//! local cluster with the per-leg credentials `AllocateSession` hands out, and loses nothing.
//!
//! # The plan
//!
//! uclient finds its peers in one of two ways, and Veil's rules decide which one can work:
//!
//! - `-y` pairs the clients of one process with each other. A process takes one `-u`/`-w`,
//!   and a Veil username is one leg's ticket, so both clients of a pair would be the same leg;
//!   an allocation may only reach *other* legs of its session, so that gets 403.
//! - `-e IP -r PORT` sends every client's messages to one peer address. coturn's own tests
//!   point it at `turnutils_peer`, an echo server; Veil relays to nothing outside a session,
//!   so the echo here is inside it: leg 0 of each session is the test's own TURN client
//!   ([`Echo`]), which allocates first and sends each Data indication back, as a Send
//!   indication, to the relayed address it came from. uclient then measures what it was made
//!   to measure: every message's round trip, and loss, through Veil both ways.
//!
//! So each uclient process is one leg of a session (legs 1-13 of one session and 1-12 of
//! another: 25 processes), started with `-m 4`: a uclient client allocates twice (a probe
//! allocation on a socket it then closes, and its real one), and four clients are the eight
//! allocations a leg may hold. Flags: `-s` (Send indications: uclient picks random channel
//! numbers, outside Veil's 0x4000-0x4FFF), `-c` (no RTCP allocation, whose RESERVATION-TOKEN
//! gets 508), `-v` (it prints its relayed addresses), `-n 50 -l 100 -z 20` (each client sends
//! 50 messages of 100 bytes, one every 20 ms).
//!
//! uclient in this mode also asks for a permission on the port above its peer's (the peer's
//! RTCP port, even with `-c`) and exits if it is refused. The echo's relayed port is even, so
//! the relay must accept the odd port above a relayed port as the same allocation's; a relay
//! that refuses it answers 403 and every process fails before sending anything.
//!
//! # Ordering
//!
//! Veil delivers a datagram only where both allocations permit each other, and a permission
//! can only name a live allocation. The echo allocates before any uclient starts, so each
//! client's CreatePermission for it succeeds. The echo permits a process's clients when the
//! process prints "Total connect time" (all its clients allocated; uclient flushes every log
//! line), and uclient sends its first message at least a second after that (`1000 + random()
//! % 5000` ms): no message leaves before both permissions exist. A message sent too early
//! would be dropped by design, and would show as loss and as a `turn_no_permission` drop; both
//! are asserted zero, with every datagram forwarded as `turn-udp` and no 403.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay_core::stun::{self, Builder, Kind, attr, method};
use veil_testkit::stun::{Credentials, error_code, xor_addr as xor_attr};

const UCLIENT: &str = "/usr/bin/turnutils_uclient";
/// The line of uclient's final report with the round trip figures.
const RTT: &str = "Average round trip delay";
/// uclient processes, one leg each: legs 1..=n of each session (leg 0 is the echo).
const LEGS_PER_SESSION: [usize; 2] = [13, 12];
/// Clients per process (`-m`): each allocates twice, and a leg holds at most 8 allocations.
const CLIENTS_PER_PROCESS: usize = 4;
/// Messages each client sends (`-n`).
const MESSAGES: u64 = 50;
/// Bytes per message (`-l`).
const MESSAGE_LEN: usize = 100;
/// From the first uclient started to the last one done; the rest are killed by PID after it.
const BUDGET: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_uclient_runs_100_clients_through_veil_turn_without_loss() {
    assert!(
        Path::new(UCLIENT).exists(),
        "{UCLIENT} is missing: install Debian's coturn (scripts/test.sh does, as root: \
         apt-get install -y coturn)"
    );
    let started = Instant::now();
    let c = Cluster::start(Options {
        relays: 1,
        quic: false,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client(&c.controller_url).await;

    let mut echoes = Vec::new();
    let mut runs = Vec::new();
    for (s, &legs) in LEGS_PER_SESSION.iter().enumerate() {
        let session = allocate(&mut api, request(&format!("uclient-{s}"), legs + 1)).await;
        // Every participant on a loopback address of its own, as on separate hosts (the
        // relay limits unauthenticated requests per source address).
        let echo = Echo::start(&session.legs[0], [127, 0, 0, 2 + s as u8]).await;
        for leg in &session.legs[1..] {
            let local = [127, 0, 0, 10 + runs.len() as u8];
            runs.push(Uclient::start(
                leg,
                local,
                echo.relayed,
                echo.permits.clone(),
            ));
        }
        echoes.push(echo);
    }
    let spawned = Instant::now();

    // Wait for every process, bounded: past the budget, the rest are killed (our children,
    // by PID) and the test fails below with their output.
    let mut killed = Vec::new();
    loop {
        let running: Vec<usize> = (0..runs.len())
            .filter(|&i| runs[i].child.try_wait().unwrap().is_none())
            .collect();
        if running.is_empty() {
            break;
        }
        if spawned.elapsed() > BUDGET {
            for i in running {
                runs[i].child.kill().unwrap();
                killed.push(i);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ran_for = spawned.elapsed();
    let reports: Vec<Report> = runs.iter_mut().map(Uclient::finish).collect();
    let mut echoed = Vec::new();
    for echo in echoes {
        echoed.push(echo.stop().await);
    }
    let metrics = http_get(c.relays[0].metrics, "/metrics").await;

    let all_output = || {
        reports
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- uclient {i} ({:?}):\n{}", r.status, r.output))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        killed.is_empty(),
        "uclient processes {killed:?} ran past {BUDGET:?}:\n{}",
        all_output()
    );
    for (i, r) in reports.iter().enumerate() {
        let hint = if r.output.contains("create permission error 403") {
            "\nuclient asks for a permission on its peer's relayed port and on the odd port \
             above it (its RTCP port, even with -c), and stops at a 403: the relay must take \
             that odd port as naming the same allocation (see this file's doc comment)"
        } else {
            ""
        };
        assert!(
            r.status.is_some_and(|s| s.success()),
            "uclient {i} failed ({:?}):\n{}\nrelay counters: {:?}{hint}",
            r.status,
            r.output,
            turn_counters(&metrics)
        );
    }

    // 100 clients ran: each allocated, and sent and got back every message.
    let clients: usize = reports.iter().map(|r| r.clients.len()).sum();
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let received: u64 = reports.iter().map(|r| r.received).sum();
    let lost: u64 = reports.iter().filter_map(|r| r.lost).sum();
    let dropped: u64 = reports.iter().filter_map(|r| r.send_dropped).sum();
    let rtt_sum: f64 = reports
        .iter()
        .map(|r| r.rtt_avg_ms * r.received as f64)
        .sum();
    let rtt_min = reports.iter().map(|r| r.rtt_min_ms).min().unwrap();
    let rtt_max = reports.iter().map(|r| r.rtt_max_ms).max().unwrap();
    let echo_total: u64 = echoed.iter().map(|e| e.echoed).sum();
    eprintln!(
        "turnutils_uclient: {} processes, {clients} clients, {sent} messages sent, {received} \
         received, {lost} lost, {dropped} send-dropped; round trip avg {:.2} ms, min {rtt_min} \
         ms, max {rtt_max} ms; echoed {echo_total}; uclients ran {ran_for:?}, test {:?}; \
         relay counters: {:?}",
        reports.len(),
        rtt_sum / received.max(1) as f64,
        started.elapsed(),
        turn_counters(&metrics)
    );
    let expected_clients = LEGS_PER_SESSION.iter().sum::<usize>() * CLIENTS_PER_PROCESS;
    assert_eq!(clients, 100);
    assert_eq!(clients, expected_clients);
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.clients.len(), CLIENTS_PER_PROCESS, "uclient {i}");
        assert_eq!(
            (r.sent, r.received, r.lost, r.send_dropped),
            (
                CLIENTS_PER_PROCESS as u64 * MESSAGES,
                r.sent,
                Some(0),
                Some(0)
            ),
            "uclient {i}:\n{}",
            r.output
        );
    }
    assert_eq!(sent, clients as u64 * MESSAGES);

    // The echoes got each message once, from the relay only, and were refused nothing.
    for (s, e) in echoed.iter().enumerate() {
        let clients = LEGS_PER_SESSION[s] * CLIENTS_PER_PROCESS;
        assert_eq!(e.echoed, clients as u64 * MESSAGES, "echo {s}: {e:?}");
        assert_eq!(e.permitted, clients, "echo {s}: {e:?}");
        assert!(e.refused.is_empty(), "echo {s}: {e:?}");
        assert_eq!((e.foreign, e.other), (0, 0), "echo {s}: {e:?}");
    }

    // The relay agrees: every message crossed it twice as TURN (to the echo and back), nothing
    // as native UDP, and nothing was refused for a peer or a permission, or rate-limited.
    // (`turn_no_allocation` may count a 437: uclient abandons its probe allocations without
    // releasing them, and a later socket of the process can get a probe's port again; its
    // Allocate then meets the old allocation's 5-tuple, and uclient retries on a new socket.)
    let counters = turn_counters(&metrics);
    assert_eq!(
        counters.forwarded,
        (2 * sent) as f64,
        "{counters:?}\n{}",
        all_output()
    );
    assert_eq!(counters.forwarded_udp, 0.0, "{counters:?}");
    for reason in [
        "turn_forbidden_peer",
        "turn_no_permission",
        "turn_quota_reached",
        "no_peer",
        "rate_limited",
    ] {
        assert_eq!(
            counters.drops.get(reason).copied().unwrap_or(0.0),
            0.0,
            "{reason}: {counters:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// What one uclient process reported.
struct Report {
    status: Option<std::process::ExitStatus>,
    /// Its clients' real relayed addresses (the ones it asked permissions from).
    clients: Vec<SocketAddr>,
    sent: u64,
    received: u64,
    /// `None` where uclient printed no final report.
    lost: Option<u64>,
    send_dropped: Option<u64>,
    rtt_avg_ms: f64,
    rtt_min_ms: u64,
    rtt_max_ms: u64,
    output: String,
}

/// One `turnutils_uclient` process: one leg's credentials, `-m` clients, killed by PID if the
/// test ends before it does.
struct Uclient {
    child: Child,
    stdout: Option<std::thread::JoinHandle<Vec<SocketAddr>>>,
    output: Arc<Mutex<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Uclient {
    /// Starts uclient for `leg` on the local address `local`, sending to `echo`; when every
    /// client has allocated, sends their relayed addresses to `permits`.
    fn start(
        leg: &pb::Leg,
        local: [u8; 4],
        echo: SocketAddr,
        permits: mpsc::UnboundedSender<Vec<SocketAddr>>,
    ) -> Self {
        let server = &leg.ice_servers[0];
        let relay: SocketAddr = leg.relays[0].udp_address.parse().unwrap();
        assert!(
            server.urls.contains(&format!("turn:{relay}?transport=udp")),
            "{server:?}"
        );
        let mut child = Command::new(UCLIENT)
            .args(["-v", "-s", "-c"])
            .args(["-n", &MESSAGES.to_string()])
            .args(["-m", &CLIENTS_PER_PROCESS.to_string()])
            .args(["-l", &MESSAGE_LEN.to_string(), "-z", "20"])
            .args(["-L", &IpAddr::from(local).to_string()])
            .args(["-p", &relay.port().to_string()])
            .args(["-e", &echo.ip().to_string(), "-r", &echo.port().to_string()])
            .args(["-u", &server.username, "-w", &server.credential])
            .arg(relay.ip().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start turnutils_uclient");
        let output = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().unwrap();
        let sink = output.clone();
        let stdout = std::thread::spawn(move || {
            let mut last = None;
            let mut clients = Vec::new();
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = after(&line, "Received relay addr: ") {
                    last = a.trim().parse::<SocketAddr>().ok();
                } else if line.contains("create perm sent") {
                    // The allocation just made is a client's real one (its probe asks for no
                    // permission).
                    if let Some(a) = last.take() {
                        clients.push(a);
                    }
                } else if line.contains("Total connect time") {
                    let _ = permits.send(clients.clone());
                }
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
            clients
        });
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        });
        Self {
            child,
            stdout: Some(stdout),
            output,
            stderr: Some(stderr),
        }
    }

    /// After the process has exited (or was killed): what it reported.
    fn finish(&mut self) -> Report {
        let status = self.child.try_wait().unwrap();
        let clients = self.stdout.take().unwrap().join().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        let mut output = self.output.lock().unwrap().clone();
        output.push_str(&stderr);
        // The number after `key` on the last line holding `line` (uclient prints running
        // totals every second, and its final figures last).
        let num = |line: &str, key: &str| -> Option<f64> {
            let line = output.lines().rev().find(|l| l.contains(line))?;
            let rest = after(line, key)?;
            let end = rest
                .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        Report {
            status,
            clients,
            sent: num("tot_send_msgs=", "tot_send_msgs=").unwrap_or(0.0) as u64,
            received: num("tot_recv_msgs=", "tot_recv_msgs=").unwrap_or(0.0) as u64,
            lost: num("Total lost packets", "Total lost packets ").map(|v| v as u64),
            send_dropped: num("total send dropped", "total send dropped ").map(|v| v as u64),
            rtt_avg_ms: num(RTT, "delay ").unwrap_or(0.0),
            rtt_min_ms: num(RTT, "min = ").unwrap_or(0.0) as u64,
            rtt_max_ms: num(RTT, "max = ").unwrap_or(0.0) as u64,
            output,
        }
    }
}

impl Drop for Uclient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The text after the first `key` in `s`.
fn after<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    s.find(key).map(|i| &s[i + key.len()..])
}

/// What an echo did.
#[derive(Debug, Default)]
struct Echoed {
    /// Data indications sent back.
    echoed: u64,
    /// Relayed addresses permitted.
    permitted: usize,
    /// CreatePermission requests that were not answered with a signed success.
    refused: Vec<String>,
    /// Datagrams from anywhere but the relay.
    foreign: u64,
    /// Datagrams from the relay that were neither a Data indication nor an answer.
    other: u64,
}

/// A session's echo peer, as `turnutils_peer` is for coturn's tests, but inside the session: a
/// TURN client of leg 0 that sends each Data indication back, as a Send indication, to the
/// relayed address it came from.
struct Echo {
    /// Its relayed address, uclient's `-e`/`-r`.
    relayed: SocketAddr,
    /// Relayed addresses to permit (one CreatePermission each batch).
    permits: mpsc::UnboundedSender<Vec<SocketAddr>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Echoed>,
}

impl Echo {
    async fn start(leg: &pb::Leg, local: [u8; 4]) -> Self {
        let server = &leg.ice_servers[0];
        let relay: SocketAddr = leg.relays[0].udp_address.parse().unwrap();
        let mut turn = TurnClient {
            sock: UdpSocket::bind((IpAddr::from(local), 0)).await.unwrap(),
            relay,
            creds: Credentials::new(&server.username, &server.credential),
            nonce: Vec::new(),
            txn: 0,
        };
        let relayed = turn.allocate().await;
        let (permits, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(turn.echo(rx, stopped));
        Self {
            relayed,
            permits,
            stop,
            task,
        }
    }

    async fn stop(self) -> Echoed {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

struct TurnClient {
    sock: UdpSocket,
    relay: SocketAddr,
    creds: Credentials,
    nonce: Vec<u8>,
    txn: u64,
}

impl TurnClient {
    fn next_txn(&mut self) -> [u8; 12] {
        self.txn += 1;
        let mut t = [0x5e; 12];
        t[4..].copy_from_slice(&self.txn.to_be_bytes());
        t
    }

    /// A request of `method` with `attrs`, signed with the leg's long-term key.
    fn signed(
        &mut self,
        method: u16,
        attrs: impl FnOnce(Builder) -> Builder,
    ) -> ([u8; 12], Vec<u8>) {
        let txn = self.next_txn();
        let req = self.creds.sign(
            attrs(Builder::new(method, Kind::Request, &txn)),
            &self.nonce,
        );
        (txn, req)
    }

    async fn exchange(&self, req: &[u8], txn: &[u8; 12]) -> Vec<u8> {
        self.sock.send_to(req, self.relay).await.unwrap();
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(5), self.sock.recv_from(&mut buf))
                    .await
                    .expect("the relay answers")
                    .unwrap();
            if from == self.relay && stun::parse(&buf[..n]).is_ok_and(|m| &m.txn == txn) {
                return buf[..n].to_vec();
            }
        }
    }

    /// Allocates: an unsigned Allocate, its 401 (realm and nonce), the signed one.
    async fn allocate(&mut self) -> SocketAddr {
        let txn = self.next_txn();
        let first = Builder::new(method::ALLOCATE, Kind::Request, &txn)
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        let answer = self.exchange(first.as_bytes(), &txn).await;
        let m = stun::parse(&answer).unwrap();
        assert_eq!((m.kind, error_code(&answer)), (Kind::Error, Some(401)));
        self.nonce = m.nonce.expect("a 401 carries a nonce").to_vec();
        let (txn, req) = self.signed(method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        });
        let answer = self.exchange(&req, &txn).await;
        let m = stun::parse(&answer).unwrap();
        assert_eq!(m.kind, Kind::Success, "{:?}", error_code(&answer));
        assert!(m.verify_integrity(&self.creds.key));
        xor_attr(&answer, attr::XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS")
    }

    /// Echoes until `stop`, permitting what `permits` brings.
    async fn echo(
        mut self,
        mut permits: mpsc::UnboundedReceiver<Vec<SocketAddr>>,
        mut stop: oneshot::Receiver<()>,
    ) -> Echoed {
        let mut r = Echoed::default();
        let mut pending: HashMap<[u8; 12], usize> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(peers) = permits.recv() => {
                    let (txn, req) = self.signed(method::CREATE_PERMISSION, |b| {
                        peers.iter().fold(b, |b, p| b.xor_addr(attr::XOR_PEER_ADDRESS, *p))
                    });
                    self.sock.send_to(&req, self.relay).await.unwrap();
                    pending.insert(txn, peers.len());
                }
                got = self.sock.recv_from(&mut buf) => {
                    let (n, from) = got.unwrap();
                    if from != self.relay {
                        r.foreign += 1;
                        continue;
                    }
                    let Ok(m) = stun::parse(&buf[..n]) else {
                        r.other += 1;
                        continue;
                    };
                    if m.kind == Kind::Indication && m.method == method::DATA {
                        let (Some(peer), Some(data)) = (m.peers().next(), m.data) else {
                            r.other += 1;
                            continue;
                        };
                        let txn = self.next_txn();
                        let len = stun::write_data_indication(&mut out, &txn, peer, data);
                        out[1] = 0x16; // a Send indication is a Data indication of another method
                        self.sock.send_to(&out[..len], self.relay).await.unwrap();
                        r.echoed += 1;
                    } else if let Some(peers) = pending.remove(&m.txn) {
                        if m.kind == Kind::Success && m.verify_integrity(&self.creds.key) {
                            r.permitted += peers;
                        } else {
                            r.refused.push(format!("{:?} {:?}", m.kind, error_code(&buf[..n])));
                        }
                    } else {
                        r.other += 1;
                    }
                }
            }
        }
        r.refused
            .extend(pending.values().map(|n| format!("{n} unanswered")));
        r
    }
}

/// The relay's `turn-udp` counters.
#[derive(Debug, Default)]
struct TurnCounters {
    forwarded: f64,
    forwarded_udp: f64,
    drops: HashMap<String, f64>,
}

fn turn_counters(metrics: &str) -> TurnCounters {
    let mut c = TurnCounters::default();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let label =
            |name: &str| after(series, &format!("{name}=\"")).and_then(|r| r.split('"').next());
        if series.starts_with("veil_relay_forwarded_packets_total") {
            match label("transport") {
                Some("turn-udp") => c.forwarded += v,
                Some("udp") => c.forwarded_udp += v,
                _ => {}
            }
        } else if series.starts_with("veil_relay_dropped_packets_total")
            && label("transport") == Some("turn-udp")
            && v > 0.0
        {
            *c.drops
                .entry(label("reason").unwrap_or("?").to_string())
                .or_default() += v;
        }
    }
    c
}
