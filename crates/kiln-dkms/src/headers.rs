//! Where a kernel's build tree comes from: `--headers DIR|TAR`, the host's
//! `/usr/src/linux-headers-KVER` or `/lib/modules/KVER/build`, or Debian's
//! `linux-headers-KVER` packages fetched with `apt-get download` and unpacked
//! into the work root (never installed). Tree finding and the rewrite of
//! Debian's absolute `include /usr/src/...-common/Makefile` are kiln-kmod's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::KernelVersion;
use kiln_engine::JobLog;
use kiln_exec::{CaptureSink, Cmd};
use tokio_util::sync::CancellationToken;

use crate::{io, run, DkmsError};

#[derive(Debug, Clone)]
pub struct KernelTree {
    pub kver: String,
    /// The directory `make -C` is given.
    pub dir: PathBuf,
    /// Host directories the sandbox must leave visible for this tree.
    pub visible: Vec<PathBuf>,
    /// The kernel's `.config` text ("" when the tree has none).
    pub kconfig: String,
    /// Where it came from, for messages.
    pub origin: String,
}

const HIDDEN: [&str; 3] = ["/usr/src", "/lib/modules", "/usr/lib/modules"];

impl KernelTree {
    fn new(kver: &str, dir: PathBuf, visible: Vec<PathBuf>, origin: String) -> KernelTree {
        let kconfig = std::fs::read_to_string(dir.join(".config")).unwrap_or_default();
        KernelTree {
            kver: kver.to_string(),
            dir,
            visible,
            kconfig,
            origin,
        }
    }

    /// The compressor the kernel's `.config` asks modules to be shipped
    /// with, as Kbuild runs it: (tool, arguments, extension).
    pub fn compression(&self) -> Option<(&'static str, Vec<&'static str>, &'static str)> {
        let on = |o: &str| self.kconfig.lines().any(|l| l == format!("{o}=y"));
        if on("CONFIG_MODULE_COMPRESS_XZ") {
            Some((
                "xz",
                vec!["-f", "--check=crc32", "--lzma2=dict=1MiB"],
                ".xz",
            ))
        } else if on("CONFIG_MODULE_COMPRESS_ZSTD") {
            Some(("zstd", vec!["-q", "-f", "--rm", "-T0"], ".zst"))
        } else if on("CONFIG_MODULE_COMPRESS_GZIP") {
            Some(("gzip", vec!["-n", "-f"], ".gz"))
        } else {
            None
        }
    }
}

fn hidden_prefixes(p: &Path) -> Vec<PathBuf> {
    HIDDEN
        .iter()
        .map(PathBuf::from)
        .filter(|h| p.starts_with(h) && h.is_dir())
        .collect()
}

/// A build tree in a directory that is not where its Makefile expects its
/// `-common` half: a shadow directory of links to every entry, with a
/// Makefile whose absolute includes point at the files next to it.
fn shadow(tree: &Path, dst: &Path) -> Result<(PathBuf, Vec<PathBuf>), DkmsError> {
    let mk = std::fs::read_to_string(tree.join("Makefile")).map_err(io(&tree.join("Makefile")))?;
    let mut visible = hidden_prefixes(tree);
    let mut changed = false;
    let mut out = String::new();
    for line in mk.split_inclusive('\n') {
        let t = line.trim();
        if let Some(abs) = t.strip_prefix("include /").map(|p| format!("/{p}")) {
            // The file next to the given tree wins over the host's: the
            // `-common` half must come from the same place as the tree.
            let local = tree.ancestors().skip(1).find_map(|a| {
                let c = a.join(abs.trim_start_matches('/'));
                (c.is_file() && c != Path::new(&abs)).then_some((a.to_path_buf(), c))
            });
            match local {
                Some((root, found)) => {
                    out.push_str(&format!("include {}\n", found.display()));
                    // The whole root: the tree's relative links (scripts,
                    // tools) point into its siblings.
                    visible.extend(hidden_prefixes(&found));
                    visible.push(root);
                    changed = true;
                    continue;
                }
                None => visible.extend(hidden_prefixes(Path::new(&abs))),
            }
        }
        out.push_str(line);
    }
    visible.push(tree.to_path_buf());
    // Where the tree's own top-level links lead (Debian: linux-kbuild).
    for e in std::fs::read_dir(tree).map_err(io(tree))?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_symlink()) {
            if let Ok(target) = std::fs::canonicalize(e.path()) {
                visible.push(target);
            }
        }
    }
    if !changed {
        return Ok((tree.to_path_buf(), visible));
    }
    visible.push(dst.to_path_buf());
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for e in std::fs::read_dir(tree).map_err(io(tree))? {
        let e = e.map_err(io(tree))?;
        let name = e.file_name();
        if name == "Makefile" {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), dst.join(&name)).map_err(io(&dst.join(&name)))?;
    }
    std::fs::write(dst.join("Makefile"), out).map_err(io(&dst.join("Makefile")))?;
    Ok((dst.to_path_buf(), visible))
}

pub(crate) async fn field(deb: &Path, field: &str) -> Result<String, DkmsError> {
    let sink = Arc::new(CaptureSink::default());
    Cmd::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .run(sink.clone(), &CancellationToken::new())
        .await
        .map_err(|source| DkmsError::Exec {
            step: format!("read {field} of {}", deb.display()),
            source,
        })?;
    Ok(sink.stdout().trim().to_string())
}

/// Find or fetch the headers for `kver`. `work` is shared by all builds.
pub async fn prepare(
    kver: &str,
    headers: Option<&Path>,
    work: &Path,
    log: &Arc<JobLog>,
    cancel: &CancellationToken,
) -> Result<KernelTree, DkmsError> {
    let kv: KernelVersion = kver.parse().map_err(|e| DkmsError::Kernel {
        kver: kver.to_string(),
        message: format!("{e}"),
    })?;
    let kerr = |m: String| DkmsError::Kernel {
        kver: kver.to_string(),
        message: m,
    };
    let root = work.join(format!("kernel-{kver}"));
    match headers {
        Some(h) if h.is_dir() => {
            let t = kiln_kmod::find_kernel_tree(h, &kv).map_err(|e| kerr(e.to_string()))?;
            let (dir, visible) = shadow(&t, &root.join("shadow"))?;
            Ok(KernelTree::new(kver, dir, visible, h.display().to_string()))
        }
        Some(h) if h.is_file() => {
            let dst = root.join("root");
            std::fs::create_dir_all(&dst).map_err(io(&dst))?;
            let (h2, d2) = (h.to_path_buf(), dst.clone());
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&h2).map_err(io(&h2))?;
                kiln_archive::extract_tar_gz(f, &d2, kiln_archive::Limits::default())
                    .map_err(|e| DkmsError::Input(format!("{}: {e}", h2.display())))
            })
            .await
            .map_err(|e| kerr(e.to_string()))??;
            let t = kiln_kmod::find_kernel_tree(&dst, &kv).map_err(|e| kerr(e.to_string()))?;
            kiln_kmod::rewrite_absolute_includes(&t, &dst).map_err(|e| kerr(e.to_string()))?;
            Ok(KernelTree::new(kver, t, vec![dst], h.display().to_string()))
        }
        Some(h) => Err(kerr(format!("--headers {} does not exist", h.display()))),
        None => {
            for cand in [
                format!("/usr/src/linux-headers-{kver}"),
                format!("/lib/modules/{kver}/build"),
            ] {
                let c = Path::new(&cand);
                if c.join("Makefile").is_file() {
                    let t = std::fs::canonicalize(c).map_err(io(c))?;
                    let (dir, visible) = shadow(&t, &root.join("shadow"))?;
                    return Ok(KernelTree::new(kver, dir, visible, cand));
                }
            }
            fetch(kver, &kv, &root, log, cancel).await
        }
    }
}

/// `apt-get download` Debian's headers packages and unpack them into `root`.
async fn fetch(
    kver: &str,
    kv: &KernelVersion,
    root: &Path,
    log: &Arc<JobLog>,
    cancel: &CancellationToken,
) -> Result<KernelTree, DkmsError> {
    let debs = root.join("debs");
    let dst = root.join("root");
    std::fs::create_dir_all(&debs).map_err(io(&debs))?;
    std::fs::create_dir_all(&dst).map_err(io(&dst))?;
    let get = |pkg: String| {
        Cmd::new("apt-get")
            .args(["download", "-q"])
            .arg(pkg)
            .cwd(&debs)
            .timeout(std::time::Duration::from_secs(600))
    };
    let main = format!("linux-headers-{kver}");
    run(&format!("download {main}"), get(main.clone()), log, cancel)
        .await
        .map_err(|e| DkmsError::Kernel {
            kver: kver.to_string(),
            message: format!(
                "no headers on this host and none from apt ({e}); pass --headers DIR|TAR"
            ),
        })?;
    let find = |prefix: &str| -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
            })
    };
    let main_deb = find(&format!("{main}_")).ok_or_else(|| DkmsError::Kernel {
        kver: kver.to_string(),
        message: "apt-get download left no .deb".into(),
    })?;
    let depends = field(&main_deb, "Depends").await?;
    for dep in depends
        .split(',')
        .map(|d| d.trim().split(' ').next().unwrap_or(""))
    {
        if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
            run(
                &format!("download {dep}"),
                get(dep.to_string()),
                log,
                cancel,
            )
            .await?;
        }
    }
    for e in std::fs::read_dir(&debs).map_err(io(&debs))?.flatten() {
        run(
            "unpack headers",
            Cmd::new("dpkg-deb").arg("-x").arg(e.path()).arg(&dst),
            log,
            cancel,
        )
        .await?;
    }
    let t = kiln_kmod::find_kernel_tree(&dst, kv).map_err(|e| DkmsError::Kernel {
        kver: kver.to_string(),
        message: e.to_string(),
    })?;
    kiln_kmod::rewrite_absolute_includes(&t, &dst).map_err(|e| DkmsError::Kernel {
        kver: kver.to_string(),
        message: e.to_string(),
    })?;
    Ok(KernelTree::new(
        kver,
        t,
        vec![dst],
        format!("apt: linux-headers-{kver}"),
    ))
}
