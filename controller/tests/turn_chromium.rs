//! TURN for WebRTC apps with the WebRTC stack most users run: two headless Chromium browsers
//! (Debian's `chromium` and `chromium-driver`, installed by scripts/test.sh; without them this
//! test fails, never skips), each under its own chromedriver with a fresh profile, make a
//! relay-only call through a real two-relay cluster. Each browser gets only its own leg's
//! `ice_servers` and `iceTransportPolicy: "relay"`; the test is the signaling: it carries the
//! offer, the answer and the trickled candidates between the two pages over W3C WebDriver.
//!
//! From each browser's `getStats()`: the selected candidate pair is relay/relay, a data channel
//! echoes every message, audio from the fake microphone arrives both ways, and every remote
//! candidate is a relayed address on a Veil relay, never a socket of the other browser. From
//! each browser's own NetLog (Chromium records every datagram its network service sends and
//! receives, with the peer address; no root or capture tool needed): each browser exchanged
//! datagrams with the relays' media addresses only.
//!
//! And what Chromium does when the relay of its selected pair dies (SIGKILL of a relay process):
//! it moves to a pair through the session's other relay on its own, and audio comes back
//! (`chromium_moves_to_the_backup_relay_when_its_turn_relay_dies`; docs/RELIABILITY.md).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use veil_controller::dev::Cluster;
use veil_proto::v1 as pb;
use veil_relay_core::turn::RELAYED_PORT_BASE;
use veil_testkit::browser::{self, Browser, Options};
/// The page each browser loads; the test drives its `window.veil` functions.
const PAGE: &str = include_str!("interop/turn_call.html");
/// Data channel messages, each echoed before the next is sent.
const MESSAGES: u64 = 20;
/// Audio packets each side must receive (20 ms frames: half a second of the fake tone).
const AUDIO_PACKETS: u64 = 25;
/// The browser part of the test, from the first chromedriver to the last NetLog.
const BUDGET: Duration = Duration::from_secs(50);

/// TURN's three transports, as the `ice_servers` URLs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    /// `turn:IP:PORT?transport=udp`
    Udp,
    /// `turn:IP:PORT?transport=tcp`
    Tcp,
    /// `turns:HOST:PORT?transport=tcp`
    Tls,
}

impl Over {
    /// Whether `url` is this transport's.
    fn names(self, url: &str) -> bool {
        match self {
            Self::Udp => url.starts_with("turn:") && url.ends_with("?transport=udp"),
            Self::Tcp => url.starts_with("turn:") && url.ends_with("?transport=tcp"),
            Self::Tls => url.starts_with("turns:"),
        }
    }

    /// The relay transport's metric label.
    fn label(self) -> &'static str {
        match self {
            Self::Udp => "turn-udp",
            Self::Tcp => "turn-tcp",
            Self::Tls => "turn-tls",
        }
    }

    /// `relayProtocol` of Chromium's local relay candidates.
    fn relay_protocol(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// One call at a time: two browsers already keep both CPUs busy.
static ONE_CALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_peers_make_a_relay_only_call_through_veil_turn() {
    relay_only_call(Over::Udp).await;
}

/// The same call with each browser given only its leg's TURN over TCP URLs (as an app does on
/// a network that blocks UDP): the browsers reach the relays over TCP only, and the relays
/// relay between the two TCP allocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_peers_make_a_relay_only_call_through_veil_turn_over_tcp() {
    relay_only_call(Over::Tcp).await;
}

/// The same over TLS (`turns:`), with the relays' certificates: self-signed in the local
/// cluster, so each browser trusts exactly their public keys
/// (`--ignore-certificate-errors-spki-list`), and checks them as any TLS server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_peers_make_a_relay_only_call_through_veil_turn_over_tls() {
    relay_only_call(Over::Tls).await;
}

async fn relay_only_call(over: Over) {
    browser::require_installed();
    let _one = ONE_CALL.lock().await;
    let started = Instant::now();
    let c = Cluster::start(veil_controller::dev::Options {
        relays: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("chromium", 2)).await;
    let relays: Vec<SocketAddr> = c.relays.iter().map(|r| r.udp).collect();
    // Where each browser may connect over TCP: the relays' TURN TCP and TLS ports.
    let relay_streams: Vec<SocketAddr> = c
        .relays
        .iter()
        .flat_map(|r| [r.turn_tcp, r.turn_tls.as_ref().map(|a| a.parse().unwrap())])
        .flatten()
        .collect();
    for leg in &s.legs {
        assert_eq!(leg.ice_servers.len(), 2, "{leg:?}");
        for (server, relay) in leg.ice_servers.iter().zip(&leg.relays) {
            let by_id = c
                .relays
                .iter()
                .find(|r| r.udp.to_string() == relay.udp_address)
                .unwrap();
            assert_eq!(
                server.urls,
                vec![
                    format!("turn:{}?transport=udp", relay.udp_address),
                    format!("turn:{}?transport=tcp", by_id.turn_tcp.unwrap()),
                    format!("turns:{}?transport=tcp", by_id.turn_tls.as_ref().unwrap()),
                ]
            );
        }
    }
    let spki: Vec<String> = c
        .relays
        .iter()
        .filter_map(|r| r.turn_tls_spki.clone())
        .collect();
    let extra_args = match over {
        Over::Tls => vec![format!(
            "--ignore-certificate-errors-spki-list={}",
            spki.join(",")
        )],
        Over::Udp | Over::Tcp => Vec::new(),
    };

    let (page, server) = serve_page().await;
    let servers = [ice_servers(&s.legs[0], over), ice_servers(&s.legs[1], over)];
    let page_addr: SocketAddr = page
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let outcome = tokio::task::spawn_blocking(move || drive(page, servers, extra_args))
        .await
        .unwrap();
    server.abort();
    let counters = relay_counters(&c).await;
    let call = match outcome {
        Ok(call) => call,
        Err(e) => {
            panic!("the Chromium call over {over:?} failed: {e}\nrelay counters: {counters:#?}")
        }
    };
    eprintln!(
        "chromium call over {over:?}: connected {:?} after the offer, {:?} in all; relay counters: {counters:?}",
        call.connected_after, call.browsers_took
    );

    assert_eq!(call.echoed, MESSAGES);
    for (side, other) in [(0, 1), (1, 0)] {
        let r = &call.reports[side];
        let name = SIDES[side];
        // One bundled transport, and its selected pair runs relay to relay.
        let transports = r["transports"].as_array().unwrap();
        assert!(!transports.is_empty(), "{name}: {r}");
        for t in transports {
            assert_eq!(
                (t["local"]["type"].as_str(), t["remote"]["type"].as_str()),
                (Some("relay"), Some("relay")),
                "{name}'s selected pair: {t}"
            );
            assert_eq!(t["dtlsState"], "connected", "{name}: {t}");
            assert_eq!(
                t["local"]["relayProtocol"].as_str(),
                Some(over.relay_protocol()),
                "{name} reaches its relay over {over:?}: {t}"
            );
            // Its local end is an allocation on one of its own leg's TURN servers, its remote
            // end one of the other browser's allocations.
            let own_urls: Vec<&str> = s.legs[side]
                .ice_servers
                .iter()
                .flat_map(|x| x.urls.iter().map(String::as_str))
                .filter(|u| over.names(u))
                .collect();
            assert!(
                t["local"]["url"]
                    .as_str()
                    .is_some_and(|u| own_urls.contains(&u)),
                "{name}'s selected pair: {t}, its servers {own_urls:?}"
            );
            let theirs: Vec<SocketAddr> = call.reports[other]["localCandidates"]
                .as_array()
                .unwrap()
                .iter()
                .map(candidate_addr)
                .collect();
            assert!(
                theirs.contains(&candidate_addr(&t["remote"])),
                "{name}'s selected pair: {t}, the {}'s candidates {theirs:?}",
                SIDES[other]
            );
        }
        // Only relay candidates in either description.
        for sdp in [&r["localSdp"], &r["remoteSdp"]] {
            for line in sdp.as_str().unwrap().lines() {
                if line.starts_with("a=candidate") {
                    assert!(line.contains(" typ relay"), "{name}: {line}");
                }
            }
        }
        // Every remote candidate it learned, and the remote end of every pair it formed, is a
        // relayed address on one of the relays (the relay's IP, a relayed port), never a socket
        // of the other browser.
        let remotes: Vec<&Value> = r["remoteCandidates"]
            .as_array()
            .unwrap()
            .iter()
            .chain(r["pairs"].as_array().unwrap().iter().map(|p| &p["remote"]))
            .collect();
        assert!(!remotes.is_empty(), "{name}: {r}");
        for cand in remotes {
            assert_eq!(cand["type"], "relay", "{name}: {cand}");
            let addr = candidate_addr(cand);
            assert!(
                relays.iter().any(|x| x.ip() == addr.ip()),
                "{name} learned {addr}, not on a relay {relays:?}"
            );
            assert!(
                addr.port() >= RELAYED_PORT_BASE && addr.port().is_multiple_of(2),
                "{name} learned {addr}, not a relayed port"
            );
            assert!(
                !call.net[other].locals.contains(&addr),
                "{name} learned {addr}, a socket of the {}",
                SIDES[other]
            );
        }
        // Audio from the fake microphone arrived (headless Chromium plays nothing out, so its
        // totalAudioEnergy stays 0: packets are the measure).
        let received: u64 = r["inbound"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "audio")
            .map(|s| s["packetsReceived"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            received >= AUDIO_PACKETS,
            "{name} got {received} audio packets: {r}"
        );

        // What the browser's network service itself saw: datagrams to and from the relays'
        // media addresses only, TCP connections to the page and the relays' TURN TCP and TLS
        // ports only, and plenty of traffic over the transport the call uses.
        let net = &call.net[side];
        let strangers: Vec<_> = net.peers.keys().filter(|a| !relays.contains(a)).collect();
        assert!(
            strangers.is_empty(),
            "{name} exchanged datagrams with {strangers:?}, not only relays {relays:?}: {net:?}"
        );
        assert_eq!(net.unaddressed, 0, "{name}: {net:?}");
        let tcp_strangers: Vec<_> = net
            .tcp
            .keys()
            .filter(|a| **a != page_addr && !relay_streams.contains(a))
            .collect();
        assert!(
            tcp_strangers.is_empty(),
            "{name} connected to {tcp_strangers:?}, not only the page and the relays \
             {relay_streams:?}: {net:?}"
        );
        let (sent, got) = match over {
            Over::Udp => net
                .peers
                .values()
                .fold((0, 0), |(s, g), (a, b)| (s + a, g + b)),
            // Bytes over the relays' stream ports, in audio packets of at least 40 bytes.
            Over::Tcp | Over::Tls => net
                .tcp
                .iter()
                .filter(|(a, _)| relay_streams.contains(a))
                .fold((0, 0), |(s, g), (_, (a, b))| (s + a / 40, g + b / 40)),
        };
        assert!(
            sent >= AUDIO_PACKETS && got >= AUDIO_PACKETS,
            "{name}'s NetLog holds {sent} and {got} (datagrams, or 40-byte units over TCP) \
             sent and received: {net:?}"
        );
        eprintln!(
            "{name}: selected {} -> {}; {received} audio packets in; NetLog: {:?} {:?}",
            transports[0]["local"], transports[0]["remote"], net.peers, net.tcp
        );
    }
    // The relays carried the call as TURN.
    let turn: u64 = counters
        .iter()
        .filter(|(k, _)| {
            k.starts_with("forwarded") && k.contains(&format!("transport=\"{}\"", over.label()))
        })
        .map(|(_, v)| v)
        .sum();
    assert!(turn > 2 * AUDIO_PACKETS, "{counters:?}");
    eprintln!("whole test: {:?}", started.elapsed());
}

const SIDES: [&str; 2] = ["caller", "callee"];

/// A leg's `ice_servers` as the W3C `RTCIceServer` list the page passes to the browser, with
/// only the URLs of one transport (as an app that must avoid UDP would filter them).
fn ice_servers(leg: &pb::Leg, over: Over) -> Value {
    leg.ice_servers
        .iter()
        .map(|s| {
            let urls: Vec<&String> = s.urls.iter().filter(|u| over.names(u)).collect();
            json!({"urls": urls, "username": s.username, "credential": s.credential})
        })
        .collect()
}

fn candidate_addr(cand: &Value) -> SocketAddr {
    let ip: IpAddr = cand["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("a candidate without an IP address: {cand}"));
    SocketAddr::new(ip, cand["port"].as_u64().unwrap() as u16)
}

/// Serves the page at `http://127.0.0.1:PORT/` (a secure context, so `getUserMedia` works),
/// until the task is aborted.
async fn serve_page() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let (status, body) = match head.split_whitespace().nth(1) {
                    Some("/") => ("200 OK", PAGE),
                    _ => ("404 Not Found", "not found"),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                // The browser may have gone away; nothing to do about it here.
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (url, task)
}

/// What the call showed, once both browsers have quit.
struct Call {
    /// Each side's `veil.report()`: getStats, descriptions and the page's event log.
    reports: [Value; 2],
    /// Each side's UDP and TCP traffic, from its NetLog.
    net: [NetLog; 2],
    echoed: u64,
    connected_after: Duration,
    browsers_took: Duration,
}

/// Runs the call in two fresh browsers; returns what it showed, or why it failed (with both
/// pages' event logs, and where the NetLogs were kept).
fn drive(page: String, servers: [Value; 2], extra_args: Vec<String>) -> Result<Call, String> {
    let deadline = Instant::now() + BUDGET;
    let start = Instant::now();
    let options = Options {
        net_log: true,
        args: extra_args,
    };
    let mut browsers = [
        Browser::launch(SIDES[0], options.clone())?,
        Browser::launch(SIDES[1], options)?,
    ];
    let result = (|| -> Result<_, String> {
        let offered = connect(&browsers, &page, &servers, deadline)?;
        let connected_after = offered.elapsed();
        let [caller, callee] = &browsers;
        let echoed = call(caller, "echo", json!([MESSAGES]), deadline)?["echoed"]
            .as_u64()
            .unwrap_or(0);
        for b in &browsers {
            call(b, "audio", json!([AUDIO_PACKETS, 10000]), deadline)?;
        }
        let reports = [
            call(caller, "report", json!([]), deadline)?,
            call(callee, "report", json!([]), deadline)?,
        ];
        Ok((reports, echoed, connected_after))
    })();
    let (reports, echoed, connected_after) = match result {
        Ok(x) => x,
        Err(e) => {
            // The pages' own account of what happened, then what each browser sent and got
            // (datagram sizes tell STUN methods apart: Chromium's first Allocate is 28 bytes).
            let mut msg = e;
            let until = Instant::now() + Duration::from_secs(5);
            for b in &mut browsers {
                let report = call(b, "report", json!([]), until);
                let report = report.map(|r| {
                    json!({"connection": r["connectionState"], "pairs": r["pairs"],
                           "events": r["events"]})
                });
                msg += &format!("\n{}: {report:?}", b.name);
                b.keep = true;
                let net = b.quit().and_then(|()| read_netlog(&b.net_log()));
                msg += &format!(
                    "\n{} datagrams: {:?}",
                    b.name,
                    net.map(|u| (u.sizes, u.tcp))
                );
                msg += &format!("\n{} NetLog kept at {}", b.name, b.net_log().display());
                msg += &format!("\n{} chromedriver: {}", b.name, b.driver_log());
            }
            return Err(msg);
        }
    };
    // Quitting closes both peer connections (Chromium releases its allocations) and makes
    // each browser finish its NetLog.
    let mut net = Vec::new();
    for b in &mut browsers {
        b.quit()?;
        net.push(read_netlog(&b.net_log())?);
    }
    Ok(Call {
        reports,
        net: net.try_into().unwrap(),
        echoed,
        connected_after,
        browsers_took: start.elapsed(),
    })
}

/// Opens the page in both browsers, each with its own `ice_servers`, and connects them: the
/// caller's offer, the callee's answer, candidates trickled until both are connected (at most
/// 15 s). Returns when the offer was made.
fn connect(
    browsers: &[Browser; 2],
    page: &str,
    servers: &[Value; 2],
    deadline: Instant,
) -> Result<Instant, String> {
    for (b, s) in browsers.iter().zip(servers) {
        b.open(page)?;
        call(b, "start", json!([s, b.name == SIDES[0]]), deadline)?;
    }
    let [caller, callee] = browsers;
    let offer = call(caller, "offer", json!([]), deadline)?;
    let offered = Instant::now();
    let answer = call(callee, "answer", json!([offer]), deadline)?;
    call(caller, "accept", json!([answer]), deadline)?;
    trickle(
        browsers,
        deadline.min(Instant::now() + Duration::from_secs(15)),
    )?;
    Ok(offered)
}

/// Carries each side's candidates to the other as they are gathered, until both are connected
/// (or one fails, or `until`).
fn trickle(browsers: &[Browser; 2], until: Instant) -> Result<(), String> {
    loop {
        let states = [
            call(&browsers[0], "take", json!([]), until)?,
            call(&browsers[1], "take", json!([]), until)?,
        ];
        for (from, to) in [(0, 1), (1, 0)] {
            let candidates = &states[from]["candidates"];
            if candidates.as_array().is_some_and(|c| !c.is_empty()) {
                call(&browsers[to], "add", json!([candidates]), until)?;
            }
        }
        if states.iter().all(|s| s["connection"] == "connected") {
            return Ok(());
        }
        if let Some(s) = states
            .iter()
            .find(|s| s["connection"] == "failed" || s["connection"] == "closed")
        {
            return Err(format!("connection {}: {states:?}", s["connection"]));
        }
        if Instant::now() >= until {
            return Err(format!("not connected in time: {states:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `veil.<func>(...args)` in `b`'s page and waits for its promise (at most until
/// `deadline`, and the script timeout); returns what it resolved to.
fn call(b: &Browser, func: &str, args: Value, deadline: Instant) -> Result<Value, String> {
    const SCRIPT: &str = "const done = arguments[arguments.length - 1];
        Promise.resolve()
          .then(() => window.veil[arguments[0]](...arguments[1]))
          .then((v) => done({ ok: v === undefined ? null : v }),
                (e) => done({ err: String((e && e.stack) || e) }));";
    let v = b
        .execute_async(SCRIPT, json!([func, args]), deadline)
        .map_err(|e| format!("veil.{func}: {e}"))?;
    match v.get("ok") {
        Some(ok) => Ok(ok.clone()),
        None => Err(format!("{}: veil.{func} failed: {}", b.name, v["err"])),
    }
}

/// A browser's UDP and TCP traffic as its NetLog recorded it.
#[derive(Debug, Default)]
struct NetLog {
    /// TCP bytes (sent, received), by the address each connection went to.
    tcp: BTreeMap<SocketAddr, (u64, u64)>,
    /// Datagrams (sent, received), by the peer's address.
    peers: BTreeMap<SocketAddr, (u64, u64)>,
    /// Datagrams sent or received on a socket with no peer address known.
    unaddressed: u64,
    /// Every local address a UDP socket of the browser had.
    locals: BTreeSet<SocketAddr>,
    /// Datagrams by direction, peer and size ("to 127.0.0.1:4000 28 B").
    sizes: BTreeMap<String, u64>,
}

/// Reads a NetLog file: the constants on the first line, then one event a line (a NetLog cut
/// short by a crash still reads up to its last whole line).
fn read_netlog(path: &Path) -> Result<NetLog, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let constants: Value = lines
        .next()
        .and_then(|l| l.strip_prefix(r#"{"constants":"#))
        .and_then(|l| serde_json::from_str(l.trim_end_matches(',')).ok())
        .ok_or_else(|| format!("{}: no NetLog constants", path.display()))?;
    let kind = |name: &str| {
        constants["logEventTypes"][name]
            .as_u64()
            .ok_or_else(|| format!("NetLog has no event type {name}"))
    };
    let (sent, received) = (kind("UDP_BYTES_SENT")?, kind("UDP_BYTES_RECEIVED")?);
    let (connect, local) = (kind("UDP_CONNECT")?, kind("UDP_LOCAL_ADDRESS")?);
    let tcp_connect = kind("TCP_CONNECT_ATTEMPT")?;
    let (tcp_sent, tcp_received) = (kind("SOCKET_BYTES_SENT")?, kind("SOCKET_BYTES_RECEIVED")?);
    let mut log = NetLog::default();
    let mut connected: HashMap<u64, SocketAddr> = HashMap::new();
    let mut tcp_connected: HashMap<u64, SocketAddr> = HashMap::new();
    for line in lines {
        let Ok(e) = serde_json::from_str::<Value>(line.trim_end_matches(',')) else {
            continue;
        };
        let (Some(t), Some(source)) = (e["type"].as_u64(), e["source"]["id"].as_u64()) else {
            continue;
        };
        let addr = e["params"]["address"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok());
        if t == tcp_connect {
            if let Some(a) = addr {
                tcp_connected.insert(source, a);
                log.tcp.entry(a).or_default();
            }
        } else if t == tcp_sent || t == tcp_received {
            // A TCP socket's bytes, on the source its connect attempt was logged on.
            let bytes = e["params"]["byte_count"].as_u64().unwrap_or(0);
            let peer = tcp_connected.get(&source).copied();
            let n = log
                .tcp
                .entry(peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))))
                .or_default();
            if t == tcp_sent {
                n.0 += bytes;
            } else {
                n.1 += bytes;
            }
        } else if t == connect {
            if let Some(a) = addr {
                connected.insert(source, a);
            }
        } else if t == local {
            log.locals.extend(addr);
        } else if t == sent || t == received {
            let dir = if t == sent { "to" } else { "from" };
            let size = &e["params"]["byte_count"];
            let peer = addr.or_else(|| connected.get(&source).copied());
            let key = format!(
                "{dir} {} {size} B",
                peer.map_or("?".into(), |p| p.to_string())
            );
            *log.sizes.entry(key).or_default() += 1;
            match peer {
                Some(peer) => {
                    let n = log.peers.entry(peer).or_default();
                    if t == sent {
                        n.0 += 1;
                    } else {
                        n.1 += 1;
                    }
                }
                None => log.unaddressed += 1,
            }
        }
    }
    Ok(log)
}

/// Every non-zero forwarded and dropped packet counter of the cluster's relays, summed over
/// relays, by label set.
async fn relay_counters(c: &Cluster) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for relay in &c.relays {
        let text = http_get(relay.metrics, "/metrics").await;
        for line in text.lines() {
            let Some(rest) = line
                .strip_prefix("veil_relay_forwarded_packets_total")
                .map(|r| ("forwarded", r))
                .or_else(|| {
                    line.strip_prefix("veil_relay_dropped_packets_total")
                        .map(|r| ("dropped", r))
                })
            else {
                continue;
            };
            let Some((labels, value)) = rest.1.rsplit_once(' ') else {
                continue;
            };
            let v = value.parse::<f64>().unwrap_or(0.0) as u64;
            if v > 0 {
                *out.entry(format!("{}{labels}", rest.0)).or_default() += v;
            }
        }
    }
    out
}

/// What Chromium does when the relay its call runs through dies: each browser has both relays
/// of the session in its `ice_servers` (the controller lists the primary and the backup), so
/// it gathered a relay candidate on each and checked the pairs between them when the call
/// started. The relay of the caller's selected pair is SIGKILLed (relay processes, so the kill
/// is real); nothing in the page reacts (no ICE restart, no new offer). Chromium notices that
/// the selected pair stopped receiving, switches to a pair through the surviving relay on its
/// own, and audio flows again: the test asserts that, within `RESUME_WITHIN`, through the other
/// relay, and reports each side's longest gap in audio packets (sampled in the page every
/// 20 ms) for docs/RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_moves_to_the_backup_relay_when_its_turn_relay_dies() {
    browser::require_installed();
    let _one = ONE_CALL.lock().await;
    let keys = veil_controller::dev::generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(veil_controller::config::Settings::local(keys)).await;
    let relays: Vec<RelayProcess> = [("relay-a", "zone-a"), ("relay-b", "zone-b")]
        .iter()
        .map(|(id, zone)| {
            RelayProcess::start(id, zone, &kf, std::slice::from_ref(&controller.url), &[])
        })
        .collect();
    controller.wait_relays(2).await;
    let mut api = client(&controller.url).await;
    let s = allocate(&mut api, request("chromium-relay-loss", 2)).await;
    assert_eq!(s.relays.len(), 2, "{s:?}");
    let servers = [
        ice_servers(&s.legs[0], Over::Udp),
        ice_servers(&s.legs[1], Over::Udp),
    ];
    let by_addr: Vec<(SocketAddr, String)> = s
        .relays
        .iter()
        .map(|r| (r.udp_address.parse().unwrap(), r.node_id.clone()))
        .collect();
    let (page, server) = serve_page().await;
    let outcome = tokio::task::spawn_blocking(move || {
        let r = drive_relay_loss(page, servers, &relays, &by_addr);
        (r, relays)
    })
    .await
    .unwrap();
    server.abort();
    let (outcome, relays) = outcome;
    let logs: Vec<String> = relays
        .iter()
        .map(|r| String::from_utf8_lossy(&r.stderr.lock().unwrap()).into_owned())
        .collect();
    drop(relays);
    controller.stop().await;
    std::fs::remove_file(kf).ok();
    let lost = match outcome {
        Ok(l) => l,
        Err(e) => panic!("{e}\nrelay logs: {logs:#?}"),
    };
    for (side, gap, resumed, pair) in &lost.sides {
        eprintln!(
            "chromium relay loss: {} killed; {side}: longest audio gap {gap:.0} ms, audio back \
             {resumed:.0} ms after the kill, now through {pair}",
            lost.victim
        );
    }
}

/// Longest wait for audio through the surviving relay after the kill.
const RESUME_WITHIN: Duration = Duration::from_secs(10);

struct RelayLoss {
    /// The relay killed.
    victim: String,
    /// Per side: the longest gap between audio packets from the kill on (ms), when audio came
    /// back (ms after the kill), and the relay of the selected pair after it.
    sides: Vec<(&'static str, f64, f64, String)>,
}

/// Which relay a selected pair's local relay candidate is on, by its TURN server URL.
fn relay_of(t: &Value, by_addr: &[(SocketAddr, String)]) -> Option<String> {
    let url = t["local"]["url"].as_str()?;
    let addr = url
        .strip_prefix("turn:")?
        .split('?')
        .next()?
        .parse::<SocketAddr>()
        .ok()?;
    by_addr
        .iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, id)| id.clone())
}

fn drive_relay_loss(
    page: String,
    servers: [Value; 2],
    relays: &[RelayProcess],
    by_addr: &[(SocketAddr, String)],
) -> Result<RelayLoss, String> {
    let deadline = Instant::now() + BUDGET + RESUME_WITHIN;
    let browsers = [
        Browser::launch(SIDES[0], Options::default())?,
        Browser::launch(SIDES[1], Options::default())?,
    ];
    let result = (|| -> Result<RelayLoss, String> {
        connect(&browsers, &page, &servers, deadline)?;
        let [caller, _] = &browsers;
        for b in &browsers {
            call(b, "audio", json!([AUDIO_PACKETS, 10000]), deadline)?;
        }
        // Both relays gathered on both sides: the backup pairs exist before the loss.
        let before = call(caller, "report", json!([]), deadline)?;
        let relays_gathered: BTreeSet<String> = before["localCandidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| relay_of(&json!({ "local": c }), by_addr))
            .collect();
        if relays_gathered.len() != 2 {
            return Err(format!(
                "the caller gathered on {relays_gathered:?}, not both relays: {before}"
            ));
        }
        let victim = relay_of(&before["transports"][0], by_addr)
            .ok_or_else(|| format!("the caller's selected pair is on no relay: {before}"))?;
        for b in &browsers {
            call(b, "watch", json!([]), deadline)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        // The page clocks at the kill (each side's performance.now()).
        let kill_ms: Vec<f64> = browsers
            .iter()
            .map(|b| {
                call(b, "timeline", json!([]), deadline).map(|t| t["now_ms"].as_f64().unwrap())
            })
            .collect::<Result<_, _>>()?;
        relays
            .iter()
            .find(|r| r.node_id == victim)
            .expect("the victim is one of ours")
            .signal(nix::sys::signal::Signal::SIGKILL);
        let killed = Instant::now();
        // Until both sides have had a second of audio again, or the limit.
        let mut sides = Vec::new();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            sides.clear();
            for (i, b) in browsers.iter().enumerate() {
                let t = call(b, "timeline", json!([]), deadline)?;
                let samples: Vec<(f64, u64)> = t["samples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| (s["t_ms"].as_f64().unwrap(), s["packets"].as_u64().unwrap()))
                    .filter(|s| s.0 >= kill_ms[i])
                    .collect();
                // The times at which new packets had arrived.
                let arrivals: Vec<f64> = samples
                    .windows(2)
                    .filter(|w| w[1].1 > w[0].1)
                    .map(|w| w[1].0)
                    .collect();
                let mut gap: f64 = 0.0;
                let mut prev = kill_ms[i];
                let mut resumed = None;
                for &a in &arrivals {
                    if a - prev > gap {
                        gap = a - prev;
                        resumed = Some(a - kill_ms[i]);
                    }
                    prev = a;
                }
                let back = resumed.is_some_and(|r| kill_ms[i] + r + 1000.0 < prev);
                sides.push((i, gap, resumed.unwrap_or(f64::NAN), back));
            }
            if sides.iter().all(|s| s.3) {
                break;
            }
            if killed.elapsed() > RESUME_WITHIN {
                let reports: Vec<Value> = browsers
                    .iter()
                    .map(|b| call(b, "report", json!([]), deadline).unwrap_or_default())
                    .map(|r| {
                        json!({"connection": r["connectionState"], "transports": r["transports"],
                                    "pairs": r["pairs"], "events": r["events"]})
                    })
                    .collect();
                return Err(format!(
                    "audio did not come back on both sides within {RESUME_WITHIN:?} of killing \
                     {victim} (per side: index, longest gap, back at, whether back): {sides:?}; \
                     {reports:?}"
                ));
            }
        }
        let mut out = RelayLoss {
            victim: victim.clone(),
            sides: Vec::new(),
        };
        for (i, gap, resumed, _) in sides {
            let r = call(&browsers[i], "report", json!([]), deadline)?;
            let now = relay_of(&r["transports"][0], by_addr)
                .ok_or_else(|| format!("{}: selected pair on no relay: {r}", SIDES[i]))?;
            if now == victim {
                return Err(format!(
                    "{}: audio back, but still through {victim}: {r}",
                    SIDES[i]
                ));
            }
            out.sides.push((SIDES[i], gap, resumed, now));
        }
        Ok(out)
    })();
    for mut b in browsers {
        let _ = b.quit();
    }
    result
}
