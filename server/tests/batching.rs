//! Continuous batching (`--max-batch-requests`) on the real server and the shipped model:
//! requests decoded together must get exactly the answers they get alone, and one request
//! stopped inside a batch must not disturb the others.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{client, TestServer};
use qreformulate::pb::{GenerationOptions, ReformulateRequest, ReformulateResponse};
use tokio::task::JoinSet;
use tonic::{transport::Channel, Code, Request};

type Client = qreformulate::pb::reformulator_client::ReformulatorClient<Channel>;

/// Every query's answer, one request after the other.
async fn one_at_a_time(c: &Client, queries: &[String]) -> Vec<(Vec<String>, u64)> {
    let mut c = c.clone();
    let mut out = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        out.push(answer(&c.reformulate(request(q, i)).await.unwrap().into_inner()));
    }
    out
}

/// Every query's answer, at most `n` requests in flight at once; in completion order.
async fn concurrently(c: &Client, queries: &[String], n: usize) -> Vec<(usize, (Vec<String>, u64))> {
    let mut set = JoinSet::new();
    let (mut out, mut next) = (Vec::new(), 0);
    while next < queries.len() || !set.is_empty() {
        while set.len() < n && next < queries.len() {
            let (mut c, q, i) = (c.clone(), queries[next].clone(), next);
            set.spawn(async move { (i, answer(&c.reformulate(request(&q, i)).await.unwrap().into_inner())) });
            next += 1;
        }
        out.push(set.join_next().await.expect("a task is running").expect("request task panicked"));
    }
    out
}

/// A server with one worker, so that concurrent requests share its batch.
async fn batching_server() -> (TestServer, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let metrics_arg = metrics.to_string();
    let args =
        ["--workers", "1", "--max-batch-requests", "8", "--cache-capacity", "0", "--metrics-listen", &metrics_arg];
    (TestServer::start(&args).await, metrics)
}

/// Greedy, except every third query with a beam of 3 (a beam is three rows of one request).
fn options(i: usize) -> GenerationOptions {
    let num_beams = if i % 3 == 2 { 3 } else { 1 };
    GenerationOptions { max_new_tokens: 48, num_beams, ..Default::default() }
}

fn request(query: &str, i: usize) -> ReformulateRequest {
    ReformulateRequest { query: query.into(), options: Some(options(i)), skip_cache: true }
}

/// What must not change with the neighbours: the subqueries and the score, to the bit.
fn answer(r: &ReformulateResponse) -> (Vec<String>, u64) {
    (r.subqueries.clone(), r.mean_logprob.to_bits())
}

/// Steps taken and requests they carried, from /metrics.
async fn batch_counters(metrics: SocketAddr) -> (f64, f64) {
    let body = common::http_get(metrics, "/metrics").await;
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    (value("qreformulate_batch_steps_total "), value("qreformulate_batch_step_requests_total "))
}

#[tokio::test]
async fn answers_at_concurrency_8_are_the_answers_at_concurrency_1() {
    let queries: Vec<String> = common::dataset_queries("test.jsonl").expect("datasets/test.jsonl")[..64].to_vec();
    let (server, metrics) = batching_server().await;
    let c = client(server.addr).await;
    let alone = one_at_a_time(&c, &queries).await;
    let (steps_before, carried_before) = batch_counters(metrics).await;

    for (i, got) in concurrently(&c, &queries, 8).await {
        assert_eq!(got, alone[i], "{:?} answered differently at concurrency 8", queries[i]);
    }

    // The concurrent run really shared steps: alone, every step carries one request.
    let (steps, carried) = batch_counters(metrics).await;
    let mean = (carried - carried_before) / (steps - steps_before);
    assert!(mean > 2.0, "mean batch {mean:.2} at concurrency 8 with one worker");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_past_its_deadline_leaves_the_batch_without_disturbing_it() {
    let queries: Vec<String> = common::dataset_queries("test.jsonl").expect("datasets/test.jsonl")[..7].to_vec();
    let (server, _) = batching_server().await;
    let c = client(server.addr).await;
    let alone = one_at_a_time(&c, &queries).await;
    // 256 tokens without stopping take far longer than 30 ms: it must end by its deadline.
    let endless = {
        let mut c = c.clone();
        async move {
            let options = GenerationOptions { max_new_tokens: 256, ignore_eos: true, ..Default::default() };
            let query = "Who lived longer, Nikola Tesla or Milutin Milankovic?".into();
            let mut req = Request::new(ReformulateRequest { query, options: Some(options), skip_cache: true });
            req.set_timeout(Duration::from_millis(30));
            c.reformulate(req).await
        }
    };
    let (stopped, others) = tokio::join!(endless, concurrently(&c, &queries, 7));
    assert_eq!(stopped.expect_err("past its deadline").code(), Code::DeadlineExceeded);
    for (i, got) in others {
        assert_eq!(got, alone[i], "{:?} changed when a neighbour was stopped", queries[i]);
    }
    server.stop().await.unwrap();
}
