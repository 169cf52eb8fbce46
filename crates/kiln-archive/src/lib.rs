//! Archives are where untrusted bytes meet the filesystem. This crate owns
//! that boundary: it reads tar.gz uploads (and plain tar and zip app
//! sources), refuses anything unsafe, extracts
//! what is safe, and computes the *content* digest of the tree an archive
//! holds, independent of entry order, mtimes and owners. It also packs trees
//! (the CLI's headers upload, the module archive kiln serves).

mod pack;
mod read;
mod zip;

pub use pack::{pack_files, pack_tree_rooted};
pub use read::{
    digest_tar_gz, extract_tar, extract_tar_gz, extract_tar_gz_digest, is_gzip, Extracted, Limits,
    TreeSummary,
};
pub use zip::{extract_zip, is_zip};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the body is not gzip data (a tar.gz archive was expected)")]
    NotGzip,
    #[error("the archive is corrupt: {0}")]
    Corrupt(String),
    #[error("archive entry {entry:?} climbs out of the archive with '..'")]
    Traversal { entry: String },
    #[error("archive entry {entry:?} has an absolute path")]
    Absolute { entry: String },
    #[error("archive link {entry:?} -> {target:?} points outside the archive")]
    LinkEscapes { entry: String, target: String },
    #[error("archive entry {entry:?} is a device node or fifo; only files, directories and links are allowed")]
    DeviceNode { entry: String },
    #[error("archive entry {entry:?} has an unsupported type ({kind})")]
    Unsupported { entry: String, kind: String },
    #[error("archive entry {entry:?} would be written through the symlink {via:?}")]
    ThroughSymlink { entry: String, via: String },
    #[error("archive has more than {limit} entries (decompression bomb?)")]
    TooManyEntries { limit: u64 },
    #[error("archive expands to more than {limit} bytes (decompression bomb?)")]
    TooLarge { limit: u64 },
    #[error("zip entry {entry:?} is a symlink; links are not allowed in zip sources")]
    ZipLink { entry: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// True when the archive itself is at fault (a 4xx), false when kiln
    /// could not write to its own disk (a 5xx).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ArchiveError::Io { .. })
    }
}
