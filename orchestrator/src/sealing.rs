//! Encryption at rest of the workflow data the orchestrator writes, when it is given a key file
//! (`--encryption-keys`, see `edow_auth::sealing`): in `edow.state` a record's input, output, error and engine
//! state, and its outbox header; in `edow.events` each event's detail; the input of the child triggers and the
//! output of the results to parents it produces. Names, ids, statuses and times stay readable, so that
//! compaction, routing and operators keep working without the key.
//!
//! Each value is bound to where it belongs (its workflow id or event id, and its field), so a sealed value copied
//! into another record does not open. Reading takes plain values as they are: encryption can be turned on over
//! an existing changelog, and triggers from other producers stay plain. What task topics carry stays plain too:
//! workers, in any language, must read it.

use std::path::PathBuf;
use std::sync::Arc;

use edow_auth::sealing::{is_sealed, Keyring};
use edow_schemas::contracts::WorkflowState;

use crate::partition::MARKER_KEY;

/// Where the key file is, for every binary that reads or writes workflow data.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EncryptionArgs {
    /// Encrypt workflow data at rest with the keys of this file (lines `ID BASE64-KEY`; the first seals, all
    /// open; `edow key new` makes one). Readers of edow.state and edow.events need the same file.
    #[arg(long = "encryption-keys", env = "EDOW_ENCRYPTION_KEYS", global = true)]
    pub encryption_keys: Option<PathBuf>,
}

impl EncryptionArgs {
    pub fn keyring(&self) -> anyhow::Result<Option<Arc<Keyring>>> {
        self.encryption_keys
            .as_deref()
            .map(|path| Keyring::load(path).map(Arc::new))
            .transpose()
    }
}

fn context(owner: &str, field: &str) -> String {
    format!("{owner}/{field}")
}

/// `text` sealed as `field` of `owner`; as it is without keys.
pub fn seal_text(
    keys: Option<&Keyring>,
    owner: &str,
    field: &str,
    text: String,
) -> anyhow::Result<String> {
    match keys {
        Some(keys) => keys.seal(&context(owner, field), text.as_bytes()),
        None => Ok(text),
    }
}

/// The plain text of `text` (taken as it is when it is not sealed), naming the field when it does not open.
pub fn open_text(
    keys: Option<&Keyring>,
    owner: &str,
    field: &str,
    text: String,
) -> Result<String, String> {
    if !is_sealed(&text) {
        return Ok(text);
    }
    let Some(keys) = keys else {
        return Err(format!(
            "the {field} of {owner} {}",
            edow_auth::sealing::OpenError::NoKeys
        ));
    };
    let plain = keys
        .open(&context(owner, field), &text)
        .map_err(|e| format!("the {field} of {owner}: {e}"))?;
    String::from_utf8(plain).map_err(|_| format!("the {field} of {owner} is not UTF-8 once opened"))
}

/// Seals the data fields of a changelog record. A partition's marker holds none and stays plain.
pub fn seal_state(keys: Option<&Keyring>, record: &mut WorkflowState) -> anyhow::Result<()> {
    if keys.is_none() || record.workflow_id == MARKER_KEY {
        return Ok(());
    }
    let id = record.workflow_id.clone();
    record.input = seal_text(keys, &id, "input", std::mem::take(&mut record.input))?;
    record.engine_state = seal_text(
        keys,
        &id,
        "engine_state",
        std::mem::take(&mut record.engine_state),
    )?;
    if let Some(output) = record.output.take() {
        record.output = Some(seal_text(keys, &id, "output", output)?);
    }
    if let Some(error) = record.error.take() {
        record.error = Some(seal_text(keys, &id, "error", error)?);
    }
    Ok(())
}

/// Opens the data fields of a changelog record read back.
pub fn open_state(keys: Option<&Keyring>, record: &mut WorkflowState) -> Result<(), String> {
    let id = record.workflow_id.clone();
    record.input = open_text(keys, &id, "input", std::mem::take(&mut record.input))?;
    record.engine_state = open_text(
        keys,
        &id,
        "engine_state",
        std::mem::take(&mut record.engine_state),
    )?;
    if let Some(output) = record.output.take() {
        record.output = Some(open_text(keys, &id, "output", output)?);
    }
    if let Some(error) = record.error.take() {
        record.error = Some(open_text(keys, &id, "error", error)?);
    }
    Ok(())
}

/// A changelog record's outbox header value, sealed.
pub fn seal_outbox(
    keys: Option<&Keyring>,
    workflow_id: &str,
    outbox: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    match keys {
        // The outbox is JSON, so UTF-8.
        Some(_) => Ok(seal_text(
            keys,
            workflow_id,
            "outbox",
            String::from_utf8_lossy(&outbox).into_owned(),
        )?
        .into_bytes()),
        None => Ok(outbox),
    }
}

/// An outbox header value read back, opened.
pub fn open_outbox(
    keys: Option<&Keyring>,
    workflow_id: &str,
    outbox: &[u8],
) -> Result<Vec<u8>, String> {
    match std::str::from_utf8(outbox) {
        Ok(text) if is_sealed(text) => {
            open_text(keys, workflow_id, "outbox", text.to_string()).map(String::into_bytes)
        }
        _ => Ok(outbox.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edow_schemas::contracts::WorkflowStatus;

    fn keys() -> Keyring {
        Keyring::parse(&edow_auth::sealing::new_key_line("k1").unwrap()).unwrap()
    }

    fn record(id: &str) -> WorkflowState {
        WorkflowState {
            workflow_id: id.into(),
            workflow_name: "pay".into(),
            workflow_version: 1,
            status: WorkflowStatus::Failed,
            input: r#"{"card":"4111111111111111"}"#.into(),
            output: Some("{}".into()),
            error: Some("card 4111111111111111 refused".into()),
            correlation_id: None,
            sequence: 3,
            created_at: 1,
            updated_at: 2,
            engine_state_version: 1,
            engine_state: r#"{"instance":{"input":"4111111111111111"}}"#.into(),
        }
    }

    #[test]
    fn a_state_record_is_sealed_field_by_field_and_opens_only_as_itself() {
        let keys = keys();
        let plain = record("wf-1");
        let mut sealed = plain.clone();
        seal_state(Some(&keys), &mut sealed).unwrap();
        assert!(!format!("{sealed:?}").contains("4111"), "{sealed:?}");
        assert_eq!(sealed.workflow_name, "pay");
        let mut opened = sealed.clone();
        open_state(Some(&keys), &mut opened).unwrap();
        assert_eq!(opened, plain);
        // Moved under another id, it does not open.
        let mut moved = sealed.clone();
        moved.workflow_id = "wf-2".into();
        let e = open_state(Some(&keys), &mut moved).unwrap_err();
        assert!(
            e.contains("the input of wf-2") && e.contains("altered or moved"),
            "{e}"
        );
        let e = open_state(None, &mut sealed.clone()).unwrap_err();
        assert!(e.contains("--encryption-keys"), "{e}");
        // Plain records read as they are, with or without keys.
        let mut old = plain.clone();
        open_state(Some(&keys), &mut old).unwrap();
        assert_eq!(old, plain);
        let mut marker = record(MARKER_KEY);
        seal_state(Some(&keys), &mut marker).unwrap();
        assert_eq!(marker, record(MARKER_KEY));
    }

    #[test]
    fn an_outbox_is_sealed_and_opened() {
        let keys = keys();
        let outbox = br#"{"commands":[]}"#.to_vec();
        let sealed = seal_outbox(Some(&keys), "wf-1", outbox.clone()).unwrap();
        assert_ne!(sealed, outbox);
        assert_eq!(open_outbox(Some(&keys), "wf-1", &sealed).unwrap(), outbox);
        assert!(open_outbox(Some(&keys), "wf-9", &sealed).is_err());
        assert_eq!(open_outbox(None, "wf-1", &outbox).unwrap(), outbox);
    }
}
