//! `qclient chat`: an interactive prompt. On a terminal, a line editor (rustyline) with
//! history kept across sessions; Ctrl-C cancels the question in flight, Ctrl-D or `:quit`
//! leaves. From a pipe it reads plain lines and prints each question and its answer.

use std::future::Future as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::connect::Channel;
use qreformulate::pb::{self, reformulator_client::ReformulatorClient};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{print, reformulate_once};
use crate::cli::ChatArgs;
use crate::connect::Target;
use crate::error::ClientError;
use crate::report::render_answer;

const HELP: &str = "\
Type a question and press Enter to get its subqueries.
  :help, :h, ?       this list
  :history           the questions asked so far (kept across sessions)
  :quit, :q, :exit   leave (Ctrl-D on an empty line, or end of input, too)
Keys: Up/Down recall questions, Ctrl-R searches them, Ctrl-C cancels the question in flight
(or clears the line being typed).
";

/// Questions kept in the history file.
const HISTORY_SIZE: usize = 1000;

pub async fn run(target: &Target, args: ChatArgs) -> Result<ExitCode, ClientError> {
    let client = target.reformulator().await?;
    if std::io::stdin().is_terminal() {
        interactive(target, client, &args).await
    } else {
        piped(target, client, &args).await
    }
}

/// stdin is a pipe: read lines, echo each question, print its answer.
async fn piped(
    target: &Target,
    mut client: ReformulatorClient<Channel>,
    args: &ChatArgs,
) -> Result<ExitCode, ClientError> {
    let options = args.generation.to_proto();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut failures = 0usize;
    while let Some(line) =
        lines.next_line().await.map_err(|source| ClientError::Io { what: "cannot read stdin", source })?
    {
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
        // Keep the transcript readable when the questions come from a pipe.
        print(&format!("> {query}\n"))?;
        match reformulate_once(&mut client, target, query, &options, false).await {
            Ok(answer) => print(&render_answer(&answer.response, answer.latency, args.joined))?,
            Err(status) => {
                // One failed question does not end the conversation...
                failures += 1;
                eprintln!("qclient: error: {}", ClientError::rpc("Reformulate", status));
            }
        }
    }
    // ...but a script learns of it through the exit code.
    Ok(if failures > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// stdin is a terminal: the line editor.
async fn interactive(
    target: &Target,
    mut client: ReformulatorClient<Channel>,
    args: &ChatArgs,
) -> Result<ExitCode, ClientError> {
    let options = args.generation.to_proto();
    let history = history_path(args);
    let mut editor = editor(history.as_deref())?;
    catch_ctrl_c();
    eprintln!("qclient chat: connected to {}. :help lists the commands, Ctrl-D leaves.", target.addr);
    loop {
        // rustyline blocks on the terminal; this thread may, the runtime's others go on.
        let line = match tokio::task::block_in_place(|| editor.readline("> ")) {
            Ok(line) => line,
            // Ctrl-C while typing: drop the line, like a shell.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(editor_error("cannot read the terminal", e)),
        };
        let query = line.trim();
        if query.is_empty() {
            continue;
        }
        remember(&mut editor, query, history.as_deref());
        match query {
            ":quit" | ":q" | ":exit" => break,
            ":help" | ":h" | "?" => {
                print(HELP)?;
                if let Some(path) = &history {
                    print(&format!("History file: {}\n", path.display()))?;
                }
                continue;
            }
            ":history" => {
                let past: Vec<&str> = editor.history().iter().map(String::as_str).collect();
                print(&past.iter().map(|q| format!("  {q}\n")).collect::<String>())?;
                continue;
            }
            command if command.starts_with(':') && !command.contains(' ') => {
                eprintln!("qclient: unknown command {command}; :help lists them");
                continue;
            }
            _ => {}
        }
        ask(&mut client, target, query, &options, args.joined).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends one question; Ctrl-C (SIGINT: the terminal is not in raw mode while waiting)
/// cancels it: dropping the call resets its HTTP/2 stream, so the server sees it cancelled.
async fn ask(
    client: &mut ReformulatorClient<Channel>,
    target: &Target,
    query: &str,
    options: &pb::GenerationOptions,
    joined: bool,
) -> Result<(), ClientError> {
    tokio::select! {
        result = reformulate_once(client, target, query, options, false) => match result {
            Ok(answer) => print(&render_answer(&answer.response, answer.latency, joined)),
            Err(status) => {
                eprintln!("qclient: error: {}", ClientError::rpc("Reformulate", status));
                Ok(())
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("(cancelled)");
            Ok(())
        }
    }
}

/// From the first prompt on, Ctrl-C must never end the process: installs tokio's SIGINT
/// handler now (it stays for the life of the process) instead of at the first question.
fn catch_ctrl_c() {
    let mut first = std::pin::pin!(tokio::signal::ctrl_c());
    let waker = std::task::Waker::noop();
    // Registration happens on the first poll; a pending result is the expected one.
    let _ = first.as_mut().poll(&mut std::task::Context::from_waker(waker));
}

/// `--history-file`, else `<data dir>/qclient/history`; none with `--no-history`.
fn history_path(args: &ChatArgs) -> Option<PathBuf> {
    if args.no_history {
        return None;
    }
    args.history_file.clone().or_else(|| dirs::data_dir().map(|dir| dir.join("qclient").join("history")))
}

fn editor(history: Option<&Path>) -> Result<DefaultEditor, ClientError> {
    let config = rustyline::Config::builder()
        .max_history_size(HISTORY_SIZE)
        .and_then(|b| b.history_ignore_dups(true))
        .map_err(|e| editor_error("cannot set up the line editor", e))?
        .auto_add_history(false)
        .build();
    let mut editor =
        DefaultEditor::with_config(config).map_err(|e| editor_error("cannot set up the line editor", e))?;
    if let Some(path) = history {
        match editor.load_history(path) {
            Ok(()) => {}
            // First session: nothing to recall yet.
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("qclient: warning: cannot read the history file {}: {e}", path.display()),
        }
    }
    Ok(editor)
}

/// Adds the line to the history and to the file at once, so a killed session loses nothing.
fn remember(editor: &mut DefaultEditor, line: &str, history: Option<&Path>) {
    if !matches!(editor.add_history_entry(line), Ok(true)) {
        return;
    }
    let Some(path) = history else { return };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = editor.append_history(path) {
        eprintln!("qclient: warning: cannot write the history file {}: {e}", path.display());
    }
}

fn editor_error(what: &'static str, error: ReadlineError) -> ClientError {
    let source = match error {
        ReadlineError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    ClientError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn chat_args(extra: &[&str]) -> ChatArgs {
        let mut argv = vec!["qclient", "chat"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Chat(args) => args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn history_goes_to_the_flag_or_the_data_dir_or_nowhere() {
        assert_eq!(history_path(&chat_args(&["--history-file", "/tmp/h"])), Some(PathBuf::from("/tmp/h")));
        assert_eq!(history_path(&chat_args(&["--no-history"])), None);
        if let Some(data) = dirs::data_dir() {
            assert_eq!(history_path(&chat_args(&[])), Some(data.join("qclient/history")));
        }
    }

    #[test]
    fn history_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/history");
        let mut first = editor(Some(&path)).unwrap();
        remember(&mut first, "first question", Some(&path));
        remember(&mut first, "second question", Some(&path));
        remember(&mut first, "second question", Some(&path));
        let again = editor(Some(&path)).unwrap();
        let past: Vec<&str> = again.history().iter().map(String::as_str).collect();
        assert_eq!(past, ["first question", "second question"]);
    }
}
