//! Which offsets may be committed when tasks finish out of order: per partition, everything below the oldest
//! task still running (or, with none running, everything up to the newest finished).

use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
struct PartitionOffsets {
    running: BTreeSet<i64>,
    /// Next offset after the newest finished task.
    finished_end: i64,
    committed: i64,
}

#[derive(Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), PartitionOffsets>,
}

impl OffsetTracker {
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        self.partitions
            .entry((topic.to_string(), partition))
            .or_default()
            .running
            .insert(offset);
    }

    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&(topic.to_string(), partition)) {
            p.running.remove(&offset);
            p.finished_end = p.finished_end.max(offset + 1);
        }
    }

    /// The offsets to commit now (the next offset to read, per partition) that were not committed before.
    pub fn take_committable(&mut self) -> Vec<((String, i32), i64)> {
        let mut ready = Vec::new();
        for (key, p) in &mut self.partitions {
            let next = p.running.first().copied().unwrap_or(p.finished_end);
            if next > p.committed {
                p.committed = next;
                ready.push((key.clone(), next));
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_oldest_running_task() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.start("tasks", 0, o);
        }
        t.complete("tasks", 0, 12);
        t.complete("tasks", 0, 13);
        assert_eq!(t.take_committable(), vec![(("tasks".to_string(), 0), 10)]);
        t.complete("tasks", 0, 10);
        assert_eq!(t.take_committable(), vec![(("tasks".to_string(), 0), 11)]);
        assert!(t.take_committable().is_empty(), "nothing new to commit");
        t.complete("tasks", 0, 11);
        assert_eq!(t.take_committable(), vec![(("tasks".to_string(), 0), 14)]);
    }
}
