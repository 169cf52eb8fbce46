//! Volume provisioning, the job kind that replaces libvirt-volume-provisioner:
//! fetch a VM image (HTTP or S3) into a checksum-keyed image cache, then
//! write it into a volume (LVM LV, block device or raw file).
//!
//! The pieces, in the order a job uses them: [`source`] (where bytes come
//! from), [`download`] (hash while streaming, resume, retry), [`cache`] (the
//! image cache: verified admission, pins, LRU), [`volume`] (create, reuse,
//! refuse, resize, roll back), [`convert`] (`qemu-img convert` or kiln's
//! sparse raw copy, then zeroing and flushing), and [`job`] (the stages and
//! their progress).

pub mod cache;
pub mod convert;
pub mod download;
pub mod job;
pub mod metrics;
pub mod source;
pub mod volume;

pub use cache::ImageCache;
pub use job::{ProvisionJobs, ProvisionParams, ProvisionResult, KIND};
pub use metrics::ProvisionMetrics;
pub use source::{S3Settings, Source, SourceError};
pub use volume::{validate_name, Backend, VolumeError};

use std::time::Duration;

/// How the provisioner is set up; built once from the daemon's config.
#[derive(Debug, Clone)]
pub struct ProvisionConfig {
    /// Where volumes live. `None`: provisioning requests are refused.
    pub backend: Option<Backend>,
    /// S3/MinIO endpoint and credentials (`MINIO_*`).
    pub s3: Option<S3Settings>,
    /// Jobs that run at once (the seed's 2).
    pub concurrency: usize,
    /// Per-job timeout.
    pub timeout: Duration,
    /// Attempts per download before the job fails.
    pub download_attempts: u32,
    /// Timeout of one `qemu-img` or LVM command.
    pub tool_timeout: Duration,
}

/// Image formats a request may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    Qcow2,
    Raw,
}

impl ImageType {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Qcow2 => "qcow2",
            ImageType::Raw => "raw",
        }
    }
}

impl std::str::FromStr for ImageType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qcow2" => Ok(ImageType::Qcow2),
            "raw" => Ok(ImageType::Raw),
            o => Err(format!("image_type {o:?} is not supported: qcow2 or raw")),
        }
    }
}

/// One GiB: `volume_size_gb` counts GiB, as `lvcreate -L 50G` does.
pub const GIB: u64 = 1 << 30;
/// The largest volume a request may ask for (64 TiB).
pub const MAX_VOLUME_GB: u64 = 64 << 10;
