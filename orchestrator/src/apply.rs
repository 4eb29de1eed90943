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
use serde_json::Value;

use crate::decode::Input;
use crate::partition::{Outbox, Persisted};
use crate::{
    BatchOutput, Orchestrator, DEPTH_ATTRIBUTE, MAX_WORKFLOW_ID_BYTES, PARENT_ATTRIBUTE,
    RESERVED_ID_PREFIX,
};

/// How long a due timer whose definition is missing waits before it is tried again.
const MISSING_DEFINITION_RETRY_MS: i64 = 60_000;

impl Orchestrator {
    /// Applies one input to the engine. Err means the input is dead-lettered with that reason.
    pub(crate) fn apply(
        &mut self,
        partition: i32,
        input: Input,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        match input {
            Input::Trigger(trigger) => self.start(partition, trigger, now, out),
            Input::Result(result) => self.apply_result(partition, result, now, out),
            Input::Signal(signal) => self.apply_signal(partition, signal, now, out),
        }
    }

    fn start(
        &mut self,
        partition: i32,
        trigger: WorkflowTrigger,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        let id = &trigger.workflow_id;
        if id.is_empty() || id.len() > MAX_WORKFLOW_ID_BYTES || id.starts_with(RESERVED_ID_PREFIX) {
            return Err(Reason::new(
                "invalid",
                format!(
                    "the trigger's workflow_id must be 1 to {MAX_WORKFLOW_ID_BYTES} bytes and not start with \
                     '{RESERVED_ID_PREFIX}'; got {} bytes",
                    id.len()
                ),
            ));
        }
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
        self.config
            .limits
            .check_json("the trigger's input", &trigger.input)
            .map_err(|r| Reason::new(r.reason, r.message))?;
        let input: Value = serde_json::from_str(&trigger.input).map_err(|e| {
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
            parent: trigger.attributes.get(PARENT_ATTRIBUTE).cloned(),
            depth,
        };
        let started = catch_unwind(AssertUnwindSafe(|| {
            Instance::start(&definition, start, now)
        }));
        match started {
            Ok((instance, commands)) => {
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
        let Some(persisted) = state.instances.get(workflow_id) else {
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
        let instance = persisted.instance.clone();
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
        let what = format!("result {}", result.task_id);
        let Some((mut instance, definition)) =
            self.instance_of(partition, &result.workflow_id, &what)?
        else {
            return Ok(());
        };
        let outcome = match result.status {
            TaskStatus::Completed => {
                let output = result.output.as_deref().unwrap_or("null");
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
                Outcome::Failed(Failure {
                    code: error.code,
                    message: error.message,
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
        signal: WorkflowSignal,
        now: i64,
        out: &mut BatchOutput,
    ) -> Result<(), Reason> {
        let what = format!("signal {}", signal.signal_id);
        self.config
            .limits
            .check_json(&format!("the payload of {what}"), &signal.payload)
            .map_err(|r| Reason::new(r.reason, r.message))?;
        let Some((mut instance, definition)) =
            self.instance_of(partition, &signal.workflow_id, &what)?
        else {
            return Ok(());
        };
        let before = instance.sequence;
        let applied = match signal.kind {
            SignalKind::Cancel => {
                let reason = signal.payload_text();
                engine_call(|| instance.on_cancel(&definition, &signal.signal_id, &reason, now))
            }
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
                engine_call(|| {
                    instance.on_signal(&definition, &signal.signal_id, &name, payload, now)
                })
            }
            SignalKind::Unknown => {
                return Err(Reason::new(
                    "unsupported",
                    format!(
                        "{what} has a kind this orchestrator does not know; upgrade it, then replay"
                    ),
                ))
            }
        };
        self.settle(partition, instance, before, applied, now, out)
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
        let Some(persisted) = self
            .partitions
            .get(&partition)
            .and_then(|s| s.instances.get(id))
        else {
            return;
        };
        tracing::error!(workflow_id = id, code, "failing the workflow: {message}");
        let mut instance = persisted.instance.clone();
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
                let Some(persisted) = self
                    .partitions
                    .get(&partition)
                    .and_then(|s| s.instances.get(&id))
                else {
                    continue;
                };
                let mut instance = persisted.instance.clone();
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
                        state.timers.insert((now + MISSING_DEFINITION_RETRY_MS, id));
                    }
                    continue;
                };
                let before = instance.sequence;
                match engine_call(|| instance.on_timer(&definition, now)) {
                    Ok(commands) if instance.sequence != before => {
                        self.record_change(partition, instance, commands, out)
                    }
                    Ok(_) => {
                        // Not due after all (re-armed); keep it indexed.
                        if let Some(state) = self.partitions.get_mut(&partition) {
                            if let Some(persisted) = state.instances.get(&id).cloned() {
                                state.put(persisted);
                            }
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
        let mut outbox = match state.instances.get(&id) {
            Some(old) if out.changed.contains(&(partition, id.clone())) => old.outbox.clone(),
            _ => Outbox::default(),
        };
        outbox.commands.extend(commands);
        outbox.events_from = state.events_end;
        state.put(Persisted { instance, outbox });
        out.changed.insert((partition, id));
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
