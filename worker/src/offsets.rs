//! Which offsets may be committed, per owned partition, when tasks finish out of order: everything below the
//! oldest task still running (or, with none running, everything up to the newest finished). Ownership is part of
//! the bookkeeping: each assignment of a partition is an *epoch* with a [`Lease`]; revoking a partition drops
//! its entry (ending the lease), so a task of an earlier epoch that finishes later never moves a commit.

use std::collections::{BTreeSet, HashMap};

use tokio::sync::watch;

struct PartitionOffsets {
    epoch: u64,
    running: BTreeSet<i64>,
    /// Next offset after the newest finished task.
    finished_end: i64,
    /// Highest offset handed out for commit (the next offset to read).
    committed: i64,
    /// Dropped with the entry: every [`Lease`] of this epoch then reads as revoked.
    lease: watch::Sender<()>,
}

impl PartitionOffsets {
    fn new(epoch: u64) -> PartitionOffsets {
        PartitionOffsets {
            epoch,
            running: BTreeSet::new(),
            finished_end: 0,
            committed: 0,
            lease: watch::channel(()).0,
        }
    }

    fn committable(&self) -> i64 {
        self.running.first().copied().unwrap_or(self.finished_end)
    }
}

/// A task's place in the tracker: what to complete when it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    epoch: u64,
}

/// Whether this worker still owns the partition a task came from (in the epoch it came in).
#[derive(Clone)]
pub struct Lease(watch::Receiver<()>);

impl Lease {
    pub fn is_revoked(&self) -> bool {
        self.0.has_changed().is_err()
    }

    /// Resolves once the partition is revoked.
    pub async fn revoked(&self) {
        let mut rx = self.0.clone();
        // Nothing is ever sent: `changed` only returns when the sender (the tracker's entry) is dropped.
        while rx.changed().await.is_ok() {}
    }
}

#[derive(Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), PartitionOffsets>,
    epochs: u64,
}

impl OffsetTracker {
    /// The partition is (still) ours. An entry that exists is kept: ownership did not lapse.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        let epochs = &mut self.epochs;
        self.partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                *epochs += 1;
                PartitionOffsets::new(*epochs)
            });
    }

    /// A task was taken from `offset`: commits stay below it until it completes.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) -> (Position, Lease) {
        self.assign(topic, partition);
        let p = self
            .partitions
            .get_mut(&(topic.to_string(), partition))
            .expect("assigned above");
        p.running.insert(offset);
        (
            Position {
                topic: topic.to_string(),
                partition,
                offset,
                epoch: p.epoch,
            },
            Lease(p.lease.subscribe()),
        )
    }

    /// The task at `position` is acknowledged (its result or dead letter is on the broker). Ignored when the
    /// partition was revoked since the task started: its offset is another owner's to commit.
    pub fn complete(&mut self, position: &Position) -> bool {
        match self
            .partitions
            .get_mut(&(position.topic.clone(), position.partition))
        {
            Some(p) if p.epoch == position.epoch => {
                p.running.remove(&position.offset);
                p.finished_end = p.finished_end.max(position.offset + 1);
                true
            }
            _ => false,
        }
    }

    /// The offsets to commit now (the next offset to read, per partition) that were not committed before.
    pub fn take_committable(&mut self) -> Vec<((String, i32), i64)> {
        let mut ready = Vec::new();
        for (key, p) in &mut self.partitions {
            let next = p.committable();
            if next > p.committed {
                p.committed = next;
                ready.push((key.clone(), next));
            }
        }
        ready
    }

    /// Committing `next` failed: hand it out again unless a later offset was handed out since (which covers it).
    /// Nothing happens for a partition that is no longer ours.
    pub fn commit_failed(&mut self, topic: &str, partition: i32, next: i64) {
        if let Some(p) = self.partitions.get_mut(&(topic.to_string(), partition)) {
            if p.committed == next {
                p.committed = next - 1;
            }
        }
    }

    /// The partition is no longer ours: forgets it (ending its lease) and returns the offset still to commit
    /// for what finished before, if any. Call it before the revocation is acknowledged to the group.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let p = self.partitions.remove(&(topic.to_string(), partition))?;
        let next = p.committable();
        (next > p.committed).then_some(next)
    }

    /// Number of tasks running in owned partitions.
    pub fn running(&self) -> usize {
        self.partitions.values().map(|p| p.running.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> (String, i32) {
        ("tasks".to_string(), p)
    }

    #[test]
    fn commits_stop_at_the_oldest_running_task() {
        let mut t = OffsetTracker::default();
        let pos: Vec<Position> = (10..14).map(|o| t.start("tasks", 0, o).0).collect();
        t.complete(&pos[2]);
        t.complete(&pos[3]);
        assert_eq!(t.take_committable(), vec![(key(0), 10)]);
        t.complete(&pos[0]);
        assert_eq!(t.take_committable(), vec![(key(0), 11)]);
        assert!(t.take_committable().is_empty(), "nothing new to commit");
        t.complete(&pos[1]);
        assert_eq!(t.take_committable(), vec![(key(0), 14)]);
    }

    #[test]
    fn revoke_hands_back_what_finished_and_ends_the_lease() {
        let mut t = OffsetTracker::default();
        let (a, lease_a) = t.start("tasks", 0, 5);
        let (b, _) = t.start("tasks", 0, 6);
        let (other, lease_other) = t.start("tasks", 1, 0);
        t.complete(&a);
        assert!(!lease_a.is_revoked());
        assert_eq!(
            t.revoke("tasks", 0),
            Some(6),
            "5 is done, 6 is still running"
        );
        assert!(
            lease_a.is_revoked(),
            "the lease of a revoked partition ends"
        );
        assert!(!lease_other.is_revoked(), "other partitions keep theirs");
        // A task of the revoked partition finishing later commits nothing.
        assert!(!t.complete(&b));
        assert!(
            t.take_committable().is_empty(),
            "partition 1 has nothing done yet"
        );
        assert_eq!(t.revoke("tasks", 0), None, "nothing left to commit");
        t.complete(&other);
        assert_eq!(t.revoke("tasks", 1), Some(1));
    }

    #[test]
    fn a_task_of_an_earlier_assignment_does_not_move_the_new_owners_commit() {
        let mut t = OffsetTracker::default();
        let (old, _) = t.start("tasks", 0, 7);
        assert_eq!(t.revoke("tasks", 0), Some(7));
        // Assigned again: the records from the committed offset on are delivered anew.
        t.assign("tasks", 0);
        let (again, lease) = t.start("tasks", 0, 7);
        let (next, _) = t.start("tasks", 0, 8);
        assert!(!lease.is_revoked());
        assert!(!t.complete(&old), "old epoch");
        t.complete(&next);
        assert_eq!(
            t.take_committable(),
            vec![(key(0), 7)],
            "7 is running in the new epoch"
        );
        assert!(t.complete(&again));
        assert_eq!(t.take_committable(), vec![(key(0), 9)]);
        assert_eq!(t.running(), 0);
    }

    #[test]
    fn a_failed_commit_is_handed_out_again_unless_superseded() {
        let mut t = OffsetTracker::default();
        let (a, _) = t.start("tasks", 0, 0);
        t.complete(&a);
        assert_eq!(t.take_committable(), vec![(key(0), 1)]);
        t.commit_failed("tasks", 0, 1);
        assert_eq!(t.take_committable(), vec![(key(0), 1)], "again");
        let (b, _) = t.start("tasks", 0, 1);
        t.complete(&b);
        assert_eq!(t.take_committable(), vec![(key(0), 2)]);
        t.commit_failed("tasks", 0, 1);
        assert!(t.take_committable().is_empty(), "2 covers 1");
        t.commit_failed("gone", 3, 1);
    }

    #[test]
    fn assigning_an_owned_partition_keeps_its_running_tasks() {
        let mut t = OffsetTracker::default();
        let (a, lease) = t.start("tasks", 0, 3);
        t.assign("tasks", 0);
        assert!(!lease.is_revoked());
        assert_eq!(t.take_committable(), vec![(key(0), 3)]);
        assert!(t.complete(&a));
        assert_eq!(t.take_committable(), vec![(key(0), 4)]);
    }

    #[tokio::test]
    async fn a_lease_wakes_its_waiters_on_revoke() {
        let mut t = OffsetTracker::default();
        let (_, lease) = t.start("tasks", 2, 0);
        let waiter = tokio::spawn(async move { lease.revoked().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        t.revoke("tasks", 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
