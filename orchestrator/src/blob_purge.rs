//! Deleting the blobs of purged workflows (see `edow_blobs`), off the batch loop: once a workflow's tombstone is
//! written its id is queued here and a background task deletes what the blob store holds for it, trying a few
//! times. A blob a crash or a full queue leaves behind is only storage: nothing refers to it any more.

use std::time::Duration;

use edow_blobs::Blobs;
use tokio::sync::mpsc;

/// Purged workflows waiting for their blobs to be deleted, at most.
const QUEUE: usize = 100_000;
const ATTEMPTS: u32 = 3;

/// Where to send the ids of purged workflows.
#[derive(Clone)]
pub(crate) struct BlobPurges(mpsc::Sender<String>);

impl BlobPurges {
    /// Starts the task that deletes the blobs of the ids it is sent; it ends when every sender is dropped.
    pub(crate) fn start(blobs: Blobs) -> BlobPurges {
        let (sender, mut ids) = mpsc::channel::<String>(QUEUE);
        tokio::spawn(async move {
            while let Some(id) = ids.recv().await {
                purge(&blobs, &id).await;
            }
        });
        BlobPurges(sender)
    }

    pub(crate) fn purged(&self, id: &str) {
        if self.0.try_send(id.to_string()).is_err() {
            tracing::warn!(
                workflow_id = %id,
                "the queue of blob deletions is full; this workflow's blobs stay in the store"
            );
        }
    }
}

async fn purge(blobs: &Blobs, id: &str) {
    for attempt in 1..=ATTEMPTS {
        match blobs.purge(id).await {
            Ok(0) => return,
            Ok(deleted) => {
                tracing::debug!(workflow_id = %id, deleted, "purged the workflow's blobs");
                return;
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::debug!(workflow_id = %id, attempt, "deleting blobs failed, trying again: {e}");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
            }
            Err(e) => tracing::warn!(
                workflow_id = %id,
                "could not delete the purged workflow's blobs; they stay in the store: {e}"
            ),
        }
    }
}
