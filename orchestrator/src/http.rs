//! The orchestrator's HTTP listener (`--http-addr`): the API (`/v1`, see `api`), `/metrics`, `/healthz` and
//! `/readyz`. Readiness means this instance has joined its group and restored the partitions of its first
//! assignment, and its visibility index holds what the topics held when it started (so that reads do not answer
//! 404 for workflows it has not read yet); it stays ready through later rebalances, so that a rolling restart
//! does not take every instance's API out of service at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

/// Whether the instance is ready, shared by the loop (which sets it) and the listener (which reports it).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every route the listener serves.
pub fn router(readiness: Readiness, api: crate::api::Api) -> Router {
    let index = api.visibility.clone();
    let probes = edow_telemetry::http::routes().route(
        "/readyz",
        get(move || {
            let answer = if !readiness.is_ready() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: joining the group or restoring partitions\n",
                )
            } else if !index.is_caught_up() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the visibility index is reading the state and events topics\n",
                )
            } else {
                (StatusCode::OK, "ready\n")
            };
            async move { answer }
        }),
    );
    crate::api::routes(api).merge(probes)
}
