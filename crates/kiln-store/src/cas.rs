//! The content-addressed blob store. A blob's path is its SHA-256
//! (`sha256/ab/<hex>`); blobs enter through a temp file that is hashed while
//! written, fsynced, then renamed, so a reader sees a whole blob or none.

use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_core::{Digest, Hasher};

use crate::{Result, StoreError};

#[derive(Debug, Clone)]
pub struct Cas {
    root: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Cas {
    /// Open (and create) a store below `root`. Leftover temp files from a
    /// crash are removed.
    pub fn open(root: &Path) -> Result<Cas> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("clean", &tmp))?;
        }
        std::fs::create_dir_all(root.join("sha256")).map_err(io("create", root))?;
        std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        Ok(Cas {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// A temp path in the store's own directory (same filesystem, so the
    /// final rename is atomic).
    pub fn temp_path(&self) -> PathBuf {
        self.root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Start writing a blob whose digest is not yet known.
    pub async fn writer(&self) -> Result<TempBlob> {
        let path = self.temp_path();
        let p2 = path.clone();
        let file = tokio::task::spawn_blocking(move || std::fs::File::create(&p2))
            .await
            .map_err(|e| StoreError::Malformed(e.to_string()))?
            .map_err(io("create", &path))?;
        Ok(TempBlob {
            state: Some((file, Hasher::new())),
            inflight: None,
            buf: Vec::with_capacity(TempBlob::BATCH),
            path,
            size: 0,
            root: self.clone(),
        })
    }

    /// Move a finished file (already fsynced or not) into the store under
    /// its digest, computed here. Returns the digest and size.
    pub fn ingest_file(&self, path: &Path) -> Result<(Digest, u64)> {
        let mut f = std::fs::File::open(path).map_err(io("open", path))?;
        let mut h = Hasher::new();
        let size = std::io::copy(&mut f, &mut h).map_err(io("read", path))?;
        f.sync_all().map_err(io("fsync", path))?;
        let d = h.finish();
        self.place(path, &d)?;
        Ok((d, size))
    }

    fn place(&self, tmp: &Path, d: &Digest) -> Result<()> {
        let dst = self.path(d);
        if dst.is_file() {
            std::fs::remove_file(tmp).map_err(io("remove", tmp))?;
            return Ok(());
        }
        let dir = dst.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::rename(tmp, &dst).map_err(io("rename", &dst))?;
        // Make the rename itself durable.
        if let Ok(dirf) = std::fs::File::open(dir) {
            let _ = dirf.sync_all();
        }
        Ok(())
    }

    /// Re-hash a blob before use. A blob that fails is removed and reported.
    pub fn verify(&self, d: &Digest) -> Result<PathBuf> {
        let p = self.path(d);
        let mut f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing(*d))
            }
            Err(e) => return Err(io("open", &p)(e)),
        };
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io("read", &p))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let actual = h.finish();
        if actual != *d {
            tracing::error!(digest = %d, actual = %actual, path = %p.display(), "corrupt cache blob removed");
            let _ = std::fs::remove_file(&p);
            return Err(StoreError::Corrupt { digest: *d, actual });
        }
        Ok(p)
    }

    pub fn remove(&self, d: &Digest) -> Result<()> {
        let p = self.path(d);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &p)(e)),
        }
    }
}

/// A blob being written. Writes are batched (1 MiB) and each batch is
/// hashed and written on a blocking thread, so a large upload costs one
/// thread hop per MiB, not per network chunk. Dropped without
/// [`TempBlob::commit`], its temp file is removed.
type Batch = (std::io::Result<()>, std::fs::File, Hasher, Vec<u8>);

#[derive(Debug)]
pub struct TempBlob {
    state: Option<(std::fs::File, Hasher)>,
    /// The batch being hashed and written while the next one is received.
    inflight: Option<tokio::task::JoinHandle<Batch>>,
    buf: Vec<u8>,
    path: PathBuf,
    size: u64,
    root: Cas,
}

impl TempBlob {
    const BATCH: usize = 1 << 20;

    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::BATCH {
            self.drain().await?;
        }
        Ok(())
    }

    /// Wait for the batch in flight, taking the file and hasher back.
    async fn settle(&mut self) -> Result<()> {
        if let Some(h) = self.inflight.take() {
            let (r, file, hasher, mut buf) =
                h.await.map_err(|e| StoreError::Malformed(e.to_string()))?;
            self.state = Some((file, hasher));
            r.map_err(io("write", &self.path))?;
            if self.buf.is_empty() {
                buf.clear();
                self.buf = buf; // reuse the allocation
            }
        }
        Ok(())
    }

    /// Start hashing and writing the buffered bytes on a blocking thread;
    /// the previous batch must finish first, so order is kept.
    async fn drain(&mut self) -> Result<()> {
        self.settle().await?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let (mut file, mut hasher) = self
            .state
            .take()
            .ok_or_else(|| StoreError::Malformed("blob already committed".into()))?;
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(Self::BATCH));
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            hasher.update(&buf);
            let r = std::io::Write::write_all(&mut file, &buf);
            (r, file, hasher, buf)
        }));
        Ok(())
    }

    /// Write out buffered bytes so the file can be read by path.
    pub async fn flush(&mut self) -> Result<()> {
        self.drain().await?;
        self.settle().await
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The digest of what was written (after [`TempBlob::flush`]).
    pub fn digest(&self) -> Digest {
        self.state
            .as_ref()
            .map(|(_, h)| h.clone().finish())
            .unwrap_or_else(|| Digest::of(b""))
    }

    /// fsync, then rename into the store. Returns digest and size.
    pub async fn commit(mut self) -> Result<(Digest, u64)> {
        self.flush().await?;
        let (file, hasher) = self
            .state
            .take()
            .ok_or_else(|| StoreError::Malformed("blob already committed".into()))?;
        let d = hasher.finish();
        let (root, tmp) = (self.root.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_all().map_err(io("fsync", &tmp))?;
            drop(file);
            root.place(&tmp, &d)
        })
        .await
        .map_err(|e| StoreError::Malformed(e.to_string()))??;
        self.path = PathBuf::new();
        Ok((d, self.size))
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if let Some(h) = self.inflight.take() {
            h.abort();
        }
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_commit_verify_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let mut w = cas.writer().await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.digest(), Digest::of(b"hello world"));
        let tmp = w.path().to_path_buf();
        let (d, n) = w.commit().await.unwrap();
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(b"hello world"));
        assert!(!tmp.exists());
        let p = cas.verify(&d).unwrap();
        assert!(p.ends_with(format!("sha256/{}/{}", &d.hex()[..2], d.hex())));
        std::fs::write(&p, b"tampered").unwrap();
        assert!(matches!(cas.verify(&d), Err(StoreError::Corrupt { .. })));
        assert!(!p.exists());
    }

    #[tokio::test]
    async fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let mut w = cas.writer().await.unwrap();
        w.write(b"partial").await.unwrap();
        let tmp = w.path().to_path_buf();
        drop(w);
        assert!(!tmp.exists());
    }
}
