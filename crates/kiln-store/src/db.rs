//! The SQLite database: jobs (claimed with leases, never held in a long
//! transaction), the artifact index, the raw-upload alias index and the blob
//! LRU bookkeeping. One connection behind a mutex: every statement is short,
//! and WAL keeps readers off the writer's back.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_core::{Digest, JobId, JobStatus};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use crate::{Result, StoreError};

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub id: JobId,
    pub kind: String,
    pub status: JobStatus,
    pub dedupe_key: String,
    pub params: serde_json::Value,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub progress: Option<serde_json::Value>,
    pub input_digest: Option<Digest>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub attempts: i64,
}

/// The outcome of a submission.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new job was queued.
    Created(JobRow),
    /// An identical job is already pending or building; join it.
    Joined(JobRow),
    /// The same request failed before; it is not retried without force.
    PreviouslyFailed(JobRow),
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub limit: Option<u32>,
}

/// A cached result: a blob plus the kind's metadata.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub digest: Digest,
    pub size: u64,
    pub meta: serde_json::Value,
    pub job_id: Option<JobId>,
}

/// A VM image in the image cache (the file is `Cas::path(digest)` of the
/// image cache's own store). `size` and `mtime_ns` are recorded when the
/// verified file enters the cache; a file that no longer matches them is not
/// trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub digest: Digest,
    pub size: u64,
    pub mtime_ns: i64,
    /// `qcow2` or `raw`, as checked when it entered the cache.
    pub format: String,
    /// The URL it was first downloaded from.
    pub source: String,
    pub last_used: i64,
}

/// What a URL served last time, for sources without a `.sha256` sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUrl {
    pub digest: Digest,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// A stored API object (kiln-api gives it its Kubernetes shape).
#[derive(Debug, Clone)]
pub struct Resource {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    pub body: serde_json::Value,
}

fn resource_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Resource> {
    let body: String = r.get(5)?;
    Ok(Resource {
        namespace: r.get(0)?,
        name: r.get(1)?,
        uid: r.get(2)?,
        resource_version: r.get(3)?,
        created_at: r.get(4)?,
        body: serde_json::from_str(&body).unwrap_or_default(),
    })
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    params TEXT NOT NULL,
    result TEXT,
    error TEXT,
    progress TEXT,
    input_digest TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(kind, dedupe_key, created_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs(last_used);
CREATE TABLE IF NOT EXISTS artifacts (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    meta TEXT NOT NULL,
    job_id TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS artifacts_digest ON artifacts(digest);
CREATE TABLE IF NOT EXISTS aliases (
    kind TEXT NOT NULL,
    alias TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (kind, alias)
);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    format TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_lru ON images(last_used);
CREATE TABLE IF NOT EXISTS image_urls (
    url TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    etag TEXT,
    last_modified TEXT,
    checked_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    rv INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
"#;

const JOB_COLS: &str = "id, kind, status, dedupe_key, params, result, error, progress, input_digest, created_at, started_at, finished_at, attempts";

fn parse<T: std::str::FromStr>(s: String, what: &str) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{what}: {e}").into(),
        )
    })
}

fn json(s: Option<String>) -> rusqlite::Result<Option<serde_json::Value>> {
    s.map(|s| {
        serde_json::from_str(&s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

fn job_row(r: &Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: parse(r.get(0)?, "job id")?,
        kind: r.get(1)?,
        status: parse(r.get(2)?, "status")?,
        dedupe_key: r.get(3)?,
        params: json(Some(r.get(4)?))?.unwrap_or_default(),
        result: json(r.get(5)?)?,
        error: r.get(6)?,
        progress: json(r.get(7)?)?,
        input_digest: r
            .get::<_, Option<String>>(8)?
            .map(|s| parse(s, "digest"))
            .transpose()?,
        created_at: r.get(9)?,
        started_at: r.get(10)?,
        finished_at: r.get(11)?,
        attempts: r.get(12)?,
    })
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let err = |source| StoreError::Db {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Db {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c).map_err(|source| StoreError::Db {
            path: self.path.clone(),
            source,
        })
    }

    // ---- jobs -----------------------------------------------------------

    /// Queue a job unless an identical one (same kind and dedupe key) is
    /// pending or building, or failed before and `force` is not set. Atomic:
    /// fifty concurrent identical submissions make one job.
    pub fn submit(
        &self,
        kind: &str,
        dedupe_key: &str,
        params: &serde_json::Value,
        input: Option<&Digest>,
        force: bool,
    ) -> Result<Submitted> {
        self.with(|c| {
            let tx = c.transaction()?;
            let latest = tx
                .query_row(
                    &format!("SELECT {JOB_COLS} FROM jobs WHERE kind = ?1 AND dedupe_key = ?2 ORDER BY created_at DESC, rowid DESC LIMIT 1"),
                    params![kind, dedupe_key],
                    job_row,
                )
                .optional()?;
            if let Some(j) = latest {
                if !j.status.is_terminal() {
                    return Ok(Submitted::Joined(j));
                }
                if j.status == JobStatus::Failed && !force {
                    return Ok(Submitted::PreviouslyFailed(j));
                }
            }
            let id = JobId::new_random();
            let now = now_ms();
            tx.execute(
                "INSERT INTO jobs (id, kind, status, dedupe_key, params, input_digest, created_at) VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6)",
                params![id.as_str(), kind, dedupe_key, params.to_string(), input.map(|d| d.hex()), now],
            )?;
            let row = tx.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                params![id.as_str()],
                job_row,
            )?;
            tx.commit()?;
            Ok(Submitted::Created(row))
        })
    }

    /// Claim the oldest pending job of one of `kinds`, or a building job
    /// whose lease ran out, for `owner` until `now + lease_ms`.
    pub fn claim(&self, owner: &str, kinds: &[&str], lease_ms: i64) -> Result<Option<JobRow>> {
        let now = now_ms();
        let kinds_json = serde_json::to_string(kinds).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            c.query_row(
                &format!(
                    "UPDATE jobs SET status = 'building', lease_owner = ?1, lease_expires = ?2,
                         attempts = attempts + 1, started_at = COALESCE(started_at, ?3)
                     WHERE id = (SELECT id FROM jobs
                                 WHERE kind IN (SELECT value FROM json_each(?4))
                                   AND (status = 'pending' OR (status = 'building' AND lease_expires < ?3))
                                 ORDER BY created_at, rowid LIMIT 1)
                     RETURNING {JOB_COLS}"
                ),
                params![owner, now + lease_ms, now, kinds_json],
                job_row,
            )
            .optional()
        })
    }

    /// Extend a lease. False if the job is no longer ours.
    pub fn renew(&self, id: &JobId, owner: &str, lease_ms: i64) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE jobs SET lease_expires = ?1 WHERE id = ?2 AND lease_owner = ?3 AND status = 'building'",
                params![now_ms() + lease_ms, id.as_str(), owner],
            )
        })?;
        Ok(n == 1)
    }

    /// Record a terminal state. Only the lease holder can finish a job.
    pub fn finish(
        &self,
        id: &JobId,
        owner: &str,
        status: JobStatus,
        result: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE jobs SET status = ?1, result = ?2, error = ?3, finished_at = ?4, lease_owner = NULL, lease_expires = NULL
                 WHERE id = ?5 AND lease_owner = ?6 AND status = 'building'",
                params![status.as_str(), result.map(|r| r.to_string()), error, now_ms(), id.as_str(), owner],
            )
        })?;
        Ok(n == 1)
    }

    /// Cancel a job that no worker holds yet. Returns the job after the
    /// attempt; a building job is left to its worker to cancel.
    pub fn cancel_pending(&self, id: &JobId) -> Result<JobRow> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET status = 'cancelled', error = 'cancelled before it started', finished_at = ?1 WHERE id = ?2 AND status = 'pending'",
                params![now_ms(), id.as_str()],
            )?;
            c.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                params![id.as_str()],
                job_row,
            )
            .optional()
        })?
        .ok_or_else(|| StoreError::JobNotFound(id.clone()))
    }

    pub fn set_progress(&self, id: &JobId, progress: &serde_json::Value) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET progress = ?1 WHERE id = ?2",
                params![progress.to_string(), id.as_str()],
            )
        })?;
        Ok(())
    }

    /// After a restart (the data directory is locked, so any job still
    /// `building` was cut off): re-queue it, or fail it once it has been
    /// interrupted `max_attempts` times. Returns (requeued, failed) ids.
    pub fn recover_interrupted(&self, max_attempts: i64) -> Result<(Vec<JobId>, Vec<JobId>)> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut failed = Vec::new();
            let mut requeued = Vec::new();
            {
                let mut st = tx.prepare("SELECT id, attempts FROM jobs WHERE status = 'building'")?;
                let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                for r in rows {
                    let (id, attempts) = r?;
                    let id: JobId = parse(id, "job id")?;
                    if attempts >= max_attempts {
                        failed.push(id);
                    } else {
                        requeued.push(id);
                    }
                }
            }
            for id in &failed {
                tx.execute(
                    "UPDATE jobs SET status = 'failed', error = ?1, finished_at = ?2, lease_owner = NULL, lease_expires = NULL WHERE id = ?3",
                    params![format!("interrupted by a kiln restart {max_attempts} times; giving up"), now_ms(), id.as_str()],
                )?;
            }
            for id in &requeued {
                tx.execute(
                    "UPDATE jobs SET status = 'pending', lease_owner = NULL, lease_expires = NULL WHERE id = ?1",
                    params![id.as_str()],
                )?;
            }
            tx.commit()?;
            Ok((requeued, failed))
        })
    }

    pub fn get(&self, id: &JobId) -> Result<Option<JobRow>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                params![id.as_str()],
                job_row,
            )
            .optional()
        })
    }

    pub fn list(&self, f: &JobFilter) -> Result<Vec<JobRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR kind = ?2)
                 ORDER BY created_at DESC, rowid DESC LIMIT ?3"
            ))?;
            let rows = st.query_map(
                params![
                    f.status.map(|s| s.as_str()),
                    f.kind.as_deref(),
                    f.limit.unwrap_or(100).min(1000)
                ],
                job_row,
            )?;
            rows.collect()
        })
    }

    pub fn count_by_status(&self) -> Result<Vec<(String, JobStatus, i64)>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT kind, status, COUNT(*) FROM jobs GROUP BY kind, status")?;
            let rows = st.query_map([], |r| {
                Ok((r.get(0)?, parse(r.get(1)?, "status")?, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    // ---- cache index ----------------------------------------------------

    /// Record that a blob is in the store (or was just used).
    pub fn touch_blob(&self, d: &Digest, size: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO blobs (digest, size, last_used) VALUES (?1, ?2, ?3)
                 ON CONFLICT(digest) DO UPDATE SET last_used = excluded.last_used",
                params![d.hex(), size as i64, now_ms()],
            )
        })?;
        Ok(())
    }

    pub fn artifact(&self, kind: &str, key: &str) -> Result<Option<Artifact>> {
        self.with(|c| {
            c.query_row(
                "SELECT a.digest, b.size, a.meta, a.job_id FROM artifacts a JOIN blobs b ON b.digest = a.digest WHERE a.kind = ?1 AND a.key = ?2",
                params![kind, key],
                |r| {
                    Ok(Artifact {
                        digest: parse(r.get(0)?, "digest")?,
                        size: r.get::<_, i64>(1)? as u64,
                        meta: json(Some(r.get(2)?))?.unwrap_or_default(),
                        job_id: r.get::<_, Option<String>>(3)?.map(|s| parse(s, "job id")).transpose()?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn put_artifact(
        &self,
        kind: &str,
        key: &str,
        digest: &Digest,
        size: u64,
        meta: &serde_json::Value,
        job: Option<&JobId>,
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO blobs (digest, size, last_used) VALUES (?1, ?2, ?3)
                 ON CONFLICT(digest) DO UPDATE SET last_used = excluded.last_used",
                params![digest.hex(), size as i64, now_ms()],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO artifacts (kind, key, digest, meta, job_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![kind, key, digest.hex(), meta.to_string(), job.map(|j| j.as_str()), now_ms()],
            )?;
            tx.commit()
        })
    }

    /// Forget an artifact whose blob turned out missing or corrupt.
    pub fn drop_artifact(&self, kind: &str, key: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM artifacts WHERE kind = ?1 AND key = ?2",
                params![kind, key],
            )?;
            c.execute(
                "DELETE FROM aliases WHERE kind = ?1 AND key = ?2",
                params![kind, key],
            )
        })?;
        Ok(())
    }

    /// Store a new API resource; `Ok(None)` when the name is taken.
    pub fn create_resource(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        uid: &str,
        body: &serde_json::Value,
    ) -> Result<Option<Resource>> {
        let now = now_ms();
        self.with(|c| {
            let tx = c.transaction()?;
            let rv: i64 =
                tx.query_row("SELECT COALESCE(MAX(rv), 0) + 1 FROM resources", [], |r| r.get(0))?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO resources (kind, namespace, name, uid, rv, created_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![kind, namespace, name, uid, rv, now, body.to_string()],
            )?;
            tx.commit()?;
            Ok((n == 1).then(|| Resource {
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.into(),
                resource_version: rv,
                created_at: now,
                body: body.clone(),
            }))
        })
    }

    pub fn get_resource(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Resource>> {
        self.with(|c| {
            c.query_row(
                "SELECT namespace, name, uid, rv, created_at, body FROM resources WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                params![kind, namespace, name],
                resource_row,
            )
            .optional()
        })
    }

    /// Resources of `kind` (in `namespace`, or all), by namespace and name,
    /// after `after` (namespace, name), at most `limit`.
    pub fn list_resources(
        &self,
        kind: &str,
        namespace: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Resource>> {
        let (ans, aname) = after.unwrap_or(("", ""));
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT namespace, name, uid, rv, created_at, body FROM resources
                 WHERE kind = ?1 AND (?2 IS NULL OR namespace = ?2) AND (namespace, name) > (?3, ?4)
                 ORDER BY namespace, name LIMIT ?5",
            )?;
            let rows = st.query_map(
                params![kind, namespace, ans, aname, limit as i64],
                resource_row,
            )?;
            rows.collect()
        })
    }

    pub fn delete_resource(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Resource>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let r = tx
                .query_row(
                    "SELECT namespace, name, uid, rv, created_at, body FROM resources WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                    params![kind, namespace, name],
                    resource_row,
                )
                .optional()?;
            tx.execute(
                "DELETE FROM resources WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                params![kind, namespace, name],
            )?;
            tx.commit()?;
            Ok(r)
        })
    }

    pub fn alias(&self, kind: &str, alias: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT key FROM aliases WHERE kind = ?1 AND alias = ?2",
                params![kind, alias],
                |r| r.get(0),
            )
            .optional()
        })
    }

    pub fn put_alias(&self, kind: &str, alias: &str, key: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO aliases (kind, alias, key) VALUES (?1, ?2, ?3)",
                params![kind, alias, key],
            )
        })?;
        Ok(())
    }

    /// (blob count, total bytes) tracked by the cache.
    pub fn cache_usage(&self) -> Result<(u64, u64)> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
        })
    }

    /// Choose least-recently-used blobs to evict until the total is at most
    /// `cap` bytes. Blobs that a pending or building job needs as input are
    /// never chosen. The rows (and artifacts and aliases pointing at them)
    /// are deleted here; the caller removes the files.
    pub fn evict_to(&self, cap: u64) -> Result<Vec<Digest>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let total: i64 = tx.query_row("SELECT COALESCE(SUM(size), 0) FROM blobs", [], |r| r.get(0))?;
            let mut over = total - cap as i64;
            let mut victims = Vec::new();
            if over > 0 {
                let mut st = tx.prepare(
                    "SELECT digest, size FROM blobs
                     WHERE digest NOT IN (SELECT input_digest FROM jobs WHERE status IN ('pending', 'building') AND input_digest IS NOT NULL)
                     ORDER BY last_used",
                )?;
                let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                for r in rows {
                    if over <= 0 {
                        break;
                    }
                    let (d, size) = r?;
                    over -= size;
                    victims.push(d);
                }
            }
            for d in &victims {
                tx.execute(
                    "DELETE FROM aliases WHERE (kind, key) IN (SELECT kind, key FROM artifacts WHERE digest = ?1)",
                    params![d],
                )?;
                tx.execute("DELETE FROM artifacts WHERE digest = ?1", params![d])?;
                tx.execute("DELETE FROM blobs WHERE digest = ?1", params![d])?;
            }
            tx.commit()?;
            victims.into_iter().map(|d| parse(d, "digest")).collect()
        })
    }
}

impl Db {
    // ---- image cache index ----------------------------------------------

    pub fn image(&self, d: &Digest) -> Result<Option<ImageRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT digest, size, mtime_ns, format, source, last_used FROM images WHERE digest = ?1",
                params![d.hex()],
                image_row,
            )
            .optional()
        })
    }

    pub fn put_image(&self, row: &ImageRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO images (digest, size, mtime_ns, format, source, created_at, last_used)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![row.digest.hex(), row.size as i64, row.mtime_ns, row.format, row.source, now_ms()],
            )
        })?;
        Ok(())
    }

    pub fn touch_image(&self, d: &Digest) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE images SET last_used = ?2 WHERE digest = ?1",
                params![d.hex(), now_ms()],
            )
        })?;
        Ok(())
    }

    /// Forget an image (and the URLs that pointed at it).
    pub fn drop_image(&self, d: &Digest) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM image_urls WHERE digest = ?1", params![d.hex()])?;
            c.execute("DELETE FROM images WHERE digest = ?1", params![d.hex()])
        })?;
        Ok(())
    }

    /// Every cached image, least recently used first.
    pub fn images_lru(&self) -> Result<Vec<ImageRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT digest, size, mtime_ns, format, source, last_used FROM images ORDER BY last_used, digest",
            )?;
            let rows = st.query_map([], image_row)?;
            rows.collect()
        })
    }

    pub fn image_url(&self, url: &str) -> Result<Option<ImageUrl>> {
        self.with(|c| {
            c.query_row(
                "SELECT digest, etag, last_modified FROM image_urls WHERE url = ?1",
                params![url],
                |r| {
                    Ok(ImageUrl {
                        digest: parse(r.get(0)?, "digest")?,
                        etag: r.get(1)?,
                        last_modified: r.get(2)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn put_image_url(&self, url: &str, u: &ImageUrl) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO image_urls (url, digest, etag, last_modified, checked_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![url, u.digest.hex(), u.etag, u.last_modified, now_ms()],
            )
        })?;
        Ok(())
    }
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        digest: parse(r.get(0)?, "digest")?,
        size: r.get::<_, i64>(1)? as u64,
        mtime_ns: r.get(2)?,
        format: r.get(3)?,
        source: r.get(4)?,
        last_used: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn db() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("kiln.db")).unwrap();
        (d, db)
    }

    #[test]
    fn submit_dedupes_and_remembers_failures() {
        let (_d, db) = db();
        let p = json!({"a": 1});
        let a = match db.submit("kmod", "k1", &p, None, false).unwrap() {
            Submitted::Created(j) => j,
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(db.submit("kmod", "k1", &p, None, false).unwrap(), Submitted::Joined(j) if j.id == a.id)
        );
        let claimed = db.claim("w1", &["kmod"], 60_000).unwrap().unwrap();
        assert_eq!(claimed.id, a.id);
        assert_eq!(claimed.status, JobStatus::Building);
        assert!(db.claim("w2", &["kmod"], 60_000).unwrap().is_none());
        assert!(!db
            .finish(&a.id, "w2", JobStatus::Failed, None, Some("x"))
            .unwrap());
        assert!(db
            .finish(&a.id, "w1", JobStatus::Failed, None, Some("boom"))
            .unwrap());
        assert!(
            matches!(db.submit("kmod", "k1", &p, None, false).unwrap(), Submitted::PreviouslyFailed(j) if j.error.as_deref() == Some("boom"))
        );
        assert!(
            matches!(db.submit("kmod", "k1", &p, None, true).unwrap(), Submitted::Created(j) if j.id != a.id)
        );
    }

    #[test]
    fn expired_leases_are_reclaimed_and_restarts_recover() {
        let (_d, db) = db();
        let Submitted::Created(j) = db.submit("kmod", "k", &json!({}), None, false).unwrap() else {
            panic!()
        };
        db.claim("dead", &["kmod"], -1).unwrap().unwrap();
        let again = db.claim("alive", &["kmod"], 60_000).unwrap().unwrap();
        assert_eq!(again.id, j.id);
        assert_eq!(again.attempts, 2);
        let (requeued, failed) = db.recover_interrupted(3).unwrap();
        assert_eq!((requeued.len(), failed.len()), (1, 0));
        db.claim("x", &["kmod"], 60_000).unwrap().unwrap();
        let (requeued, failed) = db.recover_interrupted(3).unwrap();
        assert_eq!((requeued.len(), failed.len()), (0, 1));
        let row = db.get(&j.id).unwrap().unwrap();
        assert_eq!(row.status, JobStatus::Failed);
        assert!(row.error.unwrap().contains("interrupted"));
    }

    #[test]
    fn eviction_is_lru_and_spares_pinned_inputs() {
        let (_d, db) = db();
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        db.touch_blob(&a, 100).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(3));
        db.put_artifact("kmod", "kb", &b, 100, &json!({}), None)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(3));
        db.touch_blob(&c, 100).unwrap();
        db.put_alias("kmod", "raw-b", "kb").unwrap();
        // `a` is the oldest but pinned by a pending job.
        db.submit("kmod", "k", &json!({}), Some(&a), false).unwrap();
        let gone = db.evict_to(150).unwrap();
        assert_eq!(gone, vec![b, c]);
        assert!(db.artifact("kmod", "kb").unwrap().is_none());
        assert!(db.alias("kmod", "raw-b").unwrap().is_none());
        assert_eq!(db.cache_usage().unwrap(), (1, 100));
    }
}
