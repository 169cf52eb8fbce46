//! The CLI client: `kiln kmod build` packs the local kernel's build tree,
//! uploads it with a progress bar, waits for the build, and downloads the
//! modules; `kiln status` and `kiln logs` talk to the job API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncWriteExt;

use crate::config::{KmodBuildArgs, LogsArgs, StatusArgs};

fn http() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")
}

fn url(server: &str, path: &str) -> String {
    format!("{}{}", server.trim_end_matches('/'), path)
}

/// The server's error message from a JSON error body, or the raw text.
async fn server_error(resp: reqwest::Response) -> anyhow::Error {
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

async fn pack_headers(headers: &Path, kver: &str, out: &Path) -> Result<()> {
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
    let client = http()?;

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
    let mut q = vec![("kernel_version", kver.clone())];
    if a.force {
        q.push(("force", "true".into()));
    }
    let resp = client
        .post(url(&a.client.server, "/api/v1/build"))
        .query(&q)
        .header("content-type", "application/gzip")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("uploading headers to {}", a.client.server))?;
    pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&tmpdir);
    let out = a
        .output
        .unwrap_or_else(|| PathBuf::from(format!("kmod-{kver}.tar.gz")));
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
            wait(&client, &a.client.server, &id).await?;
            let resp = client
                .get(url(&a.client.server, &format!("/api/v1/download/{id}")))
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

async fn wait(client: &reqwest::Client, server: &str, id: &str) -> Result<()> {
    let pb = ProgressBar::new(100).with_style(
        ProgressStyle::with_template("building  {bar:30} {pos}% {msg} [{elapsed}]")
            .expect("template"),
    );
    loop {
        let resp = client
            .get(url(server, &format!("/api/v1/status/{id}")))
            .send()
            .await?;
        let code = resp.status().as_u16();
        if code == 404 {
            return Err(server_error(resp).await);
        }
        let v: serde_json::Value = resp.json().await?;
        if let Some(p) = v.get("progress") {
            pb.set_position(p["percent"].as_u64().unwrap_or(0));
            pb.set_message(p["stage"].as_str().unwrap_or("").to_string());
        }
        match v["status"].as_str() {
            Some("completed") => {
                pb.finish_and_clear();
                return Ok(());
            }
            Some(st @ ("failed" | "cancelled")) => {
                pb.finish_and_clear();
                bail!(
                    "job {id} {st}: {}\n(full log: kiln logs {id})",
                    v["error"].as_str().unwrap_or("no reason given")
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn save(resp: reqwest::Response, out: &Path) -> Result<()> {
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
    let resp = http()?
        .get(url(
            &a.client.server,
            &format!("/api/v1/status/{}", a.job_id),
        ))
        .send()
        .await?;
    if resp.status().as_u16() == 404 {
        return Err(server_error(resp).await);
    }
    let v: serde_json::Value = resp.json().await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub async fn logs(a: LogsArgs) -> Result<()> {
    let mut u = url(&a.client.server, &format!("/api/v1/jobs/{}/logs", a.job_id));
    if a.follow {
        u.push_str("?follow=true");
    }
    let resp = http()?.get(u).send().await?;
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
