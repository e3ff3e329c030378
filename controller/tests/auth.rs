//! Callers authenticate: signaling services, relays and operators each present their own bearer
//! token; a call without a valid one gets UNAUTHENTICATED, and a credential of the wrong role
//! gets PERMISSION_DENIED.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use tonic::metadata::MetadataValue;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_proto::v1 as pb;
use veil_proto::v1::admin_service_client::AdminServiceClient;

const SIGNALING: &str = "signaling-token-0123456789";
const RELAY: &str = "relay-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
        );
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_has_its_own_credentials() {
    let keys = generate_keys();
    let mut settings = Settings::local(keys.clone());
    settings.signaling_tokens = vec![SIGNALING.into()];
    settings.relay_tokens = vec![RELAY.into()];
    settings.admin_tokens = vec![ADMIN.into()];
    let controller = LocalController::start(settings).await;

    // A relay with a wrong credential never attaches; one with the relay credential does.
    let mut bad =
        veil_relay::config::Settings::local(keys.clone(), "intruder", vec![controller.url.clone()]);
    bad.controller_token = Some(SIGNALING.into());
    let bad = veil_relay::RelayServer::load(bad).await.unwrap();
    let bad_metrics = bad.metrics().clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let bad_task = tokio::spawn(bad.run(wait(stopped.clone())));
    let mut good =
        veil_relay::config::Settings::local(keys, "relay-0", vec![controller.url.clone()]);
    good.controller_token = Some(RELAY.into());
    let good = veil_relay::RelayServer::load(good).await.unwrap();
    let good_task = tokio::spawn(good.run(wait(stopped)));
    controller.wait_relays(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(controller.state.registry.up(), 1);
    assert!(
        controller.state.registry.view("intruder").is_none(),
        "a signaling credential cannot attach a relay"
    );
    bad_metrics.refresh();
    let mut api = client(&controller.url).await;
    let req = || request("authed-call", 2);

    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("not-a-token-at-all"), Code::Unauthenticated),
        (Some(RELAY), Code::PermissionDenied),
        (Some(ADMIN), Code::PermissionDenied),
    ] {
        let e = api
            .allocate_session(with_token(req(), token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{token:?}");
        assert!(
            !e.message().contains("token-0123"),
            "errors never echo credentials"
        );
    }
    let s = allocate(&mut api, with_token(req(), Some(SIGNALING))).await;
    let e = api
        .get_session(with_token(
            pb::GetSessionRequest {
                session_id: s.session_id.clone(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = api
        .watch_session(with_token(
            pb::WatchSessionRequest {
                session_id: s.session_id.clone(),
                leg_events: false,
            },
            Some(RELAY),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let mut admin = AdminServiceClient::connect(controller.url.clone())
        .await
        .unwrap();
    let e = admin
        .list_relays(with_token(pb::ListRelaysRequest {}, Some(SIGNALING)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let relays = admin
        .list_relays(with_token(pb::ListRelaysRequest {}, Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(relays.relays.len(), 1);

    // Refusals are counted, by service, with no credential in the labels.
    use veil_controller::metrics::AuthService;
    let metrics = &controller.state.metrics;
    assert!(metrics.auth_failures(AuthService::Session) >= 6);
    assert!(metrics.auth_failures(AuthService::Registry) >= 1);
    assert!(metrics.auth_failures(AuthService::Admin) >= 1);

    stop.send(true).unwrap();
    bad_task.await.unwrap().unwrap();
    good_task.await.unwrap().unwrap();
    controller.stop().await;
}

const RELAY_0: &str = "relay-0-own-token-0123456789";
const RELAY_1: &str = "relay-1-own-token-0123456789";

/// Attaches as an impostor would, with a raw stream: a hello naming `node_id` and an address
/// of its own, presenting `token`. Returns the status the controller answered.
async fn impostor_attach(url: &str, token: &str, node_id: &str) -> tonic::Status {
    let mut registry = pb::relay_registry_client::RelayRegistryClient::connect(url.to_string())
        .await
        .unwrap();
    let hello = pb::RelayMessage {
        kind: Some(pb::relay_message::Kind::Hello(pb::RelayHello {
            node_id: node_id.into(),
            udp_address: "127.0.0.99:4000".into(),
            capacity_legs: 1_000_000,
            key_ids: vec![1, 2],
            instance_id: 7,
            ..Default::default()
        })),
    };
    use tokio_stream::StreamExt as _;
    let out = tokio_stream::iter(vec![hello]).chain(tokio_stream::pending());
    match registry.attach(with_token(out, Some(token))).await {
        Ok(_) => panic!("{node_id} attached with another's credential"),
        Err(e) => e,
    }
}

/// Relays prove who they are: with per-relay credentials (`--relay-identities`), a relay's
/// token registers its own node id only. An impostor holding another relay's credential, or a
/// shared one, cannot take `relay-0`'s node id, while `relay-0` is up or after it left: its
/// address is never handed out, and `relay-0`'s view keeps its own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_relay_credential_cannot_take_another_relays_node_id_or_sessions() {
    use tonic_types::StatusExt as _;
    let keys = generate_keys();
    let mut settings = Settings::local(keys.clone());
    settings.signaling_tokens = vec![SIGNALING.into()];
    settings.relay_tokens = vec![RELAY.into()];
    settings.relay_identities = vec![
        veil_controller::config::RelayIdentity::parse(&format!("relay-0:{RELAY_0}")).unwrap(),
        veil_controller::config::RelayIdentity::parse(&format!("relay-1:{RELAY_1}")).unwrap(),
    ];
    let controller = LocalController::start(settings).await;
    let start = |node: &'static str, token: &'static str| {
        let keys = keys.clone();
        let url = controller.url.clone();
        async move {
            let mut s = veil_relay::config::Settings::local(keys, node, vec![url]);
            s.controller_token = Some(token.into());
            s.report_interval = Duration::from_millis(250);
            let r = veil_relay::RelayServer::load(s).await.unwrap();
            let (stop, mut rx) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(r.run(async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            (stop, task)
        }
    };
    let relay_0 = start("relay-0", RELAY_0).await;
    let relay_1 = start("relay-1", RELAY_1).await;
    controller.wait_relays(2).await;
    let genuine = controller
        .state
        .registry
        .view("relay-0")
        .unwrap()
        .info
        .udp_address;

    // Another relay's credential, the shared one, and relay-0's own for another node id.
    for (token, node) in [
        (RELAY_1, "relay-0"),
        (RELAY, "relay-0"),
        (RELAY_0, "relay-1"),
    ] {
        let e = impostor_attach(&controller.url, token, node).await;
        assert_eq!(e.code(), Code::PermissionDenied, "{node}");
        assert_eq!(
            e.get_error_details().error_info().unwrap().reason,
            "RELAY_IDENTITY_MISMATCH"
        );
        assert!(!e.message().contains("token-0123"), "{}", e.message());
    }
    // A whole relay posing as relay-0 with relay-1's credential never attaches, and keeps
    // trying while the genuine relay-0 goes away.
    let impostor = start("relay-0", RELAY_1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        controller
            .state
            .registry
            .view("relay-0")
            .unwrap()
            .info
            .udp_address,
        genuine,
        "relay-0's view keeps its own address"
    );
    relay_0.0.send(true).unwrap();
    relay_0.1.await.unwrap().unwrap();
    let mut api = client(&controller.url).await;
    for i in 0..20 {
        let s = allocate(
            &mut api,
            with_token(request(&format!("impostor-call-{i}"), 2), Some(SIGNALING)),
        )
        .await;
        for r in &s.relays {
            assert_ne!(r.udp_address, "127.0.0.99:4000");
            let view = controller.state.registry.view(&r.node_id).unwrap();
            assert_eq!(view.info.udp_address, r.udp_address);
            if r.node_id == "relay-0" {
                assert_eq!(r.udp_address, genuine, "relay-0 is only ever itself");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing in the registry ever took the impostor's word.
    let views = controller.state.registry.views();
    assert!(
        views
            .iter()
            .all(|v| v.info.udp_address != "127.0.0.99:4000")
    );
    assert!(
        views
            .iter()
            .all(|v| v.info.node_id != "relay-0" || v.info.udp_address == genuine)
    );
    // The shared credential still attaches a node id nobody owns.
    let shared = start("relay-9", RELAY).await;
    controller.wait_relays(2).await;
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while controller.state.registry.view("relay-9").is_none() {
        assert!(std::time::Instant::now() < until, "relay-9 did not attach");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (stop, task) in [relay_1, impostor, shared] {
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
    controller.stop().await;
}

/// Attaches with a raw stream of `hello` alone, presenting `token`: `Ok` once the controller
/// accepted the stream (which then ends), else its status.
async fn attach_hello(url: &str, token: &str, hello: pb::RelayHello) -> Result<(), tonic::Status> {
    let mut registry = pb::relay_registry_client::RelayRegistryClient::connect(url.to_string())
        .await
        .unwrap();
    let hello = pb::RelayMessage {
        kind: Some(pb::relay_message::Kind::Hello(hello)),
    };
    let out = tokio_stream::iter(vec![hello]);
    registry
        .attach(with_token(out, Some(token)))
        .await
        .map(drop)
}

fn hello_at(node_id: &str, udp: &str, quic: &str) -> pb::RelayHello {
    pb::RelayHello {
        node_id: node_id.into(),
        udp_address: udp.into(),
        quic_address: quic.into(),
        capacity_legs: 1_000_000,
        key_ids: vec![1, 2],
        instance_id: 7,
        ..Default::default()
    }
}

/// Relays advertise only addresses in their networks (`--relay-networks`): a relay credential,
/// shared or a relay's own, cannot have the controller send participants to an address of its
/// choosing (another host's, to flood it with their binds and media). A relay with networks of
/// its own is held to those alone; the refusal names the field, never the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_advertise_an_address_outside_its_networks() {
    use tonic_types::StatusExt as _;
    let keys = generate_keys();
    let mut settings = Settings::local(keys.clone());
    settings.signaling_tokens = vec![SIGNALING.into()];
    settings.relay_tokens = vec![RELAY.into()];
    settings.relay_identities =
        vec![veil_controller::config::RelayIdentity::parse(&format!("relay-0:{RELAY_0}")).unwrap()];
    settings.relay_networks = veil_controller::config::RelayNetworks::parse(&[
        "127.0.0.0/8".into(),
        "::1/128".into(),
        "relay-0=127.0.0.1/32".into(),
    ])
    .unwrap();
    let controller = LocalController::start(settings).await;

    // The genuine relay-0, a real relay on 127.0.0.1, attaches.
    let mut s = veil_relay::config::Settings::local(keys, "relay-0", vec![controller.url.clone()]);
    s.controller_token = Some(RELAY_0.into());
    s.report_interval = Duration::from_millis(250);
    let r = veil_relay::RelayServer::load(s).await.unwrap();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let relay_0 = tokio::spawn(r.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    controller.wait_relays(1).await;
    let genuine = controller.state.registry.view("relay-0").unwrap().info;

    let refused = [
        // Outside every network, with the shared credential and with relay-0's own.
        (
            RELAY,
            hello_at("relay-7", "192.0.2.99:4000", ""),
            "udp_address",
        ),
        (
            RELAY_0,
            hello_at("relay-0", "192.0.2.99:4000", ""),
            "udp_address",
        ),
        // A genuine UDP address and a QUIC one elsewhere.
        (
            RELAY_0,
            hello_at("relay-0", "127.0.0.1:4000", "192.0.2.99:4001"),
            "quic_address",
        ),
        // Inside the networks of every relay, but relay-0 is held to its own.
        (
            RELAY_0,
            hello_at("relay-0", "127.0.0.5:4000", ""),
            "udp_address",
        ),
        (
            RELAY,
            pb::RelayHello {
                turn_udp: true,
                turn_tcp_address: "192.0.2.99:4002".into(),
                ..hello_at("relay-8", "127.0.0.8:4000", "")
            },
            "turn_tcp_address",
        ),
        (
            RELAY,
            pb::RelayHello {
                turn_udp: true,
                turn_tls_address: "192.0.2.99:443".into(),
                ..hello_at("relay-8", "127.0.0.8:4000", "")
            },
            "turn_tls_address",
        ),
    ];
    for (token, hello, field) in refused {
        let node = hello.node_id.clone();
        let e = attach_hello(&controller.url, token, hello)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{node} {field}");
        assert_eq!(
            e.get_error_details().error_info().unwrap().reason,
            "RELAY_ADDRESS_NOT_ALLOWED"
        );
        assert!(
            e.message().contains(&format!("hello.{field}")),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("192.0.2.99") && !e.message().contains("127.0.0."));
    }
    // Inside the networks: a relay of the shared credential on another loopback address, with
    // a TURN over TLS name (proven to clients by its certificate, not checked here).
    attach_hello(
        &controller.url,
        RELAY,
        pb::RelayHello {
            turn_udp: true,
            turn_tls_address: "turn.example.net:443".into(),
            ..hello_at("relay-9", "127.0.0.9:4000", "[::1]:4001")
        },
    )
    .await
    .expect("an address in the networks attaches");
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while controller.state.registry.view("relay-9").is_none() {
        assert!(std::time::Instant::now() < until, "relay-9 did not attach");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Nothing refused reached the registry, and relay-0 is only ever itself.
    let views = controller.state.registry.views();
    assert_eq!(
        views
            .iter()
            .map(|v| v.info.node_id.as_str())
            .collect::<Vec<_>>(),
        vec!["relay-0", "relay-9"]
    );
    assert_eq!(
        controller.state.registry.view("relay-0").unwrap().info,
        genuine
    );
    let mut api = client(&controller.url).await;
    for i in 0..10 {
        let s = allocate(
            &mut api,
            with_token(request(&format!("networks-call-{i}"), 2), Some(SIGNALING)),
        )
        .await;
        for r in &s.relays {
            assert!(
                !r.udp_address.starts_with("192.0.2.") && !r.quic_address.starts_with("192.0.2.")
            );
        }
    }
    stop.send(true).unwrap();
    relay_0.await.unwrap().unwrap();
    controller.stop().await;
}
