//! The public gRPC API against a real tonic server: precise status codes for bad requests,
//! idempotency on `call_id`, release, and the standard health and reflection services.

mod common;

use std::time::Duration;

use tonic::Code;
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;

use common::{Api, allocate, client, client_any, http_get, request, without_activity};

/// A local cluster of three controller replicas: the API tests send each RPC to any of them
/// (`client_any`).
async fn cluster(relays: usize) -> Cluster {
    Cluster::start(Options {
        relays,
        workers_per_relay: 1,
        controllers: 3,
        ..Options::default()
    })
    .await
    .unwrap()
}

async fn code_of(api: &mut Api, r: pb::AllocateSessionRequest) -> (Code, String) {
    let e = api.allocate_session(r).await.expect_err("must be refused");
    (e.code(), e.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_codes_and_change_nothing() {
    let c = cluster(1).await;
    let mut api = client_any(&c.controller_urls).await;

    let mut r = request("", 2);
    assert_eq!(
        code_of(&mut api, r.clone()).await,
        (Code::InvalidArgument, "call_id must not be empty".into())
    );
    r.call_id = "c".repeat(129);
    let (code, msg) = code_of(&mut api, r).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.starts_with("call_id must be at most 128 bytes"),
        "{msg}"
    );
    assert!(!msg.contains("ccccc"), "the hostile value is not echoed");

    let (code, msg) = code_of(&mut api, request("c", 0)).await;
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::InvalidArgument,
            "participants: a session needs 2 to 16, got 0"
        )
    );
    let (code, msg) = code_of(&mut api, request("c", 17)).await;
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::InvalidArgument,
            "participants: at most 16 per session, got 17"
        )
    );

    let mut r = request("c", 3);
    r.participants[2].participant_id = r.participants[0].participant_id.clone();
    let (code, msg) = code_of(&mut api, r).await;
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(
        msg,
        "participants[2].participant_id duplicates participants[0].participant_id"
    );

    for ttl in [1, 59, 86_401] {
        let mut r = request("c", 2);
        r.ttl_seconds = ttl;
        let (code, msg) = code_of(&mut api, r).await;
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.starts_with("ttl_seconds must be 0"), "{msg}");
    }

    for bad_id in ["", "nope", "0123456789ABCDEF", "00000000000000000"] {
        let e = api
            .get_session(pb::GetSessionRequest {
                session_id: bad_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad_id:?}");
        let e = api
            .release_session(pb::ReleaseSessionRequest {
                session_id: bad_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad_id:?}");
    }
    let unknown = "0123456789abcdef".to_string();
    let e = api
        .get_session(pb::GetSessionRequest {
            session_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "no session with this session_id")
    );
    let e = api
        .release_session(pb::ReleaseSessionRequest {
            session_id: unknown,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A request over the size limit is refused before it is parsed.
    let mut r = request("big", 2);
    r.participants[0].region = "r".repeat(100_000);
    let e = api.allocate_session(r).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // None of that created anything.
    assert_eq!(c.controller.sessions(), 0);
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_is_idempotent_on_call_id() {
    let c = cluster(2).await;
    let mut api = client_any(&c.controller_urls).await;
    let first = api
        .allocate_session(request("call-a", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let again = api
        .allocate_session(request("call-a", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(first.session, again.session, "same session, same tokens");

    let s = first.session.unwrap();
    assert_eq!(s.session_id.len(), 16);
    assert_eq!(s.state, pb::SessionState::Active as i32);
    assert_eq!(s.relays.len(), 2, "a primary and a backup");
    assert_eq!(s.relays[0].role, pb::RelayRole::Primary as i32);
    assert_eq!(s.relays[1].role, pb::RelayRole::Backup as i32);
    assert_ne!(s.relays[0].node_id, s.relays[1].node_id);
    let tokens: std::collections::HashSet<_> = s.legs.iter().map(|l| l.token.clone()).collect();
    assert_eq!(tokens.len(), 3, "one token per participant");
    for (i, leg) in s.legs.iter().enumerate() {
        assert_eq!(leg.participant_id, format!("participant-{i}"));
        assert_eq!(leg.leg_index, i as u32);
        assert_eq!(leg.token.len(), 64);
        assert_eq!(leg.relays, s.relays);
        assert_eq!(leg.transport, pb::Transport::Udp as i32);
        let expires = leg.expires_at.unwrap().seconds as u64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            (now + 3590..=now + 3610).contains(&expires),
            "default TTL is an hour"
        );
    }

    // Same call_id, other participants: refused.
    let (code, _) = code_of(&mut api, request("call-a", 2)).await;
    assert_eq!(code, Code::AlreadyExists);

    let got = api
        .get_session(pb::GetSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.session.map(without_activity).as_ref(), Some(&s));

    let released = api
        .release_session(pb::ReleaseSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        released.session.unwrap().state,
        pb::SessionState::Released as i32
    );
    // Releasing again succeeds (retries are safe); allocating the released call_id does not.
    api.release_session(pb::ReleaseSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .unwrap();
    let (code, msg) = code_of(&mut api, request("call-a", 3)).await;
    assert_eq!(code, Code::AlreadyExists);
    assert!(msg.contains("released"), "{msg}");
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_relay_means_unavailable() {
    let server = veil_controller::ControllerServer::load(veil_controller::config::Settings::local(
        veil_controller::dev::generate_keys(),
    ))
    .await
    .unwrap();
    let url = format!("http://{}", server.grpc_addr());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let mut api = client(&url).await;
    let (code, msg) = code_of(&mut api, request("lonely", 2)).await;
    assert_eq!(code, Code::Unavailable);
    assert!(msg.contains("no relay"), "{msg}");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let c = cluster(1).await;
    let channel = tonic::transport::Endpoint::from_shared(c.controller_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["veil.v1.SessionService", "veil.v1.RelayRegistry"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "veil.v1.SessionService",
        "veil.v1.RelayRegistry",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }

    // The ops endpoint: liveness, readiness (a relay is attached), metrics.
    let body = http_get(c.controller_ops, "/readyz").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let metrics = http_get(c.controller_ops, "/metrics").await;
    assert!(
        metrics.contains("veil_controller_relays{region=\"\",state=\"up\"} 1"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_oversized_input_gets_clear_errors() {
    let c = cluster(1).await;
    let mut api = client_any(&c.controller_urls).await;

    // Big, but under the message limit: refused by validation, the value never echoed.
    let mut r = request("c", 2);
    r.call_id = "\u{1F4A5}".repeat(15_000);
    let (code, msg) = code_of(&mut api, r).await;
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(msg, "call_id must be at most 128 bytes, got 60000");
    // 43 three-byte characters: 43 characters, 129 bytes. The limit is in bytes.
    let mut r = request("c", 2);
    r.participants[1].participant_id = "\u{2603}".repeat(43);
    let (code, msg) = code_of(&mut api, r).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.starts_with("participants[1].participant_id must be at most 128 bytes"),
        "{msg}"
    );

    // Too many participants, under and over the message limit.
    let (code, msg) = code_of(&mut api, request("c", 1000)).await;
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::InvalidArgument,
            "participants: at most 16 per session, got 1000"
        )
    );
    let mut r = request("c", 2);
    r.participants = (0..5_000)
        .map(|i| pb::Participant {
            participant_id: format!("participant-{i:08}"),
            ..Default::default()
        })
        .collect();
    assert_eq!(code_of(&mut api, r).await.0, Code::ResourceExhausted);
    // A huge session id in GetSession and ReleaseSession: over the limit, refused unparsed.
    let e = api
        .get_session(pb::GetSessionRequest {
            session_id: "0".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().len() < 200, "a short message: {}", e.message());

    // Control characters, C0 and C1, anywhere: refused, and named without the value.
    for bad in [
        "a\nb",
        "\u{1b}[2J\u{1b}[H",
        "nul\u{0}",
        "tab\t",
        "del\u{7f}",
        "nel\u{85}",
        "\r",
    ] {
        let mut r = request(bad, 2);
        let (code, msg) = code_of(&mut api, r.clone()).await;
        assert_eq!(
            (code, msg.as_str()),
            (
                Code::InvalidArgument,
                "call_id must not contain control characters"
            ),
            "{bad:?}"
        );
        r.call_id = "fine".into();
        r.participants[0].participant_id = bad.into();
        let (code, msg) = code_of(&mut api, r.clone()).await;
        assert_eq!(code, Code::InvalidArgument, "{bad:?}");
        assert!(!msg.contains(bad), "{msg:?}");
        r.participants[0].participant_id = "p".into();
        r.participants[1].region = bad.into();
        let (code, msg) = code_of(&mut api, r).await;
        assert_eq!(code, Code::InvalidArgument, "{bad:?}");
        assert!(msg.starts_with("participants[1].region"), "{msg}");
    }
    for bad in [
        "",
        "nope\n",
        "0123456789abcdef\u{0}",
        "\u{FEFF}0123456789abcdef",
    ] {
        let e = api
            .release_session(pb::ReleaseSessionRequest {
                session_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                Code::InvalidArgument,
                "session_id must be 16 lowercase hex digits"
            )
        );
    }

    // Odd but valid text (no control characters) is stored and returned exactly: the API does
    // not judge scripts, emoji, bidi overrides or zero-width characters, and no log prints them.
    let odd: [String; 4] = [
        "\u{202E}gnp.exe".into(),
        "\u{200D}\u{200B}\u{FEFF}".into(),
        "\u{1F600}".repeat(32),
        "\u{0645}\u{0631}\u{062D}\u{0628}\u{0627}".into(),
    ];
    let mut r = request(&odd[2], 3);
    r.participants[0].participant_id = odd[0].clone();
    r.participants[1].participant_id = odd[1].clone();
    r.participants[2].participant_id = odd[3].clone();
    r.participants[2].region = "\u{00E9}u-west".into();
    let s = allocate(&mut api, r).await;
    assert_eq!(s.call_id, odd[2]);
    assert_eq!(s.call_id.len(), 128);
    let ids: Vec<&str> = s.legs.iter().map(|l| l.participant_id.as_str()).collect();
    assert_eq!(ids, [&odd[0], &odd[1], &odd[3]]);

    assert_eq!(
        c.controller.sessions(),
        1,
        "only the valid request created anything"
    );
    c.shutdown().await.unwrap();
}

/// One unary call over a bare HTTP/2 connection with the headers given, and no client-side
/// timer (unlike tonic's client, which enforces `grpc-timeout` itself and reports `CANCELLED`):
/// what the server alone answers. Returns `grpc-status` and `grpc-message`.
async fn raw_unary(
    addr: std::net::SocketAddr,
    path: &str,
    msg: &impl prost::Message,
    headers: &[(&str, &str)],
) -> (u32, String) {
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
    // A server that answers from the headers alone (a spent deadline) may end the stream before
    // the body is sent: then the send fails, and the answer is what counts.
    let _ = send.send_data(bytes::Bytes::from(frame), true);
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    let read = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|s| {
            (
                s.to_str().unwrap().parse::<u32>().unwrap(),
                h.get("grpc-message")
                    .map(|m| m.to_str().unwrap().to_string())
                    .unwrap_or_default(),
            )
        })
    };
    // A trailers-only answer carries the status in its headers.
    if let Some(status) = read(resp.headers()) {
        return status;
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    read(&trailers).expect("grpc-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_deadlines_get_deadline_exceeded() {
    let c = cluster(1).await;
    let addr: std::net::SocketAddr = c
        .controller_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let path = "/veil.v1.SessionService/AllocateSession";
    // Already spent, or too short for any work: DEADLINE_EXCEEDED, and nothing allocated.
    for timeout in ["0n", "1n", "999u", "0m", "0S"] {
        let (status, msg) = raw_unary(
            addr,
            path,
            &request(&format!("late-{timeout}"), 2),
            &[("grpc-timeout", timeout)],
        )
        .await;
        assert_eq!(status, Code::DeadlineExceeded as u32, "{timeout}: {msg}");
    }
    assert_eq!(c.controller.sessions(), 0, "a spent deadline does no work");
    // A deadline with room, an unparseable one (ignored, as the spec allows), and none.
    for (i, headers) in [
        &[("grpc-timeout", "30S")][..],
        &[("grpc-timeout", "soon")][..],
        &[][..],
    ]
    .into_iter()
    .enumerate()
    {
        let (status, msg) =
            raw_unary(addr, path, &request(&format!("on-time-{i}"), 2), headers).await;
        assert_eq!(status, 0, "{headers:?}: {msg}");
    }
    // Through tonic's client, a spent deadline fails on the client's own timer or the server's,
    // whichever is first: never a panic, never a session, and the server carries on.
    let mut api = client_any(&c.controller_urls).await;
    for timeout in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(100),
    ] {
        let mut req = tonic::Request::new(request("tonic-late", 2));
        req.set_timeout(timeout);
        let e = api.allocate_session(req).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{e:?}"
        );
    }
    api.allocate_session(request("still-serving", 2))
        .await
        .unwrap();
    assert_eq!(c.controller.sessions(), 4);
    c.shutdown().await.unwrap();
}
