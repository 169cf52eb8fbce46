//! The CLI client: `kiln kmod build` packs the local kernel's build tree,
//! uploads it with a progress bar, waits for the build, and downloads the
//! modules; `kiln status` and `kiln logs` talk to the job API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncWriteExt;

use crate::config::{ClientArgs, KmodBuildArgs, LogsArgs, StatusArgs};

/// A kiln server as the CLI sees it: base URL, TLS trust and client
/// certificate, and the credential every request carries (a bearer token,
/// or a KILN-HMAC-SHA256 signature when a token name is given).
pub(crate) struct Api {
    http: reqwest::Client,
    base: reqwest::Url,
    auth: Credential,
}

enum Credential {
    None,
    Bearer(String),
    Hmac { name: String, secret: String },
}

impl Api {
    pub(crate) fn new(a: &ClientArgs) -> Result<Api> {
        let server = a.server.as_deref().unwrap_or("http://127.0.0.1:2021");
        let base =
            reqwest::Url::parse(server).with_context(|| format!("invalid --server {server:?}"))?;
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls()
            // Loading the system's CA store costs more than a cached
            // request; plain-HTTP servers need none of it.
            .tls_built_in_root_certs(base.scheme() == "https");
        if let Some(ca) = &a.cacert {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading --cacert {}", ca.display()))?;
            for c in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("parsing --cacert {}", ca.display()))?
            {
                b = b.add_root_certificate(c);
            }
        }
        match (&a.cert, &a.key) {
            (Some(c), Some(k)) => {
                let mut pem =
                    std::fs::read(c).with_context(|| format!("reading --cert {}", c.display()))?;
                pem.extend(
                    std::fs::read(k).with_context(|| format!("reading --key {}", k.display()))?,
                );
                b = b.identity(
                    reqwest::Identity::from_pem(&pem)
                        .context("loading the client certificate and key")?,
                );
            }
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        let auth = match (&a.token_name, &a.token) {
            (Some(name), Some(secret)) => Credential::Hmac {
                name: name.clone(),
                secret: secret.clone(),
            },
            (None, Some(t)) => Credential::Bearer(t.clone()),
            (Some(_), None) => bail!("--token-name needs --token (the secret to sign with)"),
            (None, None) => Credential::None,
        };
        Ok(Api {
            http: b.build().context("building the HTTP client")?,
            base,
            auth,
        })
    }

    pub(crate) fn server(&self) -> &str {
        self.base.as_str()
    }

    /// A request for `path?query`, signed over exactly the path and query
    /// that go on the wire. `body_sha256` is the body's hex digest (None: empty).
    pub(crate) fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body_sha256: Option<String>,
    ) -> Result<reqwest::RequestBuilder> {
        let mut url = self.base.join(path).context("building the request URL")?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let pq = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let mut rb = self.http.request(method.clone(), url);
        match &self.auth {
            Credential::None => {}
            Credential::Bearer(t) => rb = rb.bearer_auth(t),
            Credential::Hmac { name, secret } => {
                let body = body_sha256.unwrap_or_else(|| kiln_auth::body_sha256_hex(b""));
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let nonce = uuid::Uuid::new_v4().simple().to_string();
                let h = kiln_auth::sign(
                    name,
                    secret.as_bytes(),
                    now,
                    &nonce,
                    method.as_str(),
                    &pq,
                    &body,
                );
                rb = rb
                    .header(reqwest::header::AUTHORIZATION, h)
                    .header(kiln_auth::BODY_HEADER, body);
            }
        }
        Ok(rb)
    }

    pub(crate) fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder> {
        self.request(reqwest::Method::GET, path, query, None)
    }

    /// Fail fast, before a long upload, when the server would refuse us or
    /// we lack `scope`. Servers without `/api/v1/whoami` are not asked.
    pub(crate) async fn check_scope(&self, scope: &str) -> Result<()> {
        let resp = self
            .get("/api/v1/whoami", &[])?
            .send()
            .await
            .with_context(|| format!("connecting to {}", self.server()))?;
        match resp.status().as_u16() {
            200 => {
                let v: serde_json::Value = resp.json().await?;
                let has = v["scopes"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|s| s == scope));
                if !has {
                    bail!(
                        "the server knows you as {} ({}), which lacks the {scope} scope",
                        v["identity"],
                        v["auth"]
                    );
                }
                Ok(())
            }
            404 => Ok(()),
            _ => Err(server_error(resp).await),
        }
    }

    pub(crate) fn signs(&self) -> bool {
        matches!(self.auth, Credential::Hmac { .. })
    }
}

/// The SHA-256 of a file, for signing an upload before it streams.
pub(crate) async fn file_sha256(path: &Path) -> Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<String> {
        use sha2::Digest as _;
        let mut f = std::fs::File::open(&path)?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await?
}

/// The server's error message from a JSON error body, or the raw text.
pub(crate) async fn server_error(resp: reqwest::Response) -> anyhow::Error {
    let code = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(text);
    anyhow::anyhow!("server answered {code}: {msg}")
}

fn running_kernel() -> Result<String> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the running kernel version")?;
    Ok(r.trim().to_string())
}

/// Directories that make the tree self-contained: the tree itself plus the
/// trees its Makefile includes by absolute path (Debian's `-common`).
fn tree_roots(tree: &Path) -> Result<Vec<PathBuf>> {
    let real = std::fs::canonicalize(tree)
        .with_context(|| format!("kernel build tree {}", tree.display()))?;
    let mut roots = vec![real.clone()];
    if let Ok(mk) = std::fs::read_to_string(real.join("Makefile")) {
        for line in mk.lines() {
            if let Some(p) = line.trim().strip_prefix("include /") {
                let inc = PathBuf::from(format!("/{}", p.trim()));
                if let Some(dir) = inc.parent().filter(|d| d.is_dir()) {
                    let dir = std::fs::canonicalize(dir)?;
                    if !roots.contains(&dir) {
                        roots.push(dir);
                    }
                }
            }
        }
    }
    Ok(roots)
}

pub(crate) async fn pack_headers(headers: &Path, kver: &str, out: &Path) -> Result<()> {
    let roots = tree_roots(headers)?;
    // Name the tree the way the server looks for it first.
    let links = vec![(
        PathBuf::from(format!("lib/modules/{kver}/build")),
        roots[0].clone(),
    )];
    let total: u64 = roots.iter().map(|r| tree_bytes(r)).sum();
    let pb = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("packing   {bar:30} {bytes}/{total_bytes} {msg}")
            .expect("template"),
    );
    let out = out.to_path_buf();
    let pb2 = pb.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f =
            std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        kiln_archive::pack_tree_rooted(f, &roots, &links, |n| pb2.inc(n))
            .context("packing the kernel headers")?;
        Ok(())
    })
    .await??;
    pb.finish_and_clear();
    Ok(())
}

/// Bytes below `root`, following links (as packing does), for the progress bar.
fn tree_bytes(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .follow_links(true)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

pub async fn kmod_build(a: KmodBuildArgs) -> Result<()> {
    let kver = match a.kernel_version {
        Some(k) => k,
        None => running_kernel()?,
    };
    let headers = a
        .headers
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/lib/modules/{kver}/build")));
    let api = Api::new(&a.client)?;
    api.check_scope("write").await?;
    let tmpdir = tempfile_dir()?;
    let tarball = if headers.is_dir() {
        let t = tmpdir.join("headers.tar.gz");
        pack_headers(&headers, &kver, &t).await?;
        t
    } else if headers.is_file() {
        headers.clone()
    } else {
        bail!(
            "no kernel headers at {} (install linux-headers-{kver}, or pass --headers DIR|TAR)",
            headers.display()
        );
    };
    let size = std::fs::metadata(&tarball)?.len();
    let sha = file_sha256(&tarball).await?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("kmod-{kver}.tar.gz")));
    // Bytes the server has built from before need not travel again.
    if !a.force {
        let resp = api
            .get(
                &format!("/api/v1/build/{sha}"),
                &[("kernel_version", kver.as_str())],
            )?
            .send()
            .await
            .with_context(|| format!("asking {} for a cached build", api.server()))?;
        match resp.status().as_u16() {
            200 => {
                let _ = std::fs::remove_dir_all(&tmpdir);
                eprintln!("cache hit (these headers were built before; nothing uploaded)");
                save(resp, &out).await?;
                eprintln!("modules written to {}", out.display());
                return Ok(());
            }
            404 => {}
            _ => return Err(server_error(resp).await),
        }
    }
    let body_sha = api.signs().then(|| sha.clone());

    let pb = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("template"),
    );
    let file = tokio::fs::File::open(&tarball).await?;
    let pb2 = pb.clone();
    let stream = tokio_util::io::ReaderStream::new(file).inspect(move |c| {
        if let Ok(c) = c {
            pb2.inc(c.len() as u64)
        }
    });
    let mut q = vec![("kernel_version", kver.as_str())];
    if a.force {
        q.push(("force", "true"));
    }
    let resp = api
        .request(reqwest::Method::POST, "/api/v1/build", &q, body_sha)?
        .header("content-type", "application/gzip")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("uploading headers to {}", api.server()))?;
    pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&tmpdir);
    match resp.status().as_u16() {
        200 => {
            eprintln!("cache hit");
            save(resp, &out).await?;
        }
        202 => {
            let v: serde_json::Value = resp.json().await?;
            let id = v["job_id"]
                .as_str()
                .context("no job_id in the answer")?
                .to_string();
            eprintln!("job {id}");
            wait(&api, &id).await?;
            let resp = api
                .get(&format!("/api/v1/download/{id}"), &[])?
                .send()
                .await?;
            if !resp.status().is_success() {
                return Err(server_error(resp).await);
            }
            save(resp, &out).await?;
        }
        _ => return Err(server_error(resp).await),
    }
    eprintln!("modules written to {}", out.display());
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("kiln-client-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Poll a job's status until it is terminal; returns its last status
/// document. `on_update` sees every document on the way.
pub(crate) async fn poll(
    api: &Api,
    id: &str,
    mut on_update: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value> {
    let mut delay = Duration::from_millis(25);
    loop {
        let resp = api
            .get(&format!("/api/v1/status/{id}"), &[])?
            .send()
            .await?;
        let code = resp.status().as_u16();
        if code != 200 && code != 202 {
            return Err(server_error(resp).await);
        }
        let v: serde_json::Value = resp.json().await?;
        on_update(&v);
        if code == 200 {
            return Ok(v);
        }
        // Quick builds are seen finished quickly; long ones are not polled hard.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

async fn wait(api: &Api, id: &str) -> Result<()> {
    let pb = ProgressBar::new(100).with_style(
        ProgressStyle::with_template("building  {bar:30} {pos}% {msg} [{elapsed}]")
            .expect("template"),
    );
    let v = poll(api, id, |v| {
        if let Some(p) = v.get("progress") {
            pb.set_position(p["percent"].as_u64().unwrap_or(0));
            pb.set_message(p["stage"].as_str().unwrap_or("").to_string());
        }
    })
    .await?;
    pb.finish_and_clear();
    match v["status"].as_str() {
        Some("completed") => Ok(()),
        st => bail!(
            "job {id} {}: {}\n(full log: kiln logs {id})",
            st.unwrap_or("ended"),
            v["error"].as_str().unwrap_or("no reason given")
        ),
    }
}

pub(crate) async fn save(resp: reqwest::Response, out: &Path) -> Result<()> {
    let tmp = out.with_extension("part");
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        f.write_all(&c?).await?;
    }
    f.sync_all().await?;
    tokio::fs::rename(&tmp, out).await?;
    Ok(())
}

pub async fn status(a: StatusArgs) -> Result<()> {
    let resp = Api::new(&a.client)?
        .get(&format!("/api/v1/status/{}", a.job_id), &[])?
        .send()
        .await?;
    if !matches!(resp.status().as_u16(), 200 | 202) {
        return Err(server_error(resp).await);
    }
    let v: serde_json::Value = resp.json().await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub async fn logs(a: LogsArgs) -> Result<()> {
    let q: &[(&str, &str)] = if a.follow { &[("follow", "true")] } else { &[] };
    let resp = Api::new(&a.client)?
        .get(&format!("/api/v1/jobs/{}/logs", a.job_id), q)?
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(server_error(resp).await);
    }
    let mut s = resp.bytes_stream();
    let mut out = tokio::io::stdout();
    while let Some(c) = s.next().await {
        out.write_all(&c?).await?;
        out.flush().await?;
    }
    Ok(())
}
