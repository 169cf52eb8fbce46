//! The DRBD build server's routes: build (upload headers), download, and
//! the signing certificate.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use kiln_core::{JobStatus, KernelVersion};
use kiln_kmod::Outcome;
use kiln_store::Submitted;
use serde::Deserialize;

use crate::{ApiError, AppState};

#[derive(Debug, Deserialize)]
pub struct BuildQuery {
    kernel_version: Option<String>,
    #[serde(default)]
    force: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("" | "1" | "true" | "yes"))
}

pub(crate) async fn gzip_file(
    path: &std::path::Path,
    extra: &[(&'static str, String)],
) -> Result<Response, ApiError> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(ApiError::internal)?;
    let len = f.metadata().await.map_err(ApiError::internal)?.len();
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(f)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    Ok(resp)
}

/// The kernel version from `X-Kernel-Version` or `?kernel_version=`, validated.
pub(crate) fn requested_kver(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<KernelVersion, ApiError> {
    headers
        .get("x-kernel-version")
        .and_then(|v| v.to_str().ok())
        .or(query)
        .unwrap_or_default()
        .parse()
        .map_err(|e: kiln_core::KernelVersionError| ApiError::bad_request(e.to_string()))
}

/// `202 Accepted` for a created or joined job, with where to look next.
pub(crate) fn accepted(j: &kiln_store::JobRow, download_url: String) -> Response {
    (
        StatusCode::ACCEPTED,
        [("x-kiln-job-id", j.id.to_string())],
        Json(serde_json::json!({
            "status": if j.status == JobStatus::Pending { "building" } else { j.status.as_str() },
            "job_id": j.id,
            "status_url": format!("/api/v1/status/{}", j.id),
            "download_url": download_url,
            "logs_url": format!("/api/v1/jobs/{}/logs", j.id),
        })),
    )
        .into_response()
}

/// `POST /api/v1/build`: stream the headers to disk while hashing them,
/// answer from the cache (200 + archive) or with a job (202).
pub async fn build(
    State(s): State<AppState>,
    Query(q): Query<BuildQuery>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let kver = requested_kver(&headers, q.kernel_version.as_deref())?;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > s.max_body {
            return Err(ApiError::too_large(s.max_body));
        }
    }
    // A body whose SHA-256 is declared (`X-Kiln-Content-SHA256`, the header
    // signed requests carry anyway) is looked up before it is read: on a hit
    // the archive is the answer and the body is never received (curl sends
    // large bodies only after `100 Continue`, which is never sent then). The
    // answer depends only on the declared digest, so a false declaration
    // gains nothing its author did not already know.
    let declared = headers
        .get(kiln_auth::BODY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<kiln_core::Digest>().ok());
    if let (Some(d), false) = (declared, truthy(&q.force)) {
        if let Some(hit) = raw_hit(&s, &d, &kver).await? {
            return Ok(hit);
        }
    }
    let t0 = std::time::Instant::now();
    let mut upload = s.kmod.cas().writer().await.map_err(ApiError::internal)?;
    let not_gzip =
        || ApiError::bad_request("the body is not gzip data (send the kernel headers as a tar.gz)");
    let mut body = req.into_body().into_data_stream();
    // Headers new to this server are extracted while they arrive.
    let mut staging = s.kmod.stream_stage(&kver);
    let mut fed = true;
    // The first two bytes, to refuse a non-gzip body before storing it.
    let mut head: Vec<u8> = Vec::with_capacity(2);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(ApiError::from_body)?;
        if head.len() < 2 {
            head.extend(chunk.iter().take(2 - head.len()));
            if head.len() == 2 && !kiln_archive::is_gzip(&head) {
                return Err(not_gzip());
            }
        }
        if upload.size() + chunk.len() as u64 > s.max_body {
            return Err(ApiError::too_large(s.max_body));
        }
        upload.write(&chunk).await.map_err(ApiError::internal)?;
        if let (Some(st), true) = (staging.as_mut(), fed) {
            // False: the extraction stopped; its error is reported below.
            fed = st.feed(chunk).await;
        }
    }
    if upload.size() == 0 {
        return Err(ApiError::bad_request(
            "empty body: send the kernel headers as a tar.gz",
        ));
    }
    if head.len() < 2 {
        return Err(not_gzip());
    }
    upload.flush().await.map_err(ApiError::internal)?;
    let (bytes, upload_ms) = (upload.size(), t0.elapsed().as_secs_f64() * 1e3);
    let force = truthy(&q.force);
    let outcome = s
        .kmod
        .request(&s.engine, upload, staging, kver, force)
        .await?;
    tracing::info!(
        bytes,
        upload_ms,
        decide_ms = t0.elapsed().as_secs_f64() * 1e3 - upload_ms,
        "headers upload handled"
    );
    match outcome {
        Outcome::Hit {
            path,
            cache_key,
            job_id,
        } => hit_response(&path, cache_key, job_id, None).await,
        Outcome::Job(Submitted::Created(j) | Submitted::Joined(j)) => {
            Ok(accepted(&j, format!("/api/v1/download/{}", j.id)))
        }
        Outcome::Job(Submitted::PreviouslyFailed(j)) => {
            let tail = kiln_engine::JobLog::tail(&s.engine.log_path(&j.id), 40);
            Err(ApiError::unprocessable(
                "previously_failed",
                format!(
                    "this exact build failed before: {}; resend with ?force=true to build again",
                    j.error.clone().unwrap_or_default()
                ),
            )
            .with(serde_json::json!({
                "status": "failed",
                "job_id": j.id,
                "log": tail,
                "logs_url": format!("/api/v1/jobs/{}/logs", j.id),
            })))
        }
    }
}

/// The archive built from an upload whose bytes had this SHA-256 (the
/// first-level index), as a 200 response, or None.
async fn raw_hit(
    s: &AppState,
    digest: &kiln_core::Digest,
    kver: &KernelVersion,
) -> Result<Option<Response>, ApiError> {
    let Some(Outcome::Hit {
        path,
        cache_key,
        job_id,
    }) = s.kmod.lookup_raw(digest, kver).await?
    else {
        return Ok(None);
    };
    hit_response(&path, cache_key, job_id, Some("declared-digest"))
        .await
        .map(Some)
}

/// A cached module archive as the answer, with where it came from.
async fn hit_response(
    path: &std::path::Path,
    cache_key: String,
    job_id: Option<kiln_core::JobId>,
    index: Option<&'static str>,
) -> Result<Response, ApiError> {
    let mut extra = vec![
        ("x-kiln-cache", "hit".to_string()),
        ("x-kiln-cache-key", cache_key),
    ];
    if let Some(i) = index {
        extra.push(("x-kiln-cache-index", i.to_string()));
    }
    if let Some(j) = job_id {
        extra.push(("x-kiln-job-id", j.to_string()));
    }
    gzip_file(path, &extra).await
}

/// `GET /api/v1/build/{sha256}?kernel_version=`: the modules built from an
/// upload with exactly these bytes, without sending them (kiln's client
/// asks this first). 200 + archive, or 404 (then `POST /api/v1/build`).
pub async fn lookup(
    State(s): State<AppState>,
    Path(sha): Path<String>,
    Query(q): Query<BuildQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kver = requested_kver(&headers, q.kernel_version.as_deref())?;
    let d: kiln_core::Digest = sha
        .parse()
        .map_err(|e: kiln_core::DigestError| ApiError::bad_request(e.to_string()))?;
    raw_hit(&s, &d, &kver).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no modules for kernel {kver} were built from an upload with SHA-256 {}; POST the headers to /api/v1/build",
            d.hex()
        ))
    })
}

/// `GET /api/v1/download/{job_id}`: 200 with the archive, 400 while the job
/// is not completed, 404 for an unknown job or a lost archive.
pub async fn download(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (id, r): (_, kiln_kmod::KmodResult) =
        crate::jobs::completed_result(&s, &id, kiln_kmod::KIND)?;
    let path = s.kmod.cas().verify(&r.artifact).map_err(|e| {
        ApiError::not_found(format!(
            "the archive of job {id} is no longer in the cache ({e}); build again"
        ))
    })?;
    let name = format!(
        "attachment; filename=\"kmod-{}-{}.tar.gz\"",
        r.kernel_version, id
    );
    gzip_file(&path, &[("content-disposition", name)]).await
}

#[derive(Debug, Deserialize)]
pub struct CertQuery {
    format: Option<String>,
}

/// `GET /api/v1/signing-cert`: the module signing certificate, DER for
/// `mokutil --import` (or `?format=pem`).
pub async fn signing_cert(
    State(s): State<AppState>,
    Query(q): Query<CertQuery>,
) -> Result<Response, ApiError> {
    let sig = s.kmod.config().signing.as_ref().ok_or_else(|| {
        ApiError::not_found("module signing is not configured (--sign-key/--sign-cert)")
    })?;
    if q.format.as_deref() == Some("pem") {
        let pem = tokio::fs::read(&sig.cert)
            .await
            .map_err(ApiError::internal)?;
        return Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response());
    }
    Ok((
        [
            (header::CONTENT_TYPE, "application/pkix-cert"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"kiln-signing-cert.der\"",
            ),
        ],
        sig.cert_der.clone(),
    )
        .into_response())
}
