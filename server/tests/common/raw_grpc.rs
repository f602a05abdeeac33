//! gRPC calls as raw HTTP/2 frames (the `h2` crate): for what a tonic client cannot send
//! (invalid protobuf or UTF-8, unknown methods, one DATA frame per message as grpcio does).

/// One length-prefixed, uncompressed gRPC message frame.
pub fn frame(message: &[u8]) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    bytes::Bytes::from(frame)
}

/// Opens a call to `method` of the Reformulator service: its response, the request body to
/// send frames on, and the connection's task.
pub async fn open(
    addr: std::net::SocketAddr,
    method: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/qreformulate.v1.Reformulator/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, body) = h2.send_request(request, false).unwrap();
    (response, body, connection)
}

/// One call of `method` with `messages` as its frames; returns (grpc-status, grpc-message).
pub async fn call(addr: std::net::SocketAddr, method: &str, messages: &[Vec<u8>]) -> (String, String) {
    let (response, mut body, _connection) = open(addr, method).await;
    for message in messages {
        body.send_data(frame(message), false).unwrap();
    }
    let _ = body.send_data(bytes::Bytes::new(), true);
    status(response.await.unwrap()).await
}

/// The grpc-status and grpc-message (percent-decoded) of a finished call: from the headers
/// when the answer is trailers-only, else from the trailers after the body.
pub async fn status(response: http::Response<h2::RecvStream>) -> (String, String) {
    let (parts, mut received) = response.into_parts();
    let header = |map: &http::HeaderMap, name: &str| map.get(name).map(|v| percent_decode(v.to_str().unwrap()));
    if let Some(status) = header(&parts.headers, "grpc-status") {
        return (status, header(&parts.headers, "grpc-message").unwrap_or_default());
    }
    while let Some(chunk) = received.data().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("response body failed: {e}"));
        let _ = received.flow_control().release_capacity(chunk.len());
    }
    let trailers = received.trailers().await.unwrap_or_else(|e| panic!("no trailers: {e}")).expect("trailers");
    (header(&trailers, "grpc-status").expect("grpc-status"), header(&trailers, "grpc-message").unwrap_or_default())
}

/// grpc-message is percent-encoded (gRPC over HTTP/2).
pub fn percent_decode(text: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            out.push(u8::from_str_radix(&hex, 16).unwrap());
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap()
}
