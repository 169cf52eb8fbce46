//! The volume provisioner's routes, as libvirt-volume-provisioner documents
//! them: `POST /api/v1/provision` (202 `{job_id}`), status through the
//! shared `/api/v1/status/{job_id}` (with the seed's fields and statuses),
//! cancel through `/api/v1/cancel/{job_id}`; plus `GET /api/v1/images`, the
//! image cache's contents.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::JobStatus;
use kiln_provision::{ImageType, ProvisionParams, ProvisionResult};
use kiln_store::{JobRow, Submitted};

use crate::{ApiError, AppState};

/// The request as the seed's clients send it: unknown fields are ignored
/// and an empty `image_type` means qcow2, as in the seed.
#[derive(Debug, serde::Deserialize)]
struct Request {
    image_url: String,
    volume_name: String,
    volume_size_gb: i64,
    #[serde(default)]
    image_type: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    let msg = msg.into();
    ApiError::bad_request(msg.clone()).with(serde_json::json!({"message": msg}))
}

/// `POST /api/v1/provision`.
pub async fn provision(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let r: Request = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("invalid provision request: {e}")))?;
    let image_type = match r.image_type.as_deref() {
        None | Some("") => ImageType::Qcow2,
        Some(t) => t.parse().map_err(invalid)?,
    };
    if r.volume_size_gb <= 0 {
        return Err(invalid("volume_size_gb must be a positive number of GiB"));
    }
    let p = ProvisionParams {
        image_url: r.image_url,
        volume_name: r.volume_name,
        volume_size_gb: r.volume_size_gb as u64,
        image_type,
        correlation_id: r.correlation_id.filter(|c| !c.is_empty()),
    };
    s.provision.validate(&p).map_err(invalid)?;
    let params = serde_json::to_value(&p).map_err(ApiError::internal)?;
    // One job per volume at a time: the volume is the de-duplication key.
    let key = s.provision.volume_key(&p);
    let job = match s
        .engine
        .submit(kiln_provision::KIND, &key, &params, None, true)?
    {
        Submitted::Created(j) => j,
        // The same request again (a client retrying): the same job.
        Submitted::Joined(j) if j.params == params => j,
        Submitted::Joined(j) | Submitted::PreviouslyFailed(j) => {
            return Err(ApiError::conflict(format!(
                "volume {:?} is already being provisioned by job {}",
                p.volume_name, j.id
            ))
            .with(serde_json::json!({"job_id": j.id})))
        }
    };
    tracing::info!(job.id = %job.id, volume = %p.volume_name, image = %p.image_url, correlation_id = p.correlation_id.as_deref().unwrap_or(""), "provision accepted");
    Ok((
        StatusCode::ACCEPTED,
        [("x-kiln-job-id", job.id.to_string())],
        Json(serde_json::json!({
            "job_id": job.id,
            "status": "accepted",
            "correlation_id": p.correlation_id,
        })),
    )
        .into_response())
}

/// The seed's status vocabulary: pending, running, completed, failed,
/// cancelled.
pub fn status_word(st: JobStatus) -> &'static str {
    match st {
        JobStatus::Building => "running",
        s => s.as_str(),
    }
}

/// The seed's fields on a provision job's status document.
pub fn decorate(o: &mut serde_json::Map<String, serde_json::Value>, j: &JobRow) {
    o.insert("status".into(), status_word(j.status).into());
    if let Some(c) = j.params.get("correlation_id") {
        o.insert("correlation_id".into(), c.clone());
    }
    for k in ["volume_name", "image_url"] {
        if let Some(v) = j.params.get(k) {
            o.insert(k.into(), v.clone());
        }
    }
    let result: Option<ProvisionResult> = j
        .result
        .clone()
        .and_then(|r| serde_json::from_value(r).ok());
    if let Some(r) = result {
        o.insert("cache_hit".into(), r.cache_hit.into());
        o.insert("image_path".into(), r.image_path.clone().into());
        o.insert("progress".into(), r.progress.clone());
    }
    o.remove("download_url");
}

/// `GET /api/v1/images`: the image cache, most recently used first.
pub async fn images(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let cache = s.provision.cache().clone();
    let rows = tokio::task::spawn_blocking(move || cache.db().images_lru())
        .await
        .map_err(ApiError::internal)??;
    let images: Vec<_> = rows
        .iter()
        .rev()
        .map(|r| {
            serde_json::json!({
                "path": s.provision.cache().path(&r.digest),
                "checksum": r.digest.hex(),
                "size": r.size,
                "format": r.format,
                "source": r.source,
                "last_used": crate::jobs::rfc3339(r.last_used),
            })
        })
        .collect();
    let bytes: u64 = rows.iter().map(|r| r.size).sum();
    Ok(Json(
        serde_json::json!({"images": images, "count": images.len(), "bytes": bytes}),
    ))
}
