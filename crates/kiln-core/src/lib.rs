//! kiln's shared vocabulary. Every other crate speaks in these types, so they
//! live here, free of IO, async and HTTP: ids, job statuses, digests and the
//! validated kernel version.

mod digest;
mod job;
mod kver;

pub use digest::{Digest, DigestError, Hasher};
pub use job::{JobId, JobIdError, JobStatus};
pub use kver::{KernelVersion, KernelVersionError};
