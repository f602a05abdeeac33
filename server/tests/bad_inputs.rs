//! The bad-input catalogue of docs/reliability.md that no other integration test covers: each
//! case is raw gRPC frames (so that invalid UTF-8, unknown fields and unknown methods can be
//! sent too) against one real server, with the gRPC status it must get.

mod common;

use std::time::Duration;

use common::{raw_grpc, TestServer};
use prost::Message;
use qreformulate::pb::{self, GenerationOptions};

const QUERY: &str = "Who lived longer, Nikola Tesla or Milutin Milankovic?";

fn reformulate(query: &str, options: GenerationOptions) -> Vec<u8> {
    pb::ReformulateRequest { query: query.into(), options: Some(options), skip_cache: true }.encode_to_vec()
}

fn example(query: &str, expected: &[&str], kind: &str, options: Option<GenerationOptions>) -> Vec<u8> {
    pb::EvaluateRequest {
        query: query.into(),
        expected_subqueries: expected.iter().map(|s| (*s).into()).collect(),
        kind: kind.into(),
        options,
        echo_examples: false,
    }
    .encode_to_vec()
}

fn benchmark(queries: &[&str], repeat: u32, warmup: u32, options: Option<GenerationOptions>) -> Vec<u8> {
    pb::BenchmarkRequest { queries: queries.iter().map(|s| (*s).into()).collect(), repeat, warmup, options }
        .encode_to_vec()
}

/// (case, method, frames, expected grpc-status, a word the message must hold)
type Case = (&'static str, &'static str, Vec<Vec<u8>>, &'static str, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_codes() {
    const OK: &str = "0";
    const INVALID: &str = "3";
    const UNIMPLEMENTED: &str = "12";
    let server = TestServer::start(&["--workers", "1", "--cache-capacity", "0"]).await;
    let d = GenerationOptions::default();
    let sample = GenerationOptions { do_sample: true, ..d };
    let mut invalid_utf8 = vec![0x0a, 9, 0xc3, 0x28];
    invalid_utf8.extend_from_slice(b" Tesla");
    let mut unknown_field = reformulate(QUERY, d);
    unknown_field.extend_from_slice(&[0x98, 0x06, 1]); // field 99, varint 1
    let bad_beams = Some(GenerationOptions { num_beams: 9, ..d });
    let cases: Vec<Case> = vec![
        (
            "zero-width BOM and word joiner only",
            "Reformulate",
            vec![reformulate("\u{feff}\u{2060}", d)],
            INVALID,
            "invisible",
        ),
        ("control characters only", "Reformulate", vec![reformulate("\0\u{1}\u{7}", d)], INVALID, "blank"),
        ("Hangul fillers only", "Reformulate", vec![reformulate("\u{3164}\u{115f}", d)], INVALID, "invisible"),
        ("tag characters only", "Reformulate", vec![reformulate("\u{e0041}\u{e0042}", d)], INVALID, "invisible"),
        (
            "1000 two-byte characters: over the token limit",
            "Reformulate",
            vec![reformulate(&"é".repeat(1000), d)],
            INVALID,
            "tokens",
        ),
        (
            "2000 two-byte characters, truncated",
            "Reformulate",
            vec![reformulate(&"é".repeat(2000), GenerationOptions { truncate: true, max_new_tokens: 4, ..d })],
            OK,
            "",
        ),
        (
            "max_new_tokens 2^32-1",
            "Reformulate",
            vec![reformulate(QUERY, GenerationOptions { max_new_tokens: u32::MAX, ..d })],
            INVALID,
            "max_new_tokens",
        ),
        (
            "num_beams 2^32-1",
            "Reformulate",
            vec![reformulate(QUERY, GenerationOptions { num_beams: u32::MAX, ..d })],
            INVALID,
            "num_beams",
        ),
        (
            "temperature NaN",
            "Reformulate",
            vec![reformulate(QUERY, GenerationOptions { temperature: f32::NAN, ..sample })],
            INVALID,
            "temperature",
        ),
        (
            "temperature +Inf",
            "Reformulate",
            vec![reformulate(QUERY, GenerationOptions { temperature: f32::INFINITY, ..sample })],
            INVALID,
            "temperature",
        ),
        (
            "negative temperature without sampling is ignored",
            "Reformulate",
            vec![reformulate(QUERY, GenerationOptions { temperature: -1.0, max_new_tokens: 4, ..d })],
            OK,
            "",
        ),
        ("query with invalid UTF-8", "Reformulate", vec![invalid_utf8], INVALID, ""),
        ("unknown field is ignored", "Reformulate", vec![unknown_field], OK, ""),
        (
            "RTL override and emoji around a query",
            "Reformulate",
            vec![reformulate(&format!("\u{202e}{QUERY} \u{1f600}"), d)],
            OK,
            "",
        ),
        ("example with an empty query", "Evaluate", vec![example("", &["Tesla"], "", None)], INVALID, "empty"),
        ("blank expected subquery is accepted", "Evaluate", vec![example(QUERY, &["  "], "", None)], OK, ""),
        (
            "kind of 300 characters is accepted",
            "Evaluate",
            vec![example(QUERY, &["Tesla"], &"k".repeat(300), None)],
            OK,
            "",
        ),
        (
            "bad options in the second example",
            "Evaluate",
            vec![example(QUERY, &["Tesla"], "", None), example(QUERY, &["Tesla"], "", bad_beams)],
            INVALID,
            "num_beams",
        ),
        (
            "repeat 0 means the default",
            "Benchmark",
            vec![benchmark(&[QUERY], 0, 0, Some(GenerationOptions { max_new_tokens: 4, ..d }))],
            OK,
            "",
        ),
        ("warmup 10^9", "Benchmark", vec![benchmark(&[QUERY], 1, 1_000_000_000, None)], INVALID, ""),
        ("bad options", "Benchmark", vec![benchmark(&[QUERY], 1, 0, bad_beams)], INVALID, "num_beams"),
        ("unknown method", "Nope", vec![Vec::new()], UNIMPLEMENTED, ""),
    ];
    let mut failures = Vec::new();
    for (case, method, frames, expected, needle) in &cases {
        let (status, message) =
            tokio::time::timeout(Duration::from_secs(60), raw_grpc::call(server.addr, method, frames))
                .await
                .expect(case);
        if status != *expected || !message.contains(needle) {
            failures.push(format!("{method} {case}: expected {expected} with {needle:?}, got {status} {message:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    server.stop().await.unwrap();
}
