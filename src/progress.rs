//! Progress on a terminal (silent in pipelines), and each stage's wall-clock time.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

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

/// Wall-clock time per stage, in milliseconds, in pipeline order.
#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    #[serde(skip)]
    last: Instant,
    #[serde(skip)]
    start: Instant,
    pub stages_ms: Vec<(String, u128)>,
    pub total_ms: u128,
}

impl Timings {
    /// Starts the clock.
    pub fn start() -> Timings {
        let now = Instant::now();
        Timings {
            last: now,
            start: now,
            stages_ms: vec![],
            total_ms: 0,
        }
    }

    /// Records the time since the previous lap under `stage`.
    pub fn lap(&mut self, stage: &str) {
        let now = Instant::now();
        self.stages_ms
            .push((stage.to_string(), (now - self.last).as_millis()));
        self.total_ms = (now - self.start).as_millis();
        self.last = now;
    }
}
