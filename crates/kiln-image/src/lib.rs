//! Container image builds, the job kind that replaces buildshuttle: app
//! sources (an http(s) tar, tar.gz or zip, a `data:` URI, or a `docker://`
//! image to retag) built with buildah (no daemon, no privileged socket) and
//! pushed as `{host}/{repo}/{app}-{app_uuid}:1.{n}` and `:latest`.
//!
//! [`request`] is the seed's payload and its validation, [`sources`] fetches
//! and unpacks sources, [`buildah`] runs buildah and skopeo, [`callback`]
//! delivers status changes in order, signed and retried, and [`job`] ties
//! them into the `image` job kind.

pub mod buildah;
pub mod callback;
pub mod job;
pub mod request;
pub mod sources;

pub use callback::Callbacks;
pub use job::{ImageJobs, ImageResult, KIND};
pub use request::{BuildRequest, RequestError};

use std::path::PathBuf;
use std::time::Duration;

/// How image builds are set up; built once from the daemon's config.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// buildah's storage (`--root`, `--runroot` below it), in kiln's data dir.
    pub storage_dir: PathBuf,
    /// buildah's storage driver (`vfs` works everywhere; `overlay` is faster
    /// where the kernel allows it).
    pub storage_driver: String,
    /// `MAXIMUM_PARALLEL_BUILDS`.
    pub parallel: usize,
    /// `TIMEOUT_IN_MS`.
    pub timeout: Duration,
    /// `NO_CACHE`.
    pub no_cache: bool,
    /// `EXTRA_BUILD_ARGS`: merged under each request's `build_args`.
    pub extra_build_args: Vec<(String, String)>,
    /// `SHOW_BUILD_LOGS`: also write build output to kiln's own log.
    pub show_build_logs: bool,
    /// Registries reached over plain HTTP (`HOST:PORT`).
    pub insecure_registries: Vec<String>,
    /// Key of the callbacks' `X-Kiln-Signature` (HMAC-SHA256 of the body).
    pub callback_secret: Option<Vec<u8>>,
    /// Attempts per callback before it is given up.
    pub callback_attempts: u32,
    /// Caps on fetched and unpacked sources.
    pub limits: kiln_archive::Limits,
}
