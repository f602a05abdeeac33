//! `qclient health`: the standard gRPC health check, with grpc_health_probe's exit codes so
//! it drops into the same probes and scripts.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::print;
use crate::cli::HealthArgs;
use crate::connect::Target;
use crate::error::ClientError;

const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// grpc_health_probe's exit codes.
pub const EXIT_SERVING: u8 = 0;
pub const EXIT_USAGE: u8 = 1;
pub const EXIT_CONNECTION_FAILURE: u8 = 2;
pub const EXIT_RPC_FAILURE: u8 = 3;
pub const EXIT_NOT_SERVING: u8 = 4;

/// What one check ended with.
#[derive(Debug)]
enum Outcome {
    /// The server answered with this status.
    Status(ServingStatus),
    Failed(ClientError),
}

impl Outcome {
    fn exit_code(&self) -> u8 {
        match self {
            Outcome::Status(status) => status_exit_code(*status),
            Outcome::Failed(error) => error_exit_code(error),
        }
    }
}

/// SERVING is healthy; any other answer (NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN) is not.
fn status_exit_code(status: ServingStatus) -> u8 {
    if status == ServingStatus::Serving {
        EXIT_SERVING
    } else {
        EXIT_NOT_SERVING
    }
}

fn error_exit_code(error: &ClientError) -> u8 {
    match error {
        ClientError::Connect { .. } => EXIT_CONNECTION_FAILURE,
        ClientError::Rpc { .. } => EXIT_RPC_FAILURE,
        _ => EXIT_USAGE,
    }
}

/// The `--json` report.
#[derive(Debug, Serialize)]
struct Report<'a> {
    /// SERVING, NOT_SERVING, ... or null when there was no answer.
    status: Option<&'static str>,
    service: &'a str,
    addr: &'a str,
    exit_code: u8,
    attempts: u32,
    elapsed_ms: f64,
    /// The failure, on one line, when there was no answer.
    error: Option<String>,
}

pub async fn run(target: &Target, args: HealthArgs) -> Result<ExitCode, ClientError> {
    let started = Instant::now();
    let deadline = args.wait.map(|wait| started + wait);
    let mut attempts = 0;
    let outcome = loop {
        attempts += 1;
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let outcome = match check(target, &args.service, remaining).await {
            Ok(status) => Outcome::Status(status),
            Err(e) => Outcome::Failed(e),
        };
        // A bad address never heals; anything else may (the server is starting).
        let retry = !matches!(outcome, Outcome::Status(ServingStatus::Serving))
            && outcome.exit_code() != EXIT_USAGE
            && deadline.is_some_and(|d| Instant::now() + POLL_INTERVAL < d);
        if !retry {
            break outcome;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };

    let code = outcome.exit_code();
    let (status, error) = match &outcome {
        Outcome::Status(status) => (Some(status.as_str_name()), None),
        Outcome::Failed(e) => (None, Some(e.to_string())),
    };
    if args.json {
        let report = Report {
            status,
            service: &args.service,
            addr: &target.addr,
            exit_code: code,
            attempts,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
            error: error.clone(),
        };
        let line = serde_json::to_string(&report).expect("a health report always serialises; this is a bug");
        print(&format!("{line}\n"))?;
    } else if let Some(status) = status {
        print(&format!("{status}\n"))?;
    }
    if let Some(error) = error {
        eprintln!("qclient: error: {error}");
    }
    Ok(ExitCode::from(code))
}

/// One Health/Check. While waiting, neither connecting nor the call may outlast the wait.
async fn check(target: &Target, service: &str, remaining: Option<Duration>) -> Result<ServingStatus, ClientError> {
    let cap = |limit: Duration| remaining.map_or(limit, |r| limit.min(r.max(Duration::from_millis(1))));
    let bounded = Target {
        connect_timeout: cap(target.connect_timeout),
        timeout: match (target.timeout, remaining) {
            (Some(timeout), _) => Some(cap(timeout)),
            (None, remaining) => remaining.map(|r| r.max(Duration::from_millis(1))),
        },
        ..target.clone()
    };
    let mut client = HealthClient::new(bounded.channel().await?);
    let response = client
        .check(bounded.request(HealthCheckRequest { service: service.to_string() }))
        .await
        .map_err(|status| ClientError::rpc("Health/Check", status))?
        .into_inner();
    Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_grpc_health_probe() {
        assert_eq!(Outcome::Status(ServingStatus::Serving).exit_code(), 0);
        for status in [ServingStatus::NotServing, ServingStatus::Unknown, ServingStatus::ServiceUnknown] {
            assert_eq!(Outcome::Status(status).exit_code(), 4, "{status:?}");
        }
        let rpc = ClientError::rpc("Health/Check", tonic::Status::not_found("unknown service"));
        assert_eq!(Outcome::Failed(rpc).exit_code(), 3);
        let usage = ClientError::InvalidAddress { addr: "ftp://x".into(), reason: "scheme".into() };
        assert_eq!(Outcome::Failed(usage).exit_code(), 1);
        // A refused connection (exit 2) is tested on the binary: tests/cli.rs, tests/e2e.rs.
    }
}
