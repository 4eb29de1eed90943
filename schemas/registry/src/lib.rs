//! edow's schema registry: the Confluent Schema Registry REST API for Avro, stored in a compacted Kafka topic so
//! that a restarted registry, or a second instance, serves every schema under the same ids.

pub mod api;
pub mod auth;
pub mod compat;
pub mod log;
pub mod store;

use std::net::SocketAddr;

use anyhow::Context;

/// Where the registry listens and keeps its schemas.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub bootstrap_servers: String,
    /// The operator's librdkafka settings (security, tuning); their secrets are never shown.
    pub kafka_options: Vec<(String, String)>,
    pub topic: String,
    pub replication_factor: i32,
    /// The users file (`ROLE SHA256 USER` lines, roles read and admin); `None`: no authentication.
    pub users: Option<std::path::PathBuf>,
    /// Serve without users on a non-loopback address, because something in front authenticates.
    pub allow_unauthenticated: bool,
    /// Serve https with this certificate and key; `None`: plain http (behind a terminator, or on loopback).
    pub tls: Option<edow_telemetry::http::TlsFiles>,
}

/// Reads the schemas log, then serves the API until `shutdown` resolves. The listener is bound only once the
/// log has been read, so a client that can connect sees every schema registered before.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Anyone reaching an open registry could delete schemas or change compatibility.
    anyhow::ensure!(
        config.listen.ip().is_loopback() || config.users.is_some() || config.allow_unauthenticated,
        "refusing to serve the registry on {} without authentication: anyone reaching it could delete schemas \
         or change compatibility. Give --users FILE (lines `ROLE SHA256-OF-PASSWORD USER`, roles read and \
         admin), listen on 127.0.0.1, or pass --allow-unauthenticated when a proxy in front authenticates",
        config.listen
    );
    let log = log::SchemaLog::open(
        &config.bootstrap_servers,
        &config.kafka_options,
        &config.topic,
        config.replication_factor,
    )
    .await
    .with_context(|| {
        format!(
            "opening the schemas topic {} on {}",
            config.topic, config.bootstrap_servers
        )
    })?;
    edow_telemetry::metrics::init(edow_telemetry::metrics::Exporter::Registry);
    let users = config.users.as_deref().map(auth::open).transpose()?;
    let app = api::router(api::AppState::new(log)).layer(axum::middleware::from_fn_with_state(
        users,
        auth::authenticate,
    ));
    if let Some(files) = &config.tls {
        let listener = edow_telemetry::http::TlsListener::bind(config.listen, files).await?;
        tracing::info!(listen = %config.listen, topic = %config.topic, "schema registry serving https");
        return axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTPS");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, topic = %config.topic, "schema registry serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}
