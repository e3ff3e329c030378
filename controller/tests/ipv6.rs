//! A call over IPv6: relay and participants on ::1.

mod common;

use std::time::Duration;

use common::*;
use veil_controller::ControllerServer;
use veil_relay::RelayServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_over_ipv6() {
    let keys = veil_controller::dev::generate_keys();
    let mut settings = veil_controller::config::Settings::local(keys.clone());
    settings.grpc_addr = "[::1]:0".parse().unwrap();
    let controller = ControllerServer::load(settings).await.unwrap();
    let url = format!("http://{}", controller.grpc_addr());
    let state = controller.controller().clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let c_task = tokio::spawn(controller.run(wait(stopped.clone())));

    let mut rs = veil_relay::config::Settings::local(keys, "relay-v6", vec![url.clone()]);
    rs.udp_addr = "[::1]:0".parse().unwrap();
    rs.ops_addr = "[::1]:0".parse().unwrap();
    let relay = RelayServer::load(rs).await.unwrap();
    let relay_addr = relay.public_udp_addr();
    assert!(relay_addr.is_ipv6());
    let r_task = tokio::spawn(relay.run(wait(stopped)));
    while state.registry.up() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut api = client(&url).await;
    let s = allocate(&mut api, request("v6-call", 2)).await;
    assert_eq!(s.relays[0].udp_address, relay_addr.to_string());
    let mut peers = Vec::new();
    for (i, leg) in s.legs.iter().enumerate() {
        peers.push(Peer::join(leg, "[::1]", 10 + i as u32).await);
    }
    exchange(&mut peers, 50, |_| relay_addr).await;

    stop.send(true).unwrap();
    c_task.await.unwrap().unwrap();
    r_task.await.unwrap().unwrap();
}
