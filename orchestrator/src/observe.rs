//! What the orchestrator reports to its metrics about the workflows it drives: one [`Observation`] per changed
//! workflow, taken from the lifecycle events of its outbox and recorded once its changelog record is
//! acknowledged (so a batch that fails before that counts nothing). Counts are per process: an outbox produced
//! again by a restore is not counted again.

use edow_engine::{Command, EventKind, Instance};
use edow_telemetry::metrics::{
    CODES, STEP_FAILURES, STEP_RETRIES, WORKFLOWS_ENDED, WORKFLOWS_STARTED, WORKFLOW_DURATION,
    WORKFLOW_NAMES,
};

/// The lifecycle events of one workflow's outbox that metrics count.
pub(crate) struct Observation {
    workflow: String,
    /// Seconds from start to end, for an ended workflow.
    duration: f64,
    events: Vec<(EventKind, Option<String>)>,
}

impl Observation {
    /// The events of `commands` worth counting, with the error code of each failure; `None` when there are none.
    pub(crate) fn of(instance: &Instance, commands: &[Command]) -> Option<Observation> {
        let events: Vec<(EventKind, Option<String>)> = commands
            .iter()
            .filter_map(|command| match command {
                Command::Emit(event) if counted(event.kind) => {
                    let code = event
                        .detail
                        .as_ref()
                        .and_then(|d| d.get("code"))
                        .and_then(|c| c.as_str())
                        .map(str::to_string);
                    Some((event.kind, code))
                }
                _ => None,
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        Some(Observation {
            workflow: instance.workflow_name.clone(),
            duration: instance
                .updated_at
                .saturating_sub(instance.created_at)
                .max(0) as f64
                / 1000.0,
            events,
        })
    }

    /// Adds this observation to the metrics.
    pub(crate) fn record(&self) {
        let workflow = WORKFLOW_NAMES.bounded(&self.workflow);
        // A retry follows the failure that caused it in the same outbox: it is counted with that failure's code.
        let mut last_code = String::from("unknown");
        for (kind, code) in &self.events {
            match kind {
                EventKind::WorkflowStarted => {
                    WORKFLOWS_STARTED.with_label_values(&[&workflow]).inc();
                }
                EventKind::StepFailed => {
                    last_code = CODES.bounded(code.as_deref().unwrap_or("unknown"));
                    STEP_FAILURES
                        .with_label_values(&[&workflow, &last_code])
                        .inc();
                }
                EventKind::StepRetried => {
                    STEP_RETRIES
                        .with_label_values(&[&workflow, &last_code])
                        .inc();
                }
                kind => {
                    if let Some(status) = end_status(*kind) {
                        WORKFLOWS_ENDED
                            .with_label_values(&[&workflow, status])
                            .inc();
                        WORKFLOW_DURATION
                            .with_label_values(&[&workflow, status])
                            .observe(self.duration);
                    }
                }
            }
        }
    }
}

fn counted(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::WorkflowStarted | EventKind::StepFailed | EventKind::StepRetried
    ) || end_status(kind).is_some()
}

/// The `status` label of an event that ends a workflow.
fn end_status(kind: EventKind) -> Option<&'static str> {
    Some(match kind {
        EventKind::WorkflowCompleted => "completed",
        EventKind::WorkflowFailed => "failed",
        EventKind::WorkflowCancelled => "cancelled",
        EventKind::WorkflowCompensated => "compensated",
        EventKind::CompensationFailed => "compensation_failed",
        EventKind::WorkflowFiltered => "filtered",
        _ => return None,
    })
}
