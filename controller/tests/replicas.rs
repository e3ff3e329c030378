//! Several controller replicas, no shared database: relays attach to every replica, each
//! replica serves allocations, and a controller killed and restarted mid-call interrupts no
//! media (the data plane never waits on the control plane).

mod common;

use std::time::{Duration, Instant};

use common::*;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_proto::v1 as pb;
use veil_proto::v1::admin_service_client::AdminServiceClient;
use veil_relay::RelayServer;

/// Starts in-process relays attached to `controllers`; returns a stop handle and their tasks.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_allocations_at_once() {
    let keys = generate_keys();
    let a = LocalController::start(Settings::local(keys.clone())).await;
    let b = LocalController::start(Settings::local(keys.clone())).await;
    let (stop, tasks) = relays(&keys, 2, &[a.url.clone(), b.url.clone()]).await;
    a.wait_relays(2).await;
    b.wait_relays(2).await;

    let (mut api_a, mut api_b) = (client(&a.url).await, client(&b.url).await);
    let (x, y) = tokio::join!(
        api_a.allocate_session(request("via-a", 2)),
        api_b.allocate_session(request("via-b", 2))
    );
    let (x, y) = (
        x.unwrap().into_inner().session.unwrap(),
        y.unwrap().into_inner().session.unwrap(),
    );
    // Each call flows, whichever replica minted its tokens.
    for (s, ip) in [(&x, 2), (&y, 4)] {
        let relay: std::net::SocketAddr = s.relays[0].udp_address.parse().unwrap();
        let p0 = Peer::join(&s.legs[0], &format!("127.0.0.{ip}"), 1).await;
        let p1 = Peer::join(&s.legs[1], &format!("127.0.0.{}", ip + 1), 2).await;
        let mut peers = vec![p0, p1];
        exchange(&mut peers, 30, |_| relay).await;
    }
    // Sessions are replica-local (docs/OPERATIONS.md): the other replica does not know them.
    let e = api_b
        .get_session(pb::GetSessionRequest {
            session_id: x.session_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // A release through the replica that allocated reaches every relay, including those it
    // shares with the other replica.
    api_a
        .release_session(pb::ReleaseSessionRequest {
            session_id: x.session_id.clone(),
        })
        .await
        .unwrap();
    let token = veil_relay_core::Token::from_bytes(&x.legs[0].token).unwrap();
    let relay: std::net::SocketAddr = x.relays[0].udp_address.parse().unwrap();
    let again = veil_client::Leg::bind(veil_client::LegConfig::udp(
        token.to_bytes().to_vec(),
        vec![relay],
        "127.0.0.9:0".parse().unwrap(),
    ))
    .await;
    assert!(again.is_err(), "released sessions do not bind");

    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    a.stop().await;
    b.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_controller(kf: &std::path::Path, port: u16) -> std::process::Child {
    std::process::Command::new(bin("veil-controller"))
        .arg("--key-file")
        .arg(kf)
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{port}"),
            "--ops-addr",
            "127.0.0.1:0",
        ])
        .env_remove("VEIL_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start veil-controller")
}

async fn relays_up(url: &str) -> usize {
    let Ok(mut admin) = AdminServiceClient::connect(url.to_string()).await else {
        return 0;
    };
    match admin.list_relays(pb::ListRelaysRequest {}).await {
        Ok(r) => r.into_inner().relays.iter().filter(|r| r.up).count(),
        Err(_) => 0,
    }
}

async fn wait_up(url: &str, n: usize, limit: Duration) {
    let until = Instant::now() + limit;
    while relays_up(url).await < n {
        assert!(
            Instant::now() < until,
            "relays did not attach within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_and_restarted_mid_call_interrupts_no_media() {
    let keys = generate_keys();
    let kf = key_file(&keys);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut controller = start_controller(&kf, port);
    let (stop, tasks) = relays(&keys, 2, std::slice::from_ref(&url)).await;
    wait_up(&url, 2, Duration::from_secs(10)).await;
    let mut api = client(&url).await;
    let s = allocate(&mut api, request("steady", 2)).await;
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let talk = Talk::start(vec![alice, bob], Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(controller.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    controller.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut controller = start_controller(&kf, port);
    // The relays find it again by themselves (their backoff is at most 5 s).
    wait_up(&url, 2, Duration::from_secs(10)).await;
    let mut api = client(&url).await;
    api.allocate_session(request("after-restart", 2))
        .await
        .unwrap();

    for (peer, got) in talk.stop().await {
        let after: Vec<u16> = got
            .iter()
            .filter(|(at, _)| *at >= killed_at)
            .map(|(_, s)| *s)
            .collect();
        assert!(
            after.len() > 100,
            "media kept flowing ({} packets)",
            after.len()
        );
        for w in after.windows(2) {
            assert_eq!(
                w[1],
                w[0].wrapping_add(1),
                "no packet lost while the controller was gone"
            );
        }
        assert!(longest_gap(&got, killed_at) < Duration::from_millis(200));
        assert_eq!(peer.leg.relay_index(), 0, "no failover: the relay was fine");
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let _ = controller.kill();
    let _ = controller.wait();
    std::fs::remove_file(kf).ok();
}

/// The relay finds controllers by name, through the system resolver: with controllers on one
/// port of 127.0.0.1 and ::1, a relay given `http://localhost:PORT` attaches to the controller
/// at every address `localhost` resolves to here (both, where /etc/hosts lists both), and to no
/// other. Changing answers (scale-up, scale-down) are covered by the relay's own tests with a
/// scripted resolver (`relay/src/control.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_attaches_to_every_address_of_a_controller_name() {
    use std::net::{SocketAddr, ToSocketAddrs};
    let keys = generate_keys();
    let mut v4 = Settings::local(keys.clone());
    v4.grpc_addr = "127.0.0.1:0".parse().unwrap();
    let a = LocalController::start(v4).await;
    let port: u16 = a.url.rsplit(':').next().unwrap().parse().unwrap();
    let mut v6 = Settings::local(keys.clone());
    v6.grpc_addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let b = LocalController::start(v6).await;
    let resolved: Vec<SocketAddr> = ("localhost", port).to_socket_addrs().unwrap().collect();
    assert!(resolved.contains(&SocketAddr::from(([127, 0, 0, 1], port))));

    let (stop, tasks) = relays(&keys, 1, &[format!("http://localhost:{port}")]).await;
    let ends = [
        (&a, SocketAddr::from(([127, 0, 0, 1], port))),
        (&b, SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))),
    ];
    for (c, addr) in ends {
        if resolved.contains(&addr) {
            c.wait_relays(1).await;
        }
    }
    // Every resolved address is attached by now; a controller whose address `localhost` does
    // not resolve to got nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (c, addr) in ends {
        assert_eq!(
            c.state.registry.up(),
            usize::from(resolved.contains(&addr)),
            "controller at {addr} (localhost resolves to {resolved:?})"
        );
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    a.stop().await;
    b.stop().await;
}
