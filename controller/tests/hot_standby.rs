//! Hot standby (`LegConfig::hot_standby`): a UDP leg kept bound on the session's backup relay
//! switches there with no bind round trip when its relay dies or drains, and the other
//! participants follow it. Real relay processes, a real controller, SRTP media every 10 ms.
//!
//! The target is a media gap under 300 ms; on loopback detection takes 200 ms of
//! silence (`dead_after`) and the switch nothing more, so these tests bound the gap at 300 ms
//! and leave the rest of a noisy machine's margin to the network-namespace chaos runs
//! (`deploy/tests/chaos_netns.py`), which measure it over many kills.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use veil_client::LegConfig;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_proto::v1 as pb;

struct Cluster {
    controller: LocalController,
    relays: Vec<RelayProcess>,
    kf: std::path::PathBuf,
}

impl Cluster {
    /// The relay process with this node id.
    fn relay(&self, node_id: &str) -> &RelayProcess {
        self.relays.iter().find(|r| r.node_id == node_id).unwrap()
    }

    async fn stop(self) {
        drop(self.relays);
        self.controller.stop().await;
        std::fs::remove_file(self.kf).ok();
    }
}

async fn cluster(extra: &[&str]) -> Cluster {
    let keys = generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(Settings::local(keys)).await;
    let relays = ["relay-a", "relay-b"]
        .iter()
        .zip(["zone-a", "zone-b"])
        .map(|(id, zone)| {
            RelayProcess::start(id, zone, &kf, std::slice::from_ref(&controller.url), extra)
        })
        .collect();
    controller.wait_relays(2).await;
    Cluster {
        controller,
        relays,
        kf,
    }
}

/// Participants on hot standby legs over `transports`, talking; returns once every standby is
/// bound. The first participant reaches the primary relay through `path` if given (a path the
/// test can cut).
async fn call_over(
    api: &mut Api,
    id: &str,
    transports: &[pb::Transport],
    path: Option<&Path>,
) -> (pb::Session, Talk) {
    let s = allocate(api, request_with(id, transports)).await;
    assert_eq!(s.relays.len(), 2);
    let mut peers = Vec::new();
    for (i, leg) in s.legs.iter().enumerate() {
        let local = format!("127.0.0.{}:0", i + 2).parse().unwrap();
        let mut cfg = LegConfig::from_pb(leg, local).hot_standby();
        if let (0, Some(path)) = (i, path) {
            cfg.relays[0].udp = path.start(cfg.relays[0].udp).await;
        }
        peers.push(Peer::join_config(cfg, i as u32 + 1).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while peers.iter().any(|p| p.leg.standby_index() != Some(1)) {
        assert!(Instant::now() < deadline, "standby legs bind on the backup");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (s, Talk::start(peers, Duration::from_millis(10)))
}

/// Relays serving QUIC too.
const QUIC: [&str; 3] = ["--quic-addr", "127.0.0.1:0", "--quic-self-signed"];

/// QUIC legs on hot standby: a second connection bound on the backup; a SIGKILLed relay costs
/// the QUIC idle timeout (150 ms here: quinn holds it to at least three probe timeouts, well
/// under that on loopback) and no handshake or bind; a drain moves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_legs_on_hot_standby_switch_with_no_handshake() {
    let c = cluster(&QUIC).await;
    // Mixed: a QUIC leg and a UDP leg in one call.
    let legs = [pb::Transport::Quic, pb::Transport::Quic, pb::Transport::Udp];
    let (got, killed_at) = signal_primary(&c, "hot-quic-kill", &legs, Signal::SIGKILL).await;
    assert_switched_after_kill(got, killed_at);
    c.stop().await;

    let c = cluster(&[&QUIC[..], &["--drain-deadline-secs", "0"]].concat()).await;
    let legs = [pb::Transport::Quic, pb::Transport::Quic];
    let (got, drained_at) = signal_primary(&c, "hot-quic-drain", &legs, Signal::SIGTERM).await;
    for (peer, _) in assert_moved_at_once(got, drained_at) {
        assert_eq!(peer.leg.counters().binds.load(Relaxed), 1);
    }
    c.stop().await;
}

/// Starts a call of hot standby legs over `transports`, sends `signal` to its primary relay
/// (after 500 ms of media for a SIGKILL, 300 ms for a drain's SIGTERM) and lets the call run
/// on (2 s, 1 s); returns what each participant received, and when the signal went.
async fn signal_primary(
    c: &Cluster,
    id: &str,
    transports: &[pb::Transport],
    signal: Signal,
) -> (Vec<(Peer, Arrivals)>, Instant) {
    let kill = signal == Signal::SIGKILL;
    let mut api = client(&c.controller.url).await;
    let (s, talk) = call_over(&mut api, id, transports, None).await;
    tokio::time::sleep(Duration::from_millis(if kill { 500 } else { 300 })).await;
    c.relay(&s.relays[0].node_id).signal(signal);
    let at = Instant::now();
    tokio::time::sleep(Duration::from_secs(if kill { 2 } else { 1 })).await;
    (talk.stop().await, at)
}

/// Every participant of a call whose primary was SIGKILLed at `killed_at`: media back within
/// 300 ms, on the backup, with no bind at the switch (one bind, one standby bind), one switch,
/// and nothing from a foreign address.
fn assert_switched_after_kill(
    got: Vec<(Peer, Arrivals)>,
    killed_at: Instant,
) -> Vec<(Peer, Arrivals)> {
    for (i, (peer, got)) in got.iter().enumerate() {
        let gap = longest_gap(got, killed_at);
        eprintln!(
            "participant {i} ({:?}): longest gap after the kill: {gap:?}",
            peer.leg.transport()
        );
        assert!(
            gap < Duration::from_millis(300),
            "participant {i}: media stopped for {gap:?} after the relay died"
        );
        assert_eq!(peer.leg.relay_index(), 1, "participant {i} on the backup");
        let counters = peer.leg.counters();
        assert_eq!(
            counters.binds.load(Relaxed),
            1,
            "participant {i}: no bind at the switch"
        );
        assert_eq!(counters.standby_binds.load(Relaxed), 1);
        assert_eq!(
            counters.failovers.load(Relaxed),
            1,
            "participant {i}: one switch, no flapping"
        );
        assert_eq!(counters.foreign.load(Relaxed), 0);
    }
    got
}

/// Every participant of a call whose primary started draining at `drained_at`: on the backup,
/// with a gap under 100 ms (a drain's CLOSE leaves no silence to wait out).
fn assert_moved_at_once(got: Vec<(Peer, Arrivals)>, drained_at: Instant) -> Vec<(Peer, Arrivals)> {
    for (i, (peer, got)) in got.iter().enumerate() {
        let gap = longest_gap(got, drained_at);
        eprintln!(
            "participant {i} ({:?}): longest gap after the drain: {gap:?}",
            peer.leg.transport()
        );
        assert!(
            gap < Duration::from_millis(100),
            "participant {i}: a drain is a switch with no silence to wait out: {gap:?}"
        );
        assert_eq!(peer.leg.relay_index(), 1, "participant {i} on the backup");
    }
    got
}

/// A UDP path to a relay that the test can cut: datagrams cross it both ways until `cut`,
/// each `delay` late.
#[derive(Default)]
struct Path {
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    delay: Duration,
}

impl Path {
    /// Starts forwarding between a new loopback address and `relay`; returns the new address.
    async fn start(&self, relay: std::net::SocketAddr) -> std::net::SocketAddr {
        let outer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let inner = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = outer.local_addr().unwrap();
        let cut = self.cut.clone();
        let delay = self.delay;
        let (outer, inner) = (std::sync::Arc::new(outer), std::sync::Arc::new(inner));
        // Sends `pkt` from `sock` to `to` after the path's delay.
        let later = move |sock: &std::sync::Arc<tokio::net::UdpSocket>, pkt: &[u8], to| {
            let (sock, pkt) = (sock.clone(), pkt.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = sock.send_to(&pkt, to).await;
            });
        };
        tokio::spawn(async move {
            let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = outer.recv_from(&mut a) => {
                        client = Some(from);
                        if !cut.load(Relaxed) {
                            later(&inner, &a[..n], relay);
                        }
                    }
                    Ok((n, _)) = inner.recv_from(&mut b) => {
                        if let (Some(c), false) = (client, cut.load(Relaxed)) {
                            later(&outer, &b[..n], c);
                        }
                    }
                }
            }
        });
        addr
    }

    fn cut(&self) {
        self.cut.store(true, Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_costs_a_hot_standby_leg_under_300_ms_and_no_bind() {
    let c = cluster(&[]).await;
    let legs = [pb::Transport::Udp; 3];
    let (got, killed_at) = signal_primary(&c, "hot-kill", &legs, Signal::SIGKILL).await;
    for (_, got) in assert_switched_after_kill(got, killed_at) {
        assert!(
            got.last().unwrap().0 > killed_at + Duration::from_millis(1500),
            "media flows on the backup"
        );
    }
    c.stop().await;
}

/// A participant cut off from its relay (the others still reach it) switches to the standby;
/// the others follow the first media that reaches them through the standby, so the call does
/// not stay split across two relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_others_follow_the_first_to_switch() {
    let c = cluster(&[]).await;
    let mut api = client(&c.controller.url).await;
    let path = Path::default();
    let legs = [pb::Transport::Udp; 3];
    let (_s, talk) = call_over(&mut api, "hot-follow", &legs, Some(&path)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    path.cut();
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, (peer, got)) in talk.stop().await.into_iter().enumerate() {
        let gap = longest_gap(&got, cut_at);
        eprintln!("participant {i}: longest gap after the cut: {gap:?}");
        assert!(
            gap < Duration::from_millis(300),
            "participant {i}: media stopped for {gap:?}"
        );
        assert_eq!(
            peer.leg.relay_index(),
            1,
            "participant {i} is on the backup"
        );
        let counters = peer.leg.counters();
        assert_eq!(counters.binds.load(Relaxed), 1);
        assert_eq!(
            counters.failovers.load(Relaxed),
            1,
            "participant {i}: one switch, no flapping"
        );
    }
    c.stop().await;
}

/// A draining relay moves every leg to its standby at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_moves_everyone_to_the_standby_at_once() {
    // Evicted at once: CLOSE (draining) to every leg.
    let c = cluster(&["--drain-deadline-secs", "0"]).await;
    let legs = [pb::Transport::Udp; 2];
    let (got, drained_at) = signal_primary(&c, "hot-drain", &legs, Signal::SIGTERM).await;
    for (peer, _) in assert_moved_at_once(got, drained_at) {
        assert_eq!(peer.leg.counters().binds.load(Relaxed), 1);
        assert_eq!(peer.leg.counters().failovers.load(Relaxed), 1);
    }
    c.stop().await;
}

/// A far relay (200 ms round trip, more than the 150 ms of silence that declares a relay dead)
/// that still answers is not left by legs with no media on them: the silence allowed grows to
/// a KEEPALIVE interval plus the longest answer the measured round trip allows. Once the relay
/// really dies, the legs still switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_relay_that_answers_is_not_left_and_a_dead_one_is() {
    let c = cluster(&[]).await;
    let mut api = client(&c.controller.url).await;
    let s = allocate(&mut api, request("hot-far", 2)).await;
    let mut peers = Vec::new();
    let mut paths = Vec::new();
    for (i, leg) in s.legs.iter().enumerate() {
        let local = format!("127.0.0.{}:0", i + 2).parse().unwrap();
        let mut cfg = LegConfig::from_pb(leg, local).hot_standby();
        assert!(cfg.dead_after < Duration::from_millis(200));
        let path = Path {
            delay: Duration::from_millis(100),
            ..Default::default()
        };
        cfg.relays[0].udp = path.start(cfg.relays[0].udp).await;
        paths.push(path);
        peers.push(Peer::join_config(cfg, i as u32 + 1).await);
    }
    // Muted: nothing but KEEPALIVEs and their answers for 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, p) in peers.iter().enumerate() {
        assert_eq!(
            p.leg.counters().failovers.load(Relaxed),
            0,
            "participant {i} left a relay that answers every KEEPALIVE in 200 ms"
        );
        assert_eq!(p.leg.relay_index(), 0);
        assert_eq!(p.leg.standby_index(), Some(1), "participant {i}");
    }
    c.relay(&s.relays[0].node_id).signal(Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(3);
    while peers.iter().any(|p| p.leg.relay_index() != 1) {
        assert!(
            Instant::now() < deadline,
            "the legs leave the dead far relay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &peers {
        assert_eq!(p.leg.counters().failovers.load(Relaxed), 1);
    }
    c.stop().await;
}
