//! The `provision` job kind: plan the volume (a refusal costs nothing),
//! obtain the image (cache hit, another job's download, or a download of
//! our own), verify it, create or grow the volume, write the image, zero the
//! rest, flush. Progress moves smoothly through the seed's stages
//! `downloading`, `verifying`, `converting`, `finalizing`; a failure or
//! cancel removes the volume only if this job created it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::Digest;
use kiln_engine::{decode_params, encode_result, JobContext, JobError, JobKind, JobLog};
use kiln_exec::{LogSink, Stream};
use kiln_store::ImageUrl;
use serde::{Deserialize, Serialize};

use crate::cache::{ImageCache, Pin};
use crate::convert::{self, ConvertError};
use crate::download::{self, DownloadError};
use crate::metrics::ProvisionMetrics;
use crate::source::{Revalidated, Source};
use crate::volume::{Locks, Volume, VolumeError};
use crate::{ImageType, ProvisionConfig, GIB, MAX_VOLUME_GB};

pub const KIND: &str = "provision";

/// The seed's request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionParams {
    pub image_url: String,
    pub volume_name: String,
    pub volume_size_gb: u64,
    #[serde(default = "default_type")]
    pub image_type: ImageType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

fn default_type() -> ImageType {
    ImageType::Qcow2
}

/// What a completed job reports (status shows `cache_hit` and `image_path`
/// at the top level, as the seed did, and the rest under `result`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionResult {
    pub cache_hit: bool,
    pub image_path: String,
    pub image_sha256: String,
    /// `sidecar` (the `.sha256` file's digest, verified) or `computed` (no
    /// sidecar: the digest of what was downloaded).
    pub digest_source: String,
    pub image_virtual_size: u64,
    pub volume_path: String,
    pub volume_created: bool,
    pub volume_size_bytes: u64,
    pub downloaded_bytes: u64,
    pub resumed: u32,
    /// Seconds per stage.
    pub stages: BTreeMap<String, f64>,
    /// The final progress document.
    pub progress: serde_json::Value,
}

#[derive(Debug)]
pub struct ProvisionJobs {
    cfg: ProvisionConfig,
    cache: Arc<ImageCache>,
    locks: Arc<Locks>,
    metrics: ProvisionMetrics,
    client: reqwest::Client,
}

impl ProvisionJobs {
    pub fn new(
        cfg: ProvisionConfig,
        cache: Arc<ImageCache>,
        metrics: ProvisionMetrics,
    ) -> Result<ProvisionJobs, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(ProvisionJobs {
            cfg,
            cache,
            locks: Arc::new(Locks::default()),
            metrics,
            client,
        })
    }

    pub fn config(&self) -> &ProvisionConfig {
        &self.cfg
    }

    pub fn cache(&self) -> &Arc<ImageCache> {
        &self.cache
    }

    pub fn metrics(&self) -> &ProvisionMetrics {
        &self.metrics
    }

    /// Check a request before it becomes a job; the message is for a 400.
    pub fn validate(&self, p: &ProvisionParams) -> Result<(), String> {
        if self.cfg.backend.is_none() {
            return Err("volume provisioning is not configured on this server: set LVM_VOLUME_GROUP, --volume-dir or --device-dir".into());
        }
        crate::validate_name(&p.volume_name).map_err(|e| e.to_string())?;
        if p.volume_size_gb == 0 || p.volume_size_gb > MAX_VOLUME_GB {
            return Err(format!(
                "volume_size_gb must be between 1 and {MAX_VOLUME_GB}"
            ));
        }
        if let Some(c) = &p.correlation_id {
            if c.len() > 256 || c.chars().any(char::is_control) {
                return Err("correlation_id must be at most 256 printable characters".into());
            }
        }
        Source::parse(&p.image_url, self.cfg.s3.as_ref(), &self.client)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// The key that keeps two jobs off one volume.
    pub fn volume_key(&self, p: &ProvisionParams) -> String {
        match &self.cfg.backend {
            Some(b) => b.path(&p.volume_name).display().to_string(),
            None => p.volume_name.clone(),
        }
    }
}

/// Stage weights: where each stage's progress starts, as a percentage.
struct Stages {
    download: (f64, f64),
    verify: (f64, f64),
    convert: (f64, f64),
    finalize: (f64, f64),
}

const MISS: Stages = Stages {
    download: (0.0, 60.0),
    verify: (60.0, 65.0),
    convert: (65.0, 97.0),
    finalize: (97.0, 100.0),
};
const HIT: Stages = Stages {
    download: (0.0, 0.0),
    verify: (0.0, 3.0),
    convert: (3.0, 97.0),
    finalize: (97.0, 100.0),
};

/// Progress reporting: rate-limited, never going backwards, with stage
/// timings for the histograms and the result.
struct Progress<'a> {
    ctx: &'a JobContext,
    metrics: &'a ProvisionMetrics,
    st: Mutex<ProgressState>,
}

struct ProgressState {
    stage: &'static str,
    since: Instant,
    last_write: Option<Instant>,
    percent: f64,
    doc: serde_json::Value,
    stages: BTreeMap<String, f64>,
}

impl<'a> Progress<'a> {
    fn new(ctx: &'a JobContext, metrics: &'a ProvisionMetrics) -> Progress<'a> {
        Progress {
            ctx,
            metrics,
            st: Mutex::new(ProgressState {
                stage: "downloading",
                since: Instant::now(),
                last_write: None,
                percent: 0.0,
                doc: serde_json::Value::Null,
                stages: BTreeMap::new(),
            }),
        }
    }

    /// Report `frac` of the stage spanning `span` percent.
    fn set(&self, stage: &'static str, span: (f64, f64), frac: f64, done: u64, total: u64) {
        let mut s = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let changed = s.stage != stage;
        if changed {
            let secs = s.since.elapsed().as_secs_f64();
            let prev = s.stage;
            self.metrics
                .stage_duration
                .with_label_values(&[prev])
                .observe(secs);
            *s.stages.entry(prev.to_string()).or_default() += secs;
            s.stage = stage;
            s.since = Instant::now();
            self.ctx.log.info(&format!("stage: {stage}"));
        }
        let pct = (span.0 + (span.1 - span.0) * frac.clamp(0.0, 1.0)).max(s.percent);
        s.percent = pct;
        s.doc = serde_json::json!({
            "stage": stage,
            "percent": pct.floor() as u64,
            "bytes_processed": done,
            "bytes_total": total,
        });
        let due = s
            .last_write
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
        if changed || due || frac >= 1.0 {
            s.last_write = Some(Instant::now());
            self.ctx.report(&s.doc);
        }
    }

    fn finish(&self) -> (BTreeMap<String, f64>, serde_json::Value) {
        let mut s = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let secs = s.since.elapsed().as_secs_f64();
        let stage = s.stage;
        self.metrics
            .stage_duration
            .with_label_values(&[stage])
            .observe(secs);
        *s.stages.entry(stage.to_string()).or_default() += secs;
        s.doc["percent"] = 100.into();
        self.ctx.report(&s.doc);
        (s.stages.clone(), s.doc.clone())
    }
}

/// Sends tool output to the job log.
struct JobSink(Arc<JobLog>);

impl LogSink for JobSink {
    fn line(&self, _: Stream, line: &str) {
        self.0.info(line);
    }
}

/// Counts a job in the seed's metrics however it ends (even when dropped
/// by the engine's timeout).
struct Accounting<'a> {
    m: &'a ProvisionMetrics,
    started: Instant,
    outcome: Option<&'static str>,
}

impl Drop for Accounting<'_> {
    fn drop(&mut self) {
        let status = self.outcome.unwrap_or("failed");
        self.m.active.dec();
        self.m.jobs.with_label_values(&[status]).inc();
        self.m
            .job_duration
            .with_label_values(&[status])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

fn fail(e: impl std::fmt::Display) -> JobError {
    JobError::Failed(e.to_string())
}

impl From<VolumeError> for JobError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Exec(x) if x.is_cancelled() => JobError::Cancelled,
            e => fail(e),
        }
    }
}

impl From<ConvertError> for JobError {
    fn from(e: ConvertError) -> Self {
        match e {
            ConvertError::Cancelled => JobError::Cancelled,
            ConvertError::Exec(x) if x.is_cancelled() => JobError::Cancelled,
            e => fail(e),
        }
    }
}

impl From<DownloadError> for JobError {
    fn from(e: DownloadError) -> Self {
        match e {
            DownloadError::Cancelled => JobError::Cancelled,
            e => fail(e),
        }
    }
}

/// An image ready to be written, pinned in the cache.
struct Obtained {
    digest: Digest,
    path: std::path::PathBuf,
    cache_hit: bool,
    digest_source: &'static str,
    downloaded: u64,
    resumed: u32,
    virtual_size: u64,
    _pin: Pin,
}

#[async_trait::async_trait]
impl JobKind for ProvisionJobs {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.cfg.concurrency.max(1))
    }

    /// The job enforces its own timeout (so it can roll back); this is the
    /// engine's backstop.
    fn timeout(&self) -> Option<Duration> {
        Some(self.cfg.timeout + Duration::from_secs(120))
    }

    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        self.metrics.jobs.with_label_values(&["started"]).inc();
        self.metrics.active.inc();
        let mut acct = Accounting {
            m: &self.metrics,
            started: Instant::now(),
            outcome: None,
        };
        let p: ProvisionParams = decode_params(params)?;
        let r = match tokio::time::timeout(self.cfg.timeout, self.provision(ctx, &p)).await {
            Ok(r) => r,
            Err(_) => Err(JobError::Failed(format!(
                "timed out after {}s",
                self.cfg.timeout.as_secs()
            ))),
        };
        acct.outcome = Some(match &r {
            Ok(_) => "completed",
            Err(JobError::Cancelled) => "cancelled",
            Err(_) if ctx.cancel.is_cancelled() => "cancelled",
            Err(_) => "failed",
        });
        r.and_then(|r| encode_result(&r))
    }
}

impl ProvisionJobs {
    async fn provision(
        &self,
        ctx: &JobContext,
        p: &ProvisionParams,
    ) -> Result<ProvisionResult, JobError> {
        let backend = self
            .cfg
            .backend
            .clone()
            .ok_or_else(|| fail("volume provisioning is not configured"))?;
        let want = p.volume_size_gb * GIB;
        let src = Source::parse(&p.image_url, self.cfg.s3.as_ref(), &self.client).map_err(fail)?;
        let log: Arc<dyn LogSink> = Arc::new(JobSink(ctx.log.clone()));
        let tt = self.cfg.tool_timeout;
        let progress = Progress::new(ctx, &self.metrics);
        ctx.log.info(&format!(
            "provisioning {} ({}) from {} onto {} volume {:?}, {} GiB",
            p.image_type.as_str(),
            p.correlation_id.as_deref().unwrap_or("no correlation id"),
            src.display(),
            backend.describe(),
            p.volume_name,
            p.volume_size_gb
        ));
        progress.set("downloading", (0.0, 0.0), 0.0, 0, 0);

        // 1. The volume: decided first, so a refusal costs no download.
        let vpath = backend.path(&p.volume_name);
        let _lock = self.locks.take(&vpath)?;
        let plan = backend.plan(&p.volume_name, want, tt, &ctx.cancel).await?;
        ctx.log
            .info(&format!("volume {}: {plan:?}", vpath.display()));

        // 2. The image.
        let img = self.obtain(ctx, &src, p.image_type, &progress).await?;
        let stages = if img.cache_hit { &HIT } else { &MISS };
        let target = match plan {
            crate::volume::Plan::Reuse { have } => have.max(want),
            _ => want,
        };
        if img.virtual_size > target {
            return Err(ConvertError::TooBig {
                image: img.virtual_size,
                volume: target,
            }
            .into());
        }

        // 3. Create or grow the volume; from here a failure rolls back.
        let vol = backend
            .apply(&p.volume_name, &plan, want, tt, &ctx.cancel, log.clone())
            .await?;
        if vol.created {
            ctx.log.info(&format!(
                "created volume {} ({} bytes)",
                vol.path.display(),
                vol.size
            ));
        }
        let written = self
            .write(
                ctx,
                p.image_type,
                &img,
                &vol,
                stages,
                &progress,
                log.clone(),
            )
            .await;
        if let Err(e) = written {
            if vol.created {
                ctx.log.info(&format!(
                    "rolling back: removing {}, which this job created",
                    vol.path.display()
                ));
                if let Err(re) = backend.rollback(&p.volume_name, &vol, tt, log).await {
                    tracing::error!(volume = %vol.path.display(), error = %re, "rollback failed");
                    ctx.log.info(&format!("rollback failed: {re}"));
                }
            } else {
                ctx.log.info(&format!(
                    "{} existed before this job; it is kept (its content is incomplete)",
                    vol.path.display()
                ));
            }
            return Err(e);
        }
        let (stage_secs, doc) = progress.finish();
        Ok(ProvisionResult {
            cache_hit: img.cache_hit,
            image_path: img.path.display().to_string(),
            image_sha256: img.digest.hex(),
            digest_source: img.digest_source.into(),
            image_virtual_size: img.virtual_size,
            volume_path: vol.path.display().to_string(),
            volume_created: vol.created,
            volume_size_bytes: vol.size,
            downloaded_bytes: img.downloaded,
            resumed: img.resumed,
            stages: stage_secs,
            progress: doc,
        })
    }

    /// Convert, zero the tail, flush.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        ctx: &JobContext,
        ty: ImageType,
        img: &Obtained,
        vol: &Volume,
        stages: &Stages,
        progress: &Progress<'_>,
        log: Arc<dyn LogSink>,
    ) -> Result<(), JobError> {
        let tt = self.cfg.tool_timeout;
        let vs = img.virtual_size;
        if !vol.path.exists() {
            return Err(fail(format!(
                "volume {} has no device node: the LV is not active{}",
                vol.path.display(),
                match &self.cfg.backend {
                    Some(crate::Backend::Lvm {
                        metadata_only: true,
                        ..
                    }) => {
                        " (--lvm-metadata-only never activates LVs)"
                    }
                    _ => "",
                }
            )));
        }
        progress.set("converting", stages.convert, 0.0, 0, vs);
        let t = Instant::now();
        let zeros = match ty {
            ImageType::Qcow2 => {
                let span = stages.convert;
                // qemu-img's sink must be 'static, so it leaves the latest
                // fraction in a cell that this loop reports from.
                let cell = Arc::new(Mutex::new(0.0f64));
                let c2 = cell.clone();
                let on: Arc<dyn Fn(f64) + Send + Sync> = Arc::new(move |f| {
                    *c2.lock().unwrap_or_else(|e| e.into_inner()) = f;
                });
                let conv =
                    convert::qemu_convert(&img.path, vol, self.cfg.timeout, &ctx.cancel, log, on);
                tokio::pin!(conv);
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        r = &mut conv => { r?; break; }
                        _ = tick.tick() => {
                            let f = *cell.lock().unwrap_or_else(|e| e.into_inner());
                            progress.set("converting", span, f, (f * vs as f64) as u64, vs);
                        }
                    }
                }
                Vec::new()
            }
            ImageType::Raw => {
                let (src, v, cancel) = (img.path.clone(), vol.clone(), ctx.cancel.clone());
                let cell = Arc::new(Mutex::new(0.0f64));
                let c2 = cell.clone();
                let copy = tokio::task::spawn_blocking(move || {
                    convert::copy_raw(&src, &v, vs, &cancel, &|f| {
                        *c2.lock().unwrap_or_else(|e| e.into_inner()) = f;
                    })
                });
                tokio::pin!(copy);
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        r = &mut copy => break r.map_err(fail)??,
                        _ = tick.tick() => {
                            let f = *cell.lock().unwrap_or_else(|e| e.into_inner());
                            progress.set("converting", stages.convert, f, (f * vs as f64) as u64, vs);
                        }
                    }
                }
            }
        };
        progress.set("converting", stages.convert, 1.0, vs, vs);
        ctx.log.info(&format!(
            "wrote {vs} bytes in {:.1}s ({:.0} MiB/s)",
            t.elapsed().as_secs_f64(),
            vs as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64().max(1e-3)
        ));
        // Finalize: everything the image did not cover reads as zeros.
        progress.set("finalizing", stages.finalize, 0.0, vs, vs);
        if !vol.zeroed {
            for (o, l) in zeros {
                convert::zero_range(vol, o, l, tt, &ctx.cancel).await?;
            }
            if vol.size > vs {
                ctx.log.info(&format!(
                    "zeroing {} bytes past the image's end",
                    vol.size - vs
                ));
                convert::zero_range(vol, vs, vol.size - vs, tt, &ctx.cancel).await?;
            }
        }
        let v = vol.clone();
        tokio::task::spawn_blocking(move || convert::flush(&v))
            .await
            .map_err(fail)??;
        progress.set("finalizing", stages.finalize, 0.9, vs, vs);
        Ok(())
    }

    /// A pinned, verified image: from the cache, from another job's
    /// download, or downloaded now.
    async fn obtain(
        &self,
        ctx: &JobContext,
        src: &Source,
        ty: ImageType,
        progress: &Progress<'_>,
    ) -> Result<Obtained, JobError> {
        let key = src.display();
        let tt = self.cfg.tool_timeout;
        let sidecar = self.with_retries(ctx, || src.sidecar()).await?;
        match sidecar {
            Some(d) => ctx.log.info(&format!("checksum file: sha256 {d}")),
            None => ctx.log.info("no .sha256 checksum file; the cache entry is keyed by URL and revalidated with ETag/Last-Modified"),
        }
        let hit = |d: &Digest, how: &'static str| -> Result<Option<Obtained>, JobError> {
            let pin = self.cache.pin(d);
            let Some(row) = self.cache.lookup(d).map_err(fail)? else {
                return Ok(None);
            };
            if row.format != ty.as_str() {
                return Err(fail(format!(
                    "the cached image {d} is {}, but the request says image_type {}",
                    row.format,
                    ty.as_str()
                )));
            }
            self.metrics.cache.with_label_values(&[how]).inc();
            Ok(Some(Obtained {
                digest: *d,
                path: self.cache.path(d),
                cache_hit: true,
                digest_source: if sidecar.is_some() {
                    "sidecar"
                } else {
                    "computed"
                },
                downloaded: 0,
                resumed: 0,
                virtual_size: 0,
                _pin: pin,
            }))
        };
        let finish_hit = |mut o: Obtained| async move {
            progress.set("verifying", HIT.verify, 0.0, 0, 0);
            let info = convert::inspect(&o.path, ty, tt, &ctx.cancel).await?;
            o.virtual_size = info.virtual_size;
            ctx.log.info(&format!(
                "cache hit: {} ({} bytes virtual)",
                o.path.display(),
                o.virtual_size
            ));
            Ok::<_, JobError>(o)
        };
        if let Some(d) = &sidecar {
            if let Some(o) = hit(d, "hit")? {
                return finish_hit(o).await;
            }
        }
        // One download per image: wait for another job's, then look again.
        let guard = tokio::select! {
            g = self.cache.fetch_lock(&key) => g,
            _ = ctx.cancel.cancelled() => return Err(JobError::Cancelled),
        };
        if let Some(d) = &sidecar {
            if let Some(o) = hit(d, "shared")? {
                return finish_hit(o).await;
            }
        } else if let Some(u) = self.cache.db().image_url(&key).map_err(fail)? {
            if let Some(o) = hit(&u.digest, "hit")? {
                match self
                    .with_retries(ctx, || {
                        src.revalidate(u.etag.as_deref(), u.last_modified.as_deref())
                    })
                    .await?
                {
                    Revalidated::Unchanged => {
                        ctx.log
                            .info("the server says the image is unchanged (ETag/Last-Modified)");
                        return finish_hit(o).await;
                    }
                    Revalidated::Changed => ctx.log.info(
                        "the image changed on the server since it was cached; downloading it again",
                    ),
                }
            }
        }
        self.metrics.cache.with_label_values(&["miss"]).inc();
        let t = Instant::now();
        let on_bytes = |done: u64, total: Option<u64>| {
            let t = total.unwrap_or(0);
            let f = if t > 0 { done as f64 / t as f64 } else { 0.0 };
            progress.set("downloading", MISS.download, f, done, t);
        };
        let log = |m: &str| ctx.log.info(m);
        let dl = download::fetch(
            src,
            self.cache.cas(),
            self.cfg.download_attempts,
            &ctx.cancel,
            &on_bytes,
            &log,
        )
        .await?;
        let size = dl.blob.size();
        self.metrics.downloaded_bytes.inc_by(size);
        ctx.log.info(&format!(
            "downloaded {size} bytes in {:.1}s ({:.0} MiB/s){}",
            t.elapsed().as_secs_f64(),
            size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64().max(1e-3),
            if dl.resumed > 0 {
                format!(", resumed {} times", dl.resumed)
            } else {
                String::new()
            }
        ));
        // Verify: the digest (computed while streaming), then the format.
        progress.set("verifying", MISS.verify, 0.0, size, size);
        let actual = dl.blob.digest();
        if let Some(expected) = sidecar {
            if expected != actual {
                return Err(fail(crate::cache::CacheError::Mismatch {
                    url: key,
                    expected,
                    actual,
                }));
            }
            ctx.log.info("checksum verified");
        }
        let info = convert::inspect(dl.blob.path(), ty, tt, &ctx.cancel).await?;
        let (etag, last_modified, resumed) =
            (dl.etag.clone(), dl.last_modified.clone(), dl.resumed);
        let (row, pin) = self
            .cache
            .admit(dl.blob, sidecar, ty.as_str(), &key)
            .await
            .map_err(fail)?;
        if sidecar.is_none() {
            self.cache
                .db()
                .put_image_url(
                    &key,
                    &ImageUrl {
                        digest: row.digest,
                        etag,
                        last_modified,
                    },
                )
                .map_err(fail)?;
        }
        drop(guard);
        progress.set("verifying", MISS.verify, 1.0, size, size);
        Ok(Obtained {
            digest: row.digest,
            path: self.cache.path(&row.digest),
            cache_hit: false,
            digest_source: if sidecar.is_some() {
                "sidecar"
            } else {
                "computed"
            },
            downloaded: size,
            resumed,
            virtual_size: info.virtual_size,
            _pin: pin,
        })
    }

    /// Small requests (sidecar, revalidation) get the same bounded retries
    /// as downloads.
    async fn with_retries<T, F, Fut>(&self, ctx: &JobContext, f: F) -> Result<T, JobError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::SourceError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = tokio::select! {
                r = f() => r,
                _ = ctx.cancel.cancelled() => return Err(JobError::Cancelled),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && attempt < self.cfg.download_attempts => {
                    ctx.log.info(&format!("{e}; retrying"));
                    tokio::time::sleep(Duration::from_millis(500 * attempt as u64)).await;
                }
                Err(e) => return Err(fail(e)),
            }
        }
    }
}
