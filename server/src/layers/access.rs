//! One access-log line per call (target `qserver::access`): method, gRPC code, latency,
//! request and response bytes, peer address, request id; the query text only with
//! --log-queries. The request id comes from the caller's `x-request-id` (when it is short
//! visible ASCII) or is generated; it is returned in the response headers and names the
//! call's span, so every log line of the call carries it.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{body::Body, codegen::Bytes, Code};
use tower::{Layer, Service};
use tracing::Instrument;

use super::BoxFuture;

pub const REQUEST_ID: &str = "x-request-id";
/// Longest request id taken from a caller; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Set by the access layer (only with --log-queries) in the request's extensions; the
/// service writes the query text into it.
#[derive(Clone, Debug, Default)]
pub struct QueryNote(Arc<OnceLock<String>>);

/// Records `query` for the access line when the layer asked for it (--log-queries).
pub fn note_query(extensions: &http::Extensions, query: &str) {
    if let Some(note) = extensions.get::<QueryNote>() {
        let _ = note.0.set(query.to_owned());
    }
}

/// The caller's request id when usable, else a fresh random one (32 hex digits).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.as_bytes().iter().all(u8::is_ascii_graphic))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>())).expect("hex is a valid header value")
        })
}

fn peer(request: &Request<Body>) -> Option<SocketAddr> {
    crate::listener::peer(request.extensions())
}

#[derive(Clone, Copy, Debug)]
pub struct AccessLayer {
    log_queries: bool,
}

impl AccessLayer {
    pub fn new(log_queries: bool) -> Self {
        Self { log_queries }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access { inner, log_queries: self.log_queries }
    }
}

#[derive(Clone, Debug)]
pub struct Access<S> {
    inner: S,
    log_queries: bool,
}

impl<S> Service<Request<Body>> for Access<S>
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let id = request_id(request.headers());
        request.headers_mut().insert(REQUEST_ID, id.clone());
        let id_text = id.to_str().unwrap_or_default().to_owned();
        let method = request.uri().path().to_owned();
        let span = tracing::info_span!("call", request_id = %id_text, method = %method);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let query = self.log_queries.then(QueryNote::default);
        if let Some(note) = &query {
            request.extensions_mut().insert(note.clone());
        }
        let mut record = Record {
            method,
            peer: peer(&request),
            request_id: id_text,
            started,
            request_bytes: Arc::clone(&request_bytes),
            response_bytes: 0,
            http_status: 0,
            code: None,
            query,
            span: span.clone(),
        };
        let request = request.map(|body| Body::new(Counted { inner: body, bytes: request_bytes }));
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let mut response = future.await?;
                response.headers_mut().insert(REQUEST_ID, id);
                record.http_status = response.status().as_u16();
                // A trailers-only answer (an error before any message) has its status in the headers.
                record.code = grpc_code(response.headers());
                Ok(response.map(|body| Body::new(Logged { inner: body, record: Some(record) })))
            }
            .instrument(span),
        )
    }
}

fn grpc_code(headers: &HeaderMap) -> Option<Code> {
    headers.get("grpc-status").map(|v| Code::from_bytes(v.as_bytes()))
}

/// What the access line says; logged once, when the response body ends or is dropped.
struct Record {
    method: String,
    peer: Option<SocketAddr>,
    request_id: String,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    http_status: u16,
    code: Option<Code>,
    query: Option<QueryNote>,
    span: tracing::Span,
}

impl Record {
    fn log(self, ended: bool) {
        let code = match (self.code, ended, self.http_status) {
            (Some(code), _, _) => format!("{code:?}"),
            // No gRPC status: a refusal before gRPC (e.g. HTTP 415), or the call was reset.
            (None, _, status) if status != 200 => format!("http-{status}"),
            (None, true, _) => "Unknown".into(),
            (None, false, _) => "Cancelled".into(),
        };
        let peer = self.peer.map_or_else(|| "-".to_string(), |p| p.to_string());
        let query = self.query.as_ref().and_then(|q| q.0.get()).map(String::as_str);
        let _entered = self.span.enter();
        tracing::info!(
            target: "qserver::access",
            method = %self.method,
            code = %code,
            ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            request_bytes = self.request_bytes.load(Ordering::Relaxed),
            response_bytes = self.response_bytes,
            peer = %peer,
            request_id = %self.request_id,
            query,
            "access"
        );
    }
}

/// The request body, counting the bytes received.
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body, counting bytes and reading the status from the trailers; logs the call
/// when it ends (or is dropped: the client went away).
struct Logged {
    inner: Body,
    record: Option<Record>,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(record) = this.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        record.response_bytes += data.len() as u64;
                    } else if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                        record.code = Some(code);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(record) = this.record.take() {
                    record.log(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            // hyper drops a finished body without polling past its trailers.
            let ended = record.code.is_some() || self.inner.is_end_stream();
            record.log(ended);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_request_id_is_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&HeaderMap::new()), "fresh ids differ");
        h.insert(REQUEST_ID, HeaderValue::from_str(&"x".repeat(200)).unwrap());
        assert_eq!(request_id(&h).len(), 32);
    }
}
