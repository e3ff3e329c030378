//! The `veil-relay` binary's flags: documented in --help, and bad configuration stops it with
//! exit status 64 and a message naming the field, before it binds anything.

use std::process::Command;

fn relay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_veil-relay"))
        .args(args)
        .env_clear()
        .output()
        .expect("run veil-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A key file in the temporary directory, removed on drop.
struct KeyFile(std::path::PathBuf);

impl KeyFile {
    fn with(content: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("veil-relay-cli-{}-{n}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        Self(p)
    }

    fn as_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn key_file(content: &str) -> KeyFile {
    KeyFile::with(content)
}

const GOOD_KEY: &str =
    "1 0101010101010101010101010101010101010101010101010101010101010101 signing\n";

#[test]
fn help_documents_every_flag_and_its_environment_variable() {
    let (code, out, _) = relay(&["--help"]);
    assert_eq!(code, 0);
    for (flag, env) in [
        ("--udp-addr", "VEIL_RELAY_UDP_ADDR"),
        ("--public-udp-addr", "VEIL_RELAY_PUBLIC_UDP_ADDR"),
        ("--ops-addr", "VEIL_RELAY_OPS_ADDR"),
        ("--workers", "VEIL_RELAY_WORKERS"),
        ("--controller", "VEIL_RELAY_CONTROLLERS"),
        ("--key-file", "VEIL_KEY_FILE"),
        ("--controller-token", "VEIL_RELAY_CONTROLLER_TOKEN"),
        ("--node-id", "VEIL_RELAY_NODE_ID"),
        ("--region", "VEIL_RELAY_REGION"),
        ("--zone", "VEIL_RELAY_ZONE"),
        ("--leg-idle-secs", "VEIL_RELAY_LEG_IDLE_SECS"),
        ("--max-legs", "VEIL_RELAY_MAX_LEGS"),
        ("--drain-deadline-secs", "VEIL_RELAY_DRAIN_DEADLINE_SECS"),
        ("--log-format", "VEIL_LOG_FORMAT"),
        ("--log-filter", "VEIL_LOG"),
        ("--turn-tcp-addr", "VEIL_RELAY_TURN_TCP_ADDR"),
        ("--turn-tls-addr", "VEIL_RELAY_TURN_TLS_ADDR"),
        ("--turn-tls-cert-file", "VEIL_RELAY_TURN_TLS_CERT_FILE"),
        ("--turn-tls-key-file", "VEIL_RELAY_TURN_TLS_KEY_FILE"),
        ("--public-turn-tcp-addr", "VEIL_RELAY_PUBLIC_TURN_TCP_ADDR"),
        ("--public-turn-tls-addr", "VEIL_RELAY_PUBLIC_TURN_TLS_ADDR"),
        ("--turn-max-connections", "VEIL_RELAY_TURN_MAX_CONNECTIONS"),
        ("--xdp", "VEIL_RELAY_XDP"),
        ("--xdp-interfaces", "VEIL_RELAY_XDP_INTERFACES"),
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
        assert!(out.contains(env), "--help lacks {env}");
    }
    assert!(
        out.contains("--check-config"),
        "--help lacks --check-config"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_field() {
    let good = key_file(GOOD_KEY);
    let bad = key_file("1 00ff signing\n");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--key-file"),
        // Without interfaces, or (in a build without the `xdp` feature) at all.
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--xdp",
                "native",
            ],
            "--xdp",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--xdp",
                "auto",
            ],
            "--xdp-interfaces",
        ),
        (vec!["--key-file", "/nonexistent/veil-keys"], "--key-file"),
        (vec!["--key-file", bad.as_str()], "line 1"),
        (
            vec!["--key-file", good.as_str(), "--udp-addr", "nonsense"],
            "--udp-addr",
        ),
        (
            vec!["--key-file", good.as_str(), "--udp-addr", "[::]:40000"],
            "--public-udp-addr",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--leg-idle-secs",
                "0",
            ],
            "--leg-idle-secs",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--controller",
                "ftp://x",
            ],
            "--controller",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--log-filter",
                "[[[",
            ],
            "--log-filter",
        ),
        (
            vec!["--key-file", good.as_str(), "--log-format", "xml"],
            "--log-format",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--turn-tls-addr",
                "127.0.0.1:0",
            ],
            "--turn-tls-cert-file",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--turn-tls-addr",
                "127.0.0.1:0",
                "--turn-tls-cert-file",
                "/nonexistent/cert.pem",
                "--turn-tls-key-file",
                "/nonexistent/key.pem",
            ],
            "--turn-tls-cert-file",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--turn",
                "false",
                "--turn-tcp-addr",
                "127.0.0.1:0",
            ],
            "--turn-tcp-addr",
        ),
        (
            vec![
                "--key-file",
                good.as_str(),
                "--udp-addr",
                "127.0.0.1:0",
                "--turn-tcp-addr",
                "127.0.0.1:0",
                "--turn-max-connections",
                "0",
            ],
            "--turn-max-connections",
        ),
    ];
    for (args, field) in cases {
        let (code, _, err) = relay(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(
            err.contains(field),
            "{args:?}: message should name {field}: {err}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_settings_without_secrets_and_binds_nothing() {
    let keys = key_file(GOOD_KEY);
    // The ports are taken: a check that bound them would fail.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (udp_addr, ops_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let token = "relay-token-0123456789abc";
    let out = Command::new(env!("CARGO_BIN_EXE_veil-relay"))
        .arg("--check-config")
        .env_clear()
        .env("VEIL_KEY_FILE", keys.as_str())
        .env("VEIL_RELAY_UDP_ADDR", "0.0.0.0:40000")
        .env("VEIL_RELAY_PUBLIC_UDP_ADDR", udp_addr.to_string())
        .env("VEIL_RELAY_QUIC_ADDR", udp_addr.to_string())
        .env("VEIL_RELAY_QUIC_SELF_SIGNED", "true")
        .env("VEIL_RELAY_OPS_ADDR", ops_addr.to_string())
        .env(
            "VEIL_RELAY_CONTROLLERS",
            "http://a.example:50051,http://b.example:50051",
        )
        .env("VEIL_RELAY_CONTROLLER_TOKEN", token)
        .env("VEIL_RELAY_NODE_ID", "node-7")
        .env("VEIL_RELAY_WORKERS", "3")
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
        stdout.starts_with("veil-relay: configuration is valid\n"),
        "{stdout}"
    );
    for line in [
        "udp-addr            = 0.0.0.0:40000".to_string(),
        format!("public-udp-addr     = {udp_addr}"),
        format!("public-quic-addr    = {udp_addr} (the bound address)"),
        "quic-certificate    = self-signed, new at every start (sha256 ".to_string(),
        "controller          = http://a.example:50051,http://b.example:50051".to_string(),
        "controller-token    = <redacted: 1 value>".to_string(),
        "node-id             = node-7".to_string(),
        "workers             = 3".to_string(),
        "(key ids 1, signing 1)".to_string(),
    ] {
        // Columns align to the longest name: compare with runs of spaces collapsed.
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            squeeze(&stdout).contains(&squeeze(&line)),
            "lacks {line:?}: {stdout}"
        );
    }
    assert!(
        !stdout.contains(token) && !stdout.contains("010101"),
        "a secret leaked: {stdout}"
    );

    // Invalid: the same check exits 64 naming the field, as a start would.
    let out = Command::new(env!("CARGO_BIN_EXE_veil-relay"))
        .arg("--check-config")
        .env_clear()
        .env("VEIL_KEY_FILE", keys.as_str())
        .env("VEIL_RELAY_UDP_ADDR", "127.0.0.1:0")
        .env("VEIL_RELAY_QUIC_ADDR", "0.0.0.0:40443")
        .env("VEIL_RELAY_QUIC_SELF_SIGNED", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--public-quic-addr is required"), "{err}");
    assert!(out.stdout.is_empty());
}
