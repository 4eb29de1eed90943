//! Cron schedules: each fire time of a schedule starts one instance of its workflow, whatever the number of
//! orchestrator instances. Schedules live in the compacted topic `edow.schedules` (`schedule/NAME`; a tombstone
//! deletes), with how far each has fired (`fired/NAME`). Every instance reads the whole topic; the instance that
//! owns the triggers partition of a schedule's name fires it, with the instance id `NAME@<fire time>`: an
//! overlap during a rebalance, or a crash between a trigger and its `fired` record, produces the same trigger
//! twice, and the orchestrator starts an id once. Fire times missed while no instance ran are caught up by the
//! schedule's policy: `skip` them, fire `one` (the latest), or `all`, within its window.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use chrono::{TimeZone, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use edow_kafka::murmur2::partition_for;
use edow_kafka::{now_millis, produce_all, Outgoing, TopicSpec};
use edow_schemas::contracts::Schedule;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::client::{Client, ClientError, StartRequest};

/// A fire time younger than this is on time, not missed, whatever the catch-up policy: it covers a rebalance
/// (the new owner restores before it fires) and a slow broker.
pub const GRACE_MS: i64 = 60_000;
/// Most fire times one schedule starts per tick.
const MAX_PER_TICK: usize = 1_000;
/// How often due fire times are looked for.
const TICK: Duration = Duration::from_millis(200);
/// Longest catch-up window accepted.
const MAX_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;
/// Trigger attributes naming the schedule and the fire time of an instance it started.
pub const SCHEDULE_ATTRIBUTE: &str = "edow.schedule";
pub const FIRE_TIME_ATTRIBUTE: &str = "edow.fire-time";

/// What to do with fire times missed while no instance ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    Skip,
    One,
    All,
}

/// A schedule checked: its cron parsed, its zone known.
#[derive(Debug, Clone)]
pub struct Checked {
    pub record: Schedule,
    cron: Cron,
    zone: chrono_tz::Tz,
    catch_up: CatchUp,
}

/// Checks `record`, naming the field that is wrong.
pub fn check(record: Schedule) -> Result<Checked, ClientError> {
    let name_ok = !record.name.is_empty()
        && record.name.len() <= 200
        && record
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return Err(ClientError::invalid(
            "name",
            "1 to 200 letters, digits, '-', '_' or '.'",
        ));
    }
    if record.workflow_version.is_some_and(|v| v < 1) {
        return Err(ClientError::invalid("version", "versions start at 1"));
    }
    if record.workflow_name.trim().is_empty() {
        return Err(ClientError::invalid(
            "workflow",
            "name the workflow to start",
        ));
    }
    let fields = record.cron.split_whitespace().count();
    if !(fields == 5 || fields == 6 || record.cron.trim_start().starts_with('@')) {
        return Err(ClientError::invalid(
            "cron",
            format!(
                "{fields} fields; write 5 (minute hour day month weekday) or 6 (seconds first)"
            ),
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(&record.cron)
        .map_err(|e| ClientError::invalid("cron", format!("{}: {e}", record.cron)))?;
    let zone = chrono_tz::Tz::from_str(&record.time_zone).map_err(|_| {
        ClientError::invalid(
            "time_zone",
            format!(
                "{} is not an IANA time zone (e.g. UTC, Europe/Paris)",
                record.time_zone
            ),
        )
    })?;
    let catch_up = match record.catch_up.as_str() {
        "skip" => CatchUp::Skip,
        "one" => CatchUp::One,
        "all" => CatchUp::All,
        other => {
            return Err(ClientError::invalid(
                "catch_up",
                format!("{other}: one of skip, one, all"),
            ))
        }
    };
    if !(0..=MAX_WINDOW_MS).contains(&record.catch_up_window_ms) {
        return Err(ClientError::invalid("window", "from 0 to 7 days"));
    }
    serde_json::from_str::<serde_json::Value>(&record.input)
        .map_err(|e| ClientError::invalid("input", format!("not a JSON document: {e}")))?;
    let checked = Checked {
        record,
        cron,
        zone,
        catch_up,
    };
    if checked.next_after(now_millis()).is_none() {
        return Err(ClientError::invalid("cron", "never fires"));
    }
    Ok(checked)
}

impl Checked {
    /// The first fire time after `after`, epoch ms.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let start = Utc
            .timestamp_millis_opt(after)
            .single()?
            .with_timezone(&self.zone);
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// The fire times to start at `now`, given the last one started (`None`: none yet), by the catch-up policy.
    /// A fire time less than [`GRACE_MS`] old is on time; older ones are missed, and the policy says which of
    /// them, within the window, are started: none (`skip`), the latest (`one`), or all, oldest first, at most
    /// [`MAX_PER_TICK`] per call (the rest at the next).
    pub fn due(&self, fired_through: Option<i64>, now: i64) -> Vec<i64> {
        // Never before the schedule existed, nor again what was started.
        // Progress from before the schedule was (re)made does not count: its fire times start at its creation.
        let created = self.record.created_at.saturating_sub(1);
        let after = fired_through.map_or(created, |f| f.max(created));
        let window_start = now.saturating_sub(self.record.catch_up_window_ms);
        let on_time_start = now.saturating_sub(GRACE_MS);
        let mut due = match self.catch_up {
            CatchUp::Skip => Vec::new(),
            CatchUp::One => self
                .last_at_or_before(on_time_start)
                .filter(|t| *t > after && *t >= window_start)
                .into_iter()
                .collect(),
            CatchUp::All => self.between(
                after.max(window_start.saturating_sub(1)),
                on_time_start,
                MAX_PER_TICK,
            ),
        };
        if due.len() < MAX_PER_TICK {
            let from = after.max(on_time_start);
            due.extend(self.between(from, now, MAX_PER_TICK - due.len()));
        }
        due
    }

    /// Fire times in (`after`, `until`], at most `most`, oldest first.
    fn between(&self, after: i64, until: i64, most: usize) -> Vec<i64> {
        let mut times = Vec::new();
        let mut at = after;
        while times.len() < most {
            match self.next_after(at).filter(|t| *t <= until) {
                Some(next) => {
                    times.push(next);
                    at = next;
                }
                None => break,
            }
        }
        times
    }

    /// The latest fire time at or before `at`.
    fn last_at_or_before(&self, at: i64) -> Option<i64> {
        let start = Utc
            .timestamp_millis_opt(at)
            .single()?
            .with_timezone(&self.zone);
        let previous = self.cron.find_previous_occurrence(&start, true).ok()?;
        Some(previous.timestamp_millis())
    }
}

/// The instance id of `schedule`'s fire at `at`: the same on every instance.
pub fn instance_id(schedule: &str, at: i64) -> String {
    let time = Utc
        .timestamp_millis_opt(at)
        .single()
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| at.to_string());
    format!("{schedule}@{time}")
}

/// One schedule as every instance knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Known {
    pub name: String,
    pub workflow: String,
    pub version: Option<i32>,
    pub cron: String,
    pub time_zone: String,
    pub input: serde_json::Value,
    pub catch_up: String,
    pub window_ms: i64,
    pub source: String,
    pub created_at: i64,
    pub fired_through: Option<i64>,
    pub next_fire_at: Option<i64>,
}

/// The schedules read from the topic, shared with the API.
#[derive(Clone, Default)]
pub struct Table(Arc<RwLock<Entries>>);

#[derive(Default)]
struct Entries {
    schedules: BTreeMap<String, Entry>,
    /// How far schedules not read yet have fired: compaction can leave a `fired/NAME` before its `schedule/NAME`.
    fired_early: HashMap<String, i64>,
}

/// A schedule and the last fire time started.
type Entry = (Checked, Option<i64>);

impl Table {
    pub fn list(&self) -> Vec<Known> {
        let now = now_millis();
        let table = self.0.read().unwrap_or_else(|e| e.into_inner());
        table
            .schedules
            .values()
            .map(|(checked, fired)| {
                let r = &checked.record;
                Known {
                    name: r.name.clone(),
                    workflow: r.workflow_name.clone(),
                    version: r.workflow_version,
                    cron: r.cron.clone(),
                    time_zone: r.time_zone.clone(),
                    input: serde_json::from_str(&r.input).unwrap_or_default(),
                    catch_up: r.catch_up.clone(),
                    window_ms: r.catch_up_window_ms,
                    source: r.source.clone(),
                    created_at: r.created_at,
                    fired_through: *fired,
                    next_fire_at: checked.next_after(now),
                }
            })
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .schedules
            .contains_key(name)
    }
}

/// The schedule a definition declares, named after it, checked (its fields named `schedule.<field>`).
pub fn of_definition(
    definition: &edow_engine::Definition,
    declared: &edow_engine::definition::DefinitionSchedule,
) -> Result<Schedule, ClientError> {
    let record = Schedule {
        name: definition.name.clone(),
        workflow_name: definition.name.clone(),
        workflow_version: None,
        cron: declared.cron.clone(),
        time_zone: declared.time_zone.clone().unwrap_or_else(|| "UTC".into()),
        input: declared
            .input
            .clone()
            .unwrap_or_else(|| serde_json::json!({}))
            .to_string(),
        catch_up: declared.catch_up.clone().unwrap_or_else(|| "skip".into()),
        catch_up_window_ms: definition.schedule_window.map_or(3_600_000, |w| {
            i64::try_from(w.as_millis()).unwrap_or(i64::MAX)
        }),
        source: "definition".into(),
        created_at: now_millis(),
        fired_through: None,
    };
    match check(record) {
        Ok(checked) => Ok(checked.record),
        Err(ClientError::Invalid { field, message }) => {
            Err(ClientError::invalid(&format!("schedule.{field}"), message))
        }
        Err(e) => Err(e),
    }
}

impl Client {
    /// After a deploy of `name`: stores the schedule it declares, or removes the one an earlier version
    /// declared.
    pub(crate) async fn deploy_schedule(
        &self,
        name: &str,
        schedule: Option<Schedule>,
    ) -> Result<(), ClientError> {
        match schedule {
            Some(record) => {
                self.put_schedule(record).await?;
            }
            None => {
                let declared = self
                    .schedules()
                    .await?
                    .list()
                    .into_iter()
                    .any(|s| s.name == name && s.source == "definition");
                if declared {
                    self.delete_schedule(name).await?;
                }
            }
        }
        Ok(())
    }
}

fn schedule_key(name: &str) -> String {
    format!("schedule/{name}")
}

fn fired_key(name: &str) -> String {
    format!("fired/{name}")
}

impl Client {
    /// Creates or replaces the schedule `record` (checked first).
    pub async fn put_schedule(&self, record: Schedule) -> Result<Checked, ClientError> {
        let checked = check(record)?;
        let topic = self.topics.schedules();
        self.kafka
            .ensure_topics(&[TopicSpec::new(topic.clone(), 1, self.replication_factor).compacted()])
            .await?;
        let payload = self.codec.encode(&topic, &checked.record).await?;
        let record = Outgoing {
            topic,
            partition: Some(0),
            key: schedule_key(&checked.record.name).into_bytes(),
            payload: Some(payload),
            headers: Vec::new(),
        };
        produce_all(&self.producer, &[record]).await?;
        Ok(checked)
    }

    /// Deletes the schedule `name` and its progress.
    pub async fn delete_schedule(&self, name: &str) -> Result<(), ClientError> {
        let topic = self.topics.schedules();
        let tombstones: Vec<Outgoing> = [schedule_key(name), fired_key(name)]
            .into_iter()
            .map(|key| Outgoing {
                topic: topic.clone(),
                partition: Some(0),
                key: key.into_bytes(),
                payload: None,
                headers: Vec::new(),
            })
            .collect();
        produce_all(&self.producer, &tombstones).await?;
        Ok(())
    }

    /// Every schedule in the topic, read to its end (for the CLI, which keeps no table).
    pub async fn schedules(&self) -> Result<Table, ClientError> {
        let table = Table::default();
        let topic = self.topics.schedules();
        let partitions = {
            let (kafka, topic) = (self.kafka.clone(), topic.clone());
            tokio::task::spawn_blocking(move || kafka.partition_count(&topic))
                .await
                .map_err(anyhow::Error::from)??
        };
        if partitions == 0 {
            return Ok(table);
        }
        let mut chunks = self.kafka.stream_to_end(&topic, 0, Offset::Beginning, 500);
        while let Some(chunk) = chunks.recv().await {
            for record in chunk? {
                apply(&table, &self.codec, record.key(), record.payload())
                    .await
                    .map_err(|e| ClientError::Unavailable(e.into()))?;
            }
        }
        Ok(table)
    }
}

/// Applies one record of the schedules topic to `table`; `Err` when the registry could not be reached, and the
/// record must be read again.
async fn apply(
    table: &Table,
    codec: &edow_schemas::Codec,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<(), edow_schemas::CodecError> {
    let Some(key) = key.and_then(|k| std::str::from_utf8(k).ok()) else {
        return Ok(());
    };
    let decoded = match value {
        Some(_) => match codec.decode::<Schedule>(value).await {
            Ok(record) => Some(record),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::warn!(key, "skipping a schedules record: {e}");
                return Ok(());
            }
        },
        None => None,
    };
    table.apply(key, decoded);
    Ok(())
}

impl Table {
    /// Applies a decoded record (`None`: a tombstone) of key `key`.
    fn apply(&self, key: &str, decoded: Option<Schedule>) {
        let mut table = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = key.strip_prefix("schedule/") {
            if decoded.as_ref().is_some_and(|r| r.name != name) {
                tracing::warn!(
                    key,
                    "a schedule record names another schedule than its key; refused"
                );
                return;
            }
            match decoded.map(check) {
                Some(Ok(checked)) => {
                    let early = table.fired_early.remove(name);
                    let known = table.schedules.get(name).and_then(|(_, fired)| *fired);
                    table
                        .schedules
                        .insert(name.to_string(), (checked, known.max(early)));
                }
                Some(Err(e)) => {
                    // Not the old one either: the schedule as stored is this one, and it cannot fire.
                    tracing::warn!(schedule = name, "a stored schedule is refused: {e}");
                    table.schedules.remove(name);
                }

                None => {
                    table.schedules.remove(name);
                    table.fired_early.remove(name);
                }
            }
        } else if let Some(name) = key.strip_prefix("fired/") {
            let Some(through) = decoded.and_then(|r| r.fired_through) else {
                table.fired_early.remove(name);
                return;
            };
            match table.schedules.get_mut(name) {
                Some((_, fired)) => *fired = Some(fired.map_or(through, |f| f.max(through))),
                None => {
                    let early = table.fired_early.entry(name.to_string()).or_insert(through);
                    *early = (*early).max(through);
                }
            }
        }
    }
}

/// Keeps `table` read from the schedules topic and fires the schedules whose triggers partition this instance
/// owns (`owned`), until `stop` resolves.
pub async fn run(
    client: Client,
    table: Table,
    partitions: i32,
    owned: tokio::sync::watch::Receiver<BTreeSet<i32>>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let topic = client.topics.schedules();
    client
        .kafka
        .ensure_topics(&[TopicSpec::new(topic.clone(), 1, client.replication_factor).compacted()])
        .await?;
    let consumer: StreamConsumer = client
        .kafka
        .trailing_reader_config(Duration::from_millis(500))
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the schedules reader")?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Fire only once the topic has been read to the end it had at start: a `fired` record not read yet would
    // make fire times be started again (harmless, deduplicated, but noisy).
    let (_, mut end) = {
        let (kafka, topic) = (client.kafka.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            kafka
                .reader()?
                .fetch_watermarks(&topic, 0, Duration::from_secs(10))
                .map_err(anyhow::Error::from)
        })
        .await??
    };
    let mut read_to = 0;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            received = consumer.recv() => match received {
                Ok(record) => {
                    if let Err(e) = apply(&table, &client.codec, record.key(), record.payload()).await {
                        // Read again once the registry answers: a schedule skipped here would never fire here.
                        tracing::warn!("reading schedules waits for the schema registry: {e}");
                        let offset = record.offset();
                        drop(record);
                        consumer.seek(&topic, 0, Offset::Offset(offset), Duration::ZERO)?;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    read_to = record.offset() + 1;
                }
                Err(e) => tracing::warn!("reading schedules: {e}"),
            },
            _ = tick.tick() => {
                if read_to < end {
                    continue;
                }
                end = 0;
                let owned = owned.borrow().clone();
                fire_due(&client, &table, partitions, &owned).await;
            }
        }
    }
}

/// Starts every due fire time of the schedules this instance owns, and records how far each has fired.
async fn fire_due(client: &Client, table: &Table, partitions: i32, owned: &BTreeSet<i32>) {
    let now = now_millis();
    let work: Vec<(Checked, Vec<i64>)> = {
        let table = table.0.read().unwrap_or_else(|e| e.into_inner());
        table
            .schedules
            .values()
            .filter(|(c, _)| owned.contains(&partition_for(c.record.name.as_bytes(), partitions)))
            .map(|(c, fired)| (c.clone(), c.due(*fired, now)))
            .filter(|(_, due)| !due.is_empty())
            .collect()
    };
    for (checked, due) in work {
        let name = checked.record.name.clone();
        let mut through = None;
        for at in due {
            let request = StartRequest {
                name: checked.record.workflow_name.clone(),
                version: checked.record.workflow_version,
                id: Some(instance_id(&name, at)),
                input: checked.record.input.clone(),
                attributes: HashMap::from([
                    (SCHEDULE_ATTRIBUTE.to_string(), name.clone()),
                    (FIRE_TIME_ATTRIBUTE.to_string(), at.to_string()),
                ]),
                ..StartRequest::default()
            };
            match client.start(request).await {
                Ok(_) => through = Some(at),
                Err(ClientError::Invalid { field, message }) => {
                    // It would fail again at every tick: this fire time is passed over, loudly.
                    tracing::error!(schedule = %name, at, "a fire time cannot start its workflow ({field}: {message}); skipped");
                    through = Some(at);
                }
                Err(ClientError::Unavailable(e)) => {
                    tracing::warn!(schedule = %name, at, "starting a scheduled workflow: {e:#}; tried again shortly");
                    break;
                }
            }
        }
        let Some(through) = through else { continue };
        if let Err(e) = record_fired(client, &checked.record, through).await {
            tracing::warn!(schedule = %name, "recording a fire time: {e:#}; it may be started again (once)");
        }
        let mut table = table.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, fired)) = table.schedules.get_mut(&name) {
            *fired = Some(fired.map_or(through, |f| f.max(through)));
        }
    }
}

async fn record_fired(client: &Client, schedule: &Schedule, through: i64) -> anyhow::Result<()> {
    let topic = client.topics.schedules();
    let record = Schedule {
        fired_through: Some(through),
        ..schedule.clone()
    };
    let payload = client.codec.encode(&topic, &record).await?;
    produce_all(
        &client.producer,
        &[Outgoing {
            topic,
            partition: Some(0),
            key: fired_key(&schedule.name).into_bytes(),
            payload: Some(payload),
            headers: Vec::new(),
        }],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, catch_up: &str, window_ms: i64, created_at: i64) -> Checked {
        check(Schedule {
            name: "nightly".into(),
            workflow_name: "report".into(),
            workflow_version: None,
            cron: cron.into(),
            time_zone: "UTC".into(),
            input: "{}".into(),
            catch_up: catch_up.into(),
            catch_up_window_ms: window_ms,
            source: "api".into(),
            created_at,
            fired_through: None,
        })
        .unwrap()
    }

    const MIN: i64 = 60_000;

    #[test]
    fn on_time_fires_start_and_the_first_waits_for_creation() {
        let s = schedule("*/2 * * * * *", "skip", 0, 1_000_000);
        assert_eq!(s.due(None, 1_000_000 - 1), Vec::<i64>::new());
        // A schedule made at a fire time fires it.
        assert_eq!(
            s.due(None, 1_004_000),
            vec![1_000_000, 1_002_000, 1_004_000]
        );
        assert_eq!(s.due(Some(1_002_000), 1_004_500), vec![1_004_000]);
    }

    #[test]
    fn missed_fires_follow_the_policy_within_the_window() {
        let created = 0;
        let now = 100 * MIN;
        let fired = Some(10 * MIN);
        assert!(schedule("* * * * *", "skip", 60 * MIN, created).due(fired, now + 1) == vec![now]);
        // The latest missed (98 min: over a minute late), and the one on time.
        assert_eq!(
            schedule("* * * * *", "one", 60 * MIN, created).due(fired, now - 30_000),
            vec![98 * MIN, 99 * MIN]
        );
        let all = schedule("* * * * *", "all", 5 * MIN, created).due(fired, now + 1);
        // 95 min is 5 min and 1 ms before now: out of the window.
        assert_eq!(all, vec![96 * MIN, 97 * MIN, 98 * MIN, 99 * MIN, now]);
    }

    #[test]
    fn a_frequent_schedule_long_down_fires_on_time_and_catches_up_boundedly() {
        let week = 7 * 24 * 60 * MIN;
        let now = 10 * week;
        let stopped = now - 2 * 24 * 60 * MIN;
        let fired = Some(stopped);
        let skip = schedule("* * * * * *", "skip", week, 0);
        assert_eq!(
            skip.due(fired, now).last(),
            Some(&now),
            "on time despite two days of misses"
        );
        let one = schedule("* * * * * *", "one", week, 0);
        assert_eq!(
            one.due(fired, now).first(),
            Some(&(now - GRACE_MS)),
            "the latest missed"
        );
        let all = schedule("* * * * * *", "all", week, 0);
        let due = all.due(fired, now);
        assert_eq!(due.len(), MAX_PER_TICK);
        assert_eq!(
            due[0],
            stopped + 1000,
            "oldest first, from where it stopped"
        );
    }

    #[test]
    fn progress_read_before_its_schedule_is_kept() {
        let table = Table::default();
        let record = schedule("* * * * *", "skip", 0, 0).record;
        let fired = Schedule {
            fired_through: Some(42),
            ..record.clone()
        };
        table.apply("fired/nightly", Some(fired));
        table.apply("schedule/nightly", Some(record));
        assert_eq!(table.list()[0].fired_through, Some(42));
        table.apply("schedule/nightly", None);
        assert!(table.list().is_empty());
    }

    #[test]
    fn bad_schedules_name_their_field() {
        let base = schedule("* * * * *", "skip", 0, 0).record;
        for (change, field) in [
            (
                Schedule {
                    cron: "* * *".into(),
                    ..base.clone()
                },
                "cron",
            ),
            (
                Schedule {
                    cron: "99 * * * *".into(),
                    ..base.clone()
                },
                "cron",
            ),
            (
                Schedule {
                    cron: "* * * * * * *".into(),
                    ..base.clone()
                },
                "cron",
            ),
            (
                Schedule {
                    time_zone: "Mars/Olympus".into(),
                    ..base.clone()
                },
                "time_zone",
            ),
            (
                Schedule {
                    catch_up: "some".into(),
                    ..base.clone()
                },
                "catch_up",
            ),
            (
                Schedule {
                    name: "a b".into(),
                    ..base.clone()
                },
                "name",
            ),
            (
                Schedule {
                    input: "{".into(),
                    ..base.clone()
                },
                "input",
            ),
            (
                Schedule {
                    catch_up_window_ms: -1,
                    ..base.clone()
                },
                "window",
            ),
        ] {
            match check(change) {
                Err(ClientError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn ids_name_the_schedule_and_the_fire_time() {
        assert_eq!(
            instance_id("nightly", 1_000),
            "nightly@1970-01-01T00:00:01.000Z"
        );
    }

    #[test]
    fn time_zones_move_fire_times() {
        let mut paris = schedule("0 0 * * *", "skip", 0, 0).record;
        paris.time_zone = "Europe/Paris".into();
        let paris = check(paris).unwrap();
        // Midnight in Paris in January is 23:00 UTC.
        assert_eq!(paris.next_after(0), Some(23 * 3600 * 1000));
    }
}
