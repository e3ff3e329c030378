//! Any replica serves any session, with no database (issue "Calls as apps run them", item 5):
//! three controller replicas that follow each other's sessions (`--peers`), every RPC sent to a
//! random one. The hard cases, each attacked from outside: a retry and concurrent allocations
//! of one `call_id` on different replicas; a replica SIGKILLed mid-call and restarted (it
//! loses no session, and media never notices); a partition between replicas, then healed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use veil_controller::config::Settings;
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay::RelayServer;

fn get(id: &str) -> pb::GetSessionRequest {
    pb::GetSessionRequest {
        session_id: id.into(),
    }
}

fn add(session_id: &str, id: &str) -> pb::AddParticipantRequest {
    pb::AddParticipantRequest {
        session_id: session_id.into(),
        participant: Some(pb::Participant {
            participant_id: id.into(),
            ..Default::default()
        }),
    }
}

/// Starts in-process relays (UDP) attached to every one of `controllers`; they stop when the
/// returned sender turns true.
async fn relays(
    keys: &veil_relay_core::KeyRing,
    n: usize,
    controllers: &[String],
) -> (
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut s = veil_relay::config::Settings::local(
            keys.clone(),
            &format!("relay-{i}"),
            controllers.to_vec(),
        );
        s.zone = format!("zone-{i}");
        s.workers = 1;
        s.report_interval = Duration::from_millis(250);
        let r = RelayServer::load(s).await.unwrap();
        let mut rx = stopped.clone();
        tasks.push(tokio::spawn(r.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        })));
    }
    (stop, tasks)
}

/// Waits until the replica at `url` reports SERVING on gRPC health (relays attached, and every
/// peer's sessions merged), at most `within`.
async fn serving(url: &str, within: Duration) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let until = Instant::now() + within;
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if let Ok(r) = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(Instant::now() < until, "{url} did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_simultaneous_allocations_on_different_replicas_get_one_session() {
    let c = Cluster::start(Options {
        relays: 2,
        workers_per_relay: 1,
        controllers: 3,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut apis = Vec::new();
    for url in &c.controller_urls {
        apis.push(client(url).await);
    }

    // A retry on each other replica returns the same session, tokens and relays.
    for call in 0..12 {
        let first = call % 3;
        let s = allocate(&mut apis[first], request(&format!("retried-{call}"), 3)).await;
        for (other, api) in apis.iter_mut().enumerate().filter(|(i, _)| *i != first) {
            let again = api
                .allocate_session(request(&format!("retried-{call}"), 3))
                .await
                .unwrap()
                .into_inner();
            assert!(!again.created, "replica {other}: a retry creates nothing");
            assert_eq!(again.session.unwrap(), s, "replica {other}");
            // Read right after it was written, anywhere.
            let got = api.get_session(get(&s.session_id)).await.unwrap();
            assert_eq!(without_activity(got.into_inner().session.unwrap()), s);
        }
    }

    // The same new call_id on all three replicas at the same instant: one session.
    for call in 0..12 {
        let id = format!("simultaneous-{call}");
        let (mut a, mut b, mut d) = (apis[0].clone(), apis[1].clone(), apis[2].clone());
        let (x, y, z) = tokio::join!(
            a.allocate_session(request(&id, 2)),
            b.allocate_session(request(&id, 2)),
            d.allocate_session(request(&id, 2)),
        );
        let answers: Vec<_> = [x, y, z]
            .into_iter()
            .map(|r| r.unwrap().into_inner())
            .collect();
        let created = answers.iter().filter(|a| a.created).count();
        assert_eq!(created, 1, "{id}: exactly one replica's answer created it");
        for a in &answers[1..] {
            assert_eq!(a.session, answers[0].session, "{id}: one session");
        }
    }

    // The work was the owners': requests reached them forwarded, and nobody served one itself
    // for want of an owner.
    let forwarded: u64 = c
        .controllers
        .iter()
        .map(|s| s.metrics.forwarded("AllocateSession", true))
        .sum();
    let fallbacks: u64 = c
        .controllers
        .iter()
        .map(|s| s.metrics.forwarded("AllocateSession", false))
        .sum();
    assert!(forwarded > 10, "forwarded {forwarded}");
    assert_eq!(fallbacks, 0);
    // Every replica holds every session.
    for s in &c.controllers {
        assert_eq!(s.sessions(), 24);
    }
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_call_loses_no_session_and_media_never_notices() {
    let keys = veil_controller::dev::generate_keys();
    let file = key_file(&keys);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let start = |i: usize| {
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| urls[j].clone())
            .collect();
        ControllerProcess::start_on(
            &file,
            ports[i],
            &[
                "--replica-id",
                &format!("controller-{i}"),
                "--peers",
                &peers.join(","),
            ],
        )
    };
    let mut replicas: Vec<ControllerProcess> = (0..3).map(start).collect();
    let (stop, tasks) = relays(&keys, 2, &urls).await;
    for url in &urls {
        serving(url, Duration::from_secs(20)).await;
    }
    let mut any = client_any(&urls).await;
    let mut s = allocate(&mut any, request("long-call", 2)).await;
    let primary: SocketAddr = s.relays[0].udp_address.parse().unwrap();
    let peers = vec![
        Peer::join(&s.legs[0], "127.0.0.2", 1).await,
        Peer::join(&s.legs[1], "127.0.0.3", 2).await,
    ];
    let chat = Chat::start(peers, Duration::from_millis(20), &[primary]);

    for victim in 0..3 {
        // SIGKILL: no goodbye to the relays or the other replicas.
        replicas[victim].signal(nix::sys::signal::Signal::SIGKILL);
        let _ = replicas[victim].child.wait();
        // Media flows on meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let others: Vec<String> = (0..3)
            .filter(|&j| j != victim)
            .map(|j| urls[j].clone())
            .collect();
        let mut api = client_any(&others).await;
        // The session, a participant who joins, an extension, and a new call, all without it
        // (the victim may well have been the call's owner).
        let joined = api
            .add_participant(add(&s.session_id, &format!("joiner-{victim}")))
            .await
            .unwrap()
            .into_inner();
        assert!(joined.created);
        s = api
            .extend_session(pb::ExtendSessionRequest {
                session_id: s.session_id.clone(),
                ttl_seconds: 600 + victim as u32 * 60,
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        assert_eq!(s.legs.len(), 3 + victim);
        let new = allocate(&mut api, request(&format!("while-{victim}-was-down"), 2)).await;

        // Back on the same address, it has every session as the others left them, before it
        // reports ready.
        replicas[victim] = start(victim);
        serving(&urls[victim], Duration::from_secs(20)).await;
        let mut back = client(&urls[victim]).await;
        let got = back.get_session(get(&s.session_id)).await.unwrap();
        assert_eq!(
            without_activity(got.into_inner().session.unwrap()),
            s,
            "replica {victim}"
        );
        let got = back.get_session(get(&new.session_id)).await.unwrap();
        assert_eq!(
            without_activity(got.into_inner().session.unwrap()),
            new,
            "replica {victim}"
        );
        // And the retry of the call made while it was away returns that session.
        let again = back
            .allocate_session(request(&format!("while-{victim}-was-down"), 2))
            .await
            .unwrap()
            .into_inner();
        assert!(!again.created);
        assert_eq!(again.session.unwrap().session_id, new.session_id);
    }

    // The call's media never depended on a controller: nothing lost.
    let heard = chat.stop().await;
    let (due, lost) = chat_loss(&heard);
    assert!(due > 100, "{due}");
    assert_eq!(lost, 0, "{lost} of {due} packets lost");
    assert!(heard.iter().all(|h| h.bad == 0));

    // Released on one replica, released on all.
    let mut first = client(&urls[0]).await;
    first
        .release_session(pb::ReleaseSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap();
    for url in &urls {
        let got = client(url)
            .await
            .get_session(get(&s.session_id))
            .await
            .unwrap();
        assert_eq!(
            got.into_inner().session.unwrap().state,
            pb::SessionState::Released as i32,
            "{url}"
        );
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for r in &replicas {
        r.signal(nix::sys::signal::Signal::SIGTERM);
    }
}

/// A TCP forwarder that can be cut: while cut it drops every connection it carries and every
/// new one.
struct Proxy {
    addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *rx.borrow() {
                    continue;
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// Waits until every replica follows both of its peers.
async fn converged(replicas: &[LocalController], within: Duration) {
    let until = Instant::now() + within;
    while replicas.iter().any(|r| r.state.metrics.peers_up.get() != 2) {
        assert!(Instant::now() < until, "replicas did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_replicas_heals_into_one_view_of_every_session() {
    let keys = veil_controller::dev::generate_keys();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    // Replica i reaches replica j through its own proxy, (i, j): the test cuts links one by one.
    let mut proxies = Vec::new();
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            proxies.push(((i, j), Proxy::start(addrs[j]).await));
        }
    }
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut s = Settings::local(keys.clone());
        s.grpc_addr = *addr;
        s.replica_id = format!("controller-{i}");
        s.peers = proxies
            .iter()
            .filter(|((from, _), _)| *from == i)
            .map(|(_, p)| format!("http://{}", p.addr))
            .collect();
        replicas.push(LocalController::start(s).await);
    }
    let (stop, tasks) = relays(&keys, 1, &urls).await;
    for r in &replicas {
        r.wait_relays(1).await;
    }
    converged(&replicas, Duration::from_secs(10)).await;
    let mut apis = Vec::new();
    for url in &urls {
        apis.push(client(url).await);
    }
    let before = allocate(&mut apis[0], request("before", 3)).await;

    // Replica 0 is cut off from the other two; each side goes on serving.
    for ((i, j), p) in &proxies {
        p.set_cut(*i == 0 || *j == 0);
    }
    let until = Instant::now() + Duration::from_secs(10);
    while replicas[0].state.metrics.peers_up.get() != 0
        || replicas[1..]
            .iter()
            .any(|r| r.state.metrics.peers_up.get() != 1)
    {
        assert!(Instant::now() < until, "the partition did not show");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same new call on both sides: neither side can know of the other's session.
    let lone = allocate(&mut apis[0], request("split-brain", 2)).await;
    let pair = allocate(&mut apis[1], request("split-brain", 2)).await;
    assert_ne!(lone.session_id, pair.session_id);
    // Changes to a session both sides hold: an extension on one, a removal on the other.
    apis[0]
        .extend_session(pb::ExtendSessionRequest {
            session_id: before.session_id.clone(),
            ttl_seconds: 7200,
        })
        .await
        .unwrap();
    apis[2]
        .remove_participant(pb::RemoveParticipantRequest {
            session_id: before.session_id.clone(),
            participant_id: "participant-1".into(),
        })
        .await
        .unwrap();
    // A participant added on each side: both get the same new leg index (a known limit,
    // docs/OPERATIONS.md); after the heal every replica keeps the same one.
    for (api, who) in [(0, "added-alone"), (1, "added-in-pair")] {
        let leg = apis[api]
            .add_participant(add(&before.session_id, who))
            .await
            .unwrap()
            .into_inner()
            .leg
            .unwrap();
        assert_eq!(leg.leg_index, 3);
    }
    // A session only one side knows of yet.
    let only_pair = allocate(&mut apis[2], request("only-on-one-side", 2)).await;
    let e = apis[0]
        .get_session(get(&only_pair.session_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Healed: every replica settles on one view of every session.
    for (_, p) in &proxies {
        p.set_cut(false);
    }
    converged(&replicas, Duration::from_secs(10)).await;
    let winner = lone.session_id.clone().min(pair.session_id.clone());
    let mut view = None;
    for (i, api) in apis.iter_mut().enumerate() {
        // Both calls' sessions, and the one made on one side, are served everywhere.
        for id in [&lone.session_id, &pair.session_id, &only_pair.session_id] {
            api.get_session(get(id))
                .await
                .unwrap_or_else(|e| panic!("replica {i}: {id}: {e}"));
        }
        // A retry of the call made twice returns the same one of them on every replica.
        let again = api
            .allocate_session(request("split-brain", 2))
            .await
            .unwrap()
            .into_inner();
        assert!(!again.created);
        assert_eq!(again.session.unwrap().session_id, winner, "replica {i}");
        // Both changes to the session held on both sides, merged.
        let s = api
            .get_session(get(&before.session_id))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        let ids: Vec<_> = s.legs.iter().map(|l| l.participant_id.as_str()).collect();
        assert_eq!(ids[..2], ["participant-0", "participant-2"], "replica {i}");
        assert!(
            ids.len() == 3 && ["added-alone", "added-in-pair"].contains(&ids[2]),
            "replica {i}: {ids:?}"
        );
        assert!(
            s.expires_at.as_ref().unwrap().seconds
                > before.expires_at.as_ref().unwrap().seconds + 3000
        );
        match &view {
            None => view = Some(s),
            Some(v) => assert_eq!(&s, v, "replica {i} sees the session as the others do"),
        }
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for r in replicas {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_runs_replicas_listed_in_the_ready_line() {
    let dev = DevProcess::start_with(1, &["--dev-controllers", "3"], &[]);
    let urls: Vec<String> = dev.ready["controllers"]
        .as_array()
        .expect("a controllers array")
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    assert_eq!(urls.len(), 3);
    assert_eq!(dev.controller_url(), urls[0], "controller is the first");
    let mut a = client(&urls[1]).await;
    let mut b = client(&urls[2]).await;
    let s = allocate(&mut a, request("dev-call", 2)).await;
    let got = b.get_session(get(&s.session_id)).await.unwrap();
    assert_eq!(without_activity(got.into_inner().session.unwrap()), s);
    let (status, _) = dev.stop();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_can_neither_follow_a_replica_nor_push_sessions_into_it() {
    use veil_proto::v1::replica_service_client::ReplicaServiceClient;
    const PEER: &str = "peer-token-0123456789abcdef";
    const SIGNALING: &str = "signaling-token-0123456789";
    let keys = veil_controller::dev::generate_keys();
    let mut s = Settings::local(keys.clone());
    s.peer_tokens = vec![PEER.into()];
    s.signaling_tokens = vec![SIGNALING.into()];
    let guarded = LocalController::start(s).await;
    // A replica on a reachable address with no --peer-tokens refuses everyone.
    let mut s = Settings::local(keys.clone());
    s.peer_open = false;
    let closed = LocalController::start(s).await;
    let (stop, tasks) = relays(&keys, 1, std::slice::from_ref(&guarded.url)).await;
    guarded.wait_relays(1).await;
    let mut api = client(&guarded.url).await;
    let s = allocate(&mut api, with(Some(SIGNALING), request("private", 2))).await;

    let mut peer = ReplicaServiceClient::connect(guarded.url.clone())
        .await
        .unwrap();
    let sync = |replica_id: &str| pb::SyncRequest {
        replica_id: replica_id.into(),
        instance_id: 7,
    };
    for (token, code, why) in [
        (None, Code::Unauthenticated, "CREDENTIAL_MISSING"),
        (
            Some("not-a-token-at-all-000"),
            Code::Unauthenticated,
            "CREDENTIAL_INVALID",
        ),
        // A signaling service's own credential does not follow replicas.
        (
            Some(SIGNALING),
            Code::PermissionDenied,
            "CREDENTIAL_WRONG_ROLE",
        ),
    ] {
        let e = peer.sync(with(token, sync("outsider"))).await.unwrap_err();
        assert_eq!((e.code(), reason(&e).as_str()), (code, why), "{token:?}");
        assert!(!e.message().contains(&hex_token(&s)), "no token in errors");
    }
    // A forged record, pushed without the peer credential, changes nothing: a session that
    // would hand an attacker's token out, and a release of the real one.
    let mut forged = pb::SessionRecord {
        session_id: 0x0bad_0bad,
        call_id: "forged".into(),
        expires_unix_ms: u64::MAX / 2,
        ..Default::default()
    };
    forged.relays.push(pb::RelayRecord {
        node_id: "relay-0".into(),
        udp_address: "127.0.0.9:9".into(),
        ..Default::default()
    });
    let mut release = forged.clone();
    release.session_id = u64::from_str_radix(&s.session_id, 16).unwrap();
    release.released = true;
    for rec in [forged, release] {
        for token in [None, Some(SIGNALING)] {
            let e = peer.apply(with(token, rec.clone())).await.unwrap_err();
            assert!(
                matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
                "{e:?}"
            );
        }
    }
    assert_eq!(guarded.state.sessions(), 1);
    let got = api
        .get_session(with(Some(SIGNALING), get(&s.session_id)))
        .await
        .unwrap();
    assert_eq!(
        got.into_inner().session.unwrap().state,
        pb::SessionState::Active as i32
    );
    // The replica's own peers, with the peer credential, follow it.
    let mut stream = peer
        .sync(with(Some(PEER), sync("controller-9")))
        .await
        .unwrap()
        .into_inner();
    let hello = stream.message().await.unwrap().unwrap();
    assert!(matches!(hello.kind, Some(pb::sync_message::Kind::Hello(_))));

    let mut closed_peer = ReplicaServiceClient::connect(closed.url.clone())
        .await
        .unwrap();
    for token in [None, Some(PEER)] {
        let e = closed_peer
            .sync(with(token, sync("outsider")))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::PermissionDenied, "REPLICATION_OFF")
        );
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    guarded.stop().await;
    closed.stop().await;
}

/// The first leg's token of `s`, hex, as it would look in a message that leaked it.
fn hex_token(s: &pb::Session) -> String {
    hex::encode(&s.legs[0].token)
}

/// `req` with `authorization: Bearer token`, if any.
fn with<T>(token: Option<&str>, req: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_for_every_replica_links_each_to_the_others_and_skips_its_own() {
    // As the shipped headless Service: one name that resolves to every replica, this one
    // included (a resolver of the test's own stands in for cluster DNS).
    let keys = veil_controller::dev::generate_keys();
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut s = Settings::local(keys.clone());
        s.grpc_addr = *addr;
        s.replica_id = format!("controller-{i}");
        s.peers = vec!["http://veil-controller-peers.veil.svc:50051".into()];
        let mut server = veil_controller::ControllerServer::load(s).await.unwrap();
        let (all, asked) = (addrs.clone(), asked.clone());
        server.set_peer_resolver(std::sync::Arc::new(move |host, port| {
            asked.lock().unwrap().push((host, port));
            let all = all.clone();
            Box::pin(async move { Ok(all) })
        }));
        replicas.push(LocalController::run(server));
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let (stop, tasks) = relays(&keys, 1, &urls).await;
    let until = Instant::now() + Duration::from_secs(10);
    while replicas
        .iter()
        .any(|r| r.state.metrics.peers.get() != 2 || r.state.metrics.peers_up.get() != 2)
    {
        assert!(
            Instant::now() < until,
            "replicas did not find each other by the name"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        asked
            .lock()
            .unwrap()
            .iter()
            .all(|(h, p)| h == "veil-controller-peers.veil.svc" && *p == 50051)
    );
    for url in &urls {
        serving(url, Duration::from_secs(10)).await;
    }
    let mut apis = Vec::new();
    for url in &urls {
        apis.push(client(url).await);
    }
    let s = allocate(&mut apis[0], request("by-name", 2)).await;
    for api in &mut apis[1..] {
        let got = api.get_session(get(&s.session_id)).await.unwrap();
        assert_eq!(without_activity(got.into_inner().session.unwrap()), s);
    }
    // Each replica holds the session once: its own address, in the name's answer, is no peer.
    for r in &replicas {
        assert_eq!(r.state.sessions(), 1);
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for r in replicas {
        r.stop().await;
    }
}
