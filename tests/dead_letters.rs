//! Dead letters listed, shown and replayed, by the CLI and the API: triggers dead-lettered as `unknown_workflow`,
//! replayed after `edow deploy`, complete, each once; the replayed records are the originals byte for byte with an
//! `edow.replay` header.

mod common;

use std::time::{Duration, Instant};

use common::{http_client, read_topic, Cluster};
use edow_schemas::contracts::LifecycleKind;
use edow_testkit::free_port;
use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::{json, Value};

const LATE: &str = r#"
name: late
steps:
  - { name: only, task: late.echo }
"#;

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_dead_lettered_before_their_deploy_complete_once_replayed() {
    let cluster = Cluster::start();
    let http = format!("127.0.0.1:{}", free_port());
    let _orchestrator = cluster.orchestrator_with(&["--http-addr", &http]);
    cluster.wait_for_topics();
    let _worker = cluster.worker("late", &["late.echo=echo"], 4);
    let workflows: Vec<(String, String)> = ["late-1", "late-2"]
        .iter()
        .map(|id| (id.to_string(), json!({"id": id}).to_string()))
        .collect();
    cluster.start_many("late", &workflows).await;

    // Listed by topic and reason, once the orchestrator has dead-lettered both.
    let list = [
        "dlq",
        "list",
        "--topic",
        "edow.triggers",
        "--reason",
        "unknown_workflow",
        "--output",
        "json",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let letters = loop {
        let (ok, out, err) = cluster.cli(&list);
        let letters = if ok { json_of(&out) } else { json!([]) };
        if letters.as_array().is_some_and(|l| l.len() == 2) {
            break letters;
        }
        assert!(Instant::now() < deadline, "{out}{err}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let first = letters
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == "late-1")
        .expect("late-1 is dead-lettered")
        .clone();
    assert_eq!(first["topic"], "edow.triggers.dlq");
    assert!(
        first["error"].as_str().unwrap().contains("edow deploy"),
        "{first}"
    );
    let at = format!("{}:{}", first["partition"], first["offset"]);
    let (partition, offset) = (first["partition"].to_string(), first["offset"].to_string());

    // Shown with the original trigger decoded.
    let (ok, out, err) = cluster.cli(&[
        "dlq",
        "show",
        "edow.triggers",
        &partition,
        &offset,
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let shown = json_of(&out);
    assert_eq!(shown["reason"], "unknown_workflow");
    assert_eq!(
        shown["original"]["record"]["workflow_id"], "late-1",
        "{shown}"
    );
    assert_eq!(shown["original"]["record"]["workflow_name"], "late");

    // A replay must say which; an unknown topic is named.
    let (ok, _, err) = cluster.cli(&["dlq", "replay", "--topic", "edow.triggers"]);
    assert!(
        !ok && err.contains("--at PARTITION:OFFSET, --reason KIND, or --all"),
        "{err}"
    );
    let (ok, _, err) = cluster.cli(&["dlq", "replay", "--topic", "edow.nothing", "--all"]);
    assert!(
        !ok && err.contains("topic: edow.nothing has no dead-letter topic"),
        "{err}"
    );

    // Deploy, replay one by its position: it completes.
    cluster.deploy(LATE);
    let (ok, out, err) = cluster.cli(&["dlq", "replay", "--topic", "edow.triggers", "--at", &at]);
    assert!(
        ok && out.contains("replayed 1 to edow.triggers"),
        "{out}{err}"
    );
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter()
                .any(|e| e.workflow_id == "late-1" && e.kind == LifecycleKind::WorkflowCompleted)
        })
        .await;

    // The API lists, shows and replays the rest by reason (late-1 again: it exists, nothing starts).
    let client = http_client();
    let listed: Value = client
        .get(format!(
            "http://{http}/v1/dead-letters?topic=edow.triggers&reason=unknown_workflow"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["dead_letters"].as_array().unwrap().len(),
        2,
        "{listed}"
    );
    let shown: Value = client
        .get(format!(
            "http://{http}/v1/dead-letters/edow.triggers/{partition}/{offset}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["key"], "late-1");
    let response = client
        .post(format!("http://{http}/v1/dead-letters/replay"))
        .json(&json!({"topic": "edow.triggers", "reason": "unknown_workflow"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let replayed: Value = response.json().await.unwrap();
    assert_eq!(
        replayed["replayed"].as_array().unwrap().len(),
        2,
        "{replayed}"
    );
    for (body, field) in [
        (json!({"reason": "x"}), "body"),
        (json!({"topic": "edow.nothing"}), "topic"),
        (json!({"topic": "edow.triggers", "offsets": []}), "offsets"),
    ] {
        let response = client
            .post(format!("http://{http}/v1/dead-letters/replay"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let refused: Value = response.json().await.unwrap();
        assert_eq!(refused["error"]["field"], field, "{refused}");
    }

    events
        .until(Duration::from_secs(60), |seen| {
            seen.iter()
                .any(|e| e.workflow_id == "late-2" && e.kind == LifecycleKind::WorkflowCompleted)
        })
        .await;
    events.drain(Duration::from_secs(2)).await;
    for id in ["late-1", "late-2"] {
        let started = events.per_workflow(LifecycleKind::WorkflowStarted);
        assert_eq!(started.get(id).map(Vec::len), Some(1), "{id} started once");
    }

    // Byte for byte, with a header naming the replay.
    let triggers = read_topic(&cluster, "edow.triggers").await.unwrap();
    let late1: Vec<_> = triggers
        .iter()
        .filter(|r| r.key() == Some(b"late-1".as_slice()))
        .collect();
    assert_eq!(late1.len(), 3, "the original and two replays");
    let original = late1
        .iter()
        .find(|r| r.headers().is_none())
        .expect("the original");
    for replay in late1.iter().filter(|r| r.headers().is_some()) {
        assert_eq!(replay.payload(), original.payload(), "byte for byte");
        let header = replay
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == "edow.replay")
            .expect("an edow.replay header");
        let text = String::from_utf8_lossy(header.value.unwrap());
        assert!(text.contains("of edow.triggers.dlq/"), "{text}");
    }
}
