//! The controller's gRPC health follows its readiness, over a real tonic server and real relays:
//! NOT_SERVING with no relay, SERVING once one attaches, NOT_SERVING again when it goes and while
//! the controller shuts down (with `/readyz` agreeing each time); reflection answers in v1 and
//! v1alpha; every RPC is counted by method and code, including answers the server's own layers
//! give, and the open roles are exported.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use veil_controller::ControllerServer;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_controller::metrics::{RpcCode, RpcMethod};
use veil_proto::v1 as pb;

/// A controller on loopback whose shutdown the test triggers.
struct Controller {
    url: String,
    ops: std::net::SocketAddr,
    state: std::sync::Arc<veil_controller::state::Controller>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn controller(keys: &veil_relay_core::KeyRing) -> Controller {
    let server = ControllerServer::load(Settings::local(keys.clone()))
        .await
        .unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel();
    Controller {
        url: format!("http://{}", server.grpc_addr()),
        ops: server.ops_addr(),
        state: server.controller().clone(),
        stop,
        task: tokio::spawn(server.run(async move {
            let _ = rx.await;
        })),
    }
}

/// A relay attached to `url`, stopped (without a drain) when `stop` is sent.
async fn relay(
    keys: &veil_relay_core::KeyRing,
    url: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let mut s = veil_relay::config::Settings::local(keys.clone(), "relay-h", vec![url.into()]);
    s.workers = 1;
    let r = veil_relay::RelayServer::load(s).await.unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(r.run(async move {
        let _ = rx.await;
    }));
    (stop, task)
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One unary call over a bare HTTP/2 connection: the `grpc-status` the server answers, from the
/// headers (a trailers-only answer) or the trailers.
async fn raw_status(
    addr: std::net::SocketAddr,
    path: &str,
    msg: &impl prost::Message,
    headers: &[(&str, &str)],
) -> u32 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, mut send) = h2.send_request(req.body(()).unwrap(), false).unwrap();
    let body = msg.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    // The server may answer from the headers alone and end the stream first.
    let _ = send.send_data(bytes::Bytes::from(frame), true);
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .map(|s| s.to_str().unwrap().parse::<u32>().unwrap())
    };
    if let Some(s) = status(resp.headers()) {
        return s;
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status(&trailers).expect("grpc-status in the trailers")
}

/// `GET path` on the ops endpoint: status code and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}

async fn check(h: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(r.into_inner().status).unwrap()
}

async fn next(s: &mut tonic::Streaming<HealthCheckResponse>) -> Option<ServingStatus> {
    let m = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a health update within 10 s")?;
    Some(ServingStatus::try_from(m.unwrap().status).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness_as_relays_attach_and_detach_and_while_draining() {
    use ServingStatus::{NotServing, ServiceUnknown, Serving};
    let keys = generate_keys();
    let c = controller(&keys).await;
    let mut h = HealthClient::new(channel(&c.url).await);

    // No relay: the server as a whole and SessionService are not serving, and /readyz says so;
    // relays must still be able to attach, so RelayRegistry is.
    assert_eq!(check(&mut h, "").await, NotServing);
    assert_eq!(check(&mut h, "veil.v1.SessionService").await, NotServing);
    assert_eq!(check(&mut h, "veil.v1.RelayRegistry").await, Serving);
    assert_eq!(check(&mut h, "veil.v1.AdminService").await, Serving);
    let unknown = h
        .check(HealthCheckRequest {
            service: "veil.v1.Nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(
        get(c.ops, "/readyz").await,
        (503, "not ready: no relay attached\n".into())
    );

    let mut overall = h
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut sessions = h
        .watch(HealthCheckRequest {
            service: "veil.v1.SessionService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut nothing = h
        .watch(HealthCheckRequest {
            service: "veil.v1.Nothing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut overall).await, Some(NotServing));
    assert_eq!(next(&mut sessions).await, Some(NotServing));
    assert_eq!(next(&mut nothing).await, Some(ServiceUnknown));

    // A relay attaches: the watches see SERVING without asking again.
    let (stop_relay, relay_task) = relay(&keys, &c.url).await;
    assert_eq!(next(&mut overall).await, Some(Serving));
    assert_eq!(next(&mut sessions).await, Some(Serving));
    assert_eq!(check(&mut h, "").await, Serving);
    assert_eq!(get(c.ops, "/readyz").await, (200, "ready\n".into()));

    // It goes away: NOT_SERVING again, at once (its stream ends).
    stop_relay.send(()).unwrap();
    relay_task.await.unwrap().unwrap();
    assert_eq!(next(&mut overall).await, Some(NotServing));
    assert_eq!(next(&mut sessions).await, Some(NotServing));
    assert_eq!(check(&mut h, "veil.v1.SessionService").await, NotServing);

    // Back, then the controller drains: every watch hears NOT_SERVING, then ends, so that open
    // watches do not hold up the graceful shutdown.
    let (stop_relay, relay_task) = relay(&keys, &c.url).await;
    assert_eq!(next(&mut overall).await, Some(Serving));
    assert_eq!(next(&mut sessions).await, Some(Serving));
    let mut registry = h
        .watch(HealthCheckRequest {
            service: "veil.v1.RelayRegistry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut registry).await, Some(Serving));
    assert!(c.state.readiness().is_ok());

    c.stop.send(()).unwrap();
    assert_eq!(next(&mut overall).await, Some(NotServing));
    assert_eq!(next(&mut sessions).await, Some(NotServing));
    assert_eq!(next(&mut registry).await, Some(NotServing));
    assert_eq!(
        c.state.readiness(),
        Err(veil_controller::state::NotReady::Draining)
    );
    for s in [&mut overall, &mut sessions, &mut registry, &mut nothing] {
        assert_eq!(next(s).await, None, "the watch ends at shutdown");
    }
    tokio::time::timeout(Duration::from_secs(10), c.task)
        .await
        .expect("the controller stops with watches and a relay attached")
        .unwrap()
        .unwrap();
    stop_relay.send(()).unwrap();
    relay_task.await.unwrap().unwrap();
}

/// Lists the services through reflection v1.
async fn list_v1(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// Lists the services through reflection v1alpha.
async fn list_v1alpha(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    let keys = generate_keys();
    let c = controller(&keys).await;
    let veil = [
        "grpc.health.v1.Health",
        "veil.v1.AdminService",
        "veil.v1.RelayRegistry",
        "veil.v1.ReplicaService",
        "veil.v1.SessionService",
    ];
    let mut want = veil.to_vec();
    want.insert(1, "grpc.reflection.v1.ServerReflection");
    assert_eq!(list_v1(&c.url).await, want);
    let mut want = veil.to_vec();
    want.insert(1, "grpc.reflection.v1alpha.ServerReflection");
    assert_eq!(list_v1alpha(&c.url).await, want);
    c.stop.send(()).unwrap();
    c.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_counted_by_method_and_code() {
    let keys = generate_keys();
    let c = controller(&keys).await;
    let m = &c.state.metrics;
    let mut api = common::client(&c.url).await;
    let mut h = HealthClient::new(channel(&c.url).await);

    // No relay: UNAVAILABLE, answered by the service.
    let e = api
        .allocate_session(common::request("counted", 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    // A malformed id: INVALID_ARGUMENT, twice.
    for _ in 0..2 {
        let e = api
            .get_session(pb::GetSessionRequest {
                session_id: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
    // A deadline already spent on arrival: answered by the deadline layer, inside this one
    // (sent without tonic's client, which would enforce the deadline itself and cancel).
    let addr: std::net::SocketAddr = c.url.trim_start_matches("http://").parse().unwrap();
    let bad_id = pb::GetSessionRequest {
        session_id: "nope".into(),
    };
    assert_eq!(
        raw_status(
            addr,
            "/veil.v1.SessionService/GetSession",
            &bad_id,
            &[("grpc-timeout", "0m")]
        )
        .await,
        4
    );
    // A path no service serves: UNIMPLEMENTED, counted as `other`, whatever it says.
    assert_eq!(
        raw_status(addr, "/veil.v1.Nope/Nothing", &bad_id, &[]).await,
        12
    );
    // OK, three times; a service the health server does not know: NOT_FOUND.
    for _ in 0..3 {
        check(&mut h, "veil.v1.RelayRegistry").await;
    }
    let _ = h
        .check(HealthCheckRequest {
            service: "veil.v1.Nothing".into(),
        })
        .await;
    // A stream that ends with a status in its trailers (WatchSession of an unknown session
    // fails before any message; a reflection exchange ends OK after its answer).
    let _ = list_v1(&c.url).await;

    use RpcCode::*;
    use RpcMethod::*;
    for (method, code, n) in [
        (AllocateSession, Unavailable, 1),
        (GetSession, InvalidArgument, 2),
        (GetSession, DeadlineExceeded, 1),
        (Other, Unimplemented, 1),
        (HealthCheck, Ok, 3),
        (HealthCheck, NotFound, 1),
        (ReflectionV1, Ok, 1),
        (ReleaseSession, Ok, 0),
    ] {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        // The status is counted as the response leaves; the client may have it a moment sooner.
        while m.rpc_requests(method, code) < n && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(m.rpc_requests(method, code), n, "{method:?} {code:?}");
    }

    let (status, text) = get(c.ops, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"veil_controller_grpc_requests_total{code="INVALID_ARGUMENT",method="veil.v1.SessionService/GetSession"} 2"#,
        r#"veil_controller_grpc_request_duration_seconds_count{method="veil.v1.SessionService/GetSession"} 3"#,
        r#"veil_controller_grpc_request_duration_seconds_count{method="veil.v1.SessionService/AllocateSession"} 1"#,
        // Zero series exist before any call; streams are counted, never timed.
        r#"veil_controller_grpc_requests_total{code="OK",method="veil.v1.AdminService/DrainRelay"} 0"#,
        r#"veil_controller_grpc_requests_total{code="OK",method="other"} 0"#,
        // Settings::local has no tokens: every role is open, and says so.
        r#"veil_controller_open_role{role="signaling"} 1"#,
        r#"veil_controller_open_role{role="relay"} 1"#,
        r#"veil_controller_open_role{role="admin"} 1"#,
    ] {
        assert!(text.contains(line), "/metrics lacks {line}");
    }
    assert!(!text.contains("veil_controller_grpc_request_duration_seconds_count{method=\"veil.v1.RelayRegistry/Attach\"}"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("veil_build_info{commit=") && l.ends_with(" 1")),
        "/metrics lacks veil_build_info"
    );
    c.stop.send(()).unwrap();
    c.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_tokens_are_exported_closed() {
    let keys = generate_keys();
    let mut s = Settings::local(keys.clone());
    s.signaling_tokens = vec!["signaling-token-0123456789".into()];
    s.admin_tokens = vec!["admin-token-0123456789abcd".into()];
    let server = ControllerServer::load(s).await.unwrap();
    let (status, text) = get(server.ops_addr(), "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"veil_controller_open_role{role="signaling"} 0"#,
        r#"veil_controller_open_role{role="relay"} 1"#,
        r#"veil_controller_open_role{role="admin"} 0"#,
    ] {
        assert!(text.contains(line), "/metrics lacks {line}");
    }
}
