//! The one error type of the HTTP edge. Every failure becomes a status code
//! and a JSON body `{"error": "...", "code": "..."}`, or, for the
//! Kubernetes-style API, a `Status` object (`reason`, `message`, `code`) that
//! kubectl understands; internal errors are logged in full and answered with
//! a generic message, never their details.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<serde_json::Value>,
    /// Render as a Kubernetes `Status` with this reason.
    k8s_reason: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
            k8s_reason: None,
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn too_large(limit: u64) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes (--maxbytesbody)"),
        )
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    pub fn too_many(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", m)
    }
    pub fn payload_too_large(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", m)
    }
    /// A failure while reading a request body: a signed body that did not
    /// match its digest is 401, anything else 400.
    pub fn from_body(e: axum::Error) -> ApiError {
        let inner = e.into_inner();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
        while let Some(err) = cur {
            if err.is::<crate::auth::BodyMismatch>() {
                return ApiError::unauthorized(err.to_string());
            }
            cur = err.source();
        }
        ApiError::bad_request(format!("reading the request body: {inner}"))
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, "conflict", m)
    }
    /// Log the cause; answer only that something went wrong.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the kiln log",
        )
    }
    pub fn with(mut self, extra: serde_json::Value) -> ApiError {
        self.extra = Some(extra);
        self
    }
    pub fn unprocessable(code: &'static str, m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, m)
    }
    /// A failure of the Kubernetes-style API, rendered as a `Status`.
    pub(crate) fn k8s(status: StatusCode, reason: &'static str, m: impl Into<String>) -> ApiError {
        let mut e = Self::new(status, "k8s", m);
        e.k8s_reason = Some(reason);
        e
    }
    /// The same error, rendered as a Kubernetes `Status`.
    pub(crate) fn into_k8s(mut self) -> ApiError {
        if self.k8s_reason.is_none() {
            self.k8s_reason = Some(match self.status.as_u16() {
                400 => "BadRequest",
                401 => "Unauthorized",
                403 => "Forbidden",
                404 => "NotFound",
                409 => "AlreadyExists",
                422 => "Invalid",
                _ => "InternalError",
            });
        }
        self
    }
    pub fn status_code(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(reason) = self.k8s_reason {
            let body = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": self.message,
                "reason": reason, "code": self.status.as_u16(),
            });
            return (self.status, Json(body)).into_response();
        }
        let mut body = serde_json::json!({"error": self.message, "code": self.code});
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.extra, body.as_object_mut())
        {
            for (k, v) in extra {
                obj.entry(k).or_insert(v);
            }
        }
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"kiln\", KILN-HMAC-SHA256"),
            );
        }
        resp
    }
}

impl From<kiln_engine::EngineError> for ApiError {
    fn from(e: kiln_engine::EngineError) -> Self {
        match e {
            kiln_engine::EngineError::NotFound(id) => {
                ApiError::not_found(format!("job {id} not found"))
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<kiln_store::StoreError> for ApiError {
    fn from(e: kiln_store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<kiln_kmod::KmodError> for ApiError {
    fn from(e: kiln_kmod::KmodError) -> Self {
        use kiln_kmod::KmodError as K;
        match e {
            K::Archive(a) | K::Trees(kiln_kmod::TreesError::Archive(a)) if a.is_bad_input() => {
                ApiError::bad_request(a.to_string())
            }
            K::Source(s) => {
                tracing::error!(error = %s, "module source unavailable");
                ApiError::unavailable("the module source is unavailable; see the kiln log")
            }
            e => ApiError::internal(e),
        }
    }
}
