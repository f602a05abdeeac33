//! `qclient eval`: streams a labelled JSONL file to the Evaluate RPC and prints the metric
//! table (overall, then per kind) and the latency percentiles.
//!
//! On a terminal, a progress bar counts the rows as they are sent. Evaluate is client-streaming
//! with one reply at the end, so how many rows the server has answered is known only then: the
//! bar's message says so rather than guessing.

use std::process::ExitCode;

use qreformulate::pb;
use tokio_stream::StreamExt as _;

use super::print;
use crate::cli::EvalArgs;
use crate::connect::Target;
use crate::dataset;
use crate::error::ClientError;
use crate::progress;
use crate::report::{render_eval, EvalReport};

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
    let messages: Vec<pb::EvaluateRequest> = examples
        .into_iter()
        .enumerate()
        .map(|(i, example)| pb::EvaluateRequest {
            query: example.query,
            expected_subqueries: example.subqueries,
            kind: example.kind,
            // The first message's options apply to the rest.
            options: (i == 0).then_some(options),
            // The server answers in order without echoing: the labels are filled in below.
            echo_examples: false,
        })
        .collect();
    let sent: Vec<(String, Vec<String>)> =
        messages.iter().map(|m| (m.query.clone(), m.expected_subqueries.clone())).collect();

    let mut client = target.reformulator().await?;
    let total = messages.len() as u64;
    let bar = progress::bar(total, args.json);
    bar.set_prefix("rows sent ");
    let counter = bar.clone();
    // Counted as the transport pulls each row off the stream.
    let rows = tokio_stream::iter(messages).map(move |row| {
        counter.inc(1);
        if counter.position() == total {
            counter.set_message(format!("all sent; the server answers all {total} before it replies"));
        }
        row
    });
    let result = client.evaluate(target.request(rows)).await;
    bar.finish_and_clear();
    let mut response = result.map_err(|status| ClientError::rpc("Evaluate", status))?.into_inner();
    for (row, (query, expected)) in response.examples.iter_mut().zip(sent) {
        if row.query.is_empty() {
            row.query = query;
            row.expected_subqueries = expected;
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
