//! Refuses requests whose content type is not gRPC's (`application/grpc`, `+proto` and other
//! suffixes), with HTTP 415 as the gRPC over HTTP/2 spec asks, before any service decodes them.

use std::task::{Context, Poll};

use http::{header::CONTENT_TYPE, HeaderValue, Request, Response, StatusCode};
use tonic::body::Body;
use tower::{Layer, Service};

use super::BoxFuture;

/// What the refusal says.
pub const REFUSAL: &str = "qserver speaks gRPC only: send content-type application/grpc\n";

/// Whether a content-type header value is gRPC's.
pub fn is_grpc(value: Option<&HeaderValue>) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else { return false };
    let value = value.trim().to_ascii_lowercase();
    match value.strip_prefix("application/grpc") {
        // `application/grpc-web` is another protocol, which this server does not speak.
        Some(rest) => rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'),
        None => false,
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcOnlyLayer;

impl<S> Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcOnly { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcOnly<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for GrpcOnly<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
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
        if is_grpc(request.headers().get(CONTENT_TYPE)) {
            return Box::pin(self.inner.call(request));
        }
        let mut response = Response::new(Body::new(REFUSAL.to_string()));
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        Box::pin(std::future::ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_pass_and_others_do_not() {
        for ok in ["application/grpc", "application/grpc+proto", "Application/GRPC; charset=x"] {
            assert!(is_grpc(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in ["application/json", "text/plain", "application/grpc-web", "application/grpcx", ""] {
            assert!(!is_grpc(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_grpc(None));
    }
}
