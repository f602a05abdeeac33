//! qclient: the command-line client of the qreformulate gRPC service.
//!
//! Every failure ends as one line on stderr, `qclient: error: ...`, and a non-zero exit.

mod cli;
mod commands;
mod connect;
mod dataset;
mod error;
mod progress;
mod report;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Bad usage exits 1, not clap's 2: for `health`, 2 means "cannot connect"
        // (grpc_health_probe's codes). --help and --version exit 0.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("qclient: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // Don't wait for in-flight background tasks (e.g. a bench cut short by an error).
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        // `qclient ... | head`: the reader is gone, nothing left to say.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qclient: error: {e}");
            ExitCode::FAILURE
        }
    }
}
