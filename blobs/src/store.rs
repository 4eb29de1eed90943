//! Opening the blob store a `--blob-store` setting names: a local directory (a path or `file:///path`), or S3 and
//! S3-compatible storage (`s3://bucket/prefix`, with credentials, region and endpoint from the standard `AWS_*`
//! variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`).
//! Credentials never come from the setting itself, so they stay out of flags and logs.

use std::sync::Arc;

use anyhow::Context;
use hmac::{Hmac, KeyInit, Mac};
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    CryptoProvider, DigestAlgorithm, DigestContext, HmacContext, Signer, SigningAlgorithm,
};
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};

use crate::Blobs;

/// The store `setting` names, storing values over `threshold` bytes and reading at most `max_bytes`.
pub fn open(setting: &str, threshold: usize, max_bytes: usize) -> anyhow::Result<Blobs> {
    let setting = setting.trim();
    if let Some(rest) = setting.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(
            !bucket.is_empty(),
            "--blob-store {setting}: name a bucket, as in s3://BUCKET or s3://BUCKET/PREFIX"
        );
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_crypto_provider(Arc::new(RustCrypto))
            .build()
            .with_context(|| {
                format!(
                    "--blob-store {setting}: the S3 settings are incomplete (set AWS_REGION, and \
                     AWS_ACCESS_KEY_ID with AWS_SECRET_ACCESS_KEY or another AWS credential source; \
                     AWS_ENDPOINT for S3-compatible storage)"
                )
            })?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        return Ok(Blobs::new(store, setting.to_string(), threshold, max_bytes));
    }
    let directory = setting.strip_prefix("file://").unwrap_or(setting);
    anyhow::ensure!(
        !directory.is_empty() && !directory.contains("://"),
        "--blob-store {setting:?}: write a directory (/var/lib/edow/blobs, file:///var/lib/edow/blobs) or \
         s3://BUCKET/PREFIX"
    );
    std::fs::create_dir_all(directory)
        .with_context(|| format!("--blob-store {setting}: cannot create the directory"))?;
    let local = LocalFileSystem::new_with_prefix(directory)
        .with_context(|| format!("--blob-store {setting}: not a usable directory"))?
        // Purging a workflow's last blob removes its directory too.
        .with_automatic_cleanup(true);
    Ok(Blobs::new(
        Arc::new(local),
        setting.to_string(),
        threshold,
        max_bytes,
    ))
}

/// SHA-256 and HMAC-SHA256 for S3's request signatures from the sha2 and hmac crates this project builds
/// anyway, instead of object_store's aws-lc-rs or ring (a C build each). RSA signing is only used by GCS.
#[derive(Debug)]
struct RustCrypto;

impl CryptoProvider for RustCrypto {
    fn digest(&self, algorithm: DigestAlgorithm) -> object_store::Result<Box<dyn DigestContext>> {
        match algorithm {
            DigestAlgorithm::Sha256 => Ok(Box::new(Sha256Context {
                hasher: Sha256::new(),
                out: Vec::new(),
            })),
            _ => Err(not_supported("this digest")),
        }
    }

    fn hmac(
        &self,
        algorithm: DigestAlgorithm,
        secret: &[u8],
    ) -> object_store::Result<Box<dyn HmacContext>> {
        match algorithm {
            DigestAlgorithm::Sha256 => {
                let mac = Hmac::<Sha256>::new_from_slice(secret)
                    .map_err(|_| not_supported("this HMAC key"))?;
                Ok(Box::new(HmacSha256Context {
                    mac,
                    out: Vec::new(),
                }))
            }
            _ => Err(not_supported("this HMAC")),
        }
    }

    fn sign(&self, _: SigningAlgorithm, _: &[u8]) -> object_store::Result<Box<dyn Signer>> {
        Err(not_supported("RSA signatures"))
    }
}

fn not_supported(what: &str) -> object_store::Error {
    object_store::Error::NotSupported {
        source: format!("edow's blob store does not implement {what}").into(),
    }
}

struct Sha256Context {
    hasher: Sha256,
    out: Vec<u8>,
}

impl DigestContext for Sha256Context {
    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    fn finish(&mut self) -> object_store::Result<&[u8]> {
        self.out = self.hasher.finalize_reset().to_vec();
        Ok(&self.out)
    }
}

struct HmacSha256Context {
    mac: Hmac<Sha256>,
    out: Vec<u8>,
}

impl HmacContext for HmacSha256Context {
    fn update(&mut self, data: &[u8]) {
        self.mac.update(data);
    }

    fn finish(&mut self) -> object_store::Result<&[u8]> {
        self.out = self.mac.clone().finalize().into_bytes().to_vec();
        Ok(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_primitives_match_known_answers() {
        // RFC 4231 test case 2.
        let mut mac = RustCrypto.hmac(DigestAlgorithm::Sha256, b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            crate::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let hex: String = mac
            .finish()
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut digest = RustCrypto.digest(DigestAlgorithm::Sha256).unwrap();
        digest.update(b"abc");
        let hex: String = digest
            .finish()
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn settings_that_name_no_store_are_refused() {
        for bad in ["", "s3://", "ftp://host/dir"] {
            let err = open(bad, 10, 10).unwrap_err();
            assert!(
                format!("{err:#}").contains("--blob-store"),
                "{bad}: {err:#}"
            );
        }
    }
}
