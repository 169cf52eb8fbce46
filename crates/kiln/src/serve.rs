//! `kiln serve`: lock the data directory, open the store, start the engine
//! and the HTTP server, stop cleanly on SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_engine::{Engine, EngineConfig, Metrics};
use kiln_kmod::{Kmod, KmodConfig, ModuleSource, Sandbox, Signing};
use kiln_store::{Cas, Db};
use tokio_util::sync::CancellationToken;

use crate::config::{ensure_dir, AuthSettings, ServeArgs, SourceChoice};

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

    // Credentials and certificates first: a bad one stops the start before
    // any job runs.
    let auth = Arc::new(authenticator(&cfg.auth)?);
    let audit = Arc::new(
        kiln_api::Audit::open(&cfg.audit_log)
            .with_context(|| format!("opening the audit log {}", cfg.audit_log.display()))?,
    );
    let tls = match &cfg.tls {
        Some((cert, key)) => {
            let tls = kiln_api::Tls::load(kiln_api::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: cfg.auth.client_ca.clone(),
            })
            .context("loading TLS (--certfile, --keyfile, --client-ca-cert)")?;
            if let Some(every) = cfg.tls_watch {
                tls.watch(every);
            }
            Some(tls)
        }
        None => None,
    };
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
        kiln_kmod::HeaderTrees::open(&cfg.header_tree_dir, cfg.header_trees_max_bytes)
            .context("opening the header tree store")?,
    ));
    kmod.enforce_cache_cap();
    let (arch, deb_arch) = kiln_dkms::Env::host_arch();
    let dkms = Arc::new(kiln_dkms::DkmsJobs::new(
        kiln_dkms::Env {
            sandbox,
            signing: kmod.config().signing.clone(),
            make_jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            arch,
            deb_arch,
            maintainer: "kiln dkms2bin <dkms2bin@example.com>".into(),
            timeout: cfg.job_timeout,
        },
        Cas::open(&cfg.cache_dir).context("opening the cache")?,
        db.clone(),
        metrics.clone(),
        kiln_archive::Limits {
            max_bytes: cfg.max_extract_bytes,
            max_entries: cfg.max_extract_entries,
        },
    ));
    let cbt_jobs = Arc::new(kiln_cbt::CbtJobs::new(
        Cas::open(&cfg.cache_dir).context("opening the cache")?,
        db.clone(),
    ));
    let cbt = Arc::new(kiln_cbt::CbtConfig {
        roots: cfg.snapshot_roots.clone(),
        key: token_key(&cfg.data_dir.join("cbt-token.key"))?,
        token_ttl_secs: cfg.cbt_token_ttl as i64,
    });
    for r in &cfg.snapshot_roots {
        if !r.is_dir() {
            tracing::warn!(root = %r.display(), "snapshot root does not exist (yet)");
        }
    }
    let provision = {
        let dir = &cfg.image_cache_dir;
        ensure_dir(dir, "image cache dir")?;
        let cache = kiln_provision::ImageCache::open(dir, db.clone(), cfg.image_cache_max_bytes)
            .with_context(|| format!("opening the image cache {}", dir.display()))?;
        let m = kiln_provision::ProvisionMetrics::register(&metrics.registry)
            .context("registering the provisioner's metrics")?;
        match &cfg.provision.backend {
            Some(b) => tracing::info!(backend = %b.describe(), image_cache = %dir.display(), concurrency = cfg.provision.concurrency, "volume provisioning enabled"),
            None => tracing::info!("volume provisioning disabled: set LVM_VOLUME_GROUP, --volume-dir or --device-dir to enable it"),
        }
        if let Some(kiln_provision::Backend::Lvm {
            metadata_only: true,
            ..
        }) = &cfg.provision.backend
        {
            tracing::warn!("--lvm-metadata-only: LVs are never activated, so provisioning them cannot complete");
        }
        Arc::new(
            kiln_provision::ProvisionJobs::new(cfg.provision.clone(), Arc::new(cache), m)
                .context("building the image download client")?,
        )
    };
    let image = Arc::new(
        kiln_image::ImageJobs::new(
            cfg.image.clone(),
            Cas::open(&cfg.cache_dir).context("opening the cache")?,
            db.clone(),
        )
        .context("building the image build client")?,
    );
    if kiln_exec::which("buildah").is_none() {
        tracing::warn!("buildah is not installed; image builds (POST /) will fail until it is");
    }
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
        vec![
            kmod.clone(),
            dkms.clone(),
            cbt_jobs.clone(),
            provision.clone(),
            image.clone(),
        ],
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

    {
        let tls = tls.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match &tls {
                    Some(t) => {
                        let _ = t.reload("SIGHUP");
                    }
                    None => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
                }
            }
        });
    }
    let app = kiln_api::router(kiln_api::AppState {
        engine: engine.clone(),
        kmod,
        dkms,
        cbt_jobs,
        cbt,
        provision,
        image,
        max_body: cfg.max_body,
        version: env!("CARGO_PKG_VERSION"),
        auth,
        audit,
        metrics_auth: cfg.auth.metrics_auth,
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
    kiln_api::serve(app, cfg.addr, tls, handle)
        .await
        .with_context(|| format!("serving on {}", cfg.addr))?;
    shutdown.cancel();
    while workers.join_next().await.is_some() {}
    drop(lock);
    Ok(())
}

/// The data-token key: 32 random bytes made at first start, kept 0600 in
/// the data dir so tokens survive restarts.
fn token_key(path: &std::path::Path) -> Result<kiln_cbt::TokenKey> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(b) = std::fs::read(path) {
        let k: [u8; 32] = b.try_into().map_err(|_| {
            anyhow::anyhow!(
                "{} is not a 32-byte key; remove it to make a new one",
                path.display()
            )
        })?;
        return Ok(kiln_cbt::TokenKey::new(k));
    }
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut k))
        .context("reading /dev/urandom")?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&k)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("creating {}", path.display()))?;
    Ok(kiln_cbt::TokenKey::new(k))
}

/// Load the token file and build the authenticator; refuse to start on an
/// unreadable file, or with no auth at all under `--require-auth`.
fn authenticator(a: &AuthSettings) -> Result<kiln_auth::Authenticator> {
    let tokens = match &a.tokens_file {
        Some(p) => {
            let t = kiln_auth::Tokens::load(p).context("--api-tokens-file (API_TOKENS_FILE)")?;
            if t.is_empty() {
                bail!("the API token file {} lists no tokens; refusing to start with an empty allow-list", p.display());
            }
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(p) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %p.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the API token file is readable by other users; chmod 600 it");
                }
            }
            let hashed = t
                .entries()
                .iter()
                .filter(|e| matches!(e.secret, kiln_auth::Secret::Hashed))
                .count();
            tracing::info!(path = %p.display(), tokens = t.len(), hashed, "API tokens loaded (hashed entries take bearer tokens only, not signatures)");
            Some(t)
        }
        None => None,
    };
    let cfg = kiln_auth::AuthConfig {
        tokens,
        client_certs: a.client_ca.is_some(),
        certs_only: a.certs_only,
        grants: a.grants.clone(),
        default_scopes: a.default_scopes,
        skew_secs: a.skew_secs,
    };
    if !cfg.enabled() {
        if a.require_auth {
            bail!("--require-auth is set but no authentication is configured: give --api-tokens-file (API_TOKENS_FILE) or --client-ca-cert (CLIENT_CA_CERT)");
        }
        tracing::warn!("NO AUTHENTICATION CONFIGURED: anyone who can reach this port can build, cancel and purge. Set API_TOKENS_FILE or CLIENT_CA_CERT (and --require-auth) in production");
    } else {
        tracing::info!(
            tokens = cfg.tokens.as_ref().map_or(0, |t| t.len()),
            client_certs = cfg.client_certs,
            certs_only = cfg.certs_only,
            metrics_auth = a.metrics_auth,
            "authentication enabled"
        );
    }
    Ok(kiln_auth::Authenticator::new(cfg))
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
