//! App sources: fetched (http(s), where only a 2xx answer counts, or a
//! `data:` URI) into kiln's content-addressed store, so `GET /{build_uuid}`
//! can serve them later, then unpacked safely (tar, tar.gz or zip, through
//! kiln-archive) into the build context; a single top folder is flattened.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use kiln_core::Digest;
use kiln_store::Cas;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("fetching the sources from {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("fetching the sources from {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the sources' data: URI is malformed: {0}")]
    DataUri(String),
    #[error("the sources are larger than {0} bytes")]
    TooLarge(u64),
    #[error("the sources are not a tar, tar.gz or zip archive")]
    Format,
    #[error("unpacking the sources: {0}")]
    Archive(#[from] kiln_archive::ArchiveError),
    #[error("the sources have no Dockerfile at their top (or in their single top folder)")]
    NoDockerfile,
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

/// Fetch `uri` into the store; returns its digest and size.
pub async fn fetch(
    uri: &str,
    client: &reqwest::Client,
    cas: &Cas,
    max: u64,
    cancel: &CancellationToken,
) -> Result<(Digest, u64), SourceError> {
    let mut blob = cas.writer().await?;
    if uri.starts_with("data:") {
        let d =
            data_url::DataUrl::process(uri).map_err(|e| SourceError::DataUri(format!("{e:?}")))?;
        let (body, _) = d
            .decode_to_vec()
            .map_err(|e| SourceError::DataUri(format!("{e:?}")))?;
        if body.len() as u64 > max {
            return Err(SourceError::TooLarge(max));
        }
        blob.write(&body).await?;
        return Ok(blob.commit().await?);
    }
    let http = |source| SourceError::Http {
        url: uri.to_string(),
        source,
    };
    let resp = tokio::select! {
        r = client.get(uri).send() => r.map_err(http)?,
        _ = cancel.cancelled() => return Err(SourceError::Cancelled),
    };
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(SourceError::Status {
            url: uri.to_string(),
            status,
        });
    }
    let mut body = resp.bytes_stream();
    loop {
        let next = tokio::select! {
            n = body.next() => n,
            _ = cancel.cancelled() => return Err(SourceError::Cancelled),
        };
        match next {
            None => break,
            Some(chunk) => {
                blob.write(&chunk.map_err(http)?).await?;
                if blob.size() > max {
                    return Err(SourceError::TooLarge(max));
                }
            }
        }
    }
    Ok(blob.commit().await?)
}

/// Unpack the archive at `archive` into `dest` (which must exist) and
/// return the build context: `dest`, or its single top folder.
pub fn unpack(
    archive: &Path,
    dest: &Path,
    limits: kiln_archive::Limits,
) -> Result<PathBuf, SourceError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceError::Io { op, path, source }
    };
    let mut f = std::fs::File::open(archive).map_err(io("open", archive))?;
    let mut head = [0u8; 512];
    let n = std::io::Read::read(&mut f, &mut head).map_err(io("read", archive))?;
    let head = &head[..n];
    std::io::Seek::rewind(&mut f).map_err(io("read", archive))?;
    if kiln_archive::is_zip(head) {
        kiln_archive::extract_zip(f, dest, limits)?;
    } else if kiln_archive::is_gzip(head) || (n >= 262 && &head[257..262] == b"ustar") {
        kiln_archive::extract_tar(f, dest, limits)?;
    } else {
        return Err(SourceError::Format);
    }
    let entries: Vec<_> = std::fs::read_dir(dest)
        .map_err(io("read", dest))?
        .flatten()
        .collect();
    let ctx = match entries.as_slice() {
        [one] if one.file_type().is_ok_and(|t| t.is_dir()) => one.path(),
        _ => dest.to_path_buf(),
    };
    if !ctx.join("Dockerfile").is_file() {
        return Err(SourceError::NoDockerfile);
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_uris_and_flattening() {
        let d = tempfile::tempdir().unwrap();
        let cas = Cas::open(&d.path().join("cas")).unwrap();
        let src = d.path().join("src/app");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("Dockerfile"), "FROM scratch\n").unwrap();
        let tgz = d.path().join("s.tgz");
        let st = std::process::Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(d.path().join("src"))
            .arg("app")
            .status()
            .unwrap();
        assert!(st.success());
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&tgz).unwrap());
        let uri = format!("data:application/gzip;base64,{b64}");
        let c = reqwest::Client::new();
        let (dg, _) = fetch(&uri, &c, &cas, 1 << 20, &CancellationToken::new())
            .await
            .unwrap();
        let out = d.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let ctx = unpack(&cas.path(&dg), &out, kiln_archive::Limits::default()).unwrap();
        assert_eq!(ctx, out.join("app"), "a single top folder is the context");
        assert!(matches!(
            fetch(&uri, &c, &cas, 10, &CancellationToken::new()).await,
            Err(SourceError::TooLarge(10))
        ));
        let (dg, _) = fetch(
            "data:,not%20an%20archive",
            &c,
            &cas,
            1 << 20,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let out2 = d.path().join("out2");
        std::fs::create_dir_all(&out2).unwrap();
        assert!(matches!(
            unpack(&cas.path(&dg), &out2, kiln_archive::Limits::default()),
            Err(SourceError::Format)
        ));
    }
}
