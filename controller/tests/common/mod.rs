//! Shared helpers for the controller's end-to-end tests: a `veil-controller --dev` process, a
//! gRPC client, and call participants that speak real SRTP through the relay.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Channel;
use veil_client::{Leg, LegConfig};
use veil_proto::v1 as pb;
use veil_proto::v1::session_service_client::SessionServiceClient;
use webrtc_srtp::context::Context;
use webrtc_srtp::protection_profile::ProtectionProfile;

/// A `veil-controller --dev` child process, stopped by PID on drop.
pub struct DevProcess {
    pub child: Child,
    pub ready: serde_json::Value,
    pub stderr: Arc<Mutex<Vec<u8>>>,
}

impl DevProcess {
    pub fn start(relays: usize, env: &[(&str, &str)]) -> Self {
        Self::start_with(relays, &[], env)
    }

    /// `--dev --dev-relays relays`, then `args`.
    pub fn start_with(relays: usize, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil-controller"));
        cmd.args(["--dev", "--dev-relays", &relays.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("VEIL_LOG")
            .env_remove("VEIL_LOG_FORMAT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start veil-controller --dev");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let mut pipe = child.stderr.take().unwrap();
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines
            .next()
            .expect("a line on stdout")
            .expect("readable stdout");
        let json = line
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("expected READY, got {line:?}"));
        let ready: serde_json::Value = serde_json::from_str(json).expect("READY carries JSON");
        Self {
            child,
            ready,
            stderr,
        }
    }

    pub fn controller_url(&self) -> String {
        self.ready["controller"].as_str().unwrap().to_string()
    }

    pub fn relay_udp(&self, i: usize) -> SocketAddr {
        self.ready["relays"][i]["udp"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn relay_quic(&self, i: usize) -> SocketAddr {
        self.ready["relays"][i]["quic"]
            .as_str()
            .expect("relay serves QUIC")
            .parse()
            .unwrap()
    }

    /// Sends SIGTERM and waits; returns the exit status and everything written to stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("signal our child");
        let status =
            wait_timeout(&mut self.child, Duration::from_secs(10)).expect("exits after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
        let log = String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned();
        (status, log)
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A gRPC channel to one or more controller replicas that sends each call to one of them
/// picked at random: an API test run on several replicas sends every RPC to any of them.
#[derive(Clone)]
pub struct AnyReplica {
    channels: Arc<Vec<Channel>>,
}

impl AnyReplica {
    pub async fn connect(urls: &[String]) -> Self {
        let mut channels = Vec::new();
        for url in urls {
            channels.push(
                tonic::transport::Endpoint::from_shared(url.clone())
                    .unwrap()
                    .connect()
                    .await
                    .expect("connect to controller"),
            );
        }
        Self {
            channels: Arc::new(channels),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for AnyReplica {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let i = rand::random_range(0..self.channels.len());
        let mut ch = self.channels[i].clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| tower::Service::poll_ready(&mut ch, cx)).await?;
            tower::Service::call(&mut ch, req).await
        })
    }
}

/// The public API's client, as tests use it: to one replica, or to any of several.
pub type Api = SessionServiceClient<AnyReplica>;

pub async fn client(url: &str) -> Api {
    client_any(&[url.to_string()]).await
}

/// A client that sends each RPC to a random one of `urls`.
pub async fn client_any(urls: &[String]) -> Api {
    SessionServiceClient::new(AnyReplica::connect(urls).await)
}

/// Allocates a session that must be granted; returns it.
pub async fn allocate(
    api: &mut Api,
    req: impl tonic::IntoRequest<pb::AllocateSessionRequest>,
) -> pb::Session {
    api.allocate_session(req)
        .await
        .expect("session allocated")
        .into_inner()
        .session
        .expect("the answer carries the session")
}

pub fn request(call_id: &str, n: usize) -> pb::AllocateSessionRequest {
    request_with(call_id, &vec![pb::Transport::Unspecified; n])
}

/// A request whose participant `i` prefers `transports[i]`.
pub fn request_with(call_id: &str, transports: &[pb::Transport]) -> pb::AllocateSessionRequest {
    pb::AllocateSessionRequest {
        call_id: call_id.into(),
        participants: transports
            .iter()
            .enumerate()
            .map(|(i, t)| pb::Participant {
                participant_id: format!("participant-{i}"),
                region: String::new(),
                preferred_transport: *t as i32,
            })
            .collect(),
        ttl_seconds: 0,
    }
}

/// The UDP relay addresses of a leg, primary first.
pub fn relays_of(leg: &pb::Leg) -> Vec<SocketAddr> {
    leg.relays
        .iter()
        .map(|r| r.udp_address.parse().unwrap())
        .collect()
}

/// One simulated participant: a leg bound from its own loopback address, and an SRTP key of its
/// own that only the other participants know.
pub struct Peer {
    pub leg: Leg,
    pub ssrc: u32,
    pub key: Vec<u8>,
    pub salt: Vec<u8>,
    pub tx: Context,
    pub seq: u16,
}

pub const PROFILE: ProtectionProfile = ProtectionProfile::Aes128CmHmacSha1_80;

impl Peer {
    pub async fn join(leg: &pb::Leg, local_ip: &str, ssrc: u32) -> Self {
        let local: SocketAddr = format!("{local_ip}:0").parse().unwrap();
        Self::join_config(LegConfig::from_pb(leg, local), ssrc).await
    }

    /// Encrypts and sends one RTP packet with `payload`; the send may fail (while failing
    /// over); returns the SRTP bytes.
    pub async fn try_send(&mut self, payload: &[u8]) -> std::io::Result<Bytes> {
        let rtp = rtp_packet(self.ssrc, self.seq, u32::from(self.seq) * 960, payload);
        self.seq = self.seq.wrapping_add(1);
        let srtp = self.tx.encrypt_rtp(&rtp).unwrap();
        self.leg.send(&srtp).await.map(|()| srtp)
    }

    /// Encrypts and sends one RTP packet with `payload`; returns the SRTP bytes sent.
    pub async fn send(&mut self, payload: &[u8]) -> Bytes {
        self.try_send(payload).await.unwrap()
    }

    pub fn rx_context(&self) -> Context {
        Context::new(&self.key, &self.salt, PROFILE, None, None).unwrap()
    }
}

pub fn rtp_packet(ssrc: u32, seq: u16, ts: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + payload.len());
    p.extend_from_slice(&[0x80, 111]);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn ssrc_of(srtp: &[u8]) -> u32 {
    u32::from_be_bytes(srtp[8..12].try_into().unwrap())
}

pub fn seq_of(srtp: &[u8]) -> u16 {
    u16::from_be_bytes(srtp[2..4].try_into().unwrap())
}

/// Runs a call of `peers` (already joined): each sends `count` packets; checks that every peer
/// receives every other peer's packets, from `relay` only, byte-identical, in order, and that
/// they decrypt and authenticate with the sender's key.
pub async fn exchange(peers: &mut [Peer], count: u16, relay_of: impl Fn(usize) -> SocketAddr) {
    let n = peers.len();
    let mut sent: HashMap<(u32, u16), Bytes> = HashMap::new();
    let keys: Vec<(u32, Vec<u8>, Vec<u8>)> = peers
        .iter()
        .map(|p| (p.ssrc, p.key.clone(), p.salt.clone()))
        .collect();
    for round in 0..count {
        for p in peers.iter_mut() {
            let seq = p.seq;
            let payload = format!(
                "ssrc {} packet {seq} {}",
                p.ssrc,
                "x".repeat(round as usize % 97)
            );
            let srtp = p.send(payload.as_bytes()).await;
            sent.insert((p.ssrc, seq), srtp);
        }
        if round % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for (i, p) in peers.iter_mut().enumerate() {
        let mut last_seq: HashMap<u32, u16> = HashMap::new();
        // Each receiver keeps its own SRTP contexts (replay protection is per receiver).
        let mut rx_ctx: HashMap<u32, Context> = keys
            .iter()
            .map(|(ssrc, key, salt)| (*ssrc, Context::new(key, salt, PROFILE, None, None).unwrap()))
            .collect();
        let expected = (n - 1) * count as usize;
        for k in 0..expected {
            let got = tokio::time::timeout(Duration::from_secs(5), p.leg.recv())
                .await
                .unwrap_or_else(|_| panic!("peer {i} timed out after {k} of {expected} packets"))
                .expect("leg open");
            assert_eq!(
                got.from,
                relay_of(i),
                "peer {i}: every datagram comes from the relay"
            );
            let ssrc = ssrc_of(&got.data);
            let seq = seq_of(&got.data);
            assert_ne!(ssrc, p.ssrc, "peer {i} never receives its own media");
            assert_eq!(got.data, sent[&(ssrc, seq)], "byte-identical");
            if let Some(prev) = last_seq.insert(ssrc, seq) {
                assert_eq!(seq, prev + 1, "peer {i}: in order from {ssrc}");
            }
            let plain = rx_ctx
                .get_mut(&ssrc)
                .unwrap()
                .decrypt_rtp(&got.data)
                .expect("authenticates");
            let text = String::from_utf8_lossy(&plain[12..]).into_owned();
            assert!(
                text.starts_with(&format!("ssrc {ssrc} packet {seq} ")),
                "{text}"
            );
        }
        assert_eq!(
            p.leg
                .counters()
                .foreign
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}

/// A workspace binary, built next to the test executables (`cargo test --workspace` and
/// `cargo build --workspace` build every binary before tests run).
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// Writes a key ring to a fresh file; returns its path.
pub fn key_file(keys: &veil_relay_core::KeyRing) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "veil-test-keys-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, keys.to_file_format()).unwrap();
    path
}

/// A `veil-relay` child process, stopped by PID (ours) on drop.
pub struct RelayProcess {
    pub child: Child,
    pub node_id: String,
    pub stderr: Arc<Mutex<Vec<u8>>>,
}

impl RelayProcess {
    /// Starts a relay on loopback (UDP and ops ports picked by the kernel) attached to
    /// `controllers`.
    pub fn start(
        node_id: &str,
        zone: &str,
        keys: &std::path::Path,
        controllers: &[String],
        extra: &[&str],
    ) -> Self {
        let mut child = Command::new(bin("veil-relay"))
            .args(["--node-id", node_id, "--zone", zone, "--workers", "1"])
            .args([
                "--udp-addr",
                "127.0.0.1:0",
                "--ops-addr",
                "127.0.0.1:0",
                "--report-interval-ms",
                "250",
            ])
            .arg("--key-file")
            .arg(keys)
            .args(["--controller", &controllers.join(",")])
            .args(extra)
            .env_remove("VEIL_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start veil-relay");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            node_id: node_id.to_string(),
            stderr,
        }
    }

    /// Sends `signal` to the relay (our child, by its PID).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal our child");
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_timeout(&mut self.child, limit)
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A controller in this process, on loopback.
pub struct LocalController {
    pub url: String,
    pub state: Arc<veil_controller::state::Controller>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalController {
    pub async fn start(settings: veil_controller::config::Settings) -> Self {
        let server = veil_controller::ControllerServer::load(settings)
            .await
            .unwrap();
        Self::run(server)
    }

    /// Runs a loaded server.
    pub fn run(server: veil_controller::ControllerServer) -> Self {
        let url = format!("http://{}", server.grpc_addr());
        let state = server.controller().clone();
        let (stop, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            url,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// Starts `n` replicas on loopback, peers of each other (`--peers`), with `keys`; waits
    /// until each has merged its peers' sessions.
    pub async fn start_replicas(keys: &veil_relay_core::KeyRing, n: usize) -> Vec<Self> {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let mut out = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut s = veil_controller::config::Settings::local(keys.clone());
            s.grpc_addr = *addr;
            s.replica_id = format!("controller-{i}");
            s.peers = addrs
                .iter()
                .filter(|a| *a != addr)
                .map(|a| format!("http://{a}"))
                .collect();
            out.push(Self::start(s).await);
        }
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while out
            .iter()
            .any(|c| c.state.metrics.peers_up.get() != (n - 1) as i64)
        {
            assert!(
                std::time::Instant::now() < until,
                "replicas did not connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out
    }

    /// Waits until `n` relays are up, at most 10 s.
    pub async fn wait_relays(&self, n: usize) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while self.state.registry.up() < n {
            assert!(std::time::Instant::now() < until, "relays did not attach");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// When each packet arrived, and its RTP sequence number.
pub type Arrivals = Vec<(std::time::Instant, u16)>;

/// Media that keeps flowing between two peers in the background: each sends every
/// `interval`, and every packet received is recorded with its arrival time.
pub struct Talk {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Peer, Arrivals)>>,
}

impl Talk {
    pub fn start(peers: Vec<Peer>, interval: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = peers
            .into_iter()
            .map(|mut p| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut next = tokio::time::Instant::now();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => {
                                next += interval;
                                // Sends fail while a QUIC leg fails over; the packet is lost.
                                let _ = p.try_send(b"talking").await;
                            }
                            r = p.leg.recv() => match r {
                                Some(r) => got.push((r.at, seq_of(&r.data))),
                                None => break,
                            },
                        }
                    }
                    (p, got)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops talking; returns each peer with what it received.
    pub async fn stop(self) -> Vec<(Peer, Arrivals)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap());
        }
        out
    }
}

/// The longest gap between consecutive arrivals after `from`.
pub fn longest_gap(arrivals: &[(std::time::Instant, u16)], from: std::time::Instant) -> Duration {
    let mut last = from;
    let mut worst = Duration::ZERO;
    for (at, _) in arrivals.iter().filter(|(at, _)| *at >= from) {
        worst = worst.max(at.duration_since(last));
        last = *at;
    }
    worst
}

/// A bare HTTP/1.1 GET (for the ops endpoints), returning the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of one series (name and labels, exactly as exported) in Prometheus text.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        })
        .unwrap_or_else(|| panic!("no series {series}"))
}

/// Runs the two-round bind for `token` from a plain socket, as docs/PROTOCOL.md describes;
/// returns the relay's final answer (BIND_OK or ERROR).
pub async fn raw_bind(
    sock: &tokio::net::UdpSocket,
    relay: SocketAddr,
    token: &veil_relay_core::Token,
) -> Vec<u8> {
    use veil_relay_core::wire::{self, RelayMessage};
    let mut buf = [0u8; 2048];
    sock.send_to(&wire::bind(token, [7; 8], None), relay)
        .await
        .unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let cookie: [u8; 24] = match wire::parse_relay(&buf[..n]) {
        Ok(RelayMessage::Challenge { cookie, .. }) => cookie.try_into().unwrap(),
        _ => return buf[..n].to_vec(),
    };
    sock.send_to(&wire::bind(token, [8; 8], Some(&cookie)), relay)
        .await
        .unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf[..n].to_vec()
}

/// What one participant of a [`Chat`] sent and heard.
pub struct Heard {
    pub peer: Peer,
    /// The first sequence number it sent in the chat.
    pub first: u16,
    /// Where its sequence numbers ended: it sent `first..sent`.
    pub sent: u16,
    /// Sequence numbers received, by sender SSRC (each datagram authenticated with the
    /// sender's SRTP key).
    pub got: HashMap<u32, Vec<u16>>,
    /// Datagrams that were not another participant's authentic SRTP, or came from anywhere but
    /// an allowed relay: anything here means something reached the call that should not have.
    pub bad: u64,
}

/// A call whose participants each send one SRTP packet every `interval` and check everything
/// they receive: it must come from one of `relays`, carry another participant's SSRC and
/// authenticate with that participant's key.
pub struct Chat {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Heard>>,
}

impl Chat {
    pub fn start(peers: Vec<Peer>, interval: Duration, relays: &[SocketAddr]) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let stop = Arc::new(AtomicBool::new(false));
        let keys: Vec<(u32, Vec<u8>, Vec<u8>)> = peers
            .iter()
            .map(|p| (p.ssrc, p.key.clone(), p.salt.clone()))
            .collect();
        let tasks = peers
            .into_iter()
            .map(|mut p| {
                let stop = stop.clone();
                let relays = relays.to_vec();
                let mut rx: HashMap<u32, Context> = keys
                    .iter()
                    .filter(|(ssrc, _, _)| *ssrc != p.ssrc)
                    .map(|(ssrc, key, salt)| {
                        (*ssrc, Context::new(key, salt, PROFILE, None, None).unwrap())
                    })
                    .collect();
                tokio::spawn(async move {
                    let first = p.seq;
                    let mut got: HashMap<u32, Vec<u16>> = HashMap::new();
                    let mut bad = 0u64;
                    let mut next = tokio::time::Instant::now();
                    // Once told to stop, stop sending and keep listening a moment for packets in
                    // flight.
                    let mut listen_until: Option<tokio::time::Instant> = None;
                    loop {
                        if listen_until.is_none() && stop.load(Relaxed) {
                            listen_until =
                                Some(tokio::time::Instant::now() + Duration::from_millis(400));
                        }
                        let wake = listen_until.unwrap_or(next);
                        tokio::select! {
                            _ = tokio::time::sleep_until(wake) => {
                                if listen_until.is_some() {
                                    break;
                                }
                                next += interval;
                                p.send(b"chatting").await;
                            }
                            r = p.leg.recv() => match r {
                                Some(r) => {
                                    let ok = relays.contains(&r.from)
                                        && r.data.len() >= 12
                                        && rx
                                            .get_mut(&ssrc_of(&r.data))
                                            .is_some_and(|c| c.decrypt_rtp(&r.data).is_ok());
                                    if ok {
                                        got.entry(ssrc_of(&r.data)).or_default().push(seq_of(&r.data));
                                    } else {
                                        bad += 1;
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                    bad += p.leg.counters().foreign.load(Relaxed);
                    let sent = p.seq;
                    Heard {
                        peer: p,
                        first,
                        sent,
                        got,
                        bad,
                    }
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops sending, listens 400 ms more, and returns what each participant sent and heard.
    pub async fn stop(self) -> Vec<Heard> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap());
        }
        out
    }
}

/// Packets due (each participant's packets, once to every other participant) and packets that
/// never arrived, over a whole [`Chat`]. Duplicates count once.
pub fn chat_loss(heard: &[Heard]) -> (u64, u64) {
    let (mut due, mut lost) = (0u64, 0u64);
    for (i, h) in heard.iter().enumerate() {
        for (j, other) in heard.iter().enumerate() {
            if i == j {
                continue;
            }
            let seqs: std::collections::HashSet<u16> = h
                .got
                .get(&other.peer.ssrc)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            let range = other.first..other.sent;
            assert!(
                seqs.iter().all(|s| range.contains(s)),
                "only packets that were sent in the chat arrive"
            );
            due += range.len() as u64;
            lost += (range.len() - seqs.len()) as u64;
        }
    }
    (due, lost)
}

impl Peer {
    /// Joins with a leg configuration of the test's own making (relays reordered, say).
    pub async fn join_config(cfg: LegConfig, ssrc: u32) -> Self {
        let leg = Leg::bind(cfg).await.expect("leg binds");
        let key: Vec<u8> = (0..16).map(|_| rand::random()).collect();
        let salt: Vec<u8> = (0..14).map(|_| rand::random()).collect();
        let tx = Context::new(&key, &salt, PROFILE, None, None).unwrap();
        Self {
            leg,
            ssrc,
            key,
            salt,
            tx,
            seq: 0,
        }
    }
}

/// Collects a child's standard error in the background.
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let out = sink.clone();
    let mut pipe = pipe;
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    out
}

/// A `veil-controller` child process reading `--key-file`, on a fixed gRPC port, stopped by
/// PID (ours) on drop.
pub struct ControllerProcess {
    pub child: Child,
    pub url: String,
    pub stderr: Arc<Mutex<Vec<u8>>>,
}

/// A free TCP port on 127.0.0.1 (for a server that must come back on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ControllerProcess {
    pub fn start(keys: &std::path::Path) -> Self {
        Self::start_on(keys, free_port(), &[])
    }

    /// A controller on gRPC port `port`, with `extra` flags.
    pub fn start_on(keys: &std::path::Path, port: u16, extra: &[&str]) -> Self {
        let mut child = Command::new(bin("veil-controller"))
            .arg("--key-file")
            .arg(keys)
            .args([
                "--grpc-addr",
                &format!("127.0.0.1:{port}"),
                "--ops-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env_remove("VEIL_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start veil-controller");
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stderr,
        }
    }

    /// Sends `signal` to the controller (our child, by its PID).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal our child");
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `log()` holds `needle` at least `n` times, at most 10 s.
pub async fn wait_log(log: impl Fn() -> String, needle: &str, n: usize) {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = log();
        if text.matches(needle).count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{needle:?} did not appear {n} times in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Relays up, as an operator's `ListRelays` on `url` shows them (0 while unreachable).
pub async fn relays_up(url: &str) -> usize {
    use veil_proto::v1::admin_service_client::AdminServiceClient;
    let Ok(mut admin) = AdminServiceClient::connect(url.to_string()).await else {
        return 0;
    };
    match admin.list_relays(pb::ListRelaysRequest {}).await {
        Ok(r) => r.into_inner().relays.iter().filter(|r| r.up).count(),
        Err(_) => 0,
    }
}

/// The `google.rpc.ErrorInfo` reason of a status, checking its domain; panics without one
/// (every controller error carries one).
pub fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let d = s.get_error_details();
    let info = d
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {s:?}"));
    assert_eq!(info.domain, "veil.v1", "{s:?}");
    info.reason.clone()
}

/// Waits at most `within` for a leg's status to end (`what` says whose, for the failure);
/// returns how it ended.
pub async fn ended(
    status: &mut tokio::sync::watch::Receiver<veil_client::LegStatus>,
    within: Duration,
    what: &str,
) -> veil_client::LegStatus {
    tokio::time::timeout(
        within,
        status.wait_for(|s| matches!(s, veil_client::LegStatus::Ended(_))),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: the leg did not end within {within:?}"))
    .unwrap()
    .clone()
}

/// Binds a UDP leg with `token` on `relay` alone, from `local` (`ip:port`), as a client that
/// captured or kept the token would.
pub async fn bind_udp(
    token: &[u8],
    relay: SocketAddr,
    local: &str,
) -> Result<Leg, veil_client::ClientError> {
    Leg::bind(LegConfig::udp(
        token.to_vec(),
        vec![relay],
        local.parse().unwrap(),
    ))
    .await
}

/// A session as AllocateSession answers it: GetSession's live `activity` of each leg (where
/// it is bound and what it carried, which changes as the call goes) left out, for comparing.
pub fn without_activity(mut s: pb::Session) -> pb::Session {
    for l in &mut s.legs {
        l.activity = None;
    }
    s
}
