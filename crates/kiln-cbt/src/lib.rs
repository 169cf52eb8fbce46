//! Changed block tracking: which blocks differ between a base and a target
//! snapshot, computed from the cheapest source of truth available (a QCOW2
//! allocation map when the base is in the target's backing chain, else a
//! parallel full compare), stored as runs so that a page at any offset costs
//! O(log n) whatever the delta's size, and fetched block by block with
//! self-verifying, expiring data tokens. No HTTP here: kiln-api serves it.

mod job;
mod qcow2;
mod qcow2_meta;
mod runs;
mod scan;
mod thin;
mod token;

pub use job::{inspect, CbtJobs, CbtParams, CbtResult, SourceInfo, ThinParams, KIND};
pub use qcow2::{backing_chain, overlay_delta, overlay_delta_qemu};
pub use qcow2_meta::overlay_delta_native;
pub use runs::{to_indexed_bytes, Runs, RunsBuilder, RunsFile};
pub use scan::{full_scan, volume_size};
pub use thin::{parse_thin_delta, thin_delta};
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

/// Run a metadata tool (`qemu-img`, `thin_delta`) and return its stdout;
/// cancellation and failure become [`CbtError`]s naming the tool.
pub(crate) async fn run_captured(
    tool: &'static str,
    cmd: kiln_exec::Cmd,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<String, CbtError> {
    let sink = std::sync::Arc::new(kiln_exec::CaptureSink::default());
    cmd.timeout(std::time::Duration::from_secs(3600))
        .run(sink.clone(), cancel)
        .await
        .map_err(|source| {
            if source.is_cancelled() {
                CbtError::Cancelled
            } else {
                CbtError::Exec { tool, source }
            }
        })?;
    Ok(sink.stdout())
}

pub fn check_block_size(bs: u64) -> Result<(), CbtError> {
    if bs.is_power_of_two() && (4096..=64 << 20).contains(&bs) {
        Ok(())
    } else {
        Err(CbtError::BlockSize(bs))
    }
}

/// Resolve `path` (symlinks included) and accept it only below one of
/// `roots` (`--snapshot-root`).
pub fn allowed_path(roots: &[PathBuf], path: &std::path::Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!(
            "{}: the source path must be absolute",
            path.display()
        ));
    }
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|r| real.starts_with(&r))
    {
        Ok(real)
    } else if roots.is_empty() {
        Err("no --snapshot-root is configured, so no snapshot source is allowed".into())
    } else {
        Err(format!(
            "{} is outside the allowed snapshot roots (--snapshot-root)",
            path.display()
        ))
    }
}

/// Snapshot roots, the data-token key and the token lifetime.
#[derive(Debug, Clone)]
pub struct CbtConfig {
    pub roots: Vec<PathBuf>,
    pub key: TokenKey,
    pub token_ttl_secs: i64,
}

/// The guest-visible bytes of block `block` (of `bs` bytes; `len` may be
/// shorter for the last block) of a raw file, block device or QCOW2 image.
/// QCOW2 is read with `qemu-img convert` of a raw window through
/// `scratch`, which is removed.
pub async fn read_block(
    path: &std::path::Path,
    format: &str,
    block: u64,
    bs: u64,
    len: u64,
    scratch: &std::path::Path,
) -> Result<Vec<u8>, CbtError> {
    let io = |source| CbtError::Io {
        path: path.into(),
        source,
    };
    if format != "qcow2" {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path).map_err(io)?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, block * bs).map_err(io)?;
        return Ok(buf);
    }
    // A raw view (offset, size) over the qcow2 node; QEMU's option syntax
    // escapes a comma in the path by doubling it.
    let opts = format!(
        "driver=raw,offset={},size={len},file.driver=qcow2,file.file.driver=file,file.file.filename={}",
        block * bs,
        path.display().to_string().replace(',', ",,")
    );
    let r = kiln_exec::Cmd::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", "--image-opts", &opts])
        .arg(scratch)
        .timeout(std::time::Duration::from_secs(300))
        .run(
            std::sync::Arc::new(kiln_exec::NullSink),
            &tokio_util::sync::CancellationToken::new(),
        )
        .await;
    let out = r
        .map_err(|source| CbtError::Exec {
            tool: "qemu-img",
            source,
        })
        .and_then(|_| std::fs::read(scratch).map_err(io));
    let _ = std::fs::remove_file(scratch);
    let mut data = out?;
    data.truncate(len as usize);
    Ok(data)
}
