//! The metrics listener: `/metrics` in the Prometheus text format and `/healthz`, as routes a binary merges
//! into its own HTTP router (the orchestrator's API) or serves alone (`--metrics-addr` of the worker); and a TLS
//! listener for the binaries that serve https themselves (edow-registry, the orchestrator's API), optionally
//! requiring client certificates.

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

/// [`serve`] over TLS: the handlers see the peer (and, under mTLS, its certificate) as
/// `ConnectInfo<TlsPeer>`.
pub async fn serve_tls(
    addr: SocketAddr,
    files: &TlsFiles,
    router: Router,
    what: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TlsListener::bind(addr, files)
        .await
        .with_context(|| format!("starting the {what} listener on {addr}"))?;
    let bound = listener.local;
    let mutual = if files.client_ca.is_some() {
        " (client certificates required)"
    } else {
        ""
    };
    tracing::info!(%bound, "{what} listening with TLS{mutual}");
    let what = what.to_string();
    let task = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<TlsPeer>();
        if let Err(e) = axum::serve(listener, service)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!("the {what} listener stopped: {e}");
        }
    });
    Ok((bound, task))
}

/// A certificate chain and its private key (PEM files), for a listener that serves TLS; with `client_ca`, it
/// asks every client for a certificate and refuses the handshake of one that has none signed by that CA (mTLS).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

/// Most TLS handshakes in progress at once; a handshake not done within [`HANDSHAKE_TIMEOUT`] is dropped, so a
/// client that connects and says nothing holds one slot for a moment, never the listener. A connection that
/// finds every slot taken is closed at once rather than waited for.
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The peer of a TLS connection: its address and, under mTLS, what its verified certificate says.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub addr: SocketAddr,
    pub certificate: Option<ClientCertificate>,
}

/// The subject of a verified client certificate: its common name and organizations (where Kubernetes, for one,
/// puts a client's groups).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCertificate {
    pub common_name: String,
    pub organizations: Vec<String>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for TlsPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> TlsPeer {
        stream.remote_addr().clone()
    }
}

type TlsStream = tokio_openssl::SslStream<tokio::net::TcpStream>;

/// A TCP listener whose connections have completed a TLS handshake, for `axum::serve`. Handshakes run in tasks
/// of their own, so a slow or hostile client never holds up the next one.
pub struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(TlsStream, TlsPeer)>,
    local: SocketAddr,
}

/// The server's TLS context from `files`; fails naming the file that cannot be read or used.
fn acceptor(files: &TlsFiles) -> anyhow::Result<openssl::ssl::SslAcceptor> {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
    let mut builder =
        SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).context("setting up TLS")?;
    builder
        .set_certificate_chain_file(&files.cert)
        .with_context(|| {
            format!(
                "{} is not a readable PEM certificate chain",
                files.cert.display()
            )
        })?;
    builder
        .set_private_key_file(&files.key, SslFiletype::PEM)
        .with_context(|| format!("{} is not a readable PEM private key", files.key.display()))?;
    builder.check_private_key().with_context(|| {
        format!(
            "the key {} does not belong to the certificate {}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    if let Some(ca) = &files.client_ca {
        let not_a_ca = || format!("{} is not a readable PEM CA certificate", ca.display());
        builder.set_ca_file(ca).with_context(not_a_ca)?;
        builder.set_client_ca_list(
            openssl::x509::X509Name::load_client_ca_file(ca).with_context(not_a_ca)?,
        );
        builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(builder.build())
}

/// What a verified client certificate says of its subject.
fn client_certificate(stream: &TlsStream) -> Option<ClientCertificate> {
    let certificate = stream.ssl().peer_certificate()?;
    let entries = |nid| {
        certificate
            .subject_name()
            .entries_by_nid(nid)
            .filter_map(|e| e.data().to_string().ok())
            .collect::<Vec<_>>()
    };
    Some(ClientCertificate {
        common_name: entries(openssl::nid::Nid::COMMONNAME)
            .into_iter()
            .next()
            .unwrap_or_default(),
        organizations: entries(openssl::nid::Nid::ORGANIZATIONNAME),
    })
}

impl TlsListener {
    /// Binds `addr` and serves TLS with `files`; fails naming the file that cannot be read or used.
    pub async fn bind(addr: SocketAddr, files: &TlsFiles) -> anyhow::Result<TlsListener> {
        let acceptor = std::sync::Arc::new(acceptor(files)?);
        let verifies_clients = files.client_ca.is_some();
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
                    let handshake = async {
                        let ssl = openssl::ssl::Ssl::new(acceptor.context())?;
                        let mut tls = tokio_openssl::SslStream::new(ssl, stream)?;
                        std::pin::Pin::new(&mut tls).accept().await?;
                        anyhow::Ok(tls)
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(tls)) => {
                            let certificate = if verifies_clients {
                                client_certificate(&tls)
                            } else {
                                None
                            };
                            let peer = TlsPeer {
                                addr: peer,
                                certificate,
                            };
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
    type Io = TlsStream;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (its listener failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(TlsPeer {
            addr: self.local,
            certificate: None,
        })
    }
}
