//! Schema evolution through the real registry: a reader built against version N reads records written with N-1
//! and N+1 when the change is compatible, the registry refuses an incompatible change, and records that are not
//! decodable fail with an error that says why.

use std::sync::OnceLock;

use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use edow_schemas::{Codec, CodecError, Contract};
use edow_testkit::{Broker, Registry};
use serde::{Deserialize, Serialize};

const TOPIC: &str = "evolution.orders";

macro_rules! test_contract {
    ($ty:ident, $name:literal, $schema:expr) => {
        impl Contract for $ty {
            const NAME: &'static str = $name;
            const SCHEMA_TEXT: &'static str = $schema;
            fn schema() -> &'static Schema {
                static SCHEMA: OnceLock<Schema> = OnceLock::new();
                SCHEMA.get_or_init(|| Schema::parse_str(Self::SCHEMA_TEXT).unwrap())
            }
            fn writer() -> &'static GenericDatumWriter<'static> {
                static WRITER: OnceLock<GenericDatumWriter<'static>> = OnceLock::new();
                WRITER.get_or_init(|| GenericDatumWriter::builder(Self::schema()).build().unwrap())
            }
        }
    };
}

/// Version 1 of a contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderV1 {
    id: String,
    qty: i32,
}
test_contract!(
    OrderV1,
    "t.Order",
    r#"{"type":"record","name":"Order","namespace":"t","fields":[
        {"name":"id","type":"string"},{"name":"qty","type":"int"}]}"#
);

/// Version 2: adds an optional field with a default, a BACKWARD (and FORWARD) compatible change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderV2 {
    id: String,
    qty: i32,
    note: Option<String>,
}
test_contract!(
    OrderV2,
    "t.Order",
    r#"{"type":"record","name":"Order","namespace":"t","fields":[
        {"name":"id","type":"string"},{"name":"qty","type":"int"},
        {"name":"note","type":["null","string"],"default":null}]}"#
);

/// An incompatible change: a new required field without a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderBroken {
    id: String,
    qty: i32,
    currency: String,
}
test_contract!(
    OrderBroken,
    "t.Order",
    r#"{"type":"record","name":"Order","namespace":"t","fields":[
        {"name":"id","type":"string"},{"name":"qty","type":"int"},{"name":"currency","type":"string"}]}"#
);

#[tokio::test]
async fn compatible_changes_decode_both_ways_and_incompatible_ones_are_refused() {
    let broker = Broker::start();
    let registry = Registry::start(&broker);
    let old_side = Codec::new(&registry.url()).unwrap();
    let new_side = Codec::new(&registry.url()).unwrap();

    let v1 = OrderV1 {
        id: "o-1".into(),
        qty: 3,
    };
    let written_v1 = old_side.encode(TOPIC, &v1).await.unwrap();

    // New reader, old data: the added field takes its default.
    let read_new: OrderV2 = new_side.decode(Some(&written_v1)).await.unwrap();
    assert_eq!(
        read_new,
        OrderV2 {
            id: "o-1".into(),
            qty: 3,
            note: None
        }
    );

    // New writer registers version 2; old reader, new data: the unknown field is skipped.
    let v2 = OrderV2 {
        id: "o-2".into(),
        qty: 5,
        note: Some("gift".into()),
    };
    let written_v2 = new_side.encode(TOPIC, &v2).await.unwrap();
    assert_ne!(
        written_v1[1..5],
        written_v2[1..5],
        "v2 is written with its own schema id"
    );
    let read_old: OrderV1 = old_side.decode(Some(&written_v2)).await.unwrap();
    assert_eq!(
        read_old,
        OrderV1 {
            id: "o-2".into(),
            qty: 5
        }
    );
    let same: OrderV2 = new_side.decode(Some(&written_v2)).await.unwrap();
    assert_eq!(same, v2);

    // Later records reuse the cached id and are written straight from the type.
    let again = OrderV2 {
        id: "o-4".into(),
        qty: 7,
        note: None,
    };
    let written_again = new_side.encode(TOPIC, &again).await.unwrap();
    assert_eq!(
        written_again[..5],
        written_v2[..5],
        "the cached id frames it"
    );
    let read_again: OrderV2 = old_side.decode(Some(&written_again)).await.unwrap();
    assert_eq!(read_again, again);
    // The converter behind the first record keeps one schema per subject, so a codec that wrote version 2 refuses
    // a version-1 type on that topic; what must never happen is v1's datum framed with v2's cached id.
    let err = new_side.encode(TOPIC, &v1).await.unwrap_err();
    assert_eq!(err.kind(), "encode", "{err}");

    // A required field without a default is refused by the registry under BACKWARD.
    let broken = Codec::new(&registry.url()).unwrap();
    let err = broken
        .encode(
            TOPIC,
            &OrderBroken {
                id: "o-3".into(),
                qty: 1,
                currency: "EUR".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "encode");
    let message = err.to_string();
    assert!(
        message.contains("409") || message.contains("incompatible"),
        "{message}"
    );
    assert!(message.contains("evolution.orders-value"), "{message}");

    // A reader that needs a field the writer never had cannot resolve the record: a clear error, not a panic.
    let err = broken
        .decode::<OrderBroken>(Some(&written_v1))
        .await
        .unwrap_err();
    assert!(matches!(err, CodecError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("t.Order"), "{err}");
}

#[tokio::test]
async fn undecodable_records_fail_with_what_is_wrong() {
    let broker = Broker::start();
    let registry = Registry::start(&broker);
    let codec = Codec::new(&registry.url()).unwrap();

    let err = codec
        .decode::<OrderV1>(Some(br#"{"id":"o-1"}"#))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "not_framed");
    assert!(err.to_string().contains("Confluent wire format"), "{err}");

    let err = codec.decode::<OrderV1>(None).await.unwrap_err();
    assert_eq!(err.kind(), "empty");

    let err = codec
        .decode::<OrderV1>(Some(&[0, 0, 0, 0x30, 0x39, 2, 4]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CodecError::UnknownSchema { id: 12345, .. }),
        "{err}"
    );
    assert!(!err.is_transient());

    // Framed with a real id, but the bytes are cut short.
    let good = codec
        .encode(
            TOPIC,
            &OrderV1 {
                id: "o-1".into(),
                qty: 1,
            },
        )
        .await
        .unwrap();
    let err = codec
        .decode::<OrderV1>(Some(&good[..good.len() - 2]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "undecodable", "{err}");

    // The registry gone is transient, not a reason to dead-letter.
    drop(registry);
    let fresh = Codec::new(&format!("http://127.0.0.1:{}", edow_testkit::free_port())).unwrap();
    let err = fresh.decode::<OrderV1>(Some(&good)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}
