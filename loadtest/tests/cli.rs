//! `veil-loadtest --check-config`: the effective scenario, target and thresholds, the token
//! redacted; a bad flag exits 64 naming it. Nothing is started or contacted.

use std::process::Command;

fn loadtest(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil-loadtest"));
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run veil-loadtest");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn has(out: &str, name: &str, value: &str) -> bool {
    out.lines().any(|l| {
        l.split_once(" = ")
            .is_some_and(|(k, v)| k.trim() == name && v == value)
    })
}

#[test]
fn check_config_prints_the_scenario_without_the_token_and_contacts_nothing() {
    let token = "signaling-token-0123456789";
    // Port 9 (discard) on loopback: nothing listens, and nothing may be tried.
    let (code, out, err) = loadtest(
        &[
            "--controller",
            "http://127.0.0.1:9",
            "--calls",
            "7",
            "--transport",
            "mixed",
            "--max-loss",
            "0.5%",
            "--check-config",
        ],
        &[("VEIL_LOADTEST_TOKEN", token)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("veil-loadtest: configuration is valid\n"),
        "{out}"
    );
    assert!(has(&out, "target", "http://127.0.0.1:9"), "{out}");
    assert!(has(&out, "token", "<redacted: 1 value>"), "{out}");
    assert!(has(&out, "calls", "7"), "{out}");
    assert!(has(&out, "transport", "mixed"), "{out}");
    assert!(has(&out, "max-loss", "0.5%"), "{out}");
    assert!(!out.contains(token) && !err.contains(token));

    let (code, _, err) = loadtest(&["--local", "--participants", "1", "--check-config"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("participants"), "{err}");
    let (code, _, err) = loadtest(
        &[
            "--local",
            "--participants",
            "10",
            "--churn",
            "7",
            "--check-config",
        ],
        &[],
    );
    assert_eq!(code, 64);
    assert!(err.contains("churn"), "{err}");
}
