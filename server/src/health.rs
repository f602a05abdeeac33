//! gRPC health: the overall service ("") and ours, always flipped together.

use qreformulate::SERVICE_NAME;
use tonic_health::{pb::health_server::HealthServer, server::HealthReporter, ServingStatus};

#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// A reporter plus the service to mount; both names start NOT_SERVING.
    pub async fn new() -> (Self, HealthServer<impl tonic_health::pb::health_server::Health>) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let health = Self { reporter };
        health.set(false).await;
        (health, server)
    }

    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in ["", SERVICE_NAME] {
            self.reporter.set_service_status(name, status).await;
        }
    }
}
