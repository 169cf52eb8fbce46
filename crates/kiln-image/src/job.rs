//! The `image` job kind: fetch and store the sources, unpack them, build
//! with buildah and push both tags (or retag a `docker://` image with
//! skopeo), recording the pushed digest. Each status change is a callback.
//! Stop and timeout are outcomes of their own (`stopped`, `timed_out`); in
//! both, dropping the running command kills buildah's whole process group.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::Digest;
use kiln_engine::{decode_params, encode_result, JobContext, JobError, JobKind, JobLog};
use kiln_exec::{LogSink, Stream};
use kiln_store::{Cas, Db};
use serde::{Deserialize, Serialize};

use crate::buildah;
use crate::callback::{Callbacks, Message};
use crate::request::BuildRequest;
use crate::sources::{self, SourceError};
use crate::ImageConfig;

pub const KIND: &str = "image";
/// Alias kinds in kiln-store: a build's key to its job, a build uuid to its sources.
const BUILD_ALIAS: &str = "image-build";
const SOURCES_ALIAS: &str = "image-sources";

/// What a finished build reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageResult {
    /// `{repo}:1.{n}` and `{repo}:latest`.
    pub tags: Vec<String>,
    /// The pushed manifest's digest (`sha256:…`).
    pub digest: String,
    pub sources_sha256: Option<String>,
    pub seconds: f64,
}

#[derive(Debug)]
pub struct ImageJobs {
    cfg: ImageConfig,
    cas: Cas,
    db: Arc<Db>,
    callbacks: Arc<Callbacks>,
    client: reqwest::Client,
}

/// Tool output into the job log (and kiln's log with `SHOW_BUILD_LOGS`).
struct BuildSink {
    log: Arc<JobLog>,
    show: bool,
    build: String,
}

impl LogSink for BuildSink {
    fn line(&self, stream: Stream, line: &str) {
        self.log.line(stream, line);
        if self.show {
            tracing::info!(build = %self.build, "{line}");
        }
    }
}

impl ImageJobs {
    pub fn new(cfg: ImageConfig, cas: Cas, db: Arc<Db>) -> Result<ImageJobs, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()?;
        std::fs::create_dir_all(&cfg.storage_dir).ok();
        Ok(ImageJobs {
            callbacks: Arc::new(Callbacks::new(
                client.clone(),
                cfg.callback_secret.clone(),
                cfg.callback_attempts,
            )),
            cfg,
            cas,
            db,
            client,
        })
    }

    pub fn config(&self) -> &ImageConfig {
        &self.cfg
    }

    /// The key of build `number` of app `app_key` (`{app}-{app_uuid}`).
    pub fn build_key(app_key: &str, number: &str) -> String {
        format!("{app_key}/{number}")
    }

    /// Remember which job builds `req` (the seed's routes name builds, not jobs).
    pub fn record(
        &self,
        req: &BuildRequest,
        job: &kiln_core::JobId,
    ) -> Result<(), kiln_store::StoreError> {
        self.db.put_alias(
            BUILD_ALIAS,
            &Self::build_key(&req.app_key(), &req.number()),
            job.as_str(),
        )
    }

    pub fn job_of(
        &self,
        app_key: &str,
        number: &str,
    ) -> Result<Option<kiln_core::JobId>, kiln_store::StoreError> {
        Ok(self
            .db
            .alias(BUILD_ALIAS, &Self::build_key(app_key, number))?
            .and_then(|s| s.parse().ok()))
    }

    /// The stored sources of a build, if kept.
    pub fn sources_path(
        &self,
        build_uuid: &str,
    ) -> Result<Option<std::path::PathBuf>, kiln_store::StoreError> {
        let Some(d) = self.db.alias(SOURCES_ALIAS, build_uuid)? else {
            return Ok(None);
        };
        let Ok(d) = d.parse::<Digest>() else {
            return Ok(None);
        };
        let p = self.cas.path(&d);
        Ok(p.is_file().then_some(p))
    }

    fn callback(
        &self,
        req: &BuildRequest,
        status: &str,
        building: bool,
        digest: Option<&str>,
        last: bool,
    ) {
        let Some(url) = req.callback.clone().filter(|u| !u.is_empty()) else {
            return;
        };
        let id = match &req.build_number {
            serde_json::Value::Null => serde_json::Value::String(req.number()),
            v => v.clone(),
        };
        let mut body = serde_json::json!({
            "id": id,
            "status": status,
            "building": building,
            "type": "buildshuttle",
            "build_uuid": req.build_uuid,
            "image": format!("{}:1.{}", req.repository(), req.number()),
        });
        if let Some(d) = digest {
            body["digest"] = d.into();
        }
        self.callbacks.send(
            &Self::build_key(&req.app_key(), &req.number()),
            Message {
                url,
                authorization: req.callback_auth.clone(),
                body,
                last,
            },
        );
    }

    /// A build was accepted: the seed's `pending` callback.
    pub fn accepted(&self, req: &BuildRequest) {
        self.callback(req, "pending", false, None, false);
    }

    /// A build was stopped before it started: its last callback.
    pub fn stopped_before_start(&self, req: &BuildRequest) {
        self.callback(req, "stopped", false, None, true);
    }

    async fn build(&self, ctx: &JobContext, req: &BuildRequest) -> Result<ImageResult, JobError> {
        let t = Instant::now();
        let fail = |e: &dyn std::fmt::Display| JobError::Failed(e.to_string());
        let sink: Arc<dyn LogSink> = Arc::new(BuildSink {
            log: ctx.log.clone(),
            show: self.cfg.show_build_logs,
            build: Self::build_key(&req.app_key(), &req.number()),
        });
        let env = buildah::prepare(&ctx.workdir, req, &self.cfg).map_err(|e| fail(&e))?;
        let repo = req.repository();
        let tags = vec![
            format!("{repo}:1.{}", req.number()),
            format!("{repo}:latest"),
        ];
        let limit = self.cfg.timeout;
        let mut digest = String::new();
        let mut sources_sha256 = None;
        if let Some(image) = req.sources.strip_prefix("docker://") {
            ctx.progress("copying", 10);
            ctx.log
                .info(&format!("copying {image} to {} and {}", tags[0], tags[1]));
            for t in &tags {
                let dg = ctx.workdir.join("digest");
                buildah::copy(&self.cfg, &env, image, t, &dg, limit)
                    .run(sink.clone(), &ctx.cancel)
                    .await?;
                digest = std::fs::read_to_string(&dg)
                    .map_err(|e| fail(&e))?
                    .trim()
                    .to_string();
            }
        } else {
            ctx.progress("fetching", 5);
            let (d, size) = sources::fetch(
                &req.sources,
                &self.client,
                &self.cas,
                self.cfg.limits.max_bytes,
                &ctx.cancel,
            )
            .await
            .map_err(|e| match e {
                SourceError::Cancelled => JobError::Cancelled,
                e => fail(&e),
            })?;
            self.db.touch_blob(&d, size).map_err(|e| fail(&e))?;
            self.db
                .put_alias(SOURCES_ALIAS, &req.build_uuid, &d.hex())
                .map_err(|e| fail(&e))?;
            sources_sha256 = Some(d.hex());
            ctx.log.info(&format!("sources: {size} bytes, sha256 {d}"));
            let dest = ctx.workdir.join("context");
            std::fs::create_dir_all(&dest).map_err(|e| fail(&e))?;
            let (archive, limits) = (self.cas.path(&d), self.cfg.limits);
            let d2 = dest.clone();
            let cx = tokio::task::spawn_blocking(move || sources::unpack(&archive, &d2, limits))
                .await
                .map_err(|e| fail(&e))?
                .map_err(|e| fail(&e))?;
            ctx.progress("building", 20);
            let cmd = buildah::bud(&self.cfg, &env, req, &cx, &tags, limit);
            ctx.log.info(&format!("$ {}", cmd.display()));
            cmd.run(sink.clone(), &ctx.cancel).await?;
            ctx.progress("pushing", 80);
            for t in &tags {
                let dg = ctx.workdir.join("digest");
                buildah::push(&self.cfg, &env, t, &dg, limit)
                    .run(sink.clone(), &ctx.cancel)
                    .await?;
                digest = std::fs::read_to_string(&dg)
                    .map_err(|e| fail(&e))?
                    .trim()
                    .to_string();
                ctx.log.info(&format!("pushed {t} ({digest})"));
            }
        }
        Ok(ImageResult {
            tags,
            digest,
            sources_sha256,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

#[async_trait::async_trait]
impl JobKind for ImageJobs {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.cfg.parallel.max(1))
    }

    /// The job enforces `TIMEOUT_IN_MS` itself (a distinct `timed_out`
    /// outcome); this is the engine's backstop.
    fn timeout(&self) -> Option<Duration> {
        Some(self.cfg.timeout + Duration::from_secs(60))
    }

    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        let req: BuildRequest = decode_params(params)?;
        self.callback(&req, "building", true, None, false);
        let r = tokio::time::timeout(self.cfg.timeout, self.build(ctx, &req)).await;
        let (outcome, r) = match r {
            Err(_) => (
                "timed_out",
                Err(JobError::Failed(format!(
                    "timed out after {}s (TIMEOUT_IN_MS); the build was killed",
                    self.cfg.timeout.as_secs()
                ))),
            ),
            Ok(Ok(v)) => ("succeeded", Ok(v)),
            Ok(Err(JobError::Cancelled)) => ("stopped", Err(JobError::Cancelled)),
            Ok(Err(_)) if ctx.cancel.is_cancelled() => ("stopped", Err(JobError::Cancelled)),
            Ok(Err(e)) => ("failed", Err(e)),
        };
        ctx.report(&serde_json::json!({"stage": "done", "outcome": outcome}));
        ctx.log.info(&format!("outcome: {outcome}"));
        let digest = r.as_ref().ok().map(|v| v.digest.clone());
        self.callback(&req, outcome, false, digest.as_deref(), true);
        r.and_then(|v| encode_result(&v))
    }
}
