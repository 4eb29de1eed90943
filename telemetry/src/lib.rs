//! edow's telemetry, shared by the orchestrator, the worker and the registry: every metric name in one place
//! ([`metrics`]), consumer lag from librdkafka's statistics ([`lag`]), and the listener that serves them
//! ([`http`]).

pub mod http;
pub mod lag;
pub mod metrics;
