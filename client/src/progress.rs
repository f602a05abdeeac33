//! Progress on stderr for the long commands (bench, eval): drawn only on a terminal and
//! never with --json, so pipes and scripts see nothing extra.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether to draw at all: stderr is a terminal and the output is not machine-read.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A bar over `total` items: `[elapsed] ===> pos/len <prefix>(rate, eta) <msg>`.
pub fn bar(total: u64, json: bool) -> ProgressBar {
    if !wanted(json) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {prefix}({per_sec}, eta {eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    // Keeps elapsed time and the spinner moving while nothing is counted (a slow server).
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A spinner with a message, for a wait of unknown length.
pub fn spinner(message: String, json: bool) -> ProgressBar {
    if !wanted(json) {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(message);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}
