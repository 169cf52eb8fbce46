//! The kernel-module job kind: the DRBD build server's work, done safely.
//!
//! A request is a tar.gz of kernel headers plus a kernel version. [`Kmod::request`]
//! answers it from the cache (first by the upload's raw digest, then by the
//! content digest of the tree inside) or queues a job; [`Kmod`] as a
//! [`JobKind`] extracts the headers, finds the build tree, prepares the
//! module source, runs `make module KDIR=<tree>` in a sandbox, signs the
//! modules if asked, and stores the archive in the cache.

mod sandbox;
mod source;
mod tree;
mod trees;
mod upload;

pub use sandbox::Sandbox;
pub use source::{ModuleSource, SourceError};
pub use tree::{find_kernel_tree, rewrite_absolute_includes, sig_hash, TreeError};
pub use trees::{HeaderTrees, TreeLease, TreesError};
pub use upload::StreamingStage;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_archive::{ArchiveError, Limits};
use kiln_core::{Digest, Hasher, JobId, KernelVersion};
use kiln_engine::{Engine, JobContext, JobError, JobKind, Metrics};
use kiln_exec::Cmd;
use kiln_store::{Cas, Db, StoreError, Submitted};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "kmod";

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Trees(#[from] TreesError),
    #[error(transparent)]
    Engine(#[from] kiln_engine::EngineError),
    #[error("internal task failed: {0}")]
    Join(String),
}

/// Module signing, configured once at start.
#[derive(Debug, Clone)]
pub struct Signing {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// The certificate in DER, as `mokutil --import` wants it.
    pub cert_der: Vec<u8>,
    /// SHA-256 of the DER certificate; part of every cache key.
    pub fingerprint: Digest,
}

impl Signing {
    /// Load the certificate (PEM or DER) with openssl and fingerprint it.
    pub async fn load(key: &Path, cert: &Path, scratch: &Path) -> Result<Signing, String> {
        std::fs::File::open(key).map_err(|e| format!("signing key {}: {e}", key.display()))?;
        let der = scratch.join("signing-cert.der");
        let mut last = String::new();
        for inform in ["PEM", "DER"] {
            let r = Cmd::new("openssl")
                .args(["x509", "-inform", inform, "-in"])
                .arg(cert)
                .args(["-outform", "DER", "-out"])
                .arg(&der)
                .timeout(Duration::from_secs(30))
                .run(Arc::new(kiln_exec::NullSink), &Default::default())
                .await;
            match r {
                Ok(()) => {
                    let cert_der =
                        std::fs::read(&der).map_err(|e| format!("{}: {e}", der.display()))?;
                    return Ok(Signing {
                        key: key.to_path_buf(),
                        cert: cert.to_path_buf(),
                        fingerprint: Digest::of(&cert_der),
                        cert_der,
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "signing certificate {} is not a PEM or DER X.509 certificate: {last}",
            cert.display()
        ))
    }
}

#[derive(Debug, Clone)]
pub struct KmodConfig {
    pub source: ModuleSource,
    pub spaas_url: String,
    /// Let builds reach the network (DRBD's SPAAS needs it).
    pub build_network: bool,
    pub sandbox: Sandbox,
    pub signing: Option<Signing>,
    pub limits: Limits,
    pub make_jobs: usize,
    pub cache_max_bytes: u64,
}

/// The job's parameters, stored with it, enough to re-run it after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KmodParams {
    pub kernel_version: KernelVersion,
    pub input: Digest,
    pub cache_key: String,
    pub raw_alias: String,
    pub source_id: String,
    /// The headers' tree digest, under which the extracted tree is kept
    /// (absent in jobs queued by kiln before header trees were kept).
    #[serde(default)]
    pub tree: Option<Digest>,
}

/// What a finished job records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KmodResult {
    pub cache_key: String,
    pub artifact: Digest,
    pub size: u64,
    pub modules: Vec<String>,
    pub signed: bool,
    pub kernel_version: KernelVersion,
}

/// The answer to a build request.
#[derive(Debug)]
pub enum Outcome {
    /// Served from the cache: a verified archive.
    Hit {
        path: PathBuf,
        cache_key: String,
        job_id: Option<JobId>,
    },
    Job(Submitted),
}

#[derive(Debug)]
pub struct Kmod {
    cfg: KmodConfig,
    cas: Cas,
    db: Arc<Db>,
    metrics: Arc<Metrics>,
    trees: Arc<HeaderTrees>,
}

impl Kmod {
    pub fn new(
        cfg: KmodConfig,
        cas: Cas,
        db: Arc<Db>,
        metrics: Arc<Metrics>,
        trees: Arc<HeaderTrees>,
    ) -> Kmod {
        Kmod {
            cfg,
            cas,
            db,
            metrics,
            trees,
        }
    }

    pub fn config(&self) -> &KmodConfig {
        &self.cfg
    }

    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    fn sign_fp(&self) -> String {
        self.cfg
            .signing
            .as_ref()
            .map(|s| s.fingerprint.hex())
            .unwrap_or_default()
    }

    fn key(&self, tag: &str, d: &Digest, kver: &KernelVersion, src: &str) -> String {
        let mut h = Hasher::new();
        h.field(tag.as_bytes())
            .field(d.as_bytes())
            .field(kver.as_str().as_bytes())
            .field(src.as_bytes())
            .field(self.sign_fp().as_bytes());
        h.finish().hex()
    }

    /// A verified cached archive for `key`, or None (a corrupt one is dropped).
    fn cached(&self, key: &str) -> Result<Option<(PathBuf, Option<JobId>)>, KmodError> {
        let Some(a) = self.db.artifact(KIND, key)? else {
            return Ok(None);
        };
        match self.cas.verify(&a.digest) {
            Ok(p) => {
                self.db.touch_blob(&a.digest, a.size)?;
                Ok(Some((p, a.job_id)))
            }
            Err(StoreError::Corrupt { .. } | StoreError::Missing(_)) => {
                self.db.drop_artifact(KIND, key)?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A cache hit for `key` found through `index` (`raw` or `tree`), counted and logged.
    fn hit(
        &self,
        index: &str,
        kver: &KernelVersion,
        key: &str,
    ) -> Result<Option<Outcome>, KmodError> {
        let Some((path, job_id)) = self.cached(key)? else {
            return Ok(None);
        };
        self.metrics
            .cache_hits
            .with_label_values(&[KIND, index])
            .inc();
        tracing::info!(kernel_version = %kver, cache_key = %key, index, "cache hit");
        Ok(Some(Outcome::Hit {
            path,
            cache_key: key.to_string(),
            job_id,
        }))
    }

    /// The first-level index alone: a hit for a body whose SHA-256 the
    /// client declared, answered before any of the body is read.
    pub async fn lookup_raw(
        &self,
        raw: &Digest,
        kver: &KernelVersion,
    ) -> Result<Option<Outcome>, KmodError> {
        let src = self.cfg.source.identity().await?;
        let alias = self.key("raw-v1", raw, kver, &src);
        match self.db.alias(KIND, &alias)? {
            Some(key) => self.hit("declared-raw", kver, &key),
            None => Ok(None),
        }
    }

    /// For a kernel version with no kept tree, an extraction to feed the
    /// request body to as it arrives; pass it to [`request`](Self::request).
    pub fn stream_stage(&self, kver: &KernelVersion) -> Option<StreamingStage> {
        StreamingStage::start(&self.trees, kver, self.cfg.limits)
    }

    /// Answer a build request whose body has been streamed to `upload`
    /// (not yet committed to the cache), and to `staging` if it was
    /// extracted on the way. `raw` is the digest of its bytes.
    pub async fn request(
        &self,
        engine: &Engine,
        upload: kiln_store::TempBlob,
        staging: Option<StreamingStage>,
        kver: KernelVersion,
        force: bool,
    ) -> Result<Outcome, KmodError> {
        let raw = upload.digest();
        let src = self.cfg.source.identity().await?;
        let alias = self.key("raw-v1", &raw, &kver, &src);
        if !force {
            if let Some(key) = self.db.alias(KIND, &alias)? {
                if let Some(hit) = self.hit("raw", &kver, &key)? {
                    return Ok(hit);
                }
            }
        }
        // The tree these exact bytes hold, if they were read before: a pure
        // function of the bytes (and the extraction limits), so another
        // module source, signing key or ?force=true need not read them again.
        let limits = self.cfg.limits;
        let tree_alias = {
            let mut h = Hasher::new();
            h.field(b"raw-tree-v1")
                .field(raw.as_bytes())
                .field(&limits.max_bytes.to_le_bytes())
                .field(&limits.max_entries.to_le_bytes());
            h.finish().hex()
        };
        let known = self
            .db
            .alias(KIND, &tree_alias)?
            .and_then(|t| t.parse::<Digest>().ok());
        let tree = match known {
            Some(t) => {
                tracing::info!(kernel_version = %kver, tree = %t.hex(), "upload seen before: its tree is known");
                t
            }
            None => {
                let s = match staging {
                    Some(st) => st.finish().await,
                    None => self.read_tree(upload.path()).await,
                };
                // Without a build tree for this kernel it is still a job,
                // which fails and says why (as when only a digest was taken).
                let s = match s {
                    Err(KmodError::Trees(TreesError::NoBuildTree { summary, .. })) => summary,
                    s => s?,
                };
                self.db.put_alias(KIND, &tree_alias, &s.digest.hex())?;
                s.digest
            }
        };
        let key = self.key("tree-v1", &tree, &kver, &src);
        if !force {
            if let Some(hit) = self.hit("tree", &kver, &key)? {
                self.db.put_alias(KIND, &alias, &key)?;
                return Ok(hit);
            }
        }
        self.metrics.cache_misses.with_label_values(&[KIND]).inc();
        let (input, size) = upload.commit().await?;
        self.db.touch_blob(&input, size)?;
        let params = KmodParams {
            kernel_version: kver.clone(),
            input,
            cache_key: key.clone(),
            raw_alias: alias,
            source_id: src,
            tree: Some(tree),
        };
        let params = serde_json::to_value(&params).map_err(|e| KmodError::Join(e.to_string()))?;
        let s = engine.submit(KIND, &key, &params, Some(&input), force)?;
        tracing::info!(kernel_version = %kver, cache_key = %key, tree = %tree.hex(), "cache miss");
        Ok(Outcome::Job(s))
    }

    /// Validate the uploaded archive and digest the tree it holds, writing
    /// nothing (headers new to the server were extracted on the way in).
    async fn read_tree(&self, file: &Path) -> Result<kiln_archive::TreeSummary, KmodError> {
        let (file, limits) = (file.to_path_buf(), self.cfg.limits);
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&file)
                .map_err(|source| ArchiveError::Io { path: file, source })?;
            Ok(kiln_archive::digest_tar_gz(f, limits)?)
        })
        .await
        .map_err(|e| KmodError::Join(e.to_string()))?
    }

    /// Evict least-recently-used blobs beyond the cap.
    pub fn enforce_cache_cap(&self) {
        if let Err(e) = self.evict_to(self.cfg.cache_max_bytes) {
            tracing::warn!(error = %e, "cache eviction");
        }
    }

    /// Evict least recently used blobs until the cache holds at most `cap`
    /// bytes, sparing pending and running jobs' inputs. Returns the number of
    /// blobs evicted and the bytes freed.
    pub fn evict_to(&self, cap: u64) -> Result<(usize, u64), kiln_store::StoreError> {
        let (_, before) = self.db.cache_usage()?;
        let victims = self.db.evict_to(cap)?;
        for d in &victims {
            tracing::info!(digest = %d, "evicted from cache (LRU)");
            let _ = self.cas.remove(d);
        }
        let (_, after) = self.db.cache_usage()?;
        self.metrics.cache_bytes.set(after as i64);
        Ok((victims.len(), before.saturating_sub(after)))
    }

    /// The job's headers as a kept tree: the one its request extracted, or
    /// (after an eviction, a restart that lost it, or a request that only
    /// digested) extracted now from the uploaded archive.
    async fn header_tree(&self, ctx: &JobContext, p: &KmodParams) -> Result<TreeLease, JobError> {
        let fail = |m: String| JobError::Failed(m);
        if let Some(d) = &p.tree {
            // A request extracting these headers right now finishes first.
            let kver = &p.kernel_version;
            let lease = || {
                self.trees
                    .lease(d, kver)
                    .map_err(|e| fail(format!("kept header tree {}: {e}", d.hex())))
            };
            loop {
                if let Some(l) = lease()? {
                    ctx.log.info("headers already extracted");
                    return Ok(l);
                }
                if !self.trees.staging(kver) {
                    break;
                }
                if ctx.cancel.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let input = self
            .cas
            .verify(&p.input)
            .map_err(|e| fail(format!("the uploaded headers are gone: {e}")))?;
        let (trees, kver, limits) = (
            self.trees.clone(),
            p.kernel_version.clone(),
            self.cfg.limits,
        );
        let (summary, lease) =
            tokio::task::spawn_blocking(move || trees.stage(&input, &kver, limits))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| match e {
                    TreesError::Archive(a) => fail(format!("rejected headers archive: {a}")),
                    e => fail(e.to_string()),
                })?;
        ctx.log.info(&format!(
            "extracted {} entries, {} bytes",
            summary.entries, summary.bytes
        ));
        if p.tree.is_some_and(|d| d != summary.digest) {
            return Err(fail(format!(
                "the uploaded headers hold tree {}, not the {} they were accepted as",
                summary.digest.hex(),
                p.tree.map(|d| d.hex()).unwrap_or_default()
            )));
        }
        Ok(lease)
    }

    async fn build(&self, ctx: &JobContext, p: &KmodParams) -> Result<KmodResult, JobError> {
        let fail = |m: String| JobError::Failed(m);
        ctx.progress("extracting headers", 5);
        // Held until the build ends, so the tree is not evicted under it.
        let headers = self.header_tree(ctx, p).await?;
        let kdir = headers.kdir().to_path_buf();
        // Shown read-only wherever the store lives (the sandbox hides /tmp and /dev).
        let visible = [headers.dir().to_path_buf()];
        ctx.log.info(&format!(
            "kernel build tree: {} (header tree {})",
            kdir.strip_prefix(headers.dir()).unwrap_or(&kdir).display(),
            headers.digest().hex()
        ));

        ctx.progress("preparing module source", 15);
        let src = ctx.workdir.join("src");
        self.cfg
            .source
            .materialize(&src, ctx.log.clone(), &ctx.cancel)
            .await
            .map_err(|e| fail(e.to_string()))?;

        ctx.progress("building", 25);
        let make = Cmd::new("make")
            .arg(format!("-j{}", self.cfg.make_jobs.max(1)))
            .arg("module")
            .arg(format!("KDIR={}", kdir.display()))
            .env("SPAAS_URL", &self.cfg.spaas_url);
        let make = self
            .cfg
            .sandbox
            .wrap_with(make, &ctx.workdir, &src, self.cfg.build_network, &visible)
            .timeout(Duration::from_secs(24 * 3600)); // the engine's job timeout governs
        make.run(ctx.log.clone(), &ctx.cancel).await?;

        ctx.progress("collecting modules", 85);
        let mut kos: Vec<(String, PathBuf)> = Vec::new();
        for e in walkdir::WalkDir::new(&src)
            .into_iter()
            .filter_map(Result::ok)
        {
            if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "ko") {
                let name = e.file_name().to_string_lossy().into_owned();
                if kos.iter().any(|(n, _)| *n == name) {
                    return Err(fail(format!("two modules are named {name}")));
                }
                kos.push((name, e.path().to_path_buf()));
            }
        }
        kos.sort();
        if kos.is_empty() {
            return Err(fail("make module succeeded but built no .ko files".into()));
        }
        if let Some(s) = &self.cfg.signing {
            ctx.progress("signing", 90);
            let hash = tree::sig_hash(&kdir);
            let sign_file = kdir.join("scripts/sign-file");
            // The sandbox sees only the work dir writable and hides /tmp:
            // give sign-file private copies of the key and certificate.
            let keys = ctx.workdir.join("signing");
            let (key, cert) = stage_signing_files(s, &keys).map_err(fail)?;
            for (name, path) in &kos {
                let cmd = Cmd::new(&sign_file)
                    .arg(&hash)
                    .arg(&key)
                    .arg(&cert)
                    .arg(path);
                self.cfg
                    .sandbox
                    .wrap_with(cmd, &ctx.workdir, &src, false, &visible)
                    .timeout(Duration::from_secs(120))
                    .run(ctx.log.clone(), &ctx.cancel)
                    .await?;
                ctx.log.info(&format!("signed {name} ({hash})"));
            }
            let _ = std::fs::remove_dir_all(&keys);
        }
        ctx.progress("storing", 95);
        let tmp = self.cas.temp_path();
        let (kos2, cas) = (kos.clone(), self.cas.clone());
        let (digest, size) =
            tokio::task::spawn_blocking(move || -> Result<(Digest, u64), String> {
                let f =
                    std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
                let f = kiln_archive::pack_files(f, &kos2).map_err(|e| e.to_string())?;
                f.sync_all()
                    .map_err(|e| format!("fsync {}: {e}", tmp.display()))?;
                drop(f);
                cas.ingest_file(&tmp).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail)?;
        let modules: Vec<String> = kos.into_iter().map(|(n, _)| n).collect();
        let meta = serde_json::json!({"modules": modules, "kernel_version": p.kernel_version});
        self.db
            .put_artifact(KIND, &p.cache_key, &digest, size, &meta, Some(&ctx.id))
            .and_then(|_| self.db.put_alias(KIND, &p.raw_alias, &p.cache_key))
            .map_err(|e| fail(e.to_string()))?;
        self.enforce_cache_cap();
        tracing::info!(kernel_version = %p.kernel_version, cache_key = %p.cache_key, modules = ?modules, "modules cached");
        Ok(KmodResult {
            cache_key: p.cache_key.clone(),
            artifact: digest,
            size,
            modules,
            signed: self.cfg.signing.is_some(),
            kernel_version: p.kernel_version.clone(),
        })
    }
}

/// Copy the signing key (mode 0600) and certificate into `dir`.
fn stage_signing_files(s: &Signing, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let key = dir.join("signing.key");
    let cert = dir.join("signing.crt");
    let bytes =
        std::fs::read(&s.key).map_err(|e| format!("signing key {}: {e}", s.key.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    std::io::Write::write_all(&mut f, &bytes).map_err(|e| format!("{}: {e}", key.display()))?;
    std::fs::copy(&s.cert, &cert)
        .map_err(|e| format!("signing certificate {}: {e}", s.cert.display()))?;
    Ok((key, cert))
}

#[async_trait::async_trait]
impl JobKind for Kmod {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn run(
        &self,
        ctx: &JobContext,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JobError> {
        let p: KmodParams = kiln_engine::decode_params(params)?;
        tracing::info!(job_id = %ctx.id, kernel_version = %p.kernel_version, cache_key = %p.cache_key, "building kernel modules");
        kiln_engine::encode_result(&self.build(ctx, &p).await?)
    }
}
