//! Key rotation without a restart: on SIGHUP a node re-reads its key ring file and, if it parses,
//! puts it in place of the one in use. A file that cannot be read or does not parse is logged and
//! ignored, and the node keeps the ring it has: a botched edit never takes a node down, nor leaves
//! it with no keys. Shared by `veil-relay` and `veil-controller` (docs/OPERATIONS.md, "Key
//! rotation").

use std::future::Future;
use std::path::PathBuf;

use anyhow::Context;
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use veil_protocol::KeyRing;

/// Reads the key ring file given by `--key-file`; the error names the flag and the file.
pub fn read_key_file(path: &std::path::Path) -> anyhow::Result<KeyRing> {
    KeyRing::read_file(path).with_context(|| format!("--key-file: {}", path.display()))
}

/// Outcomes of a reload, as metric label values.
pub const RELOAD_RESULTS: [&str; 2] = ["applied", "failed"];

/// Registers `<prefix>_key_reloads_total{result="applied"|"failed"}` in `registry`.
pub fn reload_counter(registry: &Registry, prefix: &str) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(
        Opts::new(
            format!("{prefix}_key_reloads_total"),
            "Key ring reloads on SIGHUP, by result (a failed reload keeps the ring in use).",
        ),
        &["result"],
    )?;
    registry.register(Box::new(c.clone()))?;
    for r in RELOAD_RESULTS {
        c.with_label_values(&[r]);
    }
    Ok(c)
}

/// Re-reads `path` once: hands the ring to `apply` if it parses, else logs why and leaves the
/// ring in use alone. Returns whether a ring was applied.
pub fn reload(path: &std::path::Path, apply: &dyn Fn(KeyRing), reloads: &IntCounterVec) -> bool {
    match read_key_file(path) {
        Ok(ring) => {
            let key_ids: Vec<u16> = ring.key_ids().iter().map(|k| k.0).collect();
            let signing = ring.signing_key_id().0;
            apply(ring);
            reloads.with_label_values(&[RELOAD_RESULTS[0]]).inc();
            tracing::info!(?key_ids, signing, "key ring reloaded");
            true
        }
        Err(e) => {
            reloads.with_label_values(&[RELOAD_RESULTS[1]]).inc();
            tracing::error!(
                error = %format!("{e:#}"),
                "key ring reload failed: keeping the key ring in use"
            );
            false
        }
    }
}

/// Installs a SIGHUP handler now, and returns the task that reloads `path` on every SIGHUP
/// until `stop` turns true.
///
/// The handler is installed before this returns, so that a SIGHUP sent once the node reports it
/// is serving reloads the keys instead of ending the process (SIGHUP's default action).
pub fn on_hangup(
    path: PathBuf,
    apply: impl Fn(KeyRing) + Send + 'static,
    reloads: IntCounterVec,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
    Ok(async move {
        loop {
            tokio::select! {
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!(file = %path.display(), "SIGHUP: re-reading the key ring");
                    reload(&path, &apply, &reloads);
                }
                _ = stop.changed() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn a_bad_file_is_ignored_and_a_good_one_applied() {
        let dir = std::env::temp_dir().join(format!("veil-keys-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.txt");
        let registry = Registry::new();
        let reloads = reload_counter(&registry, "veil_test").unwrap();
        let applied: Arc<Mutex<Vec<KeyRing>>> = Arc::default();
        let apply = {
            let applied = applied.clone();
            move |k: KeyRing| applied.lock().unwrap().push(k)
        };

        // Missing, then malformed: nothing applied, both counted as failures.
        assert!(!reload(&path, &apply, &reloads));
        std::fs::write(&path, "1 nothex signing\n").unwrap();
        assert!(!reload(&path, &apply, &reloads));
        assert!(applied.lock().unwrap().is_empty());
        assert_eq!(reloads.with_label_values(&["failed"]).get(), 2);

        let ring = KeyRing::from_keys(&[(1, [1; 32]), (2, [2; 32])], 2);
        std::fs::write(&path, ring.to_file_format()).unwrap();
        assert!(reload(&path, &apply, &reloads));
        assert_eq!(applied.lock().unwrap()[0].key_ids(), ring.key_ids());
        assert_eq!(reloads.with_label_values(&["applied"]).get(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
