//! Everything kiln must not lose lives here: the job table and the cache
//! index (SQLite, in the data directory) and the blobs themselves (a
//! content-addressed store, `sha256/ab/<hex>`, in the cache directory).
//! Other crates never touch SQL or blob paths directly.

mod cas;
mod db;

pub use cas::{Cas, TempBlob};
pub use db::{now_ms, Artifact, Db, ImageRow, ImageUrl, JobFilter, JobRow, Resource, Submitted};

use std::path::PathBuf;

use kiln_core::{Digest, JobId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache blob {digest} is corrupt (its content hashes to {actual}); it was removed")]
    Corrupt { digest: Digest, actual: Digest },
    #[error("cache blob {0} is missing")]
    Missing(Digest),
    #[error("job {0} not found")]
    JobNotFound(JobId),
    #[error("stored record is malformed: {0}")]
    Malformed(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
