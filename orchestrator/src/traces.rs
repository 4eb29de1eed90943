//! Trace context in the orchestrator: each input is handled in a `process` span below the context its record
//! carries (a trigger without one starts a new trace) and in a log span naming its workflow, correlation and trace
//! ids; a new workflow keeps its trigger's `process` context as its root, in its state; every record a batch
//! produces for a workflow carries a `send` context below the input that changed it (or below the root, for a
//! timer), so that every record of a workflow shares one trace id.

use std::collections::HashMap;

use edow_kafka::dead_letters::Reason;
use edow_kafka::Outgoing;
use edow_telemetry::trace::{self, Destination, TraceContext};
use opentelemetry::KeyValue;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;

use crate::decode::Input;

/// One input being handled: its `process` span and its log span.
pub(crate) struct InputTrace {
    pub process: trace::Process,
    pub log: tracing::Span,
    /// The workflow the input is for, when it could be decoded.
    pub workflow_id: Option<String>,
}

impl InputTrace {
    pub fn begin(msg: &OwnedMessage, input: &Result<Input, Reason>, group: &str) -> InputTrace {
        let (workflow_id, correlation_id) = match input {
            Ok(Input::Trigger(t)) => (Some(t.workflow_id.clone()), t.correlation_id.clone()),
            Ok(Input::Result(r)) => (Some(r.workflow_id.clone()), None),
            Ok(Input::Signal(s)) => (Some(s.workflow_id.clone()), s.correlation_id.clone()),
            Err(_) => (None, None),
        };
        let incoming = edow_kafka::headers::trace_context(msg.headers());
        let key = msg.key().unwrap_or_default();
        let mut extra = Vec::new();
        if let Some(id) = &workflow_id {
            extra.push(KeyValue::new("edow.workflow.id", id.clone()));
        }
        let process = trace::process(
            incoming.as_ref(),
            &Destination {
                topic: msg.topic(),
                partition: Some(msg.partition()),
                key,
            },
            group,
            msg.offset(),
            extra,
        );
        let log = tracing::info_span!(
            "input",
            workflow_id = workflow_id.as_deref().unwrap_or(""),
            correlation_id = correlation_id.as_deref().unwrap_or(""),
            trace_id = %process.context.trace_id_hex(),
        );
        InputTrace {
            process,
            log,
            workflow_id,
        }
    }
}

/// Whether a batch's records are new or produced again by a restore.
pub(crate) enum Made<'a> {
    /// Made by this batch: counted in the metrics, and sent in spans below the input that changed each workflow
    /// (by workflow id; absent: below the workflow's root).
    Now(&'a HashMap<String, TraceContext>),
    /// Produced again from a changelog outbox: counted and traced when first made.
    Again,
}

impl Made<'_> {
    pub fn is_new(&self) -> bool {
        matches!(self, Made::Now(_))
    }

    /// The context the records of workflow `id` are sent below; `root` is the one kept in its state. An input
    /// of another trace (a signal sent without one, a repeated trigger, a worker that drops headers) does not
    /// move the workflow to that trace: its records stay below the root.
    pub fn parent(&self, id: &str, root: Option<TraceContext>) -> Option<TraceContext> {
        match self {
            Made::Now(parents) => parents
                .get(id)
                .filter(|p| root.as_ref().is_none_or(|r| r.trace_id == p.trace_id))
                .cloned()
                .or(root),
            Made::Again => root,
        }
    }
}

/// Adds the trace headers to `records`, each a `send` below `parent` (a span when new and exporting).
pub(crate) fn stamp<'a>(
    records: impl Iterator<Item = &'a mut Outgoing>,
    parent: &TraceContext,
    new: bool,
) {
    for record in records {
        let context = if new {
            trace::send(
                parent,
                &Destination {
                    topic: &record.topic,
                    partition: record.partition,
                    key: &record.key,
                },
            )
        } else {
            parent.new_child()
        };
        record.headers.extend(context.headers());
    }
}
