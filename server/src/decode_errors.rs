//! tonic answers a request message that does not decode with INTERNAL "failed to decode
//! Protobuf message: ..." before any handler runs. That is the client's error: this wrapper
//! around the generated server answers INVALID_ARGUMENT instead, and counts it.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::{http, BoxFuture, Service},
    server::NamedService,
    Code, Status,
};

use crate::service::Shared;

#[derive(Clone)]
pub struct DecodeErrors<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> DecodeErrors<S> {
    pub fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S: NamedService> NamedService for DecodeErrors<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for DecodeErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        let shared = Arc::clone(&self.shared);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // Unary decode failures are trailers-only responses: the status is in the headers.
            match Status::from_header_map(response.headers()) {
                Some(status) if status.code() == Code::Internal && status.message().starts_with("failed to decode") => {
                    shared.metrics.decode_failure(&rpc);
                    let message = format!("the request is not a valid {rpc} request message ({})", status.message());
                    Ok(Status::invalid_argument(message).into_http())
                }
                _ => Ok(response),
            }
        })
    }
}
