//! The image cache: verified images kept as downloaded (QCOW2 stays
//! compressed), named by their SHA-256 in a content-addressed store below
//! `--image-cache-dir`, indexed in kiln's database.
//!
//! An image enters only after its digest matched the sidecar (or, without
//! one, was computed while it streamed). Before each use the recorded size
//! and mtime are checked against the file rather than re-hashing gigabytes:
//! kiln is the only writer of the directory and every write is a rename of a
//! fsynced, verified file, so a changed size or mtime is the sign of outside
//! tampering, and such an entry is dropped and fetched again.
//!
//! Eviction is least recently used down to the size cap, and never touches
//! an image a running job has pinned.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_core::Digest;
use kiln_store::{Cas, Db, ImageRow, StoreError, TempBlob};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the image from {url} has SHA-256 {actual}, but its checksum file says {expected}; it was not cached")]
    Mismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("image cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct ImageCache {
    cas: Cas,
    db: Arc<Db>,
    max_bytes: u64,
    /// Images in use by running jobs, with a count; never evicted.
    pins: Mutex<HashMap<Digest, usize>>,
    /// One download per source at a time: a second job for the same image
    /// waits here, then finds it cached.
    fetches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Keeps an image from eviction while it lives.
#[derive(Debug)]
pub struct Pin {
    cache: Arc<ImageCache>,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.cache.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

impl ImageCache {
    pub fn open(dir: &Path, db: Arc<Db>, max_bytes: u64) -> Result<ImageCache, CacheError> {
        Ok(ImageCache {
            cas: Cas::open(dir)?,
            db,
            max_bytes,
            pins: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
        })
    }

    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.cas.path(d)
    }

    pub fn pin(self: &Arc<Self>, d: &Digest) -> Pin {
        *self
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*d)
            .or_default() += 1;
        Pin {
            cache: self.clone(),
            digest: *d,
        }
    }

    /// The cached image with this digest, if it is there and unchanged.
    /// Callers pin first, so it cannot be evicted between this and its use.
    pub fn lookup(&self, d: &Digest) -> Result<Option<ImageRow>, CacheError> {
        let Some(row) = self.db.image(d)? else {
            return Ok(None);
        };
        let p = self.cas.path(d);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && m.len() == row.size && mtime_ns(&m) == row.mtime_ns => {
                self.db.touch_image(d)?;
                Ok(Some(row))
            }
            Ok(_) => {
                tracing::error!(digest = %d, path = %p.display(), "cached image changed on disk (size or mtime); dropped");
                self.db.drop_image(d)?;
                let _ = std::fs::remove_file(&p);
                Ok(None)
            }
            Err(_) => {
                tracing::warn!(digest = %d, path = %p.display(), "cached image is missing; dropped from the index");
                self.db.drop_image(d)?;
                Ok(None)
            }
        }
    }

    /// Serialise downloads of one source.
    pub async fn fetch_lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .fetches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// Check a finished download against `expected` and move it into the
    /// cache, pinned for the caller. A mismatch removes the temp file.
    pub async fn admit(
        self: &Arc<Self>,
        blob: TempBlob,
        expected: Option<Digest>,
        format: &str,
        source: &str,
    ) -> Result<(ImageRow, Pin), CacheError> {
        let actual = blob.digest();
        if let Some(expected) = expected {
            if expected != actual {
                drop(blob);
                return Err(CacheError::Mismatch {
                    url: source.to_string(),
                    expected,
                    actual,
                });
            }
        }
        let pin = self.pin(&actual);
        let (d, size) = blob.commit().await?;
        let p = self.cas.path(&d);
        let m = std::fs::metadata(&p).map_err(|source| CacheError::Io {
            path: p.clone(),
            source,
        })?;
        let row = ImageRow {
            digest: d,
            size,
            mtime_ns: mtime_ns(&m),
            format: format.to_string(),
            source: source.to_string(),
            last_used: kiln_store::now_ms(),
        };
        self.db.put_image(&row)?;
        self.evict()?;
        Ok((row, pin))
    }

    /// Evict least recently used, unpinned images until the cache is within
    /// its cap. Returns (images removed, bytes freed).
    pub fn evict(&self) -> Result<(usize, u64), CacheError> {
        self.evict_to(self.max_bytes)
    }

    pub fn evict_to(&self, cap: u64) -> Result<(usize, u64), CacheError> {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let rows = self.db.images_lru()?;
        let mut total: u64 = rows.iter().map(|r| r.size).sum();
        let (mut n, mut freed) = (0, 0);
        for r in rows {
            if total <= cap {
                break;
            }
            if pins.contains_key(&r.digest) {
                continue;
            }
            self.db.drop_image(&r.digest)?;
            self.cas.remove(&r.digest)?;
            tracing::info!(digest = %r.digest, bytes = r.size, source = %r.source, "evicted cached image");
            total -= r.size;
            n += 1;
            freed += r.size;
        }
        Ok((n, freed))
    }

    /// (images, bytes) in the cache.
    pub fn usage(&self) -> Result<(usize, u64), CacheError> {
        let rows = self.db.images_lru()?;
        Ok((rows.len(), rows.iter().map(|r| r.size).sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put(c: &Arc<ImageCache>, data: &[u8]) -> (ImageRow, Pin) {
        let mut b = c.cas().writer().await.unwrap();
        b.write(data).await.unwrap();
        b.flush().await.unwrap();
        c.admit(b, None, "raw", "http://x/").await.unwrap()
    }

    #[tokio::test]
    async fn admits_verified_evicts_lru_but_never_pinned() {
        let d = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(&d.path().join("db")).unwrap());
        let c = Arc::new(ImageCache::open(&d.path().join("img"), db, 250).unwrap());
        // A wrong checksum leaves nothing behind.
        let mut b = c.cas().writer().await.unwrap();
        b.write(b"abc").await.unwrap();
        b.flush().await.unwrap();
        let e = c
            .admit(b, Some(Digest::of(b"abd")), "raw", "u")
            .await
            .unwrap_err();
        assert!(matches!(e, CacheError::Mismatch { .. }), "{e}");
        assert_eq!(c.usage().unwrap(), (0, 0));
        assert_eq!(
            std::fs::read_dir(c.cas().root().join("tmp"))
                .unwrap()
                .count(),
            0
        );

        let (a, pin_a) = put(&c, &[1u8; 100]).await;
        let (b, pin_b) = put(&c, &[2u8; 100]).await;
        drop(pin_b);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(c.lookup(&b.digest).unwrap().is_some()); // b is now more recent than a
                                                         // Over the cap: a is the least recently used, but pinned; b goes.
        let (_c3, _pin_c) = put(&c, &[3u8; 100]).await;
        assert!(c.lookup(&a.digest).unwrap().is_some());
        assert!(c.lookup(&b.digest).unwrap().is_none());
        drop(pin_a);
        assert_eq!(c.evict_to(0).unwrap().0, 1); // a; c3 is still pinned
        assert!(c.lookup(&a.digest).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_file_changed_behind_our_back_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(&d.path().join("db")).unwrap());
        let c = Arc::new(ImageCache::open(&d.path().join("img"), db, 1 << 20).unwrap());
        let (row, pin) = put(&c, b"image").await;
        drop(pin);
        std::fs::write(c.path(&row.digest), b"imagf-tampered").unwrap();
        assert!(c.lookup(&row.digest).unwrap().is_none());
        assert!(!c.path(&row.digest).exists());
    }
}
