//! The Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary datum) for edow's contracts,
//! through schema_registry_converter. Encoding registers the contract's schema under the topic's value subject
//! (TopicNameStrategy) and writes with that id; decoding fetches the writer's schema by id and resolves the datum
//! into the reader's contract, so a consumer built against version N reads records written with N-1 or N+1
//! wherever the registry accepted the change.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{
    perform_sr_call, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SrCall, SubjectNameStrategy, SuppliedSchema,
};

use crate::contracts::Contract;
use crate::topics::value_subject;

/// Why a record could not be encoded or decoded. [`CodecError::kind`] is the short class used in dead letters.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the record has no value; produce an Avro value in the Confluent wire format")]
    Empty,
    #[error(
        "the value is not in the Confluent wire format: expected magic byte 0x00 and a 4-byte schema id, \
         got {len} bytes starting with {first:#04x}; produce it with a schema-registry Avro serializer"
    )]
    NotFramed { len: usize, first: u8 },
    #[error(
        "schema id {id} is unknown to the schema registry ({detail}); the record was written against another \
         registry or its schema was deleted: register the schema, then replay the record from the dead-letter topic"
    )]
    UnknownSchema { id: u32, detail: String },
    #[error("the schema registry could not be reached ({detail}); it will be retried")]
    RegistryUnavailable { detail: String },
    #[error(
        "the schema registry refused to give schema id {id} ({detail}); check the registry's credentials and \
         that the id names an Avro schema, then replay the record from the dead-letter topic"
    )]
    RegistryRefused { id: u32, detail: String },
    #[error("the bytes do not decode with their writer schema id {id}: {detail}")]
    Undecodable { id: u32, detail: String },
    #[error(
        "the record was written with schema id {id}, which cannot be read as {reader}: {detail}; \
         evolve the schema compatibly (add fields with defaults) or upgrade this reader"
    )]
    Incompatible {
        id: u32,
        reader: &'static str,
        detail: String,
    },
    #[error("the decoded record is not a valid {reader}: {detail}")]
    Invalid {
        reader: &'static str,
        detail: String,
    },
    #[error("could not encode a {writer} for subject {subject}: {detail}")]
    Encode {
        writer: &'static str,
        subject: String,
        detail: String,
    },
}

impl CodecError {
    /// Short class of the error, for the dead-letter `error_kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::Empty => "empty",
            CodecError::NotFramed { .. } => "not_framed",
            CodecError::UnknownSchema { .. } => "unknown_schema",
            CodecError::RegistryUnavailable { .. } => "registry_unavailable",
            CodecError::RegistryRefused { .. } => "registry_refused",
            CodecError::Undecodable { .. } => "undecodable",
            CodecError::Incompatible { .. } => "incompatible",
            CodecError::Invalid { .. } => "invalid",
            CodecError::Encode { .. } => "encode",
        }
    }

    /// Whether trying again later may succeed; a record failing with anything else belongs in a dead-letter topic.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable { .. })
    }
}

/// The schema id of a Confluent-framed value, if it is one.
pub fn schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [0, a, b, c, d, _rest @ ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// How to reach the schema registry beyond its URL: basic auth (Confluent's `basic.auth.user.info`) and a CA
/// for https with a private certificate authority. Its `Debug` shows no password.
#[derive(Clone, Default)]
pub struct RegistryAccess {
    pub basic_auth: Option<(String, String)>,
    /// A PEM certificate trusted besides the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess")
            .field("user", &self.basic_auth.as_ref().map(|(u, _)| u))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

/// The variable holding `USER:PASSWORD` for the registry (a secret: never a flag).
pub const REGISTRY_USER_INFO_VARIABLE: &str = "EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO";
/// The variable naming a file that holds `USER:PASSWORD` (a mounted Docker or Kubernetes secret).
pub const REGISTRY_USER_INFO_FILE_VARIABLE: &str = "EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE";
/// The variable naming a PEM file of the registry's CA.
pub const REGISTRY_CA_VARIABLE: &str = "EDOW_SCHEMA_REGISTRY_CA_LOCATION";

impl RegistryAccess {
    /// From `EDOW_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO` (`USER:PASSWORD`) and
    /// `EDOW_SCHEMA_REGISTRY_CA_LOCATION` (a PEM file), where set.
    pub fn from_environment() -> anyhow::Result<RegistryAccess> {
        RegistryAccess::from_variables(|name| std::env::var(name).ok())
    }

    /// As [`RegistryAccess::from_environment`], with the variables `lookup` gives.
    pub fn from_variables(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<RegistryAccess> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let from_file = match var(REGISTRY_USER_INFO_FILE_VARIABLE) {
            Some(path) => {
                anyhow::ensure!(
                    var(REGISTRY_USER_INFO_VARIABLE).is_none(),
                    "both {REGISTRY_USER_INFO_VARIABLE} and {REGISTRY_USER_INFO_FILE_VARIABLE} are set; keep one"
                );
                let text = read_small(&path).map_err(|e| {
                    anyhow::anyhow!("{REGISTRY_USER_INFO_FILE_VARIABLE}: reading {path}: {e}")
                })?;
                Some((REGISTRY_USER_INFO_FILE_VARIABLE, text.trim().to_string()))
            }
            None => {
                var(REGISTRY_USER_INFO_VARIABLE).map(|info| (REGISTRY_USER_INFO_VARIABLE, info))
            }
        };
        let basic_auth = match from_file {
            Some((source, info)) => {
                let (user, password) = info
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("{source} must hold USER:PASSWORD"))?;
                Some((user.to_string(), password.to_string()))
            }
            None => None,
        };
        let ca_pem = match var(REGISTRY_CA_VARIABLE) {
            Some(path) => Some(
                std::fs::read(&path)
                    .map_err(|e| anyhow::anyhow!("{REGISTRY_CA_VARIABLE}: reading {path}: {e}"))?,
            ),
            None => None,
        };
        Ok(RegistryAccess { basic_auth, ca_pem })
    }
}

/// A secret file's text, refusing what is not a regular file of at most 64 KiB (a FIFO would block the start).
fn read_small(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(64 * 1024 + 1)
        .read_to_string(&mut text)?;
    if text.len() > 64 * 1024 {
        return Err(std::io::Error::other("over 64 KiB"));
    }
    Ok(text)
}

/// Largest single allocation (a string, bytes, an array) made while decoding one record.
pub const MAX_DECODE_ALLOCATION: usize = 16 * 1024 * 1024;

/// Encodes and decodes contracts against one schema registry. Cheap to share: caches schemas and ids.
pub struct Codec {
    settings: SrSettings,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Schema id of each contract type (by type: two types may share a record name) per topic, once the
    /// registry has given it: later records are framed with it and written straight from the Rust type. The
    /// converter would build an intermediate Avro value, copy the schema text into its cache key and
    /// re-validate the value for every record (about half of the orchestrator's time to build a batch's
    /// records, measured under load).
    ids: RwLock<HashMap<TypeId, HashMap<String, u32>>>,
}

impl Codec {
    /// A codec for the registry at `url` (e.g. `http://127.0.0.1:8081`, or `https://...`), reached as the
    /// environment says ([`RegistryAccess::from_environment`]).
    pub fn new(url: &str) -> Result<Codec, CodecError> {
        let access =
            RegistryAccess::from_environment().map_err(|e| CodecError::RegistryUnavailable {
                detail: format!("{e:#}"),
            })?;
        Codec::with_access(url, &access)
    }

    /// A codec for the registry at `url`, with basic auth and a CA of its own when `access` has them.
    pub fn with_access(url: &str, access: &RegistryAccess) -> Result<Codec, CodecError> {
        // A record is at most a broker message (about 1 MB); a length prefix beyond this is a corrupt or hostile
        // record, refused before anything is allocated for it (apache-avro's own default is 512 MiB).
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
        let unavailable = |detail: String| CodecError::RegistryUnavailable { detail };
        let mut builder = SrSettings::new_builder(url.trim_end_matches('/').to_string());
        builder.no_proxy().set_timeout(Duration::from_secs(10));
        if let Some((user, password)) = &access.basic_auth {
            builder.set_basic_authorization(user, Some(password));
        }
        let mut client = reqwest::Client::builder();
        if let Some(pem) = &access.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem).map_err(|e| {
                unavailable(format!("the registry's CA certificate is not PEM: {e}"))
            })?;
            client = client.add_root_certificate(ca);
        }
        let settings = builder
            .build_with(client)
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(Codec {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings.clone()),
            settings,
            ids: RwLock::default(),
        })
    }

    /// Registers `T`'s schema under `topic`'s value subject and returns its global id.
    pub async fn register<T: Contract>(&self, topic: &str) -> Result<u32, CodecError> {
        self.register_text(&value_subject(topic), T::NAME, T::SCHEMA_TEXT)
            .await
            .map_err(|e| encode_error(T::NAME, topic, e))
    }

    /// Registers a schema given as text under `subject`; returns its id.
    pub async fn register_text(
        &self,
        subject: &str,
        name: &str,
        schema: &str,
    ) -> Result<u32, SRCError> {
        let supplied =
            SuppliedSchema::new(Some(name.to_string()), SchemaType::Avro, schema.to_string());
        Ok(post_schema(&self.settings, subject.to_string(), supplied)
            .await?
            .id)
    }

    /// The id of `schema` if it is registered under `subject`.
    pub async fn lookup_text(&self, subject: &str, schema: &str) -> Result<u32, SRCError> {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let found = perform_sr_call(&self.settings, SrCall::PostForVersion(subject, &body)).await?;
        found
            .id
            .ok_or_else(|| SRCError::non_retryable_without_cause("the registry's answer has no id"))
    }

    /// Encodes `item` for `topic` in the Confluent wire format. The first record of a contract on a topic
    /// registers (or looks up) its schema under the topic's value subject; later ones reuse the id.
    pub async fn encode<T: Contract>(&self, topic: &str, item: &T) -> Result<Vec<u8>, CodecError> {
        let known = self
            .ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&TypeId::of::<T>())
            .and_then(|topics| topics.get(topic).copied());
        if let Some(id) = known {
            return encode_framed(id, item).map_err(|e| CodecError::Encode {
                writer: T::NAME,
                subject: value_subject(topic),
                detail: e.to_string(),
            });
        }
        let value = to_contract_value(item)?;
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_string(),
            false,
            SuppliedSchema::new(
                Some(T::NAME.to_string()),
                SchemaType::Avro,
                T::SCHEMA_TEXT.to_string(),
            ),
        );
        let bytes = self
            .encoder
            .encode_value(value, &strategy)
            .await
            .map_err(|e| encode_error(T::NAME, topic, e))?;
        if let Some(id) = schema_id(&bytes) {
            self.ids
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(TypeId::of::<T>())
                .or_default()
                .insert(topic.to_string(), id);
        }
        Ok(bytes)
    }

    /// Decodes a Confluent-framed value written with any registered schema that resolves to `T`.
    pub async fn decode<T: Contract>(&self, payload: Option<&[u8]>) -> Result<T, CodecError> {
        let bytes = payload.filter(|b| !b.is_empty()).ok_or(CodecError::Empty)?;
        let id = schema_id(bytes).ok_or(CodecError::NotFramed {
            len: bytes.len(),
            first: bytes[0],
        })?;
        if let Err(e) = self.decoder.get_schema(id).await {
            let detail = describe(&e);
            // Only what may pass by itself is transient: no connection, a timeout, a 5xx. A 401/403, a schema
            // that is not Avro, or any other answer stays the same on every try, so it dead-letters the record.
            self.decoder.remove_errors_from_cache();
            return Err(if e.retriable || detail.contains("failed with status 5") {
                CodecError::RegistryUnavailable { detail }
            } else if detail.contains("404") {
                CodecError::UnknownSchema { id, detail }
            } else {
                CodecError::RegistryRefused { id, detail }
            });
        }
        let written =
            self.decoder
                .decode(Some(bytes))
                .await
                .map_err(|e| CodecError::Undecodable {
                    id,
                    detail: describe(&e),
                })?;
        let value = written
            .value
            .resolve(T::schema())
            .map_err(|e| CodecError::Incompatible {
                id,
                reader: T::NAME,
                detail: e.to_string(),
            })?;
        from_contract_value(&value)
    }
}

/// `item` framed with schema id `id`: magic byte, id, then its binary datum written straight from the type.
fn encode_framed<T: Contract>(id: u32, item: &T) -> apache_avro::AvroResult<Vec<u8>> {
    let mut bytes = Vec::with_capacity(256);
    bytes.push(0);
    bytes.extend_from_slice(&id.to_be_bytes());
    T::writer().write_ser(&mut bytes, item)?;
    Ok(bytes)
}

/// `item` as an Avro value of its contract's schema.
pub fn to_contract_value<T: Contract>(item: &T) -> Result<Value, CodecError> {
    apache_avro::to_value(item)
        .and_then(|v| v.resolve(T::schema()))
        .map_err(|e| CodecError::Encode {
            writer: T::NAME,
            subject: String::new(),
            detail: e.to_string(),
        })
}

/// A value already resolved to `T`'s schema, as `T`.
pub fn from_contract_value<T: Contract>(value: &Value) -> Result<T, CodecError> {
    apache_avro::from_value::<T>(value).map_err(|e| CodecError::Invalid {
        reader: T::NAME,
        detail: e.to_string(),
    })
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(cause) => format!("{}: {cause}", e.error),
        None => e.error.clone(),
    }
}

fn encode_error(writer: &'static str, topic: &str, e: SRCError) -> CodecError {
    CodecError::Encode {
        writer,
        subject: value_subject(topic),
        detail: describe(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_id_reads_the_confluent_header() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 2, 9, 9]), Some(258));
        assert_eq!(schema_id(&[0, 0, 0, 0, 7]), Some(7));
        assert_eq!(schema_id(&[1, 0, 0, 0, 7]), None);
        assert_eq!(schema_id(b"{\"json\": true}"), None);
        assert_eq!(schema_id(&[0, 0, 0]), None);
    }

    #[test]
    fn registry_credentials_come_from_a_variable_or_a_file() {
        let dir = std::env::temp_dir().join(format!("edow-codec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("user-info");
        std::fs::write(&file, "reader:s3cret:with-colon\n").unwrap();
        let path = file.to_str().unwrap().to_string();
        let vars = |pairs: Vec<(&'static str, String)>| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            }
        };
        let access = RegistryAccess::from_variables(vars(vec![(
            REGISTRY_USER_INFO_FILE_VARIABLE,
            path.clone(),
        )]))
        .unwrap();
        assert_eq!(
            access.basic_auth,
            Some(("reader".into(), "s3cret:with-colon".into()))
        );
        let access =
            RegistryAccess::from_variables(vars(vec![(REGISTRY_USER_INFO_VARIABLE, "a:b".into())]))
                .unwrap();
        assert_eq!(access.basic_auth, Some(("a".into(), "b".into())));
        let both = RegistryAccess::from_variables(vars(vec![
            (REGISTRY_USER_INFO_VARIABLE, "a:b".into()),
            (REGISTRY_USER_INFO_FILE_VARIABLE, path),
        ]));
        assert!(both.unwrap_err().to_string().contains("keep one"));
        // A directory is no secret file, and the error does not print a password.
        let refused = RegistryAccess::from_variables(vars(vec![(
            REGISTRY_USER_INFO_FILE_VARIABLE,
            dir.to_str().unwrap().to_string(),
        )]))
        .unwrap_err();
        assert!(
            refused.to_string().contains("not a regular file"),
            "{refused}"
        );
        std::fs::write(&file, "no-colon").unwrap();
        let malformed = RegistryAccess::from_variables(vars(vec![(
            REGISTRY_USER_INFO_FILE_VARIABLE,
            file.to_str().unwrap().to_string(),
        )]))
        .unwrap_err();
        assert!(malformed.to_string().contains("USER:PASSWORD"));
        assert!(!malformed.to_string().contains("no-colon"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
