//! The `--blob-store` settings every binary that reads or writes workflow data shares (orchestrator, worker,
//! CLI), so they all point at the same store.

use crate::{store, Blobs, DEFAULT_MAX_BYTES, DEFAULT_THRESHOLD};

#[derive(Debug, Clone, clap::Args)]
pub struct BlobArgs {
    /// Where values over --blob-threshold are stored and passed by reference: a directory (shared by every
    /// process) or s3://BUCKET/PREFIX (credentials, region and endpoint from the AWS_* variables). Without it,
    /// payloads are limited to --max-payload-bytes.
    #[arg(long, env = "EDOW_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// JSON values longer than this many bytes go to the blob store.
    #[arg(long, env = "EDOW_BLOB_THRESHOLD", default_value_t = DEFAULT_THRESHOLD)]
    pub blob_threshold: usize,
    /// Longest value stored or read through the blob store, in bytes.
    #[arg(long, env = "EDOW_BLOB_MAX_BYTES", default_value_t = DEFAULT_MAX_BYTES)]
    pub blob_max_bytes: usize,
}

impl BlobArgs {
    /// The configured store, if any.
    pub fn open(&self) -> anyhow::Result<Option<Blobs>> {
        match self.blob_store.as_deref() {
            None | Some("") => Ok(None),
            Some(setting) => {
                anyhow::ensure!(
                    self.blob_threshold >= 1024,
                    "--blob-threshold {}: use at least 1024 bytes (a reference alone is about 150)",
                    self.blob_threshold
                );
                store::open(setting, self.blob_threshold, self.blob_max_bytes).map(Some)
            }
        }
    }
}
