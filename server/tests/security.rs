//! Security and transport limits, end to end against the real server on 127.0.0.1:0: TLS,
//! mutual TLS, bearer tokens, the reflection flag, the content-type gate, the concurrent
//! stream limit, the request body stall timeout, and the access log with its request id.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use common::TestServer;
use http_body::{Body as _, Frame};
use qreformulate::{
    pb::{reformulator_client::ReformulatorClient, ReformulateRequest},
    SERVICE_NAME,
};
use tonic::{
    body::Body,
    codegen::Bytes,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code,
};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
use tower::{Service, ServiceExt};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn flag(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// A TLS channel to `https://localhost:PORT` with the test CA, and a client identity if given.
async fn tls_channel(
    port: u16,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(certs::Pki::read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(certs::Pki::read(cert), certs::Pki::read(key)));
    }
    Channel::from_shared(format!("https://localhost:{port}")).unwrap().tls_config(tls)?.connect().await
}

/// Health of the reformulator service over `channel`, polled until SERVING.
async fn wait_serving_on(channel: Channel) {
    let mut health = HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        let reply = health.check(HealthCheckRequest { service: SERVICE_NAME.into() }).await;
        if reply.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn query(text: &str) -> ReformulateRequest {
    ReformulateRequest { query: text.into(), ..Default::default() }
}

#[tokio::test]
async fn tls_server_answers_tls_clients_and_refuses_plaintext() {
    let pki = certs::generate("tls");
    let server = TestServer::spawn(&["--tls-cert", &flag(&pki.server_cert), "--tls-key", &flag(&pki.server_key)]).await;
    let port = server.addr.port();
    wait_serving_on(tls_channel(port, &pki.ca, None).await.expect("TLS connect")).await;

    let mut client = ReformulatorClient::new(tls_channel(port, &pki.ca, None).await.unwrap());
    let reply = client.reformulate(query("who wrote hamlet")).await.expect("Reformulate over TLS");
    assert!(!reply.into_inner().subqueries.is_empty());

    // Plaintext HTTP/2 to a TLS port: the handshake fails, no call gets through.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await;
    if let Ok(channel) = plain {
        let answer = HealthClient::new(channel).check(HealthCheckRequest::default()).await;
        assert!(answer.is_err(), "a plaintext call to the TLS port was answered: {answer:?}");
    }
    // A client that does not trust the server's CA refuses it.
    assert!(tls_channel(port, &pki.rogue_ca, None).await.is_err(), "untrusted server certificate accepted");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = certs::generate("mtls");
    let server = TestServer::spawn(&[
        "--tls-cert",
        &flag(&pki.server_cert),
        "--tls-key",
        &flag(&pki.server_key),
        "--tls-client-ca",
        &flag(&pki.ca),
    ])
    .await;
    let port = server.addr.port();
    let good = || tls_channel(port, &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    wait_serving_on(good().await.expect("mTLS connect with the CA's client certificate")).await;
    let mut client = ReformulatorClient::new(good().await.unwrap());
    client.reformulate(query("who wrote hamlet")).await.expect("Reformulate over mTLS");

    // No client certificate, or one from another CA: the handshake (or the first call) fails.
    for identity in [None, Some((pki.rogue_cert.as_path(), pki.rogue_key.as_path()))] {
        let refused = match tls_channel(port, &pki.ca, identity).await {
            Err(_) => true,
            Ok(channel) => HealthClient::new(channel).check(HealthCheckRequest::default()).await.is_err(),
        };
        assert!(refused, "a client with identity {identity:?} got through");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_tls_files_stop_the_server_at_startup() {
    let pki = certs::generate("badfiles");
    let missing = pki.dir.join("missing.pem");
    let server = TestServer::spawn(&["--tls-cert", &flag(&missing), "--tls-key", &flag(&pki.server_key)]).await;
    let err = server.stop().await.unwrap_err().to_string();
    assert!(err.contains("--tls-cert") && err.contains("missing.pem"), "{err}");
    let server = TestServer::spawn(&["--tls-cert", &flag(&pki.server_key), "--tls-key", &flag(&pki.ca)]).await;
    assert!(server.stop().await.is_err(), "a key as certificate and a certificate as key were accepted");
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", token.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn bearer_tokens_guard_every_service_but_health() {
    let file = std::env::temp_dir().join(format!("qserver-tokens-e2e-{}", std::process::id()));
    std::fs::write(&file, "# test tokens\nfrom-file\n").unwrap();
    let server =
        TestServer::start(&["--auth-tokens-file", &flag(&file), "--auth-tokens", "from-flag", "--reflection"]).await;
    let mut client = common::client(server.addr).await;
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("from-file"), Code::Unauthenticated), // no "Bearer " scheme
        (Some("Bearer wrong"), Code::Unauthenticated),
        (Some("Bearer from-fil"), Code::Unauthenticated),
    ] {
        let err = client.reformulate(with_token(query("who wrote hamlet"), token)).await.unwrap_err();
        assert_eq!(err.code(), code, "{token:?}: {err:?}");
        assert!(!err.message().is_empty());
    }
    for token in ["Bearer from-file", "Bearer from-flag"] {
        client.reformulate(with_token(query("who wrote hamlet"), Some(token))).await.expect(token);
    }
    // Health needs no token (Kubernetes probes); reflection does.
    assert_eq!(common::health_status(server.addr, SERVICE_NAME).await, ServingStatus::Serving);
    let err = list_services_v1(server.addr, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!list_services_v1(server.addr, Some("Bearer from-flag")).await.unwrap().is_empty());
    server.stop().await.unwrap();
    std::fs::remove_file(file).unwrap();
}

async fn list_services_v1(addr: std::net::SocketAddr, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut client = ServerReflectionClient::new(common::channel(addr).await);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client.server_reflection_info(with_token(tokio_stream::iter([ask]), token)).await?.into_inner();
    match replies.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn list_services_v1alpha(addr: std::net::SocketAddr) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1alpha::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut client = ServerReflectionClient::new(common::channel(addr).await);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client.server_reflection_info(tokio_stream::iter([ask])).await?.into_inner();
    match replies.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn reflection_is_off_by_default_and_serves_v1_and_v1alpha_when_on() {
    let server = TestServer::start(&[]).await;
    assert_eq!(list_services_v1(server.addr, None).await.unwrap_err().code(), Code::Unimplemented);
    assert_eq!(list_services_v1alpha(server.addr).await.unwrap_err().code(), Code::Unimplemented);
    server.stop().await.unwrap();

    let server = TestServer::start(&["--reflection"]).await;
    for services in
        [list_services_v1(server.addr, None).await.unwrap(), list_services_v1alpha(server.addr).await.unwrap()]
    {
        assert!(services.iter().any(|s| s == SERVICE_NAME), "{services:?}");
        assert!(services.iter().any(|s| s == "grpc.health.v1.Health"), "{services:?}");
    }
    server.stop().await.unwrap();
}

/// A request body that sends `first` and then nothing, never ending.
struct Stalled(Option<Bytes>);

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = tonic::Status;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
}

/// Sends one raw HTTP/2 request; the response status, headers and its trailers' grpc-status.
async fn raw_call(
    addr: std::net::SocketAddr,
    content_type: &str,
    body: Body,
) -> (http::StatusCode, http::HeaderMap, Option<String>, String) {
    let mut channel = common::channel(addr).await;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/qreformulate.v1.Reformulator/Reformulate"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let response = channel.ready().await.unwrap().call(request).await.expect("HTTP/2 response");
    let (parts, mut body) = response.into_parts();
    let mut text = Vec::new();
    let mut grpc_status = parts.headers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.expect("response body");
        if let Some(data) = frame.data_ref() {
            text.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            grpc_status = trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        }
    }
    (parts.status, parts.headers, grpc_status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn non_grpc_content_types_get_http_415() {
    let addr = common::shared_server();
    common::wait_serving(addr).await;
    for content_type in ["application/json", "text/plain", "application/grpc-web"] {
        let (status, _, grpc_status, text) = raw_call(addr, content_type, Body::new("{}".to_string())).await;
        assert_eq!(status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type}");
        assert!(grpc_status.is_none());
        assert!(text.contains("application/grpc"), "{text}");
    }
}

#[tokio::test]
async fn a_stalled_request_body_is_failed_after_the_timeout() {
    let server = TestServer::start(&["--request-body-timeout-secs", "1"]).await;
    // A gRPC frame header announcing 100 bytes, then 3 of them, then silence.
    let mut half = vec![0u8, 0, 0, 0, 100];
    half.extend_from_slice(b"\x0a\x62w");
    let started = std::time::Instant::now();
    let (status, _, grpc_status, _) = tokio::time::timeout(
        Duration::from_secs(10),
        raw_call(server.addr, "application/grpc", Body::new(Stalled(Some(Bytes::from(half))))),
    )
    .await
    .expect("the server held a half-sent request for 10 s");
    assert_eq!(status, http::StatusCode::OK);
    let code = grpc_status.expect("a gRPC status");
    assert_eq!(code, (Code::DeadlineExceeded as i32).to_string(), "a half-sent request was not timed out");
    assert!(started.elapsed() >= Duration::from_millis(900), "failed before the timeout: {:?}", started.elapsed());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn message_size_limits_hold_both_ways() {
    let server = TestServer::start(&["--max-request-bytes", "64", "--max-response-bytes", "8"]).await;
    let mut client = common::client(server.addr).await;
    let err = client.reformulate(query(&"word ".repeat(20))).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("64"), "{}", err.message());
    // A short query fits in, but no answer fits in 8 bytes.
    let err = client.reformulate(query("who wrote hamlet")).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_streams_per_connection_are_capped() {
    let server = TestServer::start(&["--max-concurrent-streams", "2", "--request-body-timeout-secs", "0"]).await;
    let channel = common::channel(server.addr).await;
    // Two Evaluate calls whose request streams never end hold both streams of the connection.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = ReformulatorClient::new(channel.clone());
        held.push(tokio::spawn(async move {
            let _ = client.evaluate(futures_pending_stream()).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third call on the same connection waits for a free stream...
    let mut client = ReformulatorClient::new(channel.clone());
    let third = tokio::time::timeout(Duration::from_millis(700), client.reformulate(query("who wrote hamlet"))).await;
    assert!(third.is_err(), "a third stream was accepted: {third:?}");
    // ...while another connection is served at once.
    common::client(server.addr).await.reformulate(query("who wrote hamlet")).await.unwrap();
    // Once the held calls go away, the connection serves again.
    for task in &held {
        task.abort();
    }
    tokio::time::timeout(Duration::from_secs(10), client.reformulate(query("who wrote hamlet")))
        .await
        .expect("the connection never freed its streams")
        .unwrap();
    server.stop().await.unwrap();
}

fn futures_pending_stream() -> impl tokio_stream::Stream<Item = qreformulate::pb::EvaluateRequest> + Send + 'static {
    tokio_stream::pending()
}

/// Log lines captured by a subscriber installed once for this test binary.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let writer = move || Capture(Arc::clone(&sink));
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter("qserver::access=info")
            .with_writer(writer)
            .try_init()
            .expect("only this test installs a subscriber");
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access line of the call with this request id (waits a little: it is written when the
/// response body ends).
async fn access_line(logs: &Mutex<Vec<u8>>, request_id: &str) -> serde_json::Value {
    for _ in 0..100 {
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["request_id"] == request_id && v["target"] == "qserver::access");
        if let Some(line) = found {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access line for request id {request_id}");
}

#[tokio::test]
async fn access_log_has_one_line_per_call_and_the_request_id_travels() {
    let logs = captured_logs();
    let secret = "my private medical question";
    for log_queries in [false, true] {
        let extra: &[&str] =
            if log_queries { &["--log-queries", "--auth-tokens", "t"] } else { &["--auth-tokens", "t"] };
        let server = TestServer::start(extra).await;
        let mut client = common::client(server.addr).await;

        // The caller's id comes back and names the access line.
        let mut request = with_token(query(secret), Some("Bearer t"));
        let given = format!("req-{log_queries}");
        request.metadata_mut().insert("x-request-id", given.parse().unwrap());
        let reply = client.reformulate(request).await.unwrap();
        assert_eq!(reply.metadata().get("x-request-id").unwrap(), given.as_str());
        let line = access_line(&logs, &given).await;
        assert_eq!(line["method"], "/qreformulate.v1.Reformulator/Reformulate");
        assert_eq!(line["code"], "Ok");
        assert!(line["request_bytes"].as_u64().unwrap() > secret.len() as u64, "{line}");
        assert!(line["response_bytes"].as_u64().unwrap() > 0, "{line}");
        assert!(line["ms"].as_f64().unwrap() >= 0.0);
        assert!(line["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
        assert_eq!(line["query"].as_str() == Some(secret), log_queries, "{line}");
        if !log_queries {
            let all = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
            assert!(!all.contains(secret), "the query text reached the log without --log-queries");
        }

        // Without an id one is generated; refusals are logged with their code too.
        let err = client.reformulate(query(secret)).await.unwrap_err();
        let generated = err.metadata().get("x-request-id").expect("a generated request id").to_str().unwrap();
        assert_eq!(generated.len(), 32);
        let line = access_line(&logs, generated).await;
        assert_eq!(line["code"], "Unauthenticated");
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn connections_past_their_age_are_replaced() {
    let logs = captured_logs();
    for (age, replaced) in [("1", true), ("0", false)] {
        let server =
            TestServer::start(&["--max-connection-age-secs", age, "--max-connection-age-grace-secs", "1"]).await;
        // One channel, two calls 2.5 s apart: after GOAWAY the channel reconnects, from a new port.
        let mut client = common::client(server.addr).await;
        let mut peers = Vec::new();
        for call in 0..2 {
            if call == 1 {
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            let id = format!("age-{age}-{call}");
            let mut request = tonic::Request::new(query("who wrote hamlet"));
            request.metadata_mut().insert("x-request-id", id.parse().unwrap());
            client.reformulate(request).await.expect("calls go on across the connection's age");
            peers.push(access_line(&logs, &id).await["peer"].as_str().unwrap().to_owned());
        }
        assert_eq!(peers[0] != peers[1], replaced, "--max-connection-age-secs {age}: peers {peers:?}");
        server.stop().await.unwrap();
    }
}
