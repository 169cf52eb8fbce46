//! Writing tar.gz: deterministic archives (zero mtimes, root owner) so that
//! the same inputs give the same bytes.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::ArchiveError;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Pack `(name in archive, file on disk)` pairs as a flat tar.gz.
pub fn pack_files<W: Write>(w: W, files: &[(String, PathBuf)]) -> Result<W, ArchiveError> {
    let mut b = tar::Builder::new(GzEncoder::new(w, Compression::default()));
    for (name, path) in files {
        let mut f = fs::File::open(path).map_err(io_err(path))?;
        let len = f.metadata().map_err(io_err(path))?.len();
        let mut h = header(tar::EntryType::Regular, 0o644, len);
        b.append_data(&mut h, name, &mut f).map_err(io_err(path))?;
    }
    let gz = b.into_inner().map_err(io_err(Path::new("<archive>")))?;
    gz.finish().map_err(io_err(Path::new("<archive>")))
}

/// Pack each directory in `roots` under its absolute path (minus the leading
/// `/`), as a node does with `tar -C / usr/src/...`. Symlinks that resolve
/// inside one of the roots are kept as links; links that leave them are
/// followed and their contents stored in place, so the archive is
/// self-contained.
/// `links` are extra `(name, target)` symlinks, e.g. `lib/modules/KVER/build`
/// pointing at the tree's absolute path.
pub fn pack_tree_rooted<W: Write>(
    w: W,
    roots: &[PathBuf],
    links: &[(PathBuf, PathBuf)],
    mut progress: impl FnMut(u64),
) -> Result<W, ArchiveError> {
    let canon: Vec<PathBuf> = roots
        .iter()
        .map(|r| fs::canonicalize(r).map_err(io_err(r)))
        .collect::<Result<_, _>>()?;
    let mut b = tar::Builder::new(GzEncoder::new(w, Compression::fast()));
    let mut seen = HashSet::new();
    for (root, real) in roots.iter().zip(&canon) {
        let name = root.strip_prefix("/").unwrap_or(root).to_path_buf();
        add_dir(&mut b, real, &name, &canon, &mut seen, &mut progress)?;
    }
    for (name, target) in links {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, name, target).map_err(io_err(name))?;
    }
    let gz = b.into_inner().map_err(io_err(Path::new("<archive>")))?;
    gz.finish().map_err(io_err(Path::new("<archive>")))
}

fn add_dir<W: Write>(
    b: &mut tar::Builder<W>,
    real: &Path,
    name: &Path,
    roots: &[PathBuf],
    seen: &mut HashSet<PathBuf>,
    progress: &mut impl FnMut(u64),
) -> Result<(), ArchiveError> {
    // `seen` holds the directories being walked above this one: a link back
    // to one of them is a cycle. The same directory reached twice through
    // different links is stored twice, as each link's contents.
    if !seen.insert(real.to_path_buf()) {
        return Ok(());
    }
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, name, io::empty())
        .map_err(io_err(real))?;
    let mut entries: Vec<_> = fs::read_dir(real)
        .map_err(io_err(real))?
        .collect::<Result<_, _>>()
        .map_err(io_err(real))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let child = name.join(e.file_name());
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if meta.file_type().is_symlink() {
            let Ok(target_real) = fs::canonicalize(&path) else {
                tracing::warn!(path = %path.display(), "skipping dangling symlink");
                continue;
            };
            if roots.iter().any(|r| target_real.starts_with(r)) {
                let target = fs::read_link(&path).map_err(io_err(&path))?;
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, &child, &target)
                    .map_err(io_err(&path))?;
            } else if target_real.is_dir() {
                add_dir(b, &target_real, &child, roots, seen, progress)?;
            } else {
                add_file(b, &target_real, &child, progress)?;
            }
        } else if meta.is_dir() {
            add_dir(b, &path, &child, roots, seen, progress)?;
        } else if meta.is_file() {
            add_file(b, &path, &child, progress)?;
        }
    }
    seen.remove(real);
    Ok(())
}

fn add_file<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    progress: &mut impl FnMut(u64),
) -> Result<(), ArchiveError> {
    use std::os::unix::fs::PermissionsExt;
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    let mut h = header(
        tar::EntryType::Regular,
        meta.permissions().mode() & 0o777,
        meta.len(),
    );
    b.append_data(&mut h, name, &mut f).map_err(io_err(path))?;
    progress(meta.len());
    Ok(())
}
