//! What an orchestrator instance holds for one owned partition: the running workflow instances whose changelog
//! lives in it, their timers, the ids of workflows that ended (for deduplication until they are purged), and where
//! the partition's lifecycle events end. Also the changelog record format.
//!
//! Memory is proportional to what runs: an ended workflow's state leaves memory once its last change is produced,
//! leaving only its id and end time in [`Ended`], which is itself bounded in count and time. When an id leaves
//! `Ended`, a tombstone removes the workflow from the changelog too.
//!
//! Each changelog record carries an outbox: the commands of the instance's last change. Outputs are produced only
//! after the changelog record is acknowledged, so after a crash the outbox tells a restoring instance what may not
//! have been produced; it checks the co-partitioned events topic for those event ids and re-produces only what is
//! missing. That is how a crash neither loses a step nor emits a lifecycle event twice.

use std::collections::{BTreeSet, HashMap, VecDeque};

use edow_engine::{Command, Instance, Millis, Status};
use edow_schemas::contracts::{WorkflowSignal, WorkflowState, WorkflowStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Key of the partition's marker record in the changelog (see [`Marker`]).
pub const MARKER_KEY: &str = "__edow.partition";
/// Header carrying the owner epoch on every changelog record.
pub const EPOCH_HEADER: &str = "edow.epoch";

/// The partition's marker, kept in the changelog under [`MARKER_KEY`]. An owner writes one when it restores the
/// partition, with an epoch above every epoch in the log, and after each batch whose outputs are all
/// acknowledged. At restore it bounds the work: outboxes of records below `outboxes_done_below` were produced and
/// need no check, and a record carrying an older epoch than a marker before it was written by an instance that
/// had already lost the partition (a zombie).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub epoch: u64,
    pub outboxes_done_below: i64,
}

impl Marker {
    pub fn to_record(&self, now: Millis) -> WorkflowState {
        let epoch = i64::try_from(self.epoch).unwrap_or(i64::MAX);
        internal_record(MARKER_KEY, MARKER_KEY, epoch, now, now, ("marker", self))
    }

    pub fn from_record(record: &WorkflowState) -> Result<Marker, String> {
        internal_state(record, "marker")
    }
}

/// A changelog record of edow's own (a partition marker, early signals) in the `WorkflowState` contract, its
/// content under `field` of `engine_state`.
fn internal_record(
    key: &str,
    name: &str,
    sequence: i64,
    created_at: Millis,
    now: Millis,
    (field, content): (&str, &impl Serialize),
) -> WorkflowState {
    WorkflowState {
        workflow_id: key.into(),
        workflow_name: name.into(),
        workflow_version: 0,
        status: WorkflowStatus::Running,
        input: "null".into(),
        output: None,
        error: None,
        correlation_id: None,
        sequence,
        created_at,
        updated_at: now,
        engine_state_version: ENGINE_STATE_VERSION,
        engine_state: serde_json::json!({ field: content }).to_string(),
    }
}

/// The content under `field` of an internal record's `engine_state`.
fn internal_state<T: serde::de::DeserializeOwned>(
    record: &WorkflowState,
    field: &str,
) -> Result<T, String> {
    let mut state: Value = serde_json::from_str(&record.engine_state).map_err(|e| {
        format!(
            "the {field} record of {} is unreadable: {e}",
            record.workflow_id
        )
    })?;
    serde_json::from_value(state[field].take()).map_err(|e| {
        format!(
            "the {field} record of {} is unreadable: {e}",
            record.workflow_id
        )
    })
}

/// `workflow_name` of a changelog record that holds early signals instead of a workflow (see [`Early`]).
pub const EARLY_NAME: &str = "__edow.early";

/// Signals and cancels that arrived before their workflow's trigger (a cancel racing a start, a parent
/// cancelling a child whose trigger is still queued). Kept in the changelog under the workflow's id until it
/// starts, then applied in arrival order; dead-lettered when it has not started within the configured time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Early {
    pub first_at: Millis,
    pub signals: Vec<EarlySignal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlySignal {
    pub partition: i32,
    pub offset: i64,
    pub signal: WorkflowSignal,
}

impl Early {
    /// An upper bound of the bytes one signal adds to the record (JSON escaping at most doubles text).
    pub fn signal_bytes(signal: &WorkflowSignal) -> usize {
        let text = signal.payload.len()
            + signal.signal_id.len()
            + signal.workflow_id.len()
            + signal.name.as_ref().map_or(0, String::len)
            + signal.correlation_id.as_ref().map_or(0, String::len);
        2 * text + 200
    }

    /// An upper bound of the size of this record, for the bound per workflow.
    pub fn record_bytes(&self) -> usize {
        self.signals
            .iter()
            .map(|s| Early::signal_bytes(&s.signal))
            .sum()
    }

    pub fn to_record(&self, workflow_id: &str, now: Millis) -> WorkflowState {
        internal_record(
            workflow_id,
            EARLY_NAME,
            0,
            self.first_at,
            now,
            ("early", self),
        )
    }

    pub fn from_record(record: &WorkflowState) -> Result<Early, String> {
        internal_state(record, "early")
    }
}

/// Version of the `engine_state` JSON layout.
pub const ENGINE_STATE_VERSION: i32 = 1;

/// Deepest engine state read back: inputs of at most 64 levels inside a tree of at most 16 nested blocks, each
/// taking a handful of levels, stays well below it; the bound only keeps a hostile record from overflowing the stack.
const MAX_STATE_DEPTH: usize = 256;

/// Commands of an instance's last change that may not have been produced yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outbox {
    pub commands: Vec<Command>,
    /// End offset of the partition's events before these commands' events were produced.
    pub events_from: i64,
}

/// The `engine_state` of a changelog record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub instance: Instance,
    #[serde(default)]
    pub outbox: Outbox,
}

impl Persisted {
    pub fn to_record(&self) -> WorkflowState {
        let i = &self.instance;
        WorkflowState {
            workflow_id: i.workflow_id.clone(),
            workflow_name: i.workflow_name.clone(),
            workflow_version: i.workflow_version,
            status: match i.status {
                Status::Running => WorkflowStatus::Running,
                Status::Compensating => WorkflowStatus::Compensating,
                Status::Completed => WorkflowStatus::Completed,
                Status::Failed => WorkflowStatus::Failed,
                Status::Cancelled => WorkflowStatus::Cancelled,
                Status::Compensated => WorkflowStatus::Compensated,
                Status::CompensationFailed => WorkflowStatus::CompensationFailed,
                Status::Filtered => WorkflowStatus::Filtered,
            },
            input: i.input.to_string(),
            output: i.output.as_ref().map(|o| o.to_string()),
            error: i.error.clone(),
            correlation_id: i.correlation_id.clone(),
            sequence: i.sequence,
            created_at: i.created_at,
            updated_at: i.updated_at,
            engine_state_version: ENGINE_STATE_VERSION,
            engine_state: self.engine_state(),
        }
    }

    /// The engine's part of the record, with each payload once: the workflow input and output are the record's
    /// typed `input` and `output` fields, and a dispatched task's input is in the running tree.
    fn engine_state(&self) -> String {
        let Ok(mut state) = serde_json::to_value(self) else {
            return String::new();
        };
        for field in ["/instance/input", "/instance/output"] {
            if let Some(value) = state.pointer_mut(field) {
                *value = Value::Null;
            }
        }
        if let Some(Value::Array(commands)) = state.pointer_mut("/outbox/commands") {
            for command in commands {
                if let Some(input) = command.pointer_mut("/Dispatch/input") {
                    *input = Value::Null;
                }
            }
        }
        state.to_string()
    }

    pub fn from_record(record: &WorkflowState) -> Result<Persisted, String> {
        if record.engine_state_version != ENGINE_STATE_VERSION {
            return Err(format!(
                "engine_state_version {} is not understood by this orchestrator (it reads {ENGINE_STATE_VERSION}); \
                 upgrade the orchestrator",
                record.engine_state_version
            ));
        }
        // Inputs are at most `max_json_depth` deep and definitions `max_definition_depth`, but the engine's tree
        // adds levels of its own; a bounded scan first, then a parse without serde_json's 128-level cap.
        let depth = edow_engine::limits::json_depth(&record.engine_state);
        if depth > MAX_STATE_DEPTH {
            return Err(format!(
                "engine_state nests {depth} levels deep, more than the {MAX_STATE_DEPTH} any state of this \
                 orchestrator has"
            ));
        }
        let mut deserializer = serde_json::Deserializer::from_str(&record.engine_state);
        deserializer.disable_recursion_limit();
        let mut persisted = Persisted::deserialize(&mut deserializer)
            .map_err(|e| format!("engine_state is unreadable: {e}"))?;
        persisted.instance.input = serde_json::from_str(&record.input)
            .map_err(|e| format!("the record's input is not JSON: {e}"))?;
        persisted.instance.output = match &record.output {
            Some(output) => Some(
                serde_json::from_str(output)
                    .map_err(|e| format!("the record's output is not JSON: {e}"))?,
            ),
            None => None,
        };
        let instance = &persisted.instance;
        // A dispatch whose attempt no longer runs would be answered and ignored: it is dropped, not re-sent.
        persisted
            .outbox
            .commands
            .retain_mut(|command| match command {
                Command::Dispatch(dispatch) => match instance.running_task_input(&dispatch.task_id)
                {
                    Some(input) => {
                        dispatch.input = input.clone();
                        true
                    }
                    None => false,
                },
                _ => true,
            });
        Ok(persisted)
    }
}

/// Ids of ended workflows, oldest end first: a trigger naming one starts nothing, a late result or signal for
/// one is dropped quietly. Kept until `retention` after the end, and at most `capacity` of them.
#[derive(Default)]
pub struct Ended {
    by_id: HashMap<String, Millis>,
    order: VecDeque<(Millis, String)>,
}

impl Ended {
    pub fn insert(&mut self, id: String, ended_at: Millis) {
        if self.by_id.insert(id.clone(), ended_at).is_none() {
            // Ends arrive in time order but for clock skew between instances; a slightly unsorted queue only
            // delays a purge until the entry in front of it is due.
            self.order.push_back((ended_at, id));
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Removes and returns the ids ended at or before `cutoff`, and the oldest beyond `capacity`.
    pub fn take_expired(&mut self, cutoff: Millis, capacity: usize) -> Vec<String> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.order.front() {
            if *at > cutoff && self.by_id.len() <= capacity {
                break;
            }
            let Some((_, id)) = self.order.pop_front() else {
                break;
            };
            self.by_id.remove(&id);
            expired.push(id);
        }
        expired
    }
}

/// The instances of one owned partition.
#[derive(Default)]
pub struct PartitionState {
    /// Workflows that have not ended, and ended ones whose last change is still being produced.
    pub instances: HashMap<String, Persisted>,
    pub ended: Ended,
    /// Signals for workflows not started yet, by workflow id.
    pub early: HashMap<String, Early>,
    /// This owner's epoch, written on every changelog record it produces.
    pub epoch: u64,
    /// (due time, workflow id) of every pending retry.
    pub timers: BTreeSet<(Millis, String)>,
    /// Offset the next lifecycle event written to this partition gets.
    pub events_end: i64,
}

impl PartitionState {
    /// Inserts or replaces an instance, keeping its timer indexed.
    pub fn put(&mut self, persisted: Persisted) {
        let id = persisted.instance.workflow_id.clone();
        if let Some(old) = self.instances.get(&id) {
            if let Some(due) = old.instance.next_timer() {
                self.timers.remove(&(due, id.clone()));
            }
        }
        if let Some(due) = persisted.instance.next_timer() {
            self.timers.insert((due, id.clone()));
        }
        self.instances.insert(id, persisted);
    }

    /// Moves an ended instance out of memory, keeping its id in `ended`.
    pub fn retire(&mut self, id: &str) {
        let Some(persisted) = self.instances.get(id) else {
            return;
        };
        if !persisted.instance.is_terminal() {
            return;
        }
        if let Some(old) = self.instances.remove(id) {
            if let Some(due) = old.instance.next_timer() {
                self.timers.remove(&(due, id.to_string()));
            }
            self.ended.insert(id.to_string(), old.instance.updated_at);
        }
    }

    /// Whether a workflow of this id runs here or ended here and is not purged yet.
    pub fn knows(&self, id: &str) -> bool {
        self.instances.contains_key(id) || self.ended.contains(id)
    }

    /// Ids of instances with a timer due at `now` or before, removed from the timer index.
    pub fn take_due(&mut self, now: Millis) -> Vec<String> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let (_, id) = self.timers.pop_first().expect("checked non-empty");
            due.push(id);
        }
        due
    }

    pub fn running(&self) -> usize {
        self.instances
            .values()
            .filter(|p| !p.instance.is_terminal())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edow_engine::{Definition, Start};
    use serde_json::json;

    fn started(input: Value) -> Persisted {
        let definition = Definition::parse(
            "t.yaml",
            "name: t\nsteps:\n  - { name: a, task: t.a }\n  - { name: b, task: t.b }\n",
        )
        .unwrap();
        let start = Start {
            workflow_id: "w-1".into(),
            workflow_version: 1,
            input,
            correlation_id: None,
            priority: 0,
            parent: None,
            depth: 0,
        };
        let (instance, commands) = edow_engine::Instance::start(&definition, start, 1);
        Persisted {
            instance,
            outbox: Outbox {
                commands,
                events_from: 7,
            },
        }
    }

    #[test]
    fn a_record_holds_each_payload_once_and_reads_back_whole() {
        let marker = "x".repeat(10_000);
        let persisted = started(json!({ "big": marker }));
        let record = persisted.to_record();
        let copies =
            record.engine_state.matches(&marker).count() + record.input.matches(&marker).count();
        // The typed input, the root block's previous output (the input, before the first step) and the running
        // task's input; it was six before the instance input, the unused step input and the outbox's copy went.
        assert_eq!(copies, 3, "{}", record.engine_state.len());
        assert_eq!(Persisted::from_record(&record).unwrap(), persisted);
    }

    #[test]
    fn a_dispatch_whose_attempt_no_longer_runs_is_not_restored() {
        let mut persisted = started(json!(1));
        if let Some(Command::Dispatch(d)) = persisted
            .outbox
            .commands
            .iter_mut()
            .find(|c| matches!(c, Command::Dispatch(_)))
        {
            d.task_id = "w-1/a/9".into();
        }
        let restored = Persisted::from_record(&persisted.to_record()).unwrap();
        assert!(!restored
            .outbox
            .commands
            .iter()
            .any(|c| matches!(c, Command::Dispatch(_))));
    }

    #[test]
    fn hostile_engine_state_is_refused_not_panicked() {
        let mut record = started(json!(1)).to_record();
        for text in [
            "[".repeat(100_000),
            "{".repeat(300),
            "null".into(),
            "{\"instance\":5}".into(),
        ] {
            record.engine_state = text;
            assert!(Persisted::from_record(&record).is_err());
        }
    }

    #[test]
    fn markers_and_early_signals_read_back_and_are_not_workflows() {
        let marker = Marker {
            epoch: 7,
            outboxes_done_below: 123,
        };
        let record = marker.to_record(5);
        assert_eq!(Marker::from_record(&record).unwrap(), marker);
        assert!(Persisted::from_record(&record).is_err());
        let early = Early {
            first_at: 3,
            signals: vec![EarlySignal {
                partition: 1,
                offset: 9,
                signal: WorkflowSignal {
                    signal_id: "s-1".into(),
                    workflow_id: "w-9".into(),
                    kind: edow_schemas::contracts::SignalKind::Cancel,
                    name: None,
                    payload: "\"stop\"".into(),
                    correlation_id: None,
                    sent_at: 2,
                },
            }],
        };
        let record = early.to_record("w-9", 5);
        assert_eq!(record.workflow_name, EARLY_NAME);
        assert_eq!(Early::from_record(&record).unwrap(), early);
        assert!(Persisted::from_record(&record).is_err());
    }

    #[test]
    fn ended_ids_expire_by_time_and_by_count() {
        let mut ended = Ended::default();
        for i in 0..10 {
            ended.insert(format!("w{i}"), i);
        }
        assert_eq!(ended.take_expired(2, 100), ["w0", "w1", "w2"]);
        assert_eq!(ended.take_expired(2, 5), ["w3", "w4"]);
        assert!(ended.contains("w5") && !ended.contains("w4"));
        assert_eq!(ended.len(), 5);
    }
}
