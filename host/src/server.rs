//! `turnstile run`: start the runtime, serve the HTTP API, and shut down cleanly on SIGINT or
//! SIGTERM (stop accepting, finish in-flight HTTP requests within `server.shutdown_timeout_ms`,
//! drain every partition's queue).
//!
//! The connection loop is ours rather than `axum::serve`'s so that no client can hold the server:
//! a connection limit fitted to the open-file limit, a header read timeout (slowloris), a
//! shutdown deadline for connections that never finish their request, and JSON bodies on the
//! error responses hyper writes by itself.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use anyhow::Context;

use crate::config::Config;
use crate::kafka::KafkaNode;
use crate::runtime::Runtime;
use crate::service::Service;

/// Runs the server until a shutdown signal. Prints `listening on http://ADDR` (the real bound
/// address) on stdout once it accepts connections.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("turnstile-http")
        .build()
        .context("starting the tokio runtime")?;
    let served = runtime.block_on(serve_async(config));
    // Not a plain drop, which would wait for every blocking task forever: after a shutdown
    // deadline, one may be a partition drain stuck on a frozen disk. The tasks (and what they
    // hold) are still dropped here, within the bound.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

async fn serve_async(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    // Bound first: a taken address is refused before anything starts (in Kafka mode, before
    // topics are created, the layout recorded and the group joined and left again). Until the
    // runtime is up, connections wait in the listen backlog.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let start_config = config.clone();
    let service = tokio::task::spawn_blocking(move || -> anyhow::Result<Service> {
        Ok(if start_config.kafka.is_some() {
            Service::Kafka(KafkaNode::start(&start_config)?)
        } else {
            Service::Local(Arc::new(Runtime::start(&start_config, None)?))
        })
    })
    .await
    .context("starting the runtime")??;

    // Register the handlers before announcing the address: a SIGTERM that arrives right after
    // `listening on` must drain cleanly, not hit the default action and kill the process.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let bound = listener.local_addr().context("reading the bound address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{bound}")?;
        stdout.flush()?;
    }
    tracing::info!(%bound, "serving");
    if let Service::Kafka(node) = &service {
        node.advertise(bound);
    }

    let admin_token = config.admin.effective_token();
    if admin_token.is_none() {
        tracing::info!("admin API off (no admin.token or TURNSTILE_ADMIN_TOKEN)");
    }
    let shutting_down = Arc::new(AtomicBool::new(false));
    let app = crate::api::router(
        service.clone(),
        crate::api::ApiSettings {
            max_body_bytes: config.server.max_body_bytes,
            max_module_bytes: config.rule.max_module_bytes,
            admin_token,
            body_read_timeout: Duration::from_millis(config.server.body_read_timeout_ms),
            request_timeout: request_timeout(&config),
            readiness_stall: Duration::from_millis(config.server.readiness_stall_ms),
            shutting_down: shutting_down.clone(),
        },
    );
    if config.rule.watch
        && let Some(path) = config.rule.path.clone()
    {
        tracing::info!(path = %path.display(), "watching the rule file");
        tokio::spawn(crate::reload::watch_rule_file(
            service.clone(),
            path,
            std::time::Duration::from_millis(config.rule.watch_interval_ms),
        ));
    }
    let limits = ConnectionLimits {
        max_connections: fitted_max_connections(config.server.max_connections),
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
        shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
    };
    serve_connections(listener, app, limits, shutdown, shutting_down).await;

    tracing::info!("draining partition queues");
    // Bounded too: a partition thread stuck in the kernel (an fsync on a frozen disk) must not
    // keep the process from stopping. Exiting then is a crash for that partition, which its
    // store recovers from at the next start, and nothing it had acknowledged is lost.
    let drain = tokio::task::spawn_blocking(move || service.shutdown());
    match tokio::time::timeout(limits.shutdown_timeout, drain).await {
        Ok(joined) => joined.context("stopping partitions")?,
        Err(_) => anyhow::bail!(
            "the partitions did not stop within server.shutdown_timeout_ms ({} ms) after the connections closed (a stalled disk?); exiting without them: nothing they acknowledged is lost, unacknowledged work is dropped as in a crash",
            limits.shutdown_timeout.as_millis()
        ),
    }
    tracing::info!("stopped");
    Ok(())
}

/// A future that completes on SIGINT or SIGTERM. The handlers are registered when this is
/// called, not when the future is first polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("shutdown signal received");
    })
}

/// `server.request_timeout_ms`, but in Kafka mode never shorter than the outcome wait plus a
/// second, so Kafka's own, more precise 504 `outcome_timeout` answers first.
fn request_timeout(config: &Config) -> Duration {
    let configured = config.server.request_timeout_ms;
    Duration::from_millis(match &config.kafka {
        Some(kafka) => configured.max(kafka.reply_timeout_ms + 1_000),
        None => configured,
    })
}

/// What the connection loop enforces.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    /// Most open connections (already fitted to the open-file limit).
    max_connections: usize,
    /// Time to send a request's line and headers.
    header_read_timeout: Duration,
    /// Time in-flight connections get after the shutdown signal.
    shutdown_timeout: Duration,
}

/// Descriptors kept free for the process's own files (partition files, rules, logs) when
/// fitting `server.max_connections` to the open-file limit.
const RESERVED_FILES: usize = 64;

/// `server.max_connections`, lowered to fit the soft open-file limit: a process out of
/// descriptors cannot accept anyone, nor open its own files.
fn fitted_max_connections(configured: usize) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|soft| soft.parse::<usize>().ok())
        });
    match limit {
        Some(limit) if limit < configured + RESERVED_FILES => {
            let fitted = limit.saturating_sub(RESERVED_FILES).max(1);
            tracing::warn!(
                configured,
                fitted,
                open_file_limit = limit,
                "server.max_connections lowered to fit the open-file limit"
            );
            fitted
        }
        _ => configured,
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight connections
/// finish for `shutdown_timeout` and closes the rest.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    shutting_down: Arc<AtomicBool>,
) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // At the limit, stop accepting: further clients wait in the kernel's queue instead of
        // taking descriptors, and get in as header timeouts close slow connections.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection =
                builder.serve_connection(TokioIo::new(JsonErrors::new(stream)), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
            // Finish the request in flight (if any), then close.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    shutting_down.store(true, Ordering::SeqCst);
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "closing connections still open after server.shutdown_timeout_ms"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// A connection's stream that gives the bodiless error responses hyper writes by itself (431
/// for oversized headers, 400 for a malformed request line or header) the documented JSON
/// body, so every error the server writes is `{"error":{"code","message"}}`. The application
/// never writes a bodiless error, so only hyper's are rewritten.
struct JsonErrors<S> {
    inner: S,
    /// A rewritten response still to be written, and how much of it was.
    pending: Vec<u8>,
    written: usize,
}

impl<S> JsonErrors<S> {
    fn new(inner: S) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    fn poll_pending(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

/// The JSON version of a bodiless error response `head` (status line and headers only), or
/// `None` when `head` is anything else.
fn with_json_body(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    if status < 400 || !text.ends_with("\r\n\r\n") || text.matches("\r\n\r\n").count() != 1 {
        return None;
    }
    let lines: Vec<&str> = text.trim_end().split("\r\n").collect();
    if !lines
        .iter()
        .any(|l| l.eq_ignore_ascii_case("content-length: 0"))
    {
        return None;
    }
    let (code, message) = match status {
        431 => (
            "headers_too_large",
            "the request line and headers are too large",
        ),
        408 => ("header_timeout", "the request headers took too long"),
        _ => (
            "malformed_request",
            "the request line or headers are not valid HTTP/1.1",
        ),
    };
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut out = String::new();
    for line in &lines {
        let name = line.split(':').next().unwrap_or("");
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("content-type")
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    out.push_str(&body);
    Some(out.into_bytes())
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(rewritten) = with_json_body(buf) {
            self.pending = rewritten;
            self.written = 0;
            // Whatever is left is written by the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
