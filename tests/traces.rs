//! W3C trace context through Kafka: every record of a workflow (trigger, tasks, results, lifecycle events, state)
//! carries the trigger's trace id; the worker continues it around its handler and the http handler passes it on;
//! spans follow the OpenTelemetry messaging conventions and reach an OTLP/HTTP receiver (this test's own); log
//! lines of a workflow carry its ids and trace id.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use common::{ended, read_topic, Cluster};
use edow_kafka::{now_millis, produce_all, Outgoing};
use edow_schemas::contracts::WorkflowTrigger;
use edow_telemetry::trace::TraceContext;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use rdkafka::Message;

const TRACED: &str = r#"
name: traced
steps:
  - { name: first, task: trace.a }
  - { name: charge, task: trace.http }
"#;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    attributes: BTreeMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with protobuf bodies.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request =
                    ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref()?.value.clone())
                        .map(|v| match v {
                            AnyValue::StringValue(s) => s,
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            let attributes = span
                                .attributes
                                .iter()
                                .map(|a| {
                                    let value = match a.value.as_ref().and_then(|v| v.value.clone())
                                    {
                                        Some(AnyValue::StringValue(s)) => s,
                                        Some(AnyValue::IntValue(i)) => i.to_string(),
                                        other => format!("{other:?}"),
                                    };
                                    (a.key.clone(), value)
                                })
                                .collect();
                            kept.lock().unwrap().push(Received {
                                service: service.clone(),
                                trace_id: hex(&span.trace_id),
                                span_id: hex(&span.span_id),
                                parent_span_id: hex(&span.parent_span_id),
                                name: span.name,
                                kind: span.kind,
                                attributes,
                            });
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

/// The service the http handler calls: echoes the input, keeps the `traceparent` it was sent.
async fn charge_service() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let app = Router::new().route(
        "/charge",
        post(move |headers: HeaderMap, body: Bytes| {
            let kept = kept.clone();
            async move {
                if let Some(parent) = headers.get("traceparent") {
                    kept.lock()
                        .unwrap()
                        .push(parent.to_str().unwrap().to_string());
                }
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/charge"), seen)
}

async fn trigger(cluster: &Cluster, id: &str, traceparent: Option<&str>) {
    let topic = cluster.topics.triggers();
    let record = WorkflowTrigger {
        workflow_id: id.into(),
        workflow_name: "traced".into(),
        workflow_version: None,
        input: r#"{"amount": 5}"#.into(),
        idempotency_key: None,
        correlation_id: Some(format!("corr-{id}")),
        priority: 0,
        requested_at: now_millis(),
        attributes: Default::default(),
    };
    let headers = traceparent
        .map(|t| {
            vec![
                ("traceparent", t.as_bytes().to_vec()),
                ("tracestate", b"edow=test".to_vec()),
            ]
        })
        .unwrap_or_default();
    let out = Outgoing {
        topic: topic.clone(),
        partition: None,
        key: id.as_bytes().to_vec(),
        payload: Some(cluster.codec.encode(&topic, &record).await.unwrap()),
        headers,
    };
    produce_all(&cluster.kafka.producer().unwrap(), &[out])
        .await
        .unwrap();
}

/// The trace ids in the headers of every record keyed `id` on `topics`, by topic (an absent header counts as "").
async fn trace_ids_of(
    cluster: &Cluster,
    id: &str,
    topics: &[String],
) -> BTreeMap<String, Vec<String>> {
    let mut found = BTreeMap::new();
    for topic in topics {
        for record in read_topic(cluster, topic).await.unwrap() {
            if record.key() == Some(id.as_bytes()) {
                let trace = edow_kafka::headers::trace_context(record.headers())
                    .map(|t| t.trace_id_hex())
                    .unwrap_or_default();
                found
                    .entry(topic.clone())
                    .or_insert_with(Vec::new)
                    .push(trace);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_of_a_workflow_carries_the_trigger_trace_and_spans_are_exported() {
    let cluster = Cluster::start();
    let (otlp, spans) = otlp_receiver().await;
    let (charge, charged) = charge_service().await;
    let export = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let mut orchestrator_env = export.to_vec();
    orchestrator_env.push(("EDOW_LOG_FORMAT", "json".into()));
    orchestrator_env.push(("RUST_LOG", "info,edow_orchestrator=debug".into()));
    let orchestrator = cluster.orchestrator_with_env(&[], &orchestrator_env);
    cluster.wait_for_topics();
    let http_task = format!("trace.http=http:{charge}");
    let worker = cluster.worker_with_env("tracer", &["trace.a=echo", &http_task], 4, &[], &export);
    cluster.deploy(TRACED);

    let caller = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    trigger(&cluster, "traced-1", Some(&caller)).await;
    trigger(&cluster, "untraced-1", None).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| ended(seen) >= 2)
        .await;
    // The same trigger again starts nothing; the orchestrator logs that inside the trigger's span.
    trigger(&cluster, "traced-1", Some(&caller)).await;

    let topics = cluster.topics.clone();
    let all = [
        topics.triggers(),
        topics.tasks("trace.a"),
        topics.tasks("trace.http"),
        topics.results(),
        topics.events(),
        topics.state(),
    ];
    let traced = trace_ids_of(&cluster, "traced-1", &all).await;
    for topic in &all {
        let ids = traced
            .get(topic)
            .unwrap_or_else(|| panic!("no record of traced-1 on {topic}"));
        assert!(ids.iter().all(|t| t == TRACE_ID), "{topic}: {ids:?}");
    }
    assert_eq!(traced[&topics.results()].len(), 2, "two results");
    // Its trigger came without a context; everything the workflow made shares the one it was given.
    let untraced = trace_ids_of(&cluster, "untraced-1", &all[1..]).await;
    let fresh: BTreeSet<&String> = untraced.values().flatten().collect();
    assert_eq!(
        fresh.len(),
        1,
        "one new trace for a trigger without one: {untraced:?}"
    );
    let fresh = fresh.into_iter().next().unwrap();
    assert!(fresh.len() == 32 && fresh != TRACE_ID, "{fresh}");
    for topic in &all[1..] {
        assert!(
            untraced.contains_key(topic),
            "no record of untraced-1 on {topic}"
        );
    }

    // The http handler passed the context on, below the worker's span.
    let passed = charged.lock().unwrap().clone();
    assert_eq!(passed.len(), 2, "{passed:?}");
    let to_service = passed
        .iter()
        .filter_map(|t| TraceContext::parse(t, None))
        .find(|t| t.trace_id_hex() == TRACE_ID)
        .expect("the traced workflow's call carried its trace");

    // Spans: the orchestrator processed the trigger below the caller's span and sent the task; the worker
    // processed the task below that send and sent the result; the service call is below the worker's process.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let received: Vec<Received> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .cloned()
            .collect();
        let names: BTreeSet<&str> = received.iter().map(|s| s.name.as_str()).collect();
        if [
            "process edow.triggers",
            "send edow.tasks.trace.http",
            "process edow.tasks.trace.http",
            "send edow.results",
            "process edow.results",
        ]
        .iter()
        .all(|n| names.contains(n))
        {
            break received;
        }
        assert!(Instant::now() < deadline, "spans received: {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let named = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let trigger_process = &named("process edow.triggers")[0];
    assert_eq!(trigger_process.service, "edow-orchestrator");
    assert_eq!(
        trigger_process.parent_span_id, CALLER_SPAN,
        "below the caller's span"
    );
    assert_eq!(trigger_process.kind, 5, "SPAN_KIND_CONSUMER");
    let http_process = &named("process edow.tasks.trace.http")[0];
    assert_eq!(http_process.service, "edow-worker");
    assert_eq!(http_process.kind, 5);
    for (key, value) in [
        ("messaging.system", "kafka"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", "edow.tasks.trace.http"),
        ("messaging.consumer.group.name", "edow-workers"),
        ("messaging.kafka.message.key", "traced-1"),
    ] {
        assert_eq!(
            http_process.attributes.get(key).map(String::as_str),
            Some(value),
            "{key}: {http_process:?}"
        );
    }
    assert!(http_process
        .attributes
        .contains_key("messaging.destination.partition.id"));
    let task_send = named("send edow.tasks.trace.http");
    assert!(
        task_send.iter().any(|s| s.span_id == http_process.parent_span_id && s.kind == 4),
        "the worker's process span is below the orchestrator's send (SPAN_KIND_PRODUCER): {task_send:?} / {http_process:?}"
    );
    assert_eq!(
        hex(&to_service.span_id),
        http_process.span_id,
        "the service call is below the worker's span"
    );
    let result_send = named("send edow.results");
    assert!(result_send
        .iter()
        .any(|s| s.service == "edow-worker" && s.kind == 4));

    // Logs carry the ids: the worker's task lines (text), the orchestrator's input lines (JSON).
    let worker_log = worker.log();
    assert!(
        worker_log.lines().any(|l| l.contains("task_id=traced-1/") && l.contains(&format!("trace_id={TRACE_ID}"))),
        "{worker_log}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = orchestrator.log();
        let line = log
            .lines()
            .find(|l| l.contains("already started; trigger ignored"));
        if let Some(line) = line {
            let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
            assert_eq!(json["span"]["workflow_id"], "traced-1", "{line}");
            assert_eq!(json["span"]["correlation_id"], "corr-traced-1", "{line}");
            assert_eq!(json["span"]["trace_id"], TRACE_ID, "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log of the repeated trigger:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
