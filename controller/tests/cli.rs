//! The `veil-controller` binary's flags: documented in --help; bad configuration stops it with
//! exit status 64 and a message naming the field.

use std::process::Command;

fn controller(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_veil-controller"))
        .args(args)
        .env_clear()
        .output()
        .expect("run veil-controller");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_documents_every_flag() {
    let (code, out, _) = controller(&["--help"]);
    assert_eq!(code, 0);
    for (flag, env) in [
        ("--grpc-addr", Some("VEIL_CONTROLLER_GRPC_ADDR")),
        ("--ops-addr", Some("VEIL_CONTROLLER_OPS_ADDR")),
        ("--key-file", Some("VEIL_KEY_FILE")),
        (
            "--signaling-tokens",
            Some("VEIL_CONTROLLER_SIGNALING_TOKENS"),
        ),
        ("--relay-tokens", Some("VEIL_CONTROLLER_RELAY_TOKENS")),
        (
            "--region-distance",
            Some("VEIL_CONTROLLER_REGION_DISTANCES"),
        ),
        (
            "--relay-timeout-ms",
            Some("VEIL_CONTROLLER_RELAY_TIMEOUT_MS"),
        ),
        ("--leg-max-pps", Some("VEIL_CONTROLLER_LEG_MAX_PPS")),
        ("--leg-max-kbps", Some("VEIL_CONTROLLER_LEG_MAX_KBPS")),
        ("--dev", None),
        ("--dev-relays", None),
        ("--log-format", Some("VEIL_LOG_FORMAT")),
        ("--log-filter", Some("VEIL_LOG")),
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
        if let Some(env) = env {
            assert!(out.contains(env), "--help lacks {env}");
        }
    }
}

#[test]
fn bad_configuration_exits_64_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("veil-controller-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, format!("1 {} signing\n", "ab".repeat(32))).unwrap();
    let no_signing = dir.join("nosign");
    std::fs::write(&no_signing, format!("1 {}\n", "ab".repeat(32))).unwrap();
    let good = good.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--key-file"),
        (vec!["--key-file", "/nonexistent/keys"], "--key-file"),
        (vec!["--key-file", no_signing.to_str().unwrap()], "signing"),
        (
            vec!["--key-file", good, "--grpc-addr", "nowhere"],
            "--grpc-addr",
        ),
        (
            vec!["--key-file", good, "--region-distance", "eu=1"],
            "--region-distance",
        ),
        (
            vec!["--key-file", good, "--relay-timeout-ms", "10"],
            "--relay-timeout-ms",
        ),
        (
            vec!["--key-file", good, "--signaling-tokens", "short"],
            "--signaling-tokens",
        ),
        (vec!["--dev", "--dev-relays", "0"], "--dev-relays"),
        (vec!["--dev-relays", "2"], "--dev"),
    ];
    for (args, field) in cases {
        let (code, _, err) = controller(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(
            err.contains(field),
            "{args:?}: message should name {field}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
