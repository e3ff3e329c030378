//! Relay liveness as the controller sees it: a relay silent for 3 s (its process stopped, its
//! TCP stream still open) is marked down and gets no new sessions; when it reports again it is
//! up; a relay that restarts registers again by itself.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_controller::registry::Health;

async fn wait_health(c: &LocalController, node: &str, health: Health, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if c.state
            .registry
            .view(node)
            .is_some_and(|v| v.health == health)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{node} not {health:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_relays_go_down_and_come_back_and_restarted_relays_reregister() {
    let keys = generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(Settings::local(keys)).await;
    let url = std::slice::from_ref(&controller.url);
    let a = RelayProcess::start("relay-a", "zone-a", &kf, url, &[]);
    let _b = RelayProcess::start("relay-b", "zone-b", &kf, url, &[]);
    controller.wait_relays(2).await;
    let first_instance = controller
        .state
        .registry
        .view("relay-a")
        .unwrap()
        .info
        .instance_id;

    // Frozen: the process exists and its TCP stream stays open, but it reports nothing.
    a.signal(Signal::SIGSTOP);
    let took = wait_health(&controller, "relay-a", Health::Down, Duration::from_secs(6)).await;
    assert!(
        took >= Duration::from_millis(2500),
        "marked down after about 3 s of silence, not {took:?}"
    );
    let mut api = client(&controller.url).await;
    for i in 0..10 {
        let s = allocate(&mut api, request(&format!("while-down-{i}"), 2)).await;
        assert!(
            s.relays.iter().all(|r| r.node_id != "relay-a"),
            "no session on a relay that is down"
        );
    }
    a.signal(Signal::SIGCONT);
    wait_health(&controller, "relay-a", Health::Up, Duration::from_secs(3)).await;

    // Killed and started again: it registers by itself, as a new instance.
    a.signal(Signal::SIGKILL);
    wait_health(&controller, "relay-a", Health::Down, Duration::from_secs(5)).await;
    drop(a);
    let _a2 = RelayProcess::start("relay-a", "zone-a", &kf, url, &[]);
    wait_health(&controller, "relay-a", Health::Up, Duration::from_secs(5)).await;
    let second_instance = controller
        .state
        .registry
        .view("relay-a")
        .unwrap()
        .info
        .instance_id;
    assert_ne!(
        first_instance, second_instance,
        "a restart is a new instance"
    );
    controller.stop().await;
    std::fs::remove_file(kf).ok();
}
