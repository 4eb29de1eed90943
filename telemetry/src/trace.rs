//! W3C trace context through Kafka, and OpenTelemetry spans for it.
//!
//! Every record of a workflow carries `traceparent` (and `tracestate` when the trigger had one) in its headers:
//! the trigger's context, or a new trace when the trigger came without one, is the workflow's root; each record
//! edow produces is a `send` span below it, and each record it consumes is handled in a `process` span below the
//! record's own context. Span names and attributes follow the OpenTelemetry messaging conventions
//! (`messaging.system=kafka`, destination, partition, consumer group, key).
//!
//! Spans are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set
//! ([`init_export`]); otherwise nothing is built but the ids the headers need. A context that comes from outside
//! and is not valid W3C is ignored (a new trace starts), never an error: tracing must not refuse work.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};

/// The W3C header names, used as Kafka record header keys (as the OpenTelemetry Kafka instrumentations do).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (the W3C limit is 32 members; 512 bytes is what propagators must accept).
const MAX_TRACESTATE_BYTES: usize = 512;

/// One position in a trace: the trace, the span that is the parent of what comes next, and the vendor state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub state: Option<String>,
}

impl TraceContext {
    /// A new trace, for a trigger that came without one.
    pub fn new_root() -> TraceContext {
        let ids = RandomIdGenerator::default();
        TraceContext {
            trace_id: ids.new_trace_id().to_bytes(),
            span_id: ids.new_span_id().to_bytes(),
            sampled: true,
            state: None,
        }
    }

    /// The same trace and state with a new span id: the context of a span below this one.
    pub fn new_child(&self) -> TraceContext {
        TraceContext {
            span_id: RandomIdGenerator::default().new_span_id().to_bytes(),
            ..self.clone()
        }
    }

    /// Parses a `traceparent` (W3C Trace Context level 1) and an optional `tracestate`; `None` when the
    /// traceparent is not valid, which makes the caller start a new trace.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let [version, trace, span, flags, rest @ ..] = parts.as_slice() else {
            return None;
        };
        // Version 00 has exactly four fields; a later version may add some, and is read as 00.
        let valid_version = if *version == "00" {
            rest.is_empty()
        } else {
            version.len() == 2 && *version != "ff" && is_lower_hex(version)
        };
        if !valid_version
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
            || !is_lower_hex(trace)
            || !is_lower_hex(span)
            || !is_lower_hex(flags)
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_BYTES)
            .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(str::to_string);
        Some(TraceContext {
            trace_id: trace_id.to_be_bytes(),
            span_id: span_id.to_be_bytes(),
            sampled: flags & 1 == 1,
            state,
        })
    }

    /// The context of a record whose `traceparent` and `tracestate` header values are these, if valid.
    pub fn from_values(
        traceparent: Option<&[u8]>,
        tracestate: Option<&[u8]>,
    ) -> Option<TraceContext> {
        let parent = std::str::from_utf8(traceparent?).ok()?;
        let state = tracestate.and_then(|s| std::str::from_utf8(s).ok());
        TraceContext::parse(parent, state)
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id_hex(),
            hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The headers that carry this context: `traceparent`, and `tracestate` when there is one.
    pub fn headers(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut headers = vec![(TRACEPARENT, self.traceparent().into_bytes())];
        if let Some(state) = &self.state {
            headers.push((TRACESTATE, state.as_bytes().to_vec()));
        }
        headers
    }

    /// The context as one string (traceparent, then tracestate after a space), to keep in workflow state.
    pub fn to_stored(&self) -> String {
        match &self.state {
            Some(state) => format!("{} {state}", self.traceparent()),
            None => self.traceparent(),
        }
    }

    /// Reads back [`TraceContext::to_stored`]; `None` for anything else.
    pub fn from_stored(stored: &str) -> Option<TraceContext> {
        let (parent, state) = match stored.split_once(' ') {
            Some((parent, state)) => (parent, Some(state)),
            None => (stored, None),
        };
        TraceContext::parse(parent, state)
    }

    fn otel(&self) -> Context {
        let state = self
            .state
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            flags,
            true,
            state,
        ))
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex in one allocation: this runs for every record handled and made.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    text
}

/// Where a record goes or comes from, for span names and attributes.
pub struct Destination<'a> {
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: &'a [u8],
}

impl Destination<'_> {
    fn attributes(&self, operation: &'static str) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", operation),
            KeyValue::new("messaging.operation.name", operation),
            KeyValue::new("messaging.destination.name", self.topic.to_string()),
            KeyValue::new(
                "messaging.kafka.message.key",
                String::from_utf8_lossy(&self.key[..self.key.len().min(256)]).into_owned(),
            ),
        ];
        if let Some(partition) = self.partition {
            attributes.push(KeyValue::new(
                "messaging.destination.partition.id",
                partition.to_string(),
            ));
        }
        attributes
    }
}

/// The `send` span of a record produced below `parent`; returns the context its headers carry (the span's own).
pub fn send(parent: &TraceContext, to: &Destination<'_>) -> TraceContext {
    let Some(tracer) = TRACER.get() else {
        return parent.new_child();
    };
    let mut span = tracer
        .span_builder(format!("send {}", to.topic))
        .with_kind(SpanKind::Producer)
        .with_attributes(to.attributes("send"))
        .start_with_context(tracer, &parent.otel());
    let context = of_span(span.span_context(), parent);
    span.end();
    context
}

/// A `process` span: a consumed record handled below its own context (or a new trace when it has none). Ends
/// when dropped, or with [`Process::end`].
pub struct Process {
    span: Option<opentelemetry_sdk::trace::Span>,
    /// The context of the span, the parent of what handling the record sends.
    pub context: TraceContext,
}

/// Starts the `process` span of a record read from `from` by `group` at `offset`.
pub fn process(
    parent: Option<&TraceContext>,
    from: &Destination<'_>,
    group: &str,
    offset: i64,
    extra: Vec<KeyValue>,
) -> Process {
    let root;
    let parent = match parent {
        Some(parent) => parent,
        None => {
            root = TraceContext::new_root();
            &root
        }
    };
    let Some(tracer) = TRACER.get() else {
        return Process {
            span: None,
            context: parent.new_child(),
        };
    };
    let mut attributes = from.attributes("process");
    attributes.push(KeyValue::new(
        "messaging.consumer.group.name",
        group.to_string(),
    ));
    attributes.push(KeyValue::new("messaging.kafka.offset", offset));
    attributes.extend(extra);
    let span = tracer
        .span_builder(format!("process {}", from.topic))
        .with_kind(SpanKind::Consumer)
        .with_start_time(SystemTime::now())
        .with_attributes(attributes)
        .start_with_context(tracer, &parent.otel());
    let context = of_span(span.span_context(), parent);
    Process {
        span: Some(span),
        context,
    }
}

impl Process {
    /// Marks the span failed with `message`.
    pub fn fail(&mut self, message: &str) {
        if let Some(span) = &mut self.span {
            span.set_status(opentelemetry::trace::Status::error(message.to_string()));
        }
    }

    pub fn end(self) {}
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(span) = &mut self.span {
            span.end();
        }
    }
}

fn of_span(span: &SpanContext, parent: &TraceContext) -> TraceContext {
    TraceContext {
        trace_id: span.trace_id().to_bytes(),
        span_id: span.span_id().to_bytes(),
        sampled: span.is_sampled(),
        state: parent.state.clone(),
    }
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Flushes and stops the span export when dropped (at the end of `main`).
pub struct ExportGuard(());

impl Drop for ExportGuard {
    fn drop(&mut self) {
        if let Some(provider) = PROVIDER.get() {
            // The exporter's blocking HTTP client must not be driven from an async context.
            let provider = provider.clone();
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Starts exporting spans over OTLP/HTTP (protobuf) as `service` when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the exporter reads the standard `OTEL_EXPORTER_OTLP_*` and
/// `OTEL_BSP_*` variables); `None` otherwise, and then no span is built.
pub fn init_export(service: &str) -> anyhow::Result<Option<ExportGuard>> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT is set, but: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("edow");
    let _ = PROVIDER.set(provider);
    let _ = TRACER.set(tracer);
    tracing::info!(service, "exporting spans over OTLP");
    Ok(Some(ExportGuard(())))
}

#[cfg(test)]
mod tests {
    use super::TraceContext;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let context = TraceContext::parse(VALID, Some("rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(context.traceparent(), VALID);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(context.sampled);
        let stored = context.to_stored();
        assert_eq!(TraceContext::from_stored(&stored), Some(context.clone()));
        let child = context.new_child();
        assert_eq!(child.trace_id, context.trace_id);
        assert_ne!(child.span_id, context.span_id);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(
            TraceContext::parse(later, None).is_some(),
            "a later version is read as 00"
        );
    }

    #[test]
    fn an_unusable_tracestate_is_dropped_not_the_context() {
        let huge = "a=".to_string() + &"b".repeat(600);
        assert_eq!(TraceContext::parse(VALID, Some(&huge)).unwrap().state, None);
        assert_eq!(
            TraceContext::parse(VALID, Some("a=\u{7}")).unwrap().state,
            None
        );
    }

    #[test]
    fn new_roots_differ() {
        let (a, b) = (TraceContext::new_root(), TraceContext::new_root());
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.trace_id, [0; 16]);
    }
}
