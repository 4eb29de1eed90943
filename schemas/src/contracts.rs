//! Rust types for the Avro contracts in `schemas/avro/`. The `.avsc` files are the source of truth: each type is
//! bound to its file with [`contract!`], and tests prove every type round-trips through its schema.
//!
//! Payloads that the user defines (workflow input, task input and output) travel as JSON documents inside
//! Avro strings, so a workflow's data can change without a schema change; everything edow itself reads is typed.

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A type with an Avro schema registered in the schema registry.
pub trait Contract: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Full name of the Avro record, e.g. `io.edow.events.WorkflowTrigger`.
    const NAME: &'static str;
    /// The `.avsc` text.
    const SCHEMA_TEXT: &'static str;
    /// The parsed schema, parsed once.
    fn schema() -> &'static Schema;
    /// A writer of the schema's binary datums straight from the Rust type (no intermediate Avro value), built
    /// once.
    fn writer() -> &'static GenericDatumWriter<'static>;
}

macro_rules! contract {
    ($ty:ident, $file:literal) => {
        impl Contract for $ty {
            const NAME: &'static str = concat!("io.edow.events.", stringify!($ty));
            const SCHEMA_TEXT: &'static str = include_str!(concat!("../avro/", $file));
            fn schema() -> &'static Schema {
                static SCHEMA: OnceLock<Schema> = OnceLock::new();
                SCHEMA.get_or_init(|| {
                    Schema::parse_str(Self::SCHEMA_TEXT)
                        .unwrap_or_else(|e| panic!("schemas/avro/{} is not valid Avro: {e}", $file))
                })
            }
            fn writer() -> &'static GenericDatumWriter<'static> {
                static WRITER: OnceLock<GenericDatumWriter<'static>> = OnceLock::new();
                WRITER.get_or_init(|| {
                    GenericDatumWriter::builder(Self::schema())
                        .build()
                        .unwrap_or_else(|e| {
                            panic!("schemas/avro/{} has unresolved names: {e}", $file)
                        })
                })
            }
        }
    };
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowTrigger {
    pub workflow_id: String,
    pub workflow_name: String,
    pub workflow_version: Option<i32>,
    pub input: String,
    pub idempotency_key: Option<String>,
    pub correlation_id: Option<String>,
    pub priority: i32,
    pub requested_at: i64,
    pub attributes: HashMap<String, String>,
}
contract!(WorkflowTrigger, "workflow_trigger.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SignalKind {
    Signal,
    Cancel,
    /// A kind added after this build was made.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSignal {
    pub signal_id: String,
    pub workflow_id: String,
    pub kind: SignalKind,
    pub name: Option<String>,
    pub payload: String,
    pub correlation_id: Option<String>,
    pub sent_at: i64,
}
contract!(WorkflowSignal, "workflow_signal.avsc");

impl WorkflowSignal {
    /// The payload as text: a JSON string's content, or the JSON itself.
    pub fn payload_text(&self) -> String {
        match serde_json::from_str::<serde_json::Value>(&self.payload) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Null) => String::new(),
            _ => self.payload.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequested {
    pub task_id: String,
    pub workflow_id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub step: String,
    pub task_type: String,
    pub attempt: i32,
    pub input: String,
    pub deadline_at: Option<i64>,
    pub priority: i32,
    pub correlation_id: Option<String>,
    pub requested_at: i64,
}
contract!(TaskRequested, "task_requested.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Completed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: String,
    pub workflow_id: String,
    pub step: String,
    pub attempt: i32,
    pub status: TaskStatus,
    pub output: Option<String>,
    pub error: Option<TaskError>,
    pub worker_id: String,
    pub started_at: i64,
    pub finished_at: i64,
}
contract!(TaskResult, "task_result.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LifecycleKind {
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
    /// A kind added after this build was made.
    Unknown,
    WorkflowFiltered,
    CompensationFailed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    pub event_id: String,
    pub workflow_id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub kind: LifecycleKind,
    pub step: Option<String>,
    pub attempt: Option<i32>,
    pub detail: Option<String>,
    pub correlation_id: Option<String>,
    pub at: i64,
}
contract!(LifecycleEvent, "lifecycle_event.avsc");

impl LifecycleKind {
    /// Whether this event ends its workflow (successfully or not).
    pub fn ends_workflow(self) -> bool {
        matches!(
            self,
            LifecycleKind::WorkflowCompleted
                | LifecycleKind::WorkflowFailed
                | LifecycleKind::WorkflowCancelled
                | LifecycleKind::WorkflowCompensated
                | LifecycleKind::WorkflowFiltered
                | LifecycleKind::CompensationFailed
        )
    }

    /// Whether this event ends its workflow with its work done (completed, or ended early by a filter).
    pub fn is_success(self) -> bool {
        matches!(
            self,
            LifecycleKind::WorkflowCompleted | LifecycleKind::WorkflowFiltered
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkflowStatus {
    Running,
    Completed,
    Failed,
    Cancelled,
    Compensating,
    Compensated,
    CompensationFailed,
    Filtered,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowState {
    pub workflow_id: String,
    pub workflow_name: String,
    pub workflow_version: i32,
    pub status: WorkflowStatus,
    pub input: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub correlation_id: Option<String>,
    pub sequence: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub engine_state_version: i32,
    pub engine_state: String,
}
contract!(WorkflowState, "workflow_state.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub origin_topic: String,
    pub origin_partition: i32,
    pub origin_offset: i64,
    pub origin_timestamp: Option<i64>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, AvroBytes>,
    pub error_kind: String,
    pub error: String,
    pub attempts: i32,
    pub first_failed_at: i64,
    pub dead_lettered_at: i64,
    pub service: String,
}
contract!(DeadLetter, "dead_letter.avsc");

/// Bytes that serialise as Avro `bytes` (serde's default for `Vec<u8>` is an array of ints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AvroBytes(#[serde(with = "apache_avro::serde::bytes")] pub Vec<u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DefinitionFormat {
    Yaml,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowDefinition {
    pub name: String,
    pub version: i32,
    pub format: DefinitionFormat,
    pub source: String,
    pub description: Option<String>,
    pub deployed_by: Option<String>,
    pub deployed_at: i64,
}
contract!(WorkflowDefinition, "workflow_definition.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    pub workflow_name: String,
    pub workflow_version: Option<i32>,
    pub cron: String,
    pub time_zone: String,
    pub input: String,
    pub catch_up: String,
    pub catch_up_window_ms: i64,
    pub source: String,
    pub created_at: i64,
    pub fired_through: Option<i64>,
}
contract!(Schedule, "schedule.avsc");

/// Every contract's full name and schema text, for registration and checks.
pub const ALL: &[(&str, &str)] = &[
    (WorkflowTrigger::NAME, WorkflowTrigger::SCHEMA_TEXT),
    (WorkflowSignal::NAME, WorkflowSignal::SCHEMA_TEXT),
    (TaskRequested::NAME, TaskRequested::SCHEMA_TEXT),
    (TaskResult::NAME, TaskResult::SCHEMA_TEXT),
    (LifecycleEvent::NAME, LifecycleEvent::SCHEMA_TEXT),
    (WorkflowState::NAME, WorkflowState::SCHEMA_TEXT),
    (DeadLetter::NAME, DeadLetter::SCHEMA_TEXT),
    (WorkflowDefinition::NAME, WorkflowDefinition::SCHEMA_TEXT),
    (Schedule::NAME, Schedule::SCHEMA_TEXT),
];

/// The contract written to each of the fixed topics (task and dead-letter topics are per type and per origin,
/// and get their subjects when first written).
pub fn fixed_topic_contracts(topics: &crate::Topics) -> Vec<(String, &'static str, &'static str)> {
    vec![
        (
            topics.triggers(),
            WorkflowTrigger::NAME,
            WorkflowTrigger::SCHEMA_TEXT,
        ),
        (
            topics.signals(),
            WorkflowSignal::NAME,
            WorkflowSignal::SCHEMA_TEXT,
        ),
        (topics.results(), TaskResult::NAME, TaskResult::SCHEMA_TEXT),
        (
            topics.state(),
            WorkflowState::NAME,
            WorkflowState::SCHEMA_TEXT,
        ),
        (
            topics.events(),
            LifecycleEvent::NAME,
            LifecycleEvent::SCHEMA_TEXT,
        ),
        (
            topics.definitions(),
            WorkflowDefinition::NAME,
            WorkflowDefinition::SCHEMA_TEXT,
        ),
        (topics.schedules(), Schedule::NAME, Schedule::SCHEMA_TEXT),
    ]
}
