//! Finding the kernel build tree inside extracted headers, and making it
//! usable where it landed. Debian's tree (`usr/src/linux-headers-KVER`) has
//! `include /usr/src/linux-headers-KVER-common/Makefile` and relative links
//! into `-common` and `usr/lib/linux-kbuild-X.Y`; the links resolve inside
//! the extraction root as they are, and the absolute include is rewritten
//! to point into the root. Other layouts: `lib/modules/KVER/build`,
//! `usr/src/kernels/KVER` (RHEL), and a bare tree.

use std::path::{Path, PathBuf};

use kiln_core::KernelVersion;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("no kernel build tree for {kver} in the headers archive (looked for lib/modules/{kver}/build, usr/src/linux-headers-{kver}, usr/src/kernels/{kver}, a bare tree, and a single directory with Module.symvers)")]
    NotFound { kver: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn is_tree(p: &Path) -> bool {
    p.join("Makefile").is_file()
        && (p.join("Module.symvers").is_file()
            || p.join(".config").is_file()
            || p.join("include").is_dir())
}

/// Locate the build tree for `kver` below `root`. The result is canonical
/// and inside `root`.
pub fn find_kernel_tree(root: &Path, kver: &KernelVersion) -> Result<PathBuf, TreeError> {
    let k = kver.as_str();
    let root = std::fs::canonicalize(root).map_err(|source| TreeError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let inside = |p: PathBuf| -> Option<PathBuf> {
        let c = std::fs::canonicalize(&p).ok()?;
        (c.starts_with(&root) && is_tree(&c)).then_some(c)
    };
    let named = [
        format!("lib/modules/{k}/build"),
        format!("usr/lib/modules/{k}/build"),
        format!("usr/src/linux-headers-{k}"),
        format!("usr/src/kernels/{k}"),
    ];
    for n in &named {
        if let Some(t) = inside(root.join(n)) {
            return Ok(t);
        }
    }
    if let Some(t) = inside(root.clone()) {
        return Ok(t);
    }
    // A single top-level directory holding a tree (`linux-6.1/`).
    let tops: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|source| TreeError::Io {
            path: root.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    if let [only] = tops.as_slice() {
        if let Some(t) = inside(only.clone()) {
            return Ok(t);
        }
    }
    // Last resort: exactly one directory with Module.symvers.
    let found: Vec<PathBuf> = walkdir::WalkDir::new(&root)
        .max_depth(6)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name() == "Module.symvers")
        .filter_map(|e| e.path().parent().map(Path::to_path_buf))
        .collect();
    if let [only] = found.as_slice() {
        if let Some(t) = inside(only.clone()) {
            return Ok(t);
        }
    }
    Err(TreeError::NotFound {
        kver: k.to_string(),
    })
}

/// Rewrite `include /abs/path` lines in the tree's top Makefile to point
/// into `root` when the included file was shipped in the archive. Returns
/// the rewrites made.
pub fn rewrite_absolute_includes(
    tree: &Path,
    root: &Path,
) -> Result<Vec<(String, String)>, TreeError> {
    let root = std::fs::canonicalize(root).map_err(|source| TreeError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    rewrite_includes_for(tree, &root, &root)
}

/// [`rewrite_absolute_includes`] for a tree that will be used from another
/// place: includes found below `root` are rewritten to point below `at`,
/// where `root` is renamed to afterwards (a staged header tree).
pub fn rewrite_includes_for(
    tree: &Path,
    root: &Path,
    at: &Path,
) -> Result<Vec<(String, String)>, TreeError> {
    let mk = tree.join("Makefile");
    let text = std::fs::read_to_string(&mk).map_err(|source| TreeError::Io {
        path: mk.clone(),
        source,
    })?;
    let mut changes = Vec::new();
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let rest = trimmed
            .strip_prefix("include ")
            .or_else(|| trimmed.strip_prefix("-include "));
        if let Some(path) = rest
            .map(str::trim)
            .filter(|p| p.starts_with('/') && !p.contains(' '))
        {
            let rel = path.trim_start_matches('/');
            if root.join(rel).is_file() && !path.starts_with(at.to_string_lossy().as_ref()) {
                let there = at.join(rel);
                let newline = line.replacen(path, &there.to_string_lossy(), 1);
                changes.push((path.to_string(), there.display().to_string()));
                out.push_str(&newline);
                continue;
            }
        }
        out.push_str(line);
    }
    if !changes.is_empty() {
        // Replaced whole: a build may be reading a kept tree's Makefile.
        let tmp = mk.with_file_name(".Makefile.kiln-tmp");
        std::fs::write(&tmp, out)
            .and_then(|()| std::fs::rename(&tmp, &mk))
            .map_err(|source| TreeError::Io { path: mk, source })?;
    }
    Ok(changes)
}

/// The module signature hash the kernel wants (`CONFIG_MODULE_SIG_HASH`),
/// sha256 when the tree does not say.
pub fn sig_hash(tree: &Path) -> String {
    std::fs::read_to_string(tree.join(".config"))
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("CONFIG_MODULE_SIG_HASH="))
                .map(|v| v.trim().trim_matches('"').to_string())
        })
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .unwrap_or_else(|| "sha256".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kver(s: &str) -> KernelVersion {
        s.parse().unwrap()
    }

    #[test]
    fn finds_debian_layout_and_rewrites_include() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let arch = r.join("usr/src/linux-headers-6.1.0-9-amd64");
        let common = r.join("usr/src/linux-headers-6.1.0-9-common");
        std::fs::create_dir_all(arch.join("include")).unwrap();
        std::fs::create_dir_all(&common).unwrap();
        std::fs::write(
            arch.join("Makefile"),
            "include /usr/src/linux-headers-6.1.0-9-common/Makefile\n",
        )
        .unwrap();
        std::fs::write(common.join("Makefile"), "all:\n").unwrap();
        let t = find_kernel_tree(r, &kver("6.1.0-9-amd64")).unwrap();
        assert_eq!(t, std::fs::canonicalize(&arch).unwrap());
        let ch = rewrite_absolute_includes(&t, r).unwrap();
        assert_eq!(ch.len(), 1);
        let mk = std::fs::read_to_string(arch.join("Makefile")).unwrap();
        assert!(
            mk.starts_with(&format!(
                "include {}",
                std::fs::canonicalize(r).unwrap().display()
            )),
            "{mk}"
        );
        // Idempotent.
        assert!(rewrite_absolute_includes(&t, r).unwrap().is_empty());
        assert!(
            find_kernel_tree(r, &kver("6.1.0-10-amd64")).is_err(),
            "another version is not silently used"
        );
    }

    #[test]
    fn finds_bare_and_rhel_trees_and_reports_missing() {
        let d = tempfile::tempdir().unwrap();
        let rhel = d.path().join("usr/src/kernels/5.14.0-1.el9.x86_64");
        std::fs::create_dir_all(&rhel).unwrap();
        std::fs::write(rhel.join("Makefile"), "").unwrap();
        std::fs::write(rhel.join(".config"), "CONFIG_MODULE_SIG_HASH=\"sha512\"\n").unwrap();
        let t = find_kernel_tree(d.path(), &kver("5.14.0-1.el9.x86_64")).unwrap();
        assert!(t.ends_with("5.14.0-1.el9.x86_64"));
        assert_eq!(sig_hash(&t), "sha512");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_kernel_tree(empty.path(), &kver("6.1.0")),
            Err(TreeError::NotFound { .. })
        ));
    }
}
