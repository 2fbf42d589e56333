//! Logging setup: `tracing` to stderr, filtered by `log.level` or `RUST_LOG`, through a
//! non-blocking writer.
//!
//! Logs go to stderr so stdout carries only what scripts read (`listening on http://...`).
//! Nothing that logs ever waits for stderr: each line is handed to a bounded queue that one
//! writer thread drains. When stderr is slow or nobody reads it (a full pipe), the queue fills and
//! further lines are dropped and counted ([`LOG_LINES_DROPPED`]) instead of stopping the partition
//! thread that logged them.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines the writer thread may have waiting; beyond it lines are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// Lines dropped because stderr did not keep up, since start.
pub static LOG_LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// The queue's receiving end, kept so [`flush`] can see when it is drained.
static QUEUE: std::sync::OnceLock<Receiver<Vec<u8>>> = std::sync::OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str) -> anyhow::Result<()> {
    install(level, level)
}

/// The subscriber of `turnstile test`: the rule's log lines at `level`, exactly as `run` writes
/// them (same rate limit, escaping and non-blocking writer, so a rule that logs costs the same
/// and fails the same way in both), and of the host's own lines only errors and the sandbox's
/// warnings (a compile cache that is not used): the report on stdout is what the user reads.
/// `RUST_LOG`, when set, wins.
pub fn init_for_rule_tests(level: &str) -> anyhow::Result<()> {
    install(
        &format!("error,turnstile::sandbox=warn,turnstile::rule={level}"),
        level,
    )
}

/// Installs the global subscriber with `filter`, unless `RUST_LOG` is set; `level` names the
/// configured value in the error.
fn install(filter: &str, level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env)?,
        _ => EnvFilter::try_new(filter)
            .map_err(|e| anyhow::anyhow!("log.level `{level}` is not a valid filter: {e}"))?,
    };
    let (sender, receiver) = crossbeam_channel::bounded::<Vec<u8>>(QUEUE_LINES);
    let drained = receiver.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let stderr = std::io::stderr();
            for line in drained {
                // A closed stderr loses the line; there is nowhere to report that.
                let _ = stderr.lock().write_all(&line);
            }
        })?;
    let _ = QUEUE.set(receiver);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(QueuedStderr { sender })
        // Colour codes only for people: a file, a pipe or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Waits (at most `timeout`) until the queued lines are handed to stderr: called before the
/// process exits so the last lines are not lost when stderr is read.
pub fn flush(timeout: Duration) {
    let Some(queue) = QUEUE.get() else { return };
    let started = Instant::now();
    while !queue.is_empty() && started.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The subscriber's writer: each event is formatted into its own buffer and queued whole.
struct QueuedStderr {
    sender: Sender<Vec<u8>>,
}

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine {
            sender: &self.sender,
            line: Vec::new(),
        }
    }
}

/// One event's text, queued when the subscriber is done writing it.
struct QueuedLine<'a> {
    sender: &'a Sender<Vec<u8>>,
    line: Vec<u8>,
}

impl Write for QueuedLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        match self.sender.try_send(std::mem::take(&mut self.line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                LOG_LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
