//! edow's contracts: the Avro schemas every event is written with (`schemas/avro/*.avsc`), their Rust types, the
//! topic layout, and the codec for the Confluent wire format through a schema registry.

pub mod codec;
pub mod contracts;
pub mod topics;

pub use codec::{Codec, CodecError};
pub use contracts::Contract;
pub use topics::Topics;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;

    use crate::codec::{from_contract_value, to_contract_value};
    use crate::contracts::*;

    /// Writes `item` as an Avro datum with its schema and reads it back; the codec's direct writer (straight
    /// from the type) writes the same bytes as the path through an Avro value. (Maps hold one entry in the
    /// fixtures: with more, the two paths may write entries in different orders, which decode the same.)
    fn round_trip<T: Contract + PartialEq + std::fmt::Debug>(item: T) {
        let value = to_contract_value(&item).expect("item fits its schema");
        let bytes = GenericDatumWriter::builder(T::schema())
            .build()
            .and_then(|w| w.write_value_to_vec(value))
            .expect("datum encodes");
        let direct = T::writer()
            .write_ser_to_vec(&item)
            .expect("the type writes directly");
        assert_eq!(
            direct,
            bytes,
            "{}: direct and value-path datums differ",
            T::NAME
        );
        let back = GenericDatumReader::builder(T::schema())
            .build()
            .and_then(|r| r.read_value(&mut bytes.as_slice()))
            .expect("datum decodes");
        let decoded: T = from_contract_value(&back).expect("value converts back");
        assert_eq!(decoded, item);
    }

    #[test]
    fn every_schema_parses_and_is_documented_and_namespaced() {
        for (name, text) in ALL {
            let schema =
                apache_avro::Schema::parse_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let json: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(json["namespace"], "io.edow.events", "{name}");
            assert!(
                json["doc"].as_str().is_some_and(|d| !d.is_empty()),
                "{name} has no doc"
            );
            assert_eq!(
                format!(
                    "{}.{}",
                    json["namespace"].as_str().unwrap(),
                    json["name"].as_str().unwrap()
                ),
                *name
            );
            drop(schema);
        }
    }

    #[test]
    fn optional_fields_default_to_null_so_they_can_evolve() {
        for (name, text) in ALL {
            let json: serde_json::Value = serde_json::from_str(text).unwrap();
            for field in json["fields"].as_array().unwrap() {
                if field["type"].as_array().is_some_and(|u| u[0] == "null") {
                    assert!(
                        field.get("default").is_some_and(|d| d.is_null()),
                        "{name}.{} is optional but has no null default",
                        field["name"]
                    );
                }
            }
        }
    }

    #[test]
    fn every_lifecycle_kind_keeps_its_symbol() {
        use LifecycleKind::*;
        for kind in [
            WorkflowStarted,
            StepStarted,
            StepCompleted,
            StepFailed,
            StepRetried,
            Compensating,
            WorkflowCompleted,
            WorkflowFailed,
            WorkflowCancelled,
            WorkflowCompensated,
            Unknown,
            WorkflowFiltered,
            CompensationFailed,
        ] {
            round_trip(LifecycleEvent {
                event_id: "e".into(),
                workflow_id: "w".into(),
                workflow_name: "n".into(),
                workflow_version: 1,
                kind,
                step: None,
                attempt: None,
                detail: None,
                correlation_id: None,
                at: 0,
            });
        }
    }

    #[test]
    fn every_contract_round_trips_through_its_schema() {
        round_trip(WorkflowTrigger {
            workflow_id: "order-1".into(),
            workflow_name: "order".into(),
            workflow_version: Some(3),
            input: r#"{"sku":"A1","qty":2}"#.into(),
            idempotency_key: None,
            correlation_id: Some("corr-9".into()),
            priority: 5,
            requested_at: 1_700_000_000_123,
            attributes: HashMap::from([("tenant".to_string(), "acme".to_string())]),
        });
        round_trip(WorkflowSignal {
            signal_id: "s-1".into(),
            workflow_id: "order-1".into(),
            kind: SignalKind::Cancel,
            name: None,
            payload: "null".into(),
            correlation_id: None,
            sent_at: 1,
        });
        round_trip(TaskRequested {
            task_id: "order-1/charge/2".into(),
            workflow_id: "order-1".into(),
            workflow_name: "order".into(),
            workflow_version: 3,
            step: "charge".into(),
            task_type: "payment.charge".into(),
            attempt: 2,
            input: "{}".into(),
            deadline_at: Some(99),
            priority: 0,
            correlation_id: None,
            requested_at: 5,
        });
        round_trip(TaskResult {
            task_id: "order-1/charge/2".into(),
            workflow_id: "order-1".into(),
            step: "charge".into(),
            attempt: 2,
            status: TaskStatus::Failed,
            output: None,
            error: Some(TaskError {
                code: "card_declined".into(),
                message: "declined".into(),
                retryable: false,
            }),
            worker_id: "w1".into(),
            started_at: 10,
            finished_at: 12,
        });
        round_trip(LifecycleEvent {
            event_id: "e".into(),
            workflow_id: "order-1".into(),
            workflow_name: "order".into(),
            workflow_version: 1,
            kind: LifecycleKind::StepRetried,
            step: Some("charge".into()),
            attempt: Some(2),
            detail: None,
            correlation_id: None,
            at: 3,
        });
        round_trip(WorkflowState {
            workflow_id: "order-1".into(),
            workflow_name: "order".into(),
            workflow_version: 1,
            status: WorkflowStatus::CompensationFailed,
            input: "{}".into(),
            output: None,
            error: Some("refund failed".into()),
            correlation_id: None,
            sequence: 7,
            created_at: 1,
            updated_at: 2,
            engine_state_version: 1,
            engine_state: "{}".into(),
        });
        round_trip(DeadLetter {
            origin_topic: "edow.triggers".into(),
            origin_partition: 2,
            origin_offset: 41,
            origin_timestamp: Some(8),
            key: Some(b"order-1".to_vec()),
            value: Some(vec![0xff, 0x00, 0x10]),
            headers: HashMap::from([("traceparent".to_string(), AvroBytes(b"00-ab".to_vec()))]),
            error_kind: "not_framed".into(),
            error: "not Avro".into(),
            attempts: 1,
            first_failed_at: 8,
            dead_lettered_at: 9,
            service: "orchestrator".into(),
        });
        round_trip(WorkflowDefinition {
            name: "order".into(),
            version: 2,
            format: DefinitionFormat::Yaml,
            source: "name: order".into(),
            description: None,
            deployed_by: Some("ci".into()),
            deployed_at: 4,
        });
    }
}
