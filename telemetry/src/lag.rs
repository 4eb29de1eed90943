//! Consumer lag from librdkafka's statistics: each group member reports, for the partitions it owns, the high
//! watermark minus the group's committed offset, which is what kafka-lag-exporter and KMinion compute from the
//! outside. A member that loses a partition stops reporting it, and the new owner takes over the series.

use std::collections::BTreeSet;
use std::sync::Mutex;

use rdkafka::statistics::Statistics;

use crate::metrics::CONSUMER_LAG;

/// How often librdkafka reports statistics to a consumer that exports lag, in milliseconds; the operator may
/// set `statistics.interval.ms` through `--kafka-option` to change it.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// The lag series one consumer group member reports, to withdraw those of partitions it no longer owns.
pub struct LagReporter {
    group: String,
    reported: Mutex<BTreeSet<(String, i32)>>,
}

impl LagReporter {
    pub fn new(group: impl Into<String>) -> LagReporter {
        LagReporter {
            group: group.into(),
            reported: Mutex::new(BTreeSet::new()),
        }
    }

    /// Sets the lag of every partition the member owns per `statistics`, and removes the series of partitions it
    /// owned before but not now.
    pub fn report(&self, statistics: &Statistics) {
        let mut now = BTreeSet::new();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // -1 is librdkafka's partition for records not yet assigned one; `desired` marks the assignment.
                if *partition < 0 || !p.desired {
                    continue;
                }
                let Some(lag) = lag(p.consumer_lag, p.committed_offset, p.lo_offset, p.hi_offset)
                else {
                    continue;
                };
                CONSUMER_LAG
                    .with_label_values(&[&self.group, topic, &partition.to_string()])
                    .set(lag);
                now.insert((topic.clone(), *partition));
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in reported.difference(&now) {
            let _ = CONSUMER_LAG.remove_label_values(&[&self.group, topic, &partition.to_string()]);
        }
        *reported = now;
    }

    /// Withdraws every series (the member left the group).
    pub fn clear(&self) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in std::mem::take(&mut *reported) {
            let _ =
                CONSUMER_LAG.remove_label_values(&[&self.group, &topic, &partition.to_string()]);
        }
    }
}

/// The lag of one partition: librdkafka's own figure when it knows the committed offset; when the group has
/// committed nothing there yet, everything the partition still holds is unconsumed (edow's consumers start at
/// the earliest offset). `None` while the high watermark is unknown.
fn lag(consumer_lag: i64, committed: i64, low: i64, high: i64) -> Option<i64> {
    if high < 0 {
        return None;
    }
    if consumer_lag >= 0 && committed >= 0 {
        return Some(consumer_lag);
    }
    Some((high - low.max(0)).max(0))
}

#[cfg(test)]
mod tests {
    use super::lag;

    #[test]
    fn lag_is_high_watermark_minus_committed() {
        assert_eq!(lag(7, 3, 0, 10), Some(7));
        assert_eq!(lag(0, 10, 0, 10), Some(0));
    }

    #[test]
    fn nothing_committed_counts_what_the_partition_holds() {
        assert_eq!(lag(-1, -1001, 2, 10), Some(8));
        assert_eq!(lag(-1, -1001, -1, 4), Some(4));
    }

    #[test]
    fn unknown_high_watermark_reports_nothing() {
        assert_eq!(lag(-1, 5, 0, -1), None);
    }
}
