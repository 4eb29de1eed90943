//! A worker in another language: the Python example (examples/workers/python, Confluent's client and Avro serdes
//! against the registry) serves `payment.charge` of the order example beside Rust workers serving the other
//! steps, against the real broker. It resolves a large input passed by reference, fails a declined charge
//! permanently, and dead-letters a record it cannot decode while it goes on serving.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::Cluster;
use edow_schemas::contracts::DeadLetter;
use edow_testkit::Process;
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use serde_json::{json, Value};

/// The Python with Confluent's client that scripts/install-python-worker installed.
fn python() -> PathBuf {
    let path = std::env::var("EDOW_PYTHON_WORKER_PYTHON").unwrap_or_else(|_| {
        panic!("no Python for the example worker: run scripts/install-python-worker (or set EDOW_PYTHON_WORKER_PYTHON)")
    });
    PathBuf::from(path)
}

fn status(cluster: &Cluster, id: &str) -> Value {
    let (ok, out, err) = cluster.cli(&["status", id, "--output", "json"]);
    if !ok {
        return json!({"status": "unknown", "error": err});
    }
    serde_json::from_str(&out).unwrap_or(Value::Null)
}

/// `edow status` of `id` once it has ended; panics after 90 s.
async fn ended(cluster: &Cluster, id: &str, worker: &Process) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = status(cluster, id);
        if ["Completed", "Failed", "Compensated"].contains(&now["status"].as_str().unwrap_or("")) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not end: {now}\nthe Python worker's log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_worker_serves_a_step_of_the_order_example() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    let store = blobs.to_str().unwrap().to_string();
    let _orchestrator = cluster.orchestrator_with(&["--blob-store", &store]);
    cluster.wait_for_topics();
    let _rust = cluster.worker_with(
        "rust",
        &["inventory.reserve=echo", "shipping.ship=echo"],
        4,
        &["--blob-store", &store],
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut env: Vec<(String, String)> = cluster
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("EDOW_BLOB_STORE".into(), store.clone()));
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    let mut python_worker = Process::spawn_with_env(
        "python worker",
        &python(),
        &[root
            .join("examples/workers/python/worker.py")
            .display()
            .to_string()],
        dir.path(),
        dir.path().join("python-worker.log"),
        &env,
    );
    let deployed = std::fs::read_to_string(root.join("examples/order.yaml")).unwrap();
    cluster.deploy(&deployed);

    // A small order, an order with 300 KB of notes (passed by reference: over the 64 KiB threshold), a declined one.
    let (ok, out, err) = cluster.cli(&[
        "start",
        "order",
        "--id",
        "py-small",
        "--input",
        r#"{"sku": "A1", "amount": 42}"#,
    ]);
    assert!(ok, "{out}{err}");
    let big = dir.path().join("big.json");
    std::fs::write(
        &big,
        json!({"sku": "B2", "amount": 7, "notes": "n".repeat(300_000)}).to_string(),
    )
    .unwrap();
    let (ok, out, err) = cluster.cli(&[
        "--blob-store",
        &store,
        "start",
        "order",
        "--id",
        "py-big",
        "--input",
        &format!("@{}", big.display()),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cluster.cli(&[
        "start",
        "order",
        "--id",
        "py-declined",
        "--input",
        r#"{"sku": "C3", "amount": -1}"#,
    ]);
    assert!(ok, "{out}{err}");

    let small = ended(&cluster, "py-small", &python_worker).await;
    assert_eq!(
        small["status"],
        "Completed",
        "{small}\n{}",
        python_worker.log()
    );
    // ship echoes charge's output: what the Python handler answered.
    assert_eq!(small["output"]["by"], "python", "{small}");
    assert_eq!(small["output"]["charged"], 42, "{small}");

    let big = ended(&cluster, "py-big", &python_worker).await;
    assert_eq!(big["status"], "Completed", "{big}\n{}", python_worker.log());
    // The handler measured the whole input, not the reference the record carried.
    assert!(
        big["output"]["input_bytes"].as_u64().unwrap() > 300_000,
        "{big}"
    );

    let declined = ended(&cluster, "py-declined", &python_worker).await;
    assert_eq!(declined["status"], "Failed", "{declined}");
    let text = declined.to_string();
    assert!(text.contains("card_declined"), "{declined}");

    // A record the worker cannot decode goes to the dead-letter topic with the reason; the worker goes on.
    let tasks = cluster.topics.tasks("payment.charge");
    let producer = cluster.kafka.producer().unwrap();
    producer
        .send(
            FutureRecord::to(&tasks)
                .key("py-poison")
                .payload("not avro at all"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let dlq = edow_schemas::Topics::dead_letters(&tasks);
    let deadline = Instant::now() + Duration::from_secs(60);
    let letter: DeadLetter = loop {
        let mut found = None;
        for record in common::read_topic(&cluster, &dlq).await.unwrap_or_default() {
            let letter: DeadLetter = cluster.codec.decode(record.payload()).await.unwrap();
            if letter.key.as_deref() == Some(b"py-poison".as_slice()) {
                found = Some(letter);
            }
        }
        if let Some(letter) = found {
            break letter;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter: {}",
            python_worker.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(letter.value.as_deref(), Some(b"not avro at all".as_slice()));
    assert!(letter.error.contains("TaskRequested"), "{}", letter.error);
    let (ok, out, err) = cluster.cli(&[
        "start",
        "order",
        "--id",
        "py-after",
        "--input",
        r#"{"sku": "D4", "amount": 1}"#,
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        ended(&cluster, "py-after", &python_worker).await["status"],
        "Completed"
    );
    python_worker.kill();
}
