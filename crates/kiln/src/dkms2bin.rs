//! `kiln dkms2bin`: the command around kiln-dkms. Resolves every `--dkms`
//! input and every kernel once, runs the package × kernel builds in
//! parallel (`-j`), shows progress (bars on a terminal, plain lines
//! otherwise), keeps going past failures, indexes the out-dir as an apt
//! repository and ends with a summary table. Exit status 1 if anything failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_dkms::{Env, KernelTree, Outcome, SourcePkg};
use kiln_engine::JobLog;
use tokio_util::sync::CancellationToken;

use crate::config::Dkms2binArgs;

#[derive(Debug)]
enum Row {
    Built(PathBuf, Vec<String>),
    Skipped(String),
    Failed { error: String, log: PathBuf },
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub async fn run(a: Dkms2binArgs) -> Result<()> {
    let kvers = if a.kver.is_empty() {
        vec![std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("reading the running kernel version")?
            .trim()
            .to_string()]
    } else {
        a.kver.clone()
    };
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating --out-dir {}", a.out_dir.display()))?;
    let out_dir = std::fs::canonicalize(&a.out_dir)?;
    let logs = out_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&a.work_dir)?;
    let work = tempfile::Builder::new()
        .prefix("kiln-dkms2bin-")
        .tempdir_in(&a.work_dir)
        .with_context(|| format!("creating a work root in {}", a.work_dir.display()))?
        .keep();
    let cancel = CancellationToken::new();
    {
        let c = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping builds");
                c.cancel();
            }
        });
    }
    let tty = std::io::stderr().is_terminal();
    let result = if a.client.server.is_some() {
        remote(&a, &kvers, &out_dir, &work).await
    } else {
        run_in(&a, &kvers, &out_dir, &logs, &work, &cancel, tty).await
    };
    if a.do_not_remove {
        eprintln!("work root kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

async fn run_in(
    a: &Dkms2binArgs,
    kvers: &[String],
    out_dir: &std::path::Path,
    logs: &std::path::Path,
    work: &std::path::Path,
    cancel: &CancellationToken,
    tty: bool,
) -> Result<()> {
    let sandbox = kiln_kmod::Sandbox::detect().await;
    eprintln!("sandbox: {}", sandbox.describe());
    let signing = match (&a.sign_key, &a.sign_cert) {
        (Some(k), Some(c)) => Some(
            kiln_kmod::Signing::load(k, c, work)
                .await
                .map_err(anyhow::Error::msg)
                .context("loading the signing key")?,
        ),
        _ => None,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let jobs = a.jobs.unwrap_or(cores).max(1);
    let (arch, deb_arch) = Env::host_arch();
    let env = Arc::new(Env {
        sandbox,
        signing,
        make_jobs: cores,
        arch,
        deb_arch,
        maintainer: a.maintainer.clone(),
        timeout: Duration::from_secs(a.timeout.max(1)),
    });
    let prep_log = Arc::new(JobLog::open(&logs.join("prepare.log")));
    let mut rows: Vec<(String, String, Row)> = Vec::new();

    // Inputs and kernels, each once.
    let mut sources: Vec<SourcePkg> = Vec::new();
    for d in &a.dkms {
        eprintln!("preparing {d}");
        match kiln_dkms::prepare_source(d, work, &prep_log, cancel).await {
            Ok(s) => sources.push(s),
            Err(e) => {
                for k in kvers {
                    rows.push((
                        d.clone(),
                        k.clone(),
                        Row::Failed {
                            error: e.to_string(),
                            log: prep_log.path().to_path_buf(),
                        },
                    ));
                }
            }
        }
    }
    let mut kernels: Vec<KernelTree> = Vec::new();
    for k in kvers {
        eprintln!("preparing headers for {k}");
        match kiln_dkms::prepare_kernel(k, a.headers.as_deref(), work, &prep_log, cancel).await {
            Ok(t) => {
                eprintln!("  {k}: {} ({})", t.dir.display(), t.origin);
                kernels.push(t)
            }
            Err(e) => {
                for s in &sources {
                    rows.push((
                        s.label.clone(),
                        k.clone(),
                        Row::Failed {
                            error: e.to_string(),
                            log: prep_log.path().to_path_buf(),
                        },
                    ));
                }
            }
        }
    }

    // The builds.
    let mp = MultiProgress::new();
    if !tty {
        mp.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} [{elapsed}]")
        .expect("template");
    let sem = Arc::new(tokio::sync::Semaphore::new(jobs));
    let mut set = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for s in &sources {
        for t in &kernels {
            let (s, t, env, sem, cancel) = (
                s.clone(),
                t.clone(),
                env.clone(),
                sem.clone(),
                cancel.clone(),
            );
            let name = format!("{} / {}", s.label, t.kver);
            let log_path = logs.join(format!("{}_{}.log", safe(&s.label), safe(&t.kver)));
            let _ = std::fs::remove_file(&log_path);
            let bwork = work
                .join("build")
                .join(format!("{}_{}", safe(&s.label), safe(&t.kver)));
            let out_dir = out_dir.to_path_buf();
            let pb = mp.add(ProgressBar::new_spinner().with_style(style.clone()));
            pb.set_prefix(name.clone());
            pb.set_message("queued");
            pb.enable_steady_tick(Duration::from_millis(120));
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                pb.set_message("building");
                if !tty {
                    eprintln!("building {name}");
                }
                let log = Arc::new(JobLog::open(&log_path));
                let r = kiln_dkms::build(&s, &t, &env, &bwork, &out_dir, log, &cancel).await;
                let row = match r {
                    Ok(Outcome::Built { deb, modules }) => Row::Built(deb, modules),
                    Ok(Outcome::Skipped(why)) => Row::Skipped(why),
                    Err(e) => Row::Failed {
                        error: e.to_string(),
                        log: log_path.clone(),
                    },
                };
                let line = match &row {
                    Row::Built(deb, _) => format!("built {}", deb.display()),
                    Row::Skipped(why) => format!("skipped: {why}"),
                    Row::Failed { .. } => "FAILED".to_string(),
                };
                pb.finish_with_message(line.clone());
                if !tty {
                    eprintln!("{name}: {line}");
                }
                (s.label.clone(), t.kver.clone(), row)
            });
        }
    }
    while let Some(r) = set.join_next().await {
        rows.push(r.context("a build task panicked")?);
    }
    mp.clear().ok();
    finish(rows, out_dir, t0).await
}

/// Warnings with log tails, the apt index, the summary table, the exit status.
async fn finish(
    mut rows: Vec<(String, String, Row)>,
    out_dir: &std::path::Path,
    t0: Instant,
) -> Result<()> {
    // Warnings with log tails, then the index and the summary.
    for (pkg, k, row) in &rows {
        if let Row::Failed { error, log } = row {
            eprintln!(
                "\nwarning: {pkg} for {k} failed: {error}\n--- last lines of {} ---\n{}",
                log.display(),
                JobLog::tail(log, 15)
            );
        }
    }
    let n = kiln_dkms::write_apt_index(out_dir)
        .await
        .context("writing the apt index")?;
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(7).max(7);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(6).max(6);
    println!(
        "\n{:w0$}  {:w1$}  {:8}  detail",
        "package", "kernel", "result"
    );
    let mut failed = 0;
    for (pkg, k, row) in &rows {
        let (res, detail) = match row {
            Row::Built(deb, mods) => (
                "built",
                format!(
                    "{} ({})",
                    deb.file_name().unwrap_or_default().to_string_lossy(),
                    mods.join(" ")
                ),
            ),
            Row::Skipped(why) => ("skipped", why.clone()),
            Row::Failed { log, .. } => {
                failed += 1;
                ("failed", format!("log: {}", log.display()))
            }
        };
        println!("{pkg:w0$}  {k:w1$}  {res:8}  {detail}");
    }
    println!(
        "\n{n} package(s) indexed in {} (deb [trusted=yes] file:{} ./) in {:.1}s",
        out_dir.display(),
        out_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} build(s) failed");
    }
    Ok(())
}

/// `--server`: upload each package × kernel to a kiln server's
/// `POST /api/v1/dkms`, wait, and download the `.deb` files into the out-dir.
async fn remote(
    a: &Dkms2binArgs,
    kvers: &[String],
    out_dir: &std::path::Path,
    work: &std::path::Path,
) -> Result<()> {
    use crate::client::{file_sha256, pack_headers, poll, save, server_error, Api};
    let api = Api::new(&a.client)?;
    api.check_scope("write").await?;
    let t0 = Instant::now();
    // Headers, one tar.gz per kernel.
    let mut headers = Vec::new();
    for k in kvers {
        let h = match &a.headers {
            Some(h) if h.is_file() => h.clone(),
            given => {
                let dir = match given {
                    Some(d) => d.clone(),
                    None => [
                        format!("/lib/modules/{k}/build"),
                        format!("/usr/src/linux-headers-{k}"),
                    ]
                    .into_iter()
                    .map(PathBuf::from)
                    .find(|p| p.join("Makefile").is_file())
                    .with_context(|| {
                        format!("no headers for {k} on this host: pass --headers DIR|TAR")
                    })?,
                };
                let t = work.join(format!("headers-{}.tar.gz", safe(k)));
                eprintln!("packing headers for {k} from {}", dir.display());
                pack_headers(&dir, k, &t).await?;
                t
            }
        };
        headers.push((k.clone(), h));
    }
    // Packages: .deb files as they are, directories as tar.gz, names via apt.
    let mut packages = Vec::new();
    for d in &a.dkms {
        let p = std::path::Path::new(d);
        let file = if p.is_dir() {
            let t = work.join(format!("src-{}.tar.gz", safe(d)));
            let out = tokio::process::Command::new("tar")
                .arg("-C")
                .arg(p)
                .args(["-czf"])
                .arg(&t)
                .arg(".")
                .output()
                .await?;
            if !out.status.success() {
                bail!("packing {d}: {}", String::from_utf8_lossy(&out.stderr));
            }
            t
        } else if p.is_file() {
            p.to_path_buf()
        } else {
            let dl = work.join("debs").join(safe(d));
            std::fs::create_dir_all(&dl)?;
            let out = tokio::process::Command::new("apt-get")
                .args(["download", "-q", d])
                .current_dir(&dl)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "{d}: not a file or directory, and apt-get download failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::fs::read_dir(&dl)?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .with_context(|| format!("apt-get download {d} left no .deb"))?
        };
        packages.push((d.clone(), file));
    }
    // Submit everything (the server runs them in parallel), then collect.
    let mut rows = Vec::new();
    let mut waiting = Vec::new();
    for (label, pkg) in &packages {
        for (k, h) in &headers {
            let body = work.join(format!("form-{}-{}.bin", safe(label), safe(k)));
            let boundary = format!("kiln-{}", uuid::Uuid::new_v4().simple());
            write_form(&body, &boundary, &[("package", pkg), ("headers", h)])?;
            let sha = if api.signs() {
                Some(file_sha256(&body).await?)
            } else {
                None
            };
            let size = std::fs::metadata(&body)?.len();
            let f = tokio::fs::File::open(&body).await?;
            let resp = api
                .request(
                    reqwest::Method::POST,
                    "/api/v1/dkms",
                    &[("kernel_version", k.as_str())],
                    sha,
                )?
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .header("content-length", size)
                .body(reqwest::Body::wrap_stream(
                    tokio_util::io::ReaderStream::new(f),
                ))
                .send()
                .await
                .with_context(|| format!("uploading {label} for {k} to {}", api.server()))?;
            match resp.status().as_u16() {
                200 => {
                    let out = out_dir.join(
                        attachment_name(&resp).unwrap_or_else(|| format!("{}.deb", safe(label))),
                    );
                    save(resp, &out).await?;
                    eprintln!("{label} / {k}: cache hit");
                    rows.push((
                        label.clone(),
                        k.clone(),
                        Row::Built(out, vec!["cache hit".into()]),
                    ));
                }
                202 => {
                    let v: serde_json::Value = resp.json().await?;
                    let id = v["job_id"]
                        .as_str()
                        .context("no job_id in the answer")?
                        .to_string();
                    eprintln!("{label} / {k}: job {id}");
                    waiting.push((label.clone(), k.clone(), id));
                }
                _ => {
                    let e = server_error(resp).await;
                    rows.push((
                        label.clone(),
                        k.clone(),
                        Row::Failed {
                            error: e.to_string(),
                            log: PathBuf::from("(server)"),
                        },
                    ));
                }
            }
        }
    }
    for (label, k, id) in waiting {
        let v = poll(&api, &id, |_| {}).await?;
        let row = match v["status"].as_str() {
            Some("completed") if v["result"]["skipped"].is_string() => Row::Skipped(
                v["result"]["skipped"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            Some("completed") => {
                let resp = api
                    .get(&format!("/api/v1/dkms/{id}/deb"), &[])?
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    return Err(server_error(resp).await);
                }
                let name = v["result"]["file_name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{id}.deb"));
                let out = out_dir.join(safe(&name));
                save(resp, &out).await?;
                let mods = v["result"]["modules"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|m| m.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                Row::Built(out, mods)
            }
            other => Row::Failed {
                error: format!(
                    "job {id} {}: {}",
                    other.unwrap_or("?"),
                    v["error"].as_str().unwrap_or("")
                ),
                log: PathBuf::from(format!("kiln logs {id}")),
            },
        };
        rows.push((label, k, row));
    }
    finish(rows, out_dir, t0).await
}

fn attachment_name(resp: &reqwest::Response) -> Option<String> {
    let v = resp.headers().get("content-disposition")?.to_str().ok()?;
    let name = v.split("filename=\"").nth(1)?.split('"').next()?;
    Some(safe(name))
}

/// A multipart/form-data body with file parts, written to `path`.
fn write_form(path: &std::path::Path, boundary: &str, parts: &[(&str, &PathBuf)]) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (name, file) in parts {
        write!(
            w,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
            safe(&file.file_name().unwrap_or_default().to_string_lossy())
        )?;
        std::io::copy(&mut std::fs::File::open(file)?, &mut w)?;
        write!(w, "\r\n")?;
    }
    write!(w, "--{boundary}--\r\n")?;
    w.flush()?;
    Ok(())
}
