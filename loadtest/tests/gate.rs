//! `veil-loadtest` can gate a release: against a real cluster whose relay has no room, every
//! call fails and the run exits 99 with the reasons counted by kind and nothing measured shown
//! as n/a; with thresholds that allow the failures it saw, a partly failing run exits 0; a bad
//! threshold is a usage error (64), not a crossed threshold.
//!
//! The cluster is the same embedded dev cluster `--local` starts (controller and relay on
//! loopback, real sockets), started here with a small relay capacity; the load test is the
//! built binary, pointed at it with `--controller`.

use std::path::{Path, PathBuf};

use veil_controller::dev::{Cluster, Options};

/// Runs the binary; returns its exit status, standard output and JSON report.
async fn loadtest(
    dir: &Path,
    cluster: &Cluster,
    name: &str,
    args: &[&str],
) -> (Option<i32>, String, serde_json::Value) {
    let json: PathBuf = dir.join(format!("{name}.json"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_veil-loadtest"))
        .args(["--controller", &cluster.controller_url])
        .args(["--relay-metrics", &cluster.relays[0].metrics.to_string()])
        .args(["--duration", "1s", "--ramp-up", "1000", "--quiet"])
        .args(["--client-ip-pool", "127.0.0.2-127.0.0.30"])
        .arg("--report-json")
        .arg(&json)
        .args(args)
        .output()
        .await
        .expect("run veil-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = std::fs::read_to_string(&json)
        .map(|t| serde_json::from_str(&t).expect("the JSON report parses"))
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stdout}\n{stderr}"));
    (out.status.code(), stdout, report)
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["verdict"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {}", report["verdict"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_calls_exit_99_with_their_reasons_and_nothing_measured_is_na() {
    let dir = std::env::temp_dir().join(format!("veil-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One leg of room: no two-party call fits, so the controller places none.
    let cluster = Cluster::start(Options {
        capacities: vec![1],
        quic: false,
        ..Options::default()
    })
    .await
    .unwrap();

    let (code, stdout, r) = loadtest(
        &dir,
        &cluster,
        "full",
        &["--calls", "3", "--max-loss", "1%"],
    )
    .await;
    assert_eq!(code, Some(99), "a crossed threshold exits 99:\n{stdout}");
    assert!(
        stdout.contains("verdict:           FAIL (exit 99)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("3 failed: allocate_unavailable ×3"),
        "failures counted by kind:\n{stdout}"
    );
    assert!(stdout.contains("lost (n/a)"), "{stdout}");
    assert!(stdout.contains("one-way latency:   n/a"), "{stdout}");
    assert!(stdout.contains("media gap:         n/a"), "{stdout}");
    assert_eq!(r["calls"], 0);
    assert_eq!(r["calls_failed"], 3);
    assert_eq!(r["call_failures"]["allocate_unavailable"], 3);
    for unmeasured in [
        "loss_ratio",
        "latency_us",
        "jitter_ms",
        "media_gap_ms",
        "bind_latency_ms",
    ] {
        assert!(r[unmeasured].is_null(), "{unmeasured} is {}", r[unmeasured]);
    }
    assert_eq!(r["verdict"]["passed"], false);
    assert_eq!(check(&r, "failed_calls")["passed"], false);
    assert_eq!(check(&r, "media_measured")["passed"], false);
    let loss = check(&r, "loss");
    assert_eq!(
        (&loss["measured"], &loss["passed"]),
        (&serde_json::json!("n/a"), &serde_json::json!(false)),
        "a limit over an unmeasured figure is not met"
    );
    for t in r["timeline"].as_array().unwrap() {
        assert!(t["latency_p99_us"].is_null(), "{t}");
    }

    // The HTML report says the same.
    let html = dir.join("full.html");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_veil-loadtest"))
        .args(["--controller", &cluster.controller_url])
        .args(["--calls", "2", "--duration", "1s", "--quiet"])
        .arg("--report-html")
        .arg(&html)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(99));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<title>Veil load test report: FAIL"),
        "{page}"
    );
    assert!(page.contains("allocate_unavailable ×2"));
    assert!(page.contains("n/a: nothing was measured"));

    // A threshold that cannot be read is a usage error, not a failed run.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_veil-loadtest"))
        .args([
            "--controller",
            &cluster.controller_url,
            "--max-loss",
            "150%",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    cluster.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_within_the_allowed_count_pass() {
    let dir = std::env::temp_dir().join(format!("veil-gate-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Room for one two-party call: the first call runs, the others fail (at placement, or at
    // the relay's bind if a load report lands between two placements).
    let cluster = Cluster::start(Options {
        capacities: vec![2],
        quic: false,
        ..Options::default()
    })
    .await
    .unwrap();

    let (code, stdout, r) = loadtest(
        &dir,
        &cluster,
        "some",
        &["--calls", "3", "--max-failed-calls", "2"],
    )
    .await;
    assert_eq!(code, Some(0), "failures within the limit pass:\n{stdout}");
    assert!(stdout.contains("verdict:           PASS"), "{stdout}");
    let (ran, failed) = (
        r["calls"].as_u64().unwrap(),
        r["calls_failed"].as_u64().unwrap(),
    );
    assert!(ran >= 1 && failed >= 1 && ran + failed == 3, "{stdout}");
    let kinds: u64 = r["call_failures"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        kinds, failed,
        "every failure has a kind: {}",
        r["call_failures"]
    );
    assert!(r["loss_ratio"].is_number() && r["latency_us"]["p99"].is_number());
    assert_eq!(check(&r, "failed_calls")["limit"], "2");

    // The same run with the default allowance (none) fails.
    let (code, stdout, _) = loadtest(&dir, &cluster, "default", &["--calls", "3"]).await;
    assert_eq!(code, Some(99), "{stdout}");

    cluster.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
