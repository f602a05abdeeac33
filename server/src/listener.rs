//! qserver's HTTP/2 accept loop: TLS, the transport limits, and each connection's lifetime.
//!
//! Why not tonic's `serve_with_incoming_shutdown`: it can end a connection only at the server's
//! shutdown or its age, and with an age grace set (tonic 0.14.9) it drops the connection at
//! age + grace without ever sending GOAWAY, failing the calls in flight (tests/connections.rs
//! counted 8 of 2553). Here every connection is driven by its own task that sends GOAWAY
//! (hyper's graceful shutdown: calls in flight finish, the client opens a new connection for
//! new ones) when the connection reaches its age, when it has had no call for the idle timeout,
//! or when the server shuts down; and closes it at GOAWAY + grace if calls are still running.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tokio_rustls::{rustls::ServerConfig, TlsAcceptor};
use tonic::{body::Body, codegen::Bytes, transport::server::TcpConnectInfo};
use tower::{Service, ServiceExt};

use crate::config::Config;

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 settings and connection lifetimes (Envoy's edge settings as the bar: 100 streams
/// per connection, 64 KiB stream and 1 MiB connection flow-control windows, so that a stalled
/// request holds little memory).
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// GOAWAY this long after the connection opened.
    pub max_age: Option<Duration>,
    /// GOAWAY after this long without a call in flight.
    pub idle_timeout: Option<Duration>,
    /// How long calls in flight may still run after a GOAWAY before the connection is closed.
    pub grace: Duration,
}

impl Transport {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_concurrent_streams: config.max_concurrent_streams,
            max_header_list_bytes: config.max_header_list_bytes,
            keepalive_interval: Config::secs_or_off(config.keepalive_interval_secs),
            keepalive_timeout: Duration::from_secs(config.keepalive_timeout_secs),
            max_age: Config::secs_or_off(config.max_connection_age_secs),
            idle_timeout: Config::secs_or_off(config.idle_timeout_secs),
            grace: Duration::from_secs(config.max_connection_age_grace_secs),
        }
    }

    fn builder(&self) -> http2::Builder<TokioExecutor> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.max_concurrent_streams)
            .initial_stream_window_size(64 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_header_list_size(self.max_header_list_bytes)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout);
        builder
    }
}

/// Serves `service` on `listener` until `shutdown` resolves; then stops accepting, sends GOAWAY
/// on every connection and waits for them to close (the caller bounds that wait).
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    service: S,
    transport: Transport,
    shutdown: impl std::future::Future<Output = ()>,
) where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = transport.builder();
    let tls = tls.map(TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            info: TcpConnectInfo { local_addr: tcp.local_addr().ok(), remote_addr: Some(remote) },
            service: service.clone(),
            builder: builder.clone(),
            transport,
            stop: stop_rx.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move { connection.run(tcp, tls).await });
    }
    // Stop accepting now (the port refuses new clients), then drain.
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
}

/// One accepted connection and what it needs to serve itself.
struct Connection<S> {
    info: TcpConnectInfo,
    service: S,
    builder: http2::Builder<TokioExecutor>,
    transport: Transport,
    /// Becomes true when the server shuts down; dropped when the connection ends.
    stop: watch::Receiver<bool>,
}

impl<S> Connection<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    async fn run(self, tcp: TcpStream, tls: Option<TlsAcceptor>) {
        match tls {
            None => self.drive(tcp).await,
            Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => self.drive(stream).await,
                Ok(Err(e)) => tracing::debug!(peer = ?self.info.remote_addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = ?self.info.remote_addr, "TLS handshake timed out"),
            },
        }
    }

    /// Serves the connection until it ends, sending GOAWAY at its age, when idle, or at the
    /// server's shutdown, and closing it at GOAWAY + grace.
    async fn drive<IO>(mut self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let opened = Instant::now();
        let activity = Arc::new(Activity::new(opened));
        let service = {
            let (info, activity, inner) = (self.info.clone(), Arc::clone(&activity), self.service.clone());
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let mut request = request.map(Body::new);
                // The peer address for the access log, TLS or not.
                request.extensions_mut().insert(info.clone());
                let call = CallGuard::begin(Arc::clone(&activity));
                let answer = inner.clone().oneshot(request);
                async move {
                    let response = answer.await?;
                    // The call counts as in flight until its response body ends.
                    Ok::<_, Infallible>(response.map(|body| Body::new(Tracked { inner: body, _call: call })))
                }
            })
        };
        let mut connection = pin!(self.builder.serve_connection(TokioIo::new(io), service));
        let transport = self.transport;
        let age_end = transport.max_age.map(|age| opened + age);
        let far = opened + Duration::from_secs(100 * 365 * 24 * 3600);
        let mut close_at: Option<Instant> = None;
        loop {
            let idle_end =
                transport.idle_timeout.map(|idle| activity.idle_since().map_or(Instant::now() + idle, |s| s + idle));
            let goaway = |reason: &'static str, close_at: &mut Option<Instant>, connection: Pin<&mut _>| {
                tracing::debug!(peer = ?self.info.remote_addr, reason, "GOAWAY");
                hyper::server::conn::http2::Connection::graceful_shutdown(connection);
                *close_at = Some(Instant::now() + transport.grace);
            };
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(peer = ?self.info.remote_addr, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(close_at.unwrap_or(far)), if close_at.is_some() => {
                    tracing::debug!(
                        peer = ?self.info.remote_addr,
                        calls = activity.calls(),
                        "closing: calls still running at GOAWAY + grace"
                    );
                    return;
                }
                () = tokio::time::sleep_until(age_end.unwrap_or(far)), if close_at.is_none() && age_end.is_some() => {
                    goaway("max connection age", &mut close_at, connection.as_mut());
                }
                () = tokio::time::sleep_until(idle_end.unwrap_or(far)), if close_at.is_none() && idle_end.is_some() => {
                    // Re-checked: a call may have started while this timer ran.
                    if activity.idle_since().is_some_and(|s| s + transport.idle_timeout.unwrap_or_default() <= Instant::now()) {
                        goaway("idle timeout", &mut close_at, connection.as_mut());
                    }
                }
                changed = self.stop.changed(), if close_at.is_none() => {
                    if changed.is_err() || *self.stop.borrow() {
                        goaway("server shutdown", &mut close_at, connection.as_mut());
                    }
                }
            }
        }
    }
}

/// Calls in flight on one connection, and since when it has had none.
struct Activity {
    epoch: Instant,
    calls: AtomicUsize,
    /// Milliseconds from `epoch` when the last call ended (or the connection opened).
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Self { epoch, calls: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }

    /// When the connection last became idle; `None` while a call is in flight.
    fn idle_since(&self) -> Option<Instant> {
        (self.calls() == 0).then(|| self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }
}

/// Counts one call in flight for as long as it lives (request handling, then response body).
struct CallGuard(Arc<Activity>);

impl CallGuard {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.calls.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.epoch.elapsed().as_millis() as u64, Ordering::Release);
        a.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its call counted until it ends or is dropped.
struct Tracked {
    inner: Body,
    _call: CallGuard,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The peer of a request, as the listener recorded it.
pub fn peer(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_without_calls_and_since_the_last_one_ended() {
        let opened = Instant::now();
        let activity = Arc::new(Activity::new(opened));
        assert_eq!(activity.idle_since(), Some(opened), "idle from the start");
        let first = CallGuard::begin(Arc::clone(&activity));
        let second = CallGuard::begin(Arc::clone(&activity));
        assert_eq!(activity.idle_since(), None);
        drop(first);
        assert_eq!(activity.idle_since(), None, "one call still in flight");
        std::thread::sleep(Duration::from_millis(20));
        drop(second);
        let since = activity.idle_since().expect("idle after the last call");
        assert!(since >= opened + Duration::from_millis(20), "idle since the last call ended");
        assert_eq!(activity.calls(), 0);
    }
}
