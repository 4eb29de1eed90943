//! Crashes: the orchestrator killed with SIGKILL mid-run and restarted, a second orchestrator taking over a
//! dead one's partitions, a worker killed mid-task. Nothing is lost and no workflow completes twice.

mod common;

use std::time::Duration;

use common::{ended, Cluster};
use edow_schemas::contracts::LifecycleKind;
use edow_testkit::Binary;
use serde_json::json;

const SLOW: &str = r#"
name: slow
steps:
  - { name: one, task: slow.a }
  - { name: two, task: slow.b }
  - { name: three, task: slow.c }
"#;

const SLOW_TASKS: [&str; 3] = [
    "slow.a=sleep:100ms",
    "slow.b=sleep:100ms",
    "slow.c=sleep:100ms",
];

/// Sums the workflows restored (`running=` plus `ended=`) and the `running=` figures of an orchestrator's
/// restore log lines.
fn restored_figures(log: &str) -> (usize, usize) {
    let figure = |line: &str, key: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .filter(|l| l.contains("restored partition from the changelog"))
        .fold((0, 0), |(r, n), l| {
            let running = figure(l, "running=");
            (r + running + figure(l, "ended="), n + running)
        })
}

/// How many partitions an orchestrator's log says it restored.
fn restores(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("restored partition from the changelog"))
        .count()
}

fn assert_each_completed_once(events: &common::Events<'_>, expected: usize) {
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), expected, "{:?}", events.count_by_kind());
    for (id, list) in completed {
        assert_eq!(list.len(), 1, "{id} completed {} times", list.len());
    }
    assert!(events
        .per_workflow(LifecycleKind::WorkflowFailed)
        .is_empty());
}

/// Starts an orchestrator and two workers of `concurrency` serving `slow`, then `count` slow workflows named
/// `PREFIX-i`. Returns the orchestrator and the workers (which stop when dropped).
async fn slow_run(
    cluster: &Cluster,
    concurrency: usize,
    prefix: &str,
    count: usize,
) -> (Binary, [Binary; 2]) {
    let orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    let workers = [
        cluster.worker("w1", &SLOW_TASKS, concurrency),
        cluster.worker("w2", &SLOW_TASKS, concurrency),
    ];
    cluster.deploy(SLOW);
    let workflows: Vec<(String, String)> = (0..count)
        .map(|i| (format!("{prefix}-{i}"), json!({"i": i}).to_string()))
        .collect();
    cluster.start_many("slow", &workflows).await;
    (orchestrator, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_killed_mid_run_restores_from_the_changelog_and_completes_each_workflow_once()
{
    let cluster = Cluster::start();
    let (mut orchestrator, _workers) = slow_run(&cluster, 16, "slow", 500).await;

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= 50)
        .await;
    orchestrator.process().kill();
    let completed_before = ended(&events.seen);
    assert!(
        completed_before < 500,
        "the kill must land mid-run ({completed_before} done)"
    );

    let restarted = cluster.orchestrator();
    events
        .until(Duration::from_secs(180), |seen| {
            seen.iter()
                .filter(|e| e.kind == LifecycleKind::WorkflowCompleted)
                .map(|e| &e.workflow_id)
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= 500
        })
        .await;
    events.drain(Duration::from_secs(3)).await;
    assert_each_completed_once(&events, 500);

    let log = restarted.log();
    let (restored, running) = restored_figures(&log);
    assert!(
        restored >= completed_before && restored <= 500,
        "restored {restored} workflows from the changelog ({completed_before} had completed):\n{log}"
    );
    assert!(running > 0, "some restored workflows were still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_takes_over_the_partitions_of_a_dead_one() {
    let cluster = Cluster::start();
    let mut first = cluster.orchestrator();
    cluster.wait_for_topics();
    let second = cluster.orchestrator();
    let _w1 = cluster.worker("w1", &SLOW_TASKS, 16);
    cluster.deploy(SLOW);
    // Both instances hold partitions before work starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(first.log().contains("restored partition")
        && second.log().contains("restored partition"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "partitions were not shared:\n{}\n{}",
            first.log(),
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workflows: Vec<(String, String)> = (0..100)
        .map(|i| (format!("pair-{i}"), json!({"i": i}).to_string()))
        .collect();
    cluster.start_many("slow", &workflows).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| ended(seen) >= 10)
        .await;
    first.process().kill();

    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= 100)
        .await;
    events.drain(Duration::from_secs(3)).await;
    assert_each_completed_once(&events, 100);
    let takeovers = restores(&second.log());
    assert!(
        takeovers > common::PARTITIONS as usize / 2,
        "the survivor restored the dead instance's partitions too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_a_killed_worker_is_redelivered_to_the_other_and_completes() {
    let cluster = Cluster::start();
    let _orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();
    cluster.deploy("name: long\nsteps:\n  - { name: work, task: long.work }\n");
    let mut doomed = cluster.worker("doomed", &["long.work=sleep:3s"], 8);
    let survivor = cluster.worker("survivor", &["long.work=sleep:3s"], 8);
    let workflows: Vec<(String, String)> = (0..12)
        .map(|i| (format!("long-{i}"), "{}".to_string()))
        .collect();
    // Let both workers join and split the partitions first (the later of the two first assignments is the shared one),
    // then kill the doomed one once it is running a task.
    for worker in [&doomed, &survivor] {
        common::wait_for_log(worker, "partitions assigned", Duration::from_secs(60)).await;
    }
    cluster.start_many("long", &workflows).await;
    common::wait_for_log(&doomed, "task started", Duration::from_secs(60)).await;
    doomed.process().kill();

    let mut events = cluster.events();
    events
        .until(Duration::from_secs(90), |seen| ended(seen) >= 12)
        .await;
    events.drain(Duration::from_secs(2)).await;
    assert_each_completed_once(&events, 12);
    // Tasks the doomed worker had started were answered by the survivor.
    let doomed_log = doomed.log();
    let taken: Vec<&str> = doomed_log
        .lines()
        .filter(|l| l.contains("task started"))
        .filter_map(|l| l.split("task_id=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap())
        .collect();
    assert!(
        !taken.is_empty(),
        "the doomed worker took no task:\n{doomed_log}\nsurvivor:\n{}",
        survivor.log()
    );
    let results = common::results(&cluster).await;
    for task_id in taken {
        let answers: Vec<_> = results.iter().filter(|r| r.task_id == task_id).collect();
        assert!(!answers.is_empty(), "{task_id} was never answered");
        assert!(
            answers.iter().all(|r| r.worker_id == "survivor"),
            "{task_id}: {answers:?}"
        );
    }
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrators_joining_and_leaving_under_load_complete_each_workflow_once() {
    let cluster = Cluster::start();
    let (mut first, _workers) = slow_run(&cluster, 32, "moving", 400).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| ended(seen) >= 20)
        .await;
    // A second instance joins: the first gives up partitions while inputs keep arriving, the second restores
    // them; then the first leaves gracefully and the second restores the rest, still under load.
    let second = cluster.orchestrator();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !second.log().contains("restored partition") {
        assert!(
            std::time::Instant::now() < deadline,
            "the second instance got no partition:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_leave = ended(&events.seen);
    assert!(before_leave < 400, "the rebalance must land mid-run");
    assert!(first.process().terminate(Duration::from_secs(20)));
    events
        .until(Duration::from_secs(120), |seen| ended(seen) >= 400)
        .await;
    events.drain(Duration::from_secs(3)).await;
    assert_each_completed_once(&events, 400);
    let takeovers = restores(&second.log());
    assert!(
        takeovers >= common::PARTITIONS as usize,
        "the second instance restored every partition in the end:\n{}",
        second.log()
    );
}
