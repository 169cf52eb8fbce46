//! Command line, environment and config file, resolved once into a validated
//! [`ServeConfig`]. Precedence: flags, then environment, then the config file
//! (`--config`, TOML, same names as the flags with `_`), then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Builds and provisions what infrastructure hosts need, on demand."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Kernel module builds (client).
    #[command(subcommand)]
    Kmod(KmodCmd),
    /// Show a job's status.
    Status(StatusArgs),
    /// Print a job's log; -f follows it while the job runs.
    Logs(LogsArgs),
    /// Rebuild DKMS packages into binary kernel-module .deb packages and an apt repository.
    Dkms2bin(Dkms2binArgs),
    /// Provision a VM volume from an image (client): submit, show progress, wait.
    Provision(ProvisionArgs),
}

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The image: http(s)://… or s3://bucket/key (a `.sha256` next to it is its checksum).
    #[arg(long = "image-url")]
    pub image_url: String,
    /// The volume to create or reuse (an LV, file or device name).
    #[arg(long = "volume-name")]
    pub volume_name: String,
    /// Volume size in GiB.
    #[arg(long = "size-gb")]
    pub size_gb: u64,
    /// qcow2 or raw.
    #[arg(long = "image-type", default_value = "qcow2")]
    pub image_type: String,
    /// Echoed back in the job's status.
    #[arg(long = "correlation-id")]
    pub correlation_id: Option<String>,
    /// Print the job id and exit instead of waiting.
    #[arg(long = "no-wait")]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct Dkms2binArgs {
    /// With --server (or KILN_SERVER), build on a kiln server instead of locally.
    #[command(flatten)]
    pub client: ClientArgs,
    /// DKMS packages: Debian package names, *-dkms .deb files, or source
    /// directories with dkms.conf. Repeatable, and takes several values.
    #[arg(long, num_args = 1.., required = true, action = clap::ArgAction::Append)]
    pub dkms: Vec<String>,
    /// Where the .deb files and the apt index (Packages, Release) go.
    #[arg(long = "out-dir", required = true)]
    pub out_dir: PathBuf,
    /// Kernel versions to build for (repeatable). [default: the running kernel]
    #[arg(long)]
    pub kver: Vec<String>,
    /// Kernel headers: a build tree directory or a tar.gz. [default: the
    /// host's /usr/src/linux-headers-KVER or /lib/modules/KVER/build, else
    /// Debian's linux-headers-KVER packages, unpacked in the work root]
    #[arg(long)]
    pub headers: Option<PathBuf>,
    /// Keep the work root for debugging and print its path.
    #[arg(long = "do-not-remove")]
    pub do_not_remove: bool,
    /// Builds run at once. [default: number of cores]
    #[arg(short = 'j', long = "jobs")]
    pub jobs: Option<usize>,
    /// Sign modules with this key (with --sign-cert), using the tree's scripts/sign-file.
    #[arg(long = "sign-key", requires = "sign_cert")]
    pub sign_key: Option<PathBuf>,
    /// The X.509 certificate of --sign-key (PEM or DER).
    #[arg(long = "sign-cert", requires = "sign_key")]
    pub sign_cert: Option<PathBuf>,
    /// Maintainer field of the packages.
    #[arg(
        long,
        env = "KILN_DKMS_MAINTAINER",
        default_value = "kiln dkms2bin <dkms2bin@example.com>"
    )]
    pub maintainer: String,
    /// Parent of the work root.
    #[arg(long = "work-dir", default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// Per-build timeout in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum KmodCmd {
    /// Upload kernel headers, wait for the build, download the modules.
    Build(KmodBuildArgs),
}

/// Every option is an `Option` so that "not given" is visible; the same
/// struct is the config file's schema, so the two never drift apart.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML config file; keys are the long flag names with `_` for `-`.
    #[arg(long, env = "KILN_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listen address, `host:port` or `:port` (all interfaces). [default: :2021]
    #[arg(long, env = "KILN_ADDR")]
    pub addr: Option<String>,
    /// Module source directory, copied into each build. [default: /drbd]
    #[arg(long = "drbd-dir", env = "KILN_DRBD_DIR")]
    pub drbd_dir: Option<PathBuf>,
    /// DRBD version to clone (branch drbd-VERSION of --drbd-repo) instead of --drbd-dir.
    #[arg(long = "drbd-version", env = "DRBD_VERSION")]
    pub drbd_version: Option<String>,
    /// DRBD repository. [default: https://github.com/LINBIT/drbd.git]
    #[arg(long = "drbd-repo", env = "DRBD_REPO")]
    pub drbd_repo: Option<String>,
    /// Cache directory (content-addressed blobs). [default: /var/cache/kiln]
    #[arg(long = "cache-dir", env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// State directory (job database, logs, work dirs). [default: CACHE_DIR/state]
    #[arg(long = "data-dir", env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Maximum request body in bytes. [default: 104857600]
    #[arg(long, env = "KILN_MAXBYTESBODY")]
    pub maxbytesbody: Option<u64>,
    /// Keep each job's work directory for debugging.
    #[arg(long, env = "KILN_KEEPTMPDIR", num_args = 0..=1, default_missing_value = "true")]
    pub keeptmpdir: Option<bool>,
    /// TLS certificate (PEM); with --keyfile, serve HTTPS only.
    #[arg(long, env = "KILN_CERTFILE")]
    pub certfile: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "KILN_KEYFILE")]
    pub keyfile: Option<PathBuf>,
    /// debug, info, warn or error. [default: info]
    #[arg(long = "log-level", env = "KILN_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// json or text. [default: json]
    #[arg(long = "log-format", env = "KILN_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// SPAAS service URL passed to builds. [default: https://spaas.drbd.io]
    #[arg(long = "spaas-url", env = "SPAAS_URL")]
    pub spaas_url: Option<String>,
    /// Let builds use the network (DRBD's SPAAS needs it). [default: off]
    #[arg(long = "build-network", env = "KILN_BUILD_NETWORK", num_args = 0..=1, default_missing_value = "true")]
    pub build_network: Option<bool>,
    /// Jobs run at once. [default: number of cores]
    #[arg(long, env = "KILN_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Per-job timeout in seconds. [default: 3600]
    #[arg(long = "job-timeout", env = "KILN_JOB_TIMEOUT")]
    pub job_timeout: Option<u64>,
    /// Cache size cap in bytes; least recently used blobs are evicted. [default: 20 GiB]
    #[arg(long = "cache-max-bytes", env = "KILN_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// Where extracted kernel header trees are kept for reuse (a tmpfs makes
    /// cold builds faster). [default: DATA_DIR/trees]
    #[arg(long = "header-tree-dir", env = "KILN_HEADER_TREE_DIR")]
    pub header_tree_dir: Option<PathBuf>,
    /// Cap on the bytes of kept header trees; least recently used trees are
    /// removed, never one a build is using. [default: 4 GiB]
    #[arg(long = "header-trees-max-bytes", env = "KILN_HEADER_TREES_MAX_BYTES")]
    pub header_trees_max_bytes: Option<u64>,
    /// Cap on bytes extracted from one upload. [default: 4 GiB]
    #[arg(long = "max-extract-bytes", env = "KILN_MAX_EXTRACT_BYTES")]
    pub max_extract_bytes: Option<u64>,
    /// Cap on entries in one upload. [default: 500000]
    #[arg(long = "max-extract-entries", env = "KILN_MAX_EXTRACT_ENTRIES")]
    pub max_extract_entries: Option<u64>,
    /// Private key for module signing (with --sign-cert).
    #[arg(long = "sign-key", env = "KILN_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    /// X.509 certificate for module signing (PEM or DER).
    #[arg(long = "sign-cert", env = "KILN_SIGN_CERT")]
    pub sign_cert: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates are verified against; the
    /// certificate's CN (or first SAN) becomes the caller's identity. Needs TLS.
    #[arg(long = "client-ca-cert", env = "CLIENT_CA_CERT")]
    pub client_ca_cert: Option<PathBuf>,
    /// `required`: only client certificates are accepted; `optional`:
    /// certificates or tokens. [default: required with a CA and no token file, else optional]
    #[arg(long = "client-auth", env = "KILN_CLIENT_AUTH")]
    pub client_auth: Option<String>,
    /// API tokens, one `name:token` or `name:sha256:<hex>` a line, optionally
    /// followed by scopes (`read,write,admin`).
    #[arg(long = "api-tokens-file", env = "API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,
    /// Scopes for an identity (token name or certificate subject):
    /// `NAME=read,write,admin`. Repeatable; `;` separates them in the env.
    #[arg(long = "grant", env = "KILN_GRANT", value_delimiter = ';')]
    pub grant: Option<Vec<String>>,
    /// Scopes of identities with no grant and no scopes in the token file. [default: read,write]
    #[arg(long = "default-scopes", env = "KILN_DEFAULT_SCOPES")]
    pub default_scopes: Option<String>,
    /// Refuse to start unless tokens or client certificates are configured.
    #[arg(long = "require-auth", env = "KILN_REQUIRE_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub require_auth: Option<bool>,
    /// Require the read scope for /metrics (open by default).
    #[arg(long = "metrics-auth", env = "KILN_METRICS_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_auth: Option<bool>,
    /// Allowed clock skew of signed requests, in seconds. [default: 300]
    #[arg(long = "hmac-skew", env = "KILN_HMAC_SKEW")]
    pub hmac_skew: Option<u64>,
    /// How often to check the TLS files for changes, in seconds; 0 turns the
    /// check off (SIGHUP still reloads). [default: 10]
    #[arg(long = "tls-watch-interval", env = "KILN_TLS_WATCH_INTERVAL")]
    pub tls_watch_interval: Option<u64>,
    /// Audit log of mutating requests (JSON lines). [default: DATA_DIR/audit.log]
    #[arg(long = "audit-log", env = "KILN_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Directory whose files and devices may be named as volume snapshot
    /// sources (repeatable; `:` separates them in the env). [default: none]
    #[arg(
        long = "snapshot-root",
        env = "KILN_SNAPSHOT_ROOTS",
        value_delimiter = ':'
    )]
    pub snapshot_root: Option<Vec<PathBuf>>,
    /// Lifetime of changed-block data tokens, in seconds. [default: 10800]
    #[arg(long = "cbt-token-ttl", env = "KILN_CBT_TOKEN_TTL")]
    pub cbt_token_ttl: Option<u64>,
    /// Listen port, as the volume provisioner took it (used when --addr is not given).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// Listen host, as the volume provisioner took it (with PORT; default all interfaces).
    #[arg(long, env = "HOST")]
    pub host: Option<String>,
    /// Where VM images are cached (kept as downloaded, named by SHA-256).
    /// [default: /var/lib/libvirt/images]
    #[arg(long = "image-cache-dir", env = "KILN_IMAGE_CACHE_DIR")]
    pub image_cache_dir: Option<PathBuf>,
    /// Image cache size cap in bytes; least recently used images not in use
    /// are evicted. [default: 100 GiB]
    #[arg(long = "image-cache-max-bytes", env = "KILN_IMAGE_CACHE_MAX_BYTES")]
    pub image_cache_max_bytes: Option<u64>,
    /// lvm, dir or device. [default: lvm with LVM_VOLUME_GROUP, else dir
    /// with --volume-dir, else device with --device-dir]
    #[arg(long = "volume-backend", env = "KILN_VOLUME_BACKEND")]
    pub volume_backend: Option<String>,
    /// Volume group of the lvm backend (`/dev/VG/NAME`).
    #[arg(long = "lvm-volume-group", env = "LVM_VOLUME_GROUP")]
    pub lvm_volume_group: Option<String>,
    /// Only change LVM metadata (`--driverloaded n`, LVs never activated):
    /// for hosts without device-mapper, such as CI; writing volumes then fails.
    #[arg(long = "lvm-metadata-only", env = "KILN_LVM_METADATA_ONLY", num_args = 0..=1, default_missing_value = "true")]
    pub lvm_metadata_only: Option<bool>,
    /// Directory of raw volume files (the dir backend).
    #[arg(long = "volume-dir", env = "KILN_VOLUME_DIR")]
    pub volume_dir: Option<PathBuf>,
    /// Directory of existing block devices or links to them (the device backend).
    #[arg(long = "device-dir", env = "KILN_DEVICE_DIR")]
    pub device_dir: Option<PathBuf>,
    /// S3/MinIO endpoint for s3:// image URLs and URLs on its host.
    #[arg(long = "minio-endpoint", env = "MINIO_ENDPOINT")]
    pub minio_endpoint: Option<String>,
    #[arg(
        long = "minio-access-key",
        env = "MINIO_ACCESS_KEY",
        hide_env_values = true
    )]
    pub minio_access_key: Option<String>,
    #[arg(
        long = "minio-secret-key",
        env = "MINIO_SECRET_KEY",
        hide_env_values = true
    )]
    pub minio_secret_key: Option<String>,
    /// S3 region to sign for. [default: us-east-1]
    #[arg(long = "minio-region", env = "MINIO_REGION")]
    pub minio_region: Option<String>,
    /// Provisioning jobs run at once. [default: 2]
    #[arg(long = "provision-concurrency", env = "KILN_PROVISION_CONCURRENCY")]
    pub provision_concurrency: Option<usize>,
    /// Per provisioning job timeout in seconds. [default: 7200]
    #[arg(long = "provision-timeout", env = "KILN_PROVISION_TIMEOUT")]
    pub provision_timeout: Option<u64>,
    /// Attempts per image download (resumed with Range). [default: 5]
    #[arg(long = "download-attempts", env = "KILN_DOWNLOAD_ATTEMPTS")]
    pub download_attempts: Option<u32>,
    /// Image builds run at once (buildshuttle's variable). [default: 4]
    #[arg(long = "maximum-parallel-builds", env = "MAXIMUM_PARALLEL_BUILDS")]
    pub maximum_parallel_builds: Option<usize>,
    /// Image build timeout in milliseconds. [default: 1200000 (20 min)]
    #[arg(long = "timeout-in-ms", env = "TIMEOUT_IN_MS")]
    pub timeout_in_ms: Option<u64>,
    /// Build images without the layer cache.
    #[arg(long = "no-cache", env = "NO_CACHE", num_args = 0..=1, default_missing_value = "true")]
    pub no_cache: Option<bool>,
    /// JSON object of build args added to every image build (the request's own win).
    #[arg(long = "extra-build-args", env = "EXTRA_BUILD_ARGS")]
    pub extra_build_args: Option<String>,
    /// Also write image build output to kiln's own log.
    #[arg(long = "show-build-logs", env = "SHOW_BUILD_LOGS", num_args = 0..=1, default_missing_value = "true")]
    pub show_build_logs: Option<bool>,
    /// A registry reached over plain HTTP, `HOST:PORT` (repeatable; `,` in the env).
    #[arg(
        long = "insecure-registry",
        env = "KILN_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registry: Option<Vec<String>>,
    /// Secret for the `X-Kiln-Signature` HMAC of build callbacks.
    #[arg(
        long = "callback-secret",
        env = "KILN_CALLBACK_SECRET",
        hide_env_values = true
    )]
    pub callback_secret: Option<String>,
    /// Attempts per build callback (with backoff). [default: 8]
    #[arg(long = "callback-attempts", env = "KILN_CALLBACK_ATTEMPTS")]
    pub callback_attempts: Option<u32>,
    /// buildah's storage driver. [default: vfs]
    #[arg(long = "buildah-storage-driver", env = "KILN_BUILDAH_STORAGE_DRIVER")]
    pub buildah_storage_driver: Option<String>,
}

/// Who may call kiln, as configured.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub tokens_file: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub certs_only: bool,
    pub grants: std::collections::HashMap<String, kiln_auth::Scopes>,
    pub default_scopes: kiln_auth::Scopes,
    pub skew_secs: i64,
    pub require_auth: bool,
    pub metrics_auth: bool,
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub source: SourceChoice,
    pub cache_dir: PathBuf,
    pub data_dir: PathBuf,
    pub max_body: u64,
    pub keep_tmpdir: bool,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub log_level: String,
    pub log_json: bool,
    pub spaas_url: String,
    pub build_network: bool,
    pub concurrency: usize,
    pub job_timeout: Duration,
    pub cache_max_bytes: u64,
    pub header_tree_dir: PathBuf,
    pub header_trees_max_bytes: u64,
    pub max_extract_bytes: u64,
    pub max_extract_entries: u64,
    pub signing: Option<(PathBuf, PathBuf)>,
    pub auth: AuthSettings,
    pub tls_watch: Option<Duration>,
    pub audit_log: PathBuf,
    pub snapshot_roots: Vec<PathBuf>,
    pub cbt_token_ttl: u64,
    pub image_cache_dir: PathBuf,
    pub image_cache_max_bytes: u64,
    pub provision: kiln_provision::ProvisionConfig,
    pub image: kiln_image::ImageConfig,
}

#[derive(Debug, Clone)]
pub enum SourceChoice {
    Dir(PathBuf),
    Git { version: String, repo: String },
}

/// `:2021` means every interface, as in Go.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .with_context(|| format!("invalid --addr {s:?}: want host:port or :port"))
}

impl ServeArgs {
    pub fn resolve(self) -> Result<ServeConfig> {
        let file: ServeArgs = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => ServeArgs::default(),
        };
        // --addr (KILN_ADDR) wins; then the provisioner's HOST/PORT; then the file.
        let addr = match (self.addr, self.host, self.port) {
            (Some(a), _, _) => parse_addr(&a)?,
            (None, host, Some(port)) => host_port(host.as_deref(), port)?,
            (None, Some(_), None) => bail!("HOST (--host) needs PORT (--port)"),
            (None, None, None) => match (file.addr, file.port) {
                (Some(a), _) => parse_addr(&a)?,
                (None, Some(port)) => host_port(file.host.as_deref(), port)?,
                (None, None) => parse_addr(":2021")?,
            },
        };
        let version = self
            .drbd_version
            .or(file.drbd_version)
            .filter(|v| !v.is_empty());
        let repo = self
            .drbd_repo
            .or(file.drbd_repo)
            .unwrap_or_else(|| "https://github.com/LINBIT/drbd.git".into());
        let source = match version {
            Some(version) => SourceChoice::Git { version, repo },
            None => SourceChoice::Dir(
                self.drbd_dir
                    .or(file.drbd_dir)
                    .unwrap_or_else(|| "/drbd".into()),
            ),
        };
        let cache_dir = self
            .cache_dir
            .or(file.cache_dir)
            .unwrap_or_else(|| "/var/cache/kiln".into());
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| cache_dir.join("state"));
        let header_tree_dir = self
            .header_tree_dir
            .or(file.header_tree_dir)
            .unwrap_or_else(|| data_dir.join("trees"));
        let tls = match (
            self.certfile.or(file.certfile),
            self.keyfile.or(file.keyfile),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("--certfile and --keyfile go together"),
        };
        let signing = match (
            self.sign_key.or(file.sign_key),
            self.sign_cert.or(file.sign_cert),
        ) {
            (Some(k), Some(c)) => Some((k, c)),
            (None, None) => None,
            _ => bail!("--sign-key and --sign-cert go together"),
        };
        let log_level = self
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "info".into());
        if !["trace", "debug", "info", "warn", "error"].contains(&log_level.as_str()) {
            bail!("invalid --log-level {log_level:?}: one of debug, info, warn, error");
        }
        let log_format = self
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "json".into());
        if !["json", "text"].contains(&log_format.as_str()) {
            bail!("invalid --log-format {log_format:?}: json or text");
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let concurrency = self.concurrency.or(file.concurrency).unwrap_or(cores);
        if concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        let max_body = self.maxbytesbody.or(file.maxbytesbody).unwrap_or(100 << 20);
        if max_body == 0 {
            bail!("--maxbytesbody must be positive");
        }
        let auth = {
            let client_ca = self.client_ca_cert.or(file.client_ca_cert);
            let tokens_file = self.api_tokens_file.or(file.api_tokens_file);
            if client_ca.is_some() && tls.is_none() {
                bail!("--client-ca-cert (CLIENT_CA_CERT) needs TLS: client certificates are only seen over HTTPS; add --certfile and --keyfile");
            }
            let certs_only = match self.client_auth.or(file.client_auth).as_deref() {
                None => client_ca.is_some() && tokens_file.is_none(),
                Some("required") if client_ca.is_some() => true,
                Some("required") => bail!("--client-auth required needs --client-ca-cert"),
                Some("optional") => false,
                Some(o) => bail!("invalid --client-auth {o:?}: required or optional"),
            };
            let mut grants = std::collections::HashMap::new();
            for g in self.grant.or(file.grant).unwrap_or_default() {
                let (name, scopes) = kiln_auth::parse_grant(g.trim()).context("--grant")?;
                grants.insert(name, scopes);
            }
            let default_scopes = match self.default_scopes.or(file.default_scopes) {
                Some(s) => s.parse().context("--default-scopes")?,
                None => kiln_auth::Scopes::READ_WRITE,
            };
            let skew = self.hmac_skew.or(file.hmac_skew).unwrap_or(300);
            if skew == 0 || skew > 86_400 {
                bail!("--hmac-skew must be between 1 and 86400 seconds");
            }
            AuthSettings {
                tokens_file,
                client_ca,
                certs_only,
                grants,
                default_scopes,
                skew_secs: skew as i64,
                require_auth: self.require_auth.or(file.require_auth).unwrap_or(false),
                metrics_auth: self.metrics_auth.or(file.metrics_auth).unwrap_or(false),
            }
        };
        let tls_watch = match self
            .tls_watch_interval
            .or(file.tls_watch_interval)
            .unwrap_or(10)
        {
            0 => None,
            n => Some(Duration::from_secs(n)),
        };
        let audit_log = self
            .audit_log
            .or(file.audit_log)
            .unwrap_or_else(|| data_dir.join("audit.log"));
        let snapshot_roots = self
            .snapshot_root
            .or(file.snapshot_root)
            .unwrap_or_default();
        for r in &snapshot_roots {
            if !r.is_absolute() {
                bail!("--snapshot-root {} must be an absolute path", r.display());
            }
        }
        let cbt_token_ttl = self
            .cbt_token_ttl
            .or(file.cbt_token_ttl)
            .unwrap_or(3 * 3600);
        if cbt_token_ttl == 0 {
            bail!("--cbt-token-ttl must be positive");
        }
        let provision = {
            let vg = self
                .lvm_volume_group
                .or(file.lvm_volume_group)
                .filter(|v| !v.is_empty());
            let vdir = self.volume_dir.or(file.volume_dir);
            let ddir = self.device_dir.or(file.device_dir);
            let metadata_only = self
                .lvm_metadata_only
                .or(file.lvm_metadata_only)
                .unwrap_or(false);
            let choice = self.volume_backend.or(file.volume_backend);
            let lvm = |vg: String| -> Result<kiln_provision::Backend> {
                kiln_provision::validate_name(&vg)
                    .map_err(|e| anyhow::anyhow!("LVM_VOLUME_GROUP: {e}"))?;
                Ok(kiln_provision::Backend::Lvm { vg, metadata_only })
            };
            let backend = match choice.as_deref() {
                Some("lvm") => Some(lvm(vg.context(
                    "--volume-backend lvm needs LVM_VOLUME_GROUP (--lvm-volume-group)",
                )?)?),
                Some("dir") => Some(kiln_provision::Backend::Dir(
                    vdir.clone()
                        .context("--volume-backend dir needs --volume-dir")?,
                )),
                Some("device") => Some(kiln_provision::Backend::Device(
                    ddir.clone()
                        .context("--volume-backend device needs --device-dir")?,
                )),
                Some(o) => bail!("invalid --volume-backend {o:?}: lvm, dir or device"),
                None => match (vg, &vdir, &ddir) {
                    (Some(vg), _, _) => Some(lvm(vg)?),
                    (None, Some(d), _) => Some(kiln_provision::Backend::Dir(d.clone())),
                    (None, None, Some(d)) => Some(kiln_provision::Backend::Device(d.clone())),
                    (None, None, None) => None,
                },
            };
            for d in [&vdir, &ddir].into_iter().flatten() {
                if !d.is_absolute() {
                    bail!(
                        "--volume-dir/--device-dir {} must be an absolute path",
                        d.display()
                    );
                }
            }
            let s3 = match self
                .minio_endpoint
                .or(file.minio_endpoint)
                .filter(|e| !e.is_empty())
            {
                None => None,
                Some(ep) => {
                    let endpoint = url::Url::parse(&ep)
                        .with_context(|| format!("invalid MINIO_ENDPOINT {ep:?}"))?;
                    if !matches!(endpoint.scheme(), "http" | "https") {
                        bail!("MINIO_ENDPOINT {ep:?} must be an http(s) URL");
                    }
                    let access_key = self
                        .minio_access_key
                        .or(file.minio_access_key)
                        .context("MINIO_ENDPOINT needs MINIO_ACCESS_KEY")?;
                    let secret_key = self
                        .minio_secret_key
                        .or(file.minio_secret_key)
                        .context("MINIO_ENDPOINT needs MINIO_SECRET_KEY")?;
                    Some(kiln_provision::S3Settings {
                        endpoint,
                        access_key,
                        secret_key,
                        region: self
                            .minio_region
                            .or(file.minio_region)
                            .unwrap_or_else(|| "us-east-1".into()),
                    })
                }
            };
            let concurrency = self
                .provision_concurrency
                .or(file.provision_concurrency)
                .unwrap_or(2);
            if concurrency == 0 {
                bail!("--provision-concurrency must be at least 1");
            }
            let attempts = self
                .download_attempts
                .or(file.download_attempts)
                .unwrap_or(5);
            if attempts == 0 {
                bail!("--download-attempts must be at least 1");
            }
            kiln_provision::ProvisionConfig {
                backend,
                s3,
                concurrency,
                timeout: Duration::from_secs(
                    self.provision_timeout
                        .or(file.provision_timeout)
                        .unwrap_or(7200)
                        .max(1),
                ),
                download_attempts: attempts,
                tool_timeout: Duration::from_secs(600),
            }
        };
        // kiln's own volumes can always be snapshotted (issue: CBT on
        // provisioned volumes): the backend's directory is a snapshot root.
        let mut snapshot_roots = snapshot_roots;
        if let Some(b) = &provision.backend {
            let root = match b {
                kiln_provision::Backend::Lvm { vg, .. } => Path::new("/dev").join(vg),
                kiln_provision::Backend::Dir(d) | kiln_provision::Backend::Device(d) => d.clone(),
            };
            if !snapshot_roots.contains(&root) {
                snapshot_roots.push(root);
            }
        }
        let image_cache_dir = self
            .image_cache_dir
            .or(file.image_cache_dir)
            .unwrap_or_else(|| "/var/lib/libvirt/images".into());
        let image_cache_max_bytes = self
            .image_cache_max_bytes
            .or(file.image_cache_max_bytes)
            .unwrap_or(100 << 30);
        let image = {
            let parallel = self
                .maximum_parallel_builds
                .or(file.maximum_parallel_builds)
                .unwrap_or(4);
            if parallel == 0 {
                bail!("MAXIMUM_PARALLEL_BUILDS must be at least 1");
            }
            let ms = self
                .timeout_in_ms
                .or(file.timeout_in_ms)
                .unwrap_or(20 * 60 * 1000);
            if ms == 0 {
                bail!("TIMEOUT_IN_MS must be positive");
            }
            let extra_build_args = match self.extra_build_args.or(file.extra_build_args) {
                None => vec![],
                Some(j) if j.trim().is_empty() => vec![],
                Some(j) => {
                    let m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&j)
                        .context("EXTRA_BUILD_ARGS must be a JSON object")?;
                    m.into_iter()
                        .map(|(k, v)| {
                            let v = match v {
                                serde_json::Value::String(s) => s,
                                o => o.to_string(),
                            };
                            (k, v)
                        })
                        .collect()
                }
            };
            let driver = self
                .buildah_storage_driver
                .or(file.buildah_storage_driver)
                .unwrap_or_else(|| "vfs".into());
            if !driver.bytes().all(|b| b.is_ascii_alphanumeric()) {
                bail!("invalid --buildah-storage-driver {driver:?}");
            }
            let insecure = self
                .insecure_registry
                .or(file.insecure_registry)
                .unwrap_or_default();
            for r in &insecure {
                if r.is_empty()
                    || !r
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                {
                    bail!("invalid --insecure-registry {r:?}: want HOST:PORT");
                }
            }
            kiln_image::ImageConfig {
                storage_dir: data_dir.join("buildah"),
                storage_driver: driver,
                parallel,
                timeout: Duration::from_millis(ms),
                no_cache: self.no_cache.or(file.no_cache).unwrap_or(false),
                extra_build_args,
                show_build_logs: self
                    .show_build_logs
                    .or(file.show_build_logs)
                    .unwrap_or(false),
                insecure_registries: insecure,
                callback_secret: self
                    .callback_secret
                    .or(file.callback_secret)
                    .filter(|s| !s.is_empty())
                    .map(String::into_bytes),
                callback_attempts: self
                    .callback_attempts
                    .or(file.callback_attempts)
                    .unwrap_or(8)
                    .max(1),
                limits: kiln_archive::Limits {
                    max_bytes: self
                        .max_extract_bytes
                        .or(file.max_extract_bytes)
                        .unwrap_or(4 << 30),
                    max_entries: self
                        .max_extract_entries
                        .or(file.max_extract_entries)
                        .unwrap_or(500_000),
                },
            }
        };
        Ok(ServeConfig {
            image,
            image_cache_dir,
            image_cache_max_bytes,
            provision,
            snapshot_roots,
            cbt_token_ttl,
            auth,
            tls_watch,
            audit_log,
            addr,
            source,
            cache_dir,
            data_dir,
            max_body,
            keep_tmpdir: self.keeptmpdir.or(file.keeptmpdir).unwrap_or(false),
            tls,
            log_level,
            log_json: log_format == "json",
            spaas_url: self
                .spaas_url
                .or(file.spaas_url)
                .unwrap_or_else(|| "https://spaas.drbd.io".into()),
            build_network: self.build_network.or(file.build_network).unwrap_or(false),
            concurrency,
            job_timeout: Duration::from_secs(
                self.job_timeout.or(file.job_timeout).unwrap_or(3600).max(1),
            ),
            cache_max_bytes: self
                .cache_max_bytes
                .or(file.cache_max_bytes)
                .unwrap_or(20 << 30),
            header_tree_dir,
            header_trees_max_bytes: self
                .header_trees_max_bytes
                .or(file.header_trees_max_bytes)
                .unwrap_or(4 << 30),
            max_extract_bytes: self
                .max_extract_bytes
                .or(file.max_extract_bytes)
                .unwrap_or(4 << 30),
            max_extract_entries: self
                .max_extract_entries
                .or(file.max_extract_entries)
                .unwrap_or(500_000),
            signing,
        })
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// kiln server URL. [default: http://127.0.0.1:2021; for dkms2bin: build locally]
    #[arg(long, env = "KILN_SERVER")]
    pub server: Option<String>,
    /// API token. Sent as a bearer token, or used to sign requests
    /// (KILN-HMAC-SHA256) when --token-name is given.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The token's name in the server's token file: sign every request
    /// instead of sending the token.
    #[arg(long = "token-name", env = "KILN_TOKEN_NAME")]
    pub token_name: Option<String>,
    /// CA certificate(s) (PEM) to trust for the server, besides the system's.
    #[arg(long, env = "KILN_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify client certificates.
    #[arg(long, env = "KILN_CLIENT_CERT")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "KILN_CLIENT_KEY")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KmodBuildArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Kernel version. [default: the running kernel]
    #[arg(long = "kernel-version")]
    pub kernel_version: Option<String>,
    /// Headers: a build tree directory or a tar.gz. [default: /lib/modules/KVER/build]
    #[arg(long)]
    pub headers: Option<PathBuf>,
    /// Where to write the module archive. [default: kmod-KVER.tar.gz]
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Build again even if the same build failed before.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub job_id: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub job_id: String,
    /// Follow the log until the job finishes.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// `HOST` and `PORT` as the volume provisioner took them; HOST may be a name.
fn host_port(host: Option<&str>, port: u16) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let host = host.filter(|h| !h.is_empty()).unwrap_or("0.0.0.0");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("invalid HOST {host:?}"))?
        .next()
        .with_context(|| format!("HOST {host:?} resolves to no address"))
}

pub fn ensure_dir(p: &Path, what: &str) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("creating {what} {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_forms() {
        assert_eq!(parse_addr(":2021").unwrap().to_string(), "0.0.0.0:2021");
        assert_eq!(
            parse_addr("127.0.0.1:9").unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert!(parse_addr("nope").is_err());
    }

    #[test]
    fn precedence_flag_then_file_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(
            &f,
            "addr = \"127.0.0.1:7000\"\nmaxbytesbody = 5\ncache_dir = \"/srv/c\"\n",
        )
        .unwrap();
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from([
            "kiln",
            "serve",
            "--config",
            f.to_str().unwrap(),
            "--maxbytesbody",
            "9",
        ])
        else {
            panic!()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:7000");
        assert_eq!(c.max_body, 9);
        assert_eq!(c.data_dir, PathBuf::from("/srv/c/state"));
        assert!(matches!(c.source, SourceChoice::Dir(ref p) if p == Path::new("/drbd")));
    }

    fn serve(args: &[&str]) -> Result<ServeConfig> {
        let mut all = vec!["kiln", "serve"];
        all.extend_from_slice(args);
        let Cli {
            command: Command::Serve(a),
        } = Cli::parse_from(all)
        else {
            panic!()
        };
        a.resolve()
    }

    #[test]
    fn provisioner_settings() {
        // The seed's HOST/PORT when --addr is absent; --addr wins.
        let c = serve(&["--host", "127.0.0.1", "--port", "8080"]).unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        let c = serve(&["--addr", ":9", "--port", "8080"]).unwrap();
        assert_eq!(c.addr.to_string(), "0.0.0.0:9");
        assert!(serve(&["--host", "127.0.0.1"]).is_err());
        // The backend follows what is configured, and its directory becomes a snapshot root.
        let c = serve(&["--lvm-volume-group", "vg0", "--volume-dir", "/srv/v"]).unwrap();
        assert_eq!(
            c.provision.backend,
            Some(kiln_provision::Backend::Lvm {
                vg: "vg0".into(),
                metadata_only: false
            })
        );
        assert!(c.snapshot_roots.contains(&PathBuf::from("/dev/vg0")));
        let c = serve(&[
            "--volume-backend",
            "dir",
            "--lvm-volume-group",
            "vg0",
            "--volume-dir",
            "/srv/v",
        ])
        .unwrap();
        assert_eq!(
            c.provision.backend,
            Some(kiln_provision::Backend::Dir("/srv/v".into()))
        );
        assert_eq!(serve(&[]).unwrap().provision.backend, None);
        assert!(serve(&["--volume-backend", "lvm"]).is_err());
        assert!(serve(&["--lvm-volume-group", "../x"]).is_err());
        assert!(serve(&["--volume-dir", "rel/dir"]).is_err());
        assert!(
            serve(&["--minio-endpoint", "http://127.0.0.1:9000"]).is_err(),
            "keys are required"
        );
        let c = serve(&[
            "--minio-endpoint",
            "http://127.0.0.1:9000",
            "--minio-access-key",
            "a",
            "--minio-secret-key",
            "b",
        ])
        .unwrap();
        assert_eq!(c.provision.s3.unwrap().region, "us-east-1");
        assert_eq!(c.provision.concurrency, 2);
        assert!(serve(&["--provision-concurrency", "0"]).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from(["kiln", "serve", "--certfile", "/x"])
        else {
            panic!()
        };
        assert!(args
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("go together"));
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from(["kiln", "serve", "--log-level", "loud"])
        else {
            panic!()
        };
        assert!(args.resolve().is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(&f, "adrr = \":1\"\n").unwrap();
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from(["kiln", "serve", "--config", f.to_str().unwrap()])
        else {
            panic!()
        };
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("unknown field") && e.contains("adrr"), "{e}");
    }
}
