//! Where the module source comes from: a directory (`--drbd-dir`, copied
//! into each build) or a git branch `drbd-{version}` of `--drbd-repo`, cloned
//! once per version with its submodules into kiln's data directory. Each
//! source has an identity (a content digest or a git revision) that is part
//! of every cache key, so changing the source never serves stale modules.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::Hasher;
use kiln_exec::{CaptureSink, Cmd, ExecError, LogSink};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("module source directory {0} does not exist; set --drbd-dir, or --drbd-version with --drbd-repo")]
    Missing(PathBuf),
    #[error("invalid DRBD version {0:?}: letters, digits and . + ~ - only")]
    BadVersion(String),
    #[error("cloning branch drbd-{version} of {repo}: {source}")]
    Git {
        version: String,
        repo: String,
        #[source]
        source: ExecError,
    },
    #[error("copying the module source into the build: {0}")]
    Copy(#[source] ExecError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SourceError + 'a {
    move |source| SourceError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub enum ModuleSource {
    Dir {
        path: PathBuf,
        /// (stat fingerprint, content identity) of the last look.
        memo: Arc<Mutex<Option<(kiln_core::Digest, String)>>>,
    },
    Git {
        version: String,
        repo: String,
        cache_dir: PathBuf,
        lock: Arc<tokio::sync::Mutex<()>>,
    },
}

impl ModuleSource {
    pub fn dir(path: PathBuf) -> ModuleSource {
        ModuleSource::Dir {
            path,
            memo: Default::default(),
        }
    }

    pub fn git(
        version: String,
        repo: String,
        cache_dir: PathBuf,
    ) -> Result<ModuleSource, SourceError> {
        if version.is_empty()
            || version.starts_with(['.', '-'])
            || !version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b))
        {
            return Err(SourceError::BadVersion(version));
        }
        Ok(ModuleSource::Git {
            version,
            repo,
            cache_dir,
            lock: Default::default(),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            ModuleSource::Dir { path, .. } => format!("directory {}", path.display()),
            ModuleSource::Git { version, repo, .. } => format!("git {repo} branch drbd-{version}"),
        }
    }

    /// The source's identity for cache keys. For git, clones on first use.
    pub async fn identity(&self) -> Result<String, SourceError> {
        match self {
            ModuleSource::Dir { path, memo } => {
                let (path, memo) = (path.clone(), memo.clone());
                tokio::task::spawn_blocking(move || dir_identity(&path, &memo))
                    .await
                    .map_err(|e| SourceError::Io {
                        op: "hash",
                        path: PathBuf::new(),
                        source: std::io::Error::other(e.to_string()),
                    })?
            }
            ModuleSource::Git { version, .. } => {
                let dir = self
                    .ensure_clone(Arc::new(kiln_exec::NullSink), &CancellationToken::new())
                    .await?;
                let rev = std::fs::read_to_string(dir.join(".drbd_git_revision"))
                    .map_err(io("read", &dir))?;
                let rev = rev.trim().trim_start_matches("GIT-hash:").trim();
                Ok(format!("git:{version}:{rev}"))
            }
        }
    }

    /// Copy the source into `dest` (created).
    pub async fn materialize(
        &self,
        dest: &Path,
        log: Arc<dyn LogSink>,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let from = match self {
            ModuleSource::Dir { path, .. } => {
                if !path.is_dir() {
                    return Err(SourceError::Missing(path.clone()));
                }
                path.clone()
            }
            ModuleSource::Git { .. } => self.ensure_clone(log.clone(), cancel).await?,
        };
        std::fs::create_dir_all(dest).map_err(io("create", dest))?;
        let mut src_arg = from.into_os_string();
        src_arg.push("/.");
        Cmd::new("cp")
            .args(["-a", "--no-preserve=ownership"])
            .arg(src_arg)
            .arg(dest)
            .timeout(Duration::from_secs(600))
            .run(log, cancel)
            .await
            .map_err(SourceError::Copy)
    }

    /// The cached clone for this version, cloning it if needed. Concurrent
    /// callers wait for one clone.
    async fn ensure_clone(
        &self,
        log: Arc<dyn LogSink>,
        cancel: &CancellationToken,
    ) -> Result<PathBuf, SourceError> {
        let ModuleSource::Git {
            version,
            repo,
            cache_dir,
            lock,
        } = self
        else {
            unreachable!("ensure_clone is only called for git sources")
        };
        let dir = cache_dir.join(format!("drbd-{version}"));
        let _g = lock.lock().await;
        if dir.join(".drbd_git_revision").is_file() {
            return Ok(dir);
        }
        std::fs::create_dir_all(cache_dir).map_err(io("create", cache_dir))?;
        let tmp = cache_dir.join(format!(".tmp-drbd-{version}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let git_err = |source| SourceError::Git {
            version: version.clone(),
            repo: repo.clone(),
            source,
        };
        let mut clone = Cmd::new("git");
        // Local repositories (tests, air-gapped mirrors) need file:// allowed for their submodules.
        if !repo.contains("://") || repo.starts_with("file://") {
            clone = clone.args(["-c", "protocol.file.allow=always"]);
        }
        tracing::info!(repo = %repo, branch = %format!("drbd-{version}"), "cloning module source");
        clone
            .args([
                "clone",
                "--quiet",
                "--depth",
                "1",
                "--recurse-submodules",
                "--shallow-submodules",
                "--branch",
            ])
            .arg(format!("drbd-{version}"))
            .arg("--")
            .arg(repo)
            .arg(&tmp)
            .env("GIT_TERMINAL_PROMPT", "0")
            .timeout(Duration::from_secs(900))
            .run(log, cancel)
            .await
            .map_err(git_err)?;
        let out = Arc::new(CaptureSink::default());
        Cmd::new("git")
            .arg("-C")
            .arg(&tmp)
            .args(["rev-parse", "HEAD"])
            .timeout(Duration::from_secs(60))
            .run(out.clone(), cancel)
            .await
            .map_err(git_err)?;
        let rev = out.stdout().trim().to_string();
        std::fs::write(tmp.join(".drbd_git_revision"), format!("GIT-hash: {rev}\n"))
            .map_err(io("write", &tmp))?;
        remove_git_dirs(&tmp)?;
        std::fs::rename(&tmp, &dir).map_err(io("rename", &dir))?;
        tracing::info!(version = %version, revision = %rev, dir = %dir.display(), "module source cached");
        Ok(dir)
    }
}

/// Remove `.git` (directories in the top repo, files in submodules).
fn remove_git_dirs(root: &Path) -> Result<(), SourceError> {
    let gits: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == ".git")
        .map(|e| e.into_path())
        .collect();
    for g in gits {
        if g.is_dir() {
            std::fs::remove_dir_all(&g).map_err(io("remove", &g))?;
        } else if g.exists() {
            std::fs::remove_file(&g).map_err(io("remove", &g))?;
        }
    }
    Ok(())
}

fn dir_identity(
    path: &Path,
    memo: &Mutex<Option<(kiln_core::Digest, String)>>,
) -> Result<String, SourceError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !path.is_dir() {
        return Err(SourceError::Missing(path.to_path_buf()));
    }
    let mut entries: Vec<walkdir::DirEntry> = walkdir::WalkDir::new(path)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .collect();
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    // Cheap fingerprint first: paths, sizes, mtimes.
    let mut fp = Hasher::new();
    for e in &entries {
        let m = e
            .metadata()
            .map_err(|err| io("stat", e.path())(err.into()))?;
        fp.field(e.path().as_os_str().as_encoded_bytes())
            .field(&m.size().to_le_bytes())
            .field(&m.mtime_nsec().to_le_bytes())
            .field(&m.mtime().to_le_bytes());
    }
    let fp = fp.finish();
    let mut memo = memo.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((f, id)) = memo.as_ref() {
        if *f == fp {
            return Ok(id.clone());
        }
    }
    let mut h = Hasher::new();
    for e in &entries {
        let rel = e.path().strip_prefix(path).unwrap_or(e.path());
        h.field(rel.as_os_str().as_encoded_bytes());
        if e.file_type().is_symlink() {
            let t = std::fs::read_link(e.path()).map_err(io("readlink", e.path()))?;
            h.field(b"l").field(t.as_os_str().as_encoded_bytes());
        } else {
            let m = e
                .metadata()
                .map_err(|err| io("stat", e.path())(err.into()))?;
            let mut f = std::fs::File::open(e.path()).map_err(io("open", e.path()))?;
            let mut ch = Hasher::new();
            std::io::copy(&mut f, &mut ch).map_err(io("read", e.path()))?;
            h.field(b"f")
                .field(&(m.permissions().mode() & 0o777).to_le_bytes())
                .field(ch.finish().as_bytes());
        }
    }
    let id = format!("dir:{}", h.finish().hex());
    *memo = Some((fp, id.clone()));
    Ok(id)
}
