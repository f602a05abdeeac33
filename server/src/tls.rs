//! TLS and mutual TLS: the rustls configuration qserver's listener serves with, read from the
//! PEM files named by --tls-cert, --tls-key and --tls-client-ca.

use std::{path::Path, sync::Arc};

use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};

use crate::config::Config;

/// The server's TLS configuration, or `None` when TLS is off. Errors name the flag and file.
pub fn server_config(config: &Config) -> Result<Option<Arc<ServerConfig>>, String> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let chain = certificates("--tls-cert", cert)?;
    let key_pem = read_pem("--tls-key", key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("--tls-key {}: no usable private key ({e})", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &config.tls_client_ca {
        // Client certificates become required, signed by this CA.
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates("--tls-client-ca", ca)? {
                roots.add(certificate).map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert {} with --tls-key: {e}", cert.display()))?;
    // gRPC is HTTP/2 only.
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(tls)))
}

/// Every certificate of a PEM file (at least one).
fn certificates(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(flag, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{flag} {}: no CERTIFICATE block", path.display()));
    }
    Ok(chain)
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
