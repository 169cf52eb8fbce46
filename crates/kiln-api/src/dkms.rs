//! dkms2bin over HTTP: `POST /api/v1/dkms` (multipart: `package`, a DKMS
//! `.deb` or source tar.gz, and `headers`, a kernel headers tar.gz) answers
//! 200 with the `.deb` on a cache hit or 202 with a job;
//! `GET /api/v1/dkms/{job_id}/deb` downloads the result.

use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use kiln_dkms::{DkmsOutcome, DkmsResult};
use kiln_store::Submitted;
use serde::Deserialize;

use crate::{ApiError, AppState};

#[derive(Debug, Deserialize)]
pub struct DkmsQuery {
    kernel_version: Option<String>,
    force: Option<String>,
}

async fn deb_file(
    path: &std::path::Path,
    name: &str,
    extra: &[(&'static str, String)],
) -> Result<Response, ApiError> {
    let mut resp = crate::kmod::gzip_file(path, extra).await?;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.debian.binary-package"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

pub async fn submit(
    State(s): State<AppState>,
    Query(q): Query<DkmsQuery>,
    headers: HeaderMap,
    mut mp: Multipart,
) -> Result<Response, ApiError> {
    let kver = crate::kmod::requested_kver(&headers, q.kernel_version.as_deref())?;
    let (mut package, mut hdrs) = (None, None);
    let mut total = 0u64;
    while let Some(mut field) = mp
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let slot = match name.as_str() {
            "package" => &mut package,
            "headers" => &mut hdrs,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown form field {other:?}: send \"package\" and \"headers\""
                )))
            }
        };
        let mut blob = s.dkms.cas().writer().await.map_err(ApiError::internal)?;
        while let Some(chunk) = field.chunk().await.map_err(|e| {
            let e: axum::Error = axum::Error::new(e);
            ApiError::from_body(e)
        })? {
            total += chunk.len() as u64;
            if total > s.max_body {
                return Err(ApiError::too_large(s.max_body));
            }
            blob.write(&chunk).await.map_err(ApiError::internal)?;
        }
        blob.flush().await.map_err(ApiError::internal)?;
        if blob.size() == 0 {
            return Err(ApiError::bad_request(format!("the {name} part is empty")));
        }
        *slot = Some(blob);
    }
    let (Some(package), Some(hdrs)) = (package, hdrs) else {
        return Err(ApiError::bad_request(
            "send a multipart form with a \"package\" (.deb or tar.gz) and \"headers\" (tar.gz) part",
        ));
    };
    let force = matches!(q.force.as_deref(), Some("" | "1" | "true" | "yes"));
    let outcome = s
        .dkms
        .request(&s.engine, package, hdrs, kver, force)
        .await
        .map_err(|e| match e {
            kiln_dkms::DkmsError::Input(m) => ApiError::bad_request(m),
            e => ApiError::internal(e),
        })?;
    match outcome {
        DkmsOutcome::Hit {
            path,
            file_name,
            job_id,
        } => {
            let mut extra = vec![("x-kiln-cache", "hit".to_string())];
            if let Some(j) = job_id {
                extra.push(("x-kiln-job-id", j.to_string()));
            }
            deb_file(&path, &file_name, &extra).await
        }
        DkmsOutcome::Job(Submitted::Created(j) | Submitted::Joined(j)) => Ok(
            crate::kmod::accepted(&j, format!("/api/v1/dkms/{}/deb", j.id)),
        ),
        DkmsOutcome::Job(Submitted::PreviouslyFailed(j)) => Err(ApiError::unprocessable(
            "previously_failed",
            format!(
                "this exact build failed before: {}; resend with ?force=true to build again",
                j.error.clone().unwrap_or_default()
            ),
        )
        .with(serde_json::json!({"status": "failed", "job_id": j.id}))),
    }
}

pub async fn download(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (id, r): (_, DkmsResult) = crate::jobs::completed_result(&s, &id, kiln_dkms::KIND)?;
    let (Some(d), Some(name)) = (r.artifact, r.file_name) else {
        return Err(ApiError::not_found(format!(
            "job {id} built nothing: {}",
            r.skipped.unwrap_or_default()
        )));
    };
    let path = s.dkms.cas().verify(&d).map_err(|e| {
        ApiError::not_found(format!(
            "the package of job {id} is no longer in the cache ({e})"
        ))
    })?;
    deb_file(&path, &name, &[]).await
}
