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
