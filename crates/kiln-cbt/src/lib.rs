//! Changed block tracking: which blocks differ between a base and a target
//! snapshot, computed from the cheapest source of truth available (a QCOW2
//! allocation map when the base is in the target's backing chain, else a
//! parallel full compare), stored as runs so that a page at any offset costs
//! O(log n) whatever the delta's size, and fetched block by block with
//! self-verifying, expiring data tokens. No HTTP here: kiln-api serves it.

mod qcow2;
mod runs;
mod scan;
mod token;

pub use qcow2::{backing_chain, overlay_delta};
pub use runs::{Runs, RunsBuilder};
pub use scan::{full_scan, volume_size};
pub use token::{DataToken, TokenError, TokenKey};

use std::path::PathBuf;

/// The seed's default block size.
pub const DEFAULT_BLOCK_SIZE: u64 = 512 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CbtError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool}: {source}")]
    Exec {
        tool: &'static str,
        #[source]
        source: kiln_exec::ExecError,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("block size {0} must be a power of two between 4 KiB and 64 MiB")]
    BlockSize(u64),
    #[error("cancelled")]
    Cancelled,
}

pub fn check_block_size(bs: u64) -> Result<(), CbtError> {
    if bs.is_power_of_two() && (4096..=64 << 20).contains(&bs) {
        Ok(())
    } else {
        Err(CbtError::BlockSize(bs))
    }
}
