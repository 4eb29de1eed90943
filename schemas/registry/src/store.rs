//! The registry's state, rebuilt by applying the records of the `_schemas` log in order. Pure: no Kafka, no
//! clock. Every instance that applies the same log holds the same state, which is what makes ids agree across a
//! restart and across instances.
//!
//! Writers race without coordination: each appends a claim (subject, version, id, schema) under a key no other
//! claim uses, and the first claim in log order wins every id, version and schema it names; a later claim that
//! contradicts a winner binds nothing, so its writer re-plans. Claims are never rewritten or tombstoned, and
//! nothing else decides a race, so compaction (which only drops a record whose key is written again later) keeps
//! every claim in its order and every instance, restarted or not, picks the same winners. Deleting a version is
//! a separate record and never frees its id or its version number.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use crate::compat::{self, Existing, Level};

/// Ids and versions stay within Java's `int`, which is what Confluent's clients decode them into.
pub const MAX_NUMBER: u32 = i32::MAX as u32;

/// Key of a `_schemas` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "keytype", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LogKey {
    /// A claim of `version` of `subject`, with the id and schema in the value. Confluent's key plus `claim`:
    /// Confluent keys a version by (subject, version) alone, so two racing claims of one version share a key
    /// and compaction keeps the later, losing one. `claim` is the offset of a record its writer wrote and had
    /// applied when planning (see [`Store::plan_registration`]); each writer plans one claim per such record,
    /// so no two claims share a key. A key without `claim` is read as a claim too (logs written before it).
    Schema {
        subject: String,
        version: u32,
        magic: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        claim: Option<i64>,
    },
    Config {
        subject: Option<String>,
        magic: u8,
    },
    /// Written and awaited to learn that everything before it has been applied.
    Noop {
        magic: u8,
    },
    /// Soft or permanent deletion of a version. Kept apart from the claim so that deleting never rewrites the
    /// claim (which would move it behind a losing claim of its id) and so that a permanent deletion is a record
    /// that stays, not a tombstone that compaction would drop, bringing the version back.
    DeleteVersion {
        subject: String,
        version: u32,
        magic: u8,
    },
}

impl LogKey {
    pub fn claim(subject: &str, version: u32, claim: i64) -> LogKey {
        LogKey::Schema {
            subject: subject.to_string(),
            version,
            magic: 1,
            claim: Some(claim),
        }
    }

    pub fn delete_version(subject: &str, version: u32) -> LogKey {
        LogKey::DeleteVersion {
            subject: subject.to_string(),
            version,
            magic: 1,
        }
    }
}

/// Value of a `SCHEMA` record: Confluent's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaValue {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema: String,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_type: Option<String>,
}

/// Value of a `DELETE_VERSION` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletionValue {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub permanent: bool,
}

/// Value of a `CONFIG` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigValue {
    pub compatibility_level: String,
}

/// A schema in canonical text (compact JSON, keys sorted) with its parsed form.
#[derive(Debug)]
pub struct CanonicalSchema {
    pub text: String,
    pub parsed: Schema,
}

impl CanonicalSchema {
    /// Parses an Avro schema given as JSON text; whitespace and key order do not make a different schema.
    pub fn parse(text: &str) -> Result<CanonicalSchema, String> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let canonical = json.to_string();
        // apache-avro 0.22 panics on some malformed schemas (a `precision` that is an object on a field type
        // with a default, say) instead of returning an error; the text comes from clients and from the log.
        let parsed = std::panic::catch_unwind(|| Schema::parse_str(&canonical))
            .map_err(|_| "the Avro parser failed on this schema".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(CanonicalSchema {
            text: canonical,
            parsed,
        })
    }
}

/// A version as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionEntry {
    pub id: u32,
    pub deleted: bool,
}

/// How far a version has been deleted; it only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deletion {
    Live,
    Soft,
    /// Gone from every listing, but its number is not given out again and its id stays bound to its schema.
    Permanent,
}

#[derive(Debug, Clone, Copy)]
struct Version {
    id: u32,
    deletion: Deletion,
}

/// What registering a schema under a subject comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The subject already has this schema as a live version.
    Existing { id: u32, version: u32 },
    /// Append a claim of this version and id.
    New { id: u32, version: u32 },
}

/// Why a schema cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The schema breaks the subject's compatibility level; the reasons.
    Incompatible(Vec<String>),
    /// No id or version number is left below [`MAX_NUMBER`].
    OutOfNumbers(String),
}

/// What applying a well-formed record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// A claim that lost its race to an earlier one; it changed nothing. Expected when instances race.
    Lost(String),
}

#[derive(Default)]
pub struct Store {
    /// Every id ever won, with its schema. Never removed: an id means one schema forever.
    schemas: BTreeMap<u32, Arc<CanonicalSchema>>,
    /// The inverse of `schemas`: one id per schema.
    ids: HashMap<String, u32>,
    /// Every version ever won per subject, permanently deleted ones included.
    subjects: BTreeMap<String, BTreeMap<u32, Version>>,
    global_level: Option<Level>,
    subject_levels: HashMap<String, Level>,
}

impl Store {
    /// Applies one log record. Err describes a record that could not be applied (it is skipped).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<Applied, String> {
        let key: LogKey = serde_json::from_slice(key).map_err(|e| {
            format!(
                "skipping record with unknown key {:?}: {e}",
                String::from_utf8_lossy(key)
            )
        })?;
        match key {
            LogKey::Noop { .. } => Ok(Applied::Done),
            LogKey::Config { subject, .. } => self.apply_config(subject, value),
            LogKey::Schema {
                subject, version, ..
            } => match value {
                // Only logs written before DELETE_VERSION have these: a permanent deletion.
                None => self.apply_deletion(&subject, version, None, Deletion::Permanent),
                Some(v) => {
                    let record: SchemaValue = serde_json::from_slice(v)
                        .map_err(|e| format!("skipping bad schema value: {e}"))?;
                    if record.subject != subject || record.version != version {
                        return Err(format!(
                            "skipping claim whose value ({} v{}) differs from its key ({subject} v{version})",
                            record.subject, record.version
                        ));
                    }
                    self.apply_claim(record)
                }
            },
            LogKey::DeleteVersion {
                subject, version, ..
            } => {
                let Some(v) = value else {
                    return Err(format!(
                        "ignoring a tombstone for the deletion of {subject} v{version}: deletions are final"
                    ));
                };
                let record: DeletionValue = serde_json::from_slice(v)
                    .map_err(|e| format!("skipping bad deletion value: {e}"))?;
                let deletion = if record.permanent {
                    Deletion::Permanent
                } else {
                    Deletion::Soft
                };
                self.apply_deletion(&subject, version, Some(record.id), deletion)
            }
        }
    }

    fn apply_config(
        &mut self,
        subject: Option<String>,
        value: Option<&[u8]>,
    ) -> Result<Applied, String> {
        let level = match value {
            None => None,
            Some(v) => {
                let cfg: ConfigValue = serde_json::from_slice(v)
                    .map_err(|e| format!("skipping bad config value: {e}"))?;
                Some(
                    cfg.compatibility_level
                        .parse::<Level>()
                        .map_err(|e| e.to_string())?,
                )
            }
        };
        match (subject, level) {
            (None, level) => self.global_level = level,
            (Some(s), Some(level)) => {
                self.subject_levels.insert(s, level);
            }
            (Some(s), None) => {
                self.subject_levels.remove(&s);
            }
        }
        Ok(Applied::Done)
    }

    /// The race rule. It looks only at earlier claims, never at deletions or configs, so that dropping a
    /// superseded deletion or config record cannot change a verdict.
    fn apply_claim(&mut self, record: SchemaValue) -> Result<Applied, String> {
        if record.id > MAX_NUMBER || record.version == 0 || record.version > MAX_NUMBER {
            return Err(format!(
                "skipping claim of {} v{} for id {}: out of range",
                record.subject, record.version, record.id
            ));
        }
        let schema = CanonicalSchema::parse(&record.schema)
            .map_err(|e| format!("skipping claim of id {}: {e}", record.id))?;
        let claim = format!(
            "claim of {} v{} for id {}",
            record.subject, record.version, record.id
        );
        if let Some(bound) = self.schemas.get(&record.id) {
            if bound.text != schema.text {
                return Ok(Applied::Lost(format!("{claim}: the id has another schema")));
            }
        }
        if let Some(&id) = self.ids.get(&schema.text) {
            if id != record.id {
                return Ok(Applied::Lost(format!("{claim}: the schema has id {id}")));
            }
        }
        let versions = self.subjects.entry(record.subject).or_default();
        if let Some(held) = versions.get_mut(&record.version) {
            if held.id != record.id {
                return Ok(Applied::Lost(format!(
                    "{claim}: the version holds id {}",
                    held.id
                )));
            }
            // The same claim again (two writers registering one schema at once, or a log written before
            // DELETE_VERSION soft-deleting by rewriting it): nothing new to bind.
            if record.deleted {
                held.deletion = held.deletion.max(Deletion::Soft);
            }
            return Ok(Applied::Done);
        }
        versions.insert(
            record.version,
            Version {
                id: record.id,
                deletion: if record.deleted {
                    Deletion::Soft
                } else {
                    Deletion::Live
                },
            },
        );
        self.ids.insert(schema.text.clone(), record.id);
        self.schemas.insert(record.id, Arc::new(schema));
        Ok(Applied::Done)
    }

    fn apply_deletion(
        &mut self,
        subject: &str,
        version: u32,
        id: Option<u32>,
        deletion: Deletion,
    ) -> Result<Applied, String> {
        let held = self
            .subjects
            .get_mut(subject)
            .and_then(|versions| versions.get_mut(&version))
            .filter(|held| id.is_none_or(|id| id == held.id))
            .ok_or_else(|| {
                format!("skipping deletion of {subject} v{version}: no such version with that id")
            })?;
        held.deletion = held.deletion.max(deletion);
        Ok(Applied::Done)
    }

    /// How many schemas (distinct ids) are held.
    pub fn schema_count(&self) -> usize {
        self.schemas.len()
    }

    pub fn schema(&self, id: u32) -> Option<&Arc<CanonicalSchema>> {
        self.schemas.get(&id)
    }

    /// Subjects with a live version, or with any version not permanently deleted when `deleted` is set.
    pub fn subjects(&self, deleted: bool) -> Vec<String> {
        self.subjects
            .iter()
            .filter(|(_, versions)| versions.values().any(|v| shown(v.deletion, deleted)))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Versions of a subject, ascending; `None` when the subject has none to show.
    pub fn versions(&self, subject: &str, deleted: bool) -> Option<Vec<(u32, VersionEntry)>> {
        let versions: Vec<_> = self
            .subjects
            .get(subject)?
            .iter()
            .filter(|(_, v)| shown(v.deletion, deleted))
            .map(|(n, v)| {
                (
                    *n,
                    VersionEntry {
                        id: v.id,
                        deleted: v.deletion != Deletion::Live,
                    },
                )
            })
            .collect();
        (!versions.is_empty()).then_some(versions)
    }

    /// The version `version` of `subject`, or its latest for `None`; live only unless `deleted`.
    pub fn version(
        &self,
        subject: &str,
        version: Option<u32>,
        deleted: bool,
    ) -> Option<(u32, VersionEntry)> {
        let versions = self.versions(subject, deleted)?;
        match version {
            None => versions.last().copied(),
            Some(n) => versions.into_iter().find(|(v, _)| *v == n),
        }
    }

    /// Live subject/version pairs that use schema `id`.
    pub fn usages(&self, id: u32) -> Vec<(String, u32)> {
        self.subjects
            .iter()
            .flat_map(|(s, versions)| {
                versions
                    .iter()
                    .filter(move |(_, v)| v.id == id && v.deletion == Deletion::Live)
                    .map(move |(n, _)| (s.clone(), *n))
            })
            .collect()
    }

    /// The version of `subject` holding `schema`, with the schema's id.
    pub fn lookup(
        &self,
        subject: &str,
        schema: &CanonicalSchema,
        deleted: bool,
    ) -> Option<(u32, u32)> {
        let id = *self.ids.get(&schema.text)?;
        self.versions(subject, deleted)?
            .into_iter()
            .rev()
            .find(|(_, e)| e.id == id)
            .map(|(v, e)| (v, e.id))
    }

    pub fn global_level(&self) -> Level {
        self.global_level.unwrap_or(Level::DEFAULT)
    }

    pub fn subject_level(&self, subject: &str) -> Option<Level> {
        self.subject_levels.get(subject).copied()
    }

    pub fn effective_level(&self, subject: &str) -> Level {
        self.subject_level(subject)
            .unwrap_or_else(|| self.global_level())
    }

    /// Reasons `candidate` may not join `subject` under `level`, checked against the live versions
    /// (all of them, or only `only_version`).
    pub fn incompatibilities(
        &self,
        subject: &str,
        candidate: &CanonicalSchema,
        level: Level,
        only_version: Option<u32>,
    ) -> Vec<String> {
        let versions = self.versions(subject, false).unwrap_or_default();
        let existing: Vec<Existing<'_>> = versions
            .iter()
            .filter(|(v, _)| only_version.is_none_or(|o| o == *v))
            .filter_map(|(v, e)| {
                self.schemas.get(&e.id).map(|s| Existing {
                    version: *v,
                    schema: &s.parsed,
                })
            })
            .collect();
        compat::check(level, &candidate.parsed, &existing)
    }

    /// Decides how to register `schema` under `subject`: the live version that has it, or a claim of the next
    /// version with the schema's id (the id it already has in any subject, else the next free one). A claim
    /// is answered only once a later plan finds it as `Existing`, that is once it won.
    pub fn plan_registration(
        &self,
        subject: &str,
        schema: &CanonicalSchema,
    ) -> Result<Registration, Refusal> {
        if let Some((version, id)) = self.lookup(subject, schema, false) {
            return Ok(Registration::Existing { id, version });
        }
        let problems = self.incompatibilities(subject, schema, self.effective_level(subject), None);
        if !problems.is_empty() {
            return Err(Refusal::Incompatible(problems));
        }
        let id = match self.ids.get(&schema.text) {
            Some(&id) => id,
            None => next_number(self.schemas.keys().next_back(), "schema ids")?,
        };
        // Permanently deleted versions count: a version number, like an id, is never given out twice.
        let version = next_number(
            self.subjects
                .get(subject)
                .and_then(|v| v.keys().next_back()),
            "versions of this subject",
        )?;
        Ok(Registration::New { id, version })
    }
}

fn shown(deletion: Deletion, deleted: bool) -> bool {
    match deletion {
        Deletion::Live => true,
        Deletion::Soft => deleted,
        Deletion::Permanent => false,
    }
}

fn next_number(last: Option<&u32>, what: &str) -> Result<u32, Refusal> {
    match last {
        None => Ok(1),
        Some(&n) if n < MAX_NUMBER => Ok(n + 1),
        Some(_) => Err(Refusal::OutOfNumbers(format!(
            "no {what} are left below {MAX_NUMBER}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &LogKey) -> Vec<u8> {
        serde_json::to_vec(k).unwrap()
    }

    fn claim(subject: &str, version: u32, id: u32, schema: &str, at: i64) -> (Vec<u8>, Vec<u8>) {
        (
            key(&LogKey::claim(subject, version, at)),
            serde_json::to_vec(&SchemaValue {
                subject: subject.into(),
                version,
                id,
                schema: schema.into(),
                deleted: false,
                schema_type: None,
            })
            .unwrap(),
        )
    }

    fn deletion(subject: &str, version: u32, id: u32, permanent: bool) -> (Vec<u8>, Vec<u8>) {
        (
            key(&LogKey::delete_version(subject, version)),
            serde_json::to_vec(&DeletionValue {
                subject: subject.into(),
                version,
                id,
                permanent,
            })
            .unwrap(),
        )
    }

    /// A log as the broker holds it, offsets implied by position.
    type Log = Vec<(Vec<u8>, Option<Vec<u8>>)>;

    fn replay(log: &Log) -> Store {
        let mut store = Store::default();
        for (k, v) in log {
            let _ = store.apply(k, v.as_deref());
        }
        store
    }

    /// What Kafka's compaction may leave: of the records sharing a key only the last, order kept otherwise;
    /// tombstones dropped too (after `delete.retention.ms`).
    fn compacted(log: &Log) -> Log {
        let mut kept: Log = Vec::new();
        for (i, (k, v)) in log.iter().enumerate() {
            let superseded = log[i + 1..].iter().any(|(later, _)| later == k);
            if !superseded && v.is_some() {
                kept.push((k.clone(), v.clone()));
            }
        }
        kept
    }

    /// Every id the store answers with, and its schema.
    fn answers(store: &Store) -> Vec<(String, u32, u32, String)> {
        let mut all = Vec::new();
        for subject in store.subjects(true) {
            for (version, entry) in store.versions(&subject, true).unwrap() {
                let schema = store.schema(entry.id).unwrap().text.clone();
                all.push((subject.clone(), version, entry.id, schema));
            }
        }
        all
    }

    fn canonical(text: &str) -> String {
        CanonicalSchema::parse(text).unwrap().text
    }

    const A: &str = r#"{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}"#;
    const B: &str = r#"{"type":"record","name":"B","fields":[{"name":"y","type":"int"}]}"#;
    const C: &str = r#"{"type":"record","name":"C","fields":[{"name":"z","type":"int"}]}"#;

    #[test]
    fn keys_use_confluents_layout_plus_the_claim() {
        assert_eq!(
            String::from_utf8(key(&LogKey::claim("s", 2, 17))).unwrap(),
            r#"{"keytype":"SCHEMA","subject":"s","version":2,"magic":1,"claim":17}"#
        );
        // Keys written before the claim field still read as claims.
        let legacy: LogKey =
            serde_json::from_str(r#"{"keytype":"SCHEMA","subject":"s","version":2,"magic":1}"#)
                .unwrap();
        assert!(matches!(legacy, LogKey::Schema { claim: None, .. }));
        assert_eq!(
            String::from_utf8(key(&LogKey::delete_version("s", 2))).unwrap(),
            r#"{"keytype":"DELETE_VERSION","subject":"s","version":2,"magic":1}"#
        );
    }

    #[test]
    fn the_loser_of_a_race_for_one_version_and_id_is_not_answered() {
        // Two writers planned v1 with id 1 of subject s for different schemas; A's claim reached the log first.
        let mut store = Store::default();
        let (k, v) = claim("s", 1, 1, A, 0);
        assert_eq!(store.apply(&k, Some(&v)), Ok(Applied::Done));
        let (k, v) = claim("s", 1, 1, B, 1);
        assert!(matches!(store.apply(&k, Some(&v)), Ok(Applied::Lost(_))));

        let a = CanonicalSchema::parse(A).unwrap();
        let b = CanonicalSchema::parse(B).unwrap();
        assert_eq!(
            store.plan_registration("s", &a),
            Ok(Registration::Existing { id: 1, version: 1 })
        );
        // B's writer plans again: a new version and a new id, not A's.
        assert!(matches!(
            store.plan_registration("s", &b),
            Err(Refusal::Incompatible(_))
        ));
        store
            .apply(
                &key(&LogKey::Config {
                    subject: None,
                    magic: 0,
                }),
                Some(br#"{"compatibilityLevel":"NONE"}"#),
            )
            .unwrap();
        assert_eq!(
            store.plan_registration("s", &b),
            Ok(Registration::New { id: 2, version: 2 })
        );
    }

    /// The interleaving that made two racing instances answer two clients with id 6 for two schemas: instance
    /// X claimed id 6 for f11 at offset 1, instance Y claimed it for f64 at offset 2, and the broker showed
    /// offset 2 to Y's reader while it was still storing offset 1 (nisshi hands out an offset before it stores
    /// the record). A reader that applies records as they come skips the winning claim for good.
    #[test]
    fn a_reader_that_skips_a_claim_still_being_written_answers_with_another_schemas_id() {
        let race = |i: usize| {
            format!(
                r#"{{"type":"record","name":"Race","namespace":"t","fields":[{{"name":"f{i}","type":["null","int"],"default":null}}]}}"#
            )
        };
        let (f1, f11, f64) = (race(1), race(11), race(64));
        let log: Log = vec![
            claim("race-1-value", 1, 5, &f1, 0),
            claim("race-1-value", 2, 6, &f11, 0),
            claim("race-4-value", 1, 6, &f64, 0),
        ]
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
        let f11 = CanonicalSchema::parse(&f11).unwrap();
        let f64 = CanonicalSchema::parse(&f64).unwrap();

        // Every instance that reads the whole log: id 6 is f11's, f64's claim lost and its writer plans again.
        let whole = replay(&log);
        assert_eq!(
            whole.plan_registration("race-1-value", &f11),
            Ok(Registration::Existing { id: 6, version: 2 })
        );
        assert_eq!(
            whole.plan_registration("race-4-value", &f64),
            Ok(Registration::New { id: 7, version: 1 })
        );

        // Y's reader as it was: offsets 0 and 2 as delivered, 1 never. Y answered its client with id 6.
        let skipped = replay(&vec![log[0].clone(), log[2].clone()]);
        assert_eq!(
            skipped.plan_registration("race-4-value", &f64),
            Ok(Registration::Existing { id: 6, version: 1 })
        );

        // Y's reader now: the records go through the log's order first. Offset 2 waits for offset 1, so Y has
        // not read past its own claim and cannot answer; a second read finds offset 1 and Y plans again.
        let mut order = crate::log::Sequencer::default();
        let mut view = Store::default();
        let t = std::time::Instant::now();
        let deliver = |order: &mut crate::log::Sequencer, view: &mut Store, at: usize| {
            let (k, v) = &log[at];
            for record in order.deliver(at as i64, k, v.as_deref(), t) {
                let _ = view.apply(&record.key, record.value.as_deref());
            }
        };
        deliver(&mut order, &mut view, 0);
        deliver(&mut order, &mut view, 2);
        assert_eq!(order.next(), 1, "applied past a claim it has not read");
        assert_eq!(
            view.plan_registration("race-4-value", &f64),
            Ok(Registration::New { id: 6, version: 1 })
        );
        assert!(order.reread_at().is_some());
        assert_eq!(order.reread(t), 1);
        deliver(&mut order, &mut view, 1);
        deliver(&mut order, &mut view, 2);
        assert_eq!(order.next(), 3);
        assert_eq!(answers(&view), answers(&whole));
        assert_eq!(
            view.plan_registration("race-4-value", &f64),
            Ok(Registration::New { id: 7, version: 1 })
        );
    }

    #[test]
    fn races_for_an_id_a_version_or_a_schema_are_won_by_the_first_claim() {
        let mut log: Log = Vec::new();
        let mut push = |(k, v): (Vec<u8>, Vec<u8>)| log.push((k, Some(v)));
        push(claim("s1", 1, 1, A, 0));
        // Another subject claimed the same new id for another schema.
        push(claim("s2", 1, 1, B, 1));
        // Another schema claimed s1's version 1 with the next id.
        push(claim("s1", 1, 2, C, 2));
        // A's schema claimed under another id.
        push(claim("s3", 1, 3, A, 3));
        // Two writers registering the same schema under the same subject at once both win.
        push(claim("s4", 1, 1, A, 4));
        push(claim("s4", 1, 1, A, 5));
        let store = replay(&log);
        assert_eq!(
            answers(&store),
            vec![
                ("s1".into(), 1, 1, canonical(A)),
                ("s4".into(), 1, 1, canonical(A))
            ]
        );
        assert_eq!(store.schema(2).map(|s| s.text.clone()), None);
        assert_eq!(store.schema(3).map(|s| s.text.clone()), None);
    }

    #[test]
    fn compaction_and_deletions_never_remap_an_id() {
        let mut log: Log = Vec::new();
        let mut push = |(k, v): (Vec<u8>, Vec<u8>)| log.push((k, Some(v)));
        push(claim("s1", 1, 1, A, 0));
        push(claim("s2", 1, 1, B, 1)); // lost: id 1 is A's
        push(claim("s1", 1, 1, B, 2)); // lost: same key as the winner in Confluent's layout
        push(claim("s2", 1, 2, B, 3));
        // s1 v1 deleted, then deleted permanently; s2 v1 soft-deleted.
        push(deletion("s1", 1, 1, false));
        push(deletion("s2", 1, 2, false));
        push(deletion("s1", 1, 1, true));
        // Some noise that compaction collapses.
        for _ in 0..3 {
            log.push((key(&LogKey::Noop { magic: 0 }), Some(b"{}".to_vec())));
        }

        let live = replay(&log);
        let after = replay(&compacted(&log));
        for store in [&live, &after] {
            assert_eq!(store.schema(1).unwrap().text, canonical(A));
            assert_eq!(store.schema(2).unwrap().text, canonical(B));
            assert_eq!(store.subjects(true), vec!["s2".to_string()]);
            assert_eq!(
                store.versions("s2", true),
                Some(vec![(
                    1,
                    VersionEntry {
                        id: 2,
                        deleted: true
                    }
                )])
            );
            // Registering after the permanent deletion: A keeps id 1 and s1 gets a new version number;
            // a new schema gets a new id, not a freed one.
            let a = CanonicalSchema::parse(A).unwrap();
            let c = CanonicalSchema::parse(C).unwrap();
            assert_eq!(
                store.plan_registration("s1", &a),
                Ok(Registration::New { id: 1, version: 2 })
            );
            assert_eq!(
                store.plan_registration("s1", &c),
                Ok(Registration::New { id: 3, version: 2 })
            );
        }
        assert_eq!(answers(&live), answers(&after));
    }

    #[test]
    fn logs_written_before_the_claim_field_still_apply() {
        let legacy_key = br#"{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}"#;
        let value = |deleted: bool| {
            serde_json::to_vec(&SchemaValue {
                subject: "s".into(),
                version: 1,
                id: 1,
                schema: A.into(),
                deleted,
                schema_type: None,
            })
            .unwrap()
        };
        let mut store = Store::default();
        store.apply(legacy_key, Some(&value(false))).unwrap();
        assert_eq!(store.versions("s", false).unwrap().len(), 1);
        store.apply(legacy_key, Some(&value(true))).unwrap();
        assert_eq!(store.versions("s", false), None);
        assert_eq!(store.versions("s", true).unwrap().len(), 1);
        store.apply(legacy_key, None).unwrap();
        assert_eq!(store.versions("s", true), None);
        assert_eq!(store.schema(1).unwrap().text, canonical(A));
    }

    #[test]
    fn registration_reuses_global_ids_and_numbers_versions_per_subject() {
        let mut store = Store::default();
        let a = CanonicalSchema::parse(A).unwrap();
        assert_eq!(
            store.plan_registration("s1", &a),
            Ok(Registration::New { id: 1, version: 1 })
        );
        let (k, v) = claim("s1", 1, 1, A, 0);
        store.apply(&k, Some(&v)).unwrap();
        assert_eq!(
            store.plan_registration("s1", &a),
            Ok(Registration::Existing { id: 1, version: 1 })
        );
        assert_eq!(
            store.plan_registration("s2", &a),
            Ok(Registration::New { id: 1, version: 1 })
        );
        // Whitespace does not make another schema.
        let spaced = CanonicalSchema::parse(&A.replace(',', " , ")).unwrap();
        assert_eq!(
            store.plan_registration("s1", &spaced),
            Ok(Registration::Existing { id: 1, version: 1 })
        );
    }

    #[test]
    fn incompatible_schema_is_refused_under_the_subjects_level() {
        let mut store = Store::default();
        let (k, v) = claim("s", 1, 1, A, 0);
        store.apply(&k, Some(&v)).unwrap();
        let b = CanonicalSchema::parse(B).unwrap();
        assert!(matches!(
            store.plan_registration("s", &b),
            Err(Refusal::Incompatible(_))
        ));
        let cfg_key = key(&LogKey::Config {
            subject: Some("s".into()),
            magic: 0,
        });
        let cfg = br#"{"compatibilityLevel":"NONE"}"#;
        store.apply(&cfg_key, Some(cfg)).unwrap();
        assert_eq!(
            store.plan_registration("s", &b),
            Ok(Registration::New { id: 2, version: 2 })
        );
        store.apply(&cfg_key, None).unwrap();
        assert_eq!(store.effective_level("s"), Level::Backward);
    }

    #[test]
    fn hostile_records_are_skipped_not_fatal() {
        let mut store = Store::default();
        let bad: Vec<(&[u8], Option<&[u8]>)> = vec![
            (
                br#"{"keytype":"MODE","subject":null,"magic":0}"#,
                Some(b"{}"),
            ),
            (b"\xff\xfe", Some(b"{}")),
            (
                br#"{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}"#,
                Some(b"["),
            ),
            (
                br#"{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}"#,
                Some(br#"{"subject":"t","version":1,"id":1,"schema":"\"int\""}"#),
            ),
            (
                br#"{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}"#,
                Some(br#"{"subject":"s","version":1,"id":4294967295,"schema":"\"int\""}"#),
            ),
            (
                br#"{"keytype":"SCHEMA","subject":"s","version":0,"magic":1}"#,
                Some(br#"{"subject":"s","version":0,"id":1,"schema":"\"int\""}"#),
            ),
            (
                br#"{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}"#,
                Some(br#"{"subject":"s","version":1,"id":1,"schema":"{\"type\":\"nope\"}"}"#),
            ),
            (
                br#"{"keytype":"DELETE_VERSION","subject":"s","version":1,"magic":1}"#,
                Some(br#"{"subject":"s","version":1,"id":1,"permanent":true}"#),
            ),
            (
                br#"{"keytype":"DELETE_VERSION","subject":"s","version":1,"magic":1}"#,
                None,
            ),
            (
                br#"{"keytype":"CONFIG","subject":null,"magic":0}"#,
                Some(br#"{"compatibilityLevel":"SIDEWAYS"}"#),
            ),
        ];
        for (k, v) in bad {
            assert!(
                store.apply(k, v).is_err(),
                "{:?}",
                String::from_utf8_lossy(k)
            );
        }
        assert!(store.subjects(true).is_empty());
        assert_eq!(store.global_level(), Level::DEFAULT);
    }

    #[test]
    fn a_schema_that_panics_the_avro_parser_is_refused() {
        let hostile = r#"{"type":"record","name":"R","fields":[{"name":"x","type":{"type":"map","values":"int","precision":{}},"default":{"a":"b"}}]}"#;
        assert!(CanonicalSchema::parse(hostile).is_err());
        let mut store = Store::default();
        let (k, v) = claim("s", 1, 1, hostile, 0);
        assert!(store.apply(&k, Some(&v)).is_err());
    }

    /// A tiny deterministic generator, so that the simulated races below replay the same way every run.
    struct Dice(u64);

    impl Dice {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    enum Writer {
        Idle,
        /// Planned a claim on a view of the log, not appended yet: other writers run in between.
        Planned {
            subject: String,
            schema: String,
            claim: (u32, u32),
            seen: i64,
        },
        /// Appended its claim; plans again on a view that includes it.
        Claimed {
            subject: String,
            schema: String,
            seen: i64,
        },
    }

    #[test]
    fn simulated_races_with_deletions_and_compaction_never_answer_another_schema() {
        let schema = |i: usize| {
            format!(
                r#"{{"type":"record","name":"R","fields":[{{"name":"f{i}","type":["null","int"],"default":null}}]}}"#
            )
        };
        let mut contested = 0;
        for seed in 1..=40u64 {
            let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut log: Log = Vec::new();
            let mut todo: Vec<(String, String)> = (0..30)
                .map(|i| (format!("s{}", i % 3), schema(i % 24)))
                .collect();
            let mut writers: Vec<Writer> = (0..3).map(|_| Writer::Idle).collect();
            let mut answered: Vec<(String, String, u32)> = Vec::new();
            let mut view = Store::default();
            let mut applied = 0;
            while !todo.is_empty() || writers.iter().any(|w| !matches!(w, Writer::Idle)) {
                let w = dice.below(writers.len());
                for (k, v) in &log[applied..] {
                    let _ = view.apply(k, v.as_deref());
                }
                applied = log.len();
                let next = match std::mem::replace(&mut writers[w], Writer::Idle) {
                    Writer::Idle if dice.below(8) == 0 => {
                        // Delete some version a step further, as an operator might at any time.
                        let subject = format!("s{}", dice.below(3));
                        if let Some(versions) = view.versions(&subject, true) {
                            let (version, entry) = versions[dice.below(versions.len())];
                            let (k, v) = deletion(&subject, version, entry.id, entry.deleted);
                            log.push((k, Some(v)));
                        }
                        Writer::Idle
                    }
                    Writer::Idle => match todo.pop() {
                        None => Writer::Idle,
                        Some((subject, schema)) => {
                            log.push((key(&LogKey::Noop { magic: 0 }), Some(b"{}".to_vec())));
                            Writer::Claimed {
                                subject,
                                schema,
                                seen: log.len() as i64 - 1,
                            }
                        }
                    },
                    Writer::Planned {
                        subject,
                        schema,
                        claim: (id, version),
                        seen,
                    } => {
                        let (k, v) = claim(&subject, version, id, &schema, seen);
                        log.push((k, Some(v)));
                        Writer::Claimed {
                            subject,
                            schema,
                            seen: log.len() as i64 - 1,
                        }
                    }
                    Writer::Claimed {
                        subject,
                        schema,
                        seen,
                    } => {
                        let parsed = CanonicalSchema::parse(&schema).unwrap();
                        match view.plan_registration(&subject, &parsed).unwrap() {
                            Registration::Existing { id, .. } => {
                                answered.push((subject, parsed.text, id));
                                Writer::Idle
                            }
                            Registration::New { id, version } => Writer::Planned {
                                subject,
                                schema,
                                claim: (id, version),
                                seen,
                            },
                        }
                    }
                };
                writers[w] = next;
            }
            let live = replay(&log);
            let after = replay(&compacted(&log));
            assert_eq!(answers(&live), answers(&after), "seed {seed}");
            for (subject, schema, id) in &answered {
                for store in [&live, &after] {
                    assert_eq!(
                        store.schema(*id).map(|s| &s.text),
                        Some(schema),
                        "seed {seed}: {subject} was answered with id {id}"
                    );
                }
            }
            let mut claims = HashMap::new();
            for (k, _) in &log {
                if let Ok(LogKey::Schema {
                    subject, version, ..
                }) = serde_json::from_slice::<LogKey>(k)
                {
                    *claims.entry((subject, version)).or_insert(0) += 1;
                }
            }
            contested += claims.values().filter(|&&n| n > 1).count();
        }
        assert!(contested > 0, "the simulation never raced");
    }

    #[test]
    fn numbers_stop_at_javas_int() {
        let mut store = Store::default();
        let (k, v) = claim("s", MAX_NUMBER, MAX_NUMBER, A, 0);
        store.apply(&k, Some(&v)).unwrap();
        let b = CanonicalSchema::parse(B).unwrap();
        assert!(matches!(
            store.plan_registration("t", &b),
            Err(Refusal::OutOfNumbers(_))
        ));
        let a = CanonicalSchema::parse(A).unwrap();
        assert_eq!(
            store.plan_registration("t", &a),
            Ok(Registration::New {
                id: MAX_NUMBER,
                version: 1
            })
        );
        let (k, v) = claim("s", 1, 1, A, 0);
        assert!(matches!(store.apply(&k, Some(&v)), Ok(Applied::Lost(_))));
    }
}
