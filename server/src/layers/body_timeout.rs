//! Request body stall timeout: a client that starts a request body and stops sending (a
//! half-sent message) has its call failed after the timeout, so that its buffers and stream
//! are freed instead of held for the life of the connection.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{sleep, Instant, Sleep};
use tonic::{body::Body, codegen::Bytes, Status};
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug)]
pub struct BodyTimeoutLayer {
    /// `None`: no limit.
    timeout: Option<Duration>,
}

impl BodyTimeoutLayer {
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyTimeout { inner, timeout: self.timeout }
    }
}

#[derive(Clone, Debug)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S, ResBody> Service<Request<Body>> for BodyTimeout<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self.timeout {
            Some(timeout) => self.inner.call(request.map(|body| Body::new(StallTimeout::new(body, timeout)))),
            None => self.inner.call(request),
        }
    }
}

/// A body that fails when no frame arrives within `timeout` of the previous one (or of the
/// first poll).
pub struct StallTimeout {
    inner: Body,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

impl StallTimeout {
    pub fn new(inner: Body, timeout: Duration) -> Self {
        Self { inner, timeout, timer: Box::pin(sleep(timeout)) }
    }
}

impl HttpBody for StallTimeout {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.timeout;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                // Not CANCELLED: tonic reads a cancelled request body as its end ("unexpected EOF").
                Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request body stalled: no bytes for {} s (--request-body-timeout-secs)",
                    this.timeout.as_secs()
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
