//! The HTTP edge. Only this crate knows HTTP: it maps requests onto the
//! engine and the job kinds, and their errors onto status codes. Routes keep
//! the DRBD build server's paths and shapes exactly; everything else
//! (jobs, logs, cancel, health, metrics) is kiln's own.

mod audit;
mod auth;
mod dkms;
mod error;
mod image;
mod jobs;
mod k8s;
mod kmod;
mod provision;
mod tls;

pub use audit::Audit;
pub use auth::{access, Access, Peer};
pub use error::ApiError;
pub use tls::{serve, Tls, TlsError, TlsSettings};

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kiln_engine::Engine;
use kiln_kmod::Kmod;

#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub kmod: Arc<Kmod>,
    pub dkms: Arc<kiln_dkms::DkmsJobs>,
    pub cbt_jobs: Arc<kiln_cbt::CbtJobs>,
    /// Snapshot roots, data-token key and lifetime.
    pub cbt: Arc<kiln_cbt::CbtConfig>,
    /// Volume provisioning (the libvirt-volume-provisioner API).
    pub provision: Arc<kiln_provision::ProvisionJobs>,
    /// Container image builds (buildshuttle's API, at the root).
    pub image: Arc<kiln_image::ImageJobs>,
    /// `--maxbytesbody`.
    pub max_body: u64,
    pub version: &'static str,
    pub auth: Arc<kiln_auth::Authenticator>,
    pub audit: Arc<Audit>,
    /// `/metrics` needs the read scope (`--metrics-auth`).
    pub metrics_auth: bool,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/api/v1/build",
            post(kmod::build).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/dkms",
            post(dkms::submit).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/build/{sha256}", get(kmod::lookup))
        .route("/api/v1/dkms/{job_id}/deb", get(dkms::download))
        .route("/api/v1/status/{job_id}", get(jobs::status))
        .route("/api/v1/download/{job_id}", get(kmod::download))
        .route("/api/v1/hello", get(hello))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/signing-cert", get(kmod::signing_cert))
        .route("/api/v1/jobs", get(jobs::list))
        .route(
            "/api/v1/jobs/{job_id}",
            get(jobs::status).delete(jobs::cancel),
        )
        .route("/api/v1/jobs/{job_id}/logs", get(jobs::logs))
        .route("/api/v1/cancel/{job_id}", delete(jobs::cancel))
        .route("/api/v1/cache", get(cache_usage).delete(cache_purge))
        .route("/api/v1/provision", post(provision::provision))
        .route("/api/v1/images", get(provision::images))
        .route("/version", get(k8s::version))
        .route("/api", get(k8s::api))
        .route("/api/v1", get(k8s::api_v1))
        .route("/apis", get(k8s::apis))
        .route("/openapi/v3", get(k8s::openapi_v3))
        .route(
            "/openapi/v3/apis/cbt.storage.k8s.io/v1alpha1",
            get(k8s::openapi_v3_group),
        )
        .route("/apis/cbt.storage.k8s.io", get(k8s::api_group))
        .route("/apis/cbt.storage.k8s.io/v1alpha1", get(k8s::resources))
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/volumesnapshotdeltas",
            get(k8s::list_all_deltas),
        )
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/volumesnapshots",
            get(k8s::list_all_snapshots),
        )
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshotdeltas",
            get(k8s::list_deltas).post(k8s::create_delta),
        )
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshotdeltas/{name}",
            get(k8s::get_delta).delete(k8s::delete_delta),
        )
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshots",
            get(k8s::list_snapshots).post(k8s::create_snapshot),
        )
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshots/{name}",
            get(k8s::get_snapshot).delete(k8s::delete_snapshot),
        )
        .route(
            "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshots/{name}/blocks/{token}",
            get(k8s::block),
        )
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/livez", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        // buildshuttle's routes, at the root as its clients expect; the
        // static routes above always take precedence over these.
        .route("/", axum::routing::post(image::create))
        .route("/octhc", get(image::octhc))
        .route("/{key}", get(image::sources).delete(image::stop_app))
        .route("/{key}/{number}", delete(image::stop))
        .route("/{key}/{number}/logs", get(image::logs))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn hello(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"message": "hello from kiln", "version": s.version}))
}

async fn cache_usage(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let (blobs, bytes) = s.engine.db().cache_usage()?;
    Ok(Json(serde_json::json!({
        "blobs": blobs,
        "bytes": bytes,
        "max_bytes": s.kmod.config().cache_max_bytes,
    })))
}

#[derive(Debug, serde::Deserialize)]
struct PurgeQuery {
    keep_bytes: Option<u64>,
}

/// `DELETE /api/v1/cache[?keep_bytes=N]` (admin): evict least recently used
/// blobs down to N bytes (default 0), sparing inputs of unfinished jobs.
async fn cache_purge(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<PurgeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kmod = s.kmod.clone();
    let keep = q.keep_bytes.unwrap_or(0);
    let (evicted, freed) = tokio::task::spawn_blocking(move || kmod.evict_to(keep))
        .await
        .map_err(ApiError::internal)??;
    let (blobs, bytes) = s.engine.db().cache_usage()?;
    Ok(Json(serde_json::json!({
        "evicted": evicted,
        "freed_bytes": freed,
        "blobs": blobs,
        "bytes": bytes,
    })))
}

/// `GET /api/v1/whoami`: who the server takes the caller for, and what it
/// may do; clients check it before a long upload.
async fn whoami(
    axum::Extension(id): axum::Extension<kiln_auth::Identity>,
) -> Json<serde_json::Value> {
    let scopes: Vec<&str> = [
        kiln_auth::Scope::Read,
        kiln_auth::Scope::Write,
        kiln_auth::Scope::Admin,
    ]
    .into_iter()
    .filter(|s| id.scopes.contains(*s))
    .map(kiln_auth::Scope::as_str)
    .collect();
    Json(serde_json::json!({"identity": id.name, "auth": id.method.as_str(), "scopes": scopes}))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the database answers.
async fn ready(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    s.engine
        .db()
        .cache_usage()
        .map_err(|e| ApiError::unavailable(format!("database not ready: {e}")))?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn metrics(State(s): State<AppState>) -> Response {
    let m = s.engine.metrics();
    if let Ok(rows) = s.engine.db().count_by_status() {
        m.jobs_active.reset();
        for (kind, status, n) in rows {
            m.jobs_active
                .with_label_values(&[&kind, status.as_str()])
                .set(n);
        }
    }
    if let Ok((_, bytes)) = s.engine.db().cache_usage() {
        m.cache_bytes.set(bytes as i64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        m.render(),
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// Count every request by route and status, and log it.
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let t = Instant::now();
    let resp = next.run(req).await;
    let code = resp.status().as_u16().to_string();
    s.engine
        .metrics()
        .http_requests
        .with_label_values(&[method.as_str(), &route, &code])
        .inc();
    s.provision
        .metrics()
        .requests
        .with_label_values(&[&route, method.as_str(), &code])
        .inc();
    tracing::info!(method = %method, route = %route, status = %code, ms = t.elapsed().as_millis() as u64, "request");
    resp
}
