//! Every step kind end to end: the example definitions deployed with the CLI and run by the orchestrator and a
//! worker process on the real broker, signals and cancels sent with the CLI; and an orchestrator killed while
//! workflows are mid-parallel, mid-map, mid-sleep and mid-wait.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{ended, Cluster};
use edow_kafka::{now_millis, produce_all, Outgoing};
use edow_schemas::contracts::{LifecycleEvent, LifecycleKind, SignalKind, WorkflowSignal};
use serde_json::{json, Value};

const TASKS: &[&str] = &[
    "risk.credit=echo",
    "risk.fraud=echo",
    "quote.a=trail",
    "quote.b=trail",
    "approve.finance=echo",
    "approve.legal=echo",
    "approve.ops=echo",
    "parcel.label=trail",
    "parcel.dispatch=trail",
    "ship.freight=trail",
    "ship.courier=trail",
    "ship.post=trail",
    "gift.send=trail",
    "log.archive=echo",
    "log.index=echo",
    "notify.remind=echo",
    "doc.submit=echo",
    "doc.escalate=echo",
    "doc.publish=echo",
    "checkout.confirm=echo",
    "payment.authorise=trail",
    "payment.capture=trail",
    "inventory.reserve=trail",
    "inventory.release=echo",
    "payment.charge=fail:always",
    "payment.refund=echo",
    "shipping.ship=echo",
];

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// The last end event of each workflow.
fn endings(events: &[LifecycleEvent]) -> HashMap<String, &LifecycleEvent> {
    events
        .iter()
        .filter(|e| e.kind.ends_workflow())
        .map(|e| (e.workflow_id.clone(), e))
        .collect()
}

fn detail(event: &LifecycleEvent) -> Value {
    serde_json::from_str(event.detail.as_deref().unwrap_or("null")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_kind_runs_through_orchestrator_and_worker() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let _worker = cluster.worker("w1", TASKS, 16);
    for file in std::fs::read_dir(examples()).unwrap() {
        let path = file.unwrap().path();
        // examples/ holds the definitions, and workers/ of other languages.
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let (ok, out, err) = cluster.cli(&["deploy", path.to_str().unwrap()]);
        assert!(ok, "{}: {out}{err}", path.display());
    }
    let remind_at = now_millis() + 1500;
    let starts: Vec<(&str, &str, Value)> = vec![
        ("fan-out", "fan-1", json!({"customer": "c1"})),
        (
            "shard",
            "shard-1",
            json!({"parcels": ["a", "b", "c", "d", "e"]}),
        ),
        ("route", "route-test", json!({"test": true})),
        ("route", "route-heavy", json!({"weight": 30, "vip": true})),
        ("route", "route-post", json!({"weight": 1})),
        ("copy-merge", "copy-1", json!({"event": "e-1"})),
        ("timers", "timers-1", json!({"remind_at": remind_at})),
        ("approval", "approval-yes", json!({"doc": "d-1"})),
        ("approval", "approval-cancel", json!({"doc": "d-2"})),
        ("checkout", "checkout-1", json!({"order": 9})),
        (
            "order-saga",
            "saga-1",
            json!({"order": 1, "amount": 30, "address": "x"}),
        ),
    ];
    for (name, id, input) in &starts {
        let (ok, out, err) =
            cluster.cli(&["start", name, "--id", id, "--input", &input.to_string()]);
        assert!(ok, "{name}: {out}{err}");
    }

    let mut events = cluster.events();
    // The approvals wait for a signal: send it once the wait has started; cancel the other.
    events
        .until(Duration::from_secs(60), |seen| {
            ["approval-yes", "approval-cancel"].iter().all(|id| {
                seen.iter().any(|e| {
                    e.workflow_id == *id
                        && e.kind == LifecycleKind::StepStarted
                        && e.step.as_deref() == Some("decision")
                })
            })
        })
        .await;
    let (ok, _, err) = cluster.cli(&[
        "signal",
        "approval-yes",
        "approve",
        "--payload",
        r#"{"by":"alice"}"#,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cluster.cli(&["cancel", "approval-cancel", "--reason", "withdrawn"]);
    assert!(ok, "{err}");

    events
        .until(Duration::from_secs(90), |seen| {
            let ends = endings(seen);
            starts.iter().all(|(_, id, _)| ends.contains_key(*id))
        })
        .await;
    let endings = endings(&events.seen);
    let end = |id: &str| {
        *endings
            .get(id)
            .unwrap_or_else(|| panic!("{id} did not end"))
    };

    // parallel: all, any, 2 of 3
    let fan = end("fan-1");
    assert_eq!(fan.kind, LifecycleKind::WorkflowCompleted);
    assert_eq!(
        detail(fan).as_object().unwrap().len(),
        2,
        "two of three approvals: {}",
        detail(fan)
    );
    let checks = events
        .seen
        .iter()
        .find(|e| {
            e.workflow_id == "fan-1"
                && e.step.as_deref() == Some("checks")
                && e.kind == LifecycleKind::StepCompleted
        })
        .unwrap();
    assert_eq!(
        detail(checks),
        json!({"credit": {"customer": "c1"}, "fraud": {"customer": "c1"}})
    );
    // map, in order, each element through two steps
    let shard = detail(end("shard-1"));
    let parcels: Vec<&str> = shard["parcels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["parcel"].as_str().unwrap_or_else(|| panic!("{shard}")))
        .collect();
    assert_eq!(parcels, ["a", "b", "c", "d", "e"]);
    assert_eq!(shard["parcels"][2]["trail"].as_array().unwrap().len(), 2);
    // filter ending early, choice, filter running its steps
    assert_eq!(end("route-test").kind, LifecycleKind::WorkflowFiltered);
    let heavy = detail(end("route-heavy"));
    let trail: Vec<&str> = heavy["trail"]
        .as_array()
        .unwrap_or_else(|| panic!("{heavy}"))
        .iter()
        .map(|t| t["step"].as_str().unwrap())
        .collect();
    assert_eq!(trail, ["freight", "gift"]);
    assert_eq!(detail(end("route-post"))["trail"][0]["step"], "post");
    // copy and merge
    assert_eq!(
        detail(end("copy-1")),
        json!({"event": "e-1", "archived": "e-1", "indexed": "e-1"})
    );
    // sleep and timer
    let timers = end("timers-1");
    assert_eq!(timers.kind, LifecycleKind::WorkflowCompleted);
    assert!(timers.at >= remind_at, "the timer held until its time");
    // wait for a signal, and cancel
    assert_eq!(detail(end("approval-yes")), json!({"by": "alice"}));
    let cancelled = end("approval-cancel");
    assert_eq!(cancelled.kind, LifecycleKind::WorkflowCancelled);
    assert!(cancelled.detail.as_deref().unwrap().contains("withdrawn"));
    // child workflow
    let checkout = detail(end("checkout-1"));
    assert_eq!(checkout["order"], 9);
    assert_eq!(checkout["receipt"]["trail"][1]["step"], "capture");
    assert!(
        endings.contains_key("checkout-1/pay"),
        "the child ran as its own instance"
    );
    // saga: charge fails after its attempts, the reservation is released, the workflow is compensated
    let saga = end("saga-1");
    assert_eq!(saga.kind, LifecycleKind::WorkflowCompensated);
    assert!(events.seen.iter().any(|e| e.workflow_id == "saga-1"
        && e.kind == LifecycleKind::StepCompleted
        && e.step.as_deref() == Some("undo/reserve")));
    assert!(!events
        .seen
        .iter()
        .any(|e| e.workflow_id == "saga-1" && e.step.as_deref() == Some("undo/charge")));
    let (ok, status, err) = cluster.cli(&["status", "saga-1"]);
    assert!(ok, "{err}");
    assert!(
        status.contains("Compensated") && status.contains("injected_failure"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_killed_mid_parallel_map_sleep_and_wait_resumes_every_workflow_once() {
    let cluster = Cluster::start();
    let mut orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let _worker = cluster.worker("w1", &["slow.work=sleep:400ms"], 16);
    cluster.deploy(
        r#"
name: pause
steps:
  - name: all
    parallel:
      branches:
        - { name: waiting, steps: [{ name: hold, wait: { signal: go } }] }
        - name: mapping
          steps:
            - { name: each, map: { items: "input.items", concurrency: 1, steps: [{ name: work, task: slow.work }] } }
        - { name: sleeping, steps: [{ name: nap, sleep: 3s }] }
"#,
    );
    let workflows: Vec<(String, String)> = (0..10)
        .map(|i| {
            (
                format!("pause-{i}"),
                json!({"items": [1, 2, 3, 4]}).to_string(),
            )
        })
        .collect();
    cluster.start_many("pause", &workflows).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter()
                .filter(|e| {
                    e.kind == LifecycleKind::StepCompleted
                        && e.step.as_deref() == Some("each[0]/work")
                })
                .count()
                >= 5
        })
        .await;
    orchestrator.process().kill();
    assert_eq!(ended(&events.seen), 0, "the kill must land mid-run");

    let restarted = cluster.orchestrator();
    // Signals for the waits, sent while the new instance restores.
    let topic = cluster.topics.signals();
    let mut records = Vec::new();
    for (id, _) in &workflows {
        let signal = WorkflowSignal {
            signal_id: format!("{id}/go"),
            workflow_id: id.clone(),
            kind: SignalKind::Signal,
            name: Some("go".into()),
            payload: r#"{"went": true}"#.into(),
            correlation_id: None,
            sent_at: now_millis(),
        };
        records.push(Outgoing {
            topic: topic.clone(),
            partition: None,
            key: id.as_bytes().to_vec(),
            payload: Some(cluster.codec.encode(&topic, &signal).await.unwrap()),
            headers: Vec::new(),
        });
    }
    produce_all(&cluster.kafka.producer().unwrap(), &records)
        .await
        .unwrap();

    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= 10)
        .await;
    events.drain(Duration::from_secs(2)).await;
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), 10, "{:?}", events.count_by_kind());
    for (id, list) in &completed {
        assert_eq!(list.len(), 1, "{id} completed {} times", list.len());
        let output = detail(list[0]);
        assert_eq!(output["waiting"], json!({"went": true}), "{id}: {output}");
        assert_eq!(
            output["mapping"].as_array().unwrap().len(),
            4,
            "{id}: {output}"
        );
        assert_eq!(
            output["sleeping"],
            json!({"items": [1, 2, 3, 4]}),
            "{id}: {output}"
        );
    }
    // Each map iteration's task completed once: none lost, none repeated in the events.
    for (id, _) in &workflows {
        for i in 0..4 {
            let step = format!("each[{i}]/work");
            let n = events
                .seen
                .iter()
                .filter(|e| {
                    e.workflow_id == *id
                        && e.kind == LifecycleKind::StepCompleted
                        && e.step.as_deref() == Some(step.as_str())
                })
                .count();
            assert_eq!(n, 1, "{id} {step}");
        }
    }
    let log = restarted.log();
    assert!(
        log.contains("restored partition from the changelog"),
        "{log}"
    );
}
