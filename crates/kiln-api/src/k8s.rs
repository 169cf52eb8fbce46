//! The changed-block-tracking API in Kubernetes' shape, enough for kubectl
//! (`--server URL`, no cluster): discovery (`/version`, `/api`, `/apis`,
//! the `cbt.storage.k8s.io/v1alpha1` resource list), `volumesnapshots` and
//! `volumesnapshotdeltas` (create, get, list, delete), the seed's
//! `?fetchcbd=true&limit=&offset=` pages (plus `continue`), and block data
//! fetched with a data token. Errors are `Status` objects.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_cbt::{CbtResult, DataToken, RunsFile, TokenError};
use kiln_core::JobStatus;
use kiln_store::Resource;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ApiError, AppState};

pub const GROUP: &str = "cbt.storage.k8s.io";
pub const VERSION: &str = "v1alpha1";
const GV: &str = "cbt.storage.k8s.io/v1alpha1";
const DELTA: &str = "VolumeSnapshotDelta";
const SNAP: &str = "VolumeSnapshot";
const DEFAULT_LIMIT: usize = 256;
const MAX_LIMIT: usize = 10_000;

/// Constructors of the Kubernetes-style API's errors: [`ApiError`]s that
/// render as `Status` objects.
struct K8sError;

impl K8sError {
    fn status(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::k8s(code, reason, message)
    }
    fn not_found(kind: &str, name: &str) -> ApiError {
        Self::status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{}.{GROUP} \"{name}\" not found", plural(kind)),
        )
    }
    fn invalid(m: impl Into<String>) -> ApiError {
        Self::status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m)
    }
    fn bad(m: impl Into<String>) -> ApiError {
        Self::status(StatusCode::BAD_REQUEST, "BadRequest", m)
    }
    fn forbidden(m: impl Into<String>) -> ApiError {
        Self::status(StatusCode::FORBIDDEN, "Forbidden", m)
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::internal(e).into_k8s()
    }
}

fn store(e: kiln_store::StoreError) -> ApiError {
    K8sError::internal(e)
}

fn plural(kind: &str) -> &'static str {
    if kind == DELTA {
        "volumesnapshotdeltas"
    } else {
        "volumesnapshots"
    }
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.replace_nanosecond(0)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

// ---- discovery --------------------------------------------------------------

pub async fn version(State(s): State<AppState>) -> Json<Value> {
    Json(json!({
        "major": "1", "minor": "32", "gitVersion": format!("v1.32.0-kiln.{}", s.version),
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "",
        "compiler": "rustc", "platform": "linux/amd64",
    }))
}

pub async fn api() -> Json<Value> {
    Json(json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}))
}

pub async fn api_v1() -> Json<Value> {
    Json(json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": []}))
}

fn group() -> Value {
    json!({"name": GROUP, "versions": [{"groupVersion": GV, "version": VERSION}],
        "preferredVersion": {"groupVersion": GV, "version": VERSION}})
}

pub async fn apis() -> Json<Value> {
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]}))
}

pub async fn api_group() -> Json<Value> {
    let mut g = group();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Json(g)
}

pub async fn resources() -> Json<Value> {
    let verbs = json!(["create", "get", "list", "delete"]);
    Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GV,
        "resources": [
            {"name": "volumesnapshotdeltas", "singularName": "volumesnapshotdelta", "namespaced": true,
             "kind": DELTA, "verbs": verbs, "shortNames": ["vsd"]},
            {"name": "volumesnapshots", "singularName": "volumesnapshot", "namespaced": true,
             "kind": SNAP, "verbs": verbs},
        ]
    }))
}

/// `/openapi/v3`: the index kubectl reads before it validates a manifest.
pub async fn openapi_v3() -> Json<Value> {
    Json(json!({"paths": {
        format!("apis/{GV}"): {"serverRelativeURL": format!("/openapi/v3/apis/{GV}")},
    }}))
}

/// `/openapi/v3/apis/cbt.storage.k8s.io/v1alpha1`: the two kinds' schemas
/// (specs are checked by kiln itself) and the create paths, which accept
/// `fieldValidation`, so kubectl leaves validation to the server.
pub async fn openapi_v3_group() -> Json<Value> {
    let schema = |kind: &str| {
        json!({
            "type": "object",
            "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": kind}],
            "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            }
        })
    };
    // kubectl decides that validation is the server's job when the patch
    // operation of a kind lists `fieldValidation`; kiln checks every
    // object it is given (and answers PATCH with 405).
    let op = |kind: &str, action: &str| {
        json!({
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": {"group": GROUP, "version": VERSION, "kind": kind},
        })
    };
    let post = |kind: &str| json!({"post": op(kind, "post")});
    let patch = |kind: &str| json!({"patch": op(kind, "patch")});
    Json(json!({
        "openapi": "3.0.0",
        "info": {"title": "kiln", "version": VERSION},
        "paths": {
            format!("/apis/{GV}/namespaces/{{namespace}}/volumesnapshotdeltas"): post(DELTA),
            format!("/apis/{GV}/namespaces/{{namespace}}/volumesnapshots"): post(SNAP),
            format!("/apis/{GV}/namespaces/{{namespace}}/volumesnapshotdeltas/{{name}}"): patch(DELTA),
            format!("/apis/{GV}/namespaces/{{namespace}}/volumesnapshots/{{name}}"): patch(SNAP),
        },
        "components": {"schemas": {
            format!("io.k8s.cbt.{VERSION}.{DELTA}"): schema(DELTA),
            format!("io.k8s.cbt.{VERSION}.{SNAP}"): schema(SNAP),
        }}
    }))
}

// ---- objects ----------------------------------------------------------------

fn meta(r: &Resource) -> Value {
    let mut m = json!({
        "name": r.name, "namespace": r.namespace, "uid": r.uid,
        "resourceVersion": r.resource_version.to_string(),
        "creationTimestamp": rfc3339_ms(r.created_at),
    });
    for k in ["labels", "annotations"] {
        if let Some(v) = r.body["metadata"].get(k).filter(|v| v.is_object()) {
            m[k] = v.clone();
        }
    }
    m
}

fn snapshot_json(r: &Resource) -> Value {
    json!({
        "kind": SNAP, "apiVersion": GV, "metadata": meta(r), "spec": r.body["spec"],
        "status": {"readyToUse": true, "restoreSize": r.body["kiln"]["size"],
                   "sourceFormat": r.body["kiln"]["format"]},
    })
}

fn delta_json(s: &AppState, r: &Resource) -> (Value, Option<CbtResult>) {
    let job = r.body["kiln"]["job"]
        .as_str()
        .and_then(|j| j.parse().ok())
        .and_then(|id| s.engine.get(&id).ok().flatten());
    let now = rfc3339_ms(kiln_store::now_ms());
    let (state, cond_status, reason, message, result) = match &job {
        Some(j) if j.status == JobStatus::Completed => {
            let res: Option<CbtResult> = j
                .result
                .clone()
                .and_then(|v| serde_json::from_value(v).ok());
            (
                "computed",
                "True",
                "Computed",
                "the delta is computed".to_string(),
                res,
            )
        }
        Some(j) if j.status.is_terminal() => (
            "failed",
            "False",
            "Failed",
            j.error.clone().unwrap_or_else(|| j.status.to_string()),
            None,
        ),
        Some(j) => (
            "computing",
            "False",
            "Computing",
            j.progress
                .as_ref()
                .map(|p| format!("{} ({}%)", p["stage"].as_str().unwrap_or(""), p["percent"]))
                .unwrap_or_else(|| "queued".into()),
            None,
        ),
        None => (
            "failed",
            "False",
            "Failed",
            "the computing job is gone".into(),
            None,
        ),
    };
    let mut status = json!({
        "state": state,
        "conditions": [{"type": "Computed", "status": cond_status, "reason": reason,
                        "message": message, "lastTransitionTime": now}],
    });
    if let Some(res) = &result {
        status["volumeSizeBytes"] = json!(res.volume_size);
        status["blockSizeBytes"] = json!(res.block_size);
        status["totalChangedBlocks"] = json!(res.changed_blocks);
        status["method"] = json!(res.method);
        status["computeSeconds"] = json!(res.compute_seconds);
    }
    if let Some(j) = &job {
        status["jobId"] = json!(j.id);
    }
    (
        json!({"kind": DELTA, "apiVersion": GV, "metadata": meta(r), "spec": r.body["spec"], "status": status}),
        result,
    )
}

fn list_json(kind: &str, items: Vec<Value>, cont: Option<String>) -> Value {
    let mut m = json!({"resourceVersion": kiln_store::now_ms().to_string()});
    if let Some(c) = cont {
        m["continue"] = json!(c);
    }
    json!({"kind": format!("{kind}List"), "apiVersion": GV, "metadata": m, "items": items})
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    #[serde(rename = "continue")]
    cont: Option<String>,
}

fn decode_list_continue(c: &str) -> Result<(String, String), ApiError> {
    let raw = hex::decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| K8sError::bad("invalid continue token"))?;
    let (ns, name) = raw
        .strip_prefix("list:")
        .and_then(|r| r.split_once('/'))
        .ok_or_else(|| K8sError::bad("invalid continue token"))?;
    Ok((ns.to_string(), name.to_string()))
}

async fn list(
    s: &AppState,
    kind: &'static str,
    ns: Option<&str>,
    q: &ListQuery,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.filter(|l| *l > 0).unwrap_or(500).min(MAX_LIMIT);
    let after = q.cont.as_deref().map(decode_list_continue).transpose()?;
    let rows = s
        .engine
        .db()
        .list_resources(
            kind,
            ns,
            after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
            limit + 1,
        )
        .map_err(store)?;
    let more = rows.len() > limit;
    let rows = &rows[..rows.len().min(limit)];
    let cont = more
        .then(|| {
            rows.last()
                .map(|r| hex::encode(format!("list:{}/{}", r.namespace, r.name)))
        })
        .flatten();
    let items = rows
        .iter()
        .map(|r| {
            if kind == DELTA {
                delta_json(s, r).0
            } else {
                snapshot_json(r)
            }
        })
        .collect();
    Ok(Json(list_json(kind, items, cont)))
}

pub async fn list_deltas(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    list(&s, DELTA, Some(&ns), &q).await
}
pub async fn list_all_deltas(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    list(&s, DELTA, None, &q).await
}
pub async fn list_snapshots(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    list(&s, SNAP, Some(&ns), &q).await
}
pub async fn list_all_snapshots(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    list(&s, SNAP, None, &q).await
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
}

/// Common checks of a posted object; returns its name.
fn check_object(body: &Value, kind: &str, ns: &str) -> Result<String, ApiError> {
    if !valid_name(ns) {
        return Err(K8sError::invalid(format!("invalid namespace {ns:?}")));
    }
    if let Some(k) = body.get("kind").and_then(|k| k.as_str()) {
        if k != kind {
            return Err(K8sError::bad(format!(
                "kind {k:?} posted to {}",
                plural(kind)
            )));
        }
    }
    if let Some(av) = body.get("apiVersion").and_then(|k| k.as_str()) {
        if av != GV {
            return Err(K8sError::bad(format!("apiVersion {av:?}: want {GV}")));
        }
    }
    if let Some(bns) = body["metadata"].get("namespace").and_then(|n| n.as_str()) {
        if bns != ns {
            return Err(K8sError::bad(format!(
                "the namespace of the provided object ({bns}) does not match the namespace sent on the request ({ns})"
            )));
        }
    }
    let name = body["metadata"]["name"].as_str().unwrap_or_default();
    if !valid_name(name) {
        return Err(K8sError::invalid(format!(
            "metadata.name {name:?}: a lowercase RFC 1123 subdomain is required"
        )));
    }
    Ok(name.to_string())
}

#[derive(Debug, Deserialize)]
pub struct CreateQuery {
    #[serde(rename = "fieldValidation")]
    field_validation: Option<String>,
}

/// `fieldValidation=Strict` (kubectl's default): unknown fields are an
/// error; otherwise they are ignored.
fn strict_fields(
    q: &CreateQuery,
    body: &Value,
    allowed: &[(&str, &[&str])],
) -> Result<(), ApiError> {
    if !q
        .field_validation
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case("strict"))
    {
        return Ok(());
    }
    for (path, keys) in allowed {
        let mut v = body;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            v = &v[part];
        }
        if let Some(obj) = v.as_object() {
            if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
                let at = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                return Err(K8sError::bad(format!(
                    "strict decoding error: unknown field \"{at}\""
                )));
            }
        }
    }
    Ok(())
}

const TOP: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

fn stored(body: &Value, kiln: Value) -> Value {
    json!({
        "metadata": {"labels": body["metadata"]["labels"], "annotations": body["metadata"]["annotations"]},
        "spec": body["spec"], "kiln": kiln,
    })
}

fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| K8sError::bad(format!("the body is not a JSON object: {e}")))?;
    if !v.is_object() {
        return Err(K8sError::bad("the body is not a JSON object"));
    }
    Ok(v)
}

pub async fn create_snapshot(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<CreateQuery>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let name = check_object(&body, SNAP, &ns)?;
    strict_fields(
        &q,
        &body,
        &[
            ("", TOP),
            ("spec", &["source"]),
            ("spec.source", &["path", "thin"]),
            ("spec.source.thin", &["metadata", "deviceId"]),
        ],
    )?;
    let path = body["spec"]["source"]["path"]
        .as_str()
        .ok_or_else(|| K8sError::invalid("spec.source.path is required"))?;
    let real = kiln_cbt::allowed_path(&s.cbt.roots, std::path::Path::new(path))
        .map_err(K8sError::forbidden)?;
    let info = kiln_cbt::inspect(&real)
        .await
        .map_err(|e| K8sError::invalid(format!("spec.source.path: {e}")))?;
    // An LVM thin device: its pool's metadata (under a root too) and device id.
    let thin = match body["spec"]["source"].get("thin") {
        None | Some(Value::Null) => Value::Null,
        Some(t) => {
            let md = t["metadata"]
                .as_str()
                .ok_or_else(|| K8sError::invalid("spec.source.thin.metadata is required"))?;
            let md = kiln_cbt::allowed_path(&s.cbt.roots, std::path::Path::new(md))
                .map_err(K8sError::forbidden)?;
            let id = t["deviceId"]
                .as_u64()
                .ok_or_else(|| K8sError::invalid("spec.source.thin.deviceId must be a number"))?;
            json!({"metadata": md, "device_id": id})
        }
    };
    let uid = uuid::Uuid::new_v4().to_string();
    let kiln = json!({"path": real, "format": info.format, "size": info.size, "thin": thin});
    let r = s
        .engine
        .db()
        .create_resource(SNAP, &ns, &name, &uid, &stored(&body, kiln))
        .map_err(store)?
        .ok_or_else(|| {
            K8sError::status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("volumesnapshots.{GROUP} \"{name}\" already exists"),
            )
        })?;
    tracing::info!(namespace = %ns, name = %name, path = %real.display(), format = %info.format, "volume snapshot created");
    Ok((StatusCode::CREATED, Json(snapshot_json(&r))).into_response())
}

fn snapshot(s: &AppState, ns: &str, name: &str) -> Result<Resource, ApiError> {
    s.engine
        .db()
        .get_resource(SNAP, ns, name)
        .map_err(store)?
        .ok_or_else(|| K8sError::not_found(SNAP, name))
}

pub async fn get_snapshot(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(snapshot_json(&snapshot(&s, &ns, &name)?)))
}

pub async fn delete_snapshot(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let r = s
        .engine
        .db()
        .delete_resource(SNAP, &ns, &name)
        .map_err(store)?
        .ok_or_else(|| K8sError::not_found(SNAP, &name))?;
    Ok(Json(snapshot_json(&r)))
}

pub async fn create_delta(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<CreateQuery>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let name = check_object(&body, DELTA, &ns)?;
    strict_fields(
        &q,
        &body,
        &[
            ("", TOP),
            (
                "spec",
                &[
                    "baseVolumeSnapshotName",
                    "targetVolumeSnapshotName",
                    "mode",
                    "blockSizeBytes",
                ],
            ),
        ],
    )?;
    let spec = &body["spec"];
    let field = |f: &str| {
        spec[f]
            .as_str()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| K8sError::invalid(format!("spec.{f} is required")))
    };
    let (base_name, target_name) = (
        field("baseVolumeSnapshotName")?,
        field("targetVolumeSnapshotName")?,
    );
    let mode = spec["mode"].as_str().unwrap_or("block");
    if mode != "block" {
        return Err(K8sError::invalid(format!(
            "spec.mode {mode:?}: only \"block\" is supported"
        )));
    }
    let block_size = spec["blockSizeBytes"]
        .as_u64()
        .unwrap_or(kiln_cbt::DEFAULT_BLOCK_SIZE);
    kiln_cbt::check_block_size(block_size)
        .map_err(|e| K8sError::invalid(format!("spec.blockSizeBytes: {e}")))?;
    let missing = |n: &str| {
        K8sError::invalid(format!(
            "volume snapshot {n:?} does not exist in namespace {ns}"
        ))
    };
    let base = snapshot(&s, &ns, base_name).map_err(|_| missing(base_name))?;
    let target = snapshot(&s, &ns, target_name).map_err(|_| missing(target_name))?;
    // The roots are checked again: they may have changed since the snapshots were made.
    let path_of = |r: &Resource| -> Result<std::path::PathBuf, ApiError> {
        let p = r.body["kiln"]["path"].as_str().unwrap_or_default();
        kiln_cbt::allowed_path(&s.cbt.roots, std::path::Path::new(p)).map_err(K8sError::forbidden)
    };
    let (bt, tt) = (&base.body["kiln"]["thin"], &target.body["kiln"]["thin"]);
    let thin = match (bt["metadata"].as_str(), tt["metadata"].as_str()) {
        (Some(bm), Some(tm)) if bm == tm => Some(kiln_cbt::ThinParams {
            metadata: kiln_cbt::allowed_path(&s.cbt.roots, std::path::Path::new(tm))
                .map_err(K8sError::forbidden)?,
            base_id: bt["device_id"].as_u64().unwrap_or_default(),
            target_id: tt["device_id"].as_u64().unwrap_or_default(),
        }),
        _ => None,
    };
    let info = |r: &Resource| -> Option<kiln_cbt::SourceInfo> {
        Some(kiln_cbt::SourceInfo {
            format: r.body["kiln"]["format"].as_str()?.to_string(),
            size: r.body["kiln"]["size"].as_u64()?,
        })
    };
    let params = kiln_cbt::CbtParams {
        base: path_of(&base)?,
        target: path_of(&target)?,
        block_size,
        thin,
        base_info: info(&base),
        target_info: info(&target),
    };
    let uid = uuid::Uuid::new_v4().to_string();
    let pv = serde_json::to_value(&params).map_err(K8sError::internal)?;
    let job = match s
        .engine
        .submit(kiln_cbt::KIND, &uid, &pv, None, false)
        .map_err(K8sError::internal)?
    {
        kiln_store::Submitted::Created(j)
        | kiln_store::Submitted::Joined(j)
        | kiln_store::Submitted::PreviouslyFailed(j) => j,
    };
    let kiln = json!({"job": job.id, "target_uid": target.uid, "block_size": block_size});
    let r = s
        .engine
        .db()
        .create_resource(DELTA, &ns, &name, &uid, &stored(&body, kiln));
    let r = match r.map_err(store)? {
        Some(r) => r,
        None => {
            let _ = s.engine.cancel(&job.id).await;
            return Err(K8sError::status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("volumesnapshotdeltas.{GROUP} \"{name}\" already exists"),
            ));
        }
    };
    tracing::info!(namespace = %ns, name = %name, job.id = %job.id, "volume snapshot delta created");
    Ok((
        StatusCode::CREATED,
        [("x-kiln-job-id", job.id.to_string())],
        Json(delta_json(&s, &r).0),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct DeltaQuery {
    fetchcbd: Option<String>,
    limit: Option<usize>,
    offset: Option<u64>,
    #[serde(rename = "continue")]
    cont: Option<String>,
}

pub async fn get_delta(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<DeltaQuery>,
) -> Result<Json<Value>, ApiError> {
    let r = s
        .engine
        .db()
        .get_resource(DELTA, &ns, &name)
        .map_err(store)?
        .ok_or_else(|| K8sError::not_found(DELTA, &name))?;
    let (mut v, result) = delta_json(&s, &r);
    if !matches!(q.fetchcbd.as_deref(), Some("true" | "1" | "")) {
        return Ok(Json(v));
    }
    let Some(res) = result else {
        // Not computed (yet): the conditions say why; no entries.
        return Ok(Json(v));
    };
    let limit = q
        .limit
        .filter(|l| *l > 0)
        .unwrap_or(DEFAULT_LIMIT)
        .min(MAX_LIMIT);
    let offset = match &q.cont {
        Some(c) => {
            let raw = hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let (uid, off) = raw
                .split_once(':')
                .ok_or_else(|| K8sError::bad("invalid continue token"))?;
            if uid != r.uid {
                return Err(K8sError::bad("the continue token belongs to another delta"));
            }
            off.parse()
                .map_err(|_| K8sError::bad("invalid continue token"))?
        }
        None => q.offset.unwrap_or(0),
    };
    let path = s.cbt_jobs.cas().path(&res.runs);
    let blocks = tokio::task::spawn_blocking(move || {
        RunsFile::open(&path).and_then(|f| f.page(offset, limit))
    })
    .await
    .map_err(K8sError::internal)?
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            K8sError::status(
                StatusCode::GONE,
                "Gone",
                "the delta's block list was evicted from the cache; delete and create the delta again",
            )
        } else {
            K8sError::internal(e)
        }
    })?;
    let target_uid = r.body["kiln"]["target_uid"].as_str().unwrap_or_default();
    let issued = now_unix();
    let expires = issued + s.cbt.token_ttl_secs;
    let issuance = rfc3339_ms(issued * 1000);
    let ttl = crate::jobs::go_duration(s.cbt.token_ttl_secs * 1000);
    let entries: Vec<Value> = blocks
        .iter()
        .map(|b| {
            let token = s.cbt.key.issue(&DataToken {
                snapshot: format!("{target_uid}/{}", res.block_size),
                block: *b,
                expires,
            });
            json!({"offset": b, "blockSizeBytes": res.block_size,
                   "dataToken": {"token": token, "issuanceTime": issuance, "ttl": ttl}})
        })
        .collect();
    let next = offset + blocks.len() as u64;
    if next < res.changed_blocks && !blocks.is_empty() {
        v["metadata"]["continue"] = json!(hex::encode(format!("{}:{next}", r.uid)));
    }
    v["status"]["changedBlockDeltas"] = json!(entries);
    v["status"]["offset"] = json!(offset);
    v["status"]["limit"] = json!(limit);
    Ok(Json(v))
}

pub async fn delete_delta(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let r = s
        .engine
        .db()
        .delete_resource(DELTA, &ns, &name)
        .map_err(store)?
        .ok_or_else(|| K8sError::not_found(DELTA, &name))?;
    let (v, _) = delta_json(&s, &r);
    if let Some(id) = r.body["kiln"]["job"].as_str().and_then(|j| j.parse().ok()) {
        // Stop a computation nobody will read.
        let _ = s.engine.cancel(&id).await;
    }
    Ok(Json(v))
}

/// `GET .../namespaces/{ns}/volumesnapshots/{name}/blocks/{token}`: the
/// block's bytes from the snapshot the token was issued for, with its
/// SHA-256 in `x-kiln-checksum-sha256`.
pub async fn block(
    State(s): State<AppState>,
    Path((ns, name, token)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let t = s.cbt.key.verify(&token, now_unix()).map_err(|e| match e {
        TokenError::Expired => K8sError::forbidden("the data token has expired"),
        e => K8sError::status(StatusCode::UNAUTHORIZED, "Unauthorized", e.to_string()),
    })?;
    let snap = snapshot(&s, &ns, &name)?;
    let (uid, bs) = t
        .snapshot
        .rsplit_once('/')
        .and_then(|(u, b)| Some((u, b.parse::<u64>().ok()?)))
        .ok_or_else(|| {
            K8sError::status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "invalid data token",
            )
        })?;
    if uid != snap.uid {
        return Err(K8sError::forbidden(
            "the data token was issued for another snapshot",
        ));
    }
    let size = snap.body["kiln"]["size"].as_u64().unwrap_or(0);
    let start = t.block.saturating_mul(bs);
    if start >= size {
        return Err(K8sError::invalid(
            "the block is past the end of the snapshot",
        ));
    }
    let len = bs.min(size - start);
    let path = kiln_cbt::allowed_path(
        &s.cbt.roots,
        std::path::Path::new(snap.body["kiln"]["path"].as_str().unwrap_or_default()),
    )
    .map_err(K8sError::forbidden)?;
    let format = snap.body["kiln"]["format"]
        .as_str()
        .unwrap_or("raw")
        .to_string();
    let scratch = s.cbt_jobs.cas().temp_path();
    let data = kiln_cbt::read_block(&path, &format, t.block, bs, len, &scratch)
        .await
        .map_err(K8sError::internal)?;
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    let mut resp = Body::from(data).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&sum) {
        h.insert("x-kiln-checksum-sha256", v);
    }
    h.insert("x-kiln-block-offset", HeaderValue::from(start));
    Ok(resp)
}
