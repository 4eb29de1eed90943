//! Cron schedules with seconds, through the API, with two orchestrator instances: each fire time starts exactly one
//! instance, with an id naming the schedule and the fire time.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{http_client, wait_ready, Cluster};
use edow_schemas::contracts::LifecycleKind;
use edow_testkit::free_port;
use serde_json::{json, Value};

const TICKED: &str = r#"
name: ticked
steps:
  - { name: only, task: tick.echo }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seconds_schedule_starts_one_instance_per_fire_time_across_two_instances() {
    let cluster = Cluster::start();
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let _first = cluster.orchestrator_with(&["--http-addr", &a]);
    cluster.wait_for_topics();
    let _second = cluster.orchestrator_with(&["--http-addr", &b]);
    let _worker = cluster.worker("ticker", &["tick.echo=echo"], 8);
    cluster.deploy(TICKED);
    let client = http_client();
    wait_ready(&a).await;
    wait_ready(&b).await;

    let refused: Value = client
        .post(format!("http://{a}/v1/schedules"))
        .json(&json!({"name": "bad", "workflow": "ticked", "cron": "61 * * * * *"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refused["error"]["field"], "cron", "{refused}");

    let created = client
        .post(format!("http://{a}/v1/schedules"))
        .json(&json!({"name": "tick", "workflow": "ticked", "cron": "*/2 * * * * *", "input": {"from": "cron"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(
        created["next_fire_times"].as_array().unwrap().len(),
        3,
        "{created}"
    );
    tokio::time::sleep(Duration::from_secs(9)).await;

    // Both instances know it, and how far it has fired.
    let listed: Value = client
        .get(format!("http://{b}/v1/schedules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["schedules"][0]["name"], "tick", "{listed}");
    assert!(listed["schedules"][0]["fired_through"].is_i64(), "{listed}");
    // The CLI sees the same schedules, and refuses a bad one naming the field.
    let (ok, out, err) = cluster.cli(&["schedule", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["name"], "tick", "{out}");
    let (ok, _, err) = cluster.cli(&[
        "schedule",
        "create",
        "late",
        "--workflow",
        "ticked",
        "--cron",
        "* * *",
    ]);
    assert!(!ok && err.contains("cron: 3 fields"), "{err}");
    let deleted = client
        .delete(format!("http://{b}/v1/schedules/tick"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let missing = client
        .delete(format!("http://{b}/v1/schedules/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let mut events = cluster.events();
    events.drain(Duration::from_secs(4)).await;
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    for event in events
        .seen
        .iter()
        .filter(|e| e.kind == LifecycleKind::WorkflowStarted)
    {
        *starts.entry(event.workflow_id.clone()).or_default() += 1;
    }
    assert!(starts.len() >= 3, "a fire every 2 s for 9 s: {starts:?}");
    for (id, count) in &starts {
        assert_eq!(*count, 1, "{id} started {count} times");
        let time = id.strip_prefix("tick@").unwrap_or_else(|| panic!("{id}"));
        let seconds: u32 = time[17..19].parse().unwrap();
        assert_eq!(seconds % 2, 0, "{id} is not on a fire time");
        assert!(time.ends_with(".000Z"), "{id}");
    }
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert!(
        starts.keys().all(|id| completed.contains_key(id)),
        "{completed:?}"
    );

    // Deleted: no more fires.
    let before = starts.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    events.drain(Duration::from_secs(1)).await;
    let after = events
        .seen
        .iter()
        .filter(|e| e.kind == LifecycleKind::WorkflowStarted)
        .count();
    assert!(
        after <= before + 1,
        "still firing after delete: {before} then {after}"
    );

    // A schedule declared by a definition: stored on deploy, fires, leaves with a version that drops it.
    let declared = "name: declared\nschedule: { cron: '*/2 * * * * *', input: { by: definition } }\nsteps:\n  - { name: only, task: tick.echo }\n";
    cluster.deploy(declared);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        events.drain(Duration::from_millis(500)).await;
        let started = events
            .seen
            .iter()
            .filter(|e| {
                e.kind == LifecycleKind::WorkflowStarted && e.workflow_id.starts_with("declared@")
            })
            .count();
        if started >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the declared schedule did not fire"
        );
    }
    cluster.deploy("name: declared\nsteps:\n  - { name: only, task: tick.echo }\n");
    let (ok, out, err) = cluster.cli(&["schedule", "list", "--output", "json"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "[]",
        "the version without a schedule removed it"
    );
    let file = std::env::temp_dir().join(format!("bad-schedule-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "name: badly\nschedule: { cron: '* * *' }\nsteps:\n  - { name: only, task: tick.echo }\n",
    )
    .unwrap();
    let (ok, _, err) = cluster.cli(&["deploy", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(!ok && err.contains("schedule.cron"), "{err}");
}
