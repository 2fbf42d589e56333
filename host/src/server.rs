//! `turnstile run`: start the runtime, serve the HTTP API, and shut down cleanly on SIGINT or
//! SIGTERM (stop accepting, finish in-flight HTTP requests, drain every partition's queue).

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;

use crate::api::Backend;
use crate::config::Config;
use crate::kafka::KafkaNode;
use crate::runtime::Runtime;

/// Runs the server until a shutdown signal. Prints `listening on http://ADDR` (the real bound
/// address) on stdout once it accepts connections.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("turnstile-http")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve_async(config))
}

async fn serve_async(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let start_config = config.clone();
    let backend = tokio::task::spawn_blocking(move || -> anyhow::Result<Backend> {
        Ok(if start_config.kafka.is_some() {
            Backend::Kafka(KafkaNode::start(&start_config)?)
        } else {
            Backend::Local(Arc::new(Runtime::start(&start_config, None)?))
        })
    })
    .await
    .context("starting the runtime")??;

    // Register the handlers before announcing the address: a SIGTERM that arrives right after
    // `listening on` must drain cleanly, not hit the default action and kill the process.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{bound}")?;
        stdout.flush()?;
    }
    tracing::info!(%bound, "serving");

    let admin_token = config.admin.effective_token();
    if admin_token.is_none() {
        tracing::info!("admin API off (no admin.token or TURNSTILE_ADMIN_TOKEN)");
    }
    let app = crate::api::router(
        backend.clone(),
        crate::api::ApiSettings {
            max_body_bytes: config.server.max_body_bytes,
            max_module_bytes: config.rule.max_module_bytes,
            admin_token,
        },
    );
    if config.rule.watch
        && let Some(path) = config.rule.path.clone()
        && let Backend::Local(turnstile) = &backend
    {
        tracing::info!(path = %path.display(), "watching the rule file");
        tokio::spawn(crate::reload::watch_rule_file(
            turnstile.clone(),
            path,
            std::time::Duration::from_millis(config.rule.watch_interval_ms),
        ));
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;

    tracing::info!("draining partition queues");
    tokio::task::spawn_blocking(move || match backend {
        Backend::Local(runtime) => runtime.shutdown(),
        Backend::Kafka(node) => node.shutdown(),
    })
    .await
    .context("stopping partitions")?;
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
