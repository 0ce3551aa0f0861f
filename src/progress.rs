//! Progress on a terminal, silent in pipelines.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar with ETA on stderr, counting `unit`s of `what`; drawn only on a terminal and when
/// `enabled`. Its message (set by the caller) follows the ETA.
pub(crate) fn bar(len: u64, what: &str, unit: &str, enabled: bool) -> ProgressBar {
    let target = if enabled {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let template =
        format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}, ETA {{eta}}  {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}
