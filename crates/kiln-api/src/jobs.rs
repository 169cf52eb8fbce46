//! Job routes shared by every kind: status (the seed's shape), list,
//! cancel, and logs (whole or followed live).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use kiln_core::{JobId, JobStatus};
use kiln_store::{JobFilter, JobRow};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::{ApiError, AppState};

pub(crate) fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A duration as Go prints it (`5m0s`, `1.5s`, `250ms`), as the seed did.
pub fn go_duration(ms: i64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let secs = if rem % 1000 == 0 {
        format!("{}s", rem / 1000)
    } else {
        let s = format!("{:.3}", rem as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

fn parse_id(id: &str) -> Result<JobId, ApiError> {
    id.parse().map_err(|_| {
        ApiError::not_found(format!("job {id:?} not found"))
            .with(serde_json::json!({"status": "notExist"}))
    })
}

fn get_job(s: &AppState, id: &str) -> Result<JobRow, ApiError> {
    let id = parse_id(id)?;
    s.engine.get(&id)?.ok_or_else(|| {
        ApiError::not_found(format!("job {id} not found"))
            .with(serde_json::json!({"status": "notExist", "job_id": id}))
    })
}

/// The typed result of a completed job of `kind`: 404 for an unknown job (or
/// one of another kind), 400 while it is not completed.
pub(crate) fn completed_result<R: serde::de::DeserializeOwned>(
    s: &AppState,
    id: &str,
    kind: &str,
) -> Result<(JobId, R), ApiError> {
    let id: JobId = id
        .parse()
        .map_err(|_| ApiError::not_found(format!("job {id:?} not found")))?;
    let job = s
        .engine
        .get(&id)?
        .filter(|j| j.kind == kind)
        .ok_or_else(|| ApiError::not_found(format!("{kind} job {id} not found")))?;
    if job.status != JobStatus::Completed {
        return Err(
            ApiError::bad_request(format!("job {id} is {}, not completed", job.status))
                .with(serde_json::json!({"status": job.status})),
        );
    }
    let r = job
        .result
        .and_then(|r| serde_json::from_value(r).ok())
        .ok_or_else(|| ApiError::not_found(format!("job {id} has no result")))?;
    Ok((id, r))
}

/// The seed's status document, plus `kind`, `error`, `progress`, `attempts`.
pub fn job_json(s: &AppState, j: &JobRow) -> serde_json::Value {
    let mut v = serde_json::json!({
        "status": j.status,
        "job_id": j.id,
        "kind": j.kind,
        "created_at": rfc3339(j.created_at),
        "attempts": j.attempts,
        "logs_url": format!("/api/v1/jobs/{}/logs", j.id),
    });
    let o = v.as_object_mut().expect("object");
    if let Some(kv) = j.params.get("kernel_version") {
        o.insert("kernel_version".into(), kv.clone());
    }
    if let Some(k) = j.params.get("cache_key") {
        o.insert("cache_key".into(), k.clone());
    }
    if let Some(p) = &j.progress {
        o.insert("progress".into(), p.clone());
    }
    if let Some(t) = j.started_at {
        o.insert("started_at".into(), rfc3339(t).into());
    }
    if let Some(t) = j.finished_at {
        o.insert("completed_at".into(), rfc3339(t).into());
        o.insert("duration".into(), go_duration(t - j.created_at).into());
    }
    if let Some(e) = &j.error {
        o.insert("error".into(), e.clone().into());
    }
    if j.status == JobStatus::Completed {
        if let Some(r) = &j.result {
            if let Some(d) = r
                .get("artifact")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse().ok())
            {
                o.insert(
                    "cache_path".into(),
                    s.kmod.cas().path(&d).display().to_string().into(),
                );
            }
            o.insert(
                "download_url".into(),
                if j.kind == kiln_dkms::KIND {
                    format!("/api/v1/dkms/{}/deb", j.id)
                } else {
                    format!("/api/v1/download/{}", j.id)
                }
                .into(),
            );
            o.insert("result".into(), r.clone());
        }
    }
    if j.kind == kiln_provision::KIND {
        crate::provision::decorate(o, j);
    }
    if j.kind == kiln_image::KIND {
        // The build's own outcome: succeeded, failed, stopped or timed_out.
        if let Some(out) = j.progress.as_ref().and_then(|p| p.get("outcome")) {
            o.insert("outcome".into(), out.clone());
        }
        for k in ["app", "app_uuid", "build_uuid", "build_number"] {
            if let Some(v) = j.params.get(k) {
                o.insert(k.into(), v.clone());
            }
        }
        o.remove("download_url");
    }
    v
}

/// `GET /api/v1/status/{id}`: 200 when finished, 202 while pending or
/// building, 404 when unknown.
pub async fn status(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let j = get_job(&s, &id)?;
    // The provisioner's clients expect 200 in every state, as its seed did.
    let code = if j.status.is_terminal() || j.kind == kiln_provision::KIND {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(job_json(&s, &j))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/jobs?status=&kind=&limit=`: newest first.
pub async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(str::parse::<JobStatus>)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let rows = s.engine.list(&JobFilter {
        status,
        kind: q.kind,
        limit: q.limit,
    })?;
    let jobs: Vec<_> = rows.iter().map(|j| job_json(&s, j)).collect();
    Ok(Json(serde_json::json!({"jobs": jobs, "count": jobs.len()})))
}

/// `DELETE /api/v1/jobs/{id}`: cancel, killing the build's process tree.
pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let before = get_job(&s, &id)?;
    if before.status.is_terminal() {
        return Err(
            ApiError::conflict(format!("job {} already {}", before.id, before.status))
                .with(job_json(&s, &before)),
        );
    }
    let j = s.engine.cancel(&before.id).await?;
    tracing::info!(job.id = %j.id, status = %j.status, "cancel requested");
    Ok((StatusCode::OK, Json(job_json(&s, &j))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    follow: Option<String>,
}

/// `GET /api/v1/jobs/{id}/logs[?follow=true]`.
pub async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let j = get_job(&s, &id)?;
    let path = s.engine.log_path(&j.id);
    let follow = matches!(q.follow.as_deref(), Some("" | "1" | "true" | "yes"));
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow || j.status.is_terminal() {
        let text = tokio::fs::read(&path).await.unwrap_or_default();
        return Ok((text_plain, text).into_response());
    }
    let engine = s.engine.clone();
    let id = j.id.clone();
    let done: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || {
        engine
            .get(&id)
            .ok()
            .flatten()
            .is_none_or(|j| j.status.is_terminal())
    });
    let stream = kiln_engine::follow_log(path, done)
        .filter(|c| futures::future::ready(!matches!(c, Ok(b) if b.is_empty())));
    Ok((text_plain, Body::from_stream(stream)).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn go_durations() {
        assert_eq!(super::go_duration(300_000), "5m0s");
        assert_eq!(super::go_duration(1_500), "1.5s");
        assert_eq!(super::go_duration(250), "250ms");
        assert_eq!(super::go_duration(3_723_000), "1h2m3s");
    }
}
