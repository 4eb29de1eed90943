//! The registry's state, rebuilt by applying the records of the `_schemas` log in order. Pure: no Kafka, no
//! clock. Every instance that applies the same log holds the same state, which is what makes ids agree across a
//! restart and across instances.
//!
//! Records use Confluent's `_schemas` layout (JSON keys with a `keytype`). Two writers may race for the same new
//! id or version; the record that reaches the log first wins and a later record claiming a taken id or version
//! for a different schema is ignored by every instance, so the losing writer sees its claim missing and retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use crate::compat::{self, Existing, Level};

/// Key of a `_schemas` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "keytype", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LogKey {
    Schema {
        subject: String,
        version: u32,
        magic: u8,
    },
    Config {
        subject: Option<String>,
        magic: u8,
    },
    /// Written and awaited to learn that everything before it has been applied.
    Noop {
        magic: u8,
    },
}

/// Value of a `SCHEMA` record.
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
        let parsed = Schema::parse_str(&canonical).map_err(|e| e.to_string())?;
        Ok(CanonicalSchema {
            text: canonical,
            parsed,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionEntry {
    pub id: u32,
    pub deleted: bool,
}

/// What registering a schema under a subject comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The subject already has this schema as a live version.
    Existing { id: u32, version: u32 },
    /// Append a record claiming this version and id.
    New { id: u32, version: u32 },
}

#[derive(Default)]
pub struct Store {
    schemas: BTreeMap<u32, Arc<CanonicalSchema>>,
    ids: HashMap<String, u32>,
    subjects: BTreeMap<String, BTreeMap<u32, VersionEntry>>,
    global_level: Option<Level>,
    subject_levels: HashMap<String, Level>,
}

impl Store {
    /// Applies one log record. Returns a description of a record that could not be applied (it is skipped).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let key: LogKey = match serde_json::from_slice(key) {
            Ok(k) => k,
            Err(e) => {
                return Err(format!(
                    "skipping record with unknown key {:?}: {e}",
                    String::from_utf8_lossy(key)
                ))
            }
        };
        match key {
            LogKey::Noop { .. } => Ok(()),
            LogKey::Config { subject, .. } => {
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
                Ok(())
            }
            LogKey::Schema {
                subject, version, ..
            } => match value {
                None => {
                    if let Some(versions) = self.subjects.get_mut(&subject) {
                        versions.remove(&version);
                        if versions.is_empty() {
                            self.subjects.remove(&subject);
                        }
                    }
                    Ok(())
                }
                Some(v) => {
                    let record: SchemaValue = serde_json::from_slice(v)
                        .map_err(|e| format!("skipping bad schema value: {e}"))?;
                    self.apply_schema(record)
                }
            },
        }
    }

    fn apply_schema(&mut self, record: SchemaValue) -> Result<(), String> {
        let schema = CanonicalSchema::parse(&record.schema)
            .map_err(|e| format!("skipping schema id {}: {e}", record.id))?;
        if let Some(existing) = self.schemas.get(&record.id) {
            if existing.text != schema.text {
                return Err(format!(
                    "ignoring claim of id {} for {} v{}: the id is taken by another schema",
                    record.id, record.subject, record.version
                ));
            }
        }
        if let Some(entry) = self
            .subjects
            .get(&record.subject)
            .and_then(|v| v.get(&record.version))
        {
            if entry.id != record.id {
                return Err(format!(
                    "ignoring claim of {} v{} for id {}: the version holds id {}",
                    record.subject, record.version, record.id, entry.id
                ));
            }
        }
        self.ids.entry(schema.text.clone()).or_insert(record.id);
        self.schemas
            .entry(record.id)
            .or_insert_with(|| Arc::new(schema));
        self.subjects.entry(record.subject).or_default().insert(
            record.version,
            VersionEntry {
                id: record.id,
                deleted: record.deleted,
            },
        );
        Ok(())
    }

    pub fn schema(&self, id: u32) -> Option<&Arc<CanonicalSchema>> {
        self.schemas.get(&id)
    }

    /// Subjects with a live version, or with any version when `deleted` is set.
    pub fn subjects(&self, deleted: bool) -> Vec<String> {
        self.subjects
            .iter()
            .filter(|(_, versions)| deleted || versions.values().any(|v| !v.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Versions of a subject, ascending; `None` when the subject has none to show.
    pub fn versions(&self, subject: &str, deleted: bool) -> Option<Vec<(u32, VersionEntry)>> {
        let versions: Vec<_> = self
            .subjects
            .get(subject)?
            .iter()
            .filter(|(_, e)| deleted || !e.deleted)
            .map(|(v, e)| (*v, *e))
            .collect();
        (!versions.is_empty()).then_some(versions)
    }

    /// The live version `version` of `subject`, or its latest live version for `None`.
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

    /// Subject/version pairs that use schema `id`.
    pub fn usages(&self, id: u32) -> Vec<(String, u32)> {
        self.subjects
            .iter()
            .flat_map(|(s, versions)| {
                versions
                    .iter()
                    .filter(move |(_, e)| e.id == id && !e.deleted)
                    .map(move |(v, _)| (s.clone(), *v))
            })
            .collect()
    }

    /// The version of `subject` holding `schema`, if any.
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

    /// Decides how to register `schema` under `subject`: the live version that has it, or a new version with
    /// the schema's global id (reused when any subject has the same schema). Err holds the incompatibilities.
    pub fn plan_registration(
        &self,
        subject: &str,
        schema: &CanonicalSchema,
    ) -> Result<Registration, Vec<String>> {
        if let Some((version, id)) = self.lookup(subject, schema, false) {
            return Ok(Registration::Existing { id, version });
        }
        let problems = self.incompatibilities(subject, schema, self.effective_level(subject), None);
        if !problems.is_empty() {
            return Err(problems);
        }
        let id = self
            .ids
            .get(&schema.text)
            .copied()
            .unwrap_or_else(|| self.schemas.keys().next_back().copied().unwrap_or(0) + 1);
        let version = self
            .subjects
            .get(subject)
            .and_then(|v| v.keys().next_back().copied())
            .unwrap_or(0)
            + 1;
        Ok(Registration::New { id, version })
    }

    /// Whether `subject` v`version` now holds `id` (a claim that lost a race does not).
    pub fn holds(&self, subject: &str, version: u32, id: u32) -> bool {
        self.subjects
            .get(subject)
            .and_then(|v| v.get(&version))
            .is_some_and(|e| e.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &LogKey) -> Vec<u8> {
        serde_json::to_vec(k).unwrap()
    }

    fn schema_record(subject: &str, version: u32, id: u32, schema: &str) -> (Vec<u8>, Vec<u8>) {
        (
            key(&LogKey::Schema {
                subject: subject.into(),
                version,
                magic: 1,
            }),
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

    const A: &str = r#"{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}"#;
    const B: &str = r#"{"type":"record","name":"B","fields":[{"name":"y","type":"int"}]}"#;

    #[test]
    fn keys_use_confluents_layout() {
        let k = LogKey::Schema {
            subject: "s".into(),
            version: 2,
            magic: 1,
        };
        assert_eq!(
            String::from_utf8(key(&k)).unwrap(),
            r#"{"keytype":"SCHEMA","subject":"s","version":2,"magic":1}"#
        );
    }

    #[test]
    fn first_claim_of_an_id_wins_and_later_claims_are_ignored() {
        let mut store = Store::default();
        let (k, v) = schema_record("s1", 1, 1, A);
        store.apply(&k, Some(&v)).unwrap();
        // A racing writer claimed id 1 for another schema: ignored by every instance.
        let (k, v) = schema_record("s2", 1, 1, B);
        assert!(store.apply(&k, Some(&v)).is_err());
        assert!(!store.holds("s2", 1, 1));
        assert!(store.holds("s1", 1, 1));
        // And a different id for a taken version is ignored too.
        let (k, v) = schema_record("s1", 1, 2, B);
        assert!(store.apply(&k, Some(&v)).is_err());
        assert_eq!(
            store.schema(1).unwrap().text,
            CanonicalSchema::parse(A).unwrap().text
        );
    }

    #[test]
    fn registration_reuses_global_ids_and_numbers_versions_per_subject() {
        let mut store = Store::default();
        let a = CanonicalSchema::parse(A).unwrap();
        assert_eq!(
            store.plan_registration("s1", &a),
            Ok(Registration::New { id: 1, version: 1 })
        );
        let (k, v) = schema_record("s1", 1, 1, A);
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
        let (k, v) = schema_record("s", 1, 1, A);
        store.apply(&k, Some(&v)).unwrap();
        let b = CanonicalSchema::parse(B).unwrap();
        assert!(store.plan_registration("s", &b).is_err());
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
    fn unknown_record_kinds_are_skipped_not_fatal() {
        let mut store = Store::default();
        assert!(store
            .apply(
                br#"{"keytype":"MODE","subject":null,"magic":0}"#,
                Some(b"{}")
            )
            .is_err());
        assert!(store.subjects(true).is_empty());
    }
}
