//! qserver binary: parse the configuration, log, listen, serve until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use qserver::{logging, serve, shutdown, Config, ServerError};
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let config = Config::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qserver: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: these are configuration and environment errors.
            eprintln!("qserver: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), ServerError> {
    logging::init(config.log_format, &config.log_level)?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    serve(config, listener, shutdown::signal()).await
}
