//! The metrics listener: `/metrics` in the Prometheus text format and `/healthz`, as routes a binary merges
//! into its own HTTP router (the orchestrator's API) or serves alone (`--metrics-addr` of the worker).

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The content type of the Prometheus text exposition format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics` and `/healthz` (alive: the process answers).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
}

async fn metrics() -> impl IntoResponse {
    ([(CONTENT_TYPE, TEXT_FORMAT)], crate::metrics::render())
}

/// Binds `addr` now, so that a taken port fails the start with a clear error, and serves `router` on it until
/// `shutdown` resolves. Returns the bound address (port 0 picks a free one) and the server's task.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    what: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener to {addr}; pick a free address"))?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "{what} listening");
    let what = what.to_string();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!("the {what} listener stopped: {e}");
        }
    });
    Ok((bound, task))
}
