//! `qclient reformulate`: one-shot reformulation of the given queries, or of one query per
//! stdin line.

use std::io::IsTerminal;
use std::process::ExitCode;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{print, reformulate_once, Answer};
use crate::cli::ReformulateArgs;
use crate::connect::Target;
use crate::dataset;
use crate::error::ClientError;
use crate::report::{render_answer, AnswerJson};

pub async fn run(target: &Target, args: ReformulateArgs) -> Result<ExitCode, ClientError> {
    let mut client = target.reformulator().await?;
    let options = args.generation.to_proto();
    let show = |query: &str, answer: &Answer, echo: bool| -> Result<(), ClientError> {
        if args.json {
            let line = serde_json::to_string(&AnswerJson::new(query, &answer.response, answer.latency))
                .expect("an answer always serialises; this is a bug");
            print(&format!("{line}\n"))
        } else {
            let echo = if echo { format!("> {query}\n") } else { String::new() };
            print(&format!("{echo}{}", render_answer(&answer.response, answer.latency, args.joined)))
        }
    };

    if !args.queries.is_empty() {
        let echo = args.queries.len() > 1;
        for query in &args.queries {
            let answer = reformulate_once(&mut client, target, query, &options, args.skip_cache)
                .await
                .map_err(|status| ClientError::rpc("Reformulate", status))?;
            show(query, &answer, echo)?;
        }
        return Ok(ExitCode::SUCCESS);
    }

    // No arguments: one query per stdin line (plain text or {"query": ...}), answered as read.
    if std::io::stdin().is_terminal() {
        eprintln!("qclient: reading queries from stdin, one per line (end with Ctrl-D)");
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut line_no = 0;
    while let Some(line) =
        lines.next_line().await.map_err(|source| ClientError::Io { what: "cannot read stdin", source })?
    {
        line_no += 1;
        let Some(query) = dataset::parse_query_line(&line, line_no)
            .map_err(|source| ClientError::Dataset { origin: "stdin".to_string(), source })?
        else {
            continue;
        };
        let answer = reformulate_once(&mut client, target, &query, &options, args.skip_cache)
            .await
            .map_err(|status| ClientError::rpc("Reformulate", status))?;
        show(&query, &answer, true)?;
    }
    Ok(ExitCode::SUCCESS)
}
