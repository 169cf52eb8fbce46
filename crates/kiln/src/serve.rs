//! `kiln serve`: lock the data directory, open the store, start the engine
//! and the HTTP server, stop cleanly on SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_engine::{Engine, EngineConfig, Metrics};
use kiln_kmod::{Kmod, KmodConfig, ModuleSource, Sandbox, Signing};
use kiln_store::{Cas, Db};
use tokio_util::sync::CancellationToken;

use crate::config::{ensure_dir, ServeArgs, SourceChoice};

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},hyper=warn,h2=warn,rustls=warn"))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        b.init();
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let cfg = args.resolve()?;
    init_logging(&cfg.log_level, cfg.log_json);

    ensure_dir(&cfg.cache_dir, "cache dir")?;
    ensure_dir(&cfg.data_dir, "data dir")?;
    let lock_path = cfg.data_dir.join("kiln.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    fs2::FileExt::try_lock_exclusive(&lock).with_context(|| {
        format!(
            "another kiln is using the data dir {} (lock {})",
            cfg.data_dir.display(),
            lock_path.display()
        )
    })?;

    let db = Arc::new(Db::open(&cfg.data_dir.join("kiln.db")).context("opening the job database")?);
    let cas = Cas::open(&cfg.cache_dir).context("opening the cache")?;
    let metrics = Arc::new(Metrics::new());

    let source = match &cfg.source {
        SourceChoice::Dir(p) => {
            if !p.is_dir() {
                tracing::warn!(drbd_dir = %p.display(), "module source directory does not exist; builds will fail until it does (or set --drbd-version)");
            }
            ModuleSource::dir(p.clone())
        }
        SourceChoice::Git { version, repo } => {
            ModuleSource::git(version.clone(), repo.clone(), cfg.data_dir.join("sources"))
                .context("--drbd-version")?
        }
    };
    let signing = match &cfg.signing {
        Some((key, cert)) => Some(
            Signing::load(key, cert, &cfg.data_dir)
                .await
                .map_err(anyhow::Error::msg)
                .context("loading the module signing key")?,
        ),
        None => None,
    };
    if let Some(s) = &signing {
        tracing::info!(fingerprint = %s.fingerprint, "module signing enabled");
    }
    let sandbox = Sandbox::detect().await;
    if sandbox == Sandbox::Bwrap {
        tracing::info!(sandbox = sandbox.describe(), "build sandbox");
    } else {
        tracing::warn!(
            sandbox = sandbox.describe(),
            "build sandbox is weaker than bubblewrap; install bubblewrap for full isolation"
        );
    }
    if cfg.build_network {
        tracing::warn!("builds may use the network (--build-network)");
    }
    let kmod = Arc::new(Kmod::new(
        KmodConfig {
            source: source.clone(),
            spaas_url: cfg.spaas_url.clone(),
            build_network: cfg.build_network,
            sandbox,
            signing,
            limits: kiln_archive::Limits {
                max_bytes: cfg.max_extract_bytes,
                max_entries: cfg.max_extract_entries,
            },
            make_jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            cache_max_bytes: cfg.cache_max_bytes,
        },
        cas,
        db.clone(),
        metrics.clone(),
    ));
    kmod.enforce_cache_cap();
    let engine = Engine::new(
        db,
        EngineConfig {
            concurrency: cfg.concurrency,
            job_timeout: cfg.job_timeout,
            lease: std::time::Duration::from_secs(30),
            work_dir: cfg.data_dir.join("work"),
            log_dir: cfg.data_dir.join("logs"),
            keep_workdir: cfg.keep_tmpdir,
            max_attempts: 3,
        },
        vec![kmod.clone()],
        metrics,
    )?;

    let shutdown = CancellationToken::new();
    let mut workers = engine.start(shutdown.clone())?;
    // Warm the git clone in the background so the first request does not wait.
    if matches!(cfg.source, SourceChoice::Git { .. }) {
        tokio::spawn(async move {
            if let Err(e) = source.identity().await {
                tracing::error!(error = %e, "preparing the module source");
            }
        });
    }

    let app = kiln_api::router(kiln_api::AppState {
        engine: engine.clone(),
        kmod,
        max_body: cfg.max_body,
        version: env!("CARGO_PKG_VERSION"),
    });
    let handle = axum_server::Handle::new();
    {
        let (handle, shutdown) = (handle.clone(), shutdown.clone());
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
            handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
        });
    }
    tracing::info!(
        addr = %cfg.addr,
        tls = cfg.tls.is_some(),
        cache_dir = %cfg.cache_dir.display(),
        data_dir = %cfg.data_dir.display(),
        concurrency = cfg.concurrency,
        version = env!("CARGO_PKG_VERSION"),
        "kiln listening"
    );
    let svc = app.into_make_service();
    match &cfg.tls {
        Some((cert, key)) => {
            let _ = rustls_provider();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "loading TLS certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            axum_server::bind_rustls(cfg.addr, tls)
                .handle(handle)
                .serve(svc)
                .await
        }
        None => axum_server::bind(cfg.addr).handle(handle).serve(svc).await,
    }
    .with_context(|| format!("serving on {}", cfg.addr))?;
    shutdown.cancel();
    while workers.join_next().await.is_some() {}
    drop(lock);
    Ok(())
}

fn rustls_provider() -> bool {
    rustls::crypto::ring::default_provider()
        .install_default()
        .is_ok()
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
