//! Every client of every binary on a secured cluster: the broker reached only over TLS (through a terminator,
//! stunnel) and requiring SASL SCRAM-SHA-512, each process logged in as its own principal; edow-registry serving
//! https itself and requiring basic auth, with a read-only role. The registry, orchestrator, worker
//! and CLI take their settings the ways the Kafka ecosystem gives them (`EDOW_KAFKA_*` variables, a client
//! properties file, `--kafka-option`); a wrong password fails cleanly, secrets are refused on flags and never
//! logged.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ended, password_for, Cluster, REGISTRY_USERS};
use edow_schemas::contracts::LifecycleKind;
use edow_testkit::Binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_run_end_to_end_with_every_client_on_sasl_over_tls() {
    let cluster = Cluster::start_secured();
    let orchestrator = cluster.orchestrator();
    cluster.wait_for_topics();

    // The worker gets all its Kafka settings, its password included, from a properties file: no EDOW_KAFKA_*
    // variable at all.
    let dir = tempfile::tempdir().unwrap();
    let properties = dir.path().join("client.properties");
    let settings: String = cluster
        .broker
        .client_settings()
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    let worker_password = password_for("edow-worker");
    std::fs::write(
        &properties,
        format!(
            "# as a Java client reads it\n{settings}sasl.username=edow-worker\nsasl.password={worker_password}\n"
        ),
    )
    .unwrap();
    let worker = Binary::start(
        "edow-worker",
        "worker",
        &[
            "--kafka-config".to_string(),
            properties.display().to_string(),
            "--task".into(),
            "secure.echo=echo".into(),
        ],
        &[
            ("EDOW_BOOTSTRAP_SERVERS", cluster.broker.bootstrap_servers()),
            ("EDOW_SCHEMA_REGISTRY_URL", cluster.registry.url()),
            (
                "EDOW_SCHEMA_REGISTRY_CA_LOCATION",
                cluster.registry.ca().unwrap().display().to_string(),
            ),
            (
                "EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                format!("{}:{}", REGISTRY_USERS[0].1, REGISTRY_USERS[0].2),
            ),
            ("EDOW_PARTITIONS", common::PARTITIONS.to_string()),
            ("EDOW_TASK_PARTITIONS", common::PARTITIONS.to_string()),
        ],
    );

    cluster.deploy(
        "name: secured\nsteps:\n  - { name: a, task: secure.echo }\n  - { name: b, task: secure.echo }\n",
    );
    let workflows: Vec<(String, String)> = (0..20)
        .map(|i| (format!("secure-{i}"), format!(r#"{{"n": {i}}}"#)))
        .collect();
    cluster.start_many("secured", &workflows).await;
    let mut events = cluster.events();
    events
        .until(Duration::from_secs(90), |seen| ended(seen) >= 20)
        .await;
    let completed = events.per_workflow(LifecycleKind::WorkflowCompleted);
    assert_eq!(completed.len(), 20);
    assert!(completed.values().all(|e| e.len() == 1));

    // The CLI reads as its own principal (settings from the environment).
    let (ok, out, err) = cluster.cli(&["status", "secure-7", "--output", "json"]);
    assert!(ok, "{err}");
    assert!(out.contains("Completed"), "{out}");

    // Everything went through the terminator: the broker advertises only the TLS port.
    let terminator = cluster.broker.terminator_log().unwrap();
    let accepted = terminator.matches("accepted connection").count();
    assert!(accepted >= 4, "{accepted} TLS connections:\n{terminator}");

    // A wrong password is refused by the broker, and the CLI says so instead of hanging.
    let started = std::time::Instant::now();
    let refused = Command::new(env!("CARGO_BIN_EXE_edow"))
        .args(["definitions"])
        .envs(cluster.env())
        .env("EDOW_KAFKA_SASL_PASSWORD", "not-the-password")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("sasl.username=edow-cli") && !said.contains("not-the-password"),
        "the refusal should say how it tried to log in, never the password: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a wrong password took {:?}",
        started.elapsed()
    );

    // A secret on a flag is refused without being echoed; no log holds a password.
    let secret = "on-a-flag-7f3a9c";
    let (ok, _, err) = cluster.cli(&["--kafka-option", &format!("sasl.password={secret}"), "list"]);
    assert!(!ok && err.contains("EDOW_KAFKA_SASL_PASSWORD"), "{err}");
    assert!(!err.contains(secret), "{err}");
    for (name, log, password) in [
        (
            "orchestrator",
            orchestrator.log(),
            password_for("edow-orchestrator"),
        ),
        ("worker", worker.log(), worker_password),
    ] {
        assert!(
            !log.contains(password),
            "the {name} logged its password:\n{log}"
        );
    }

    registry_refuses_who_may_not(&cluster).await;
}

/// The registry over https: no credentials or a wrong password is 401, a read-only user's write is 403.
async fn registry_refuses_who_may_not(cluster: &Cluster) {
    let ca = std::fs::read(cluster.registry.ca().unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let base = cluster.registry.url();
    assert!(base.starts_with("https://"), "{base}");
    let (admin, reader) = (REGISTRY_USERS[0], REGISTRY_USERS[1]);
    let get = |user: Option<(&str, &str)>| {
        let mut request = client.get(format!("{base}/subjects"));
        if let Some((name, password)) = user {
            request = request.basic_auth(name, Some(password));
        }
        request.send()
    };
    // A client that connects and never says hello holds no one else up: handshakes run on their own.
    let port = base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut plain, b"GET /subjects HTTP/1.1\r\n\r\n").unwrap();
    let response = tokio::time::timeout(Duration::from_secs(3), get(None))
        .await
        .expect("a silent client held the listener up")
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error_code"], 40101, "{body}");
    assert_eq!(get(Some((reader.1, "wrong"))).await.unwrap().status(), 401);
    let subjects = get(Some((reader.1, reader.2))).await.unwrap();
    assert_eq!(subjects.status(), 200);
    let subjects: Vec<String> = subjects.json().await.unwrap();
    assert!(
        subjects.iter().any(|s| s.starts_with("edow.")),
        "{subjects:?}"
    );
    let register = |user: (&str, &str)| {
        client
            .post(format!("{base}/subjects/probe-value/versions"))
            .basic_auth(user.0, Some(user.1))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(r#"{"schema": "\"string\""}"#)
            .send()
    };
    let refused = register((reader.1, reader.2)).await.unwrap();
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error_code"], 40301, "{body}");
    assert_eq!(register((admin.1, admin.2)).await.unwrap().status(), 200);
}
