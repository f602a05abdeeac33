//! Connection lifetimes: the age rollover (GOAWAY, then a forced close after the grace) and the
//! idle timeout, against the real server on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use qreformulate::pb::{GenerationOptions, ReformulateRequest};

fn query(text: String) -> ReformulateRequest {
    let options = GenerationOptions { max_new_tokens: 24, ..Default::default() };
    ReformulateRequest { query: text, options: Some(options), skip_cache: true }
}

/// Clients that call without pause across several connection-age rollovers see no failure:
/// each connection is told to go away (GOAWAY) and its calls finish before it closes.
#[tokio::test]
async fn calls_across_connection_age_rollovers_all_succeed() {
    let server = TestServer::start(&["--max-connection-age-secs", "1", "--max-connection-age-grace-secs", "1"]).await;
    let until = Instant::now() + Duration::from_secs(5);
    let mut clients = Vec::new();
    for c in 0..4 {
        let addr = server.addr;
        clients.push(tokio::spawn(async move {
            let mut client = common::client(addr).await;
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0;
            while Instant::now() < until {
                i += 1;
                match client.reformulate(query(format!("who wrote hamlet {c} {i}"))).await {
                    Ok(_) => ok += 1,
                    Err(status) => failed.push(format!("{:?}: {}", status.code(), status.message())),
                }
            }
            (ok, failed)
        }));
    }
    let mut failures = Vec::new();
    let mut answered = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        answered += ok;
        failures.extend(failed);
    }
    assert!(answered > 40, "only {answered} calls answered");
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {:?}",
        failures.len(),
        answered as usize + failures.len(),
        &failures[..failures.len().min(5)]
    );
    server.stop().await.unwrap();
}

/// A call still running at age + grace (an Evaluate stream that sends nothing) is cut there:
/// one client cannot keep a connection past its age.
#[tokio::test]
async fn a_call_still_running_at_age_plus_grace_is_cut() {
    let server = TestServer::start(&["--max-connection-age-secs", "1", "--max-connection-age-grace-secs", "1"]).await;
    let mut client = common::client(server.addr).await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<qreformulate::pb::EvaluateRequest>(1);
    let started = Instant::now();
    let call = client.evaluate(tokio_stream::wrappers::ReceiverStream::new(rx));
    let status = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call outlived the connection's age and grace")
        .expect_err("an Evaluate with no examples cannot succeed");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900), "cut after {took:?}, before age + grace: {status:?}");
    assert!(took < Duration::from_secs(10), "cut only after {took:?}");
    // The server goes on serving new connections.
    let mut fresh = common::client(server.addr).await;
    fresh.reformulate(query("who wrote hamlet".into())).await.expect("a new connection is served");
    server.stop().await.unwrap();
}

const GOAWAY: u8 = 0x7;

/// Opens an HTTP/2 connection that makes no call (preface and SETTINGS as raw bytes) and reads
/// until the server sends GOAWAY or closes: the types of the frames it sent, and when.
async fn idle_connection(addr: std::net::SocketAddr) -> (Vec<u8>, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let started = Instant::now();
    let (mut received, mut types) = (Vec::new(), Vec::new());
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        let (mut buf, mut at) = ([0u8; 4096], 0);
        while !types.contains(&GOAWAY) {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
            // Frames: a 9-byte header (24-bit length, type, flags, stream id), then the payload.
            while at + 9 <= received.len() {
                let len = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
                types.push(received[at + 3]);
                at += 9 + len;
            }
        }
    });
    read.await.expect("no GOAWAY and no close");
    (types, started.elapsed())
}

/// A connection without calls gets GOAWAY after --idle-timeout-secs (a clean close the client
/// expects, not a reset); with 0 it is kept; a client on a closed connection reconnects.
#[tokio::test]
async fn idle_connections_are_told_to_go_away() {
    let server = TestServer::start(&["--idle-timeout-secs", "1"]).await;
    let (frames, after) = idle_connection(server.addr).await;
    assert!(frames.contains(&GOAWAY), "closed without GOAWAY; frames {frames:?}");
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(5), "closed after {after:?}");
    // A channel whose connection went idle reconnects for its next call.
    let mut client = common::client(server.addr).await;
    client.reformulate(query("who wrote hamlet".into())).await.expect("first call");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.reformulate(query("who wrote hamlet".into())).await.expect("a call after the idle GOAWAY");
    server.stop().await.unwrap();

    let server = TestServer::start(&["--idle-timeout-secs", "0"]).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (_send, connection) = h2::client::handshake(tcp).await.unwrap();
    let kept = tokio::time::timeout(Duration::from_millis(2500), connection).await;
    assert!(kept.is_err(), "closed although the idle timeout is off: {kept:?}");
    server.stop().await.unwrap();
}

/// A call in flight longer than the idle timeout keeps its connection: with a 1 s grace, a
/// GOAWAY sent while it runs would cut it.
#[tokio::test]
async fn a_long_call_is_not_idle() {
    let server = TestServer::start(&["--idle-timeout-secs", "1", "--max-connection-age-grace-secs", "1"]).await;
    let mut client = common::client(server.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let example = |q: &str| qreformulate::pb::EvaluateRequest { query: q.into(), ..Default::default() };
    tx.send(example("who wrote hamlet")).await.unwrap();
    let call = tokio::spawn(async move { client.evaluate(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(3000)).await;
    tx.send(example("who painted the mona lisa")).await.unwrap();
    drop(tx);
    let answer = call.await.unwrap().expect("the call outlived the idle timeout");
    assert_eq!(answer.into_inner().overall.unwrap().examples, 2);
    server.stop().await.unwrap();
}
