//! TLS and mutual TLS: the rustls configuration tonic serves with, read from the PEM files
//! named by --tls-cert, --tls-key and --tls-client-ca.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::Config;

/// The server's TLS configuration, or `None` when TLS is off. Errors name the flag and file.
pub fn server_config(config: &Config) -> Result<Option<ServerTlsConfig>, String> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls_client_ca {
        // Client certificates become required (tonic's client_auth_optional stays false).
        tls = tls.client_ca_root(Certificate::from_pem(read_pem("--tls-client-ca", ca)?));
    }
    Ok(Some(tls))
}

/// Reads a PEM file; refuses one without a PEM block so that a wrong path fails at startup,
/// not at the first handshake.
fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{flag} {}: not a PEM file (no -----BEGIN line)", path.display()));
    }
    Ok(bytes)
}
