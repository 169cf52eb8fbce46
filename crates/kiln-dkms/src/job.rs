//! dkms2bin as a server job kind (`dkms`): one DKMS package (a `.deb` or a
//! source tarball) and one kernel's headers (a tar.gz) in, one binary `.deb`
//! out. Cached by content (package bytes, header tree digest, kernel,
//! signing key), deduplicated and cancellable through the engine like kmod.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_core::{Digest, Hasher, JobId, KernelVersion};
use kiln_engine::{Engine, JobContext, JobError, JobKind, Metrics};
use kiln_store::{Cas, Db, StoreError, Submitted, TempBlob};
use serde::{Deserialize, Serialize};

use crate::{build, prepare_kernel, prepare_source, DkmsError, Env, Outcome};

pub const KIND: &str = "dkms";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DkmsParams {
    pub kernel_version: KernelVersion,
    pub package: Digest,
    /// `deb` or `tar`.
    pub package_kind: String,
    pub headers: Digest,
    pub cache_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DkmsResult {
    pub cache_key: String,
    pub kernel_version: KernelVersion,
    /// None when the package skips this kernel (BUILD_EXCLUSIVE_*).
    pub artifact: Option<Digest>,
    pub size: u64,
    pub file_name: Option<String>,
    pub modules: Vec<String>,
    pub skipped: Option<String>,
}

#[derive(Debug)]
pub enum DkmsOutcome {
    Hit {
        path: PathBuf,
        file_name: String,
        job_id: Option<JobId>,
    },
    Job(Submitted),
}

#[derive(Debug)]
pub struct DkmsJobs {
    env: Env,
    cas: Cas,
    db: Arc<Db>,
    metrics: Arc<Metrics>,
    limits: kiln_archive::Limits,
}

fn store(e: StoreError) -> DkmsError {
    DkmsError::Input(format!("cache: {e}"))
}

impl DkmsJobs {
    pub fn new(
        env: Env,
        cas: Cas,
        db: Arc<Db>,
        metrics: Arc<Metrics>,
        limits: kiln_archive::Limits,
    ) -> DkmsJobs {
        DkmsJobs {
            env,
            cas,
            db,
            metrics,
            limits,
        }
    }

    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    /// Take a request whose package and headers were streamed to temp blobs.
    pub async fn request(
        &self,
        engine: &Engine,
        package: TempBlob,
        headers: TempBlob,
        kver: KernelVersion,
        force: bool,
    ) -> Result<DkmsOutcome, DkmsError> {
        let package_kind = {
            let mut head = [0u8; 8];
            let n = {
                use std::io::Read;
                let mut f =
                    std::fs::File::open(package.path()).map_err(crate::io(package.path()))?;
                f.read(&mut head).map_err(crate::io(package.path()))?
            };
            if head[..n].starts_with(b"!<arch>\n") {
                "deb"
            } else if kiln_archive::is_gzip(&head[..n]) {
                "tar"
            } else {
                return Err(DkmsError::Input(
                    "the package must be a DKMS .deb or a tar.gz of a DKMS source tree".into(),
                ));
            }
        };
        let hp = headers.path().to_path_buf();
        let limits = self.limits;
        let tree = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&hp).map_err(crate::io(&hp))?;
            kiln_archive::digest_tar_gz(f, limits)
                .map_err(|e| DkmsError::Input(format!("the headers: {e}")))
        })
        .await
        .map_err(|e| DkmsError::Input(e.to_string()))??;
        let mut h = Hasher::new();
        h.field(b"dkms-v1")
            .field(package.digest().as_bytes())
            .field(tree.digest.as_bytes())
            .field(kver.as_str().as_bytes())
            .field(
                self.env
                    .signing
                    .as_ref()
                    .map(|s| s.fingerprint.hex())
                    .unwrap_or_default()
                    .as_bytes(),
            );
        let key = h.finish().hex();
        if !force {
            if let Some(a) = self.db.artifact(KIND, &key).map_err(store)? {
                if let Ok(path) = self.cas.verify(&a.digest) {
                    self.db.touch_blob(&a.digest, a.size).map_err(store)?;
                    self.metrics
                        .cache_hits
                        .with_label_values(&[KIND, "content"])
                        .inc();
                    tracing::info!(kernel_version = %kver, cache_key = %key, "cache hit");
                    return Ok(DkmsOutcome::Hit {
                        path,
                        file_name: a.meta["file_name"]
                            .as_str()
                            .unwrap_or("module.deb")
                            .to_string(),
                        job_id: a.job_id,
                    });
                }
            }
        }
        self.metrics.cache_misses.with_label_values(&[KIND]).inc();
        let (pkg, psize) = package.commit().await.map_err(store)?;
        self.db.touch_blob(&pkg, psize).map_err(store)?;
        let (hdr, hsize) = headers.commit().await.map_err(store)?;
        self.db.touch_blob(&hdr, hsize).map_err(store)?;
        let params = DkmsParams {
            kernel_version: kver,
            package: pkg,
            package_kind: package_kind.into(),
            headers: hdr,
            cache_key: key.clone(),
        };
        let v = serde_json::to_value(&params).map_err(|e| DkmsError::Input(e.to_string()))?;
        let s = engine
            .submit(KIND, &key, &v, Some(&hdr), force)
            .map_err(|e| DkmsError::Input(e.to_string()))?;
        Ok(DkmsOutcome::Job(s))
    }

    async fn run_job(&self, ctx: &JobContext, p: &DkmsParams) -> Result<DkmsResult, DkmsError> {
        ctx.progress("preparing", 5);
        let pkg = self.cas.verify(&p.package).map_err(store)?;
        let hdr = self.cas.verify(&p.headers).map_err(store)?;
        let work = &ctx.workdir;
        let input = if p.package_kind == "deb" {
            let dst = work.join("package.deb");
            std::fs::copy(&pkg, &dst).map_err(crate::io(&dst))?;
            dst
        } else {
            let dst = work.join("package-src");
            std::fs::create_dir_all(&dst).map_err(crate::io(&dst))?;
            let (src, d2, limits) = (pkg.clone(), dst.clone(), self.limits);
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&src).map_err(crate::io(&src))?;
                kiln_archive::extract_tar_gz(f, &d2, limits)
                    .map_err(|e| DkmsError::Input(format!("the package: {e}")))
            })
            .await
            .map_err(|e| DkmsError::Input(e.to_string()))??;
            // dkms.conf at the top, or in the single top directory.
            if dst.join("dkms.conf").is_file() {
                dst
            } else {
                let tops: Vec<PathBuf> = std::fs::read_dir(&dst)
                    .map_err(crate::io(&dst))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("dkms.conf").is_file())
                    .collect();
                match tops.as_slice() {
                    [one] => one.clone(),
                    _ => {
                        return Err(DkmsError::Input(
                            "the source tarball has no dkms.conf at its top or in a single top directory".into(),
                        ))
                    }
                }
            }
        };
        let src = prepare_source(&input.to_string_lossy(), work, &ctx.log, &ctx.cancel).await?;
        let tree = prepare_kernel(
            p.kernel_version.as_str(),
            Some(&hdr),
            work,
            &ctx.log,
            &ctx.cancel,
        )
        .await?;
        ctx.progress("building", 20);
        let out = work.join("out");
        let r = build(
            &src,
            &tree,
            &self.env,
            &work.join("build"),
            &out,
            ctx.log.clone(),
            &ctx.cancel,
        )
        .await?;
        ctx.progress("storing", 95);
        match r {
            Outcome::Skipped(why) => Ok(DkmsResult {
                cache_key: p.cache_key.clone(),
                kernel_version: p.kernel_version.clone(),
                artifact: None,
                size: 0,
                file_name: None,
                modules: vec![],
                skipped: Some(why),
            }),
            Outcome::Built { deb, modules } => {
                let (digest, size) = self.cas.ingest_file(&deb).map_err(store)?;
                let file_name = deb
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let meta = serde_json::json!({"file_name": file_name, "modules": modules});
                self.db
                    .put_artifact(KIND, &p.cache_key, &digest, size, &meta, Some(&ctx.id))
                    .map_err(store)?;
                self.db.touch_blob(&digest, size).map_err(store)?;
                Ok(DkmsResult {
                    cache_key: p.cache_key.clone(),
                    kernel_version: p.kernel_version.clone(),
                    artifact: Some(digest),
                    size,
                    file_name: Some(file_name),
                    modules,
                    skipped: None,
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl JobKind for DkmsJobs {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        let p: DkmsParams = kiln_engine::decode_params(params)?;
        match self.run_job(ctx, &p).await {
            Ok(r) => kiln_engine::encode_result(&r),
            Err(e) if e.is_cancelled() => Err(JobError::Cancelled),
            Err(e) => Err(JobError::Failed(e.to_string())),
        }
    }
}
