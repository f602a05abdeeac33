//! `qclient completions SHELL` and `qclient man`: generated from the clap definitions, so
//! they never drift from `--help`.

use std::process::ExitCode;

use clap::CommandFactory;

use super::print;
use crate::cli::{Cli, CompletionsArgs, ManArgs};
use crate::error::ClientError;

pub fn completions(args: CompletionsArgs) -> Result<ExitCode, ClientError> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "qclient", &mut script);
    print(&String::from_utf8_lossy(&script))?;
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs) -> Result<ExitCode, ClientError> {
    let command = Cli::command();
    if let Some(dir) = args.out_dir {
        std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(command, &dir))
            .map_err(|source| ClientError::WriteFile { path: dir, source })?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page).map_err(ClientError::stdout)?;
    print(&String::from_utf8_lossy(&page))?;
    Ok(ExitCode::SUCCESS)
}
