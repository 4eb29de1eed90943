//! The producing edge: the records of a batch. Per changed workflow, its changelog record (state and outbox), the
//! tasks and workflow records of its outbox, and its lifecycle events; then tombstones of purged workflows.
//! Changelog records are written and acknowledged first (the one write a step waits for); then the tasks and events
//! are handed to a background task that waits for their acknowledgements while the next batch is applied, and
//! the next batch waits for it before writing its own changelog records, so that only the latest batch's outboxes
//! can ever be unconfirmed (see `partition` and `restore` for why that makes the outbox check at restore sound).
//!
//! Every record is checked against `max_record_bytes` before anything is produced: a workflow with a record
//! over it is failed (`state_too_large`) and its records built again, so an oversized state can never make the
//! broker refuse a write and stop the loop.

use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use edow_engine::{Command, Dispatch, Event, EventKind, Instance, Outcome};
use edow_kafka::{
    acknowledged, now_millis, produce_all, send_all, Outgoing, TopicSpec, EVENT_ID_HEADER,
};
use edow_schemas::contracts::{
    LifecycleEvent, LifecycleKind, SignalKind, TaskError, TaskRequested, TaskResult, TaskStatus,
    WorkflowSignal, WorkflowTrigger,
};
use edow_schemas::{Codec, Topics};
use serde_json::Value;

use crate::observe::Observation;
use crate::partition::{
    EarlySignal, Marker, Packed, EPOCH_HEADER, MARKER_KEY, OUTBOX_HEADER, TIMER_HEADER,
};
use crate::sealing;
use crate::traces::{self, Made};
use crate::{Orchestrator, DEPTH_ATTRIBUTE, PARENT_ATTRIBUTE};
use edow_telemetry::trace::TraceContext;

/// What a batch's background task reports once its outputs are acknowledged: the events' positions, and below
/// which changelog offset each partition's outboxes are now all produced.
pub(crate) struct Confirmed {
    events: Vec<(i32, i64)>,
    done_below: HashMap<i32, i64>,
}

/// How often a partition's marker is written while it changes.
const MARKER_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The records of one changed workflow.
struct WorkflowRecords {
    changelog: Outgoing,
    /// What memory holds once these records are produced: the changelog record's text; `None` for an ended
    /// workflow, which leaves memory.
    packed: Option<Packed>,
    tasks: Vec<Outgoing>,
    events: Vec<Outgoing>,
    /// What metrics count of its events once the changelog record is acknowledged.
    observation: Option<Observation>,
    /// The workflow's root trace context, from its state.
    trace: Option<TraceContext>,
}

impl WorkflowRecords {
    /// The largest record, in bytes, and which it is.
    fn largest(&self) -> (usize, String) {
        std::iter::once(&self.changelog)
            .chain(&self.tasks)
            .chain(&self.events)
            .map(|r| {
                let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
                (
                    r.key.len() + r.payload.as_ref().map_or(0, Vec::len) + headers,
                    r.topic.clone(),
                )
            })
            .max()
            .unwrap_or_default()
    }
}

impl Orchestrator {
    /// Writes the changelog records of `changed` and the tombstones of `purged`, then sends the outboxes' tasks
    /// and events without waiting for them (see [`Orchestrator::confirm_outputs`]). Every record carries the
    /// workflow's trace context. When `made` now, their lifecycle events are counted in the metrics once the
    /// changelog is written and their `send` spans are exported (not for outboxes a restore produces again:
    /// those were counted and traced when they were made).
    pub(crate) async fn produce_outputs(
        &mut self,
        changed: &BTreeSet<(i32, String)>,
        purged: &[(i32, String)],
        now: i64,
        made: Made<'_>,
    ) -> anyhow::Result<()> {
        if changed.is_empty() && purged.is_empty() {
            return Ok(());
        }
        let began = std::time::Instant::now();
        let topics = self.config.topics.clone();
        let mut changelog = Vec::with_capacity(changed.len() + purged.len());
        let mut tasks = Vec::new();
        let mut events = Vec::new();
        let mut settled = Vec::with_capacity(changed.len());
        let mut observations = Vec::new();
        for (partition, id) in changed {
            let Some(mut records) = self.workflow_records(*partition, id).await? else {
                continue;
            };
            let (size, topic) = records.largest();
            if size > self.config.max_record_bytes {
                let message = format!(
                    "a record for {topic} would be {size} bytes, over the limit of {} (max_record_bytes); \
                     keep large data out of workflow state (pass references)",
                    self.config.max_record_bytes
                );
                let limit = self.config.max_record_bytes;
                let mut shrunk = None;
                for drastic in [false, true] {
                    self.fail_oversized(*partition, id, &message, drastic, now);
                    match self.workflow_records(*partition, id).await? {
                        Some(smaller) if smaller.largest().0 <= limit => {
                            shrunk = Some(smaller);
                            break;
                        }
                        _ => {}
                    }
                }
                match shrunk {
                    Some(smaller) => records = smaller,
                    None => {
                        // Only ids and names of absurd length get here; written it cannot be, and kept in
                        // memory it would be retired as if it had been.
                        tracing::error!(
                            workflow_id = %id,
                            "even the failed workflow's records are over max_record_bytes; nothing is written \
                             for it and it is forgotten"
                        );
                        if let Some(state) = self.partitions.get_mut(partition) {
                            state.remove(id);
                        }
                        continue;
                    }
                }
            }
            if let Some(parent) = made.parent(id, records.trace.take()) {
                let all = std::iter::once(&mut records.changelog)
                    .chain(records.tasks.iter_mut())
                    .chain(records.events.iter_mut());
                traces::stamp(all, &parent, made.is_new());
            }
            changelog.push(records.changelog);
            observations.extend(records.observation);
            tasks.extend(records.tasks);
            events.extend(records.events);
            settled.push((*partition, id, records.packed));
        }
        for (partition, id) in purged {
            changelog.push(Outgoing {
                topic: topics.state(),
                partition: Some(*partition),
                key: id.as_bytes().to_vec(),
                payload: None,
                headers: vec![(EPOCH_HEADER, self.epoch_of(*partition))],
            });
        }
        // Every outbox before this batch's must be produced before its changelog records are written: a
        // restore checks only the latest record's outbox of each workflow. (Built first: the wait overlaps.)
        let built = began.elapsed();
        self.confirm_outputs().await?;
        let confirmed = began.elapsed();
        let written = produce_all(&self.producer, &changelog)
            .await
            .context("writing the changelog")?;
        if made.is_new() {
            observations.iter().for_each(Observation::record);
        }
        tracing::debug!(
            build_us = built.as_micros() as u64,
            confirm_wait_us = (confirmed - built).as_micros() as u64,
            changelog_us = (began.elapsed() - confirmed).as_micros() as u64,
            records = changelog.len(),
            "changelog written"
        );
        if let Some(blob_purges) = &self.blob_purges {
            purged.iter().for_each(|(_, id)| blob_purges.purged(id));
        }
        // Every outbox written so far is produced once these outputs are: a marker records that (see
        // `write_markers`), so that a restore checks only what comes after.
        let mut done_below: HashMap<i32, i64> = HashMap::new();
        for (partition, offset) in written {
            let end = done_below.entry(partition).or_default();
            *end = (*end).max(offset + 1);
        }
        // Off the critical path: the tasks and the events are acknowledged by a background task. The next batch is
        // applied meanwhile and awaits it before writing its own changelog records.
        let producer = self.producer.clone();
        let tasks = send_all(&producer, &tasks)
            .await
            .context("dispatching tasks")?;
        let events = send_all(&producer, &events)
            .await
            .context("emitting lifecycle events")?;
        self.outputs_in_flight = Some(tokio::spawn(async move {
            acknowledged(tasks).await.context("dispatching tasks")?;
            let positions = acknowledged(events)
                .await
                .context("emitting lifecycle events")?;
            Ok(Confirmed {
                events: positions,
                done_below,
            })
        }));
        // Written: the outboxes are needed only in the changelog now, for a crash; memory keeps none.
        for (partition, id, packed) in settled {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.settle(id, packed);
            }
        }
        Ok(())
    }

    /// Waits until the outputs of the last batch are acknowledged (see `produce_outputs`); an output that could
    /// not be produced fails the process, whose restart produces it again from the changelog.
    pub(crate) async fn confirm_outputs(&mut self) -> anyhow::Result<()> {
        let Some(in_flight) = self.outputs_in_flight.take() else {
            return Ok(());
        };
        let confirmed = in_flight
            .await
            .context("producing a batch's outputs stopped")??;
        for (partition, offset) in confirmed.events {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.events_end = state.events_end.max(offset + 1);
            }
        }
        for (partition, done_below) in confirmed.done_below {
            let pending = self.markers_due.entry(partition).or_default();
            *pending = (*pending).max(done_below);
        }
        Ok(())
    }

    /// Writes the marker of each owned partition whose confirmed outboxes are past its last marker, at most one
    /// per partition per [`MARKER_EVERY`] unless `now` (each is a write the broker serves; one written late
    /// only makes a restore check a little more). Not awaited: a lost marker only makes the next restore check
    /// more.
    pub(crate) async fn write_markers(&mut self, now: bool) -> anyhow::Result<()> {
        let due: Vec<(i32, i64)> = self
            .markers_due
            .iter()
            .filter(|(partition, _)| {
                now || self
                    .last_marker
                    .get(partition)
                    .is_none_or(|at| at.elapsed() >= MARKER_EVERY)
            })
            .map(|(p, o)| (*p, *o))
            .collect();
        for (partition, outboxes_done_below) in due {
            self.markers_due.remove(&partition);
            // A partition no longer owned gets none: its new owner's markers must stay the newest.
            let Some(epoch) = self.partitions.get(&partition).map(|s| s.epoch) else {
                continue;
            };
            let marker = Marker {
                epoch,
                outboxes_done_below,
            };
            let record = self.marker_record(partition, marker, now_millis()).await?;
            send_unawaited(&self.producer, &record);
            self.last_marker
                .insert(partition, std::time::Instant::now());
        }
        Ok(())
    }

    /// Whether the outputs of the last batch are done being produced (acknowledged or failed).
    pub(crate) fn outputs_settled(&self) -> bool {
        self.outputs_in_flight
            .as_ref()
            .is_some_and(|in_flight| in_flight.is_finished())
    }

    /// Writes the early-signal records of `early` that still wait for their workflow (the others were applied
    /// by its start, whose record replaces theirs, or expired and got a tombstone).
    pub(crate) async fn produce_early(
        &mut self,
        early: &BTreeSet<(i32, String)>,
        now: i64,
    ) -> anyhow::Result<()> {
        let topic = self.config.topics.state();
        let mut records = Vec::new();
        for (partition, id) in early {
            let Some(kept) = self.partitions.get(partition).and_then(|s| s.early.get(id)) else {
                continue;
            };
            let mut record = kept.to_record(id, now);
            sealing::seal_state(self.config.keys.as_deref(), &mut record)?;
            records.push(Outgoing {
                payload: Some(self.codec.encode(&topic, &record).await?),
                topic: topic.clone(),
                partition: Some(*partition),
                key: id.as_bytes().to_vec(),
                headers: vec![(EPOCH_HEADER, self.epoch_of(*partition))],
            });
        }
        produce_all(&self.producer, &records)
            .await
            .context("writing early signals to the changelog")?;
        Ok(())
    }

    /// The dead letter of a signal whose workflow did not start in time. The value is the signal encoded again
    /// (the original bytes were not kept), so replaying it delivers the same signal.
    pub(crate) async fn expired_letter(
        &self,
        expired: EarlySignal,
    ) -> anyhow::Result<edow_schemas::contracts::DeadLetter> {
        let topic = self.config.topics.signals();
        let reason = format!(
            "workflow {} did not start within {} of this signal (early_signal_ttl); start it, then replay \
             this signal",
            expired.signal.workflow_id,
            humantime::format_duration(self.config.early_signal_ttl)
        );
        Ok(edow_schemas::contracts::DeadLetter {
            origin_topic: topic.clone(),
            origin_partition: expired.partition,
            origin_offset: expired.offset,
            origin_timestamp: Some(expired.signal.sent_at),
            key: Some(expired.signal.workflow_id.as_bytes().to_vec()),
            value: Some(self.codec.encode(&topic, &expired.signal).await?),
            headers: Default::default(),
            error_kind: "unknown_instance".into(),
            error: reason,
            attempts: 1,
            first_failed_at: now_millis(),
            dead_lettered_at: now_millis(),
            service: "orchestrator".into(),
        })
    }

    /// Tells each parent that its child's trigger was refused, as a failed result of the child step, so the
    /// parent fails (or retries, compensates) instead of waiting forever.
    pub(crate) async fn report_refused_children(
        &self,
        refused: &[(String, String, edow_kafka::dead_letters::Reason)],
    ) -> anyhow::Result<()> {
        let topic = self.config.topics.results();
        let mut records = Vec::with_capacity(refused.len());
        for (parent, child, reason) in refused {
            let result = TaskResult {
                task_id: child.clone(),
                workflow_id: parent.clone(),
                step: "child-workflow".into(),
                attempt: 1,
                status: TaskStatus::Failed,
                output: None,
                error: Some(TaskError {
                    code: reason.kind.clone(),
                    message: format!("child workflow {child} could not start: {}", reason.error),
                    retryable: false,
                }),
                worker_id: "orchestrator".into(),
                started_at: now_millis(),
                finished_at: now_millis(),
            };
            records.push(Outgoing {
                payload: Some(self.codec.encode(&topic, &result).await?),
                topic: topic.clone(),
                partition: None,
                key: parent.as_bytes().to_vec(),
                headers: Vec::new(),
            });
        }
        produce_all(&self.producer, &records)
            .await
            .context("reporting refused children to their parents")?;
        Ok(())
    }

    /// The epoch header value of `partition`'s owner.
    pub(crate) fn epoch_of(&self, partition: i32) -> Vec<u8> {
        self.partitions
            .get(&partition)
            .map_or(0, |s| s.epoch)
            .to_string()
            .into_bytes()
    }

    pub(crate) async fn marker_record(
        &self,
        partition: i32,
        marker: Marker,
        now: i64,
    ) -> anyhow::Result<Outgoing> {
        marker_record(&self.codec, &self.config.topics, partition, marker, now).await
    }

    /// Makes a workflow whose records are too large fit: a running one fails (its tree, with every output it
    /// held, is dropped), its outbox loses the tasks and children it would start, and event details over
    /// 16 KiB are replaced by their size. `drastic` also drops the input and output from the state: the record is
    /// then a few hundred bytes, whatever the workflow carried.
    fn fail_oversized(&mut self, partition: i32, id: &str, message: &str, drastic: bool, now: i64) {
        const DETAIL_BYTES: usize = 16 * 1024;
        let Some(persisted) = self
            .partitions
            .get_mut(&partition)
            .and_then(|s| s.live_mut(id))
        else {
            return;
        };
        tracing::error!(workflow_id = id, "failing the workflow: {message}");
        let reason = format!("state_too_large: {message}");
        let commands = persisted
            .instance
            .abort("state_too_large", reason.clone(), now);
        persisted
            .outbox
            .commands
            .retain(|c| !matches!(c, Command::Dispatch(_) | Command::StartChild { .. }));
        persisted.outbox.commands.extend(commands);
        for command in &mut persisted.outbox.commands {
            if let Command::Emit(event) = command {
                if let Some(detail) = &event.detail {
                    let bytes = detail.to_string().len();
                    if bytes > DETAIL_BYTES {
                        event.detail = Some(serde_json::json!({ "truncated_bytes": bytes }));
                    }
                }
            }
        }
        if drastic {
            let instance = &mut persisted.instance;
            instance.input = Value::Null;
            instance.output = None;
            if !instance
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("state_too_large")
            {
                instance.error = Some(reason);
            }
        }
        let persisted = persisted.clone();
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.put(persisted);
        }
    }

    async fn workflow_records(
        &mut self,
        partition: i32,
        id: &str,
    ) -> anyhow::Result<Option<WorkflowRecords>> {
        let Some(persisted) = self
            .partitions
            .get(&partition)
            .and_then(|s| s.live(id))
            .cloned()
        else {
            return Ok(None);
        };
        let topics = self.config.topics.clone();
        let record = persisted.to_record();
        let keys = self.config.keys.as_deref();
        let value = match keys {
            None => self.codec.encode(&topics.state(), &record).await?,
            Some(_) => {
                let mut sealed = record.clone();
                sealing::seal_state(keys, &mut sealed)?;
                self.codec.encode(&topics.state(), &sealed).await?
            }
        };
        let mut headers = vec![
            (EPOCH_HEADER, self.epoch_of(partition)),
            (TIMER_HEADER, persisted.timer_header()),
        ];
        if let Some(outbox) = persisted.outbox_header() {
            headers.push((OUTBOX_HEADER, sealing::seal_outbox(keys, id, outbox)?));
        }
        // Memory holds the plain text: only what is written is at rest.
        let packed = if persisted.instance.is_terminal() {
            None
        } else {
            Packed::from_record(record, persisted.instance.next_timer()).ok()
        };
        let mut records = WorkflowRecords {
            changelog: Outgoing {
                topic: topics.state(),
                partition: Some(partition),
                key: id.as_bytes().to_vec(),
                payload: Some(value),
                headers,
            },
            packed,
            tasks: Vec::new(),
            events: Vec::new(),
            observation: Observation::of(&persisted.instance, &persisted.outbox.commands),
            trace: persisted
                .instance
                .trace_context
                .as_deref()
                .and_then(TraceContext::from_stored),
        };
        for command in &persisted.outbox.commands {
            match command {
                Command::Dispatch(dispatch) => records
                    .tasks
                    .push(self.task_record(&persisted.instance, dispatch).await?),
                Command::Emit(event) => records.events.push(
                    self.event_record(partition, &persisted.instance, event)
                        .await?,
                ),
                other => records
                    .tasks
                    .push(self.workflow_record(&persisted.instance, other).await?),
            }
        }
        Ok(Some(records))
    }

    pub(crate) async fn task_record(
        &mut self,
        instance: &Instance,
        dispatch: &Dispatch,
    ) -> anyhow::Result<Outgoing> {
        let topics = &self.config.topics;
        let topic = if dispatch.retry {
            topics.task_retries(&dispatch.task_type)
        } else {
            topics.tasks(&dispatch.task_type)
        };
        if !self.task_topics.contains(&topic) {
            let (p, rf) = (self.config.task_partitions, self.config.replication_factor);
            let main = topics.tasks(&dispatch.task_type);
            let retry = topics.task_retries(&dispatch.task_type);
            let specs = [
                TopicSpec::new(main.clone(), p, rf),
                TopicSpec::new(retry.clone(), p, rf),
                TopicSpec::new(Topics::dead_letters(&main), p, rf),
                TopicSpec::new(Topics::dead_letters(&retry), p, rf),
            ];
            self.config.kafka.ensure_topics(&specs).await?;
            self.task_topics.extend([main, retry]);
        }
        let task = TaskRequested {
            task_id: dispatch.task_id.clone(),
            workflow_id: instance.workflow_id.clone(),
            workflow_name: instance.workflow_name.clone(),
            workflow_version: instance.workflow_version,
            step: dispatch.step.clone(),
            task_type: dispatch.task_type.clone(),
            attempt: dispatch.attempt as i32,
            input: dispatch.input.to_string(),
            deadline_at: dispatch.deadline,
            priority: instance.priority,
            correlation_id: instance.correlation_id.clone(),
            requested_at: now_millis(),
        };
        Ok(Outgoing {
            payload: Some(self.codec.encode(&topic, &task).await?),
            topic,
            partition: None,
            key: instance.workflow_id.as_bytes().to_vec(),
            headers: Vec::new(),
        })
    }

    /// A record that starts, cancels or reports to another workflow.
    async fn workflow_record(
        &self,
        instance: &Instance,
        command: &Command,
    ) -> anyhow::Result<Outgoing> {
        let topics = &self.config.topics;
        let now = now_millis();
        let (topic, key, payload) = match command {
            Command::StartChild {
                child_id,
                name,
                version,
                input,
            } => {
                let trigger = WorkflowTrigger {
                    workflow_id: child_id.clone(),
                    workflow_name: name.clone(),
                    workflow_version: *version,
                    input: sealing::seal_text(
                        self.config.keys.as_deref(),
                        child_id,
                        "input",
                        input.to_string(),
                    )?,
                    idempotency_key: None,
                    correlation_id: instance.correlation_id.clone(),
                    priority: instance.priority,
                    requested_at: now,
                    attributes: [
                        (PARENT_ATTRIBUTE.to_string(), instance.workflow_id.clone()),
                        (
                            DEPTH_ATTRIBUTE.to_string(),
                            (instance.depth + 1).to_string(),
                        ),
                    ]
                    .into(),
                };
                let topic = topics.triggers();
                let payload = self.codec.encode(&topic, &trigger).await?;
                (topic, child_id, payload)
            }
            Command::CancelChild { child_id } => {
                let reason = format!("parent {} no longer needs it", instance.workflow_id);
                let signal = WorkflowSignal {
                    signal_id: format!("{child_id}/cancel-by-parent"),
                    workflow_id: child_id.clone(),
                    kind: SignalKind::Cancel,
                    name: None,
                    payload: Value::String(reason).to_string(),
                    correlation_id: instance.correlation_id.clone(),
                    sent_at: now,
                };
                let topic = topics.signals();
                let payload = self.codec.encode(&topic, &signal).await?;
                (topic, child_id, payload)
            }
            Command::ReportToParent {
                parent_id,
                task_id,
                outcome,
            } => {
                let (status, output, error) = match outcome {
                    Outcome::Completed(v) => {
                        let output = sealing::seal_text(
                            self.config.keys.as_deref(),
                            &format!("{parent_id}/{task_id}"),
                            "output",
                            v.to_string(),
                        )?;
                        (TaskStatus::Completed, Some(output), None)
                    }
                    Outcome::Failed(f) => {
                        let error = TaskError {
                            code: f.code.clone(),
                            message: f.message.clone(),
                            retryable: false,
                        };
                        (TaskStatus::Failed, None, Some(error))
                    }
                };
                let result = TaskResult {
                    task_id: task_id.clone(),
                    workflow_id: parent_id.clone(),
                    step: "child-workflow".into(),
                    attempt: 1,
                    status,
                    output,
                    error,
                    worker_id: format!("workflow:{}", instance.workflow_id),
                    started_at: instance.created_at,
                    finished_at: instance.updated_at,
                };
                let topic = topics.results();
                let payload = self.codec.encode(&topic, &result).await?;
                (topic, parent_id, payload)
            }
            Command::Dispatch(_) | Command::Emit(_) => {
                anyhow::bail!("tasks and events are not workflow records")
            }
        };
        Ok(Outgoing {
            topic,
            partition: None,
            key: key.as_bytes().to_vec(),
            payload: Some(payload),
            headers: Vec::new(),
        })
    }

    async fn event_record(
        &self,
        partition: i32,
        instance: &Instance,
        event: &Event,
    ) -> anyhow::Result<Outgoing> {
        let topic = self.config.topics.events();
        let record = LifecycleEvent {
            event_id: event.event_id.clone(),
            workflow_id: instance.workflow_id.clone(),
            workflow_name: instance.workflow_name.clone(),
            workflow_version: instance.workflow_version,
            kind: lifecycle_kind(event.kind),
            step: event.step.clone(),
            attempt: event.attempt.map(|a| a as i32),
            detail: event
                .detail
                .as_ref()
                .map(|d| {
                    sealing::seal_text(
                        self.config.keys.as_deref(),
                        &event.event_id,
                        "detail",
                        d.to_string(),
                    )
                })
                .transpose()?,
            correlation_id: instance.correlation_id.clone(),
            at: instance.updated_at,
        };
        Ok(Outgoing {
            payload: Some(self.codec.encode(&topic, &record).await?),
            topic,
            partition: Some(partition),
            key: instance.workflow_id.as_bytes().to_vec(),
            headers: vec![(EVENT_ID_HEADER, event.event_id.as_bytes().to_vec())],
        })
    }
}

pub(crate) fn lifecycle_kind(kind: EventKind) -> LifecycleKind {
    match kind {
        EventKind::WorkflowStarted => LifecycleKind::WorkflowStarted,
        EventKind::StepStarted => LifecycleKind::StepStarted,
        EventKind::StepCompleted => LifecycleKind::StepCompleted,
        EventKind::StepFailed => LifecycleKind::StepFailed,
        EventKind::StepRetried => LifecycleKind::StepRetried,
        EventKind::WorkflowCompleted => LifecycleKind::WorkflowCompleted,
        EventKind::WorkflowFailed => LifecycleKind::WorkflowFailed,
        EventKind::Compensating => LifecycleKind::Compensating,
        EventKind::WorkflowCancelled => LifecycleKind::WorkflowCancelled,
        EventKind::WorkflowCompensated => LifecycleKind::WorkflowCompensated,
        EventKind::WorkflowFiltered => LifecycleKind::WorkflowFiltered,
        EventKind::CompensationFailed => LifecycleKind::CompensationFailed,
    }
}

/// Hands `record` to the producer without waiting for its acknowledgement.
fn send_unawaited(producer: &rdkafka::producer::FutureProducer, record: &Outgoing) {
    if let Err((e, _)) = producer.send_result(edow_kafka::future_record(record)) {
        tracing::debug!(
            "the partition marker was not queued ({e}); the next restore checks more outboxes"
        );
    }
}

/// The changelog record of `partition`'s marker.
pub(crate) async fn marker_record(
    codec: &Codec,
    topics: &Topics,
    partition: i32,
    marker: Marker,
    now: i64,
) -> anyhow::Result<Outgoing> {
    let topic = topics.state();
    Ok(Outgoing {
        payload: Some(codec.encode(&topic, &marker.to_record(now)).await?),
        topic,
        partition: Some(partition),
        key: MARKER_KEY.as_bytes().to_vec(),
        headers: vec![(EPOCH_HEADER, marker.epoch.to_string().into_bytes())],
    })
}
