//! Opening the channel to the server and building requests with the deadline.

use std::time::Duration;

use qreformulate::pb::reformulator_client::ReformulatorClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;

/// The connection settings every command shares.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub connect_timeout: Duration,
    /// Per-RPC deadline (grpc-timeout), if any.
    pub timeout: Option<Duration>,
}

impl Target {
    /// Connects eagerly, so "connection refused" surfaces here as one clear error.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let endpoint = endpoint(&self.addr)?.connect_timeout(self.connect_timeout).tcp_nodelay(true);
        endpoint.connect().await.map_err(|source| ClientError::Connect { addr: self.addr.clone(), source })
    }

    pub async fn reformulator(&self) -> Result<ReformulatorClient<Channel>, ClientError> {
        Ok(ReformulatorClient::new(self.channel().await?))
    }

    /// Wraps a message in a request carrying the deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_timeout(message, self.timeout)
    }
}

pub fn with_timeout<T>(message: T, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// Parses `--addr`; `host:port` without a scheme gets `http://`.
pub fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let invalid = |reason: String| ClientError::InvalidAddress { addr: addr.to_string(), reason };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(crate::error::chain(&e)))?;
    if endpoint.uri().host().is_none() {
        return Err(invalid("no host".to_string()));
    }
    match endpoint.uri().scheme_str() {
        Some("http") => Ok(endpoint),
        Some("https") => Err(invalid("https is not supported (the server speaks plaintext HTTP/2)".to_string())),
        other => Err(invalid(format!("unsupported scheme {:?}, use http://", other.unwrap_or("")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_gets_http() {
        let endpoint = endpoint("127.0.0.1:50051").unwrap();
        assert_eq!(endpoint.uri().to_string(), "http://127.0.0.1:50051/");
    }

    #[test]
    fn bad_addresses_are_rejected_with_a_reason() {
        for addr in ["http://", "ftp://host:1", "https://host:1", "http://bad host:1"] {
            let err = endpoint(addr).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid server address {addr:?}: ")), "{err}");
        }
    }

    #[test]
    fn requests_carry_the_deadline() {
        let request = with_timeout((), Some(Duration::from_millis(1500)));
        let header = request.metadata().get("grpc-timeout").expect("grpc-timeout set");
        assert!(!header.is_empty());
        assert!(with_timeout((), None).metadata().get("grpc-timeout").is_none());
    }
}
