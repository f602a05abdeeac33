//! Bearer-token authentication: a tower layer in front of every service but the standard
//! health service (Kubernetes probes carry no token).
//!
//! Status codes follow gRPC's convention: a missing, malformed *or wrong* token is
//! UNAUTHENTICATED (the caller could not be identified); PERMISSION_DENIED would mean an
//! identified caller lacking a right, which tokens here do not model.

use std::{
    path::Path,
    sync::Arc,
    task::{Context, Poll},
};

use http::{header::AUTHORIZATION, HeaderValue, Request, Response};
use subtle::ConstantTimeEq;
use tonic::{body::Body, Status};
use tower::{Layer, Service};

use crate::layers::BoxFuture;

/// Calls under this path prefix need no token.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

/// The accepted tokens (never empty), kept as SHA-256 digests: comparing digests of equal
/// length in constant time reveals neither a token's bytes nor its length.
#[derive(Clone)]
pub struct Tokens(Arc<[Digest]>);

type Digest = [u8; 32];

fn digest(token: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token).as_ref());
    out
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

impl Tokens {
    /// Tokens from the file (one per line, `#` comments, blank lines skipped) and the list;
    /// `None` when both are empty (authentication off).
    pub fn load(file: Option<&Path>, list: &[String]) -> Result<Option<Self>, String> {
        let mut tokens: Vec<Vec<u8>> = Vec::new();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("--auth-tokens-file {}: {e}", path.display()))?;
            let lines = text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty());
            tokens.extend(lines.map(|l| l.as_bytes().to_vec()));
            if tokens.is_empty() {
                return Err(format!("--auth-tokens-file {}: no token in the file", path.display()));
            }
        }
        tokens.extend(list.iter().map(|t| t.trim()).filter(|t| !t.is_empty()).map(|t| t.as_bytes().to_vec()));
        if let Some(bad) = tokens.iter().find(|t| t.iter().any(|b| !b.is_ascii_graphic())) {
            return Err(format!(
                "an auth token of {} bytes has a space or a non-ASCII character; tokens must be visible ASCII",
                bad.len()
            ));
        }
        Ok((!tokens.is_empty()).then(|| Tokens(tokens.iter().map(|t| digest(t)).collect())))
    }

    /// Checks an `authorization` header value.
    pub fn check(&self, header: Option<&HeaderValue>) -> Result<(), Status> {
        let Some(value) = header else {
            return Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata"));
        };
        let token = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("malformed authorization metadata: expected `Bearer <token>`"))?;
        // Compare with every token, without stopping at a match, each in constant time.
        let given = digest(token);
        let mut matched = subtle::Choice::from(0);
        for known in self.0.iter() {
            matched |= known.ct_eq(&given);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

/// The layer: refuses calls without a valid token, before they reach a service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Option<Tokens>,
}

impl AuthLayer {
    /// `None`: everything passes.
    pub fn new(tokens: Option<Tokens>) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, tokens: self.tokens.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            if !request.uri().path().starts_with(EXEMPT_PREFIX) {
                if let Err(status) = tokens.check(request.headers().get(AUTHORIZATION)) {
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::load(None, &["alpha".into(), " beta ".into()]).unwrap().unwrap()
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn right_tokens_pass_and_others_are_unauthenticated() {
        let t = tokens();
        t.check(Some(&header("Bearer alpha"))).unwrap();
        t.check(Some(&header("Bearer beta"))).unwrap();
        for (value, says) in [
            (None, "missing"),
            (Some("alpha"), "malformed"),
            (Some("Basic YWxwaGE="), "malformed"),
            (Some("Bearer "), "malformed"),
            (Some("Bearer alph"), "invalid"),
            (Some("Bearer alphaa"), "invalid"),
        ] {
            let err = t.check(value.map(header).as_ref()).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{value:?}");
            assert!(err.message().contains(says), "{value:?}: {}", err.message());
        }
    }

    #[test]
    fn token_file_skips_comments_and_blank_lines() {
        let path = std::env::temp_dir().join(format!("qserver-tokens-{}", std::process::id()));
        std::fs::write(&path, "# ops team\nfirst\n\n  second  # rotated 2026-11\n").unwrap();
        let t = Tokens::load(Some(&path), &[]).unwrap().unwrap();
        t.check(Some(&header("Bearer first"))).unwrap();
        t.check(Some(&header("Bearer second"))).unwrap();
        assert!(t.check(Some(&header("Bearer ops"))).is_err());
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(Tokens::load(Some(&path), &[]).unwrap_err().contains("no token"));
        std::fs::remove_file(&path).unwrap();
        assert!(Tokens::load(None, &[]).unwrap().is_none());
        assert!(Tokens::load(None, &["a b".into()]).is_err());
    }
}
