//! Logging setup: `tracing` to stderr, filtered by `log.level` or `RUST_LOG`.
//!
//! Logs go to stderr so stdout carries only what scripts read (`listening on http://...`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env)?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("log.level `{level}` is not a valid filter: {e}"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for people: a file, a pipe or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))
}
