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
//! have been produced; it checks the co-partitioned events topic for those event ids, re-produces the events that
//! are missing and the tasks and workflow records again (duplicates of those are harmless). That is how a crash
//! neither loses a step nor emits a lifecycle event twice.

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

/// Header of a changelog record carrying its outbox, as JSON of [`Outbox`]; absent when the outbox is empty.
/// Kept out of the value so that the value is the workflow's state alone, which memory holds as it is.
pub const OUTBOX_HEADER: &str = "edow.outbox";
/// Header carrying the workflow's next timer in epoch ms, empty when it has none: restore indexes timers without
/// parsing states. A record without it (written before it existed) is parsed at restore instead.
pub const TIMER_HEADER: &str = "edow.timer";

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

/// A workflow instance with the commands of its last change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub instance: Instance,
    /// Read from the `engine_state` of records written before the outbox moved to [`OUTBOX_HEADER`].
    #[serde(default, skip_serializing)]
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
    /// typed `input` and `output` fields.
    fn engine_state(&self) -> String {
        let Ok(mut state) = serde_json::to_value(self) else {
            return String::new();
        };
        for field in ["/instance/input", "/instance/output"] {
            if let Some(value) = state.pointer_mut(field) {
                *value = Value::Null;
            }
        }
        state.to_string()
    }

    /// The [`OUTBOX_HEADER`] value: `None` for an empty outbox. A dispatched task's input is left out; it is in
    /// the running tree.
    pub fn outbox_header(&self) -> Option<Vec<u8>> {
        if self.outbox.commands.is_empty() {
            return None;
        }
        let mut outbox = serde_json::to_value(&self.outbox).ok()?;
        if let Some(Value::Array(commands)) = outbox.pointer_mut("/commands") {
            for command in commands {
                if let Some(input) = command.pointer_mut("/Dispatch/input") {
                    *input = Value::Null;
                }
            }
        }
        serde_json::to_vec(&outbox).ok()
    }

    /// The [`TIMER_HEADER`] value.
    pub fn timer_header(&self) -> Vec<u8> {
        self.instance
            .next_timer()
            .map(|due| due.to_string().into_bytes())
            .unwrap_or_default()
    }

    /// A record read back, with the value of its [`OUTBOX_HEADER`] if it had one.
    pub fn from_record(record: &WorkflowState, outbox: Option<&[u8]>) -> Result<Persisted, String> {
        check_version(record.engine_state_version)?;
        let mut persisted = parse_state(
            &record.engine_state,
            &record.input,
            record.output.as_deref(),
        )?;
        if let Some(outbox) = outbox {
            match serde_json::from_slice(outbox) {
                Ok(outbox) => persisted.outbox = outbox,
                // The state is still good: keeping the workflow without the outbox loses less than dropping it.
                Err(e) => tracing::error!(
                    workflow_id = %record.workflow_id,
                    "the changelog record's outbox is unreadable ({e}); what it held is not produced again"
                ),
            }
        }
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

fn check_version(version: i32) -> Result<(), String> {
    if version != ENGINE_STATE_VERSION {
        return Err(format!(
            "engine_state_version {version} is not understood by this orchestrator (it reads \
             {ENGINE_STATE_VERSION}); upgrade the orchestrator"
        ));
    }
    Ok(())
}

/// Parses an `engine_state` and the typed input and output of its record.
fn parse_state(engine_state: &str, input: &str, output: Option<&str>) -> Result<Persisted, String> {
    // Inputs are at most `max_json_depth` deep and definitions `max_definition_depth`, but the engine's tree
    // adds levels of its own; a bounded scan first, then a parse without serde_json's 128-level cap.
    let depth = edow_engine::limits::json_depth(engine_state);
    if depth > MAX_STATE_DEPTH {
        return Err(format!(
            "engine_state nests {depth} levels deep, more than the {MAX_STATE_DEPTH} any state of this \
             orchestrator has"
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_str(engine_state);
    deserializer.disable_recursion_limit();
    let mut persisted = Persisted::deserialize(&mut deserializer)
        .map_err(|e| format!("engine_state is unreadable: {e}"))?;
    persisted.instance.input =
        serde_json::from_str(input).map_err(|e| format!("the record's input is not JSON: {e}"))?;
    persisted.instance.output = match output {
        Some(output) => Some(
            serde_json::from_str(output)
                .map_err(|e| format!("the record's output is not JSON: {e}"))?,
        ),
        None => None,
    };
    Ok(persisted)
}

/// A running workflow at rest, as the text of its last changelog record: parsed again when an input or timer
/// reaches it. The parsed tree takes several times the memory of its text, and a parse costs microseconds, so
/// holding text is what keeps memory per in-flight workflow small, and what lets restore skip parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    engine_state: Box<str>,
    input: Box<str>,
    output: Option<Box<str>>,
    next_timer: Option<Millis>,
}

impl Packed {
    /// The packed form of a record whose outbox is produced. Only the version is checked here; the state is
    /// parsed (and checked) when it is first needed.
    pub fn from_record(
        record: WorkflowState,
        next_timer: Option<Millis>,
    ) -> Result<Packed, String> {
        check_version(record.engine_state_version)?;
        Ok(Packed {
            engine_state: record.engine_state.into_boxed_str(),
            input: record.input.into_boxed_str(),
            output: record.output.map(String::into_boxed_str),
            next_timer,
        })
    }

    /// The instance, with an empty outbox (a packed workflow's outbox was produced).
    pub fn unpack(&self) -> Result<Persisted, String> {
        let mut persisted = parse_state(&self.engine_state, &self.input, self.output.as_deref())?;
        persisted.outbox = Outbox::default();
        Ok(persisted)
    }

    /// Bytes of text held.
    pub fn text_bytes(&self) -> usize {
        self.engine_state.len() + self.input.len() + self.output.as_ref().map_or(0, |o| o.len())
    }
}

/// How a partition holds one workflow.
#[derive(Debug, Clone)]
pub enum Held {
    /// Changed by the batch in hand (or restored with an outbox to produce again): parsed, with its outbox.
    Live(Box<Persisted>),
    /// At rest: see [`Packed`].
    Packed(Packed),
}

impl Held {
    fn next_timer(&self) -> Option<Millis> {
        match self {
            Held::Live(persisted) => persisted.instance.next_timer(),
            Held::Packed(packed) => packed.next_timer,
        }
    }

    fn is_terminal(&self) -> bool {
        match self {
            Held::Live(persisted) => persisted.instance.is_terminal(),
            // Only running workflows are packed.
            Held::Packed(_) => false,
        }
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
    instances: HashMap<String, Held>,
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
    /// Inserts or replaces an instance, parsed (see [`Held::Live`]), keeping its timer indexed.
    pub fn put(&mut self, persisted: Persisted) {
        let id = persisted.instance.workflow_id.clone();
        self.hold(id, Held::Live(Box::new(persisted)));
    }

    /// Inserts or replaces a workflow at rest.
    pub fn put_packed(&mut self, id: String, packed: Packed) {
        self.hold(id, Held::Packed(packed));
    }

    fn hold(&mut self, id: String, held: Held) {
        if let Some(due) = self.instances.get(&id).and_then(Held::next_timer) {
            self.timers.remove(&(due, id.clone()));
        }
        if let Some(due) = held.next_timer() {
            self.timers.insert((due, id.clone()));
        }
        self.instances.insert(id, held);
    }

    /// A parsed copy of workflow `id`: `None` when it is not held, `Some(Err)` when its stored state cannot be
    /// read (the workflow is kept as it is; an orchestrator that understands it can go on with it).
    pub fn get(&self, id: &str) -> Option<Result<Persisted, String>> {
        Some(match self.instances.get(id)? {
            Held::Live(persisted) => Ok(persisted.as_ref().clone()),
            Held::Packed(packed) => packed.unpack(),
        })
    }

    /// Workflow `id` if it was changed by the batch in hand (and so is parsed).
    pub fn live(&self, id: &str) -> Option<&Persisted> {
        match self.instances.get(id)? {
            Held::Live(persisted) => Some(persisted),
            Held::Packed(_) => None,
        }
    }

    pub fn live_mut(&mut self, id: &str) -> Option<&mut Persisted> {
        match self.instances.get_mut(id)? {
            Held::Live(persisted) => Some(persisted),
            Held::Packed(_) => None,
        }
    }

    /// Ids of the parsed workflows.
    pub fn live_ids(&self) -> Vec<String> {
        self.instances
            .iter()
            .filter(|(_, held)| matches!(held, Held::Live(_)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of the parsed workflows that have an outbox.
    pub fn with_outbox(&self) -> Vec<String> {
        self.instances
            .iter()
            .filter_map(|(id, held)| match held {
                Held::Live(p) if !p.outbox.commands.is_empty() => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    /// After its outbox is produced: an ended workflow leaves memory (see [`PartitionState::retire`]), a
    /// running one is held as `packed`, the text of the record just written (made here when `None`).
    pub fn settle(&mut self, id: &str, packed: Option<Packed>) {
        match self.instances.get(id) {
            Some(held) if held.is_terminal() => self.retire(id),
            Some(Held::Live(persisted)) => {
                let packed = packed.or_else(|| {
                    Packed::from_record(persisted.to_record(), persisted.instance.next_timer()).ok()
                });
                if let Some(packed) = packed {
                    self.put_packed(id.to_string(), packed);
                }
            }
            _ => {}
        }
    }

    pub fn remove(&mut self, id: &str) {
        if let Some(old) = self.instances.remove(id) {
            if let Some(due) = old.next_timer() {
                self.timers.remove(&(due, id.to_string()));
            }
        }
    }

    /// Moves an ended instance out of memory, keeping its id in `ended`.
    pub fn retire(&mut self, id: &str) {
        let Some(Held::Live(persisted)) = self.instances.get(id) else {
            return;
        };
        if !persisted.instance.is_terminal() {
            return;
        }
        let ended_at = persisted.instance.updated_at;
        self.remove(id);
        self.ended.insert(id.to_string(), ended_at);
    }

    /// Indexes the timer of workflow `id` again, due at `due` as its parsed state says (after it was taken as due
    /// but the engine found nothing due: a packed workflow's timer came from a record header, which may be wrong).
    pub fn retime(&mut self, id: &str, due: Option<Millis>) {
        if let Some(Held::Packed(packed)) = self.instances.get_mut(id) {
            packed.next_timer = due;
        }
        if let Some(due) = due {
            self.timers.insert((due, id.to_string()));
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
            let Some((_, id)) = self.timers.pop_first() else {
                break;
            };
            due.push(id);
        }
        due
    }

    /// Workflows held: running ones, and ended ones whose last change is being produced.
    pub fn held(&self) -> usize {
        self.instances.len()
    }

    pub fn running(&self) -> usize {
        self.instances.values().filter(|h| !h.is_terminal()).count()
    }

    /// Ids and end times of the ended workflows still held, oldest end first.
    pub fn ended_held(&self) -> Vec<(Millis, String)> {
        let mut ended: Vec<(Millis, String)> = self
            .instances
            .iter()
            .filter_map(|(id, held)| match held {
                Held::Live(p) if p.instance.is_terminal() => {
                    Some((p.instance.updated_at, id.clone()))
                }
                _ => None,
            })
            .collect();
        ended.sort();
        ended
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
        let outbox = persisted.outbox_header().unwrap();
        let copies = record.engine_state.matches(&marker).count()
            + record.input.matches(&marker).count()
            + String::from_utf8_lossy(&outbox).matches(&marker).count();
        // The typed input, the root block's previous output (the input, before the first step) and the running
        // task's input; it was six before the instance input, the unused step input and the outbox's copy went.
        assert_eq!(copies, 3, "{}", record.engine_state.len());
        assert!(!record.engine_state.contains("outbox"));
        assert_eq!(
            Persisted::from_record(&record, Some(&outbox)).unwrap(),
            persisted
        );
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
        let outbox = persisted.outbox_header();
        let restored = Persisted::from_record(&persisted.to_record(), outbox.as_deref()).unwrap();
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
            assert!(Persisted::from_record(&record, None).is_err());
        }
    }

    #[test]
    fn records_written_with_the_outbox_in_the_state_still_read_back() {
        let persisted = started(json!({ "a": 1 }));
        let mut record = persisted.to_record();
        let mut state: Value = serde_json::from_str(&record.engine_state).unwrap();
        state["outbox"] = serde_json::from_slice(&persisted.outbox_header().unwrap()).unwrap();
        record.engine_state = state.to_string();
        assert_eq!(Persisted::from_record(&record, None).unwrap(), persisted);
    }

    #[test]
    fn a_packed_workflow_unpacks_to_its_state_without_the_produced_outbox() {
        let persisted = started(json!({ "a": [1, 2, 3] }));
        let packed = Packed::from_record(persisted.to_record(), None).unwrap();
        let unpacked = packed.unpack().unwrap();
        assert_eq!(unpacked.instance, persisted.instance);
        assert!(unpacked.outbox.commands.is_empty());
        // The text is what memory holds: far smaller than the parsed tree, and without the outbox.
        assert!(packed.text_bytes() < 1_000, "{}", packed.text_bytes());
        let mut newer = persisted.to_record();
        newer.engine_state_version = ENGINE_STATE_VERSION + 1;
        assert!(Packed::from_record(newer, None).is_err());
        let mut garbage = persisted.to_record();
        garbage.engine_state = "{".repeat(300);
        assert!(Packed::from_record(garbage, None)
            .unwrap()
            .unpack()
            .is_err());
    }

    #[test]
    fn a_produced_workflow_is_held_packed_with_its_timer_indexed() {
        let definition = Definition::parse(
            "t.yaml",
            "name: t\nsteps:\n  - { name: a, task: t.a, timeout: 5s }\n",
        )
        .unwrap();
        let start = Start {
            workflow_id: "w-2".into(),
            workflow_version: 1,
            input: json!(null),
            correlation_id: None,
            priority: 0,
            parent: None,
            depth: 0,
        };
        let (instance, commands) = edow_engine::Instance::start(&definition, start, 1_000);
        let due = instance.next_timer().unwrap();
        let persisted = Persisted {
            instance,
            outbox: Outbox {
                commands,
                events_from: 0,
            },
        };
        assert_eq!(persisted.timer_header(), due.to_string().into_bytes());
        let mut state = PartitionState::default();
        state.put(persisted.clone());
        assert_eq!(state.with_outbox(), ["w-2"]);
        state.settle("w-2", None);
        assert!(state.live("w-2").is_none() && state.with_outbox().is_empty());
        assert_eq!(
            state.get("w-2").unwrap().unwrap().instance,
            persisted.instance
        );
        assert_eq!(state.take_due(due), ["w-2"]);
        state.retime("w-2", Some(due + 1));
        assert!(state.take_due(due).is_empty());
        assert_eq!(state.take_due(due + 1), ["w-2"]);
        state.retime("w-2", Some(due));
        state.remove("w-2");
        assert!(state.take_due(due).is_empty() && !state.knows("w-2"));
    }

    #[test]
    fn markers_and_early_signals_read_back_and_are_not_workflows() {
        let marker = Marker {
            epoch: 7,
            outboxes_done_below: 123,
        };
        let record = marker.to_record(5);
        assert_eq!(Marker::from_record(&record).unwrap(), marker);
        assert!(Persisted::from_record(&record, None).is_err());
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
        assert!(Persisted::from_record(&record, None).is_err());
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
