//! Draining: no new sessions, calls continue until they end or a deadline passes, then every
//! remaining client is told to move to its backup relay. Ordered by an operator through a
//! controller (AdminService.DrainRelay), or by SIGTERM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use veil_relay_core::Node;

/// Runs at most one drain at a time for a node.
#[derive(Debug)]
pub struct Drainer {
    node: Arc<Node>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How long eviction is given for the workers' sweeps to tell every client.
fn eviction_grace(node: &Node) -> Duration {
    node.config().sweep_interval * 3
}

impl Drainer {
    /// A drainer for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            node,
            task: Mutex::new(None),
        }
    }

    /// Starts draining with `deadline`, or (with `draining` false) puts the node back in service.
    pub fn order(&self, draining: bool, deadline: Duration) {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = task.take() {
            t.abort();
        }
        if draining {
            let node = self.node.clone();
            *task = Some(tokio::spawn(async move { drain(&node, deadline).await }));
        } else {
            self.node.set_evicting(false);
            self.node.directory.set_draining(false);
            tracing::info!("back in service");
        }
    }
}

/// Drains `node`: refuses new sessions, waits until its legs are gone or `deadline` passes, then
/// evicts whatever remains and gives the workers time to tell those clients.
pub async fn drain(node: &Node, deadline: Duration) {
    node.directory.set_draining(true);
    tracing::info!(
        legs = node.directory.legs(),
        deadline_secs = deadline.as_secs(),
        "draining"
    );
    let until = Instant::now() + deadline;
    while node.directory.legs() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = node.directory.legs();
    if left > 0 {
        tracing::info!(
            legs = left,
            "drain deadline passed: moving the remaining clients to their backup relays"
        );
        node.set_evicting(true);
        tokio::time::sleep(eviction_grace(node)).await;
    }
    tracing::info!(legs_left = node.directory.legs(), "drain finished");
}
