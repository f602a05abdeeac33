//! End-to-end tests: the real server, the real model files and ONNX Runtime, spoken to
//! through the generated gRPC client. Model output is not asserted (the model may be a
//! random test model or the trained one); structure, limits and behaviour are.

mod common;

use std::time::Duration;

use common::{client, shared_server, TestServer};
use qreformulate::pb::{self, GenerationOptions, ReformulateRequest};
use tonic::{Code, Request, Status};

const QUERY: &str = "Who lived longer, Nikola Tesla or Milutin Milankovic?";

fn request(query: &str, options: GenerationOptions) -> ReformulateRequest {
    ReformulateRequest { query: query.into(), options: Some(options), skip_cache: false }
}

/// Asserts INVALID_ARGUMENT whose message contains every needle.
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, needles: &[&str]) {
    let status = result.expect_err("expected INVALID_ARGUMENT, got a response");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for n in needles {
        assert!(status.message().contains(n), "message {:?} lacks {n:?}", status.message());
    }
}

#[tokio::test]
async fn reformulate_answers_subqueries_with_timings() {
    let mut c = client(shared_server()).await;
    common::wait_serving(shared_server()).await;
    let r = c.reformulate(request(QUERY, GenerationOptions::default())).await.unwrap().into_inner();
    assert!(!r.subqueries.is_empty());
    assert!(r.subqueries.iter().all(|s| !s.trim().is_empty() && !s.contains('|')), "{:?}", r.subqueries);
    assert!(r.candidates.is_empty(), "one candidate is not listed");
    assert_eq!(r.model_id, common::model_dir().canonicalize().unwrap().file_name().unwrap().to_string_lossy());
    assert!(!r.truncated);
    let t = r.timings.expect("timings");
    assert!(!t.cached);
    assert!(t.input_tokens > 0 && t.generated_tokens > 0, "{t:?}");
    assert!(t.total_ms > 0.0 && t.decode_ms > 0.0 && t.encode_ms > 0.0, "{t:?}");
    assert!(t.total_ms + 1e-9 >= t.tokenize_ms + t.encode_ms + t.decode_ms - 1e-6, "{t:?}");
    // Greedy is deterministic.
    let again = c.reformulate(request(QUERY, GenerationOptions::default())).await.unwrap().into_inner();
    assert_eq!(again.subqueries, r.subqueries);
}

#[tokio::test]
async fn beam_search_returns_ordered_candidates() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let opts = GenerationOptions { num_beams: 4, num_return_sequences: 3, max_new_tokens: 12, ..Default::default() };
    let r = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
    assert_eq!(r.candidates.len(), 3);
    assert!(r.candidates.windows(2).all(|w| w[0].score >= w[1].score), "{:?}", r.candidates);
    assert!(r.candidates.iter().all(|c| c.score.is_finite() && c.score <= 0.0 && !c.subqueries.is_empty()));
    assert_eq!(r.subqueries, r.candidates[0].subqueries, "the best candidate answers");
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let opts = |seed| GenerationOptions {
        do_sample: true,
        temperature: 5.0,
        seed,
        num_return_sequences: 3,
        max_new_tokens: 8,
        ..Default::default()
    };
    let texts = |r: pb::ReformulateResponse| r.candidates.into_iter().map(|c| c.text).collect::<Vec<_>>();
    let a = texts(c.reformulate(request(QUERY, opts(11))).await.unwrap().into_inner());
    let b = texts(c.reformulate(request(QUERY, opts(11))).await.unwrap().into_inner());
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "equal seeds must give equal samples (the shared server has no cache)");
    // At temperature 5 the distribution is nearly flat: another seed draws other tokens.
    let other = texts(c.reformulate(request(QUERY, opts(12))).await.unwrap().into_inner());
    assert_ne!(a, other);
}

#[tokio::test]
async fn ignore_eos_generates_exactly_max_new_tokens() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    for (max, beams) in [(17, 0), (9, 3)] {
        let opts = GenerationOptions { ignore_eos: true, max_new_tokens: max, num_beams: beams, ..Default::default() };
        let r = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
        assert_eq!(r.timings.unwrap().generated_tokens, max, "beams {beams}");
    }
}

#[tokio::test]
async fn response_cache_hits_only_for_identical_options() {
    let server = TestServer::start(&["--workers", "1", "--cache-capacity", "100"]).await;
    let mut c = client(server.addr).await;
    let opts = GenerationOptions { max_new_tokens: 6, ..Default::default() };
    let first = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
    assert!(!first.timings.as_ref().unwrap().cached);
    // Same query after whitespace normalisation, same options: served from the cache.
    let spaced = format!("  {}  ", QUERY.replace(' ', "   "));
    let second = c.reformulate(request(&spaced, opts)).await.unwrap().into_inner();
    let t = second.timings.as_ref().unwrap();
    assert!(t.cached);
    assert_eq!(t.generated_tokens, 0, "a hit sets only total_ms");
    assert_eq!(second.subqueries, first.subqueries);
    assert_eq!(second.model_id, first.model_id);
    // Any other option misses.
    for other in [
        GenerationOptions { max_new_tokens: 7, ..opts },
        GenerationOptions { ignore_eos: true, ..opts },
        GenerationOptions { num_beams: 2, ..opts },
        GenerationOptions { do_sample: true, seed: 3, ..opts },
    ] {
        let r = c.reformulate(request(QUERY, other)).await.unwrap().into_inner();
        assert!(!r.timings.unwrap().cached, "{other:?} must not be served from the cache");
    }
    // Case is kept: the model is case-sensitive.
    let upper = c.reformulate(request(&QUERY.to_uppercase(), opts)).await.unwrap().into_inner();
    assert!(!upper.timings.unwrap().cached);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn skip_cache_runs_the_model_and_refreshes_the_entry() {
    let server = TestServer::start(&["--workers", "1", "--cache-capacity", "100"]).await;
    let mut c = client(server.addr).await;
    let opts = GenerationOptions { max_new_tokens: 6, ..Default::default() };
    let skipping = ReformulateRequest { skip_cache: true, ..request(QUERY, opts) };
    let first = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
    assert!(!first.timings.unwrap().cached);
    // The entry exists now, yet skip_cache computes again (the engine reports its tokens).
    let fresh = c.reformulate(skipping.clone()).await.unwrap().into_inner();
    let t = fresh.timings.unwrap();
    assert!(!t.cached, "skip_cache must not be served from the cache");
    assert!(t.generated_tokens > 0);
    assert_eq!(fresh.subqueries, first.subqueries);
    // Without the flag the same request is a hit.
    let hit = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
    assert!(hit.timings.unwrap().cached);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn evaluate_reports_metrics_per_kind_and_latency() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    // The model's own answer as the reference: exact match for that example.
    let own = c.reformulate(request(QUERY, GenerationOptions::default())).await.unwrap().into_inner().subqueries;
    let examples = vec![
        pb::EvaluateRequest {
            query: QUERY.into(),
            expected_subqueries: own.clone(),
            kind: "comparison".into(),
            options: Some(GenerationOptions::default()),
            echo_examples: true,
        },
        pb::EvaluateRequest {
            query: "capital of France population".into(),
            expected_subqueries: vec!["zzzz qqqq".into(), "xxxx".into(), "wwww".into(), "vvvv".into()],
            kind: "comparison".into(),
            options: None,
            echo_examples: false,
        },
        pb::EvaluateRequest {
            query: "Where was the author of Dune born?".into(),
            expected_subqueries: vec!["Dune author".into()],
            kind: String::new(),
            options: None,
            echo_examples: false,
        },
    ];
    let r = c.evaluate(tokio_stream::iter(examples)).await.unwrap().into_inner();
    let overall = r.overall.expect("overall row");
    assert_eq!(overall.name, "overall");
    assert_eq!(overall.examples, 3);
    for v in [overall.exact_match, overall.rouge_l, overall.count_accuracy, overall.levenshtein] {
        assert!((0.0..=1.0).contains(&v), "{overall:?}");
    }
    let names: Vec<_> = r.per_kind.iter().map(|k| (k.name.as_str(), k.examples)).collect();
    assert_eq!(names, vec![("comparison", 2), ("unknown", 1)]);
    assert_eq!(r.examples.len(), 3);
    assert!(r.examples[0].exact_match, "{:?}", r.examples[0]);
    assert_eq!(r.examples[0].predicted_subqueries, own);
    assert_eq!(r.examples[0].rouge_l, 1.0);
    assert!(!r.examples[1].exact_match, "nonsense reference cannot match");
    assert_eq!(r.examples[2].kind, "");
    let lat = r.latency.expect("latency");
    assert_eq!(lat.count, 3);
    assert!(lat.min_ms > 0.0 && lat.min_ms <= lat.median_ms && lat.median_ms <= lat.max_ms, "{lat:?}");
    assert!(!r.model_id.is_empty());
}

#[tokio::test]
async fn evaluate_rejects_bad_examples_and_empty_streams() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let good = pb::EvaluateRequest { query: QUERY.into(), ..Default::default() };
    let blank = pb::EvaluateRequest { query: "   ".into(), ..Default::default() };
    assert_invalid(c.evaluate(tokio_stream::iter(vec![good, blank])).await, &["example 2", "blank"]);
    assert_invalid(c.evaluate(tokio_stream::iter(Vec::<pb::EvaluateRequest>::new())).await, &["no examples"]);
}

/// Reads an EvaluateStream answer: its example rows in order, then the summary.
async fn streamed(
    answer: &mut tonic::Streaming<pb::EvaluateProgress>,
) -> Result<(Vec<pb::EvaluatedExample>, pb::EvaluateResponse), Status> {
    let mut rows = Vec::new();
    while let Some(message) = answer.message().await? {
        match message.item.expect("an EvaluateProgress always holds an item") {
            pb::evaluate_progress::Item::Example(row) => rows.push(row),
            pb::evaluate_progress::Item::Summary(summary) => {
                assert!(answer.message().await?.is_none(), "a message after the summary");
                return Ok((rows, summary));
            }
        }
    }
    panic!("the answer ended after {} rows without a summary", rows.len());
}

#[tokio::test]
async fn evaluate_stream_answers_each_row_as_it_is_scored_and_agrees_with_evaluate() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let queries = [QUERY, "Where was the author of Dune born?", "capital of France population"];
    let example = |q: &str| pb::EvaluateRequest {
        query: q.into(),
        expected_subqueries: vec![format!("{q} x")],
        kind: "k".into(),
        ..Default::default()
    };
    // Row i comes back before example i + 1 is sent: the request stream stays open meanwhile
    // (with one answer at the end, as Evaluate gives, this would wait forever).
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(example(queries[0])).await.unwrap();
    let mut answer = c.evaluate_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut rows = Vec::new();
    for next in queries[1..].iter().map(Some).chain([None]) {
        let message = tokio::time::timeout(Duration::from_secs(30), answer.message())
            .await
            .expect("no row while the stream is open")
            .unwrap()
            .expect("the answer ended early");
        match message.item {
            Some(pb::evaluate_progress::Item::Example(row)) => rows.push(row),
            other => panic!("expected a row, got {other:?}"),
        }
        if let Some(q) = next {
            tx.send(example(q)).await.unwrap();
        }
    }
    drop(tx);
    let (more, summary) = streamed(&mut answer).await.unwrap();
    assert!(more.is_empty(), "{more:?}");
    assert!(summary.examples.is_empty(), "the summary repeats the rows");
    // The same examples through Evaluate: the same rows and tables.
    let unary = c.evaluate(tokio_stream::iter(queries.map(example))).await.unwrap().into_inner();
    let predicted =
        |rows: &[pb::EvaluatedExample]| rows.iter().map(|r| r.predicted_subqueries.clone()).collect::<Vec<_>>();
    assert_eq!(predicted(&rows), predicted(&unary.examples));
    assert_eq!(summary.overall.as_ref().unwrap().examples, 3);
    assert_eq!(summary.overall.as_ref().unwrap().rouge_l, unary.overall.as_ref().unwrap().rouge_l);
    assert_eq!(summary.echo_overall, unary.echo_overall);
    assert_eq!(summary.latency.unwrap().count, 3);
    assert_eq!(summary.model_id, unary.model_id);
}

#[tokio::test]
async fn evaluate_stream_rejects_bad_examples_and_empty_streams() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let good = pb::EvaluateRequest { query: QUERY.into(), ..Default::default() };
    let blank = pb::EvaluateRequest { query: "   ".into(), ..Default::default() };
    let mut answer = c.evaluate_stream(tokio_stream::iter(vec![good, blank])).await.unwrap().into_inner();
    let first = answer.message().await.unwrap().expect("the good example's row");
    assert!(matches!(first.item, Some(pb::evaluate_progress::Item::Example(_))), "{first:?}");
    assert_invalid(streamed(&mut answer).await, &["example 2", "blank"]);
    let empty = c.evaluate_stream(tokio_stream::iter(Vec::<pb::EvaluateRequest>::new())).await;
    assert_invalid(streamed(&mut empty.unwrap().into_inner()).await, &["EvaluateStream", "no examples"]);
}

#[tokio::test]
async fn benchmark_counts_and_ordered_percentiles() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let req = pb::BenchmarkRequest {
        queries: vec![QUERY.into(), "Where was the author of Dune born?".into()],
        repeat: 3,
        warmup: 1,
        options: Some(GenerationOptions { ignore_eos: true, max_new_tokens: 4, ..Default::default() }),
    };
    let r = c.benchmark(req).await.unwrap().into_inner();
    assert_eq!(r.requests, 6);
    assert_eq!(r.generated_tokens, 24);
    let l = r.latency.expect("latency");
    assert_eq!(l.count, 6);
    let order = [l.min_ms, l.median_ms, l.p90_ms, l.p95_ms, l.p99_ms, l.max_ms];
    assert!(l.min_ms > 0.0 && order.windows(2).all(|w| w[0] <= w[1]), "{l:?}");
    assert!(l.mean_ms >= l.min_ms && l.mean_ms <= l.max_ms && l.std_ms >= 0.0, "{l:?}");
    assert!(r.tokens_per_second > 0.0 && r.wall_seconds > 0.0);
    assert!(r.mean_decode_ms > 0.0 && r.mean_encode_ms > 0.0 && r.mean_tokenize_ms >= 0.0);
    assert!(!r.model_id.is_empty());
}

#[tokio::test]
async fn benchmark_rejects_bad_sizes() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    assert_invalid(c.benchmark(pb::BenchmarkRequest::default()).await, &["queries is empty"]);
    let huge = pb::BenchmarkRequest { queries: vec!["a".into(), "b".into()], repeat: 60_000, ..Default::default() };
    assert_invalid(c.benchmark(huge).await, &["120000", "100000"]);
    let blank = pb::BenchmarkRequest { queries: vec!["a".into(), " ".into()], ..Default::default() };
    assert_invalid(c.benchmark(blank).await, &["queries[1]"]);
}

#[tokio::test]
async fn bad_queries_are_invalid_argument() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let default = GenerationOptions::default();
    assert_invalid(c.reformulate(request("", default)).await, &["empty"]);
    assert_invalid(c.reformulate(request(" \t\n ", default)).await, &["blank"]);
    assert_invalid(c.reformulate(request(&"a".repeat(2001), default)).await, &["2001", "2000"]);
    // The shared server allows 32 input tokens.
    let long = "Tesla Milankovic Edison Westinghouse Marconi ".repeat(10);
    assert_invalid(c.reformulate(request(&long, default)).await, &["tokens", "32", "truncate"]);
    let cut = c
        .reformulate(request(&long, GenerationOptions { truncate: true, max_new_tokens: 4, ..default }))
        .await
        .unwrap()
        .into_inner();
    assert!(cut.truncated);
    assert_eq!(cut.timings.unwrap().input_tokens, 32);
}

#[tokio::test]
async fn out_of_range_options_are_invalid_argument() {
    let addr = shared_server();
    common::wait_serving(addr).await;
    let mut c = client(addr).await;
    let cases: Vec<(GenerationOptions, Vec<&str>)> = vec![
        (GenerationOptions { max_new_tokens: 257, ..Default::default() }, vec!["max_new_tokens", "257", "256"]),
        (GenerationOptions { num_beams: 9, ..Default::default() }, vec!["num_beams", "9", "8"]),
        (
            GenerationOptions { num_beams: 2, num_return_sequences: 3, ..Default::default() },
            vec!["num_return_sequences", "3"],
        ),
        (GenerationOptions { num_return_sequences: 2, ..Default::default() }, vec!["num_return_sequences", "greedy"]),
        (
            GenerationOptions { do_sample: true, num_return_sequences: 9, ..Default::default() },
            vec!["num_return_sequences", "9", "8"],
        ),
        (GenerationOptions { do_sample: true, temperature: -0.5, ..Default::default() }, vec!["temperature", "-0.5"]),
        (
            GenerationOptions { do_sample: true, temperature: f32::NAN, ..Default::default() },
            vec!["temperature", "NaN"],
        ),
        (GenerationOptions { do_sample: true, num_beams: 3, ..Default::default() }, vec!["do_sample", "num_beams"]),
    ];
    for (opts, needles) in cases {
        assert_invalid(c.reformulate(request(QUERY, opts)).await, &needles);
    }
}

#[tokio::test]
async fn client_deadline_stops_generation_and_server_keeps_serving() {
    // A generation that cannot finish in the client's 300 ms: up to 4096 tokens, 8 beams.
    // The server answers DEADLINE_EXCEEDED a little before the deadline, ahead of the tonic
    // client's own timer (which would report CANCELLED).
    let server = TestServer::start(&["--workers", "1", "--max-new-tokens-limit", "4096"]).await;
    let mut c = client(server.addr).await;
    let long = GenerationOptions { ignore_eos: true, max_new_tokens: 4096, num_beams: 8, ..Default::default() };
    let mut req = Request::new(request(QUERY, long));
    req.set_timeout(Duration::from_millis(300));
    let status = c.reformulate(req).await.expect_err("4096 tokens x 8 beams cannot finish in 300 ms");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The single worker is free again: the decode loop stopped at the deadline.
    let ok = c.reformulate(request(QUERY, GenerationOptions { max_new_tokens: 4, ..Default::default() })).await;
    assert!(ok.is_ok(), "{ok:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn overload_is_resource_exhausted_not_queued() {
    let server =
        TestServer::start(&["--workers", "1", "--max-concurrent-requests", "1", "--cache-capacity", "0"]).await;
    let c = client(server.addr).await;
    let long = GenerationOptions { ignore_eos: true, max_new_tokens: 256, num_beams: 8, ..Default::default() };
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.reformulate(request(&format!("{QUERY} {i}"), long)).await })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("--max-concurrent-requests"), "{s:?}");
                exhausted += 1;
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_goes_serving_then_not_serving_on_shutdown() {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    // The listener is bound before `serve` runs, so this watch is answered as soon as the
    // server accepts: before the model has loaded and warmed up.
    let server = TestServer::spawn(&["--workers", "1", "--grace-period-secs", "5"]).await;
    let mut health = HealthClient::new(common::channel(server.addr).await);
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while seen.last() != Some(&ServingStatus::Serving) {
        let msg = tokio::time::timeout(Duration::from_secs(60), watch.message()).await.unwrap().unwrap().unwrap();
        seen.push(msg.status());
    }
    assert_eq!(seen.first(), Some(&ServingStatus::NotServing), "{seen:?}");
    assert_eq!(common::health_status(server.addr, qreformulate::SERVICE_NAME).await, ServingStatus::Serving);

    let handle_addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    let msg = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(msg.status(), ServingStatus::NotServing, "after shutdown at {handle_addr}");
    drop(watch);
    stopping.await.unwrap().expect("serve returns Ok after a clean shutdown");
}

#[tokio::test]
async fn reflection_lists_the_service() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    // Reflection is off unless --reflection (tests/security.rs checks both ways and v1alpha).
    let server = common::TestServer::start(&["--reflection"]).await;
    let addr = server.addr;
    let mut r = ServerReflectionClient::new(common::channel(addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let reply = stream.message().await.unwrap().expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&qreformulate::SERVICE_NAME.to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn prometheus_endpoint_counts_requests_by_code_and_cache() {
    // A free port for the metrics listener (bound and released; the server binds it again).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = TestServer::start(&["--workers", "1", "--metrics-listen", &metrics_addr.to_string()]).await;
    let mut c = client(server.addr).await;
    let opts = GenerationOptions { max_new_tokens: 5, ..Default::default() };
    let first = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
    let tokens = first.timings.unwrap().generated_tokens;
    c.reformulate(request(QUERY, opts)).await.unwrap(); // a cache hit
    assert_eq!(c.reformulate(request("   ", opts)).await.unwrap_err().code(), Code::InvalidArgument);

    let body = common::http_get(metrics_addr, "/metrics").await;
    for line in [
        r#"qreformulate_requests_total{code="OK",rpc="Reformulate"} 2"#.to_owned(),
        r#"qreformulate_requests_total{code="INVALID_ARGUMENT",rpc="Reformulate"} 1"#.to_owned(),
        r#"qreformulate_request_duration_seconds_count{rpc="Reformulate"} 3"#.to_owned(),
        "qreformulate_cache_hits_total 1".to_owned(),
        "qreformulate_cache_misses_total 1".to_owned(),
        "qreformulate_cache_entries 1".to_owned(),
        format!("qreformulate_generated_tokens_total {tokens}"),
        "qreformulate_in_flight_requests 0".to_owned(),
        // One generated answer (the cache hit is not one), in every phase.
        "qreformulate_input_tokens_count 1".to_owned(),
        r#"qreformulate_phase_duration_seconds_count{phase="queue"} 1"#.to_owned(),
        r#"qreformulate_phase_duration_seconds_count{phase="decode"} 1"#.to_owned(),
        format!(
            r#"qreformulate_build_info{{decoder="native",kernel="{}",model="qreformulate-t5",version="{}",weights="int8"}} 1"#,
            qserver::engine::native::kernels::Kernel::detect().name(),
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in:\n{body}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn onnx_decoder_serves_greedy_and_beam() {
    // The shared server decodes natively (the model ships its checkpoint); this one keeps every
    // decoder step on ONNX Runtime, the path for models exported without a checkpoint.
    let server = TestServer::start(&["--workers", "1", "--cache-capacity", "0", "--decoder", "onnx"]).await;
    let mut c = client(server.addr).await;
    let greedy = c.reformulate(request(QUERY, GenerationOptions::default())).await.unwrap().into_inner();
    assert!(!greedy.subqueries.is_empty() && greedy.subqueries.iter().all(|s| !s.trim().is_empty()));
    let opts = GenerationOptions { num_beams: 3, num_return_sequences: 2, max_new_tokens: 12, ..Default::default() };
    let beam = c.reformulate(request(QUERY, opts)).await.unwrap().into_inner();
    assert_eq!(beam.candidates.len(), 2);
    assert!(beam.candidates[0].score >= beam.candidates[1].score);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn draft_tokens_keep_every_answer_and_take_fewer_steps() {
    // The same queries on a server with the default draft tokens and on one without: the same
    // answers; without drafts one decoder step per token, with them fewer where the kernel has
    // rows to spare (engine/lookup.rs).
    let drafting = TestServer::start(&["--workers", "1"]).await;
    let plain = TestServer::start(&["--workers", "1", "--draft-tokens", "0"]).await;
    let (mut d, mut p) = (client(drafting.addr).await, client(plain.addr).await);
    let queries = [QUERY, "List the lengths for the Mekong and the Orinoco.", "tallest building in dubai"];
    let (mut tokens, mut steps) = (0, 0);
    for query in queries {
        let a = d.reformulate(request(query, GenerationOptions::default())).await.unwrap().into_inner();
        let b = p.reformulate(request(query, GenerationOptions::default())).await.unwrap().into_inner();
        assert_eq!(a.subqueries, b.subqueries, "{query}");
        assert_eq!(a.mean_logprob.to_bits(), b.mean_logprob.to_bits(), "{query}");
        let (ta, tb) = (a.timings.unwrap(), b.timings.unwrap());
        assert_eq!(ta.generated_tokens, tb.generated_tokens, "{query}");
        assert_eq!(tb.decoder_steps, tb.generated_tokens, "{query}: one step per token without drafts");
        assert!(ta.decoder_steps >= 1 && ta.decoder_steps <= ta.generated_tokens, "{query}: {ta:?}");
        (tokens, steps) = (tokens + ta.generated_tokens, steps + ta.decoder_steps);
    }
    if qserver::engine::native::kernels::Kernel::detect().free_rows() > 1 {
        assert!(steps < tokens, "{steps} steps for {tokens} tokens: no draft was kept");
    } else {
        assert_eq!(steps, tokens, "this kernel has no rows to spare for drafts");
    }
    drafting.stop().await.unwrap();
    plain.stop().await.unwrap();
}
