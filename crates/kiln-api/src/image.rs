//! buildshuttle's routes at the root of kiln's listener, as its clients
//! call them: `POST /` (a build), `GET`/`HEAD /{build_uuid}` (its stored
//! sources), `DELETE /{app}-{app_uuid}/{number}` (stop a build), `DELETE
//! /{app}-{app_uuid}` (stop all of an app's builds), `GET
//! /{app}-{app_uuid}/{number}/logs` (whole, `?follow=true`, or Server-Sent
//! Events), `GET /octhc`. Static routes (`/api/...`, `/apis/...`,
//! `/health`, `/metrics`) always win over these parameter routes.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use kiln_core::JobStatus;
use kiln_image::{BuildRequest, ImageJobs};
use kiln_store::{JobFilter, Submitted};

use crate::{ApiError, AppState};

fn bad(msg: impl Into<String>) -> ApiError {
    let msg = msg.into();
    ApiError::bad_request(msg.clone())
        .with(serde_json::json!({"status": format!("Bad Request - {msg}")}))
}

/// `POST /`: queue a build (200 `{"status": "ok", "job_id"}`, as the seed
/// answered once its worker started).
pub async fn create(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: BuildRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid build request: {e}")))?;
    req.validate().map_err(|e| bad(e.to_string()))?;
    let params = serde_json::to_value(&req).map_err(ApiError::internal)?;
    let key = ImageJobs::build_key(&req.app_key(), &req.number());
    let job = match s
        .engine
        .submit(kiln_image::KIND, &key, &params, None, true)?
    {
        Submitted::Created(j) => {
            s.image.record(&req, &j.id)?;
            s.image.accepted(&req);
            j
        }
        Submitted::Joined(j) if j.params == params => j,
        Submitted::Joined(j) | Submitted::PreviouslyFailed(j) => {
            return Err(ApiError::conflict(format!(
                "build {key} is already running as job {} with other parameters",
                j.id
            )))
        }
    };
    tracing::info!(job.id = %job.id, build = %key, "build accepted");
    Ok((
        StatusCode::OK,
        [("x-kiln-job-id", job.id.to_string())],
        Json(serde_json::json!({"status": "ok", "job_id": job.id})),
    )
        .into_response())
}

/// `GET /octhc`: the seed's health check.
pub async fn octhc() -> &'static str {
    "overall_status=good"
}

/// `GET|HEAD /{build_uuid}`: the build's stored sources.
pub async fn sources(
    State(s): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    if !kiln_image::request::is_uuid(&key) {
        return Err(bad("build uuid is invalid."));
    }
    let Some(p) = s.image.sources_path(&key)? else {
        return Err(
            ApiError::not_found(format!("no stored sources for build {key}"))
                .with(serde_json::json!({"status": "Not Found"})),
        );
    };
    let f = tokio::fs::File::open(&p)
        .await
        .map_err(ApiError::internal)?;
    let len = f.metadata().await.map_err(ApiError::internal)?.len();
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(f)),
    )
        .into_response())
}

/// Stop one build's job; a build that had not started gets its final
/// `stopped` callback here.
async fn stop_job(s: &AppState, id: &kiln_core::JobId) -> Result<bool, ApiError> {
    let Some(before) = s.engine.get(id)? else {
        return Ok(false);
    };
    if before.status.is_terminal() {
        return Ok(false);
    }
    let after = s.engine.cancel(id).await?;
    if before.status == JobStatus::Pending && after.status == JobStatus::Cancelled {
        if let Ok(req) = serde_json::from_value::<BuildRequest>(after.params.clone()) {
            s.image.stopped_before_start(&req);
        }
    }
    tracing::info!(job.id = %id, status = %after.status, "build stopped");
    Ok(true)
}

/// `DELETE /{app}-{app_uuid}/{number}`: stop a build, killing buildah.
pub async fn stop(
    State(s): State<AppState>,
    Path((key, number)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = s.image.job_of(&key, &number)?.ok_or_else(|| {
        ApiError::not_found(format!("no build {key}/{number}"))
            .with(serde_json::json!({"status": "Not Found"}))
    })?;
    let stopped = stop_job(&s, &id).await?;
    Ok(Json(
        serde_json::json!({"status": "ok", "job_id": id, "stopped": stopped}),
    ))
}

/// `DELETE /{app}-{app_uuid}`: stop every unfinished build of the app (the
/// seed answered ok and did nothing).
pub async fn stop_app(
    State(s): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut n = 0;
    for st in [JobStatus::Pending, JobStatus::Building] {
        let rows = s.engine.list(&JobFilter {
            status: Some(st),
            kind: Some(kiln_image::KIND.into()),
            limit: Some(10_000),
        })?;
        for j in rows {
            let app_key = serde_json::from_value::<BuildRequest>(j.params.clone())
                .ok()
                .map(|r| r.app_key());
            if app_key.as_deref() == Some(key.as_str()) && stop_job(&s, &j.id).await? {
                n += 1;
            }
        }
    }
    Ok(Json(serde_json::json!({"status": "ok", "stopped": n})))
}

#[derive(Debug, serde::Deserialize)]
pub struct LogQuery {
    follow: Option<String>,
}

/// `GET /{app}-{app_uuid}/{number}/logs`: the build's log; live with
/// `?follow=true` (plain text) or `Accept: text/event-stream` (SSE).
pub async fn logs(
    State(s): State<AppState>,
    Path((key, number)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = s.image.job_of(&key, &number)?.ok_or_else(|| {
        ApiError::not_found(format!("no build {key}/{number}"))
            .with(serde_json::json!({"status": "Not Found"}))
    })?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let follow = sse || matches!(q.follow.as_deref(), Some("" | "1" | "true" | "yes"));
    let path = s.engine.log_path(&id);
    let engine = s.engine.clone();
    let id2 = id.clone();
    let done: std::sync::Arc<dyn Fn() -> bool + Send + Sync> = std::sync::Arc::new(move || {
        engine
            .get(&id2)
            .ok()
            .flatten()
            .is_none_or(|j| j.status.is_terminal())
    });
    if !follow {
        let text = tokio::fs::read(&path).await.unwrap_or_default();
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    let stream = kiln_engine::follow_log(path, done)
        .filter(|c| futures::future::ready(!matches!(c, Ok(b) if b.is_empty())));
    if sse {
        let events = stream.map(|c| {
            c.map(|b| Event::default().data(String::from_utf8_lossy(&b).trim_end_matches('\n')))
        });
        return Ok(Sse::new(events).into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}
