//! End to end: the real `qserver` runs in-process (one server shared by every test in this
//! file, on 127.0.0.1 with an ephemeral port), and the real `qclient` binary talks to it.
//!
//! The model comes from `QREFORMULATE_TEST_MODEL`, else `<repo>/models/qreformulate-t5`.
//! Its outputs may be garbage (a randomly initialised model has the same layout), so these
//! tests check structure and accounting, never the text of the subqueries, and time nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long the shared server may take to load and warm up before the tests give up.
const STARTUP_LIMIT: Duration = Duration::from_secs(300);

fn model_dir() -> PathBuf {
    match std::env::var_os("QREFORMULATE_TEST_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qreformulate-t5"),
    }
}

/// The shared server's address (`http://127.0.0.1:PORT`), started on first use.
fn server() -> &'static str {
    static ADDR: OnceLock<Result<String, String>> = OnceLock::new();
    match ADDR.get_or_init(|| start_server(model_dir())) {
        Ok(addr) => addr,
        Err(e) => panic!("the in-process qserver did not start: {e}"),
    }
}

/// A second server whose grounding file sets a confidence threshold no answer reaches, so
/// that every answer is a fallback (`low_confidence`).
fn low_confidence_server() -> &'static str {
    static ADDR: OnceLock<Result<String, String>> = OnceLock::new();
    let start = || {
        let dir = std::env::temp_dir().join(format!("qclient-low-confidence-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for entry in std::fs::read_dir(model_dir()).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_file() {
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).map_err(|e| e.to_string())?;
            }
        }
        let rules = r#"{"version": 1, "generative_words": [], "known_words": [], "min_mean_logprob": 0.0}"#;
        std::fs::write(dir.join("grounding.json"), rules).map_err(|e| e.to_string())?;
        start_server(dir)
    };
    match ADDR.get_or_init(start) {
        Ok(addr) => addr,
        Err(e) => panic!("the low-confidence qserver did not start: {e}"),
    }
}

fn start_server(model: PathBuf) -> Result<String, String> {
    if !model.is_dir() {
        return Err(format!("model directory {} does not exist (set QREFORMULATE_TEST_MODEL)", model.display()));
    }
    let (tx, rx) = std::sync::mpsc::channel::<Result<String, String>>();
    // The server gets a runtime of its own that outlives every test (each #[test] is a
    // plain thread); it serves until the test process exits.
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = tx.send(Err(format!("tokio runtime: {e}")));
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                Ok(listener) => listener,
                Err(e) => {
                    let _ = tx.send(Err(format!("bind 127.0.0.1:0: {e}")));
                    return;
                }
            };
            let addr = format!("http://{}", listener.local_addr().expect("bound socket has an address"));
            let model = model.to_string_lossy().into_owned();
            let config = qserver::Config::parse_from(["qserver", "--model", model.as_str()]);
            let server = tokio::spawn(qserver::serve(config, listener, std::future::pending::<()>()));
            let deadline = Instant::now() + STARTUP_LIMIT;
            loop {
                if server.is_finished() {
                    let outcome = match server.await {
                        Ok(Ok(())) => "returned early".to_string(),
                        Ok(Err(e)) => format!("failed: {e}"),
                        Err(e) => format!("panicked: {e}"),
                    };
                    let _ = tx.send(Err(format!("qserver {outcome}")));
                    return;
                }
                if serving(&addr).await {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = tx.send(Err(format!("health did not report SERVING within {STARTUP_LIMIT:?}")));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = tx.send(Ok(addr));
            let _ = server.await;
        });
    });
    rx.recv().unwrap_or_else(|_| Err("server thread ended without a word".to_string()))
}

async fn serving(addr: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(addr.to_string()) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    match client.check(HealthCheckRequest { service: String::new() }).await {
        Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
        Err(_) => false,
    }
}

/// The real binary with `args`, its environment cleaned of qclient's variables so the
/// machine's settings cannot leak in.
fn qclient_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qclient"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QCLIENT_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs the real binary with `args`, feeding `stdin` (or nothing).
fn qclient(args: &[&str], stdin: Option<&str>) -> Output {
    qclient_env(args, &[], stdin)
}

/// As `qclient`, with these environment variables set.
fn qclient_env(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = qclient_command(args);
    command.envs(env.iter().copied()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("qclient binary starts");
    {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        if let Some(text) = stdin {
            // A qclient that fails early (e.g. connection refused) exits without reading its
            // stdin: a broken pipe here is expected then, and its output tells the story.
            let _ = pipe.write_all(text.as_bytes());
        }
        // Dropping the pipe closes stdin: EOF.
    }
    child.wait_with_output().expect("qclient runs to the end")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "qclient failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Asserts exit code 1 with exactly one `qclient: error: ...` line on stderr; returns it.
fn one_line_error(output: &Output) -> String {
    one_line_error_code(output, 1)
}

/// Asserts exit `code` with exactly one `qclient: error: ...` line on stderr; returns it.
fn one_line_error_code(output: &Output, code: i32) -> String {
    assert!(!output.status.success(), "expected failure, stdout:\n{}", text(&output.stdout));
    assert_eq!(output.status.code(), Some(code), "exit code; stderr:\n{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be one line:\n{stderr}");
    assert!(lines[0].starts_with("qclient: error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_string()
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn temp_file(name: &str, contents: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("write temp file");
    (dir, path.to_string_lossy().into_owned())
}

const QUERIES: [&str; 3] = [
    "Who lived longer, Nikola Tesla or Milutin Milankovic?",
    "When was the university where Halvard Strenn studied established?",
    "List the lengths for the Mekong and the Orinoco.",
];

fn assert_answer(value: &Value, query: &str) {
    assert_eq!(value["query"], query, "{value}");
    let subqueries = value["subqueries"].as_array().unwrap_or_else(|| panic!("subqueries: {value}"));
    assert!(!subqueries.is_empty(), "{value}");
    assert!(subqueries.iter().all(|s| s.as_str().is_some_and(|s| !s.trim().is_empty())), "{value}");
    let latency = value["latency_ms"].as_f64().unwrap_or_else(|| panic!("latency_ms: {value}"));
    assert!(latency > 0.0, "{value}");
    assert!(value["server"]["total_ms"].as_f64().is_some(), "{value}");
}

fn assert_percentiles_ordered(latency: &Value) {
    let get = |key: &str| latency[key].as_f64().unwrap_or_else(|| panic!("{key}: {latency}"));
    let order = ["min_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"];
    for pair in order.windows(2) {
        assert!(get(pair[0]) <= get(pair[1]), "{} > {}: {latency}", pair[0], pair[1]);
    }
    assert!(get("min_ms") > 0.0, "{latency}");
    assert!(get("mean_ms") >= get("min_ms") && get("mean_ms") <= get("max_ms"), "{latency}");
    assert!(get("std_ms") >= 0.0, "{latency}");
}

#[test]
fn reformulate_json_prints_one_object_per_query() {
    let output = qclient(&["--addr", server(), "reformulate", "--json", QUERIES[0], QUERIES[1]], None);
    let stdout = ok(&output);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, query) in lines.iter().zip(QUERIES) {
        assert_answer(&json(line), query);
    }
}

#[test]
fn reformulate_reads_one_query_per_stdin_line() {
    let input = format!("{}\n\n   \n{{\"query\": \"{}\"}}\n", QUERIES[0], QUERIES[2]);
    let stdout = ok(&qclient(&["--addr", server(), "reformulate", "--json", "--max-new-tokens", "12"], Some(&input)));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_answer(&json(lines[0]), QUERIES[0]);
    assert_answer(&json(lines[1]), QUERIES[2]);
}

#[test]
fn reformulate_text_mode_prints_subqueries_and_latency() {
    let stdout = ok(&qclient(&["--addr", server(), "reformulate", QUERIES[0]], None));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 2, "{stdout}");
    assert!(!lines[0].trim().is_empty(), "{stdout}");
    let last = lines.last().unwrap();
    assert!(last.starts_with("  (") && last.contains(" ms; server "), "{stdout}");
}

#[test]
fn fallback_reason_reaches_the_client() {
    let query = "Who lived longer, Nikola Tesla or Milutin Milankovic?";
    let value = json(ok(&qclient(&["--addr", low_confidence_server(), "reformulate", "--json", query], None)).trim());
    assert_answer(&value, query);
    assert_eq!(value["fallback_reason"], "low_confidence", "{value}");
    assert_eq!(value["subqueries"], serde_json::json!([query]), "{value}");
    assert_eq!(value["grounded"], true, "{value}");
    assert!(value["mean_logprob"].as_f64().is_some_and(|m| m < 0.0), "{value}");
    let stdout = ok(&qclient(&["--addr", low_confidence_server(), "chat"], Some(&format!("{query}\n"))));
    assert!(stdout.contains("\n  (fallback: low_confidence \u{2014} the query is returned unchanged)\n"), "{stdout}");
    // Unguarded: the plain split, no threshold, no grounding.
    let value = json(
        ok(&qclient(&["--addr", low_confidence_server(), "reformulate", "--json", "--unguarded", query], None)).trim(),
    );
    assert_eq!((&value["fallback_reason"], &value["grounded"]), (&Value::Null, &Value::Bool(false)), "{value}");
}

#[test]
fn bad_stdin_line_is_one_error_naming_the_line() {
    let output =
        qclient(&["--addr", server(), "reformulate", "--json"], Some(&format!("{}\n{{\"query\": 7}}\n", QUERIES[0])));
    let line = one_line_error(&output);
    assert!(line.contains("stdin: line 2: \"query\" must be a string"), "{line}");
    // The good first line was answered before the bad one was read.
    assert_eq!(text(&output.stdout).lines().count(), 1);
}

#[test]
fn chat_over_a_pipe_answers_until_quit() {
    let input = format!("{}\n\n:quit\n{}\n", QUERIES[0], QUERIES[1]);
    let stdout = ok(&qclient(&["--addr", server(), "chat", "--joined"], Some(&input)));
    assert!(stdout.starts_with(&format!("> {}\n", QUERIES[0])), "{stdout}");
    assert!(stdout.contains(" ms; server "), "{stdout}");
    assert!(!stdout.contains(QUERIES[1]), "answered past :quit:\n{stdout}");
    // End of input also ends the chat.
    ok(&qclient(&["--addr", server(), "chat"], Some(QUERIES[2])));
}

#[test]
fn bench_json_accounts_for_every_request() {
    let contents = format!(
        "{{\"query\": \"{}\"}}\n\n{{\"query\": \"{}\", \"kind\": \"x\"}}\n{}\n",
        QUERIES[0], QUERIES[1], QUERIES[2]
    );
    let (_dir, path) = temp_file("queries.jsonl", &contents);
    let output = qclient(
        &[
            "--addr",
            server(),
            "bench",
            &path,
            "--json",
            "--requests",
            "7",
            "--concurrency",
            "3",
            "--warmup",
            "2",
            "--max-new-tokens",
            "8",
        ],
        None,
    );
    let stdout = ok(&output);
    // No progress bar when stderr is not a terminal (or with --json).
    assert_eq!(text(&output.stderr), "");
    let report = json(&stdout);
    assert_eq!(report["mode"], "client", "{report}");
    assert_eq!(report["requests"], 7, "{report}");
    assert_eq!(report["ok"], 7, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["errors_by_code"], serde_json::json!({}), "{report}");
    assert_eq!(report["concurrency"], 3, "{report}");
    assert_eq!(report["connections"], 1, "{report}");
    assert_eq!(report["latency_ms"]["count"], 7, "{report}");
    assert_percentiles_ordered(&report["latency_ms"]);
    assert!(report["throughput_rps"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0, "{report}");
    let server = &report["server"];
    assert_eq!(server["latency_ms"]["count"], 7, "{report}");
    assert!(server["mean_decode_ms"].as_f64().unwrap() >= 0.0, "{report}");
    // --max-new-tokens 8 bounds every generation.
    assert!(server["mean_generated_tokens"].as_f64().unwrap() <= 8.0, "{report}");
}

#[test]
fn bench_skip_cache_runs_the_model_on_every_request() {
    // The shared test server has its default response cache: a repeated query is a hit
    // unless the request asks to skip it.
    let (_dir, path) = temp_file("one-query.txt", "How tall is the skip-cache test tower?\n");
    let bench = |extra: &[&str]| {
        let mut args = vec!["--addr", server(), "bench", &path, "--json", "--requests", "3", "--warmup", "1"];
        args.extend_from_slice(extra);
        json(&ok(&qclient(&args, None)))
    };
    let cached = bench(&[]);
    assert_eq!(cached["server"]["cached"], 3, "{cached}");
    let skipped = bench(&["--skip-cache"]);
    assert_eq!(skipped["ok"], 3, "{skipped}");
    assert_eq!(skipped["server"]["cached"], 0, "{skipped}");
    assert!(skipped["server"]["mean_generated_tokens"].as_f64().unwrap() > 0.0, "{skipped}");
}

#[test]
fn bench_text_mode_prints_the_results_box() {
    let (_dir, path) = temp_file("queries.txt", &format!("{}\n{}\n", QUERIES[0], QUERIES[1]));
    let stdout = ok(&qclient(&["--addr", server(), "bench", &path, "-c", "2"], None));
    for needle in ["qclient bench", "2 ok, 0 errors", "throughput", "client ms", "server ms", "p99", "decode"] {
        assert!(stdout.contains(needle), "missing {needle:?}:\n{stdout}");
    }
}

#[test]
fn bench_server_side_reports_the_servers_replay() {
    let (_dir, path) = temp_file("queries.txt", &format!("{}\n{}\n", QUERIES[0], QUERIES[2]));
    let stdout = ok(&qclient(
        &["--addr", server(), "bench", &path, "--server-side", "--json", "--requests", "5", "--max-new-tokens", "8"],
        None,
    ));
    let report = json(&stdout);
    assert_eq!(report["mode"], "server", "{report}");
    assert_eq!(report["requests"], 5, "{report}");
    assert_eq!(report["latency_ms"]["count"], 5, "{report}");
    assert_percentiles_ordered(&report["latency_ms"]);
}

#[test]
fn eval_json_has_overall_and_per_kind_rows() {
    let contents = format!(
        concat!(
            "{{\"query\": \"{}\", \"subqueries\": \"Nikola Tesla lifespan|Milutin Milankovic lifespan\", \"kind\": \"comparison\"}}\n",
            "\n",
            "{{\"query\": \"{}\", \"subqueries\": [\"Halvard Strenn educated at\", \"university established\"], \"kind\": \"chaining\"}}\n",
            "{{\"query\": \"{}\", \"subqueries\": \"Mekong length|Orinoco length\", \"kind\": \"comparison\"}}\n",
        ),
        QUERIES[0], QUERIES[1], QUERIES[2]
    );
    let (_dir, path) = temp_file("labelled.jsonl", &contents);
    let output = qclient(&["--addr", server(), "eval", &path, "--json"], None);
    let report = json(&ok(&output));
    // No progress bar when stderr is not a terminal (or with --json).
    assert_eq!(text(&output.stderr), "");
    assert_eq!(report["overall"]["name"], "overall", "{report}");
    assert_eq!(report["overall"]["examples"], 3, "{report}");
    let mut kinds: Vec<(String, u64)> = report["per_kind"]
        .as_array()
        .unwrap_or_else(|| panic!("per_kind: {report}"))
        .iter()
        .map(|row| (row["name"].as_str().unwrap().to_string(), row["examples"].as_u64().unwrap()))
        .collect();
    kinds.sort();
    assert_eq!(kinds, vec![("chaining".to_string(), 1), ("comparison".to_string(), 2)], "{report}");
    let rows = std::iter::once(&report["overall"]).chain(report["per_kind"].as_array().unwrap());
    for row in rows {
        for metric in ["exact_match", "rouge_l", "count_accuracy", "levenshtein"] {
            let v = row[metric].as_f64().unwrap_or_else(|| panic!("{metric}: {row}"));
            assert!((0.0..=1.0).contains(&v), "{metric} = {v}: {row}");
        }
    }
    assert_eq!(report["latency_ms"]["count"], 3, "{report}");
    assert_percentiles_ordered(&report["latency_ms"]);
    // The guards' rates and the echo baseline, row for row.
    for row in std::iter::once(&report["overall"]).chain(report["per_kind"].as_array().unwrap()) {
        for rate in ["degenerate_rate", "fallback_rate"] {
            assert!(row[rate].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{rate}: {row}");
        }
        assert!(row["invented_rate"].is_null() || row["invented_rate"].as_f64().is_some(), "{row}");
    }
    assert_eq!(report["echo_overall"]["examples"], 3, "{report}");
    assert_eq!(report["echo_overall"]["fallback_rate"], 1.0, "{report}");
    assert_eq!(report["echo_per_kind"].as_array().map(Vec::len), Some(2), "{report}");
    let examples = report["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3, "{report}");
    assert_eq!(
        examples[1]["expected"],
        serde_json::json!(["Halvard Strenn educated at", "university established"]),
        "{report}"
    );
}

#[test]
fn eval_text_mode_prints_the_metric_table() {
    let contents = format!(
        "{{\"query\": \"{}\", \"subqueries\": \"Mekong length|Orinoco length\", \"kind\": \"expansion\"}}\n",
        QUERIES[2]
    );
    let (_dir, path) = temp_file("labelled.jsonl", &contents);
    let output = qclient(&["--addr", server(), "eval", &path], None);
    let stdout = ok(&output);
    assert_eq!(text(&output.stderr), "", "no progress bar on a pipe");
    let header = stdout.lines().position(|l| l.contains("exact match")).unwrap_or_else(|| panic!("{stdout}"));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[header].contains("ROUGE-L") && lines[header].contains("Levenshtein"), "{stdout}");
    for column in ["invented", "degenerate", "fallback", "echo ROUGE-L"] {
        assert!(lines[header].contains(column), "{column}: {stdout}");
    }
    assert!(lines[header + 1].contains("overall"), "{stdout}");
    assert!(lines[header + 2].contains("expansion"), "{stdout}");
    assert!(stdout.contains("p99"), "{stdout}");
}

#[test]
fn health_of_a_warm_server_is_serving() {
    let output = qclient(&["--addr", server(), "health"], None);
    assert_eq!(ok(&output), "SERVING\n");
    let output = qclient(&["--addr", server(), "health", "--service", "qreformulate.v1.Reformulator"], None);
    assert_eq!(ok(&output), "SERVING\n");
    let report = json(&ok(&qclient(&["--addr", server(), "health", "--json", "--wait", "30"], None)));
    assert_eq!(report["status"], "SERVING", "{report}");
    assert_eq!(report["exit_code"], 0, "{report}");
    assert_eq!(report["attempts"], 1, "{report}");
    assert_eq!(report["error"], Value::Null, "{report}");
    // The service name from the environment.
    let output = qclient_env(
        &["--addr", server(), "health"],
        &[("QCLIENT_HEALTH_SERVICE", "qreformulate.v1.Reformulator")],
        None,
    );
    assert_eq!(ok(&output), "SERVING\n");
}

#[test]
fn health_of_an_unknown_service_is_an_rpc_failure_exit_3() {
    let output = qclient(&["--addr", server(), "health", "--service", "no.such.Service"], None);
    let line = one_line_error_code(&output, 3);
    assert!(line.contains("Health/Check failed: NOT_FOUND"), "{line}");
    let output = qclient(&["--addr", server(), "health", "--service", "no.such.Service", "--json"], None);
    one_line_error_code(&output, 3);
    let report = json(&text(&output.stdout));
    assert_eq!((&report["status"], &report["exit_code"]), (&Value::Null, &Value::from(3)), "{report}");
    assert!(report["error"].as_str().is_some_and(|e| e.contains("NOT_FOUND")), "{report}");
}

fn closed_port_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

#[test]
fn closed_port_is_one_line_connection_error() {
    let addr = closed_port_addr();
    for (args, code) in [
        // grpc_health_probe's "connection failure".
        (vec!["--addr", addr.as_str(), "health"], 2),
        (vec!["--addr", addr.as_str(), "reformulate", "--json", "q"], 1),
        (vec!["--addr", addr.as_str(), "chat"], 1),
    ] {
        let line = one_line_error_code(&qclient(&args, Some("q\n")), code);
        assert!(line.starts_with(&format!("qclient: error: cannot connect to {addr}: ")), "{line}");
        assert!(line.to_lowercase().contains("refused"), "{line}");
    }
}

#[test]
fn bad_files_are_one_line_errors_before_connecting() {
    let addr = closed_port_addr();
    let (_dir, path) = temp_file("bad.jsonl", "{\"query\": \"fine\"}\n\n{\"query\": \"broken\n");
    let line = one_line_error(&qclient(&["--addr", &addr, "bench", &path], None));
    assert!(line.contains("bad.jsonl: line 3: invalid JSON"), "{line}");
    let (_dir2, labelled) = temp_file("labels.jsonl", "{\"query\": \"q\", \"subqueries\": 3}\n");
    let line = one_line_error(&qclient(&["--addr", &addr, "eval", &labelled], None));
    assert!(line.contains("labels.jsonl: line 1: \"subqueries\" must be"), "{line}");
    let line = one_line_error(&qclient(&["--addr", &addr, "eval", "/no/such/file.jsonl"], None));
    assert!(line.contains("cannot read /no/such/file.jsonl"), "{line}");
}

/// A query file where one query in four is over the server's 2000-character limit
/// (INVALID_ARGUMENT): every fourth request fails.
fn one_in_four_fails() -> (tempfile::TempDir, String) {
    let too_long = "why ".repeat(600);
    temp_file("mixed.txt", &format!("{}\n{}\n{}\n{too_long}\n", QUERIES[0], QUERIES[1], QUERIES[2]))
}

#[test]
fn bench_exits_1_when_requests_fail_unless_the_rate_is_allowed() {
    let (_dir, path) = one_in_four_fails();
    let bench = |extra: &[&str]| {
        let mut args = vec!["--addr", server(), "bench", &path, "--json", "--max-new-tokens", "8"];
        args.extend_from_slice(extra);
        qclient(&args, None)
    };
    let output = bench(&[]);
    let line = one_line_error(&output);
    assert_eq!(
        line,
        "qclient: error: 1 of 4 requests failed (25.0%: INVALID_ARGUMENT 1); --max-error-rate 0 allows at most 0.0%"
    );
    // The report still comes first, whole.
    let report = json(&text(&output.stdout));
    assert_eq!((&report["ok"], &report["errors"]), (&Value::from(3), &Value::from(1)), "{report}");
    one_line_error(&bench(&["--max-error-rate", "0.2"]));
    ok(&bench(&["--max-error-rate", "0.25"]));
    // The same rule from the environment.
    ok(&qclient_env(
        &["--addr", server(), "bench", &path, "--json", "--max-new-tokens", "8"],
        &[("QCLIENT_MAX_ERROR_RATE", "0.5")],
        None,
    ));
}

#[test]
fn environment_variables_stand_in_for_flags() {
    let (_dir, path) = temp_file("queries.txt", &format!("{}\n", QUERIES[0]));
    let env = [
        ("QCLIENT_ADDR", server()),
        ("QCLIENT_JSON", "true"),
        ("QCLIENT_REQUESTS", "3"),
        ("QCLIENT_CONCURRENCY", "2"),
        ("QCLIENT_SKIP_CACHE", "1"),
        ("QCLIENT_MAX_NEW_TOKENS", "5"),
    ];
    let report = json(&ok(&qclient_env(&["bench", &path], &env, None)));
    assert_eq!((&report["requests"], &report["concurrency"]), (&Value::from(3), &Value::from(2)), "{report}");
    assert_eq!(report["server"]["cached"], 0, "{report}");
    assert!(report["server"]["mean_generated_tokens"].as_f64().unwrap() <= 5.0, "{report}");
    // A generation option the server refuses proves the variable reached the request.
    let output = qclient_env(&["--addr", server(), "reformulate", "q"], &[("QCLIENT_NUM_BEAMS", "100000")], None);
    assert!(one_line_error(&output).contains("INVALID_ARGUMENT"));
    // A flag on the command line wins over its variable.
    let report = json(&ok(&qclient_env(&["bench", &path, "--requests", "1"], &env, None)));
    assert_eq!(report["requests"], 1, "{report}");
}

// --- In a pseudo-terminal: what a person at a terminal sees. ---

use rexpect::process::wait::WaitStatus;
use rexpect::session::{spawn_with_options, Options, PtySession};

/// Starts the real binary in a pseudo-terminal (stdin, stdout and stderr are all the pty).
fn pty(args: &[&str]) -> PtySession {
    let mut command = qclient_command(args);
    // rustyline leaves a "dumb" or unknown terminal unedited.
    command.env("TERM", "xterm-256color");
    let options = Options { timeout_ms: Some(60_000), strip_ansi_escape_codes: true };
    spawn_with_options(command, options).expect("qclient starts in a pty")
}

fn exits_with(session: &PtySession, code: i32) {
    match session.process.wait().expect("wait for qclient") {
        WaitStatus::Exited(_, status) => assert_eq!(status, code),
        other => panic!("qclient ended with {other:?}"),
    }
}

const UP: &str = "\x1b[A";

/// Sends keys without a newline (rexpect's `send` leaves them buffered).
fn keys(session: &mut PtySession, keys: &str) {
    session.send(keys).unwrap();
    session.flush().unwrap();
}

#[test]
fn chat_in_a_terminal_recalls_questions_and_keeps_the_history_file() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    // A question from an earlier session.
    std::fs::write(&history, format!("{}\n", QUERIES[1])).unwrap();
    let history_arg = history.to_string_lossy().into_owned();
    let mut chat = pty(&["--addr", server(), "chat", "--joined", "--history-file", &history_arg]);
    chat.exp_string(":help lists the commands").unwrap();
    chat.exp_string("> ").unwrap();
    chat.send_line(QUERIES[0]).unwrap();
    chat.exp_string(" ms; server ").unwrap();
    chat.exp_string("> ").unwrap();
    // Up twice: past this session's question to the earlier session's.
    keys(&mut chat, UP);
    keys(&mut chat, UP);
    chat.exp_string(QUERIES[1]).unwrap();
    keys(&mut chat, "\r");
    chat.exp_string(" ms; server ").unwrap();
    chat.exp_string("> ").unwrap();
    chat.send_line(":help").unwrap();
    chat.exp_string(":quit, :q, :exit").unwrap();
    chat.exp_string(&format!("History file: {history_arg}")).unwrap();
    chat.exp_string("> ").unwrap();
    chat.send_line(":nonsense").unwrap();
    chat.exp_string("unknown command :nonsense").unwrap();
    chat.exp_string("> ").unwrap();
    // Ctrl-D on an empty line leaves.
    chat.send_control('d').unwrap();
    chat.exp_eof().unwrap();
    exits_with(&chat, 0);
    let saved = std::fs::read_to_string(&history).unwrap();
    let saved: Vec<&str> = saved.lines().filter(|l| !l.starts_with("#V")).collect();
    // The earlier session's line, then this session's questions (the recalled one again) and commands.
    assert_eq!(saved, [QUERIES[1], QUERIES[0], QUERIES[1], ":help", ":nonsense"], "{saved:?}");
}

/// A TCP listener that accepts and never answers: an RPC to it waits forever.
fn silent_server() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("address"));
    (listener, addr)
}

#[test]
fn ctrl_c_in_chat_cancels_the_question_and_stays() {
    let (listener, addr) = silent_server();
    let mut chat = pty(&["--addr", &addr, "chat", "--no-history"]);
    // Connecting completes in the kernel's accept queue; nothing ever answers.
    chat.exp_string("> ").unwrap();
    chat.send_line("a question nobody answers").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    chat.send_control('c').unwrap();
    chat.exp_string("(cancelled)").unwrap();
    chat.exp_string("> ").unwrap();
    // Ctrl-C while typing clears the line and stays too.
    keys(&mut chat, "half a line");
    chat.send_control('c').unwrap();
    chat.exp_string("> ").unwrap();
    chat.send_line(":quit").unwrap();
    chat.exp_eof().unwrap();
    exits_with(&chat, 0);
    drop(listener);
}

#[test]
fn eval_in_a_terminal_shows_a_progress_bar() {
    let row = |q: &str| format!("{{\"query\": \"{q}\", \"subqueries\": \"a|b\", \"kind\": \"k\"}}\n");
    let rows: String = (0..300).map(|i| row(QUERIES[i % 3])).collect();
    let (_dir, path) = temp_file("labelled.jsonl", &rows);
    let mut eval = pty(&["--addr", server(), "eval", &path, "--max-new-tokens", "12"]);
    // Rows answered count up as they come back (a frame before all 300 are), rows sent beside.
    eval.exp_regex(r"\b([1-9]|[1-9][0-9]|[12][0-9][0-9])/300 answered \([^)]*\) [0-9]+ sent").unwrap();
    eval.exp_string("exact match").unwrap();
    eval.exp_eof().unwrap();
    exits_with(&eval, 0);
    // --json on the same terminal: no bar.
    let mut eval = pty(&["--addr", server(), "eval", &path, "--max-new-tokens", "12", "--json"]);
    let all = eval.exp_eof().unwrap();
    exits_with(&eval, 0);
    assert!(!all.contains("answered"), "{all}");
    assert!(all.trim_start().starts_with('{'), "{all}");
}

/// A gRPC server with only the health service: every Reformulator call is UNIMPLEMENTED, as
/// EvaluateStream is on a server from before it.
fn health_only_server() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            tx.send(format!("http://{}", listener.local_addr().unwrap())).unwrap();
            let (_reporter, health) = tonic_health::server::health_reporter();
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await;
        });
    });
    rx.recv().expect("health-only server bound")
}

#[test]
fn eval_falls_back_to_evaluate_when_evaluate_stream_is_unimplemented() {
    let (_dir, path) = temp_file("labelled.jsonl", "{\"query\": \"q\", \"subqueries\": \"a\"}\n");
    let out = qclient(&["--addr", &health_only_server(), "eval", &path], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The unary call was tried after EvaluateStream's UNIMPLEMENTED: its failure is reported.
    assert!(stderr.contains("Evaluate failed: UNIMPLEMENTED"), "{stderr}");
    assert!(!stderr.contains("EvaluateStream failed"), "{stderr}");
    assert_ne!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn bench_in_a_terminal_shows_a_progress_bar() {
    let (_dir, path) = temp_file("queries.txt", &format!("{}\n{}\n", QUERIES[0], QUERIES[2]));
    let mut bench = pty(&["--addr", server(), "bench", &path, "--requests", "40", "--skip-cache"]);
    bench.exp_string("/40 (").unwrap();
    bench.exp_string("40 ok, 0 errors").unwrap();
    bench.exp_eof().unwrap();
    exits_with(&bench, 0);
}
