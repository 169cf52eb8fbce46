//! The audit log: one JSON line per mutating request (who, what, which job,
//! the outcome), refused ones included. It goes to `--audit-log` (append-only,
//! one `write` per record so lines never interleave) and to the `kiln::audit`
//! tracing target.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct AuditRecord {
    /// `None` when the caller could not be identified.
    pub identity: Option<String>,
    pub auth: Option<&'static str>,
    pub method: String,
    pub path: String,
    pub route: Option<String>,
    pub status: u16,
    pub job_id: Option<String>,
}

#[derive(Debug)]
pub struct Audit {
    file: Option<(PathBuf, Mutex<std::fs::File>)>,
}

impl Audit {
    /// Append to `path`, creating it with mode 0600.
    pub fn open(path: &Path) -> std::io::Result<Audit> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Audit {
            file: Some((path.to_path_buf(), Mutex::new(f))),
        })
    }

    /// Only the tracing target.
    pub fn log_only() -> Audit {
        Audit { file: None }
    }

    pub fn record(&self, r: AuditRecord) {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let outcome = if r.status < 400 {
            "ok"
        } else {
            "refused_or_failed"
        };
        tracing::info!(
            target: "kiln::audit",
            identity = r.identity.as_deref().unwrap_or("-"),
            auth = r.auth.unwrap_or("-"),
            method = %r.method,
            path = %r.path,
            status = r.status,
            job_id = r.job_id.as_deref().unwrap_or("-"),
            outcome,
            "audit"
        );
        let Some((path, f)) = &self.file else { return };
        let mut line = serde_json::json!({"ts": ts, "outcome": outcome});
        if let (Some(obj), Ok(serde_json::Value::Object(rec))) =
            (line.as_object_mut(), serde_json::to_value(&r))
        {
            obj.extend(rec);
        }
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(&bytes) {
            tracing::error!(path = %path.display(), error = %e, "writing the audit log");
        }
    }
}
