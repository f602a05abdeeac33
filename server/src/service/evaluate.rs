//! Evaluate and EvaluateStream: one scoring loop over the example stream. The unary RPC collects
//! the rows into its answer (under --max-evaluate-response-bytes); the streaming one sends each
//! row as soon as it is scored, so a client can show rows answered and the answer has no size
//! limit as a whole.

use std::time::Instant;

use prost::Message;
use qreformulate::{
    grounding::WordRules,
    metrics::{GuardOutcome, MetricTable},
    pb,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::{answer, Shared};
use crate::budget::CallBudget;
use crate::error::ServiceError;
use crate::read_ahead::{self, Failure};
use crate::validate;
use qreformulate::latency::{ms, LatencyRecorder};

/// Where the scored rows of an evaluation go.
pub(super) trait RowSink {
    /// Takes the row of example `index` (1-based) before `until`; an error stops the call.
    async fn row(&mut self, index: usize, row: pb::EvaluatedExample, until: Instant) -> Result<(), ServiceError>;
}

/// The unary Evaluate's rows: kept for its one answer, whose size is checked as it grows so
/// that an answer too large to send fails early.
pub(super) struct CollectRows {
    rows: Vec<pb::EvaluatedExample>,
    bytes: usize,
    limit: usize,
}

impl CollectRows {
    pub(super) fn new(limit: usize) -> Self {
        Self { rows: Vec::new(), bytes: 0, limit }
    }
}

impl RowSink for CollectRows {
    async fn row(&mut self, index: usize, row: pb::EvaluatedExample, _until: Instant) -> Result<(), ServiceError> {
        self.bytes += row.encoded_len() + 4; // field key and length prefix
        if self.bytes > self.limit {
            // Echoed rows carry their query (never empty: validated).
            return Err(response_too_large(self.limit, &format!("at example {index}"), !row.query.is_empty()));
        }
        self.rows.push(row);
        Ok(())
    }
}

/// EvaluateStream's rows: each sent to the client as it is scored.
pub(super) struct SendRows {
    tx: mpsc::Sender<Result<pb::EvaluateProgress, Status>>,
}

impl SendRows {
    pub(super) fn new(tx: mpsc::Sender<Result<pb::EvaluateProgress, Status>>) -> Self {
        Self { tx }
    }
}

impl RowSink for SendRows {
    async fn row(&mut self, index: usize, row: pb::EvaluatedExample, until: Instant) -> Result<(), ServiceError> {
        let message = pb::EvaluateProgress { item: Some(pb::evaluate_progress::Item::Example(row)) };
        // A client that stops reading fills the channel and HTTP/2's window: the call's wall
        // budget and deadline still end it.
        match tokio::time::timeout_at(until.into(), self.tx.send(Ok(message))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ServiceError::Cancelled("the client stopped reading the answer".into())),
            Err(_) => Err(ServiceError::DeadlineExceeded(format!(
                "deadline exceeded sending example {index}: the client stopped reading the answer"
            ))),
        }
    }
}

fn response_too_large(limit: usize, at: &str, echo_examples: bool) -> ServiceError {
    let hint = if echo_examples {
        "; leave echo_examples off, send fewer examples per call, or use EvaluateStream"
    } else {
        "; send fewer examples per call (or fewer distinct kinds), or use EvaluateStream"
    };
    ServiceError::ResourceExhausted(format!(
        "the Evaluate response would be over {limit} bytes (--max-evaluate-response-bytes) {at}{hint}"
    ))
}

impl Shared {
    /// The unary Evaluate: every row in one answer.
    pub async fn evaluate(
        &self,
        stream: Streaming<pb::EvaluateRequest>,
        deadline: Option<Instant>,
    ) -> Result<pb::EvaluateResponse, ServiceError> {
        let limit = self.budgets.max_evaluate_response_bytes;
        let mut rows = CollectRows::new(limit);
        let mut response = self.score_examples("Evaluate", stream, deadline, &mut rows).await?;
        let echoed = rows.rows.first().is_some_and(|r| !r.query.is_empty());
        let count = rows.rows.len();
        response.examples = rows.rows;
        if response.encoded_len() > limit {
            return Err(response_too_large(limit, &format!("with its {count} examples"), echoed));
        }
        Ok(response)
    }

    /// Runs each example of `stream` through the Reformulate path, scores it and hands its row
    /// to `sink`; answers the metric tables and latencies (without the rows).
    pub(super) async fn score_examples(
        &self,
        rpc: &'static str,
        stream: Streaming<pb::EvaluateRequest>,
        deadline: Option<Instant>,
        sink: &mut impl RowSink,
    ) -> Result<pb::EvaluateResponse, ServiceError> {
        let pool = self.ready_pool()?;
        let mut budget = CallBudget::start(rpc, &self.budgets, deadline);
        let mut queue = read_ahead::spawn(stream, self.budgets);
        let rules = self.rules().unwrap_or(WordRules::defaults());
        let mut table = MetricTable::new();
        let mut echo = MetricTable::new();
        let mut latency = LatencyRecorder::new();
        let mut first_options: Option<pb::GenerationOptions> = None;
        let mut echo_examples = false;
        let mut index = 0usize;
        let after = |n: usize| format!("after {n} examples");
        loop {
            let read = match tokio::time::timeout_at(budget.deadline().into(), queue.next()).await {
                Ok(Some(read)) => read,
                Ok(None) => break,
                Err(_) => {
                    let waiting = ServiceError::DeadlineExceeded("deadline exceeded waiting for examples".into());
                    return Err(budget.explain(waiting, &after(index)));
                }
            };
            let example = match read {
                Ok((i, example)) => {
                    index = i;
                    example
                }
                Err(failure) => {
                    if matches!(failure, Failure::Undecodable(_)) {
                        self.metrics.decode_failure(rpc);
                    }
                    return Err(failure.into_error());
                }
            };
            if index == 1 {
                first_options.clone_from(&example.options);
                echo_examples = example.echo_examples;
            }
            let options = example.options.as_ref().or(first_options.as_ref());
            let in_example = |e: ServiceError| match e {
                ServiceError::InvalidArgument(m) => ServiceError::InvalidArgument(format!("example {index}: {m}")),
                other => other,
            };
            let valid = validate::request(&example.query, options, &self.limits).map_err(in_example)?;
            budget.check_time(&after(index - 1))?;
            let (generation, took) = {
                let explain = |e| budget.explain(in_example(e), &after(index - 1));
                let _permit = self.admit_waiting(budget.deadline()).await.map_err(explain)?;
                let started = Instant::now();
                let generation = self
                    .generate(pool, valid.to_engine(&self.limits), Some(budget.deadline()))
                    .await
                    .map_err(explain)?;
                (generation, started.elapsed())
            };
            budget.spend_tokens(generation.timings.generated_tokens, &valid.params.search, &after(index))?;
            latency.record(took);
            let ctx = rules.context(&valid.query);
            let answer = answer(&generation.candidates[0], &valid, &ctx);
            let outcome = GuardOutcome::of(&answer, &ctx);
            let expected = &example.expected_subqueries;
            let scores = table.add(&answer.subqueries, expected, &example.kind, outcome);
            echo.add(std::slice::from_ref(&valid.query), expected, &example.kind, GuardOutcome::echo(rules));
            // The client has its examples: query and labels come back only when asked for.
            let (query, expected_subqueries) =
                if echo_examples { (example.query, example.expected_subqueries) } else { (String::new(), Vec::new()) };
            let row = pb::EvaluatedExample {
                query,
                expected_subqueries,
                predicted_subqueries: answer.subqueries,
                kind: example.kind,
                rouge_l: scores.rouge_l,
                exact_match: scores.exact_match,
                latency_ms: ms(took),
                fallback_reason: pb::FallbackReason::from(answer.fallback).into(),
                invented: outcome.invented.unwrap_or(false),
                degenerate: outcome.degenerate,
            };
            sink.row(index, row, budget.deadline()).await?;
        }
        if index == 0 {
            return Err(ServiceError::InvalidArgument(format!("{rpc} received no examples")));
        }
        Ok(pb::EvaluateResponse {
            overall: Some(table.overall().into()),
            per_kind: table.per_kind().into_iter().map(Into::into).collect(),
            latency: Some(latency.summary()),
            examples: Vec::new(),
            model_id: pool.model_id().to_owned(),
            echo_overall: Some(echo.overall().into()),
            echo_per_kind: echo.per_kind().into_iter().map(Into::into).collect(),
        })
    }
}
