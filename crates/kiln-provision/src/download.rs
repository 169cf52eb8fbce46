//! Fetching an image into a temp file of the image cache while hashing it,
//! so the image is read once: resume with Range after a cut connection,
//! retry with backoff a bounded number of times, stop at once on cancel.

use std::time::Duration;

use futures::StreamExt;
use kiln_store::{Cas, TempBlob};
use tokio_util::sync::CancellationToken;

use crate::source::{Source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("downloading {url} failed after {attempts} attempts: {last}")]
    Exhausted {
        url: String,
        attempts: u32,
        last: SourceError,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("writing the download of {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: kiln_store::StoreError,
    },
    #[error("{url}: the server sent {got} bytes but announced {want}")]
    Length { url: String, got: u64, want: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// A finished download, not yet admitted to the cache.
pub struct Downloaded {
    pub blob: TempBlob,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// How many times the transfer was resumed with a Range request.
    pub resumed: u32,
}

/// Download `src` into a new temp blob of `cas`. `progress(done, total)` is
/// called as bytes arrive.
pub async fn fetch(
    src: &Source,
    cas: &Cas,
    attempts: u32,
    cancel: &CancellationToken,
    progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    log: &(dyn Fn(&str) + Send + Sync),
) -> Result<Downloaded, DownloadError> {
    let url = src.display();
    let store_err = |source| DownloadError::Store {
        url: url.clone(),
        source,
    };
    let mut blob = cas.writer().await.map_err(store_err)?;
    let mut validator: Option<String> = None;
    let (mut etag, mut last_modified) = (None, None);
    let mut resumed = 0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let from = blob.size();
        let r = async {
            let body = src.open(from, validator.as_deref()).await?;
            Ok::<_, SourceError>(body)
        };
        let body = tokio::select! {
            r = r => r,
            _ = cancel.cancelled() => return Err(DownloadError::Cancelled),
        };
        let outcome: Result<Option<u64>, SourceError> = match body {
            Err(e) => Err(e),
            Ok(mut body) => {
                if from > 0 && body.start == from {
                    resumed += 1;
                    log(&format!("resuming {url} at byte {from}"));
                } else if from > 0 {
                    // The server ignored the Range (or the object changed).
                    log(&format!(
                        "{url}: the server restarted the transfer from byte {}; starting over",
                        body.start
                    ));
                    blob = cas.writer().await.map_err(store_err)?;
                }
                if validator.is_none() || blob.size() == 0 {
                    validator = body.etag.clone().or(body.last_modified.clone());
                }
                etag = body.etag.take();
                last_modified = body.last_modified.take();
                let total = body.total;
                let mut failed = None;
                loop {
                    let next = tokio::select! {
                        n = body.stream.next() => n,
                        _ = cancel.cancelled() => return Err(DownloadError::Cancelled),
                    };
                    match next {
                        None => break,
                        Some(Ok(chunk)) => {
                            blob.write(&chunk).await.map_err(store_err)?;
                            progress(blob.size(), total);
                        }
                        Some(Err(e)) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(total),
                }
            }
        };
        let last = match outcome {
            Ok(total) => match total {
                Some(want) if blob.size() != want => {
                    // A connection closed early without an error.
                    if blob.size() > want {
                        return Err(DownloadError::Length {
                            url,
                            got: blob.size(),
                            want,
                        });
                    }
                    SourceError::Invalid {
                        url: url.clone(),
                        msg: format!("the transfer ended at byte {} of {want}", blob.size()),
                    }
                }
                _ => {
                    blob.flush().await.map_err(store_err)?;
                    return Ok(Downloaded {
                        blob,
                        etag,
                        last_modified,
                        resumed,
                    });
                }
            },
            Err(e) if !e.retryable() => return Err(e.into()),
            Err(e) => e,
        };
        if attempt >= attempts {
            return Err(DownloadError::Exhausted {
                url,
                attempts: attempt,
                last,
            });
        }
        let wait = backoff(attempt);
        log(&format!(
            "attempt {attempt} of {url} failed ({last}); retrying in {:.1}s",
            wait.as_secs_f64()
        ));
        tracing::warn!(url = %url, attempt, error = %last, "download interrupted; retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return Err(DownloadError::Cancelled),
        }
    }
}

/// 0.5 s, 1 s, 2 s, ... capped at 15 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.saturating_sub(1).min(5)))
        .min(Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(super::backoff(1).as_millis(), 500);
        assert_eq!(super::backoff(2).as_millis(), 1000);
        assert_eq!(super::backoff(3).as_millis(), 2000);
        assert_eq!(super::backoff(30).as_secs(), 15);
    }
}
