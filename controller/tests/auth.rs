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
