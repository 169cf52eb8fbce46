//! The job engine. A job kind (kernel modules today; images, volumes and
//! deltas later) is a [`JobKind`] implementation; the engine owns everything
//! around it: queueing and de-duplication, claiming with leases, the
//! concurrency limit, the per-job timeout, cancellation that kills process
//! trees, restart recovery, the job log and progress, and job metrics.

mod log;
pub mod metrics;

pub use log::{follow_log, JobLog};
pub use metrics::Metrics;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Digest, JobId, JobStatus};
use kiln_store::{Db, JobFilter, JobRow, StoreError, Submitted};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What a job kind does with one job.
#[async_trait::async_trait]
pub trait JobKind: Send + Sync + 'static {
    /// The kind's name, stored with each job (`kmod`).
    fn kind(&self) -> &'static str;
    /// Run one job. Called again after a restart if the job was cut off, so
    /// it must start from its params, not from half-done state.
    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError>;
    /// This kind's own limit on jobs running at once. `None` shares the
    /// engine's `concurrency` slots with the other unlimited kinds; `Some(n)`
    /// gets n slots of its own, so slow volume jobs never starve builds.
    fn concurrency(&self) -> Option<usize> {
        None
    }
    /// This kind's own per-job timeout, instead of the engine's.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl From<kiln_exec::ExecError> for JobError {
    fn from(e: kiln_exec::ExecError) -> Self {
        if e.is_cancelled() {
            JobError::Cancelled
        } else {
            JobError::Failed(e.to_string())
        }
    }
}

/// A job kind's parameters, decoded; a malformed document fails the job.
pub fn decode_params<P: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<P, JobError> {
    serde_json::from_value(v)
        .map_err(|e| JobError::Failed(format!("malformed job parameters: {e}")))
}

/// A job kind's result, encoded for the store.
pub fn encode_result<R: serde::Serialize>(r: &R) -> Result<serde_json::Value, JobError> {
    serde_json::to_value(r).map_err(|e| JobError::Failed(format!("encoding the job result: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("no job kind {0:?} is registered")]
    UnknownKind(String),
}

/// What a running job gets from the engine.
#[derive(Debug)]
pub struct JobContext {
    pub id: JobId,
    pub kind: &'static str,
    /// A private, empty directory, removed after the job unless kept.
    pub workdir: PathBuf,
    pub cancel: CancellationToken,
    pub log: Arc<JobLog>,
    /// The attempt number, from 1.
    pub attempt: i64,
    db: Arc<Db>,
}

impl JobContext {
    /// Record progress (shown in status). Best effort: a failure is logged.
    pub fn progress(&self, stage: &str, percent: u8) {
        let p = serde_json::json!({"stage": stage, "percent": percent.min(100)});
        if let Err(e) = self.db.set_progress(&self.id, &p) {
            tracing::warn!(error = %e, "recording progress");
        }
        self.log.info(&format!("stage: {stage} ({percent}%)"));
    }

    /// Record a kind's own progress document (shown in status as is), without
    /// a log line; callers rate-limit it.
    pub fn report(&self, progress: &serde_json::Value) {
        if let Err(e) = self.db.set_progress(&self.id, progress) {
            tracing::warn!(error = %e, "recording progress");
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub concurrency: usize,
    pub job_timeout: Duration,
    pub lease: Duration,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    pub keep_workdir: bool,
    /// A job interrupted by this many restarts fails instead of re-running.
    pub max_attempts: i64,
}

pub struct Engine {
    db: Arc<Db>,
    kinds: HashMap<&'static str, Arc<dyn JobKind>>,
    cfg: EngineConfig,
    owner: String,
    running: Mutex<HashMap<JobId, CancellationToken>>,
    /// Jobs running per kind; claims honour [`JobKind::concurrency`].
    active: Mutex<HashMap<&'static str, usize>>,
    wake: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Engine {
    pub fn new(
        db: Arc<Db>,
        cfg: EngineConfig,
        kinds: Vec<Arc<dyn JobKind>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Engine>, EngineError> {
        for d in [&cfg.work_dir, &cfg.log_dir] {
            std::fs::create_dir_all(d).map_err(|source| StoreError::Io {
                op: "create",
                path: d.clone(),
                source,
            })?;
        }
        Ok(Arc::new(Engine {
            db,
            kinds: kinds.into_iter().map(|k| (k.kind(), k)).collect(),
            cfg,
            owner: format!("kiln-{}", uuid::Uuid::new_v4().simple()),
            running: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            metrics,
        }))
    }

    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn log_path(&self, id: &JobId) -> PathBuf {
        self.cfg.log_dir.join(format!("{id}.log"))
    }

    /// Queue a job, join an identical one, or return the remembered failure.
    pub fn submit(
        &self,
        kind: &str,
        dedupe_key: &str,
        params: &serde_json::Value,
        input: Option<&Digest>,
        force: bool,
    ) -> Result<Submitted, EngineError> {
        if !self.kinds.contains_key(kind) {
            return Err(EngineError::UnknownKind(kind.to_string()));
        }
        let s = self.db.submit(kind, dedupe_key, params, input, force)?;
        if let Submitted::Created(j) = &s {
            tracing::info!(job.id = %j.id, job.kind = kind, dedupe_key, "job queued");
            self.wake.notify_one();
        }
        Ok(s)
    }

    pub fn get(&self, id: &JobId) -> Result<Option<JobRow>, EngineError> {
        Ok(self.db.get(id)?)
    }

    pub fn list(&self, f: &JobFilter) -> Result<Vec<JobRow>, EngineError> {
        Ok(self.db.list(f)?)
    }

    /// Cancel a job. A pending job is cancelled at once; a building one has
    /// its process tree killed and turns `cancelled` when its worker sees it.
    /// A finished job is returned unchanged.
    pub async fn cancel(&self, id: &JobId) -> Result<JobRow, EngineError> {
        let token = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if let Some(t) = token {
            t.cancel();
            // Wait (briefly) for the worker to record the outcome.
            for _ in 0..100 {
                if let Some(j) = self.db.get(id)? {
                    if j.status.is_terminal() {
                        return Ok(j);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return self
                .db
                .get(id)?
                .ok_or_else(|| EngineError::NotFound(id.clone()));
        }
        match self.db.cancel_pending(id) {
            Ok(j) => {
                if j.status == JobStatus::Cancelled {
                    self.metrics
                        .job_finished(&j.kind, JobStatus::Cancelled, None);
                }
                Ok(j)
            }
            Err(StoreError::JobNotFound(id)) => Err(EngineError::NotFound(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Re-queue or fail jobs a previous run left `building`, then start the
    /// workers. They stop when `shutdown` fires; a job cut off that way is
    /// re-run at the next start.
    pub fn start(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinSet<()>, EngineError> {
        let (requeued, failed) = self.db.recover_interrupted(self.cfg.max_attempts)?;
        for id in &requeued {
            tracing::warn!(job.id = %id, "job was interrupted by a restart; re-queued");
            JobLog::open(&self.log_path(id)).info("kiln restarted while this job ran; re-queued");
        }
        for id in &failed {
            tracing::error!(job.id = %id, "job was interrupted too often; failed");
        }
        // Stale work directories belong to no running job now.
        if let Ok(rd) = std::fs::read_dir(&self.cfg.work_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let mut set = tokio::task::JoinSet::new();
        let own: usize = self.kinds.values().filter_map(|k| k.concurrency()).sum();
        for n in 0..self.cfg.concurrency.max(1) + own {
            let me = self.clone();
            let sd = shutdown.clone();
            set.spawn(async move { me.worker(n, sd).await });
        }
        Ok(set)
    }

    /// Claim a job of a kind that has a free slot, and take the slot.
    fn claim_slot(&self, owner: &str) -> Result<Option<JobRow>, StoreError> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let shared: usize = self
            .kinds
            .values()
            .filter(|k| k.concurrency().is_none())
            .map(|k| active.get(k.kind()).copied().unwrap_or(0))
            .sum();
        let kinds: Vec<&str> = self
            .kinds
            .values()
            .filter(|k| match k.concurrency() {
                Some(n) => active.get(k.kind()).copied().unwrap_or(0) < n,
                None => shared < self.cfg.concurrency.max(1),
            })
            .map(|k| k.kind())
            .collect();
        if kinds.is_empty() {
            return Ok(None);
        }
        let job = self
            .db
            .claim(owner, &kinds, self.cfg.lease.as_millis() as i64)?;
        if let Some(k) = job.as_ref().and_then(|j| self.kinds.get(j.kind.as_str())) {
            *active.entry(k.kind()).or_default() += 1;
        }
        Ok(job)
    }

    fn release_slot(&self, kind: &str) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = active.get_mut(kind) {
            *n = n.saturating_sub(1);
        }
        drop(active);
        // A freed slot may let a waiting job of this kind start.
        self.wake.notify_waiters();
    }

    async fn worker(self: Arc<Self>, n: usize, shutdown: CancellationToken) {
        let owner = format!("{}-{n}", self.owner);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match self.claim_slot(&owner) {
                Ok(Some(job)) => {
                    let kind = job.kind.clone();
                    tokio::select! {
                        _ = self.execute(&owner, job) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    self.release_slot(&kind);
                }
                Ok(None) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming a job");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn execute(&self, owner: &str, job: JobRow) {
        let Some(kind) = self.kinds.get(job.kind.as_str()).cloned() else {
            let _ = self.db.finish(
                &job.id,
                owner,
                JobStatus::Failed,
                None,
                Some("unknown job kind"),
            );
            return;
        };
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone(), cancel.clone());
        let workdir = self.cfg.work_dir.join(job.id.as_str());
        let _ = std::fs::remove_dir_all(&workdir);
        let log = Arc::new(JobLog::open(&self.log_path(&job.id)));
        let span = tracing::info_span!("job", job.id = %job.id, job.kind = kind.kind());
        let started = Instant::now();
        let outcome: Result<serde_json::Value, JobError> = async {
            std::fs::create_dir_all(&workdir)
                .map_err(|e| JobError::Failed(format!("creating work dir {}: {e}", workdir.display())))?;
            let ctx = JobContext {
                id: job.id.clone(),
                kind: kind.kind(),
                workdir: workdir.clone(),
                cancel: cancel.clone(),
                log: log.clone(),
                attempt: job.attempts,
                db: self.db.clone(),
            };
            tracing::info!(attempt = job.attempts, "job started");
            log.info(&format!("job {} ({}) started, attempt {}", job.id, kind.kind(), job.attempts));
            let heartbeat = self.heartbeat(&job.id, owner, &cancel);
            let timeout = kind.timeout().unwrap_or(self.cfg.job_timeout);
            tokio::select! {
                r = tokio::time::timeout(timeout, kind.run(&ctx, job.params.clone())) => match r {
                    Ok(r) => r,
                    Err(_) => Err(JobError::Failed(format!("timed out after {}s; the job's processes were killed", timeout.as_secs()))),
                },
                _ = heartbeat => Err(JobError::Failed("lost the job's lease".into())),
            }
        }
        .instrument(span.clone())
        .await;
        let _enter = span.enter();
        let secs = started.elapsed().as_secs_f64();
        let (status, result, error) = match outcome {
            Ok(v) => (JobStatus::Completed, Some(v), None),
            Err(JobError::Cancelled) => (
                JobStatus::Cancelled,
                None,
                Some("cancelled by request".to_string()),
            ),
            Err(_) if cancel.is_cancelled() => (
                JobStatus::Cancelled,
                None,
                Some("cancelled by request".to_string()),
            ),
            Err(JobError::Failed(m)) => (JobStatus::Failed, None, Some(m)),
        };
        match &error {
            None => {
                let _ = self.db.set_progress(
                    &job.id,
                    &serde_json::json!({"stage": "done", "percent": 100}),
                );
                log.info(&format!("job completed in {secs:.1}s"))
            }
            Some(e) => log.info(&format!("job {status}: {e}")),
        }
        match self
            .db
            .finish(&job.id, owner, status, result.as_ref(), error.as_deref())
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!("job was no longer ours when it finished"),
            Err(e) => tracing::error!(error = %e, "recording job outcome"),
        }
        tracing::info!(status = %status, duration_s = secs, error = error.as_deref().unwrap_or(""), "job finished");
        self.metrics.job_finished(kind.kind(), status, Some(secs));
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id);
        if self.cfg.keep_workdir {
            tracing::info!(workdir = %workdir.display(), "keeping work dir (--keeptmpdir)");
        } else {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&workdir)).await;
        }
    }

    /// Renews the lease until it cannot; returns only when the lease is lost.
    async fn heartbeat(&self, id: &JobId, owner: &str, cancel: &CancellationToken) {
        let every = self.cfg.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.db.renew(id, owner, self.cfg.lease.as_millis() as i64) {
                Ok(true) => {}
                Ok(false) => {
                    cancel.cancel();
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing lease"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
