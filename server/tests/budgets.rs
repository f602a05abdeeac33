//! Safe to share: admission, per-call work budgets of Evaluate and Benchmark, response and
//! label limits, reading Evaluate streams ahead, clean shutdown of cut calls. Each test starts
//! its own real server on 127.0.0.1:0 with limits small enough to reach in a second or two.

mod common;

use std::time::{Duration, Instant};

use common::{client, raw_grpc, TestServer};
use qreformulate::pb::{self, GenerationOptions, ReformulateRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

const QUERY: &str = "Who lived longer, Nikola Tesla or Milutin Milankovic?";

fn reformulate(query: &str, max_new_tokens: u32) -> ReformulateRequest {
    let options = GenerationOptions { max_new_tokens, ..Default::default() };
    ReformulateRequest { query: query.into(), options: Some(options), skip_cache: false }
}

/// A generation that runs for many seconds on one worker: 4096 tokens x 8 beams (the server
/// needs `--max-new-tokens-limit 4096`).
fn long_generation() -> ReformulateRequest {
    let long = GenerationOptions { ignore_eos: true, max_new_tokens: 4096, num_beams: 8, ..Default::default() };
    ReformulateRequest { query: QUERY.into(), options: Some(long), skip_cache: false }
}

fn example(query: &str, expected: &[&str], echo_examples: bool) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        query: query.into(),
        expected_subqueries: expected.iter().map(|s| (*s).to_owned()).collect(),
        kind: "comparison".into(),
        options: Some(GenerationOptions { max_new_tokens: 4, ..Default::default() }),
        echo_examples,
    }
}

#[tokio::test]
async fn idle_evaluate_streams_hold_no_admission_slot() {
    let server =
        TestServer::start(&["--workers", "1", "--max-concurrent-requests", "4", "--cache-capacity", "0"]).await;
    let c = client(server.addr).await;
    // As many open Evaluate streams as there are slots, none sending anything.
    let mut senders = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::EvaluateRequest>(1);
        senders.push(tx);
        let mut c = c.clone();
        calls.push(tokio::spawn(async move { c.evaluate(ReceiverStream::new(rx)).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let reply = c.clone().reformulate(reformulate(&format!("{QUERY} {i}"), 4)).await;
        assert!(reply.is_ok(), "idle Evaluate streams must not make Reformulate fail: {reply:?}");
    }
    assert_eq!(common::health_status(server.addr, "").await, ServingStatus::Serving);
    // One of the streams then sends an example and is answered.
    senders[0].send(example(QUERY, &["Nikola Tesla lifespan"], false)).await.unwrap();
    drop(senders);
    let first = tokio::time::timeout(Duration::from_secs(30), calls.remove(0)).await.unwrap().unwrap();
    assert_eq!(first.unwrap().into_inner().examples.len(), 1);
    for call in calls {
        let status = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn huge_benchmark_takes_turns_with_reformulate_and_stops_at_its_wall_budget() {
    // One worker: before, the whole benchmark ran as one job and Reformulate waited behind it.
    let server = TestServer::start(&[
        "--workers",
        "1",
        "--cache-capacity",
        "0",
        "--max-call-secs",
        "3",
        "--max-call-tokens",
        "1000000000",
    ])
    .await;
    let mut c = client(server.addr).await;
    let options = GenerationOptions { ignore_eos: true, max_new_tokens: 48, num_beams: 8, ..Default::default() };
    let huge = pb::BenchmarkRequest { queries: vec![QUERY.into()], repeat: 100_000, warmup: 0, options: Some(options) };
    let started = Instant::now();
    let bench = tokio::spawn({
        let mut c = c.clone();
        async move { c.benchmark(huge).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let mut req = Request::new(reformulate(&format!("{QUERY} {i}"), 8));
        req.set_timeout(Duration::from_secs(2));
        let reply = c.reformulate(req).await;
        assert!(reply.is_ok(), "Reformulate with a 2 s deadline during a huge Benchmark: {reply:?}");
    }
    let status = tokio::time::timeout(Duration::from_secs(30), bench).await.unwrap().unwrap().unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-call-secs") && status.message().contains("3 s"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "the wall budget stopped it late: {:?}", started.elapsed());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn benchmark_over_the_token_budget_is_refused_up_front() {
    let server = TestServer::start(&["--workers", "1", "--max-call-tokens", "100000"]).await;
    let mut c = client(server.addr).await;
    let options = GenerationOptions { max_new_tokens: 256, num_beams: 8, ..Default::default() };
    let req = pb::BenchmarkRequest { queries: vec![QUERY.into()], repeat: 50, warmup: 2, options: Some(options) };
    let started = Instant::now();
    let status = c.benchmark(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // 52 generations x 256 tokens x 8 beams.
    for needle in ["106496", "100000", "--max-call-tokens"] {
        assert!(status.message().contains(needle), "{status:?} lacks {needle}");
    }
    assert!(started.elapsed() < Duration::from_secs(1), "refused only after {:?}", started.elapsed());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn evaluate_echoes_labels_only_when_asked_and_limits_labels_and_response() {
    let server =
        TestServer::start(&["--workers", "1", "--max-label-chars", "100", "--max-evaluate-response-bytes", "1500"])
            .await;
    let mut c = client(server.addr).await;
    let two = |echo| {
        vec![example(QUERY, &["Nikola Tesla lifespan", "Milutin Milankovic lifespan"], echo), {
            let mut e = example("Where was the author of Dune born?", &["Dune author"], false);
            e.options = None;
            e
        }]
    };
    // By default only what the client does not have comes back, in order.
    let r = c.evaluate(tokio_stream::iter(two(false))).await.unwrap().into_inner();
    assert_eq!(r.examples.len(), 2);
    for row in &r.examples {
        assert!(row.query.is_empty() && row.expected_subqueries.is_empty(), "{row:?}");
        assert!(!row.predicted_subqueries.is_empty() && row.kind == "comparison", "{row:?}");
    }
    // The first message asks for the echo.
    let r = c.evaluate(tokio_stream::iter(two(true))).await.unwrap().into_inner();
    assert_eq!(r.examples[1].query, "Where was the author of Dune born?");
    assert_eq!(r.examples[1].expected_subqueries, vec!["Dune author"]);

    // A label over --max-label-chars.
    let long = "x".repeat(101);
    let status = c.evaluate(tokio_stream::iter(vec![example(QUERY, &[&long], false)])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("example 1") && status.message().contains("--max-label-chars"), "{status:?}");

    // A response over --max-evaluate-response-bytes: refused as soon as it gets there.
    let many: Vec<_> = (0..60).map(|i| example(&format!("{QUERY} {i}"), &["a b c"], i == 0)).collect();
    let status = c.evaluate(tokio_stream::iter(many)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for needle in ["1500 bytes", "--max-evaluate-response-bytes", "echo_examples", "EvaluateStream"] {
        assert!(status.message().contains(needle), "{status:?} lacks {needle}");
    }
    // EvaluateStream sends the same rows one message each: the cap on one answer does not apply.
    let many: Vec<_> = (0..60).map(|i| example(&format!("{QUERY} {i}"), &["a b c"], i == 0)).collect();
    let mut answer = c.evaluate_stream(tokio_stream::iter(many)).await.unwrap().into_inner();
    let mut rows = 0;
    while let Some(message) = answer.message().await.expect("EvaluateStream is not capped") {
        match message.item {
            Some(pb::evaluate_progress::Item::Example(row)) => {
                rows += 1;
                assert_eq!(row.query, format!("{QUERY} {}", rows - 1), "echoed in order");
            }
            Some(pb::evaluate_progress::Item::Summary(summary)) => {
                assert_eq!(summary.overall.unwrap().examples, 60);
            }
            None => panic!("an empty EvaluateProgress"),
        }
    }
    assert_eq!(rows, 60);
    server.stop().await.unwrap();
}

/// Streams `count` EvaluateRequests the way grpcio does: each message in its own HTTP/2 DATA
/// frame, as fast as a Python client makes them (about 30 us each, far faster than the
/// model answers). Returns the call's grpc-status and grpc-message.
async fn evaluate_frame_per_message(addr: std::net::SocketAddr, count: usize) -> (String, String) {
    use prost::Message;
    let (response, mut body, connection) = raw_grpc::open(addr, "Evaluate").await;
    for i in 0..count {
        let message = example(&format!("{QUERY} {i}"), &["Nikola Tesla lifespan"], false).encode_to_vec();
        if i % 32 == 31 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if body.send_data(raw_grpc::frame(&message), false).is_err() {
            // The stream is closed: answered early, or the connection is gone (then the
            // response below says which).
            eprintln!("stream closed after {i} messages");
            break;
        }
    }
    let _ = body.send_data(bytes::Bytes::new(), true);
    let response = match response.await {
        Ok(response) => response,
        Err(e) => panic!("no response: {e}; connection: {:?}", connection.await),
    };
    raw_grpc::status(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_reads_ahead_of_a_client_that_sends_a_frame_per_message() {
    // 6000 small frames in a fraction of a second: unread, they exhaust h2's per-connection
    // budget for small frames (GOAWAY ENHANCE_YOUR_CALM). Read ahead, the 5001st is refused
    // at once.
    let server = TestServer::start(&["--workers", "1", "--max-evaluate-examples", "5000"]).await;
    let started = Instant::now();
    let (status, message) =
        tokio::time::timeout(Duration::from_secs(60), evaluate_frame_per_message(server.addr, 6000)).await.unwrap();
    assert_eq!(status, "3", "INVALID_ARGUMENT expected: {message}");
    assert!(message.contains("--max-evaluate-examples"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(20), "refused only after {:?}", started.elapsed());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn calls_cut_by_the_end_of_the_grace_period_are_unavailable() {
    let server = TestServer::start(&[
        "--workers",
        "1",
        "--grace-period-secs",
        "1",
        "--max-new-tokens-limit",
        "4096",
        "--cache-capacity",
        "0",
    ])
    .await;
    let mut c = client(server.addr).await;
    let call = tokio::spawn(async move { c.reformulate(long_generation()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(server.stop());
    let status = tokio::time::timeout(Duration::from_secs(20), call).await.unwrap().unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "retry policies must see UNAVAILABLE: {status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn undecodable_and_abandoned_calls_are_answered_and_counted() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let server = TestServer::start(&[
        "--workers",
        "1",
        "--metrics-listen",
        &metrics,
        "--max-new-tokens-limit",
        "4096",
        "--cache-capacity",
        "0",
    ])
    .await;
    // Field 1 (query) as a length-delimited string that claims more bytes than there are.
    let garbage: &[u8] = &[0x0a, 0x7f, b'a'];
    for method in ["Reformulate", "Benchmark", "Evaluate"] {
        let (response, mut body, _connection) = raw_grpc::open(server.addr, method).await;
        body.send_data(raw_grpc::frame(garbage), true).unwrap();
        let (status, message) = raw_grpc::status(response.await.unwrap()).await;
        assert_eq!(status, "3", "{method}: INVALID_ARGUMENT expected, got {status} {message}");
        assert!(message.contains("not a valid"), "{method}: {message}");
    }
    // A client that gives up on a long generation (its future dropped).
    let mut c = client(server.addr).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), c.reformulate(long_generation())).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = common::http_get(metrics.parse().unwrap(), "/metrics").await;
    for line in [
        r#"qreformulate_undecodable_messages_total{rpc="Reformulate"} 1"#,
        r#"qreformulate_undecodable_messages_total{rpc="Benchmark"} 1"#,
        r#"qreformulate_undecodable_messages_total{rpc="Evaluate"} 1"#,
        r#"qreformulate_abandoned_total{rpc="Reformulate"} 1"#,
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in:\n{body}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn invisible_queries_are_refused_and_answers_hold_no_separator() {
    let server = TestServer::start(&["--workers", "1", "--cache-capacity", "0"]).await;
    let mut c = client(server.addr).await;
    let status = c.reformulate(reformulate("\u{200B}\u{200D}\u{FEFF} \u{2060}", 4)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("invisible"), "{status:?}");
    // A query with the separator in it, answered with at most 1 token: whatever the model
    // writes or the guards fall back to, no subquery holds '|' or U+FFFD.
    for query in ["Tesla | Edison: who lived longer?", "a|b|c", "caf\u{FFFD} | bar"] {
        let r = c.reformulate(reformulate(query, 1)).await.unwrap().into_inner();
        assert!(!r.subqueries.is_empty());
        assert!(r.subqueries.iter().all(|s| !s.contains(['|', '\u{FFFD}']) && !s.is_empty()), "{query}: {r:?}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_is_not_serving_while_a_worker_is_stuck() {
    let server = TestServer::start(&[
        "--workers",
        "1",
        "--stuck-worker-secs",
        "1",
        "--max-new-tokens-limit",
        "4096",
        "--cache-capacity",
        "0",
    ])
    .await;
    let mut c = client(server.addr).await;
    // Many seconds on one worker, far past the 1 s allowed here.
    let call = tokio::spawn(async move { c.reformulate(long_generation()).await });
    let status = |addr| async move { common::health_status(addr, qreformulate::SERVICE_NAME).await };
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(server.addr).await == ServingStatus::Serving {
        assert!(Instant::now() < deadline, "health stayed SERVING with a worker stuck for 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client gives up: the worker is free and health comes back.
    call.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(server.addr).await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "health did not come back after the worker was freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await.unwrap();
}
