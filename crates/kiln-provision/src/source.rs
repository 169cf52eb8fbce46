//! Where image bytes come from: plain HTTP(S) through reqwest, or S3/MinIO
//! through `object_store` (signed requests). Both look the same to the
//! downloader: a sidecar digest, a body stream that may start at an offset
//! (Range), and the validators (ETag, Last-Modified) that make resuming and
//! revalidation safe.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use kiln_core::Digest;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{GetOptions, GetRange, ObjectStore};
use url::Url;

/// `MINIO_ENDPOINT`, `MINIO_ACCESS_KEY`, `MINIO_SECRET_KEY`.
#[derive(Clone)]
pub struct S3Settings {
    pub endpoint: Url,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint.as_str())
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{url}: {msg}")]
    Invalid { url: String, msg: String },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: {source}")]
    S3 {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{url}: {msg}")]
    Sidecar { url: String, msg: String },
}

impl SourceError {
    /// Worth another attempt: transport failures, 5xx, 408 and 429.
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            SourceError::Http { source, .. } => !source.is_builder() && !source.is_redirect(),
            SourceError::S3 { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::Precondition { .. }
            ),
            SourceError::Invalid { .. } | SourceError::Sidecar { .. } => false,
        }
    }
}

/// An image's location.
#[derive(Clone)]
pub enum Source {
    Http {
        url: Url,
        client: reqwest::Client,
    },
    S3 {
        store: Arc<AmazonS3>,
        key: object_store::path::Path,
        /// `s3://bucket/key`, for logs and the cache index.
        display: String,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

/// A body being fetched.
pub struct Body {
    /// The offset the stream starts at: the requested one when the server
    /// honoured the Range, else 0.
    pub start: u64,
    /// The whole object's size, when the server said.
    pub total: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub stream: BoxStream<'static, Result<Bytes, SourceError>>,
}

/// The answer to a revalidation.
pub enum Revalidated {
    Unchanged,
    Changed,
}

fn invalid(url: &str, msg: impl Into<String>) -> SourceError {
    SourceError::Invalid {
        url: url.to_string(),
        msg: msg.into(),
    }
}

impl Source {
    /// Parse a request's `image_url`. `s3://bucket/key` and http(s) URLs on
    /// the MinIO endpoint's host are S3 objects (signed requests); other
    /// http(s) URLs are fetched as they are.
    pub fn parse(
        raw: &str,
        s3: Option<&S3Settings>,
        client: &reqwest::Client,
    ) -> Result<Source, SourceError> {
        let url = Url::parse(raw).map_err(|e| invalid(raw, format!("not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                raw,
                "credentials in the URL are refused; use MINIO_ACCESS_KEY/MINIO_SECRET_KEY",
            ));
        }
        let on_minio = |u: &Url| {
            s3.is_some_and(|s| {
                u.host_str() == s.endpoint.host_str()
                    && u.port_or_known_default() == s.endpoint.port_or_known_default()
            })
        };
        match url.scheme() {
            "s3" => {
                let s = s3
                    .ok_or_else(|| invalid(raw, "s3:// URLs need MINIO_ENDPOINT (and its keys)"))?;
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| invalid(raw, "no bucket"))?;
                Source::s3(s, bucket, url.path(), raw)
            }
            "http" | "https" if on_minio(&url) => {
                let s = s3.expect("on_minio implies settings");
                let path = url.path().trim_start_matches('/');
                let (bucket, key) = path
                    .split_once('/')
                    .ok_or_else(|| invalid(raw, "want http(s)://MINIO/bucket/key"))?;
                Source::s3(s, bucket, key, raw)
            }
            "http" | "https" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(invalid(raw, "no host"));
                }
                Ok(Source::Http {
                    url,
                    client: client.clone(),
                })
            }
            other => Err(invalid(
                raw,
                format!("scheme {other:?} is not supported: http, https or s3"),
            )),
        }
    }

    fn s3(s: &S3Settings, bucket: &str, key: &str, raw: &str) -> Result<Source, SourceError> {
        let key = key.trim_start_matches('/');
        if key.is_empty() || key.ends_with('/') {
            return Err(invalid(raw, "no object key"));
        }
        let key = object_store::path::Path::parse(key)
            .map_err(|e| invalid(raw, format!("object key: {e}")))?;
        let store = AmazonS3Builder::new()
            .with_endpoint(s.endpoint.as_str().trim_end_matches('/'))
            .with_allow_http(s.endpoint.scheme() == "http")
            .with_bucket_name(bucket)
            .with_access_key_id(&s.access_key)
            .with_secret_access_key(&s.secret_key)
            .with_region(&s.region)
            .with_virtual_hosted_style_request(false)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .map_err(|e| SourceError::S3 {
                url: raw.to_string(),
                source: e,
            })?;
        Ok(Source::S3 {
            store: Arc::new(store),
            display: format!("s3://{bucket}/{key}"),
            key,
        })
    }

    /// The image's identity for logs and the URL-keyed cache.
    pub fn display(&self) -> String {
        match self {
            Source::Http { url, .. } => url.to_string(),
            Source::S3 { display, .. } => display.clone(),
        }
    }

    /// The `.sha256` sidecar's digest: `None` when there is none (404).
    /// The sidecar holds a hex digest, optionally followed by a file name.
    pub async fn sidecar(&self) -> Result<Option<Digest>, SourceError> {
        let (text, where_) = match self {
            Source::Http { url, client } => {
                let mut u = url.clone();
                u.set_path(&format!("{}.sha256", url.path()));
                let r = client
                    .get(u.clone())
                    .send()
                    .await
                    .map_err(|source| SourceError::Http {
                        url: u.to_string(),
                        source,
                    })?;
                match r.status().as_u16() {
                    404 | 403 | 410 => return Ok(None),
                    s if !(200..300).contains(&s) => {
                        return Err(SourceError::Status {
                            url: u.to_string(),
                            status: s,
                        })
                    }
                    _ => {}
                }
                let b = r.bytes().await.map_err(|source| SourceError::Http {
                    url: u.to_string(),
                    source,
                })?;
                (b, u.to_string())
            }
            Source::S3 {
                store,
                key,
                display,
            } => {
                let k = object_store::path::Path::from(format!("{key}.sha256"));
                let where_ = format!("{display}.sha256");
                match store.get(&k).await {
                    Ok(r) => (
                        r.bytes().await.map_err(|source| SourceError::S3 {
                            url: where_.clone(),
                            source,
                        })?,
                        where_,
                    ),
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(source) => {
                        return Err(SourceError::S3 {
                            url: where_,
                            source,
                        })
                    }
                }
            }
        };
        parse_sidecar(&text)
            .map(Some)
            .map_err(|msg| SourceError::Sidecar { url: where_, msg })
    }

    /// Start fetching at `from`. `validator` (an ETag or Last-Modified seen
    /// earlier) makes a resumed request fall back to the whole object if the
    /// object changed in between.
    pub async fn open(&self, from: u64, validator: Option<&str>) -> Result<Body, SourceError> {
        match self {
            Source::Http { url, client } => {
                let mut req = client.get(url.clone());
                if from > 0 {
                    req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
                    if let Some(v) = validator {
                        req = req.header(reqwest::header::IF_RANGE, v);
                    }
                }
                let r = req.send().await.map_err(|source| SourceError::Http {
                    url: url.to_string(),
                    source,
                })?;
                let status = r.status().as_u16();
                if !(200..300).contains(&status) {
                    return Err(SourceError::Status {
                        url: url.to_string(),
                        status,
                    });
                }
                let header = |n: reqwest::header::HeaderName| {
                    r.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let etag = header(reqwest::header::ETAG);
                let last_modified = header(reqwest::header::LAST_MODIFIED);
                let (start, total) = if status == 206 {
                    let cr = header(reqwest::header::CONTENT_RANGE).unwrap_or_default();
                    parse_content_range(&cr)
                        .ok_or_else(|| invalid(url.as_str(), format!("bad Content-Range {cr:?}")))?
                } else {
                    (0, r.content_length())
                };
                let u = url.to_string();
                let stream = r
                    .bytes_stream()
                    .map_err(move |source| SourceError::Http {
                        url: u.clone(),
                        source,
                    })
                    .boxed();
                Ok(Body {
                    start,
                    total,
                    etag,
                    last_modified,
                    stream,
                })
            }
            Source::S3 {
                store,
                key,
                display,
            } => {
                let opts = GetOptions {
                    range: (from > 0).then_some(GetRange::Offset(from)),
                    if_match: validator.map(str::to_string),
                    ..Default::default()
                };
                let s3err = |source| SourceError::S3 {
                    url: display.clone(),
                    source,
                };
                let r = match store.get_opts(key, opts).await {
                    Ok(r) => r,
                    // The object changed since the first part: start over.
                    Err(object_store::Error::Precondition { .. }) if from > 0 => store
                        .get_opts(key, GetOptions::default())
                        .await
                        .map_err(s3err)?,
                    Err(e) => return Err(s3err(e)),
                };
                let (start, total) = (r.range.start, Some(r.meta.size));
                let etag = r.meta.e_tag.clone();
                let last_modified = Some(r.meta.last_modified.to_rfc2822());
                let d = display.clone();
                let stream = r
                    .into_stream()
                    .map_err(move |source| SourceError::S3 {
                        url: d.clone(),
                        source,
                    })
                    .boxed();
                Ok(Body {
                    start,
                    total,
                    etag,
                    last_modified,
                    stream,
                })
            }
        }
    }

    /// Is the object still what `etag`/`last_modified` described? HTTP asks
    /// with a conditional GET (304 = unchanged); S3 compares a HEAD's ETag.
    pub async fn revalidate(
        &self,
        etag: Option<&str>,
        last_modified: Option<&str>,
    ) -> Result<Revalidated, SourceError> {
        if etag.is_none() && last_modified.is_none() {
            return Ok(Revalidated::Changed);
        }
        match self {
            Source::Http { url, client } => {
                let mut req = client.get(url.clone());
                if let Some(e) = etag {
                    req = req.header(reqwest::header::IF_NONE_MATCH, e);
                }
                if let Some(lm) = last_modified {
                    req = req.header(reqwest::header::IF_MODIFIED_SINCE, lm);
                }
                let r = req.send().await.map_err(|source| SourceError::Http {
                    url: url.to_string(),
                    source,
                })?;
                match r.status().as_u16() {
                    304 => Ok(Revalidated::Unchanged),
                    s if (200..300).contains(&s) => Ok(Revalidated::Changed),
                    s => Err(SourceError::Status {
                        url: url.to_string(),
                        status: s,
                    }),
                }
            }
            Source::S3 {
                store,
                key,
                display,
            } => {
                let m = store.head(key).await.map_err(|source| SourceError::S3 {
                    url: display.clone(),
                    source,
                })?;
                Ok(match (etag, m.e_tag.as_deref()) {
                    (Some(a), Some(b)) if a == b => Revalidated::Unchanged,
                    _ => Revalidated::Changed,
                })
            }
        }
    }
}

/// A `.sha256` file: 64 hex digits, optionally followed by whitespace and a
/// file name (`sha256sum` output).
pub fn parse_sidecar(b: &[u8]) -> Result<Digest, String> {
    let text = std::str::from_utf8(b).map_err(|_| "the checksum file is not text".to_string())?;
    let first = text.split_whitespace().next().unwrap_or("");
    if first.len() != 64 || !first.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "the checksum file does not start with a SHA-256 hex digest (got {:?})",
            first.chars().take(80).collect::<String>()
        ));
    }
    first
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| format!("checksum: {e}"))
}

/// `bytes START-END/TOTAL` → (START, TOTAL); TOTAL may be `*`.
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_sidecar(hex.as_bytes()).unwrap().hex(), hex);
        let line = format!("{}  ubuntu.qcow2\n", hex.to_uppercase());
        assert_eq!(parse_sidecar(line.as_bytes()).unwrap().hex(), hex);
        assert!(parse_sidecar(b"<html>not found</html>").is_err());
        assert!(parse_sidecar(b"").is_err());
        assert!(parse_sidecar(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn urls() {
        let c = reqwest::Client::new();
        let s3 = S3Settings {
            endpoint: Url::parse("http://127.0.0.1:9000").unwrap(),
            access_key: "a".into(),
            secret_key: "b".into(),
            region: "us-east-1".into(),
        };
        assert!(matches!(
            Source::parse("https://images.example/u.qcow2", Some(&s3), &c).unwrap(),
            Source::Http { .. }
        ));
        let s = Source::parse("http://127.0.0.1:9000/images/u/x.qcow2", Some(&s3), &c).unwrap();
        assert_eq!(s.display(), "s3://images/u/x.qcow2");
        let s = Source::parse("s3://images/x.qcow2", Some(&s3), &c).unwrap();
        assert_eq!(s.display(), "s3://images/x.qcow2");
        for bad in [
            "s3://images/",
            "file:///etc/shadow",
            "ftp://h/x",
            "http://u:p@h/x",
            "not a url",
            "http://127.0.0.1:9000/bucketonly",
        ] {
            assert!(Source::parse(bad, Some(&s3), &c).is_err(), "{bad}");
        }
        assert!(Source::parse("s3://images/x.qcow2", None, &c).is_err());
    }
}
