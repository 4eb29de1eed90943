//! The outage test: the broker (durable storage) stops for 40 s in the middle of a run, with tasks running and
//! the schema registry unreachable with it. Once it is back, every workflow completes exactly once, and no
//! process was restarted by hand.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{ended, Cluster};
use edow_schemas::contracts::LifecycleKind;
use serde_json::json;

const WORKFLOWS: usize = 300;
const TASKS: [&str; 3] = ["out.a=sleep:200ms", "out.b=sleep:200ms", "out.c=echo"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workflow_completes_after_the_broker_was_down_for_40_seconds() {
    let mut cluster = Cluster::start_durable();
    let mut orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let mut w1 = cluster.worker("w1", &TASKS, 32);
    let mut w2 = cluster.worker("w2", &TASKS, 32);
    cluster.deploy(
        "name: out\nsteps:\n  - { name: a, task: out.a }\n  - { name: b, task: out.b }\n  - { name: c, task: out.c }\n",
    );
    let pids = [
        orchestrator.process().pid(),
        w1.process().pid(),
        w2.process().pid(),
        cluster.registry.process().pid(),
    ];
    let workflows: Vec<(String, String)> = (0..WORKFLOWS)
        .map(|i| (format!("out-{i}"), json!({ "i": i }).to_string()))
        .collect();
    cluster.start_many("out", &workflows).await;

    let codec = edow_schemas::Codec::new(&cluster.registry.url()).unwrap();
    let mut events = common::events_reader(&cluster.kafka, &codec, &cluster.topics);
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= 30)
        .await;
    let running = events
        .seen
        .iter()
        .filter(|e| e.kind == LifecycleKind::StepStarted)
        .count();
    assert!(
        ended(&events.seen) < WORKFLOWS && running > ended(&events.seen),
        "the outage must land mid-run"
    );
    cluster.broker.restart(Duration::from_secs(40));

    events
        .until(Duration::from_secs(300), |seen| {
            seen.iter()
                .filter(|e| e.kind == LifecycleKind::WorkflowCompleted)
                .map(|e| &e.workflow_id)
                .collect::<HashSet<_>>()
                .len()
                >= WORKFLOWS
        })
        .await;
    events.drain(Duration::from_secs(3)).await;
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), WORKFLOWS);
    for (id, list) in &completed {
        assert_eq!(list.len(), 1, "{id} completed {} times", list.len());
    }
    let now = [
        orchestrator.process().pid(),
        w1.process().pid(),
        w2.process().pid(),
        cluster.registry.process().pid(),
    ];
    assert_eq!(now, pids);
    assert!(
        orchestrator.process().is_running(),
        "{}",
        orchestrator.log()
    );
    assert!(w1.process().is_running(), "{}", w1.log());
    assert!(w2.process().is_running(), "{}", w2.log());
    assert!(cluster.registry.process().is_running());
}
