//! The Grafana dashboard shipped in `deploy/grafana` queries only metrics edow exports, and shows every metric of
//! the orchestrator and the worker.

use std::collections::BTreeSet;

use edow_telemetry::metrics::{self, Exporter};

fn exported() -> BTreeSet<String> {
    [Exporter::Orchestrator, Exporter::Worker, Exporter::Registry]
        .into_iter()
        .flat_map(metrics::names)
        .collect()
}

fn queried() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/dashboards/edow.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("edow_") {
                    let family = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| word.strip_suffix(suffix))
                        .unwrap_or(word);
                    names.insert(family.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let exported = exported();
    let unknown: Vec<_> = queried().difference(&exported).cloned().collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries {unknown:?}, which nothing exports"
    );
}

#[test]
fn the_dashboard_shows_every_orchestrator_and_worker_metric() {
    let queried = queried();
    let missing: Vec<_> = exported()
        .into_iter()
        // The registry of docker-compose and Kubernetes is Confluent's, which exports its own metrics.
        .filter(|name| !name.starts_with("edow_registry_"))
        .filter(|name| !queried.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard does not show {missing:?}"
    );
}
