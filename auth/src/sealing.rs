//! Encryption at rest: AES-256-GCM under keys named by id, read from a key file of `ID BASE64-KEY` lines. The
//! first line's key seals; every key opens, so a key is rotated by putting a new line first and keeping the old
//! one until nothing sealed with it is left.
//!
//! A sealed text is `edow-sealed:v1:<key id>:<base64 of salt, nonce, ciphertext and tag>`. Each message is
//! encrypted under its own key, HMAC-SHA256(key, salt) for a random 128-bit salt, with a random 96-bit nonce:
//! random nonces under one key alone would be safe for only about 2^32 messages, which an orchestrator writing
//! thousands of records a second reaches within days. The caller's context (a workflow id and a field name) is
//! authenticated with the message, so a sealed value moved to another record or field does not open.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use sha2::Sha256;

/// What every sealed text starts with.
pub const SEALED_PREFIX: &str = "edow-sealed:v1:";
const SALT: usize = 16;
const NONCE: usize = 12;
const TAG: usize = 16;
/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Whether `text` is sealed (and so needs a key to be read).
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED_PREFIX)
}

/// Why a sealed text did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("it is encrypted at rest, but no key file was given: pass --encryption-keys (EDOW_ENCRYPTION_KEYS)")]
    NoKeys,
    #[error(
        "it is sealed with key '{0}', which the key file does not hold: add that key's line back"
    )]
    UnknownKey(String),
    #[error("it is not a well-formed sealed value (edow-sealed:v1:<key id>:<base64>)")]
    Malformed,
    #[error("it does not open with key '{0}': the wrong key under that id, or the value was altered or moved")]
    Refused(String),
}

struct Key {
    id: String,
    bytes: [u8; 32],
}

/// The keys of a key file; the first seals.
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring").field("ids", &ids).finish()
    }
}

impl Keyring {
    /// Reads a key file, naming the line of what is wrong in it.
    pub fn load(path: &Path) -> anyhow::Result<Keyring> {
        let size = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("cannot read the key file {}: {e}", path.display()))?
            .len();
        anyhow::ensure!(
            size <= MAX_KEY_FILE_BYTES,
            "the key file {} is {size} bytes; at most {MAX_KEY_FILE_BYTES} are read",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the key file {}: {e}", path.display()))?;
        Keyring::parse(&text).map_err(|e| anyhow::anyhow!("the key file {}: {e}", path.display()))
    }

    /// Parses `ID BASE64-KEY` lines (32-byte keys; `#` starts a comment).
    pub fn parse(text: &str) -> anyhow::Result<Keyring> {
        let mut keys: Vec<Key> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = n + 1;
            let mut fields = line.split_whitespace();
            let (Some(id), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
                anyhow::bail!("line {n} is not `ID BASE64-KEY`");
            };
            anyhow::ensure!(
                id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                "line {n}: a key id is at most 64 letters, digits, '-', '_' or '.'"
            );
            anyhow::ensure!(
                keys.iter().all(|k| k.id != id),
                "line {n}: key id '{id}' is there twice"
            );
            let bytes = openssl::base64::decode_block(key)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "line {n}: key '{id}' is not 32 bytes of base64 (make one with `edow key new`)"
                    )
                })?;
            keys.push(Key {
                id: id.to_string(),
                bytes,
            });
        }
        anyhow::ensure!(
            !keys.is_empty(),
            "it holds no key; add a line `ID BASE64-KEY` (make one with `edow key new`)"
        );
        Ok(Keyring { keys })
    }

    /// The id of the key that seals.
    pub fn active_id(&self) -> &str {
        &self.keys[0].id
    }

    /// `plaintext` sealed under the active key, bound to `context`. Fails only when the OS has no randomness
    /// or OpenSSL fails, never for a given input.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> anyhow::Result<String> {
        let key = &self.keys[0];
        let mut salt_nonce = [0u8; SALT + NONCE];
        getrandom::fill(&mut salt_nonce)
            .map_err(|e| anyhow::anyhow!("no randomness from the OS to seal with: {e}"))?;
        let (salt, nonce) = salt_nonce.split_at(SALT);
        let mut tag = [0u8; TAG];
        let ciphertext = encrypt_aead(
            Cipher::aes_256_gcm(),
            &message_key(&key.bytes, salt),
            Some(nonce),
            context.as_bytes(),
            plaintext,
            &mut tag,
        )
        .map_err(|e| anyhow::anyhow!("OpenSSL failed to seal: {e}"))?;
        let mut blob = Vec::with_capacity(SALT + NONCE + ciphertext.len() + TAG);
        blob.extend_from_slice(&salt_nonce);
        blob.extend_from_slice(&ciphertext);
        blob.extend_from_slice(&tag);
        Ok(format!(
            "{SEALED_PREFIX}{}:{}",
            key.id,
            openssl::base64::encode_block(&blob)
        ))
    }

    /// The plaintext of `sealed`, checked against `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, OpenError> {
        let rest = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(OpenError::Malformed)?;
        let (id, body) = rest.split_once(':').ok_or(OpenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| OpenError::UnknownKey(id.chars().take(64).collect()))?;
        let blob = openssl::base64::decode_block(body).map_err(|_| OpenError::Malformed)?;
        if blob.len() < SALT + NONCE + TAG {
            return Err(OpenError::Malformed);
        }
        let (salt, rest) = blob.split_at(SALT);
        let (nonce, rest) = rest.split_at(NONCE);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG);
        decrypt_aead(
            Cipher::aes_256_gcm(),
            &message_key(&key.bytes, salt),
            Some(nonce),
            context.as_bytes(),
            ciphertext,
            tag,
        )
        .map_err(|_| OpenError::Refused(key.id.clone()))
    }
}

/// The key one message is encrypted under.
fn message_key(key: &[u8; 32], salt: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"edow-sealed-v1");
    mac.update(salt);
    mac.finalize().into_bytes().into()
}

/// A new key file line: `ID BASE64-KEY` with 256 random bits.
pub fn new_key_line(id: &str) -> anyhow::Result<String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let line = format!("{id} {}", openssl::base64::encode_block(&key));
    Keyring::parse(&line)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &[&str]) -> Keyring {
        Keyring::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn seals_and_opens_with_rotation_by_key_id() {
        let old = new_key_line("k1").unwrap();
        let new = new_key_line("k2").unwrap();
        let before = ring(&[&old]);
        let sealed = before.seal("wf-1/input", b"{\"card\":\"4111\"}").unwrap();
        assert!(is_sealed(&sealed) && sealed.contains(":k1:"), "{sealed}");
        assert!(!sealed.contains("4111"));
        // Two seals of one text differ (fresh salt and nonce).
        assert_ne!(
            sealed,
            before.seal("wf-1/input", b"{\"card\":\"4111\"}").unwrap()
        );
        let after = ring(&[&new, &old]);
        assert_eq!(after.active_id(), "k2");
        assert_eq!(
            after.open("wf-1/input", &sealed).unwrap(),
            b"{\"card\":\"4111\"}"
        );
        assert!(after.seal("x", b"y").unwrap().contains(":k2:"));
        assert_eq!(
            ring(&[&new]).open("wf-1/input", &sealed),
            Err(OpenError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn a_moved_altered_or_broken_value_does_not_open() {
        let keys = ring(&[&new_key_line("k").unwrap()]);
        let sealed = keys.seal("wf-1/input", b"secret").unwrap();
        assert_eq!(
            keys.open("wf-2/input", &sealed),
            Err(OpenError::Refused("k".into()))
        );
        let body_at = sealed.rfind(':').unwrap() + 1;
        let mut blob = openssl::base64::decode_block(&sealed[body_at..]).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        let altered = format!(
            "{}{}",
            &sealed[..body_at],
            openssl::base64::encode_block(&blob)
        );
        assert_eq!(
            keys.open("wf-1/input", &altered),
            Err(OpenError::Refused("k".into()))
        );
        for broken in [
            "edow-sealed:v1:k",
            "edow-sealed:v1:k:!!!",
            "edow-sealed:v1:k:AAAA",
            "plain",
        ] {
            assert_eq!(
                keys.open("c", broken),
                Err(OpenError::Malformed),
                "{broken}"
            );
        }
    }

    #[test]
    fn key_files_name_the_bad_line() {
        for (text, says) in [
            ("", "holds no key"),
            ("k1", "line 1 is not"),
            ("k1 AAAA", "not 32 bytes"),
            ("bad/id AAAA", "key id"),
        ] {
            let e = Keyring::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        let line = new_key_line("k1").unwrap();
        let e = Keyring::parse(&format!("{line}\n{line}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: key id 'k1' is there twice"), "{e}");
    }
}
