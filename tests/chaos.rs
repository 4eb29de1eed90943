//! The chaos test: 1,000 workflows of mixed step kinds (task, parallel, map, choice) on a durable broker while
//! the orchestrator is SIGKILLed three times, a worker once, and the broker is restarted once. Every workflow
//! completes exactly once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{ended, Cluster};
use edow_schemas::contracts::LifecycleKind;
use serde_json::json;

const WORKFLOWS: usize = 1_000;

const MIXED: &str = r#"
name: mixed
steps:
  - { name: first, task: mix.a }
  - name: fan
    parallel:
      branches:
        - { name: left, steps: [{ name: l, task: mix.b }] }
        - { name: right, steps: [{ name: r, task: mix.c }] }
  - name: each
    input: "input.items"
    map: { items: "previous", concurrency: 2, steps: [{ name: m, task: mix.a }] }
  - name: route
    choice:
      - when: "input.n > `500`"
        steps: [{ name: big, task: mix.b }]
      - otherwise: [{ name: small, task: mix.c }]
"#;

const TASKS: [&str; 3] = ["mix.a=sleep:10ms", "mix.b=sleep:10ms", "mix.c=echo"];

fn distinct_completed(seen: &[edow_schemas::contracts::LifecycleEvent]) -> usize {
    seen.iter()
        .filter(|e| e.kind == LifecycleKind::WorkflowCompleted)
        .map(|e| &e.workflow_id)
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_complete_exactly_once_through_orchestrator_kills_a_worker_kill_and_a_broker_restart(
) {
    let mut cluster = Cluster::start_durable();
    let mut orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let mut w1 = cluster.worker("w1", &TASKS, 16);
    let _w2 = cluster.worker("w2", &TASKS, 16);
    cluster.deploy(MIXED);
    let workflows: Vec<(String, String)> = (0..WORKFLOWS)
        .map(|i| {
            (
                format!("mixed-{i}"),
                json!({"n": i, "items": [i, i + 1]}).to_string(),
            )
        })
        .collect();
    cluster.start_many("mixed", &workflows).await;

    let codec = edow_schemas::Codec::new(&cluster.registry.url()).unwrap();
    let mut events = common::events_reader(&cluster.kafka, &codec, &cluster.topics);
    let mut replacement_worker = None;
    for (step, at) in [100, 250, 400, 550, 700].into_iter().enumerate() {
        events
            .until(Duration::from_secs(300), |seen| ended(seen) >= at)
            .await;
        match step {
            1 => {
                w1.process().kill();
                replacement_worker = Some(cluster.worker("w3", &TASKS, 16));
            }
            3 => cluster.broker.restart(Duration::from_secs(2)),
            _ => {
                orchestrator.process().kill();
                orchestrator = cluster.orchestrator();
            }
        }
    }
    events
        .until(Duration::from_secs(600), |seen| {
            distinct_completed(seen) >= WORKFLOWS
        })
        .await;
    events.drain(Duration::from_secs(3)).await;

    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), WORKFLOWS, "{:?}", events.count_by_kind());
    for (id, list) in &completed {
        assert_eq!(list.len(), 1, "{id} completed {} times", list.len());
        let n: usize = id.trim_start_matches("mixed-").parse().unwrap();
        let branch = if n > 500 { "big" } else { "small" };
        assert!(
            events.seen.iter().any(|e| &e.workflow_id == id
                && e.kind == LifecycleKind::StepCompleted
                && e.step.as_deref() == Some(branch)),
            "{id} took the {branch} branch"
        );
    }
    let failed = events.per_workflow(LifecycleKind::WorkflowFailed);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(replacement_worker.is_some());
}
