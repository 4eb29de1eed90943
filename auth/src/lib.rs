//! Credentials for edow's HTTP listeners (the orchestrator's API, edow-registry): secrets kept as SHA-256 hashes
//! in a file of `ROLE SHA256-HEX NAME` lines, with roles, re-read when the file changes, so that a rotated
//! Kubernetes Secret takes effect without a restart; and the HMAC-SHA256 checks webhooks need.
//!
//! The secrets are meant to be 256 random bits ([`new_secret`]): for those an unsalted fast hash is enough, as
//! there is nothing to guess. A human-chosen password would need a slow, salted hash instead.

pub mod sealing;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Largest credentials file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// How often the file's modification time is looked at.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(5);

/// One line of a credentials file.
#[derive(Debug, Clone)]
pub struct Credential<R> {
    pub role: R,
    /// SHA-256 of the secret, lower-case hex.
    pub hash: String,
    /// Who holds it (a token's label, a user name).
    pub name: String,
}

/// A credentials file and what it held when last read well.
pub struct CredentialFile<R> {
    path: PathBuf,
    parse_role: fn(&str) -> Option<R>,
    roles: &'static str,
    loaded: Mutex<Loaded<R>>,
}

struct Loaded<R> {
    by_hash: HashMap<String, Credential<R>>,
    /// When the file was read: a change reads it again.
    stamp: Option<Stamp>,
    checked: Instant,
}

impl<R: Clone> CredentialFile<R> {
    /// Reads `path`; `parse_role` names the roles it may hold (`roles` lists them for error messages). A file
    /// that is missing, wrong or empty is refused, naming the line.
    pub fn open(
        path: &Path,
        parse_role: fn(&str) -> Option<R>,
        roles: &'static str,
    ) -> anyhow::Result<CredentialFile<R>> {
        let (by_hash, stamp) = read(path, parse_role, roles)?;
        anyhow::ensure!(
            !by_hash.is_empty(),
            "the credentials file {} holds none; add lines `ROLE SHA256-HEX NAME` (roles: {roles})",
            path.display()
        );
        Ok(CredentialFile {
            path: path.to_path_buf(),
            parse_role,
            roles,
            loaded: Mutex::new(Loaded {
                by_hash,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The credential whose secret is `secret`.
    pub fn find_secret(&self, secret: &str) -> Option<Credential<R>> {
        let hash = sha256_hex(secret.as_bytes());
        self.current(|by_hash| by_hash.get(&hash).cloned())
    }

    /// The credential of `name` if `secret` is its secret (the hashes compared in constant time).
    pub fn check(&self, name: &str, secret: &str) -> Option<Credential<R>> {
        let hash = sha256_hex(secret.as_bytes());
        self.current(|by_hash| {
            by_hash
                .values()
                .find(|c| c.name == name && constant_time_eq(c.hash.as_bytes(), hash.as_bytes()))
                .cloned()
        })
    }

    /// Runs `f` over the credentials, read again first if the file changed. A file emptied of credentials
    /// revokes them all (the way to lock everyone out without a restart); a file that is missing or has a wrong
    /// line (one being rewritten, a pasted plain secret) keeps the credentials in force, and says so.
    fn current<T>(&self, f: impl FnOnce(&HashMap<String, Credential<R>>) -> T) -> T {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() > RELOAD_CHECK_EVERY {
            loaded.checked = Instant::now();
            let stamp = stamp_of(&self.path);
            if stamp != loaded.stamp {
                match read(&self.path, self.parse_role, self.roles) {
                    Ok((by_hash, stamp)) => {
                        if by_hash.is_empty() {
                            tracing::warn!(
                                file = %self.path.display(),
                                "the credentials file holds none: every credential is revoked"
                            );
                        } else {
                            tracing::info!(
                                credentials = by_hash.len(),
                                file = %self.path.display(),
                                "credentials read again"
                            );
                        }
                        loaded.by_hash = by_hash;
                        loaded.stamp = stamp;
                    }
                    Err(e) => tracing::warn!("{e:#}; keeping the credentials read before"),
                }
            }
        }
        f(&loaded.by_hash)
    }
}

type ByHash<R> = HashMap<String, Credential<R>>;
/// A file's modification time and length.
type Stamp = (SystemTime, u64);

fn stamp_of(path: &Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

fn read<R>(
    path: &Path,
    parse_role: fn(&str) -> Option<R>,
    roles: &str,
) -> anyhow::Result<(ByHash<R>, Option<Stamp>)> {
    use anyhow::Context;
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("reading the credentials file {}", path.display()))?;
    // A FIFO or a device would block the read, and every request waiting on it.
    anyhow::ensure!(
        metadata.is_file(),
        "the credentials file {} is not a regular file",
        path.display()
    );
    anyhow::ensure!(
        metadata.len() <= MAX_FILE_BYTES,
        "the credentials file {} is {} bytes, over {MAX_FILE_BYTES}",
        path.display(),
        metadata.len()
    );
    // Bounded even if the file grew since (or is not a regular file).
    let mut text = String::new();
    {
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_BYTES).read_to_string(&mut text))
            .with_context(|| format!("reading the credentials file {}", path.display()))?;
    }
    let stamp = metadata.modified().ok().map(|m| (m, metadata.len()));
    Ok((parse(&text, path, parse_role, roles)?, stamp))
}

/// `ROLE SHA256-HEX [NAME]` per line; `#` starts a comment; `path` names the file in errors.
pub fn parse<R>(
    text: &str,
    path: &Path,
    parse_role: fn(&str) -> Option<R>,
    roles: &str,
) -> anyhow::Result<ByHash<R>> {
    let mut by_hash = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), number + 1);
        let mut fields = line.split_whitespace();
        let (role, hash) = (fields.next(), fields.next());
        let role = role
            .and_then(parse_role)
            .ok_or_else(|| anyhow::anyhow!("{}: the role must be one of {roles}", at()))?;
        let hash = hash
            .map(str::to_ascii_lowercase)
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: the second field must be the secret's SHA-256 in hex (64 digits), not the secret",
                    at()
                )
            })?;
        let name = fields
            .next()
            .map(str::to_string)
            .unwrap_or_else(|| format!("line-{}", number + 1));
        by_hash.insert(hash.clone(), Credential { role, hash, name });
    }
    Ok(by_hash)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Bytes of strict hex (`[0-9a-fA-F]`, even length), or `None`.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `signature` (hex) is the HMAC-SHA256 of the concatenated `message` parts under `secret`, compared in
/// constant time.
pub fn hmac_signed(secret: &[u8], message: &[&[u8]], signature: &str) -> bool {
    let Some(signature) = unhex(signature.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    for part in message {
        mac.update(part);
    }
    mac.verify_slice(&signature).is_ok()
}

/// A new random secret: `prefix` and 256 bits in hex.
pub fn new_secret(prefix: &str) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a secret: {e}"))?;
    Ok(format!("{prefix}{}", hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(text: &str) -> Option<&'static str> {
        ["read", "admin"].into_iter().find(|r| *r == text)
    }

    #[test]
    fn files_name_their_mistakes() {
        let path = Path::new("creds");
        let hash = sha256_hex(b"s3cret");
        let parsed = parse(
            &format!("# c\n\nadmin {hash} ci\n"),
            path,
            role,
            "read, admin",
        )
        .unwrap();
        assert_eq!(parsed[&hash].name, "ci");
        let err = parse("root abc\n", path, role, "read, admin")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("read, admin"),
            "{err}"
        );
        let err = parse("read s3cret\n", path, role, "read, admin")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHA-256"), "{err}");
    }

    #[test]
    fn secrets_and_names_are_checked() {
        let dir = std::env::temp_dir().join(format!("edow-auth-test-{}", std::process::id()));
        let secret = new_secret("edow_").unwrap();
        std::fs::write(
            &dir,
            format!("admin {} alice\n", sha256_hex(secret.as_bytes())),
        )
        .unwrap();
        let file = CredentialFile::open(&dir, role, "read, admin").unwrap();
        assert_eq!(file.find_secret(&secret).unwrap().name, "alice");
        assert!(file.find_secret("guess").is_none());
        assert!(file.check("alice", &secret).is_some());
        assert!(file.check("bob", &secret).is_none());
        assert!(file.check("alice", "guess").is_none());
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn hex_is_strict() {
        assert_eq!(unhex("0aFF"), Some(vec![0x0a, 0xff]));
        for bad in ["+a", "abc", "zz", " 0a"] {
            assert_eq!(unhex(bad), None, "{bad}");
        }
    }
}
