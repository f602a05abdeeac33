//! One module per subcommand; each returns the process exit code or a `ClientError`.

mod bench;
mod chat;
mod docs;
mod eval;
mod health;
mod reformulate;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use qreformulate::pb::{self, reformulator_client::ReformulatorClient};

use crate::cli::{Cli, Command};
use crate::connect::{Channel, Target};
use crate::error::ClientError;

pub async fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    let target = Target::from_cli(&cli)?;
    match cli.command {
        Command::Chat(args) => chat::run(&target, args).await,
        Command::Reformulate(args) => reformulate::run(&target, args).await,
        Command::Bench(args) => bench::run(&target, args).await,
        Command::Eval(args) => eval::run(&target, args).await,
        Command::Health(args) => health::run(&target, args).await,
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}

/// Writes to stdout and flushes (so prompts and streamed answers appear at once).
pub(crate) fn print(text: &str) -> Result<(), ClientError> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(ClientError::stdout)
}

/// One Reformulate call and its client-observed latency.
pub(crate) struct Answer {
    pub response: pb::ReformulateResponse,
    pub latency: Duration,
}

pub(crate) async fn reformulate_once(
    client: &mut ReformulatorClient<Channel>,
    target: &Target,
    query: &str,
    options: &pb::GenerationOptions,
    skip_cache: bool,
) -> Result<Answer, tonic::Status> {
    let request =
        target.request(pb::ReformulateRequest { query: query.to_string(), options: Some(*options), skip_cache });
    let start = Instant::now();
    let response = client.reformulate(request).await?.into_inner();
    Ok(Answer { response, latency: start.elapsed() })
}
