//! The README's demo, `veil-loadtest --local`, as a new user runs it: it starts a cluster, runs
//! calls with real SRTP through it, and its figures agree with the relay's own metrics.

use std::process::Command;

#[test]
fn local_demo_runs_calls_through_the_relay_and_reports_honestly() {
    let dir = std::env::temp_dir().join(format!("veil-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let html = dir.join("r.html");
    let out = Command::new(env!("CARGO_BIN_EXE_veil-loadtest"))
        .args(["--local", "--calls", "6", "--duration", "3s", "--quiet"])
        .args([
            "--profile",
            "audio=2,video=1",
            "--client-ip-pool",
            "127.0.0.2-127.0.0.40",
        ])
        .arg("--report-json")
        .arg(&json)
        .arg("--report-html")
        .arg(&html)
        .output()
        .expect("run veil-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("relay relay-0: received"), "{stdout}");

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("key {k}"));
    assert_eq!(n("calls"), 6);
    assert_eq!(n("decrypt_failures"), 0);
    assert_eq!(n("foreign_datagrams"), 0);
    assert!(n("packets_sent") > 6 * 2 * 100, "{}", n("packets_sent"));
    assert_eq!(
        n("packets_expected"),
        n("packets_sent"),
        "two-party calls: each packet is due once"
    );
    // Loopback on an idle machine loses nothing; allow a trace for a loaded CI host.
    assert!(
        r["loss_ratio"].as_f64().unwrap() < 0.001,
        "{}",
        r["loss_ratio"]
    );
    assert_eq!(
        n("packets_lost") + n("packets_received"),
        n("packets_expected")
    );
    for k in ["p50", "p99", "p999"] {
        assert!(r["latency_us"][k].as_f64().unwrap() > 0.0);
    }
    for k in ["p50", "p99"] {
        assert!(r["allocation_latency_ms"][k].as_f64().unwrap() > 0.0);
    }
    assert!(r["jitter_ms"].as_f64().is_some());
    // The relay forwarded every RTP and RTCP packet that arrived, and nothing that did not.
    let delivered = n("packets_received") + n("rtcp_received");
    let forwarded = n("relay_forwarded_packets");
    assert!(
        forwarded >= delivered
            && forwarded - delivered <= n("packets_lost") + n("rtcp_sent") - n("rtcp_received"),
        "relay forwarded {forwarded}, participants got {delivered}"
    );

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg id=\"latency\"") && page.contains("<svg id=\"throughput\""));
    for fetch in ["src=", "href=", "@import", "url(", "http://", "https://"] {
        assert!(
            !page.contains(fetch),
            "the report loads nothing ({fetch}): it opens offline"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn churn_joins_and_leaves_calls_in_progress_on_three_replicas_with_no_loss_to_anyone() {
    let dir = std::env::temp_dir().join(format!("veil-churn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_veil-loadtest"))
        .args(["--local", "--calls", "3", "--participants", "3", "--quiet"])
        .args([
            "--churn",
            "4",
            "--churn-dwell",
            "1500ms",
            "--duration",
            "5s",
        ])
        // Three controller replicas: every allocation, join, leave and release goes to any.
        .args(["--local-controllers", "3"])
        .args([
            "--transport",
            "mixed",
            "--client-ip-pool",
            "127.0.0.2-127.0.0.40",
        ])
        .arg("--report-json")
        .arg(&json)
        .output()
        .expect("run veil-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("churn:"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("key {k}"));
    let churn = &r["churn"];
    // Every joiner of every call joined (AddParticipant, a bind), talked and left.
    assert_eq!(n(churn, "joins_planned"), 12);
    assert_eq!(n(churn, "joined"), 12, "{churn}");
    assert_eq!(n(churn, "failed"), 0, "{churn}");
    assert!(churn["join_latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    // Media to and from joiners decrypted (0 failures overall) and arrived.
    assert_eq!(n(&r, "decrypt_failures"), 0);
    assert_eq!(n(&r, "foreign_datagrams"), 0);
    assert!(n(churn, "packets_due") > 12 * 50, "{churn}");
    assert!(churn["loss_ratio"].as_f64().unwrap() < 0.001, "{churn}");
    // The call's own figures are its participants' only, untouched by the joiners: each of
    // their packets due to the two others, and all of them there.
    assert_eq!(n(&r, "packets_expected"), 2 * n(&r, "packets_sent"));
    assert!(
        r["loss_ratio"].as_f64().unwrap() < 0.001,
        "{}",
        r["loss_ratio"]
    );
    std::fs::remove_dir_all(&dir).ok();
}
