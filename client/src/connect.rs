//! Opening the channel to the server (plaintext, TLS or mutual TLS; with a bearer token on
//! every call when one is given) and building requests with the deadline.

use std::path::Path;
use std::time::Duration;

use qreformulate::pb::reformulator_client::ReformulatorClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::{interceptor::InterceptedService, Interceptor};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::cli::Cli;
use crate::error::ClientError;

/// The channel every command talks through: the connection plus the bearer token.
pub type Channel = InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let Some(token) = token.map(str::trim) else { return Ok(Self(None)) };
        let usage = || ClientError::Usage("--token must be non-empty visible ASCII without spaces".into());
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(usage());
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| usage())?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(redacted)" } else { "Bearer(none)" })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The connection settings every command shares.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub connect_timeout: Duration,
    /// Per-RPC deadline (grpc-timeout), if any.
    pub timeout: Option<Duration>,
    /// TLS settings (`--tls-ca`, and `--tls-cert`/`--tls-key` for mutual TLS), if any.
    pub tls: Option<ClientTlsConfig>,
    pub bearer: Bearer,
}

impl Target {
    /// The target of the global flags; reads the TLS files (before connecting).
    pub fn from_cli(cli: &Cli) -> Result<Self, ClientError> {
        let tls = match &cli.tls_ca {
            None => None,
            Some(ca) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca)?));
                if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
                    tls = tls.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
                }
                Some(tls)
            }
        };
        Ok(Target {
            addr: cli.addr.clone(),
            connect_timeout: cli.connect_timeout(),
            timeout: cli.timeout(),
            tls,
            bearer: Bearer::new(cli.token.as_deref())?,
        })
    }

    /// Connects eagerly, so "connection refused" (or a failed TLS handshake) surfaces here as
    /// one clear error.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let mut endpoint =
            endpoint_for(&self.addr, self.tls.is_some())?.connect_timeout(self.connect_timeout).tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|source| self.connect_error(source))?;
        }
        let channel = endpoint.connect().await.map_err(|source| self.connect_error(source))?;
        Ok(InterceptedService::new(channel, self.bearer.clone()))
    }

    fn connect_error(&self, source: tonic::transport::Error) -> ClientError {
        ClientError::Connect { addr: self.addr.clone(), source }
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

fn read_pem(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::ReadFile { path: path.to_path_buf(), source })
}

#[cfg(test)]
/// Parses a plaintext `--addr`; `host:port` without a scheme gets `http://`.
pub fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    endpoint_for(addr, false)
}

/// Parses `--addr`; `host:port` without a scheme gets `https://` with TLS, else `http://`.
pub fn endpoint_for(addr: &str, tls: bool) -> Result<Endpoint, ClientError> {
    let scheme = if tls { "https" } else { "http" };
    let uri = if addr.contains("://") { addr.to_string() } else { format!("{scheme}://{addr}") };
    let invalid = |reason: String| ClientError::InvalidAddress { addr: addr.to_string(), reason };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(crate::error::chain(&e)))?;
    if endpoint.uri().host().is_none() {
        return Err(invalid("no host".to_string()));
    }
    match (endpoint.uri().scheme_str(), tls) {
        (Some("http"), false) | (Some("https"), true) => Ok(endpoint),
        (Some("https"), false) => {
            Err(invalid("https:// needs --tls-ca (the CA certificate that signed the server's)".to_string()))
        }
        (Some("http"), true) => {
            Err(invalid("--tls-ca is given but the address is http://; use https:// or host:port".to_string()))
        }
        (other, _) => Err(invalid(format!("unsupported scheme {:?}, use {scheme}://", other.unwrap_or("")))),
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
    fn tls_takes_https_and_refuses_http() {
        assert_eq!(endpoint_for("localhost:50051", true).unwrap().uri().to_string(), "https://localhost:50051/");
        endpoint_for("https://localhost:1", true).unwrap();
        let err = endpoint_for("http://localhost:1", true).unwrap_err().to_string();
        assert!(err.contains("--tls-ca is given"), "{err}");
        let err = endpoint("https://localhost:1").unwrap_err().to_string();
        assert!(err.contains("needs --tls-ca"), "{err}");
    }

    #[test]
    fn bearer_token_goes_into_every_call_and_is_redacted() {
        let mut bearer = Bearer::new(Some("s3cret")).unwrap();
        assert_eq!(format!("{bearer:?}"), "Bearer(redacted)");
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer s3cret");
        let request = Bearer::new(None).unwrap().call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        assert!(Bearer::new(Some("two words")).is_err());
        assert!(Bearer::new(Some("")).is_err());
    }

    #[test]
    fn requests_carry_the_deadline() {
        let request = with_timeout((), Some(Duration::from_millis(1500)));
        let header = request.metadata().get("grpc-timeout").expect("grpc-timeout set");
        assert!(!header.is_empty());
        assert!(with_timeout((), None).metadata().get("grpc-timeout").is_none());
    }
}
