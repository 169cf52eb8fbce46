//! `kiln dkms2bin`: rebuild DKMS packages into binary kernel-module `.deb`
//! packages, one per DKMS package and kernel, and index them as an apt
//! repository. DKMS 3 dropped `mkdeb`/`mkbmdeb`; this is their replacement.
//!
//! The flow for one package and kernel: evaluate `dkms.conf` in bash (in the
//! sandbox), check `BUILD_EXCLUSIVE_*`, copy the source to
//! `$dkms_tree/NAME/VERSION/build` as dkms does, apply `PATCH[]`, run
//! `PRE_BUILD`, `MAKE` (with dkms's `-jN KERNELRELEASE=`), `POST_BUILD`, then
//! strip, sign and compress each module and write the `.deb`. Kernel trees
//! come from kiln-kmod's tree code; nothing is installed on the host.

mod conf;
mod deb;
mod headers;
mod job;
mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::JobLog;
use kiln_exec::{Cmd, ExecError, LogSink};
use kiln_kmod::{Sandbox, Signing};
use tokio_util::sync::CancellationToken;

pub use conf::{version_cmp, DkmsConf, ModuleSpec};
pub use deb::{package_base, write_apt_index};
pub use headers::{prepare as prepare_kernel, KernelTree};
pub use job::{DkmsJobs, DkmsOutcome, DkmsParams, DkmsResult, KIND};
pub use source::{prepare as prepare_source, SourcePkg};

#[derive(Debug, thiserror::Error)]
pub enum DkmsError {
    #[error("{step}: {source}")]
    Exec {
        step: String,
        #[source]
        source: ExecError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Conf { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
    #[error("kernel {kver}: {message}")]
    Kernel { kver: String, message: String },
    #[error("module {name} was not built: expected {path}")]
    MissingModule { name: String, path: PathBuf },
}

impl DkmsError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, DkmsError::Exec { source, .. } if source.is_cancelled())
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DkmsError + '_ {
    move |source| DkmsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a build needs from its surroundings.
#[derive(Debug, Clone)]
pub struct Env {
    pub sandbox: Sandbox,
    pub signing: Option<Signing>,
    /// `make -jN` inside one build.
    pub make_jobs: usize,
    /// The kernel's architecture as dkms names it (`uname -m`).
    pub arch: String,
    /// The Debian architecture of the output (`dpkg --print-architecture`).
    pub deb_arch: String,
    pub maintainer: String,
    pub timeout: Duration,
}

impl Env {
    /// The machine's architecture names.
    pub fn host_arch() -> (String, String) {
        let uname = std::env::consts::ARCH.to_string();
        let deb = match uname.as_str() {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "i386",
            "powerpc64" => "ppc64el",
            other => other,
        }
        .to_string();
        (uname, deb)
    }
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Built { deb: PathBuf, modules: Vec<String> },
    Skipped(String),
}

pub(crate) async fn run(
    step: &str,
    cmd: Cmd,
    log: &Arc<JobLog>,
    cancel: &CancellationToken,
) -> Result<(), DkmsError> {
    let shown = cmd.display();
    run_shown(step, &shown, cmd, log, cancel).await
}

/// [`run`], logging `shown` instead of the whole command line.
pub(crate) async fn run_shown(
    step: &str,
    shown: &str,
    cmd: Cmd,
    log: &Arc<JobLog>,
    cancel: &CancellationToken,
) -> Result<(), DkmsError> {
    log.info(&format!("{step}: {shown}"));
    let sink: Arc<dyn LogSink> = log.clone();
    cmd.run(sink, cancel)
        .await
        .map_err(|source| DkmsError::Exec {
            step: step.to_string(),
            source,
        })
}

/// Build one DKMS package for one kernel into a `.deb` in `out_dir`.
/// `work` is this build's own scratch directory.
pub async fn build(
    src: &SourcePkg,
    tree: &KernelTree,
    env: &Env,
    work: &Path,
    out_dir: &Path,
    log: Arc<JobLog>,
    cancel: &CancellationToken,
) -> Result<Outcome, DkmsError> {
    std::fs::create_dir_all(work).map_err(io(work))?;
    let work = std::fs::canonicalize(work).map_err(io(work))?;
    let dkms_tree = work.join("tree");
    std::fs::create_dir_all(&dkms_tree).map_err(io(&dkms_tree))?;
    let mut visible = tree.visible.clone();
    visible.extend(src.visible());
    let sandboxed = |cmd: Cmd, cwd: &Path| {
        env.sandbox
            .wrap_with(cmd, &work, cwd, false, &visible)
            .timeout(env.timeout)
    };

    // 1. dkms.conf, evaluated in bash in the sandbox.
    let out = work.join("dkms.conf.eval");
    let eval = Cmd::new("bash")
        .args(["-c", conf::EVAL, "kiln-dkms-eval"])
        .arg(&tree.kver)
        .arg(&env.arch)
        .arg(&tree.dir)
        .arg(&dkms_tree)
        .arg(&src.dir)
        .arg(src.dir.join("dkms.conf"))
        .arg(&out);
    let shown = format!(
        "bash <kiln's dkms.conf evaluator> {}",
        src.dir.join("dkms.conf").display()
    );
    run_shown(
        "evaluate dkms.conf",
        &shown,
        sandboxed(eval, &work),
        &log,
        cancel,
    )
    .await?;
    let bytes = std::fs::read(&out).map_err(io(&out))?;
    let conf = conf::parse(&bytes, &src.dir.join("dkms.conf"))?;
    log.info(&format!(
        "{} {}: {} module(s), make: {}",
        conf.name,
        conf.version,
        conf.modules.len(),
        conf.make.as_deref().unwrap_or("(dkms default)")
    ));

    // 2. BUILD_EXCLUSIVE_*.
    if let Some(why) = conf.exclusion(&tree.kver, &tree.kconfig) {
        log.info(&format!("skipped: {why}"));
        return Ok(Outcome::Skipped(why));
    }

    // 3. The source where dkms would put it.
    let bdir = dkms_tree.join(&conf.name).join(&conf.version).join("build");
    std::fs::create_dir_all(&bdir).map_err(io(&bdir))?;
    let mut cp = src.dir.as_os_str().to_owned();
    cp.push("/.");
    run(
        "copy the source",
        Cmd::new("cp").arg("-a").arg(cp).arg(&bdir),
        &log,
        cancel,
    )
    .await?;

    // 4. PATCH[], PRE_BUILD, MAKE, POST_BUILD.
    for p in &conf.patches {
        if p.contains('/') {
            return Err(DkmsError::Conf {
                path: src.dir.join("dkms.conf"),
                message: format!("PATCH {p:?} must be a file name in patches/"),
            });
        }
        let file = bdir.join("patches").join(p);
        run(
            &format!("apply patch {p}"),
            Cmd::new("patch")
                .args(["-p1", "--batch", "--forward", "-i"])
                .arg(&file)
                .cwd(&bdir),
            &log,
            cancel,
        )
        .await?;
    }
    // dkms runs these as "$build_dir/$PRE_BUILD", arguments and all.
    let script = |s: &str| Cmd::new("bash").args(["-c", &format!("{}/{}", bdir.display(), s)]);
    if let Some(pre) = &conf.pre_build {
        run("PRE_BUILD", sandboxed(script(pre), &bdir), &log, cancel).await?;
    }
    let make = conf
        .make
        .clone()
        .unwrap_or_else(|| format!("make -C {} M={}", tree.dir.display(), bdir.display()));
    // dkms: "${make_command/#make/make -j$parallel_jobs KERNELRELEASE=$kernelver}".
    let make = match make.strip_prefix("make") {
        Some(rest) => format!("make -j{} KERNELRELEASE={}{rest}", env.make_jobs, tree.kver),
        None => make,
    };
    run(
        "make",
        sandboxed(Cmd::new("bash").args(["-c", &make]), &bdir),
        &log,
        cancel,
    )
    .await?;
    if let Some(post) = &conf.post_build {
        run("POST_BUILD", sandboxed(script(post), &bdir), &log, cancel).await?;
    }

    // 5. Collect, strip, sign, compress; package.
    let stage = work.join("deb");
    let _ = std::fs::remove_dir_all(&stage);
    let moddir = stage.join(format!("lib/modules/{}/updates/dkms", tree.kver));
    std::fs::create_dir_all(&moddir).map_err(io(&moddir))?;
    let mut names = Vec::new();
    for m in &conf.modules {
        let built = bdir
            .join(m.built_location.trim_start_matches('/'))
            .join(format!("{}.ko", m.built_name));
        if !built.is_file() {
            return Err(DkmsError::MissingModule {
                name: m.built_name.clone(),
                path: built,
            });
        }
        let dest = moddir.join(format!("{}.ko", m.dest_name));
        std::fs::copy(&built, &dest).map_err(io(&dest))?;
        if m.strip {
            run(
                &format!("strip {}", m.dest_name),
                Cmd::new("strip").arg("-g").arg(&dest),
                &log,
                cancel,
            )
            .await?;
        }
        if let Some(s) = &env.signing {
            let hash = kiln_kmod::sig_hash(&tree.dir);
            let sign = Cmd::new(tree.dir.join("scripts/sign-file"))
                .arg(&hash)
                .arg(&s.key)
                .arg(&s.cert)
                .arg(&dest);
            run(&format!("sign {}", m.dest_name), sign, &log, cancel).await?;
        }
        let name = match tree.compression() {
            Some((tool, args, ext)) => {
                run(
                    &format!("compress {}", m.dest_name),
                    Cmd::new(tool).args(args).arg(&dest),
                    &log,
                    cancel,
                )
                .await?;
                format!("{}.ko{ext}", m.dest_name)
            }
            None => format!("{}.ko", m.dest_name),
        };
        names.push(name);
    }
    let deb = deb::package(&deb::Package {
        conf: &conf,
        src,
        kver: &tree.kver,
        arch: &env.deb_arch,
        maintainer: &env.maintainer,
        stage: &stage,
        out_dir,
        modules: &names,
        log: &log,
        cancel,
    })
    .await?;
    log.info(&format!("wrote {}", deb.display()));
    Ok(Outcome::Built {
        deb,
        modules: names,
    })
}
