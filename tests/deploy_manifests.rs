//! docker-compose.yml and k8s/ cannot be run here (no Docker engine, no cluster), so their contents are checked:
//! every service, port and environment variable the project relies on is there and consistent.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    serde_yaml_ng::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn env_of<'a>(service: &'a Value, key: &str) -> &'a str {
    match &service["environment"][key] {
        Value::String(s) => s,
        other => panic!("environment {key} is missing or not a string: {other:?}"),
    }
}

fn published_ports(service: &Value) -> BTreeSet<String> {
    service["ports"]
        .as_sequence()
        .expect("service publishes ports")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn compose_runs_kafka_in_kraft_mode_reachable_from_host_and_network() {
    let compose = compose();
    let kafka = &compose["services"]["kafka"];
    assert!(kafka["image"]
        .as_str()
        .unwrap()
        .starts_with("apache/kafka:"));
    assert_eq!(env_of(kafka, "KAFKA_PROCESS_ROLES"), "broker,controller");
    let voters = env_of(kafka, "KAFKA_CONTROLLER_QUORUM_VOTERS");
    let node_id = kafka["environment"]["KAFKA_NODE_ID"].as_u64().unwrap();
    assert!(voters.starts_with(&format!("{node_id}@kafka:")), "{voters}");
    assert!(!env_of(kafka, "CLUSTER_ID").is_empty());

    let listeners = env_of(kafka, "KAFKA_LISTENERS");
    let protocol_map = env_of(kafka, "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP");
    for listener in listeners.split(',') {
        let name = listener.split("://").next().unwrap();
        assert!(
            protocol_map.contains(&format!("{name}:")),
            "{name} has no protocol"
        );
    }
    let controller = env_of(kafka, "KAFKA_CONTROLLER_LISTENER_NAMES");
    assert!(listeners.contains(&format!("{controller}://")));
    let advertised = env_of(kafka, "KAFKA_ADVERTISED_LISTENERS");
    assert!(
        advertised.contains("PLAINTEXT://kafka:29092"),
        "{advertised}"
    );
    assert!(advertised.contains("localhost:9092"), "{advertised}");
    assert!(published_ports(kafka).contains("9092:9092"));
    // Transactions are not used by edow, but internal topics must fit one broker.
    assert_eq!(
        kafka["environment"]["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"].as_u64(),
        Some(1)
    );
}

#[test]
fn compose_runs_confluent_schema_registry_on_kafka() {
    let compose = compose();
    let registry = &compose["services"]["schema-registry"];
    assert!(registry["image"]
        .as_str()
        .unwrap()
        .starts_with("confluentinc/cp-schema-registry:"));
    assert_eq!(
        env_of(registry, "SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"),
        "PLAINTEXT://kafka:29092",
        "the registry must use the listener kafka advertises inside the network"
    );
    assert_eq!(
        env_of(registry, "SCHEMA_REGISTRY_LISTENERS"),
        "http://0.0.0.0:8081"
    );
    assert!(!env_of(registry, "SCHEMA_REGISTRY_HOST_NAME").is_empty());
    assert_eq!(
        env_of(registry, "SCHEMA_REGISTRY_KAFKASTORE_TOPIC"),
        "_schemas"
    );
    assert!(published_ports(registry).contains("8081:8081"));
    assert_eq!(
        registry["depends_on"]["kafka"]["condition"].as_str(),
        Some("service_healthy")
    );
}

/// Binaries the Dockerfile copies into the image.
const IMAGE_BINARIES: [&str; 4] = ["orchestrator", "worker", "edow", "edow-registry"];

/// Every `EDOW_*` variable that the orchestrator, worker or CLI reads, from their `--help`.
fn edow_env_vars_read_by_binaries() -> BTreeSet<String> {
    let binaries = [
        edow_testkit::workspace_binary("edow-orchestrator", "orchestrator"),
        edow_testkit::workspace_binary("edow-worker", "worker"),
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_edow")),
    ];
    let mut vars = BTreeSet::new();
    for binary in binaries {
        for args in [vec!["--help"], vec!["start", "--help"]] {
            let output = Command::new(&binary).args(&args).output().unwrap();
            let help = String::from_utf8_lossy(&output.stdout);
            vars.extend(
                help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("EDOW_"))
                    .map(str::to_string),
            );
        }
    }
    assert!(
        vars.contains("EDOW_BOOTSTRAP_SERVERS") && vars.contains("EDOW_SCHEMA_REGISTRY_URL"),
        "{vars:?}"
    );
    vars
}

/// Every `--task` of a worker command is TYPE=HANDLER with a known handler.
fn assert_worker_tasks(command: &[Value], origin: &str) {
    let words: Vec<&str> = command.iter().map(|w| w.as_str().unwrap()).collect();
    let tasks: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "--task")
        .map(|w| w[1])
        .collect();
    assert!(!tasks.is_empty(), "{origin}: the worker serves no task");
    for task in tasks {
        let (task_type, handler) = task
            .split_once('=')
            .unwrap_or_else(|| panic!("{origin}: {task}"));
        assert!(!task_type.is_empty(), "{origin}: {task}");
        let kind = handler.split(':').next().unwrap();
        assert!(
            ["echo", "trail", "sleep", "fail", "http", "exec"].contains(&kind),
            "{origin}: unknown handler in {task}"
        );
    }
}

#[test]
fn compose_runs_the_orchestrator_and_scalable_workers_against_kafka_and_the_registry() {
    let compose = compose();
    let services = &compose["services"];
    let read_by_binaries = edow_env_vars_read_by_binaries();
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for binary in IMAGE_BINARIES {
        assert!(
            dockerfile.contains(&format!("release/{binary}")),
            "the image lacks {binary}"
        );
    }
    for name in ["orchestrator", "worker", "cli"] {
        let service = &services[name];
        assert_eq!(service["image"], "edow:local", "{name}");
        assert_eq!(
            env_of(service, "EDOW_BOOTSTRAP_SERVERS"),
            "kafka:29092",
            "{name}: the internal listener"
        );
        assert_eq!(
            env_of(service, "EDOW_SCHEMA_REGISTRY_URL"),
            "http://schema-registry:8081",
            "{name}"
        );
        for key in service["environment"].as_mapping().unwrap().keys() {
            let key = key.as_str().unwrap();
            assert!(
                // EDOW_KAFKA_<PROPERTY>: any librdkafka property (kafka/src/settings.rs).
                key == "RUST_LOG"
                    || key.starts_with("EDOW_KAFKA_")
                    || read_by_binaries.contains(key),
                "{name} sets {key}, which nothing reads"
            );
        }
    }
    assert_eq!(services["orchestrator"]["build"], ".");
    assert_eq!(
        services["orchestrator"]["depends_on"]["schema-registry"]["condition"].as_str(),
        Some("service_healthy")
    );
    let worker = &services["worker"];
    assert_eq!(worker["command"][0], "worker");
    assert_worker_tasks(
        worker["command"].as_sequence().unwrap(),
        "docker-compose.yml worker",
    );
    assert!(
        worker["deploy"]["replicas"].as_u64().unwrap() >= 2,
        "two workers by default"
    );
    assert!(
        worker.get("ports").is_none() && worker.get("container_name").is_none(),
        "workers must scale"
    );
}

fn k8s_documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(root().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let value = Value::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
                docs.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    value,
                ));
            }
        }
    }
    docs
}

#[test]
fn k8s_manifests_are_namespaced_and_configure_what_the_binaries_read() {
    let docs = k8s_documents();
    let namespace = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Namespace")
        .expect("a Namespace manifest");
    let ns = namespace.1["metadata"]["name"].as_str().unwrap();
    for (file, doc) in &docs {
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file} has no kind"));
        assert!(
            doc["apiVersion"].as_str().is_some(),
            "{file} has no apiVersion"
        );
        if kind != "Namespace" && kind != "Kustomization" {
            assert_eq!(
                doc["metadata"]["namespace"].as_str(),
                Some(ns),
                "{file} {kind}"
            );
        }
    }
    let config = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "edow-config")
        .expect("ConfigMap edow-config");
    let data = config.1["data"].as_mapping().unwrap();

    let read_by_binaries = edow_env_vars_read_by_binaries();
    for key in data.keys() {
        let key = key.as_str().unwrap();
        assert!(
            // EDOW_KAFKA_<PROPERTY>: any librdkafka property (kafka/src/settings.rs).
            key == "RUST_LOG" || key.starts_with("EDOW_KAFKA_") || read_by_binaries.contains(key),
            "k8s/config.yaml sets {key}, which no edow binary reads"
        );
    }
    for var in [
        "EDOW_BOOTSTRAP_SERVERS",
        "EDOW_SCHEMA_REGISTRY_URL",
        "EDOW_TOPIC_PREFIX",
        "EDOW_PARTITIONS",
    ] {
        assert!(
            data.contains_key(Value::String(var.into())),
            "k8s/config.yaml misses {var}"
        );
    }
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "Deployment") {
        let containers = doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        let selector = &doc["spec"]["selector"]["matchLabels"];
        for (k, v) in selector.as_mapping().unwrap() {
            assert_eq!(
                &doc["spec"]["template"]["metadata"]["labels"][k.as_str().unwrap()],
                v,
                "{file}"
            );
        }
        for container in containers {
            assert_eq!(
                container["envFrom"][0]["configMapRef"]["name"], "edow-config",
                "{file}"
            );
            let binary = container["command"][0].as_str().unwrap();
            assert!(
                IMAGE_BINARIES.contains(&binary),
                "{file} runs {binary}, which the image lacks"
            );
            if binary == "worker" {
                assert_worker_tasks(container["command"].as_sequence().unwrap(), file);
            }
        }
    }

    let kustomization = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Kustomization")
        .expect("k8s/kustomization.yaml");
    let listed: BTreeSet<&str> = kustomization.1["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for (file, doc) in &docs {
        if doc["kind"] != "Kustomization" {
            assert!(
                listed.contains(file.as_str()),
                "{file} is not in kustomization.yaml"
            );
        }
    }
}

/// The port of a listen address such as `0.0.0.0:8080`.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn compose_scrapes_every_orchestrator_and_worker_and_provisions_the_dashboard() {
    let compose = compose();
    let services = &compose["services"];
    let http = port_of(env_of(&services["orchestrator"], "EDOW_HTTP_ADDR"));
    let metrics = port_of(env_of(&services["worker"], "EDOW_METRICS_ADDR"));
    assert!(
        published_ports(&services["orchestrator"]).contains(&format!("127.0.0.1:{http}:{http}")),
        "the orchestrator's API and metrics reach the host, on loopback only (the dev tokens are public)"
    );
    let prometheus = &services["prometheus"];
    assert!(prometheus["image"]
        .as_str()
        .unwrap()
        .starts_with("prom/prometheus:"));
    let mounted: Vec<&str> = prometheus["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        mounted.contains(&"./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro")
    );

    let text = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
    let config: Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut scraped = BTreeSet::new();
    for job in config["scrape_configs"].as_sequence().unwrap() {
        for sd in job["dns_sd_configs"].as_sequence().unwrap() {
            let port = sd["port"].as_u64().unwrap();
            for name in sd["names"].as_sequence().unwrap() {
                scraped.insert((name.as_str().unwrap().to_string(), port));
            }
        }
    }
    assert!(
        scraped.contains(&("orchestrator".to_string(), http)),
        "{scraped:?}"
    );
    assert!(
        scraped.contains(&("worker".to_string(), metrics)),
        "{scraped:?}"
    );

    let grafana = &services["grafana"];
    let volumes: Vec<&str> = grafana["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (source, _) in volumes.iter().filter_map(|v| v.split_once(':')) {
        assert!(
            root().join(source).exists(),
            "grafana mounts {source}, which is missing"
        );
    }
    let provider =
        std::fs::read_to_string(root().join("deploy/grafana/provisioning/dashboards/edow.yml"))
            .unwrap();
    let provider: Value = serde_yaml_ng::from_str(&provider).unwrap();
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(
        volumes.contains(&format!("./deploy/grafana/dashboards:{path}:ro").as_str()),
        "the dashboards folder is mounted where the provider reads"
    );
}

#[test]
fn k8s_pods_are_scraped_and_probed_on_the_port_their_binary_listens_on() {
    for (file, doc) in k8s_documents()
        .iter()
        .filter(|(_, d)| d["kind"] == "Deployment")
    {
        let template = &doc["spec"]["template"];
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{file}");
        let port: u64 = annotations["prometheus.io/port"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let container = &template["spec"]["containers"][0];
        let binary = container["command"][0].as_str().unwrap();
        let var = if binary == "orchestrator" {
            "EDOW_HTTP_ADDR"
        } else {
            "EDOW_METRICS_ADDR"
        };
        let listen = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{file} does not set {var}"));
        assert_eq!(port_of(listen["value"].as_str().unwrap()), port, "{file}");
        let named = container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["containerPort"].as_u64() == Some(port))
            .unwrap_or_else(|| panic!("{file}: no containerPort {port}"));
        let name = named["name"].as_str().unwrap();
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{file}"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["port"], name,
            "{file}"
        );
        if binary == "orchestrator" {
            assert_eq!(
                container["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{file}"
            );
            assert_eq!(
                container["readinessProbe"]["httpGet"]["port"], name,
                "{file}"
            );
        }
    }
}

#[test]
fn the_api_beyond_loopback_is_served_with_mounted_tokens() {
    use sha2::Digest;
    let compose = compose();
    let orchestrator = &compose["services"]["orchestrator"];
    assert!(env_of(orchestrator, "EDOW_HTTP_ADDR").starts_with("0.0.0.0:"));
    let tokens = env_of(orchestrator, "EDOW_API_TOKENS_FILE");
    let secret = tokens
        .strip_prefix("/run/secrets/")
        .expect("compose mounts the tokens as a secret");
    assert!(orchestrator["secrets"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|s| s == secret));
    let file = compose["secrets"][secret]["file"].as_str().unwrap();
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    let mut roles = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(
            ["viewer", "operator", "admin"].contains(&fields[0]),
            "{line}"
        );
        // The README's dev tokens are what the file holds the hashes of.
        let plain = format!("edow-dev-{}", fields[0]);
        let hash: String = sha2::Sha256::digest(plain.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(fields[1], hash, "{line}");
        roles.insert(fields[0]);
    }
    assert_eq!(roles.len(), 3);
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("edow-dev-admin"));

    let (file, deployment) = k8s_documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == "edow-orchestrator")
        .unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = |name: &str| {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{file}: no {name}"))
            .to_string()
    };
    let tokens = env("EDOW_API_TOKENS_FILE");
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| tokens.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{file}: {tokens} is on no mount"));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], "edow-api-tokens", "{file}");
    assert_ne!(
        volume["secret"]["optional"], true,
        "a missing token Secret must not start an open API"
    );
}

#[test]
fn k8s_kafka_credentials_come_from_secrets_never_from_plain_config() {
    let kafka_key = |name: &str| {
        name.strip_prefix("EDOW_KAFKA_")
            .map(|rest| rest.to_ascii_lowercase().replace('_', "."))
    };
    for (file, doc) in k8s_documents() {
        if doc["kind"] == "ConfigMap" {
            for (name, _) in doc["data"].as_mapping().unwrap() {
                let name = name.as_str().unwrap();
                if let Some(key) = kafka_key(name) {
                    assert!(
                        !edow_kafka::settings::is_secret(&key),
                        "{file}: the secret {name} sits in a ConfigMap"
                    );
                }
            }
        }
        if doc["kind"] != "Deployment" {
            continue;
        }
        let env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .unwrap();
        let password = env
            .iter()
            .find(|e| e["name"] == "EDOW_KAFKA_SASL_PASSWORD")
            .unwrap_or_else(|| panic!("{file}: no Kafka password for its principal"));
        assert!(
            password["value"].is_null()
                && password["valueFrom"]["secretKeyRef"]["name"].is_string(),
            "{file}: the Kafka password must come from a Secret"
        );
        for entry in env {
            let name = entry["name"].as_str().unwrap();
            if kafka_key(name).is_some_and(|k| edow_kafka::settings::is_secret(&k)) {
                assert!(
                    entry["value"].is_null(),
                    "{file}: {name} is written in plain text"
                );
            }
        }
    }
}
