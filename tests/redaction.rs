//! Sensitive values end to end: a definition marks a card number (its input) and a payment token (a step's
//! output); the orchestrator runs with encryption at rest and rotates its key across a SIGKILL. Workers get
//! the real values; the API, the CLI, lifecycle events, dead-letter displays and every process log show `***`;
//! and a raw read of every topic finds the values only where a worker must read them (or where their writer put
//! them).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{http_client, wait_ready, Cluster};
use edow_kafka::{now_millis, produce_all, Outgoing};
use edow_schemas::contracts::WorkflowTrigger;
use edow_testkit::free_port;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset};
use serde_json::{json, Value};

const CARD: &str = "4000056655665556";
const TOKEN: &str = "tok_live_9f8e7d6c5b4a";

const PAYMENT: &str = r#"
name: redacted-payment
sensitive: [input.card.number, steps.charge.token]
steps:
  - name: charge
    task: card.charge
    input: "{number: input.card.number, amount: input.amount}"
  - name: approve
    wait: { signal: approve, timeout: 1h }
  - name: receipt
    task: card.receipt
    input: "{token: steps.charge.token, holder: input.card.holder, amount: input.amount}"
"#;

fn cli(cluster: &Cluster, keys: Option<&std::path::Path>, args: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edow"));
    command.args(args).envs(cluster.env());
    if let Some(keys) = keys {
        command.env("EDOW_ENCRYPTION_KEYS", keys);
    }
    let output = command.output().expect("running edow");
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "edow {args:?}: {out}{err}");
    out + &err
}

async fn get(url: &str) -> Value {
    let response = http_client()
        .get(url)
        .send()
        .await
        .expect("the API answers");
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// GETs `url` until `done` holds; panics with the last answer after 60 s.
async fn until(url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = get(url).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{url}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of every topic of the cluster, as (topic, key, value and header bytes).
async fn every_record(cluster: &Cluster) -> Vec<(String, Vec<u8>)> {
    let kafka = cluster.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for topic in kafka.topic_names().unwrap() {
            for partition in 0..kafka.partition_count(&topic).unwrap() as i32 {
                for record in kafka
                    .read_to_end(&topic, partition, Offset::Beginning)
                    .unwrap()
                {
                    let mut bytes = record.key().unwrap_or_default().to_vec();
                    bytes.extend_from_slice(record.payload().unwrap_or_default());
                    if let Some(headers) = record.headers() {
                        for header in headers.iter() {
                            bytes.extend_from_slice(header.key.as_bytes());
                            bytes.extend_from_slice(header.value.unwrap_or_default());
                        }
                    }
                    all.push((topic.clone(), bytes));
                }
            }
        }
        all
    })
    .await
    .unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marked_values_reach_workers_and_nothing_else() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let first_key = cli(&cluster, None, &["key", "new", "--id", "k1"]);
    let first_key = first_key.lines().next().unwrap().to_string();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{first_key}\n")).unwrap();
    let charge = dir.path().join("charge.sh");
    std::fs::write(
        &charge,
        format!("cat >/dev/null\nprintf '{{\"token\":\"{TOKEN}\",\"status\":\"captured\"}}'\n"),
    )
    .unwrap();

    let http = format!("127.0.0.1:{}", free_port());
    let debug_logs = ("RUST_LOG", "info,edow_orchestrator=debug".to_string());
    let mut first = cluster.orchestrator_with_env(
        &[
            "--http-addr",
            &http,
            "--encryption-keys",
            keys.to_str().unwrap(),
        ],
        std::slice::from_ref(&debug_logs),
    );
    cluster.wait_for_topics();
    let charge_handler = format!("card.charge=exec:sh {}", charge.display());
    let worker = cluster.worker("card", &[&charge_handler, "card.receipt=echo"], 4);
    wait_ready(&http).await;
    cluster.deploy(PAYMENT);

    let started = http_client()
        .post(format!("http://{http}/v1/workflows"))
        .json(&json!({
            "name": "redacted-payment",
            "id": "pay-1",
            "input": {"card": {"number": CARD, "holder": "Ada Lovelace"}, "amount": 42},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let url = format!("http://{http}/v1/workflows/pay-1");
    let waiting = until(&url, |b| b["running_steps"][0]["step"] == "approve").await;
    assert_eq!(
        waiting["input"],
        json!({"card": {"number": "***", "holder": "Ada Lovelace"}, "amount": 42}),
        "{waiting}"
    );

    // A new key seals from here on; the old one still opens what it sealed, across a SIGKILL.
    first.process().kill();
    let second_key = cli(&cluster, None, &["key", "new", "--id", "k2"]);
    std::fs::write(
        &keys,
        format!("{}\n{first_key}\n", second_key.lines().next().unwrap()),
    )
    .unwrap();
    let second = cluster.orchestrator_with_env(
        &[
            "--http-addr",
            &http,
            "--encryption-keys",
            keys.to_str().unwrap(),
        ],
        &[debug_logs],
    );
    wait_ready(&http).await;
    let sent = http_client()
        .post(format!("{url}/signals/approve"))
        .json(&json!({"by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    let done = until(&url, |b| b["status"] == "Completed").await;

    // The receipt step got the real token; what the API shows of it is masked.
    assert_eq!(
        done["output"],
        json!({"token": "***", "holder": "Ada Lovelace", "amount": 42}),
        "{done}"
    );
    let results = common::results(&cluster).await;
    let receipt = results
        .iter()
        .find(|r| r.step.ends_with("receipt"))
        .expect("the receipt step's result");
    let receipt_output: Value = serde_json::from_str(receipt.output.as_deref().unwrap()).unwrap();
    assert_eq!(
        receipt_output["token"], TOKEN,
        "the worker got the real token"
    );
    let history = done["history"].as_array().unwrap();
    assert!(
        history.iter().any(|e| e["kind"] == "StepCompleted"
            && e["detail"].to_string().contains("captured")
            && e["detail"].to_string().contains("***")),
        "{done}"
    );

    // The CLI, holding the keys, opens what is sealed and shows it masked.
    let status = cli(
        &cluster,
        Some(&keys),
        &["status", "pay-1", "--history", "--output", "json"],
    );
    assert!(
        status.contains("Ada Lovelace") && status.contains("***"),
        "{status}"
    );

    // A dead-lettered trigger of the same definition is shown masked too.
    let orphan = WorkflowTrigger {
        workflow_id: "pay-orphan".into(),
        workflow_name: "redacted-payment".into(),
        workflow_version: Some(99),
        input: json!({"card": {"number": CARD, "holder": "Ada Lovelace"}}).to_string(),
        idempotency_key: None,
        correlation_id: None,
        priority: 0,
        requested_at: now_millis(),
        attributes: Default::default(),
    };
    let topic = cluster.topics.triggers();
    produce_all(
        &cluster.kafka.producer().unwrap(),
        &[Outgoing {
            topic: topic.clone(),
            partition: None,
            key: b"pay-orphan".to_vec(),
            payload: Some(cluster.codec.encode(&topic, &orphan).await.unwrap()),
            headers: Vec::new(),
        }],
    )
    .await
    .unwrap();
    let listed = until(
        &format!("http://{http}/v1/dead-letters?topic={topic}&reason=unknown_workflow"),
        |b| b["dead_letters"].as_array().is_some_and(|l| !l.is_empty()),
    )
    .await;
    let letter = &listed["dead_letters"][0];
    let shown = get(&format!(
        "http://{http}/v1/dead-letters/{topic}/{}/{}",
        letter["partition"], letter["offset"]
    ))
    .await;
    assert_eq!(
        shown["original"]["record"]["input"]["card"],
        json!({"number": "***", "holder": "Ada Lovelace"}),
        "{shown}"
    );
    let dlq_cli = cli(
        &cluster,
        Some(&keys),
        &[
            "dlq",
            "show",
            &topic,
            &letter["partition"].to_string(),
            &letter["offset"].to_string(),
        ],
    );
    assert!(
        !dlq_cli.contains(CARD) && dlq_cli.contains("***"),
        "{dlq_cli}"
    );

    // Raw: the card number only where its writer put it (the trigger, its dead-letter copy) and in the charge
    // step's tasks; the token only in the results its worker wrote and the receipt step's tasks. The
    // changelog and events are sealed, with both key ids.
    // (value, where it may be, where a worker must read it)
    let expected = [
        (
            CARD,
            vec![topic.clone(), edow_schemas::Topics::dead_letters(&topic)],
            cluster.topics.tasks("card.charge"),
        ),
        (
            TOKEN,
            vec![cluster.topics.results()],
            cluster.topics.tasks("card.receipt"),
        ),
    ];
    let records = every_record(&cluster).await;
    for (value, written, read) in &expected {
        let found: BTreeSet<&str> = records
            .iter()
            .filter(|(_, bytes)| contains(bytes, value))
            .map(|(topic, _)| topic.as_str())
            .collect();
        let unexpected: Vec<_> = found
            .iter()
            .filter(|t| **t != read.as_str() && !written.iter().any(|w| w == *t))
            .collect();
        assert!(unexpected.is_empty(), "{value} found in {unexpected:?}");
        assert!(
            found.contains(read.as_str()),
            "{value} never reached {read}"
        );
    }
    let state = cluster.topics.state();
    let sealed_with = |id: &str| {
        records.iter().any(|(topic, bytes)| {
            *topic == state && contains(bytes, &format!("edow-sealed:v1:{id}:"))
        })
    };
    assert!(
        sealed_with("k1") && sealed_with("k2"),
        "the changelog is sealed with both keys"
    );
    for (topic, bytes) in &records {
        if *topic == cluster.topics.events() {
            assert!(
                !contains(bytes, "Ada Lovelace"),
                "an event detail is not sealed"
            );
        }
    }

    // No log shows either value.
    for (name, log) in [
        ("first orchestrator", first.log()),
        ("second orchestrator", second.log()),
        ("worker", worker.log()),
    ] {
        for value in [CARD, TOKEN] {
            assert!(
                !log.contains(value),
                "the {name}'s log shows {value}:\n{log}"
            );
        }
    }
}
