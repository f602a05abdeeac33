//! `qclient bench`: replays the queries of a file over one shared connection (by default)
//! with N requests in flight, and reports client latency next to the server's timings.
//! `--server-side` asks the server to replay them in-process (Benchmark RPC) instead.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use qreformulate::pb::{self, reformulator_client::ReformulatorClient};
use qreformulate::{code_name, latency::LatencyRecorder};
use tokio::sync::mpsc;

use super::print;
use crate::cli::BenchArgs;
use crate::connect::Channel;
use crate::connect::Target;
use crate::dataset;
use crate::error::{normalise, ClientError};
use crate::progress;
use crate::report::{rate, render_bench, render_server_bench, BenchReport, Latency, ServerBenchReport, ServerTimings};

pub async fn run(target: &Target, args: BenchArgs) -> Result<ExitCode, ClientError> {
    let queries = dataset::load_queries(&args.file)?;
    if queries.is_empty() {
        return Err(ClientError::Usage(format!("{}: no queries (the file has only blank lines)", args.file.display())));
    }
    let requests = args.requests.unwrap_or(queries.len() as u64);
    let mut options = args.generation.to_proto();
    options.ignore_eos = args.ignore_eos;

    if args.server_side {
        return server_side(target, &args, &queries, requests, options).await;
    }

    // One channel is one HTTP/2 connection; requests multiplex over it.
    let mut clients = Vec::with_capacity(args.connections as usize);
    for _ in 0..args.connections {
        clients.push(ReformulatorClient::new(target.channel().await?));
    }
    let plan = Plan {
        clients: Arc::new(clients),
        queries: Arc::new(queries),
        options,
        skip_cache: args.skip_cache,
        timeout: target.timeout,
        concurrency: args.concurrency,
    };

    if args.warmup > 0 {
        // Untimed; failures here show up again in the measured phase.
        plan.replay(args.warmup, &ProgressBar::hidden()).await;
    }

    let progress = progress::bar(requests, args.json);
    let start = Instant::now();
    let tally = plan.replay(requests, &progress).await;
    let wall = start.elapsed();
    progress.finish_and_clear();

    let report = tally.report(&args, wall);
    if args.json {
        let text = serde_json::to_string_pretty(&report).expect("a bench report always serialises; this is a bug");
        print(&format!("{text}\n"))?;
    } else {
        print(&render_bench(&report))?;
    }
    check_failures(&report, args.max_error_rate)?;
    Ok(ExitCode::SUCCESS)
}

/// The exit rule, after the report: more failed requests than `--max-error-rate` allows
/// (default 0: any) is an error, so scripts and CI notice a failing server.
fn check_failures(report: &BenchReport, max_rate: f64) -> Result<(), ClientError> {
    let failed_rate = if report.requests == 0 { 0.0 } else { report.errors as f64 / report.requests as f64 };
    if report.errors == 0 || failed_rate <= max_rate {
        return Ok(());
    }
    Err(ClientError::TooManyFailures {
        failed: report.errors,
        requests: report.requests,
        by_code: report.errors_by_code.iter().map(|(code, n)| format!("{code} {n}")).collect::<Vec<_>>().join(", "),
        max_rate,
    })
}

/// What one replay needs; cheap to share between the worker tasks.
struct Plan {
    clients: Arc<Vec<ReformulatorClient<Channel>>>,
    queries: Arc<Vec<String>>,
    options: pb::GenerationOptions,
    skip_cache: bool,
    timeout: Option<Duration>,
    concurrency: u32,
}

/// The outcome of one request.
struct Sample {
    latency: Duration,
    result: Result<pb::ReformulateResponse, tonic::Code>,
}

impl Plan {
    /// Sends `total` requests, cycling through the queries, with `concurrency` in flight.
    async fn replay(&self, total: u64, progress: &ProgressBar) -> Tally {
        let next = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
        let workers = (self.concurrency as u64).min(total).max(1);
        for worker in 0..workers {
            let mut client = self.clients[worker as usize % self.clients.len()].clone();
            let queries = Arc::clone(&self.queries);
            let options = self.options;
            let skip_cache = self.skip_cache;
            let timeout = self.timeout;
            let next = Arc::clone(&next);
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= total {
                        break;
                    }
                    let query = &queries[(index % queries.len() as u64) as usize];
                    let request = crate::connect::with_timeout(
                        pb::ReformulateRequest { query: query.clone(), options: Some(options), skip_cache },
                        timeout,
                    );
                    let start = Instant::now();
                    let result = client.reformulate(request).await;
                    let sample = Sample {
                        latency: start.elapsed(),
                        result: result.map(|r| r.into_inner()).map_err(|s| normalise(s).code()),
                    };
                    if tx.send(sample).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut tally = Tally::new();
        while let Some(sample) = rx.recv().await {
            tally.record(&sample);
            progress.inc(1);
        }
        tally
    }
}

/// Running totals of a replay.
struct Tally {
    client: LatencyRecorder,
    server: LatencyRecorder,
    ok: u64,
    errors: BTreeMap<String, u64>,
    tokenize_ms: f64,
    encode_ms: f64,
    decode_ms: f64,
    generated_tokens: u64,
    decoder_steps: u64,
    /// Answers that ran the engine (not served from the response cache).
    engine_runs: u64,
    cached: u64,
    model_id: String,
}

impl Tally {
    fn new() -> Self {
        Tally {
            client: LatencyRecorder::new(),
            server: LatencyRecorder::new(),
            ok: 0,
            errors: BTreeMap::new(),
            tokenize_ms: 0.0,
            encode_ms: 0.0,
            decode_ms: 0.0,
            generated_tokens: 0,
            decoder_steps: 0,
            engine_runs: 0,
            cached: 0,
            model_id: String::new(),
        }
    }

    fn record(&mut self, sample: &Sample) {
        match &sample.result {
            Ok(response) => {
                self.ok += 1;
                self.client.record(sample.latency);
                if let Some(t) = &response.timings {
                    self.server.record_micros((t.total_ms * 1000.0).round() as u64);
                    if t.cached {
                        // A cache hit has only total_ms: keep it out of the phase means.
                        self.cached += 1;
                    } else {
                        self.engine_runs += 1;
                        self.tokenize_ms += t.tokenize_ms;
                        self.encode_ms += t.encode_ms;
                        self.decode_ms += t.decode_ms;
                        self.generated_tokens += u64::from(t.generated_tokens);
                        self.decoder_steps += u64::from(t.decoder_steps);
                    }
                }
                if self.model_id.is_empty() {
                    self.model_id.clone_from(&response.model_id);
                }
            }
            Err(code) => *self.errors.entry(code_name(*code).to_string()).or_default() += 1,
        }
    }

    fn report(&self, args: &BenchArgs, wall: Duration) -> BenchReport {
        let errors: u64 = self.errors.values().sum();
        let runs = self.engine_runs;
        let mean = |sum: f64| if runs > 0 { sum / runs as f64 } else { 0.0 };
        BenchReport {
            mode: "client",
            model_id: self.model_id.clone(),
            requests: self.ok + errors,
            ok: self.ok,
            errors,
            errors_by_code: self.errors.clone(),
            concurrency: args.concurrency,
            connections: args.connections,
            warmup: args.warmup,
            wall_seconds: wall.as_secs_f64(),
            throughput_rps: rate(self.ok, wall.as_secs_f64()),
            latency_ms: Latency::from_proto(&self.client.summary()),
            server: ServerTimings {
                latency_ms: Latency::from_proto(&self.server.summary()),
                mean_tokenize_ms: mean(self.tokenize_ms),
                mean_encode_ms: mean(self.encode_ms),
                mean_decode_ms: mean(self.decode_ms),
                mean_generated_tokens: mean(self.generated_tokens as f64),
                generated_tokens: self.generated_tokens,
                decoder_steps: self.decoder_steps,
                cached: self.cached,
            },
        }
    }
}

async fn server_side(
    target: &Target,
    args: &BenchArgs,
    queries: &[String],
    requests: u64,
    options: pb::GenerationOptions,
) -> Result<ExitCode, ClientError> {
    let mut client = target.reformulator().await?;
    // Exactly `requests` measured generations, cycling through the file.
    let replay: Vec<String> =
        queries.iter().cycle().take(usize::try_from(requests).unwrap_or(usize::MAX)).cloned().collect();
    let warmup = u32::try_from(args.warmup)
        .map_err(|_| ClientError::Usage(format!("--warmup {} is too large for --server-side", args.warmup)))?;
    let progress = progress::spinner(format!("server replaying {requests} requests..."), args.json);
    let result = client
        .benchmark(target.request(pb::BenchmarkRequest { queries: replay, repeat: 1, warmup, options: Some(options) }))
        .await;
    progress.finish_and_clear();
    let response = result.map_err(|status| ClientError::rpc("Benchmark", status))?.into_inner();
    let report = ServerBenchReport::from_proto(&response, args.warmup);
    if args.json {
        let text = serde_json::to_string_pretty(&report).expect("a bench report always serialises; this is a bug");
        print(&format!("{text}\n"))?;
    } else {
        print(&render_server_bench(&report))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args() -> BenchArgs {
        let cli = crate::cli::Cli::try_parse_from(["qclient", "bench", "f", "-c", "3"]).unwrap();
        match cli.command {
            crate::cli::Command::Bench(args) => args,
            _ => unreachable!(),
        }
    }

    fn ok(ms: u64, total_ms: f64, tokens: u32) -> Sample {
        answer(ms, total_ms, tokens, false)
    }

    fn answer(ms: u64, total_ms: f64, tokens: u32, cached: bool) -> Sample {
        Sample {
            latency: Duration::from_millis(ms),
            result: Ok(pb::ReformulateResponse {
                subqueries: vec!["x".into()],
                candidates: vec![],
                timings: Some(pb::Timings {
                    tokenize_ms: 0.5,
                    encode_ms: 1.0,
                    decode_ms: total_ms - 1.5,
                    total_ms,
                    generated_tokens: tokens,
                    decoder_steps: tokens,
                    input_tokens: 5,
                    cached,
                }),
                model_id: "m1".into(),
                truncated: false,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn tally_separates_errors_and_averages_server_timings() {
        let mut tally = Tally::new();
        tally.record(&ok(10, 8.0, 4));
        tally.record(&ok(30, 20.0, 8));
        // A cache hit counts in the latencies, not in the phase means.
        tally.record(&answer(3, 0.5, 0, true));
        tally.record(&Sample { latency: Duration::from_millis(1), result: Err(tonic::Code::Unavailable) });
        let report = tally.report(&args(), Duration::from_secs(2));
        assert_eq!(report.requests, 4);
        assert_eq!(report.ok, 3);
        assert_eq!(report.server.cached, 1);
        assert_eq!(report.errors, 1);
        assert_eq!(report.errors_by_code.get("UNAVAILABLE"), Some(&1));
        assert_eq!(report.concurrency, 3);
        assert_eq!(report.model_id, "m1");
        assert!((report.throughput_rps - 1.5).abs() < 1e-9);
        // The failed request's latency is not in the histogram.
        assert_eq!(report.latency_ms.count, 3);
        assert!((report.latency_ms.mean_ms - 43.0 / 3.0).abs() < 0.05, "{:?}", report.latency_ms);
        assert!((report.latency_ms.min_ms - 3.0).abs() < 0.05);
        assert!((report.latency_ms.max_ms - 30.0).abs() < 0.05);
        assert_eq!(report.server.latency_ms.count, 3);
        assert!((report.server.latency_ms.mean_ms - 28.5 / 3.0).abs() < 0.05);
        assert!((report.server.mean_encode_ms - 1.0).abs() < 1e-9);
        assert!((report.server.mean_decode_ms - 12.5).abs() < 1e-9);
        assert!((report.server.mean_generated_tokens - 6.0).abs() < 1e-9);
        assert_eq!(report.server.generated_tokens, 12);
    }

    #[test]
    fn any_failure_fails_unless_the_rate_is_allowed() {
        let mut tally = Tally::new();
        for _ in 0..3 {
            tally.record(&ok(10, 8.0, 4));
        }
        tally.record(&Sample { latency: Duration::from_millis(1), result: Err(tonic::Code::Unavailable) });
        let report = tally.report(&args(), Duration::from_secs(1));
        let err = check_failures(&report, 0.0).unwrap_err().to_string();
        assert_eq!(err, "1 of 4 requests failed (25.0%: UNAVAILABLE 1); --max-error-rate 0 allows at most 0.0%");
        assert!(check_failures(&report, 0.2).is_err());
        assert!(check_failures(&report, 0.25).is_ok());
        assert!(check_failures(&report, 1.0).is_ok());
        let clean = Tally::new().report(&args(), Duration::ZERO);
        assert!(check_failures(&clean, 0.0).is_ok());
    }

    #[test]
    fn empty_tally_reports_zeros() {
        let report = Tally::new().report(&args(), Duration::ZERO);
        assert_eq!(report.requests, 0);
        assert_eq!(report.throughput_rps, 0.0);
        assert_eq!(report.latency_ms, Latency::default());
    }
}
