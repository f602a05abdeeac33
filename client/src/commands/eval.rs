//! `qclient eval`: streams a labelled JSONL file to the EvaluateStream RPC and prints the metric
//! table (overall, then per kind) and the latency percentiles.
//!
//! On a terminal, a progress bar counts the rows answered (each comes back as soon as it is
//! scored), with the rows sent beside it. A server from before EvaluateStream answers
//! UNIMPLEMENTED; the unary Evaluate is used then, and the bar counts rows sent only.

use std::process::ExitCode;

use indicatif::ProgressBar;
use qreformulate::pb;

use super::print;
use crate::cli::EvalArgs;
use crate::connect::{Channel, Target};
use crate::dataset::{self, LabelledExample};
use crate::error::ClientError;
use crate::progress;
use crate::report::{render_eval, EvalReport};

type Client = pb::reformulator_client::ReformulatorClient<Channel>;

pub async fn run(target: &Target, args: EvalArgs) -> Result<ExitCode, ClientError> {
    // Parse the whole file first: a bad line is reported before anything is sent.
    let examples = dataset::load_labelled(&args.file)?;
    if examples.is_empty() {
        return Err(ClientError::Usage(format!(
            "{}: no examples (the file has only blank lines)",
            args.file.display()
        )));
    }
    let options = args.generation.to_proto();
    let mut client = target.reformulator().await?;
    let bar = progress::bar(examples.len() as u64, args.json);
    let result = match evaluate_stream(&mut client, target, &examples, options, &bar).await {
        Err(ClientError::Rpc { status, .. }) if status.code() == tonic::Code::Unimplemented => {
            evaluate_unary(&mut client, target, &examples, options, &bar).await
        }
        other => other,
    };
    bar.finish_and_clear();
    let mut response = result?;
    // The server answers in order without echoing: the labels are filled in here.
    for (row, example) in response.examples.iter_mut().zip(examples) {
        if row.query.is_empty() {
            row.query = example.query;
            row.expected_subqueries = example.subqueries;
        }
    }
    let report = EvalReport::from_proto(&response);
    if args.json {
        let text = serde_json::to_string_pretty(&report).expect("an eval report always serialises; this is a bug");
        print(&format!("{text}\n"))?;
    } else {
        print(&render_eval(&report, args.mismatches))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// EvaluateStream: the bar's position is rows answered, its message rows sent.
async fn evaluate_stream(
    client: &mut Client,
    target: &Target,
    examples: &[LabelledExample],
    options: pb::GenerationOptions,
    bar: &ProgressBar,
) -> Result<pb::EvaluateResponse, ClientError> {
    const RPC: &str = "EvaluateStream";
    bar.set_prefix("answered ");
    let total = examples.len();
    let counter = bar.clone();
    let rows = requests(examples, options, move |n| counter.set_message(format!("{n} sent")));
    let mut answer = client.evaluate_stream(target.request(rows)).await.map_err(|s| ClientError::rpc(RPC, s))?;
    let mut rows = Vec::with_capacity(total);
    while let Some(message) = answer.get_mut().message().await.map_err(|s| ClientError::rpc(RPC, s))? {
        match message.item {
            Some(pb::evaluate_progress::Item::Example(row)) => {
                rows.push(row);
                bar.inc(1);
            }
            Some(pb::evaluate_progress::Item::Summary(mut summary)) => {
                summary.examples = rows;
                return Ok(summary);
            }
            None => {}
        }
    }
    Err(ClientError::rpc(
        RPC,
        tonic::Status::internal(format!("the answer ended after {} of {total} rows without its summary", rows.len())),
    ))
}

/// The unary Evaluate: one answer at the end, so the bar counts rows sent.
async fn evaluate_unary(
    client: &mut Client,
    target: &Target,
    examples: &[LabelledExample],
    options: pb::GenerationOptions,
    bar: &ProgressBar,
) -> Result<pb::EvaluateResponse, ClientError> {
    bar.set_prefix("rows sent ");
    bar.set_message("");
    let total = examples.len() as u64;
    let counter = bar.clone();
    let rows = requests(examples, options, move |n| {
        counter.inc(1);
        if n == total {
            counter.set_message(format!("all sent; the server answers all {total} before it replies"));
        }
    });
    let result = client.evaluate(target.request(rows)).await;
    result.map(tonic::Response::into_inner).map_err(|status| ClientError::rpc("Evaluate", status))
}

/// The request stream: one message per example, the options on the first only (they apply to
/// the rest), labels not echoed back. `sent(n)` runs as the transport pulls the n-th message.
fn requests(
    examples: &[LabelledExample],
    options: pb::GenerationOptions,
    mut sent: impl FnMut(u64) + Send + 'static,
) -> impl tokio_stream::Stream<Item = pb::EvaluateRequest> + Send + 'static {
    let messages: Vec<pb::EvaluateRequest> = examples
        .iter()
        .enumerate()
        .map(|(i, example)| pb::EvaluateRequest {
            query: example.query.clone(),
            expected_subqueries: example.subqueries.clone(),
            kind: example.kind.clone(),
            options: (i == 0).then_some(options),
            echo_examples: false,
        })
        .collect();
    tokio_stream::iter(messages.into_iter().zip(1..).map(move |(message, n)| {
        sent(n);
        message
    }))
}
