//! Errors a client can act on, against a real tonic server: malformed protobuf and broken gRPC
//! framing get INVALID_ARGUMENT (tonic alone answers INTERNAL), oversized requests
//! RESOURCE_EXHAUSTED (tonic alone: OUT_OF_RANGE), on every service; every error carries a
//! `google.rpc.ErrorInfo` with a stable reason and the detail that says what to fix
//! (`BadRequest`, `QuotaFailure`, `RetryInfo`, `ResourceInfo`); the per-credential quotas refuse
//! with RESOURCE_EXHAUSTED, are counted, and are configurable; and no message or detail of any
//! of these errors names an address or a token.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use veil_controller::config::Settings;
use veil_controller::dev::{Cluster, Options, generate_keys};
use veil_controller::quota::{self, Quota};
use veil_proto::v1 as pb;
use veil_proto::v1::admin_service_client::AdminServiceClient;
use veil_proto::v1::relay_registry_client::RelayRegistryClient;

const SIGNALING_A: &str = "signaling-token-a-0123456789";
const SIGNALING_B: &str = "signaling-token-b-0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef";

// ---- raw HTTP/2 -------------------------------------------------------------------------------

/// One gRPC message frame: compression flag, length, payload.
fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends `body` (raw bytes: frames, broken or not) as one request to `path` over a bare HTTP/2
/// connection, and returns the gRPC status the server answers, from the headers of a
/// trailers-only answer or from the trailers.
async fn raw_call(addr: SocketAddr, path: &str, body: Vec<u8>) -> Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    // A server that answers early (a message over the limit, read from its header alone) may
    // reset the stream while the rest is in flight: the answer is what counts.
    let _ = send.send_data(bytes::Bytes::from(body), true);
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer within 5 s")
        .unwrap();
    if let Some(s) = Status::from_header_map(resp.headers()) {
        return s;
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    Status::from_header_map(&trailers).expect("grpc-status in the trailers")
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

// ---- what every error must be -----------------------------------------------------------------

fn details(s: &Status) -> ErrorDetails {
    s.check_error_details()
        .unwrap_or_else(|e| panic!("details of {s:?} do not decode: {e}"))
}

/// A dotted quad anywhere in `t`.
fn has_ipv4(t: &str) -> bool {
    t.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 4
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= 3 && p.parse::<u8>().is_ok())
        })
}

/// Nothing in the status (message, details, metadata) names an address or one of `secrets`.
fn assert_clean(s: &Status, secrets: &[String]) {
    let mut texts = vec![
        s.message().to_string(),
        String::from_utf8_lossy(s.details()).into_owned(),
        format!("{:?}", details(s)),
    ];
    for (_, v) in s.metadata().clone().into_headers().iter() {
        texts.push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    for t in &texts {
        assert!(!has_ipv4(t), "an address in {t:?} ({s:?})");
        assert!(!t.contains("[::"), "an address in {t:?} ({s:?})");
        for secret in secrets {
            assert!(!t.contains(secret.as_str()), "{secret:?} in {t:?} ({s:?})");
        }
    }
}

/// What must not appear in an error from cluster `c`: its addresses (and ports) and tokens.
fn secrets_of(controller_url: &str, relays: &[SocketAddr], tokens: &[&str]) -> Vec<String> {
    let ctl = addr_of(controller_url);
    let mut v = vec![
        ctl.to_string(),
        format!(":{}", ctl.port()),
        "localhost".into(),
    ];
    for r in relays {
        v.push(r.to_string());
        v.push(format!(":{}", r.port()));
    }
    v.extend(tokens.iter().map(|t| t.to_string()));
    v
}

// ---- protobuf payloads, broken in every way a client or proxy can break them -------------------

/// Field 15, an unknown field, as groups nested `depth` deep: past prost's recursion limit (100).
fn deep_groups(depth: usize) -> Vec<u8> {
    let mut p = vec![0x7B; depth]; // key: field 15, wire type 3 (start group)
    p.extend(std::iter::repeat_n(0x7C, depth)); // field 15, wire type 4 (end group)
    p
}

/// Malformed in any message type: (name, body).
fn malformed_anywhere() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("invalid wire type 7", frame(0, &[0x0F])),
        ("tag 0", frame(0, &[0x00, 0x01])),
        ("unterminated varint", frame(0, &[0x08, 0xFF, 0xFF, 0xFF])),
        (
            "varint over 10 bytes",
            frame(0, &[[0x08].as_slice(), &[0xFF; 11]].concat()),
        ),
        (
            "field longer than the message",
            frame(0, &[0x0A, 0x10, b'a', b'b']),
        ),
        ("nested too deep", frame(0, &deep_groups(200))),
        // The gRPC frame says 20 bytes; the stream ends after 5.
        ("truncated frame", frame(0, &[0u8; 20])[..10].to_vec()),
        ("bad compression flag", frame(2, &[])),
    ]
}

/// Malformed where field 1 is a string: (name, body, the field path BadRequest must name).
fn malformed_string_field(field: &'static str) -> Vec<(&'static str, Vec<u8>, String)> {
    vec![
        (
            "invalid UTF-8",
            frame(0, &[0x0A, 0x03, b'a', 0xFF, 0xFE]),
            field.to_string(),
        ),
        (
            "string sent as a varint",
            frame(0, &[0x08, 0x01]),
            field.to_string(),
        ),
        (
            "string cut short",
            frame(0, &[0x0A, 0x10, b'a', b'b', b'c']),
            field.to_string(),
        ),
    ]
}

fn assert_malformed(s: &Status, what: &str, secrets: &[String]) {
    assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
    assert_eq!(reason(s), "MALFORMED_REQUEST", "{what}: {s:?}");
    assert_clean(s, secrets);
}

const UNARY: [&str; 8] = [
    "/veil.v1.SessionService/AllocateSession",
    "/veil.v1.SessionService/GetSession",
    "/veil.v1.SessionService/ReleaseSession",
    "/veil.v1.SessionService/WatchSession",
    "/veil.v1.AdminService/DrainRelay",
    "/veil.v1.AdminService/ListRelays",
    "/veil.v1.ReplicaService/Sync",
    "/veil.v1.ReplicaService/Apply",
];
const ATTACH: &str = "/veil.v1.RelayRegistry/Attach";

/// A well-formed RelayHello, as the first message of an Attach stream.
fn hello_frame() -> Vec<u8> {
    let hello = pb::RelayMessage {
        kind: Some(pb::relay_message::Kind::Hello(pb::RelayHello {
            node_id: "raw-relay".into(),
            udp_address: "127.0.0.1:9".into(),
            capacity_legs: 10,
            ..Default::default()
        })),
    };
    frame(0, &prost::Message::encode_to_vec(&hello))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_invalid_argument_on_every_service() {
    let c = Cluster::start(Options {
        relays: 1,
        workers_per_relay: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let addr = addr_of(&c.controller_url);
    let secrets = secrets_of(&c.controller_url, &[c.relays[0].udp], &[]);

    for path in UNARY.iter().copied().chain([ATTACH]) {
        for (what, body) in malformed_anywhere() {
            let s = raw_call(addr, path, body).await;
            assert_malformed(&s, &format!("{path}: {what}"), &secrets);
        }
    }
    // Where the request message has a string field 1, its bad encodings name the field.
    for (path, field) in [
        (UNARY[0], "call_id"),
        (UNARY[1], "session_id"),
        (UNARY[2], "session_id"),
        (UNARY[3], "session_id"),
        (UNARY[4], "node_id"),
    ] {
        for (what, body, expected) in malformed_string_field(field) {
            let s = raw_call(addr, path, body).await;
            assert_malformed(&s, &format!("{path}: {what}"), &secrets);
            let d = details(&s);
            let v = &d
                .bad_request()
                .unwrap_or_else(|| panic!("{path}: {what}: no BadRequest in {s:?}"))
                .field_violations[0];
            assert_eq!(v.field, expected, "{path}: {what}");
            assert_eq!(v.reason, "UNDECODABLE", "{path}: {what}");
            assert!(
                s.message().starts_with("failed to decode Protobuf message"),
                "the precise message is kept: {s:?}"
            );
        }
    }
    // Nested fields are named by their path.
    let nested = [0x12, 0x05, 0x0A, 0x03, b'p', 0xC3, 0x28]; // participants[0].participant_id
    let s = raw_call(addr, UNARY[0], frame(0, &nested)).await;
    assert_malformed(&s, "nested invalid UTF-8", &secrets);
    assert_eq!(
        details(&s).bad_request().unwrap().field_violations[0].field,
        "participants.participant_id"
    );
    // A oneof member is named by its oneof (`kind`), which is what prost reports.
    let nested = [0x0A, 0x04, 0x0A, 0x02, 0xFF, 0xFE]; // hello.node_id
    let s = raw_call(addr, ATTACH, frame(0, &nested)).await;
    assert_malformed(&s, "Attach: invalid UTF-8 in the hello", &secrets);
    assert_eq!(
        details(&s).bad_request().unwrap().field_violations[0].field,
        "kind.node_id"
    );

    // A unary call without any message.
    for path in UNARY {
        let s = raw_call(addr, path, Vec::new()).await;
        assert_malformed(&s, &format!("{path}: no message"), &secrets);
        assert_eq!(s.message(), "the request carries no message");
    }
    // An Attach stream that ends before its hello, or starts with something else.
    let load = pb::RelayMessage {
        kind: Some(pb::relay_message::Kind::Load(Default::default())),
    };
    for body in [Vec::new(), frame(0, &prost::Message::encode_to_vec(&load))] {
        let s = raw_call(addr, ATTACH, body).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_eq!(reason(&s), "HELLO_REQUIRED");
        assert_clean(&s, &secrets);
    }
    // A relay whose later message does not decode hears why when its stream ends: the status
    // arrives in the trailers, rewritten there too.
    for (what, bad) in malformed_anywhere() {
        let body = [hello_frame(), bad].concat();
        let s = raw_call(addr, ATTACH, body).await;
        assert_malformed(&s, &format!("Attach, second message: {what}"), &secrets);
    }

    // The compressed flag without a grpc-encoding keeps INTERNAL, as the gRPC spec requires.
    let s = raw_call(addr, UNARY[1], frame(1, &[0x0A, 0x00])).await;
    assert_eq!(s.code(), Code::Internal, "{s:?}");

    // Counted by the codes clients got; the controller is unharmed.
    use veil_controller::metrics::{RpcCode, RpcMethod};
    assert!(
        c.controller
            .metrics
            .rpc_requests(RpcMethod::AllocateSession, RpcCode::InvalidArgument)
            >= 12
    );
    assert_eq!(
        c.controller
            .metrics
            .rpc_requests(RpcMethod::AllocateSession, RpcCode::Internal),
        0
    );
    let mut api = client(&c.controller_url).await;
    allocate(&mut api, request("after-the-garbage", 2)).await;
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_resource_exhausted_on_every_service() {
    let c = Cluster::start(Options {
        relays: 1,
        workers_per_relay: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let addr = addr_of(&c.controller_url);
    let secrets = secrets_of(&c.controller_url, &[c.relays[0].udp], &[]);
    let limit = veil_controller::MAX_MESSAGE_BYTES;
    let check = |s: &Status, what: &str, size: usize| {
        assert_eq!(s.code(), Code::ResourceExhausted, "{what}: {s:?}");
        assert_eq!(reason(s), "REQUEST_TOO_LARGE", "{what}");
        let d = details(s);
        let info = d.error_info().unwrap();
        assert_eq!(info.metadata["limit_bytes"], limit.to_string(), "{what}");
        assert_eq!(info.metadata["size_bytes"], size.to_string(), "{what}");
        assert_eq!(
            s.message(),
            format!("request message too large: {size} bytes, the limit is {limit} bytes")
        );
        assert_clean(s, &secrets);
    };
    // Over raw HTTP/2, to every service: one byte over the limit, and far over it (refused
    // from the frame's header, before the rest arrives).
    for size in [limit + 1, 1 << 20] {
        let big = frame(0, &vec![0u8; size]);
        for path in UNARY {
            check(&raw_call(addr, path, big.clone()).await, path, size);
        }
        check(&raw_call(addr, ATTACH, big.clone()).await, ATTACH, size);
        // A relay's later message over the limit: in the trailers.
        let body = [hello_frame(), big].concat();
        check(&raw_call(addr, ATTACH, body).await, "Attach, second", size);
    }
    // Exactly at the limit is decoded (and refused for what it says, not for its size).
    let mut r = request("at-the-limit", 2);
    let mut len = limit - prost::Message::encoded_len(&r) - 8;
    for _ in 0..10 {
        r.participants[0].region = "r".repeat(len);
        let n = prost::Message::encoded_len(&r);
        if n == limit {
            break;
        }
        len = len + limit - n;
    }
    assert_eq!(prost::Message::encoded_len(&r), limit);
    let mut api = client(&c.controller_url).await;
    let e = api.allocate_session(r.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(reason(&e), "INVALID_FIELD");
    // And through tonic's own client, as an application sees it.
    r.participants[0].region.push_str("rr");
    let e = api.allocate_session(r).await.unwrap_err();
    check(&e, "tonic client", limit + 2);
    let e = api
        .get_session(pb::GetSessionRequest {
            session_id: "0".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let mut admin = AdminServiceClient::connect(c.controller_url.clone())
        .await
        .unwrap();
    let e = admin
        .drain_relay(pb::DrainRelayRequest {
            node_id: "n".repeat(100_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "REQUEST_TOO_LARGE");
    c.shutdown().await.unwrap();
}

// ---- details on the controller's own errors -----------------------------------------------------

fn field_violation(s: &Status) -> (String, String, String) {
    let d = details(s);
    let v = d
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {s:?}"))
        .field_violations[0]
        .clone();
    (v.field, v.reason, v.description)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_carries_a_stable_reason_and_what_to_fix() {
    let c = Cluster::start(Options {
        relays: 1,
        workers_per_relay: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let secrets = secrets_of(&c.controller_url, &[c.relays[0].udp], &[]);
    let mut api = client(&c.controller_url).await;

    // INVALID_ARGUMENT: the message as before, the field and what is wrong with it as details.
    let mut cases: Vec<(pb::AllocateSessionRequest, &str, &str, &str)> = Vec::new();
    cases.push((
        request("", 2),
        "call_id",
        "EMPTY",
        "call_id must not be empty",
    ));
    let mut r = request("c", 2);
    r.call_id = "c".repeat(129);
    cases.push((
        r,
        "call_id",
        "TOO_LONG",
        "call_id must be at most 128 bytes, got 129",
    ));
    cases.push((
        request("a\nb", 2),
        "call_id",
        "CONTROL_CHARACTERS",
        "call_id must not contain control characters",
    ));
    cases.push((
        request("c", 1),
        "participants",
        "COUNT_OUT_OF_RANGE",
        "participants: a session needs 2 to 16, got 1",
    ));
    cases.push((
        request("c", 17),
        "participants",
        "COUNT_OUT_OF_RANGE",
        "participants: at most 16 per session, got 17",
    ));
    let mut r = request("c", 3);
    r.participants[2].participant_id = r.participants[0].participant_id.clone();
    cases.push((
        r,
        "participants[2].participant_id",
        "DUPLICATE",
        "participants[2].participant_id duplicates participants[0].participant_id",
    ));
    let mut r = request("c", 2);
    r.participants[1].region = "r".repeat(65);
    cases.push((
        r,
        "participants[1].region",
        "TOO_LONG",
        "participants[1].region must be at most 64 bytes without control characters",
    ));
    let mut r = request("c", 2);
    r.participants[0].preferred_transport = 9;
    cases.push((
        r,
        "participants[0].preferred_transport",
        "UNKNOWN_ENUM_VALUE",
        "participants[0].preferred_transport: unknown value 9",
    ));
    let mut r = request("c", 2);
    r.ttl_seconds = 59;
    cases.push((
        r,
        "ttl_seconds",
        "OUT_OF_RANGE",
        "ttl_seconds must be 0 (default 3600) or from 60 to 86400, got 59",
    ));
    for (r, field, violation, message) in cases {
        let e = api.allocate_session(r).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
        assert_eq!(reason(&e), "INVALID_FIELD", "{message}");
        assert_eq!(
            field_violation(&e),
            (field.into(), violation.into(), message.into())
        );
        assert_eq!(details(&e).error_info().unwrap().metadata["field"], field);
        assert_clean(&e, &secrets);
    }
    let e = api
        .get_session(pb::GetSessionRequest {
            session_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        field_violation(&e),
        (
            "session_id".into(),
            "BAD_FORMAT".into(),
            "session_id must be 16 lowercase hex digits".into()
        )
    );

    // NOT_FOUND, with the kind of resource.
    for e in [
        api.get_session(pb::GetSessionRequest {
            session_id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err(),
        api.release_session(pb::ReleaseSessionRequest {
            session_id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(
            (e.code(), e.message()),
            (Code::NotFound, "no session with this session_id")
        );
        assert_eq!(reason(&e), "SESSION_NOT_FOUND");
        assert_eq!(
            details(&e).resource_info().unwrap().resource_type,
            "veil.v1.Session"
        );
        assert_clean(&e, &secrets);
    }
    let mut watch = api
        .watch_session(pb::WatchSessionRequest {
            session_id: "0123456789abcdef".into(),
            leg_events: false,
        })
        .await;
    let e = watch.as_mut().unwrap_err();
    assert_eq!(reason(e), "SESSION_NOT_FOUND");

    // ALREADY_EXISTS, one reason per cause.
    let s = allocate(&mut api, request("taken", 2)).await;
    let e = api.allocate_session(request("taken", 3)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(
        e.message(),
        "call_id is already allocated with different participants"
    );
    assert_eq!(reason(&e), "CALL_ID_CONFLICT");
    assert_clean(&e, &secrets);
    api.release_session(pb::ReleaseSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .unwrap();
    let e = api.allocate_session(request("taken", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(reason(&e), "CALL_ID_RELEASED");
    assert_clean(&e, &secrets);

    // AdminService.
    let mut admin = AdminServiceClient::connect(c.controller_url.clone())
        .await
        .unwrap();
    let e = admin
        .drain_relay(pb::DrainRelayRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        field_violation(&e),
        (
            "node_id".into(),
            "EMPTY".into(),
            "node_id must not be empty".into()
        )
    );
    let e = admin
        .drain_relay(pb::DrainRelayRequest {
            node_id: "relay-0".into(),
            draining: true,
            deadline_seconds: 86_401,
        })
        .await
        .unwrap_err();
    assert_eq!(field_violation(&e).0, "deadline_seconds");
    let e = admin
        .drain_relay(pb::DrainRelayRequest {
            node_id: "no-such-relay".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "no relay with this node_id")
    );
    assert_eq!(reason(&e), "RELAY_NOT_FOUND");
    assert!(!e.message().contains("no-such-relay"));
    assert_clean(&e, &secrets);

    // RelayRegistry: a hello that names a bad address is refused naming the field, not the
    // address.
    let mut registry = RelayRegistryClient::connect(c.controller_url.clone())
        .await
        .unwrap();
    let hello = pb::RelayMessage {
        kind: Some(pb::relay_message::Kind::Hello(pb::RelayHello {
            node_id: "bad-relay".into(),
            udp_address: "192.0.2.7".into(),
            capacity_legs: 1,
            ..Default::default()
        })),
    };
    let e = registry
        .attach(tokio_stream::iter([hello]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        field_violation(&e),
        (
            "hello.udp_address".into(),
            "BAD_FORMAT".into(),
            "hello.udp_address must be ip:port".into()
        )
    );
    assert_clean(&e, &secrets);
    c.shutdown().await.unwrap();

    // UNAVAILABLE: no relay attached.
    let server = veil_controller::ControllerServer::load(Settings::local(generate_keys()))
        .await
        .unwrap();
    let url = format!("http://{}", server.grpc_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let mut api = client(&url).await;
    let e = api
        .allocate_session(request("nowhere", 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(reason(&e), "NO_RELAY_AVAILABLE");
    assert_clean(&e, &secrets_of(&url, &[], &[]));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

// ---- quotas -----------------------------------------------------------------------------------

fn as_caller<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    r
}

/// A controller with `limits` for two signaling credentials (A at position 0, B at 1) and an
/// admin credential, with one relay attached; stopped with `stop`.
struct Quotaed {
    url: String,
    ops: SocketAddr,
    relay_udp: SocketAddr,
    state: std::sync::Arc<veil_controller::state::Controller>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Quotaed {
    async fn start(limits: quota::Limits) -> Self {
        let keys = generate_keys();
        let mut settings = Settings::local(keys.clone());
        settings.signaling_tokens = vec![SIGNALING_A.into(), SIGNALING_B.into()];
        settings.admin_tokens = vec![ADMIN.into()];
        settings.quotas = limits;
        let server = veil_controller::ControllerServer::load(settings)
            .await
            .unwrap();
        let url = format!("http://{}", server.grpc_addr());
        let ops = server.ops_addr();
        let state = server.controller().clone();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = vec![tokio::spawn(server.run(wait(rx.clone())))];
        let relay = veil_relay::RelayServer::load(veil_relay::config::Settings::local(
            keys,
            "relay-0",
            vec![url.clone()],
        ))
        .await
        .unwrap();
        let relay_udp = relay.public_udp_addr();
        tasks.push(tokio::spawn(relay.run(wait(rx))));
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while state.registry.up() < 1 {
            assert!(
                std::time::Instant::now() < until,
                "the relay did not attach"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            url,
            ops,
            relay_udp,
            state,
            stop,
            tasks,
        }
    }

    fn secrets(&self) -> Vec<String> {
        secrets_of(
            &self.url,
            &[self.relay_udp],
            &[SIGNALING_A, SIGNALING_B, ADMIN],
        )
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        for t in self.tasks {
            t.await.unwrap().unwrap();
        }
    }
}

fn quota_violation(s: &Status) -> (String, i64) {
    let d = details(s);
    let v = d
        .quota_failure()
        .unwrap_or_else(|| panic!("no QuotaFailure in {s:?}"))
        .violations[0]
        .clone();
    (v.quota_id, v.quota_value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_each_signaling_credential_to_its_own_limits() {
    let q = Quotaed::start(quota::Limits {
        live_sessions: 2,
        watch_streams: 1,
        allocations_per_sec: 10,
    })
    .await;
    let secrets = q.secrets();
    let mut api = client(&q.url).await;

    // Live sessions: A may hold two.
    let a1 = allocate(&mut api, as_caller(request("a-1", 2), SIGNALING_A)).await;
    allocate(&mut api, as_caller(request("a-2", 2), SIGNALING_A)).await;
    let e = api
        .allocate_session(as_caller(request("a-3", 2), SIGNALING_A))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(reason(&e), "QUOTA_LIVE_SESSIONS");
    assert_eq!(quota_violation(&e), ("live_sessions".into(), 2));
    assert!(e.message().contains("2 live sessions"), "{}", e.message());
    assert_clean(&e, &secrets);
    // A retry of a session it holds is no new session: still answered.
    let again = allocate(&mut api, as_caller(request("a-1", 2), SIGNALING_A)).await;
    assert_eq!(again.session_id, a1.session_id);
    // B has quotas of its own.
    let b1 = allocate(&mut api, as_caller(request("b-1", 2), SIGNALING_B)).await;
    // A released session stops counting at once.
    api.release_session(as_caller(
        pb::ReleaseSessionRequest {
            session_id: a1.session_id.clone(),
        },
        SIGNALING_A,
    ))
    .await
    .unwrap();
    allocate(&mut api, as_caller(request("a-3", 2), SIGNALING_A)).await;
    assert_eq!(
        q.state.quotas.usage().collect::<Vec<_>>(),
        [("0", 2, 0), ("1", 1, 0)]
    );

    // Watch streams: one at a time per credential.
    let watch = |token: &'static str, id: String| {
        let mut api = api.clone();
        async move {
            api.watch_session(as_caller(
                pb::WatchSessionRequest {
                    session_id: id,
                    leg_events: false,
                },
                token,
            ))
            .await
        }
    };
    let first = watch(SIGNALING_B, b1.session_id.clone()).await.unwrap();
    let e = watch(SIGNALING_B, b1.session_id.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "QUOTA_WATCH_STREAMS");
    assert_eq!(quota_violation(&e), ("watch_streams".into(), 1));
    assert_clean(&e, &secrets);
    // A's quota is its own (any session may be watched by any signaling credential).
    let other = watch(SIGNALING_A, b1.session_id.clone()).await.unwrap();
    // Closing a stream gives its place back, as soon as the controller sees it gone.
    drop(first);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let _second = loop {
        match watch(SIGNALING_B, b1.session_id.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                assert_eq!(reason(&e), "QUOTA_WATCH_STREAMS");
                assert!(
                    std::time::Instant::now() < until,
                    "the closed watch still counts"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    drop(other);

    // Allocation rate: B calls as fast as it can (retries of one call_id, so that its live
    // sessions stay put); past its burst it is refused, with when to retry.
    let (mut granted, mut refused) = (0, None);
    let started = std::time::Instant::now();
    for _ in 0..40 {
        match api
            .allocate_session(as_caller(request("b-1", 2), SIGNALING_B))
            .await
        {
            Ok(_) => granted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("refused past the burst");
    // At most the burst (10, less what B spent above) and what refilled meanwhile.
    let refilled = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        granted <= 10 + refilled,
        "{granted} granted in {:?} at 10 a second",
        started.elapsed()
    );
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "QUOTA_ALLOCATION_RATE");
    assert_eq!(quota_violation(&e), ("allocations_per_sec".into(), 10));
    let delay = details(&e)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(100),
        "{delay:?}"
    );
    assert_clean(&e, &secrets);
    // Retrying when told to succeeds; A was never slowed down.
    tokio::time::sleep(delay).await;
    allocate(&mut api, as_caller(request("b-1", 2), SIGNALING_B)).await;
    allocate(&mut api, as_caller(request("a-2", 2), SIGNALING_A)).await;

    // Credentials: refused with reasons, never echoed.
    for (token, code, why) in [
        (None, Code::Unauthenticated, "CREDENTIAL_MISSING"),
        (
            Some("signaling-token-c-0123456789"),
            Code::Unauthenticated,
            "CREDENTIAL_INVALID",
        ),
        (Some(ADMIN), Code::PermissionDenied, "CREDENTIAL_WRONG_ROLE"),
    ] {
        let req = match token {
            Some(t) => as_caller(request("c-1", 2), t),
            None => tonic::Request::new(request("c-1", 2)),
        };
        let e = api.allocate_session(req).await.unwrap_err();
        assert_eq!((e.code(), reason(&e).as_str()), (code, why));
        let mut secrets = secrets.clone();
        secrets.push("signaling-token-c".into());
        assert_clean(&e, &secrets);
    }

    // Refusals are counted by quota and credential position, and the usage exported; no
    // token appears in the metrics.
    let m = &q.state.metrics;
    assert_eq!(m.quota_refusals(Quota::LiveSessions, "0"), 1);
    assert_eq!(m.quota_refusals(Quota::LiveSessions, "1"), 0);
    assert!(m.quota_refusals(Quota::WatchStreams, "1") >= 1);
    assert_eq!(m.quota_refusals(Quota::AllocationRate, "1"), 1);
    assert_eq!(m.quota_refusals(Quota::AllocationRate, "0"), 0);
    let text = http_get(q.ops, "/metrics").await;
    for series in [
        "veil_controller_quota_limit{quota=\"live_sessions\"} 2",
        "veil_controller_quota_limit{quota=\"watch_streams\"} 1",
        "veil_controller_quota_limit{quota=\"allocations_per_sec\"} 10",
        "veil_controller_credential_sessions{credential=\"0\"} 2",
        "veil_controller_credential_sessions{credential=\"1\"} 1",
        "veil_controller_allocations_total{result=\"quota\"} 2",
    ] {
        assert!(text.contains(series), "lacks {series}");
    }
    let refusal_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("veil_controller_quota_refusals_total{"))
        .collect();
    assert_eq!(
        refusal_lines.len(),
        6,
        "3 quotas x 2 credentials: {refusal_lines:?}"
    );
    for t in [SIGNALING_A, SIGNALING_B, ADMIN] {
        assert!(!text.contains(t), "a token in the metrics");
    }
    q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_means_unlimited() {
    let q = Quotaed::start(quota::Limits::UNLIMITED).await;
    let mut api = client(&q.url).await;
    for i in 0..50 {
        allocate(
            &mut api,
            as_caller(request(&format!("free-{i}"), 2), SIGNALING_A),
        )
        .await;
    }
    let id = allocate(&mut api, as_caller(request("free-0", 2), SIGNALING_A))
        .await
        .session_id;
    let mut watches = Vec::new();
    for _ in 0..5 {
        let req = pb::WatchSessionRequest {
            session_id: id.clone(),
            leg_events: false,
        };
        watches.push(
            api.watch_session(as_caller(req, SIGNALING_A))
                .await
                .unwrap(),
        );
    }
    assert_eq!(q.state.quotas.usage().next(), Some(("0", 50, 5)));
    drop(watches);
    q.stop().await;
}

// ---- configuration ----------------------------------------------------------------------------

fn controller_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_veil-controller"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run veil-controller");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn quotas_are_flags_with_environment_variables_shown_by_check_config() {
    let (code, help, _) = controller_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    for (flag, env, default) in [
        (
            "--quota-live-sessions",
            "VEIL_CONTROLLER_QUOTA_LIVE_SESSIONS",
            "100000",
        ),
        (
            "--quota-watch-streams",
            "VEIL_CONTROLLER_QUOTA_WATCH_STREAMS",
            "10000",
        ),
        (
            "--quota-allocations-per-sec",
            "VEIL_CONTROLLER_QUOTA_ALLOCATIONS_PER_SEC",
            "1000",
        ),
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(help.contains(env), "--help lacks {env}");
        assert!(
            help.contains(&format!("[default: {default}]")),
            "--help lacks {flag}'s default"
        );
    }

    let dir = std::env::temp_dir().join(format!("veil-errors-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("1 {} signing\n", "ab".repeat(32))).unwrap();
    let keys = keys.to_str().unwrap();
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let (code, out, err) = controller_cli(
        &[
            "--check-config",
            "--key-file",
            keys,
            "--grpc-addr",
            "127.0.0.1:50051",
        ],
        &[
            ("VEIL_CONTROLLER_QUOTA_LIVE_SESSIONS", "500"),
            ("VEIL_CONTROLLER_QUOTA_WATCH_STREAMS", "0"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    for line in [
        "quota-live-sessions = 500",
        "quota-watch-streams = 0 (unlimited)",
        "quota-allocations-per-sec = 1000",
    ] {
        assert!(squeeze(&out).contains(line), "lacks {line:?}: {out}");
    }
    // A flag overrides its variable; a value that is no count exits 64 naming the flag.
    let (code, out, _) = controller_cli(
        &[
            "--check-config",
            "--key-file",
            keys,
            "--grpc-addr",
            "127.0.0.1:50051",
            "--quota-allocations-per-sec",
            "7",
        ],
        &[("VEIL_CONTROLLER_QUOTA_ALLOCATIONS_PER_SEC", "9")],
    );
    assert_eq!(code, 0);
    assert!(
        squeeze(&out).contains("quota-allocations-per-sec = 7"),
        "{out}"
    );
    for bad in ["-1", "many", "4294967296"] {
        let arg = format!("--quota-live-sessions={bad}");
        let (code, _, err) = controller_cli(&["--check-config", "--key-file", keys, &arg], &[]);
        assert_eq!(code, 64, "{bad}: {err}");
        assert!(err.contains("--quota-live-sessions"), "{bad}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
