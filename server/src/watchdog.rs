//! Health that tells the truth: a worker stuck on one generation far beyond any request's
//! budget (a hung ONNX Runtime call) turns health NOT_SERVING, so that load balancers send
//! traffic elsewhere, and back to SERVING once it is free.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;

use crate::health::Health;
use crate::service::Shared;

/// How often the workers are looked at.
const INTERVAL: Duration = Duration::from_millis(500);

pub fn spawn(shared: Arc<Shared>, health: Health, stuck_after: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stuck = false;
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tick.tick().await;
            let longest = shared.longest_busy();
            let now_stuck = longest > stuck_after;
            if now_stuck == stuck || shared.is_shutting_down() {
                continue;
            }
            stuck = now_stuck;
            if stuck {
                tracing::error!(
                    busy_secs = longest.as_secs(),
                    limit_secs = stuck_after.as_secs(),
                    "an engine worker is stuck on one generation (--stuck-worker-secs); NOT_SERVING"
                );
            } else {
                tracing::warn!("no engine worker is stuck any more; SERVING");
            }
            health.set(!stuck).await;
        }
    })
}
