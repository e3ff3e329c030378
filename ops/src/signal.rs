//! Shutdown signals.

/// Completes on the first SIGINT or SIGTERM.
///
/// # Cancel safety
/// Cancel safe: dropping it before completion loses no signal that later calls would see.
pub async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    // Installing a handler fails only if the runtime has no signal driver: a programming error.
    let mut term = signal(SignalKind::terminate()).expect("signal driver enabled");
    let mut int = signal(SignalKind::interrupt()).expect("signal driver enabled");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
