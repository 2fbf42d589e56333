//! A progress bar for long commands, drawn on stderr only when stderr is a terminal (so logs and
//! pipes stay clean).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A one-line progress bar.
pub struct Progress {
    label: &'static str,
    enabled: bool,
    started: Instant,
    last_drawn: Option<Instant>,
}

impl Progress {
    /// A bar named `label`; silent unless stderr is a terminal.
    pub fn new(label: &'static str) -> Progress {
        Progress {
            label,
            enabled: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last_drawn: None,
        }
    }

    /// Shows `done` of `total`, at most ten times a second.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled
            || self
                .last_drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last_drawn = Some(Instant::now());
        let fraction = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        let filled = (fraction * 30.0).round() as usize;
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let _ = write!(
            std::io::stderr(),
            "\r{} [{}{}] {:>3.0}% {done}/{total} ({rate:.0}/s)",
            self.label,
            "#".repeat(filled.min(30)),
            " ".repeat(30 - filled.min(30)),
            fraction * 100.0
        );
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.last_drawn.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}
