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
            "--relay-identities",
            Some("VEIL_CONTROLLER_RELAY_IDENTITIES"),
        ),
        ("--admin-tokens", Some("VEIL_CONTROLLER_ADMIN_TOKENS")),
        (
            "--allow-open-role",
            Some("VEIL_CONTROLLER_ALLOW_OPEN_ROLES"),
        ),
        ("--check-config", None),
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
        (
            "--quota-live-sessions",
            Some("VEIL_CONTROLLER_QUOTA_LIVE_SESSIONS"),
        ),
        (
            "--quota-watch-streams",
            Some("VEIL_CONTROLLER_QUOTA_WATCH_STREAMS"),
        ),
        (
            "--quota-allocations-per-sec",
            Some("VEIL_CONTROLLER_QUOTA_ALLOCATIONS_PER_SEC"),
        ),
        ("--replica-id", Some("VEIL_CONTROLLER_REPLICA_ID")),
        ("--peers", Some("VEIL_CONTROLLER_PEERS")),
        ("--peer-tokens", Some("VEIL_CONTROLLER_PEER_TOKENS")),
        ("--dev", None),
        ("--dev-relays", None),
        ("--dev-controllers", None),
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
        (
            vec![
                "--key-file",
                good,
                "--relay-identities",
                "relay-token-without-node-0123",
            ],
            "--relay-identities: each entry must be NODE_ID:TOKEN",
        ),
        (
            vec![
                "--key-file",
                good,
                "--relay-identities",
                ":relay-token-0123456789",
            ],
            "--relay-identities: each NODE_ID",
        ),
        (
            vec!["--key-file", good, "--relay-networks", "203.0.113.0/33"],
            "--relay-networks: each entry must be CIDR or NODE_ID=CIDR",
        ),
        (
            vec!["--key-file", good, "--relay-networks", "=203.0.113.0/24"],
            "--relay-networks: each NODE_ID",
        ),
        (
            vec!["--key-file", good, "--relay-identities", "relay-0:short"],
            "--relay-identities: each token must be at least 16 characters",
        ),
        (
            vec![
                "--key-file",
                good,
                "--relay-identities",
                "relay-0:relay-token-0123456789,relay-0:relay-token-9876543210",
            ],
            "--relay-identities: each NODE_ID once",
        ),
        (
            vec![
                "--key-file",
                good,
                "--relay-identities",
                "relay-0:relay-token-0123456789,relay-1:relay-token-0123456789",
            ],
            "--relay-identities: each relay needs a token of its own",
        ),
        (
            vec![
                "--key-file",
                good,
                "--relay-tokens",
                "relay-token-0123456789",
                "--relay-identities",
                "relay-0:relay-token-0123456789",
            ],
            "--relay-tokens and --relay-identities must not share a token",
        ),
        (vec!["--dev", "--dev-relays", "0"], "--dev-relays"),
        (vec!["--dev-relays", "2"], "--dev"),
        (vec!["--dev", "--dev-controllers", "0"], "--dev-controllers"),
        (vec!["--dev", "--dev-controllers", "6"], "--dev-controllers"),
        (vec!["--dev-controllers", "3"], "--dev"),
        (
            vec!["--key-file", good, "--replica-id", "a b"],
            "--replica-id",
        ),
        (
            vec!["--key-file", good, "--peers", "controller-1:50051"],
            "--peers",
        ),
        (
            vec![
                "--key-file",
                good,
                "--peers",
                "http://controller-1:50051,http://controller-1:50051",
            ],
            "--peers: each replica once",
        ),
        (
            vec!["--key-file", good, "--peer-tokens", "short"],
            "--peer-tokens",
        ),
        (
            vec![
                "--key-file",
                good,
                "--peer-tokens",
                "signaling-token-0123456789",
                "--signaling-tokens",
                "signaling-token-0123456789",
            ],
            "must not share a token",
        ),
        // Replicas send each other every session's leg tokens: never without a credential
        // on a reachable address.
        (
            vec![
                "--key-file",
                good,
                "--grpc-addr",
                "0.0.0.0:50051",
                "--signaling-tokens",
                SIGNALING,
                "--relay-tokens",
                RELAY,
                "--admin-tokens",
                ADMIN,
                "--peers",
                "http://controller-1:50051",
            ],
            "--peers needs --peer-tokens",
        ),
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

/// A key file for the tests below, removed on drop.
struct Keys(std::path::PathBuf);

impl Keys {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("veil-ctl-cli-{name}-{}", std::process::id()));
        std::fs::write(&path, format!("1 {} signing\n", "cd".repeat(32))).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

const SIGNALING: &str = "signaling-token-0123456789";
const RELAY: &str = "relay-token-0123456789abc";
const ADMIN: &str = "admin-token-0123456789abcd";

#[test]
fn an_open_role_on_a_reachable_address_refuses_to_start_naming_role_and_flag() {
    let keys = Keys::new("open");
    // Each role in turn left open on a wildcard address: the message names its tokens flag
    // and the flag that would allow it.
    for (open, others) in [
        (
            "signaling",
            ["--relay-tokens", RELAY, "--admin-tokens", ADMIN],
        ),
        (
            "relay",
            ["--signaling-tokens", SIGNALING, "--admin-tokens", ADMIN],
        ),
        (
            "admin",
            ["--signaling-tokens", SIGNALING, "--relay-tokens", RELAY],
        ),
    ] {
        let mut args = vec!["--key-file", keys.path(), "--grpc-addr", "0.0.0.0:50051"];
        args.extend(others);
        for run in [&args[..], &[&args[..], &["--check-config"]].concat()] {
            let (code, out, err) = controller(run);
            assert_eq!(code, 64, "{open} open: {out}{err}");
            assert!(
                err.contains(&format!("--{open}-tokens is empty"))
                    && err.contains(&format!("--allow-open-role {open}")),
                "{open} open: {err}"
            );
        }
        // Allowed on purpose, it starts (here: checks) and says which role is open.
        args.extend(["--allow-open-role", open, "--check-config"]);
        let (code, out, err) = controller(&args);
        assert_eq!(code, 0, "{open} allowed: {err}");
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["open-roles", "=", open]),
            "{out}"
        );
    }
    // Loopback is the developer's own machine: open roles start there, as before.
    let (code, out, err) = controller(&[
        "--key-file",
        keys.path(),
        "--grpc-addr",
        "127.0.0.1:50051",
        "--check-config",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["open-roles", "=", "signaling,relay,admin"]),
        "{out}"
    );
    // Allowing a role that has tokens is a contradiction, not a silent choice.
    let (code, _, err) = controller(&[
        "--key-file",
        keys.path(),
        "--grpc-addr",
        "0.0.0.0:50051",
        "--signaling-tokens",
        SIGNALING,
        "--relay-tokens",
        RELAY,
        "--admin-tokens",
        ADMIN,
        "--allow-open-role",
        "admin",
    ]);
    assert_eq!(code, 64);
    assert!(
        err.contains("--allow-open-role admin contradicts --admin-tokens"),
        "{err}"
    );
}

#[test]
fn check_config_prints_the_effective_settings_without_secrets_and_binds_nothing() {
    let keys = Keys::new("check");
    // The port is taken: a check that bound it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_veil-controller"))
        .args(["--check-config", "--grpc-addr", &addr, "--ops-addr", &addr])
        .env_clear()
        .env("VEIL_KEY_FILE", keys.path())
        .env(
            "VEIL_CONTROLLER_SIGNALING_TOKENS",
            format!("{SIGNALING},{SIGNALING}-2"),
        )
        .env("VEIL_CONTROLLER_RELAY_TOKENS", RELAY)
        .env("VEIL_CONTROLLER_ADMIN_TOKENS", ADMIN)
        .env("VEIL_CONTROLLER_LEG_MAX_PPS", "1234")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("veil-controller: configuration is valid\n"),
        "{stdout}"
    );
    for line in [
        format!("grpc-addr        = {addr}"),
        "signaling-tokens = <redacted: 2 values>".to_string(),
        "admin-tokens     = <redacted: 1 value>".to_string(),
        "open-roles       = none".to_string(),
        "leg-max-pps      = 1234".to_string(),
        "(key ids 1, signing 1)".to_string(),
    ] {
        // Columns align to the longest name: compare with runs of spaces collapsed.
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            squeeze(&stdout).contains(&squeeze(&line)),
            "lacks {line:?}: {stdout}"
        );
    }
    for secret in [SIGNALING, RELAY, ADMIN, &"cd".repeat(32)] {
        assert!(!stdout.contains(secret), "a secret leaked: {stdout}");
    }
}
