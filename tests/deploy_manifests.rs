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
    // Every binary's registry client reads these from the environment (never flags: they name secrets).
    use edow_schemas::codec::{
        REGISTRY_CA_VARIABLE, REGISTRY_USER_INFO_FILE_VARIABLE, REGISTRY_USER_INFO_VARIABLE,
    };
    for variable in [
        REGISTRY_CA_VARIABLE,
        REGISTRY_USER_INFO_FILE_VARIABLE,
        REGISTRY_USER_INFO_VARIABLE,
    ] {
        vars.insert(variable.to_string());
    }
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

fn secure_overlay() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.secure.yml")).unwrap();
    let mut value: Value =
        serde_yaml_ng::from_str(&text).expect("docker-compose.secure.yml is valid YAML");
    value.apply_merge().expect("its merge keys resolve");
    value
}

/// `key=value` lines of a properties file under deploy/secrets.
fn dev_secret_properties(name: &str) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(root().join("deploy/secrets").join(name))
        .unwrap_or_else(|e| panic!("deploy/secrets/{name}: {e}"))
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// The secured overlay leaves Kafka no plaintext door beyond the broker's loopback, and authorizes by ACL.
#[test]
fn the_secured_compose_takes_only_sasl_ssl_from_clients() {
    let overlay = secure_overlay();
    let kafka = &overlay["services"]["kafka"];
    let protocols: std::collections::BTreeMap<&str, &str> =
        env_of(kafka, "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")
            .split(',')
            .map(|p| p.split_once(':').unwrap())
            .collect();
    for listener in env_of(kafka, "KAFKA_LISTENERS").split(',') {
        let (name, address) = listener.split_once("://").unwrap();
        let protocol = protocols[name];
        assert!(
            protocol == "SASL_SSL" || address.starts_with("localhost:"),
            "{name} ({address}) is {protocol} beyond the container's loopback"
        );
    }
    for advertised in env_of(kafka, "KAFKA_ADVERTISED_LISTENERS").split(',') {
        let name = advertised.split("://").next().unwrap();
        assert!(
            !name.contains("SSL"),
            "{name}: the image's start script wants a JKS keystore for advertised SSL listener names"
        );
    }
    assert_eq!(
        env_of(kafka, "KAFKA_SASL_ENABLED_MECHANISMS"),
        "SCRAM-SHA-512"
    );
    assert_eq!(
        env_of(kafka, "KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"),
        "false"
    );
    assert!(env_of(kafka, "KAFKA_AUTHORIZER_CLASS_NAME").ends_with("StandardAuthorizer"));
    assert_eq!(
        kafka["depends_on"]["certs"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        overlay["services"]["kafka-users"]["network_mode"].as_str(),
        Some("service:kafka"),
        "kafka-users reaches the loopback listener by sharing the broker's network namespace"
    );
}

/// Each edow process is its own principal with credentials from a mounted secret, ACLs of its own, https to
/// the registry, and the API over https; no password is written in the compose files.
#[test]
fn the_secured_compose_gives_every_process_its_own_principal_from_secrets() {
    let overlay = secure_overlay();
    let services = &overlay["services"];
    let compose_text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap()
        + &std::fs::read_to_string(root().join("docker-compose.secure.yml")).unwrap();
    let acls = std::fs::read_to_string(root().join("deploy/secure/kafka-users.sh")).unwrap();
    let mut principals = BTreeSet::new();
    for name in ["orchestrator", "worker", "cli", "schema-registry"] {
        let service = &services[name];
        let file = env_of(service, "EDOW_KAFKA_CONFIG_FILE");
        let secret = file
            .strip_prefix("/run/secrets/")
            .unwrap_or_else(|| panic!("{name}: {file} is not a mounted secret"));
        let mounted: Vec<&str> = service["secrets"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} mounts no secrets"))
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(mounted.contains(&secret), "{name} does not mount {secret}");
        assert!(
            overlay["secrets"][secret]["file"]
                .as_str()
                .unwrap()
                .starts_with("./deploy/secrets/"),
            "{secret}"
        );
        let properties = dev_secret_properties(secret);
        assert_eq!(properties["security.protocol"], "SASL_SSL", "{secret}");
        assert_eq!(properties["sasl.mechanism"], "SCRAM-SHA-512", "{secret}");
        assert_eq!(properties["ssl.ca.location"], "/certs/ca.pem", "{secret}");
        let user = &properties["sasl.username"];
        assert!(principals.insert(user.clone()), "{user} is shared");
        assert!(
            acls.contains(&format!("User:{user}")),
            "{user} has no ACLs in kafka-users.sh"
        );
        // kafka-users.sh sets edow-WHO's password from kafka-WHO.properties, the file this process mounts.
        let who = secret
            .strip_prefix("kafka-")
            .and_then(|s| s.strip_suffix(".properties"))
            .unwrap();
        assert_eq!(user, &format!("edow-{who}"), "{secret}");
        let creates = acls.lines().find(|l| l.starts_with("for who in")).unwrap();
        assert!(
            creates
                .split_whitespace()
                .any(|w| w.trim_end_matches(';') == who),
            "kafka-users.sh creates no credential for {user}"
        );
        let password = &properties["sasl.password"];
        assert!(password.len() >= 16, "{secret}: a real password");
        assert!(
            !compose_text.contains(password.as_str()),
            "{secret}'s password is in a compose file"
        );
    }
    let registry_info =
        std::fs::read_to_string(root().join("deploy/secrets/registry-user-info")).unwrap();
    let (_, registry_password) = registry_info.trim().split_once(':').unwrap();
    assert!(!compose_text.contains(registry_password));
    for name in ["orchestrator", "worker", "cli"] {
        let service = &services[name];
        assert_eq!(
            env_of(service, "EDOW_SCHEMA_REGISTRY_URL"),
            "https://schema-registry:8081"
        );
        assert_eq!(
            env_of(service, "EDOW_SCHEMA_REGISTRY_CA_LOCATION"),
            "/certs/ca.pem"
        );
        assert_eq!(
            env_of(service, "EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE"),
            "/run/secrets/registry-user-info"
        );
        assert_eq!(
            env_of(service, "EDOW_BLOB_STORE"),
            "/var/lib/edow/blobs",
            "{name}"
        );
    }
    let registry = &services["schema-registry"];
    assert_eq!(registry["command"][0], "edow-registry");
    assert_eq!(
        env_of(registry, "EDOW_REGISTRY_USERS_FILE"),
        "/run/secrets/registry-users"
    );
    assert!(env_of(registry, "EDOW_REGISTRY_TLS_CERT").starts_with("/certs/"));
    let orchestrator = &services["orchestrator"];
    assert!(env_of(orchestrator, "EDOW_HTTP_TLS_CERT").starts_with("/certs/"));
    assert_eq!(
        env_of(orchestrator, "EDOW_ENCRYPTION_KEYS"),
        env_of(&services["cli"], "EDOW_ENCRYPTION_KEYS"),
        "the CLI reads the state the orchestrator encrypts"
    );
    let prometheus = std::fs::read_to_string(root().join("deploy/secure/prometheus.yml")).unwrap();
    assert!(prometheus.contains("scheme: https") && prometheus.contains("ca_file: /certs/ca.pem"));

    // What the overlay sets is read by something: edow's binaries (their --help and the registry client's
    // variables), or edow-registry.
    let read_by_binaries = edow_env_vars_read_by_binaries();
    let registry_help = Command::new(edow_testkit::workspace_binary(
        "edow-registry",
        "edow-registry",
    ))
    .arg("--help")
    .output()
    .unwrap();
    let registry_help = String::from_utf8_lossy(&registry_help.stdout).to_string();
    for name in ["orchestrator", "worker", "cli", "schema-registry"] {
        for key in services[name]["environment"].as_mapping().unwrap().keys() {
            let key = key.as_str().unwrap();
            assert!(
                key.starts_with("EDOW_KAFKA_")
                    || read_by_binaries.contains(key)
                    || registry_help.contains(key),
                "{name} sets {key}, which nothing reads"
            );
        }
    }
}

/// The overlay's certificate script makes a CA and certificates that verify against it, with the names the
/// services are reached by, and Kafka's one-file PEM keystore; a second run keeps them.
#[test]
fn the_secured_compose_makes_certificates_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new("sh")
            .arg(root().join("deploy/secure/make-certs.sh"))
            .env("CERTS_DIR", dir.path())
            .output()
            .unwrap()
    };
    let made = run();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for (cert, name) in [
        ("kafka.pem", "DNS:kafka"),
        ("schema-registry.pem", "DNS:schema-registry"),
        ("orchestrator.pem", "DNS:orchestrator"),
        ("operator-client.pem", "DNS:localhost"),
    ] {
        let verified = Command::new("openssl")
            .args(["verify", "-CAfile", "ca.pem", cert])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "{cert}: {}",
            String::from_utf8_lossy(&verified.stdout)
        );
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", cert])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&text.stdout).contains(name),
            "{cert} lacks {name}"
        );
    }
    let keystore = std::fs::read_to_string(dir.path().join("kafka-keystore.pem")).unwrap();
    assert!(keystore.contains("PRIVATE KEY") && keystore.contains("BEGIN CERTIFICATE"));
    let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    assert!(run().status.success());
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).unwrap(),
        ca_before,
        "a rerun replaced the CA"
    );
}

/// Every file a pod is told to read for a secret (the API's TLS key, the encryption keys, the registry's
/// credentials) lies on a volume from a Secret; the registry is reached over https; probes and scrapes of a
/// TLS listener say https.
#[test]
fn k8s_secret_files_are_mounted_from_secrets_and_tls_is_spoken_where_served() {
    let config = k8s_documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "edow-config")
        .map(|(_, d)| d)
        .expect("k8s has the edow-config ConfigMap");
    assert!(config["data"]["EDOW_SCHEMA_REGISTRY_URL"]
        .as_str()
        .unwrap()
        .starts_with("https://"));
    let secret_file_variables = [
        "EDOW_HTTP_TLS_KEY",
        "EDOW_HTTP_TLS_CERT",
        "EDOW_ENCRYPTION_KEYS",
        "EDOW_API_TOKENS_FILE",
        "EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE",
    ];
    let mut seen = BTreeSet::new();
    for (file, doc) in k8s_documents() {
        if doc["kind"] != "Deployment" {
            continue;
        }
        let pod = &doc["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let mut values: Vec<(String, String)> = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect();
        values.extend(config["data"].as_mapping().unwrap().iter().map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            )
        }));
        let mounts = container["volumeMounts"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for (name, path) in values
            .iter()
            .filter(|(n, _)| secret_file_variables.contains(&n.as_str()))
        {
            let mount = mounts
                .iter()
                .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
                .unwrap_or_else(|| panic!("{file}: {name}={path} is on no mounted volume"));
            let volume = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            assert!(
                volume["secret"]["secretName"].is_string(),
                "{file}: {name} is not from a Secret"
            );
            assert_eq!(mount["readOnly"].as_bool(), Some(true), "{file}: {name}");
            seen.insert(name.clone());
        }
        if values.iter().any(|(n, _)| n == "EDOW_HTTP_TLS_CERT") {
            for probe in ["livenessProbe", "readinessProbe"] {
                assert_eq!(
                    container[probe]["httpGet"]["scheme"], "HTTPS",
                    "{file}: {probe}"
                );
            }
            assert_eq!(
                doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"], "https",
                "{file}"
            );
        }
    }
    assert_eq!(
        seen,
        secret_file_variables
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "a secret file the manifests should mount is missing"
    );
}

/// The two ways to scale workers on lag scale the worker Deployment, up to the task topics' partition count,
/// on the group the workers join (KEDA) or the lag metric the workers export (HPA).
#[test]
fn k8s_autoscaling_scales_workers_on_consumer_lag_up_to_the_partition_count() {
    let parse = |name: &str| -> Vec<Value> {
        let text = std::fs::read_to_string(root().join("k8s/autoscaling").join(name)).unwrap();
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect()
    };
    let docs = k8s_documents();
    let config = &docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap")
        .unwrap()
        .1;
    let partitions: u64 = config["data"]["EDOW_TASK_PARTITIONS"]
        .as_str()
        .expect("k8s/config.yaml sets EDOW_TASK_PARTITIONS")
        .parse()
        .unwrap();
    let worker = &docs
        .iter()
        .find(|(f, d)| f == "worker.yaml" && d["kind"] == "Deployment")
        .unwrap()
        .1;
    let worker_name = worker["metadata"]["name"].as_str().unwrap();
    let command: Vec<&str> = worker["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(
        !command.contains(&"--group"),
        "the worker joins the default group, which KEDA watches"
    );
    let help = Command::new(edow_testkit::workspace_binary("edow-worker", "worker"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();

    let keda = parse("keda.yaml");
    let scaled = keda.iter().find(|d| d["kind"] == "ScaledObject").unwrap();
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], worker_name);
    assert_eq!(scaled["spec"]["maxReplicaCount"].as_u64(), Some(partitions));
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    let group = trigger["metadata"]["consumerGroup"].as_str().unwrap();
    assert!(
        help.contains(&format!("[default: {group}]")),
        "KEDA watches {group}, not the worker's default group"
    );
    assert_eq!(
        trigger["metadata"]["bootstrapServers"].as_str(),
        config["data"]["EDOW_BOOTSTRAP_SERVERS"].as_str()
    );
    let auth_name = trigger["authenticationRef"]["name"].as_str().unwrap();
    let auth = keda
        .iter()
        .find(|d| d["kind"] == "TriggerAuthentication" && d["metadata"]["name"] == auth_name)
        .expect("the trigger's TriggerAuthentication is defined");
    for reference in auth["spec"]["secretTargetRef"].as_sequence().unwrap() {
        assert_eq!(
            reference["name"], "edow-kafka-worker",
            "KEDA authenticates as the worker's principal, from its Secret"
        );
    }

    let hpa = &parse("hpa.yaml")[0];
    assert_eq!(hpa["kind"], "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], worker_name);
    assert_eq!(hpa["spec"]["maxReplicas"].as_u64(), Some(partitions));
    let metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        .as_str()
        .unwrap();
    assert_eq!(metric, edow_telemetry::metrics::CONSUMER_LAG_NAME);
}

/// Kubernetes waits for a draining worker: the pod's grace period covers the worker's shutdown grace, with room
/// for the last commit and leaving the group.
#[test]
fn k8s_gives_a_draining_worker_the_time_its_shutdown_grace_needs() {
    let docs = k8s_documents();
    let worker = &docs
        .iter()
        .find(|(f, d)| f == "worker.yaml" && d["kind"] == "Deployment")
        .unwrap()
        .1;
    let pod = &worker["spec"]["template"]["spec"];
    let period = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let grace = pod["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "EDOW_SHUTDOWN_GRACE")
        .and_then(|e| e["value"].as_str())
        .expect("worker.yaml sets EDOW_SHUTDOWN_GRACE");
    let grace = humantime::parse_duration(grace).unwrap().as_secs();
    assert!(
        period >= grace + 10,
        "terminationGracePeriodSeconds {period} leaves less than 10 s beyond the shutdown grace of {grace} s"
    );
}
