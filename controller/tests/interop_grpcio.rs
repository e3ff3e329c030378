//! Interop with a gRPC stack Veil did not write: a Python signaling service built with grpcio and
//! grpcio-tools from `proto/` allocates, reads, watches, adds and removes a participant of, and
//! releases a session, checks health and
//! lists the services through grpcio-reflection (reflection v1alpha), and decodes an error's
//! `google.rpc` details, against a running controller. The Python environment is set up by the test command
//! (scripts/test.sh installs the packages into .venv); without it this test fails, never skips.

use std::process::Command;

use veil_controller::dev::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_signaling_service_drives_the_api() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh, which installs grpcio into .venv",
        python.display()
    );
    let c = Cluster::start(Options {
        relays: 2,
        workers_per_relay: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let target = c.controller_url.trim_start_matches("http://").to_string();
    let script = root.join("controller/tests/interop/grpcio_client.py");
    let proto = root.join("proto");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(["--target", &target])
            .arg("--proto")
            .arg(proto)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(
        summary["watch"],
        serde_json::json!([
            "KIND_SNAPSHOT",
            "KIND_PARTICIPANTS_CHANGED",
            "KIND_PARTICIPANTS_CHANGED",
            "KIND_EXTENDED",
            "KIND_RELEASED"
        ])
    );
    // 7200 s from a few seconds later than the 600 s were counted from.
    let by = summary["extended_by_s"].as_i64().unwrap();
    assert!((6600..=6660).contains(&by), "extended by {by} s");
    assert_eq!(summary["extended_tokens_same"], true);
    assert_eq!(summary["added"], serde_json::json!([true, 2, 3]));
    assert_eq!(summary["after_remove"], serde_json::json!(["alice", "bob"]));
    assert_eq!(
        summary["unknown_participant"],
        serde_json::json!(["NOT_FOUND", "PARTICIPANT_NOT_FOUND"])
    );
    assert_eq!(summary["bad_request_message"], "call_id must not be empty");
    // The details decode in another language's protobuf runtime, from the standard trailer.
    assert_eq!(
        summary["bad_request_details"],
        serde_json::json!({
            "status_code": 3,
            "status_message": "call_id must not be empty",
            "reason": "INVALID_FIELD",
            "domain": "veil.v1",
            "fields": [["call_id", "EMPTY"]],
        })
    );
    // grpcio-reflection's client asks grpc.reflection.v1alpha: every service is listed.
    assert_eq!(
        summary["reflection_services"],
        serde_json::json!([
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "veil.v1.AdminService",
            "veil.v1.RelayRegistry",
            "veil.v1.ReplicaService",
            "veil.v1.SessionService"
        ])
    );
    assert_eq!(
        summary["reflection_session_methods"],
        serde_json::json!([
            "AddParticipant",
            "AllocateSession",
            "ExtendSession",
            "GetSession",
            "ReleaseSession",
            "RemoveParticipant",
            "WatchSession"
        ])
    );
    assert_eq!(summary["health"], "SERVING");
    c.shutdown().await.unwrap();
}
