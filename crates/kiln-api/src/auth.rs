//! Authentication and authorization at the HTTP edge. One middleware wraps
//! every route: it looks up the route's [`Access`] in a single table (so a
//! route nobody classified needs `admin`: default deny), turns the TLS peer
//! or the request headers into a [`kiln_auth::Identity`], checks the scope,
//! and writes the audit record of every mutating request.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kiln_auth::{Denied, HmacParams, Identity, Scope, BODY_HEADER, SCHEME};
use sha2::{Digest as _, Sha256};

use crate::audit::AuditRecord;
use crate::{ApiError, AppState};

/// What the TLS layer learnt about the connection, put on each of its
/// requests: the identity in the client certificate rustls has verified.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub cert_subject: Option<Arc<str>>,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    /// Any identity, whatever its scopes.
    Authenticated,
    Need(Scope),
}

/// Signed bodies up to this size are buffered and checked before the handler
/// runs; larger ones stream and must declare `X-Kiln-Content-SHA256`.
const BUFFERED_BODY_MAX: usize = 1 << 20;

/// Every route's access, in one place. Unknown routes need `admin`.
pub fn access(method: &Method, route: Option<&str>, metrics_auth: bool) -> Access {
    use Access::*;
    let Some(route) = route else {
        // Unrouted paths answer 404, but only to a caller with credentials.
        return Need(Scope::Read);
    };
    match (method.as_str(), route) {
        (_, "/health" | "/healthz" | "/livez" | "/readyz" | "/api/v1/hello" | "/octhc") => Open,
        (_, "/metrics") if !metrics_auth => Open,
        ("GET", "/api/v1/whoami") => Authenticated,
        ("GET" | "HEAD", "/metrics") => Need(Scope::Read),
        (
            "GET" | "HEAD",
            "/api/v1/status/{job_id}"
            | "/api/v1/download/{job_id}"
            | "/api/v1/build/{sha256}"
            | "/api/v1/signing-cert"
            | "/api/v1/jobs"
            | "/api/v1/jobs/{job_id}"
            | "/api/v1/jobs/{job_id}/logs"
            | "/api/v1/cache"
            | "/api/v1/images"
            | "/api/v1/dkms/{job_id}/deb"
            | "/{key}"
            | "/{key}/{number}/logs",
        ) => Need(Scope::Read),
        ("GET" | "HEAD", r)
            if matches!(r, "/version" | "/api" | "/api/v1")
                || r.starts_with("/apis")
                || r.starts_with("/openapi/") =>
        {
            Need(Scope::Read)
        }
        ("POST" | "DELETE", r)
            if r.starts_with("/apis/cbt.storage.k8s.io/v1alpha1/namespaces/") =>
        {
            Need(Scope::Write)
        }
        ("POST", "/api/v1/build" | "/api/v1/dkms" | "/api/v1/provision" | "/")
        | ("DELETE", "/{key}" | "/{key}/{number}")
        | ("DELETE", "/api/v1/jobs/{job_id}" | "/api/v1/cancel/{job_id}") => Need(Scope::Write),
        _ => Need(Scope::Admin),
    }
}

fn denied(d: Denied) -> ApiError {
    match d {
        Denied::Busy => ApiError::too_many(d.to_string()),
        d => ApiError::unauthorized(d.to_string()),
    }
}

/// The body hash did not match `X-Kiln-Content-SHA256`: surfaces as an error
/// of the body stream, which [`ApiError::from_body`] maps to 401.
#[derive(Debug, thiserror::Error)]
#[error("the body does not match the signed X-Kiln-Content-SHA256")]
pub struct BodyMismatch;

/// Pass the body through while hashing it; fail the stream at its end if the
/// digest differs from the signed one, before the handler can act on it.
fn verified_stream(body: Body, want: [u8; 32]) -> Body {
    let state = (body.into_data_stream(), Some(Sha256::new()));
    let stream = futures::stream::unfold(state, move |(mut inner, mut hasher)| async move {
        let h = hasher.as_mut()?;
        let item: Result<Bytes, axum::BoxError> = match inner.next().await {
            Some(Ok(b)) => {
                h.update(&b);
                return Some((Ok(b), (inner, hasher)));
            }
            Some(Err(e)) => Err(e.into()),
            None => {
                let got: [u8; 32] = hasher.take()?.finalize().into();
                if got == want {
                    return None;
                }
                Err(BodyMismatch.into())
            }
        };
        Some((item, (inner, None)))
    });
    Body::from_stream(stream)
}

pub async fn middleware(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let need = access(req.method(), route.as_deref(), s.metrics_auth);
    let method = req.method().clone();
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let path = req.uri().path().to_string();
    let audit = |id: Option<&Identity>, resp: &Response, job: Option<String>| {
        if mutating {
            s.audit.record(AuditRecord {
                identity: id.map(|i| i.name.clone()),
                auth: id.map(|i| i.method.as_str()),
                method: method.to_string(),
                path: path.clone(),
                route: route.clone(),
                status: resp.status().as_u16(),
                job_id: job,
            });
        }
    };
    let (req, id) = if !s.auth.enabled() || need == Access::Open {
        (req, Identity::anonymous())
    } else {
        match identify(&s, req).await {
            Ok(x) => x,
            Err(e) => {
                let resp = e.into_response();
                audit(None, &resp, None);
                return resp;
            }
        }
    };
    if let Access::Need(scope) = need {
        if !id.scopes.contains(scope) {
            let resp = ApiError::forbidden(format!(
                "{:?} may not do this: it needs the {scope} scope",
                id.name
            ))
            .into_response();
            audit(Some(&id), &resp, None);
            return resp;
        }
    }
    let (mut parts, body) = req.into_parts();
    let path_job = if mutating {
        RawPathParams::from_request_parts(&mut parts, &())
            .await
            .ok()
            .and_then(|p| {
                p.iter()
                    .find(|(k, _)| *k == "job_id")
                    .map(|(_, v)| v.to_string())
            })
    } else {
        None
    };
    parts.extensions.insert(id.clone());
    let resp = next.run(Request::from_parts(parts, body)).await;
    let job = resp
        .headers()
        .get("x-kiln-job-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(path_job);
    audit(Some(&id), &resp, job);
    resp
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The caller's identity from the verified client certificate, the
/// `Authorization` header, or `X-API-Token`, in that order.
async fn identify(s: &AppState, req: Request) -> Result<(Request, Identity), ApiError> {
    if s.auth.config().client_certs {
        if let Some(name) = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.cert_subject.clone())
        {
            let id = s.auth.certificate(&name);
            return Ok((req, id));
        }
    }
    if let Some(a) = header(&req, header::AUTHORIZATION.as_str()) {
        let (scheme, rest) = a.split_once(' ').unwrap_or((a, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let id = s.auth.bearer(rest.trim()).map_err(denied)?;
            return Ok((req, id));
        }
        if scheme == SCHEME {
            let params = rest.to_string();
            return signed(s, req, &params).await;
        }
        return Err(ApiError::unauthorized(format!(
            "unsupported Authorization scheme {scheme:?}: use Bearer or {SCHEME}"
        )));
    }
    if let Some(t) = header(&req, "x-api-token") {
        let id = s.auth.bearer(t.trim()).map_err(denied)?;
        return Ok((req, id));
    }
    Err(denied(Denied::Missing))
}

/// Verify a KILN-HMAC-SHA256 request. Bodies of known size up to 1 MiB are
/// buffered and hashed here; larger or chunked bodies must declare their
/// digest in `X-Kiln-Content-SHA256` and are checked as they stream (the
/// stream fails at its end on a mismatch, so nothing is committed).
async fn signed(s: &AppState, req: Request, params: &str) -> Result<(Request, Identity), ApiError> {
    let p = HmacParams::parse(params).map_err(denied)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let method = req.method().as_str().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|x| x.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let declared = match header(&req, BODY_HEADER) {
        Some(h) => {
            let mut d = [0u8; 32];
            hex::decode_to_slice(h.trim(), &mut d).map_err(|_| {
                denied(Denied::Malformed(
                    "X-Kiln-Content-SHA256 must be 64 hex digits",
                ))
            })?;
            Some(d)
        }
        None => None,
    };
    let small = header(&req, header::CONTENT_LENGTH.as_str())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n <= BUFFERED_BODY_MAX)
        || matches!(*req.method(), Method::GET | Method::HEAD | Method::DELETE)
            && !req.headers().contains_key(header::TRANSFER_ENCODING);
    let (parts, body) = req.into_parts();
    if small {
        let bytes = axum::body::to_bytes(body, BUFFERED_BODY_MAX)
            .await
            .map_err(|_| {
                ApiError::payload_too_large(format!(
                    "a signed body over {BUFFERED_BODY_MAX} bytes must declare its digest in X-Kiln-Content-SHA256"
                ))
            })?;
        let got: [u8; 32] = Sha256::digest(&bytes).into();
        let id = s
            .auth
            .hmac(&p, &method, &pq, &hex::encode(got), now)
            .map_err(denied)?;
        if declared.is_some_and(|d| d != got) {
            return Err(denied(Denied::BodyMismatch));
        }
        return Ok((Request::from_parts(parts, Body::from(bytes)), id));
    }
    let Some(d) = declared else {
        return Err(ApiError::payload_too_large(format!(
            "a signed body of unknown size or over {BUFFERED_BODY_MAX} bytes must declare its digest in X-Kiln-Content-SHA256"
        )));
    };
    let id = s
        .auth
        .hmac(&p, &method, &pq, &hex::encode(d), now)
        .map_err(denied)?;
    Ok((Request::from_parts(parts, verified_stream(body, d)), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_classified() {
        let get = Method::GET;
        assert_eq!(access(&get, Some("/healthz"), true), Access::Open);
        assert_eq!(access(&get, Some("/metrics"), false), Access::Open);
        assert_eq!(
            access(&get, Some("/metrics"), true),
            Access::Need(Scope::Read)
        );
        assert_eq!(
            access(&get, Some("/api/v1/status/{job_id}"), false),
            Access::Need(Scope::Read)
        );
        assert_eq!(
            access(&Method::POST, Some("/api/v1/build"), false),
            Access::Need(Scope::Write)
        );
        assert_eq!(
            access(&Method::DELETE, Some("/api/v1/cancel/{job_id}"), false),
            Access::Need(Scope::Write)
        );
        assert_eq!(
            access(&Method::DELETE, Some("/api/v1/cache"), false),
            Access::Need(Scope::Admin)
        );
        assert_eq!(
            access(
                &get,
                Some(
                    "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshotdeltas/{name}"
                ),
                false
            ),
            Access::Need(Scope::Read)
        );
        assert_eq!(
            access(
                &Method::POST,
                Some("/apis/cbt.storage.k8s.io/v1alpha1/namespaces/{ns}/volumesnapshots"),
                false
            ),
            Access::Need(Scope::Write)
        );
        assert_eq!(
            access(&get, Some("/openapi/v3"), false),
            Access::Need(Scope::Read)
        );
        assert_eq!(
            access(&get, Some("/version"), false),
            Access::Need(Scope::Read)
        );
        // A route nobody classified is admin-only.
        assert_eq!(
            access(&Method::POST, Some("/api/v1/new-thing"), false),
            Access::Need(Scope::Admin)
        );
        assert_eq!(access(&get, None, false), Access::Need(Scope::Read));
    }
}
