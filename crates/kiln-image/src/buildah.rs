//! buildah and skopeo, daemonless: the command lines (explicit arguments
//! only), their private storage below kiln's data dir, the registry auth
//! file (0600, never credentials on a command line or in the environment)
//! and a registries.conf naming the plain-HTTP registries.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use kiln_exec::Cmd;

use crate::request::BuildRequest;
use crate::ImageConfig;

/// Files one build's tools read: written in the job's work dir.
#[derive(Debug)]
pub struct ToolEnv {
    pub authfile: PathBuf,
    pub registries_conf: Option<PathBuf>,
    pub tmp: PathBuf,
}

fn auth_entry(user: &str, pass: &str) -> serde_json::Value {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    serde_json::json!({ "auth": b })
}

/// The host part of an image reference (`host[:port]/...`), if it names one.
pub fn registry_of(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

/// Write the auth file and registries.conf for `req` into `work`.
pub fn prepare(work: &Path, req: &BuildRequest, cfg: &ImageConfig) -> std::io::Result<ToolEnv> {
    let mut auths = serde_json::Map::new();
    if let Some(a) = &req.gm_registry_auth {
        if let (Some(u), Some(p)) = (&a.username, &a.password) {
            auths.insert(req.gm_registry_host.clone(), auth_entry(u, p));
        }
    }
    if let (Some(u), Some(p)) = (&req.docker_login, &req.docker_password) {
        let host = req
            .docker_registry
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                req.sources
                    .strip_prefix("docker://")
                    .and_then(registry_of)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "docker.io".into());
        auths.entry(host).or_insert_with(|| auth_entry(u, p));
    }
    let authfile = work.join("auth.json");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&authfile)?;
    f.write_all(serde_json::json!({ "auths": auths }).to_string().as_bytes())?;
    let registries_conf = if cfg.insecure_registries.is_empty() {
        None
    } else {
        let p = work.join("registries.conf");
        let mut s = String::from("unqualified-search-registries = [\"docker.io\"]\n");
        for r in &cfg.insecure_registries {
            s.push_str(&format!(
                "\n[[registry]]\nlocation = \"{r}\"\ninsecure = true\n"
            ));
        }
        std::fs::write(&p, s)?;
        Some(p)
    };
    let tmp = work.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    Ok(ToolEnv {
        authfile,
        registries_conf,
        tmp,
    })
}

fn with_env(mut c: Cmd, env: &ToolEnv) -> Cmd {
    c = c.env("TMPDIR", &env.tmp);
    if let Some(r) = &env.registries_conf {
        c = c.env("CONTAINERS_REGISTRIES_CONF", r);
    }
    c
}

/// `buildah` with kiln's own storage.
pub fn buildah(cfg: &ImageConfig, env: &ToolEnv, timeout: Duration) -> Cmd {
    let c = Cmd::new("buildah")
        .arg("--root")
        .arg(cfg.storage_dir.join("root"))
        .arg("--runroot")
        .arg(cfg.storage_dir.join("run"))
        .args(["--storage-driver", &cfg.storage_driver])
        .timeout(timeout);
    with_env(c, env)
}

/// `buildah bud`: chroot isolation, real `--build-arg`s, both tags, and
/// the layer cache unless `NO_CACHE`.
pub fn bud(
    cfg: &ImageConfig,
    env: &ToolEnv,
    req: &BuildRequest,
    ctx: &Path,
    tags: &[String],
    timeout: Duration,
) -> Cmd {
    let mut c = buildah(cfg, env, timeout)
        .args(["bud", "--isolation", "chroot"])
        .arg("--authfile")
        .arg(&env.authfile);
    // `--layers` commits every step so later builds can reuse it; that is
    // the cache. Without it (NO_CACHE) only the final image is committed,
    // which with vfs storage saves a full copy of the rootfs per step.
    c = if cfg.no_cache {
        c.args(["--layers=false", "--no-cache"])
    } else {
        c.arg("--layers")
    };
    for (k, v) in req.build_args(&cfg.extra_build_args) {
        c = c.arg("--build-arg").arg(format!("{k}={v}"));
    }
    for (k, v) in [
        ("app", req.app.as_str()),
        ("space", req.space.as_str()),
        ("build_uuid", req.build_uuid.as_str()),
        ("app_uuid", req.app_uuid.as_str()),
    ] {
        c = c.arg("--label").arg(format!("{k}={v}"));
    }
    for t in tags {
        c = c.arg("--tag").arg(t);
    }
    c.arg("--file").arg(ctx.join("Dockerfile")).arg(ctx)
}

/// `buildah push` of a local tag to the same name in its registry.
pub fn push(
    cfg: &ImageConfig,
    env: &ToolEnv,
    tag: &str,
    digestfile: &Path,
    timeout: Duration,
) -> Cmd {
    buildah(cfg, env, timeout)
        .arg("push")
        .arg("--authfile")
        .arg(&env.authfile)
        .arg("--digestfile")
        .arg(digestfile)
        .arg(tag)
        .arg(format!("docker://{tag}"))
}

/// `skopeo copy` registry to registry (a `docker://` source, retagged).
/// skopeo's own TLS flags override registries.conf, so plain-HTTP
/// registries are named to it per side.
pub fn copy(
    cfg: &ImageConfig,
    env: &ToolEnv,
    src: &str,
    dst: &str,
    digestfile: &Path,
    timeout: Duration,
) -> Cmd {
    let insecure = |image: &str| {
        registry_of(image).is_some_and(|h| cfg.insecure_registries.iter().any(|r| r == h))
    };
    let mut c = Cmd::new("skopeo")
        .arg("copy")
        .arg("--authfile")
        .arg(&env.authfile)
        .arg("--digestfile")
        .arg(digestfile);
    if insecure(src) {
        c = c.arg("--src-tls-verify=false");
    }
    if insecure(dst) {
        c = c.arg("--dest-tls-verify=false");
    }
    let c = c
        .arg(format!("docker://{src}"))
        .arg(format!("docker://{dst}"))
        .timeout(timeout);
    with_env(c, env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_of_references() {
        assert_eq!(
            registry_of("127.0.0.1:5000/org/app:1"),
            Some("127.0.0.1:5000")
        );
        assert_eq!(registry_of("quay.io/org/app"), Some("quay.io"));
        assert_eq!(registry_of("library/busybox"), None);
        assert_eq!(registry_of("busybox"), None);
    }

    #[test]
    fn credentials_go_in_a_private_file_not_the_command_line() {
        let d = tempfile::tempdir().unwrap();
        let req: BuildRequest = serde_json::from_value(serde_json::json!({
            "gm_registry_host": "reg:5000",
            "gm_registry_auth": {"username": "u", "password": "s3cret"},
            "sources": "docker://other:5000/x/y:1", "docker_login": "pu", "docker_password": "pw-secret-2"
        }))
        .unwrap();
        let cfg = ImageConfig {
            storage_dir: d.path().join("st"),
            storage_driver: "vfs".into(),
            parallel: 1,
            timeout: Duration::from_secs(1),
            no_cache: false,
            extra_build_args: vec![],
            show_build_logs: false,
            insecure_registries: vec!["reg:5000".into()],
            callback_secret: None,
            callback_attempts: 1,
            limits: kiln_archive::Limits::default(),
        };
        let env = prepare(d.path(), &req, &cfg).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&env.authfile)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&env.authfile).unwrap()).unwrap();
        assert!(a["auths"]["reg:5000"]["auth"].is_string());
        assert!(a["auths"]["other:5000"]["auth"].is_string());
        let cmd = push(
            &cfg,
            &env,
            "reg:5000/x/app:1.1",
            &d.path().join("dg"),
            Duration::from_secs(1),
        )
        .display();
        assert!(
            !cmd.contains("s3cret") && !cmd.contains("pw-secret-2"),
            "{cmd}"
        );
        let mut req = req.clone();
        req.build_args = serde_json::json!({"K": "v w"}).as_object().cloned();
        let tags = ["reg:5000/x/app:1.1".to_string()];
        let b = bud(&cfg, &env, &req, d.path(), &tags, Duration::from_secs(1)).display();
        assert!(b.contains("--layers ") && !b.contains("--no-cache"), "{b}");
        assert!(
            b.contains("--build-arg K=v w") && !b.contains("s3cret"),
            "{b}"
        );
        let nc = ImageConfig {
            no_cache: true,
            ..cfg.clone()
        };
        let b = bud(&nc, &env, &req, d.path(), &tags, Duration::from_secs(1)).display();
        assert!(b.contains("--layers=false --no-cache"), "{b}");
        assert!(
            std::fs::read_to_string(env.registries_conf.as_ref().unwrap())
                .unwrap()
                .contains("insecure = true")
        );
    }
}
