//! What an orchestrator instance holds for one owned partition: the workflow instances whose changelog lives in
//! it, their retry timers, and where the partition's lifecycle events end. Also the changelog record format.
//!
//! Each changelog record carries an outbox: the commands of the instance's last change. Outputs are produced only
//! after the changelog record is acknowledged, so after a crash the outbox tells a restoring instance what may not
//! have been produced; it checks the co-partitioned events topic for those event ids and re-produces only what is
//! missing. That is how a crash neither loses a step nor emits a lifecycle event twice.

use std::collections::{BTreeSet, HashMap};

use edow_engine::{Command, Instance, Millis, Status};
use edow_schemas::contracts::{WorkflowState, WorkflowStatus};
use serde::{Deserialize, Serialize};

/// Version of the `engine_state` JSON layout.
pub const ENGINE_STATE_VERSION: i32 = 1;

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
            engine_state: serde_json::to_string(self).expect("engine state serialises"),
        }
    }

    pub fn from_record(record: &WorkflowState) -> Result<Persisted, String> {
        if record.engine_state_version != ENGINE_STATE_VERSION {
            return Err(format!(
                "engine_state_version {} is not understood by this orchestrator (it reads {ENGINE_STATE_VERSION}); \
                 upgrade the orchestrator",
                record.engine_state_version
            ));
        }
        serde_json::from_str(&record.engine_state)
            .map_err(|e| format!("engine_state is unreadable: {e}"))
    }
}

/// The instances of one owned partition.
#[derive(Default)]
pub struct PartitionState {
    pub instances: HashMap<String, Persisted>,
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
