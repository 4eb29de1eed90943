//! Sequential workflows end to end: real broker, registry, orchestrator and worker processes, and the CLI.

mod common;

use std::time::Duration;

use common::{ended, Cluster};
use edow_schemas::contracts::LifecycleKind;
use serde_json::{json, Value};

const CHAIN: &str = r#"
name: chain
steps:
  - { name: first, task: step.a }
  - { name: second, task: step.b }
  - { name: third, task: step.c }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_workflows_complete_once_with_outputs_chained() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let tasks = ["step.a=trail", "step.b=trail", "step.c=trail"];
    let _w1 = cluster.worker("w1", &tasks, 16);
    let _w2 = cluster.worker("w2", &tasks, 16);
    assert!(cluster.deploy(CHAIN).contains("deployed chain version 1"));
    assert!(
        cluster.deploy(CHAIN).contains("unchanged"),
        "redeploying the same text makes no new version"
    );

    let workflows: Vec<(String, String)> = (0..200)
        .map(|i| (format!("chain-{i}"), json!({"n": i}).to_string()))
        .collect();
    cluster.start_many("chain", &workflows).await;
    // Starting an id again starts nothing.
    cluster.start_many("chain", &workflows[..20]).await;

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= 200)
        .await;
    events.drain(Duration::from_secs(2)).await;

    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), 200, "{:?}", events.count_by_kind());
    assert_eq!(
        events.per_workflow(LifecycleKind::WorkflowStarted).len(),
        200
    );
    for (id, completions) in &completed {
        assert_eq!(
            completions.len(),
            1,
            "{id} completed {} times",
            completions.len()
        );
        let output: Value =
            serde_json::from_str(completions[0].detail.as_deref().unwrap()).unwrap();
        let n: usize = id.trim_start_matches("chain-").parse().unwrap();
        assert_eq!(output["n"], n, "{id}: the input travels through every step");
        let trail: Vec<&str> = output["trail"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["step"].as_str().unwrap())
            .collect();
        assert_eq!(
            trail,
            ["first", "second", "third"],
            "{id}: outputs chain in order"
        );
    }
    assert_eq!(
        events
            .per_workflow(LifecycleKind::WorkflowStarted)
            .values()
            .map(Vec::len)
            .max(),
        Some(1),
        "a repeated trigger must not start a second instance"
    );

    let (ok, status, err) = cluster.cli(&["status", "chain-7"]);
    assert!(ok, "{err}");
    assert!(status.contains("Completed"), "{status}");
    assert!(status.contains("\"n\":7"), "{status}");
    let (ok, watched, err) = cluster.cli(&["watch", "chain-7", "--timeout", "30"]);
    assert!(ok, "{err}");
    assert!(
        watched.contains("WorkflowStarted") && watched.contains("WorkflowCompleted"),
        "{watched}"
    );
}
