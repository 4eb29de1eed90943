//! The metrics listener: `/metrics` in the Prometheus text format and `/healthz`, as routes a binary merges
//! into its own HTTP router (the orchestrator's API) or serves alone (`--metrics-addr` of the worker); and a TLS
//! listener for the binaries that serve https themselves (edow-registry).

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

/// A certificate chain and its private key (PKCS#8), both PEM files, for a listener that serves TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Most TLS handshakes in progress at once; a handshake not done within [`HANDSHAKE_TIMEOUT`] is dropped, so a
/// client that connects and says nothing holds one slot for a moment, never the listener. A connection that
/// finds every slot taken is closed at once rather than waited for.
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A TCP listener whose connections have completed a TLS handshake, for `axum::serve`. Handshakes run in tasks
/// of their own, so a slow or hostile client never holds up the next one.
pub struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(
        tokio_native_tls::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    /// Binds `addr` and serves TLS with `files`; fails naming the file that cannot be read or used.
    pub async fn bind(addr: SocketAddr, files: &TlsFiles) -> anyhow::Result<TlsListener> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let identity = native_tls::Identity::from_pkcs8(&read(&files.cert)?, &read(&files.key)?)
            .with_context(|| {
                format!(
                    "{} and {} are not a PEM certificate chain and its PKCS#8 private key",
                    files.cert.display(),
                    files.key.display()
                )
            })?;
        let acceptor = tokio_native_tls::TlsAcceptor::from(
            native_tls::TlsAcceptor::builder(identity)
                .min_protocol_version(Some(native_tls::Protocol::Tlsv12))
                .build()
                .context("setting up TLS")?,
        );
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}; pick a free address"))?;
        let local = tcp.local_addr()?;
        let (sender, accepted) = tokio::sync::mpsc::channel(64);
        let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    // The server is gone: stop accepting, which frees the port.
                    _ = sender.closed() => return,
                    accepted = tcp.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "every TLS handshake slot is taken; closing the connection");
                    continue;
                };
                let (acceptor, handed) = (acceptor.clone(), sender.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = handed.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_native_tls::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (its listener failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
