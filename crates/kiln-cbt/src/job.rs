//! Computing a delta as an engine job (`cbt`): cancellable, with progress,
//! stored in the cache as an indexed runs file. The method follows the
//! sources: a QCOW2 target whose chain holds the base is answered from the
//! allocation map; raw files and block devices are compared in full; other
//! QCOW2 pairs are flattened to sparse raw files in the job's work dir first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kiln_core::Digest;
use kiln_engine::{JobContext, JobError, JobKind};
use kiln_exec::{CaptureSink, Cmd, NullSink};
use kiln_store::Cas;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{full_scan, overlay_delta, to_indexed_bytes, CbtError};

pub const KIND: &str = "cbt";

/// What a snapshot source is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceInfo {
    /// `raw`, `qcow2`, or `block` (a block device, e.g. an LVM LV).
    pub format: String,
    /// The guest-visible size in bytes.
    pub size: u64,
}

/// Inspect a snapshot source (file or block device).
pub async fn inspect(path: &Path) -> Result<SourceInfo, CbtError> {
    use std::os::unix::fs::FileTypeExt;
    let md = std::fs::metadata(path).map_err(|source| CbtError::Io {
        path: path.into(),
        source,
    })?;
    if md.file_type().is_block_device() {
        return Ok(SourceInfo {
            format: "block".into(),
            size: crate::volume_size(path)?,
        });
    }
    if !md.is_file() {
        return Err(CbtError::Format {
            path: path.into(),
            message: "not a regular file or block device".into(),
        });
    }
    let sink = Arc::new(CaptureSink::default());
    Cmd::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .timeout(std::time::Duration::from_secs(60))
        .run(sink.clone(), &CancellationToken::new())
        .await
        .map_err(|source| CbtError::Exec {
            tool: "qemu-img",
            source,
        })?;
    let v: serde_json::Value =
        serde_json::from_str(&sink.stdout()).map_err(|e| CbtError::Format {
            path: path.into(),
            message: e.to_string(),
        })?;
    let format = v["format"].as_str().unwrap_or("raw");
    if format != "raw" && format != "qcow2" {
        return Err(CbtError::Format {
            path: path.into(),
            message: format!("unsupported image format {format}: raw, qcow2 or a block device"),
        });
    }
    Ok(SourceInfo {
        format: format.into(),
        size: v["virtual-size"].as_u64().unwrap_or(md.len()),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CbtParams {
    pub base: PathBuf,
    pub target: PathBuf,
    pub block_size: u64,
    /// Both snapshots are thin devices of one pool: use `thin_delta`.
    #[serde(default)]
    pub thin: Option<ThinParams>,
    /// What the snapshots were when they were made (saves inspecting again).
    #[serde(default)]
    pub base_info: Option<SourceInfo>,
    #[serde(default)]
    pub target_info: Option<SourceInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ThinParams {
    /// The pool's metadata (a metadata snapshot device, or a file).
    pub metadata: PathBuf,
    pub base_id: u64,
    pub target_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CbtResult {
    /// The indexed runs file in the cache.
    pub runs: Digest,
    pub changed_blocks: u64,
    pub volume_size: u64,
    pub block_size: u64,
    pub method: String,
    /// Time spent computing, in seconds.
    #[serde(default)]
    pub compute_seconds: f64,
}

#[derive(Debug)]
pub struct CbtJobs {
    cas: Cas,
    db: Arc<kiln_store::Db>,
    threads: usize,
}

impl CbtJobs {
    pub fn new(cas: Cas, db: Arc<kiln_store::Db>) -> CbtJobs {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        CbtJobs { cas, db, threads }
    }

    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    async fn flatten(&self, src: &Path, dst: &Path, ctx: &JobContext) -> Result<(), CbtError> {
        Cmd::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(src)
            .arg(dst)
            .timeout(std::time::Duration::from_secs(24 * 3600))
            .run(Arc::new(NullSink), &ctx.cancel)
            .await
            .map_err(|source| {
                if source.is_cancelled() {
                    CbtError::Cancelled
                } else {
                    CbtError::Exec {
                        tool: "qemu-img",
                        source,
                    }
                }
            })
    }

    async fn compute(&self, ctx: &JobContext, p: &CbtParams) -> Result<CbtResult, CbtError> {
        ctx.progress("inspecting", 1);
        let bi = match &p.base_info {
            Some(i) => i.clone(),
            None => inspect(&p.base).await?,
        };
        let ti = match &p.target_info {
            Some(i) => i.clone(),
            None => inspect(&p.target).await?,
        };
        ctx.log.info(&format!(
            "base {} ({}, {} bytes), target {} ({}, {} bytes), block size {}",
            p.base.display(),
            bi.format,
            bi.size,
            p.target.display(),
            ti.format,
            ti.size,
            p.block_size
        ));
        if let Some(t) = &p.thin {
            ctx.progress("thin_delta", 5);
            let runs = crate::thin_delta(
                &t.metadata,
                t.base_id,
                t.target_id,
                p.block_size,
                &ctx.cancel,
            )
            .await?;
            return self.store(ctx, runs, ti.size, p.block_size, "thin-delta");
        }
        if ti.format == "qcow2" {
            if let Some((runs, size)) =
                overlay_delta(&p.target, &p.base, p.block_size, &ctx.cancel).await?
            {
                return self.store(ctx, runs, size, p.block_size, "qcow2-allocation-map");
            }
        }
        let (mut base, mut target, mut method) = (p.base.clone(), p.target.clone(), "full-scan");
        for (info, path) in [(&bi, &mut base), (&ti, &mut target)] {
            if info.format == "qcow2" {
                ctx.progress("flattening qcow2", 2);
                let flat = ctx.workdir.join(format!(
                    "flat-{}.raw",
                    if std::ptr::eq(info, &bi) {
                        "base"
                    } else {
                        "target"
                    }
                ));
                self.flatten(path, &flat, ctx).await?;
                *path = flat;
                method = "full-scan-flattened";
            }
        }
        ctx.progress("comparing", 5);
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d2, s2, threads, bs) = (done.clone(), stop.clone(), self.threads, p.block_size);
        let scan =
            tokio::task::spawn_blocking(move || full_scan(&base, &target, bs, threads, &d2, &s2));
        tokio::pin!(scan);
        let total = ti.size.max(1);
        let runs = loop {
            tokio::select! {
                r = &mut scan => break r.map_err(|_| CbtError::Cancelled)??,
                _ = ctx.cancel.cancelled() => {
                    stop.store(true, Ordering::Relaxed);
                }
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    let pct = 5 + (done.load(Ordering::Relaxed) * 90 / total) as u8;
                    ctx.progress("comparing", pct);
                }
            }
        };
        let (runs, size) = runs;
        self.store(ctx, runs, size, p.block_size, method)
    }

    fn store(
        &self,
        ctx: &JobContext,
        runs: crate::Runs,
        size: u64,
        block_size: u64,
        method: &str,
    ) -> Result<CbtResult, CbtError> {
        let file = ctx.workdir.join("runs");
        std::fs::write(&file, to_indexed_bytes(&runs)).map_err(|source| CbtError::Io {
            path: file.clone(),
            source,
        })?;
        let (digest, bytes) = self.cas.ingest_file(&file).map_err(|e| CbtError::Format {
            path: file.clone(),
            message: format!("storing the delta: {e}"),
        })?;
        let _ = self.db.touch_blob(&digest, bytes);
        ctx.log.info(&format!(
            "{} changed blocks in {} runs ({method})",
            runs.count(),
            runs.runs().len()
        ));
        Ok(CbtResult {
            runs: digest,
            changed_blocks: runs.count(),
            volume_size: size,
            block_size,
            method: method.into(),
            compute_seconds: 0.0,
        })
    }
}

#[async_trait::async_trait]
impl JobKind for CbtJobs {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        let p: CbtParams = kiln_engine::decode_params(params)?;
        let t0 = std::time::Instant::now();
        match self.compute(ctx, &p).await {
            Ok(mut r) => {
                r.compute_seconds = t0.elapsed().as_secs_f64();
                kiln_engine::encode_result(&r)
            }
            Err(CbtError::Cancelled) => Err(JobError::Cancelled),
            Err(e) => Err(JobError::Failed(e.to_string())),
        }
    }
}
