//! `qclient chat`: an interactive prompt. Reads questions line by line from stdin (a TTY or
//! a pipe), prints each one's subqueries and latency; `:quit` or end of input exits.

use std::io::IsTerminal;
use std::process::ExitCode;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{print, reformulate_once};
use crate::cli::ChatArgs;
use crate::connect::Target;
use crate::error::ClientError;
use crate::report::render_answer;

const HELP: &str = "Type a question and press Enter. :quit (or :q, :exit, end of input) leaves.\n";

pub async fn run(target: &Target, args: ChatArgs) -> Result<ExitCode, ClientError> {
    let mut client = target.reformulator().await?;
    let options = args.generation.to_proto();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("qclient chat: connected to {}. {}", target.addr, HELP.trim_end());
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut failures = 0usize;
    loop {
        if interactive {
            print("> ")?;
        }
        let Some(line) =
            lines.next_line().await.map_err(|source| ClientError::Io { what: "cannot read stdin", source })?
        else {
            break;
        };
        let query = line.trim();
        match query {
            "" => continue,
            ":quit" | ":q" | ":exit" => break,
            ":help" | ":h" | "?" => {
                print(HELP)?;
                continue;
            }
            _ => {}
        }
        if !interactive {
            // Keep the transcript readable when the questions come from a pipe.
            print(&format!("> {query}\n"))?;
        }
        match reformulate_once(&mut client, target, query, &options, false).await {
            Ok(answer) => print(&render_answer(&answer.response, answer.latency, args.joined))?,
            Err(status) => {
                // One failed question does not end the conversation.
                failures += 1;
                eprintln!("qclient: error: {}", ClientError::rpc("Reformulate", status));
            }
        }
    }
    if interactive {
        print("\n")?;
    }
    // Scripted use (stdin not a TTY): report failures through the exit code.
    if failures > 0 && !interactive {
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}
