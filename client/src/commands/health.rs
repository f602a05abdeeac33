//! `qclient health`: the standard gRPC health check; exit 0 only when SERVING.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::print;
use crate::cli::HealthArgs;
use crate::connect::Target;
use crate::error::ClientError;

const POLL_INTERVAL: Duration = Duration::from_millis(200);

pub async fn run(target: &Target, args: HealthArgs) -> Result<ExitCode, ClientError> {
    let deadline = args.wait_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    loop {
        let result = check(target, &args.service).await;
        let waiting = deadline.is_some_and(|d| Instant::now() < d);
        match result {
            Ok(ServingStatus::Serving) => {
                print("SERVING\n")?;
                return Ok(ExitCode::SUCCESS);
            }
            // Still starting (or not up yet): poll again while --wait-ms allows.
            Ok(_) | Err(_) if waiting => tokio::time::sleep(POLL_INTERVAL).await,
            Ok(status) => {
                print(&format!("{}\n", status.as_str_name()))?;
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn check(target: &Target, service: &str) -> Result<ServingStatus, ClientError> {
    let mut client = HealthClient::new(target.channel().await?);
    let response = client
        .check(target.request(HealthCheckRequest { service: service.to_string() }))
        .await
        .map_err(|status| ClientError::rpc("Health/Check", status))?
        .into_inner();
    Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
}
