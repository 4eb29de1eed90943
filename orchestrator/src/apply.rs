//! Applying typed inputs and due timers to the engine, per owned partition. Everything here is in memory: the
//! changed instances and their outboxes are what `produce` writes next.
//!
//! Each input is checked against the [`edow_engine::Limits`] before the engine sees it. A call into the engine
//! that fails (a state that does not fit its definition) or panics (a bug) fails that one workflow with a
//! lifecycle event and dead-letters the input; the instance it worked on was a copy, so nothing half-applied is
//! kept.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use edow_engine::{
    Command, Definition, EngineError, Failure, Instance, Outcome, Start, TaskOutcome,
};
use edow_kafka::dead_letters::Reason;
use edow_schemas::contracts::{
    SignalKind, TaskError, TaskResult, TaskStatus, WorkflowSignal, WorkflowTrigger,
};
use edow_telemetry::trace::TraceContext;
use serde_json::Value;

use crate::decode::Input;
use crate::partition::{Early, EarlySignal, Outbox, Persisted};
use crate::sealing;
use crate::{BatchOutput, Orchestrator, DEPTH_ATTRIBUTE, MAX_WORKFLOW_ID_BYTES, PARENT_ATTRIBUTE};

/// How long a due timer waits before it is tried again when its definition is missing or its state unreadable.
const TIMER_RETRY_MS: i64 = 60_000;

impl Orchestrator {
    /// Applies one input to the engine. Err means the input is dead-lettered with that reason.
    pub(crate) fn apply(
        &mut self,
        partition: i32,
        offset: i64,
        input: Input,
        trace: &TraceContext,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        match input {
            Input::Trigger(trigger) => {
                let parent = parent_of(&trigger)?;
                let child = trigger.workflow_id.clone();
                let started = self.start(partition, trigger, parent.clone(), trace, now, out);
                if let (Err(reason), Some(parent)) = (&started, parent) {
                    // The parent waits for this child's end; a child that never starts must say so.
                    out.refused_children.push((parent, child, reason.clone()));
                }
                started
            }
            Input::Result(result) => self.apply_result(partition, result, now, out),
            Input::Signal(signal) => self.apply_signal(partition, offset, signal, now, out),
        }
    }

    fn start(
        &mut self,
        partition: i32,
        mut trigger: WorkflowTrigger,
        parent: Option<String>,
        trace: &TraceContext,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        let id = &trigger.workflow_id.clone();
        check_workflow_id("the trigger", id)?;
        let Some(state) = self.partitions.get(&partition) else {
            return Ok(());
        };
        if state.knows(id) {
            tracing::debug!(workflow_id = %id, "already started; trigger ignored");
            return Ok(());
        }
        let Some((version, definition)) = self
            .definitions
            .get(&trigger.workflow_name, trigger.workflow_version)
        else {
            let which = trigger
                .workflow_version
                .map_or("any version".to_string(), |v| format!("version {v}"));
            return Err(Reason::new(
                "unknown_workflow",
                format!(
                    "no workflow '{}' ({which}) is deployed; deploy it with `edow deploy FILE`, then replay this trigger",
                    trigger.workflow_name
                ),
            ));
        };
        // A child trigger this orchestrator wrote is sealed when encryption at rest is on.
        let trigger_input = sealing::open_text(
            self.config.keys.as_deref(),
            &trigger.workflow_id,
            "input",
            std::mem::take(&mut trigger.input),
        )
        .map_err(|e| Reason::new("sealed", e))?;
        self.config
            .limits
            .check_json("the trigger's input", &trigger_input)
            .map_err(|r| Reason::new(r.reason, r.message))?;
        let input: Value = serde_json::from_str(&trigger_input).map_err(|e| {
            Reason::new(
                "invalid",
                format!("the trigger's input is not a JSON document: {e}"),
            )
        })?;
        let depth = trigger
            .attributes
            .get(DEPTH_ATTRIBUTE)
            .and_then(|d| d.parse::<u32>().ok())
            .unwrap_or(0);
        let start = Start {
            workflow_id: id.clone(),
            workflow_version: version,
            input,
            correlation_id: trigger.correlation_id,
            priority: trigger.priority,
            parent,
            depth,
        };
        let started = catch_unwind(AssertUnwindSafe(|| {
            Instance::start(&definition, start, now)
        }));
        match started {
            Ok((mut instance, mut commands)) => {
                // The trigger's `process` context is the root of every record of the workflow.
                instance.trace_context = Some(trace.to_stored());
                let early = self
                    .partitions
                    .get_mut(&partition)
                    .and_then(|s| s.early.remove(id.as_str()));
                if let Some(early) = early {
                    out.early.insert((partition, id.clone()));
                    self.apply_early(&definition, &mut instance, &mut commands, early, now);
                }
                self.record_change(partition, instance, commands, out);
                Ok(())
            }
            Err(panic) => Err(Reason::new(
                "engine_error",
                format!(
                    "starting the workflow failed inside the engine: {}",
                    panic_text(&panic)
                ),
            )),
        }
    }

    /// The instance `workflow_id` of `partition` with its pinned definition; `None` when it ended already (the
    /// input is then dropped quietly); or why the input is dead-lettered.
    fn instance_of(
        &self,
        partition: i32,
        workflow_id: &str,
        what: &str,
    ) -> Result<Option<(Instance, Arc<Definition>)>, Reason> {
        let Some(state) = self.partitions.get(&partition) else {
            return Ok(None);
        };
        let Some(persisted) = state.get(workflow_id) else {
            if state.ended.contains(workflow_id) {
                tracing::debug!(
                    workflow_id,
                    "{what} arrived after the workflow ended; dropped"
                );
                return Ok(None);
            }
            return Err(Reason::new(
                "unknown_instance",
                format!(
                    "{what} is for workflow {workflow_id}, which this partition does not hold: it was never \
                     started, was purged, or the record was produced with a partitioner other than murmur2"
                ),
            ));
        };
        let instance = persisted
            .map_err(|e| {
                Reason::new(
                    "unreadable_state",
                    format!(
                        "{what} is for workflow {workflow_id}, whose stored state this orchestrator cannot read \
                         ({e}); the workflow is kept as it is: run an orchestrator that reads it, then replay \
                         this record"
                    ),
                )
            })?
            .instance;
        let Some((_, definition)) = self
            .definitions
            .get(&instance.workflow_name, Some(instance.workflow_version))
        else {
            return Err(Reason::new(
                "unknown_workflow",
                format!(
                    "workflow {} is pinned to {} version {}, which is not deployed here; redeploy it, then \
                     replay this record",
                    instance.workflow_id, instance.workflow_name, instance.workflow_version
                ),
            ));
        };
        Ok(Some((instance, definition)))
    }

    fn apply_result(
        &mut self,
        partition: i32,
        result: TaskResult,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        check_workflow_id("the result", &result.workflow_id)?;
        check_length("the result's task_id", &result.task_id)?;
        let what = format!("result {}", result.task_id);
        let Some((mut instance, definition)) =
            self.instance_of(partition, &result.workflow_id, &what)?
        else {
            return Ok(());
        };
        let outcome = match result.status {
            TaskStatus::Completed => {
                // A child's result to its parent is sealed when encryption at rest is on.
                let output = sealing::open_text(
                    self.config.keys.as_deref(),
                    &format!("{}/{}", result.workflow_id, result.task_id),
                    "output",
                    result.output.clone().unwrap_or_else(|| "null".into()),
                )
                .map_err(|e| Reason::new("sealed", format!("{what}: {e}")))?;
                let output = output.as_str();
                match self.config.limits.check_json("the task's output", output) {
                    // The step fails, not the record: retrying would produce the same output again.
                    Err(refusal) => Outcome::Failed(Failure {
                        code: "output_too_large".into(),
                        message: refusal.message,
                        retryable: false,
                    }),
                    Ok(()) => Outcome::Completed(serde_json::from_str(output).map_err(|e| {
                        Reason::new(
                            "invalid",
                            format!("{what} has an output that is not JSON: {e}"),
                        )
                    })?),
                }
            }
            TaskStatus::Failed => {
                let error = result.error.unwrap_or(TaskError {
                    code: "unknown".into(),
                    message: "the worker reported a failure without an error".into(),
                    retryable: true,
                });
                // A worker's error text ends up in the state and in events: bounded, whatever the worker sent.
                Outcome::Failed(Failure {
                    code: truncated(error.code, 256),
                    message: truncated(error.message, 8 * 1024),
                    retryable: error.retryable,
                })
            }
        };
        let outcome = TaskOutcome {
            task_id: result.task_id,
            outcome,
        };
        let before = instance.sequence;
        let applied = engine_call(|| instance.on_result(&definition, outcome, now));
        self.settle(partition, instance, before, applied, now, out)
    }

    fn apply_signal(
        &mut self,
        partition: i32,
        offset: i64,
        signal: WorkflowSignal,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        check_workflow_id("the signal", &signal.workflow_id)?;
        check_length("the signal's signal_id", &signal.signal_id)?;
        check_length(
            "the signal's name",
            signal.name.as_deref().unwrap_or_default(),
        )?;
        check_length(
            "the signal's correlation_id",
            signal.correlation_id.as_deref().unwrap_or_default(),
        )?;
        let what = format!("signal {}", signal.signal_id);
        self.config
            .limits
            .check_json(&format!("the payload of {what}"), &signal.payload)
            .map_err(|r| Reason::new(r.reason, r.message))?;
        let named = parse_signal(&signal)?;
        if self.keep_early(partition, offset, &signal, now, out)? {
            return Ok(());
        }
        let Some((mut instance, definition)) =
            self.instance_of(partition, &signal.workflow_id, &what)?
        else {
            return Ok(());
        };
        let before = instance.sequence;
        let applied = engine_call(|| deliver(&mut instance, &definition, &signal, named, now));
        self.settle(partition, instance, before, applied, now, out)
    }

    /// Keeps a signal for a workflow this partition has not seen yet, for when its trigger arrives. `Ok(false)`
    /// when the workflow is known (running or ended); an error when the partition's bounds are reached.
    fn keep_early(
        &mut self,
        partition: i32,
        offset: i64,
        signal: &WorkflowSignal,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<bool, Reason> {
        let (max_ids, max_bytes) = (
            self.config.max_early_per_partition,
            self.config.max_record_bytes / 2,
        );
        let Some(state) = self.partitions.get_mut(&partition) else {
            return Ok(false);
        };
        let id = &signal.workflow_id;
        if state.knows(id) {
            return Ok(false);
        }
        if !state.early.contains_key(id) && state.early.len() >= max_ids {
            return Err(Reason::new(
                "unknown_instance",
                format!(
                    "workflow {id} has not started, and {max_ids} workflows of this partition already have \
                     signals waiting for their start (max_early_per_partition); start it, then replay this signal"
                ),
            ));
        }
        let early = state.early.entry(id.clone()).or_insert_with(|| Early {
            first_at: now,
            signals: Vec::new(),
        });
        if early
            .signals
            .iter()
            .any(|s| s.signal.signal_id == signal.signal_id)
        {
            return Ok(true);
        }
        if early.signals.len() >= MAX_EARLY_SIGNALS
            || early.record_bytes() + Early::signal_bytes(signal) > max_bytes
        {
            return Err(Reason::new(
                "unknown_instance",
                format!(
                    "workflow {id} has not started and already has {} signals waiting for its start, the most \
                     one workflow may hold; start it, then replay this signal",
                    early.signals.len()
                ),
            ));
        }
        early.signals.push(EarlySignal {
            partition,
            offset,
            signal: signal.clone(),
        });
        out.early.insert((partition, id.clone()));
        tracing::debug!(workflow_id = %id, "signal kept until the workflow starts");
        Ok(true)
    }

    /// Delivers the signals that arrived before the start to the instance just started. A cancel among them
    /// ends it as cancelled before anything it started leaves: only its start and end are emitted.
    fn apply_early(
        &self,
        definition: &Definition,
        instance: &mut Instance,
        commands: &mut Vec<Command>,
        early: Early,
        now: i64,
    ) {
        let mut cancelled = false;
        for kept in early.signals {
            let Ok(named) = parse_signal(&kept.signal) else {
                continue;
            };
            cancelled |= kept.signal.kind == SignalKind::Cancel && !instance.is_terminal();
            // On a copy, as everywhere: a refused or panicking call leaves nothing half-applied.
            let mut attempt = instance.clone();
            match engine_call(|| deliver(&mut attempt, definition, &kept.signal, named, now)) {
                Ok(more) => {
                    *instance = attempt;
                    commands.extend(more);
                }
                Err(e) => {
                    tracing::error!(workflow_id = %instance.workflow_id, "an early signal: {e}")
                }
            }
        }
        if cancelled && instance.status == edow_engine::Status::Cancelled {
            commands.retain(|c| match c {
                Command::Emit(e) => {
                    e.kind == edow_engine::EventKind::WorkflowStarted
                        || e.kind == edow_engine::EventKind::WorkflowCancelled
                }
                Command::ReportToParent { .. } => true,
                _ => false,
            });
        }
    }

    /// Early signals that waited past their time: a tombstone for the record, a dead letter for each signal.
    pub(crate) fn expire_early(&mut self, now: i64, out: &mut BatchOutput) {
        let ttl = i64::try_from(self.config.early_signal_ttl.as_millis()).unwrap_or(i64::MAX);
        for (partition, state) in &mut self.partitions {
            let expired: Vec<String> = state
                .early
                .iter()
                .filter(|(_, e)| e.first_at.saturating_add(ttl) <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                if let Some(early) = state.early.remove(&id) {
                    out.expired.extend(early.signals);
                    out.purged.push((*partition, id));
                }
            }
        }
    }

    /// Keeps what the engine made of an input; when the engine refused or panicked, fails the workflow (from its
    /// stored state, untouched by the failed call) and dead-letters the input.
    fn settle(
        &mut self,
        partition: i32,
        instance: Instance,
        before: i64,
        applied: Result<Vec<Command>, String>,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        match applied {
            Ok(commands) => {
                if instance.sequence != before {
                    self.record_change(partition, instance, commands, out);
                }
                Ok(())
            }
            Err(message) => {
                let id = instance.workflow_id.clone();
                self.fail_workflow(partition, &id, "engine_error", &message, now, out);
                Err(Reason::new("engine_error", message))
            }
        }
    }

    /// Ends workflow `id` as failed with `code`, without compensation: its state cannot go on.
    pub(crate) fn fail_workflow(
        &mut self,
        partition: i32,
        id: &str,
        code: &str,
        message: &str,
        now: i64,
        out: &mut BatchOutput,
    ) {
        let Some(Ok(persisted)) = self.partitions.get(&partition).and_then(|s| s.get(id)) else {
            return;
        };
        tracing::error!(workflow_id = id, code, "failing the workflow: {message}");
        let mut instance = persisted.instance;
        let commands = instance.abort(code, format!("{code}: {message}"), now);
        self.record_change(partition, instance, commands, out);
    }

    pub(crate) fn fire_timers(&mut self, now: i64, out: &mut BatchOutput) {
        let owned: Vec<i32> = self.partitions.keys().copied().collect();
        for partition in owned {
            let due = match self.partitions.get_mut(&partition) {
                Some(state) => state.take_due(now),
                None => continue,
            };
            for id in due {
                let persisted = match self.partitions.get(&partition).and_then(|s| s.get(&id)) {
                    Some(Ok(persisted)) => persisted,
                    Some(Err(e)) => {
                        tracing::error!(
                            workflow_id = %id,
                            "a timer is due but the workflow's stored state cannot be read ({e}); trying again \
                             in a minute"
                        );
                        if let Some(state) = self.partitions.get_mut(&partition) {
                            state
                                .timers
                                .insert((now.saturating_add(TIMER_RETRY_MS), id));
                        }
                        continue;
                    }
                    None => continue,
                };
                let mut instance = persisted.instance;
                let Some((_, definition)) = self
                    .definitions
                    .get(&instance.workflow_name, Some(instance.workflow_version))
                else {
                    tracing::error!(
                        workflow_id = %id,
                        "a timer is due but {} version {} is not deployed here; trying again in a minute",
                        instance.workflow_name,
                        instance.workflow_version
                    );
                    if let Some(state) = self.partitions.get_mut(&partition) {
                        state
                            .timers
                            .insert((now.saturating_add(TIMER_RETRY_MS), id));
                    }
                    continue;
                };
                let before = instance.sequence;
                match engine_call(|| instance.on_timer(&definition, now)) {
                    Ok(commands) if instance.sequence != before => {
                        self.record_change(partition, instance, commands, out)
                    }
                    Ok(_) => {
                        // Not due after all; keep it indexed as its state says.
                        let next_timer = instance.next_timer();
                        if let Some(state) = self.partitions.get_mut(&partition) {
                            state.retime(&id, next_timer);
                        }
                    }
                    Err(message) => {
                        self.fail_workflow(partition, &id, "engine_error", &message, now, out)
                    }
                }
            }
        }
    }

    /// Ended workflows past their retention (or past the per-partition count) get a tombstone.
    pub(crate) fn purge_ended(&mut self, now: i64, out: &mut BatchOutput) {
        let retention = i64::try_from(self.config.ended_retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.saturating_sub(retention);
        for (partition, state) in &mut self.partitions {
            for id in state
                .ended
                .take_expired(cutoff, self.config.max_ended_per_partition)
            {
                out.purged.push((*partition, id));
            }
        }
    }

    /// Stores a changed instance; its outbox collects every command of this batch.
    pub(crate) fn record_change(
        &mut self,
        partition: i32,
        instance: Instance,
        commands: Vec<Command>,
        out: &mut BatchOutput,
    ) {
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        let id = instance.workflow_id.clone();
        let mut outbox = match state.live(&id) {
            Some(old) if out.changed.contains(&(partition, id.clone())) => old.outbox.clone(),
            _ => Outbox::default(),
        };
        outbox.commands.extend(commands);
        outbox.events_from = state.events_end;
        state.put(Persisted { instance, outbox });
        out.changed.insert((partition, id));
    }
}

/// The parent a trigger names in its `edow.parent` attribute. The orchestrator sets it on the triggers of child
/// workflows, whose ids are `PARENT/STEP-PATH`; a trigger naming a parent its id does not descend from would make
/// its workflow report its end to an unrelated one, and is refused. (The parent also takes a child's report only
/// while its child step waits for exactly that id.)
fn parent_of(trigger: &WorkflowTrigger) -> Result<Option<String>, Reason> {
    let Some(parent) = trigger.attributes.get(PARENT_ATTRIBUTE) else {
        return Ok(None);
    };
    let descends = trigger
        .workflow_id
        .strip_prefix(parent.as_str())
        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'));
    if !descends {
        return Err(Reason::new(
            "invalid",
            format!(
                "the trigger of {} names {parent} as its parent in '{PARENT_ATTRIBUTE}', but only the orchestrator \
                 sets that attribute, on child workflows whose ids start with their parent's id and '/'; remove \
                 it to start an independent workflow",
                trigger.workflow_id
            ),
        ));
    }
    Ok(Some(parent.clone()))
}

/// Refuses a workflow id that is empty, too long, or one of edow's own changelog keys.
fn check_workflow_id(what: &str, id: &str) -> Result<(), Reason> {
    match crate::workflow_id_problem(id) {
        Some(problem) => Err(Reason::new(
            "invalid",
            format!("{what}'s workflow_id {problem}"),
        )),
        None => Ok(()),
    }
}

/// Refuses an id-like field longer than a workflow id may be.
fn check_length(what: &str, text: &str) -> Result<(), Reason> {
    if text.len() > MAX_WORKFLOW_ID_BYTES {
        return Err(Reason::new(
            "too_large",
            format!(
                "{what} is {} bytes; at most {MAX_WORKFLOW_ID_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// `text` cut to at most `max` bytes, on a character boundary, saying so.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let bytes = text.len();
        edow_kafka::truncate_utf8(&mut text, max);
        text.push_str(&format!("... ({bytes} bytes in all)"));
    }
    text
}

/// Most signals kept for one workflow that has not started.
const MAX_EARLY_SIGNALS: usize = 100;

/// A named signal's name and JSON payload; `None` for a cancel. Errors name what is wrong with the record.
fn parse_signal(signal: &WorkflowSignal) -> Result<Option<(String, Value)>, Reason> {
    let what = format!("signal {}", signal.signal_id);
    match signal.kind {
        SignalKind::Cancel => Ok(None),
        SignalKind::Signal => {
            let name = signal.name.clone().ok_or_else(|| {
                Reason::new(
                    "invalid",
                    format!("{what} has no name; set the name a wait step listens for"),
                )
            })?;
            let payload: Value = serde_json::from_str(&signal.payload).map_err(|e| {
                Reason::new(
                    "invalid",
                    format!("{what} has a payload that is not JSON: {e}"),
                )
            })?;
            Ok(Some((name, payload)))
        }
        SignalKind::Unknown => Err(Reason::new(
            "unsupported",
            format!("{what} has a kind this orchestrator does not know; upgrade it, then replay"),
        )),
    }
}

/// Hands a parsed signal (or a cancel) to the engine.
fn deliver(
    instance: &mut Instance,
    definition: &Definition,
    signal: &WorkflowSignal,
    named: Option<(String, Value)>,
    now: i64,
) -> Result<Vec<Command>, EngineError> {
    match named {
        None => instance.on_cancel(definition, &signal.signal_id, &signal.payload_text(), now),
        Some((name, payload)) => {
            instance.on_signal(definition, &signal.signal_id, &name, payload, now)
        }
    }
}

/// Calls the engine, turning its refusal or a panic into a message.
fn engine_call(
    f: impl FnOnce() -> Result<Vec<Command>, EngineError>,
) -> Result<Vec<Command>, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(commands)) => Ok(commands),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("the engine panicked: {}", panic_text(&panic))),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
