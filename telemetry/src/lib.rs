//! edow's telemetry, shared by the orchestrator, the worker and the registry: every metric name in one place
//! ([`metrics`]), consumer lag from librdkafka's statistics ([`lag`]), the listener that serves them ([`http`]),
//! and W3C trace context through Kafka headers with OpenTelemetry spans ([`trace`]).

pub mod http;
pub mod lag;
pub mod metrics;
pub mod trace;
