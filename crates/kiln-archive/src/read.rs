//! Reading tar.gz: one pass that validates every entry, feeds the tree
//! digest, and (optionally) writes the entry below a destination directory.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use kiln_core::{Digest, Hasher};
use tar::EntryType;

use crate::ArchiveError;

/// Caps that stop decompression bombs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Total bytes of file contents, after decompression.
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 30,
            max_entries: 500_000,
        }
    }
}

/// What an archive holds, by content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeSummary {
    /// Digest over the sorted (path, kind, mode, content digest or link
    /// target) of every file and link. Directories, mtimes, owners and entry
    /// order do not count, so the same tree repacked has the same digest.
    pub digest: Digest,
    pub entries: u64,
    pub bytes: u64,
}

pub fn is_gzip(head: &[u8]) -> bool {
    head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b
}

/// Validate and digest a tar.gz without writing anything.
pub fn digest_tar_gz(r: impl Read, limits: Limits) -> Result<TreeSummary, ArchiveError> {
    read_entries(r, limits, true, &mut |_| true)
}

/// Validate, digest and extract a tar.gz below `dest`, which must exist.
/// Nothing is written outside `dest`: paths are normalised, `..` and absolute
/// names are refused, absolute link targets are re-rooted at `dest`, links
/// that climb out are refused, and no entry is written through a symlink.
///
/// The returned summary has no digest (`None`): callers that extract already
/// know the archive by its digest, and hashing would slow the reader thread.
pub fn extract_tar_gz(
    r: impl Read,
    dest: &Path,
    limits: Limits,
) -> Result<Extracted, ArchiveError> {
    let s = extract(r, limits, dest)?;
    Ok(Extracted {
        entries: s.entries,
        bytes: s.bytes,
    })
}

/// [`extract_tar_gz`] that also computes the tree digest, for callers that
/// key what they extract by its content (kiln-kmod's header trees): one
/// decompression pass both validates, digests and writes.
pub fn extract_tar_gz_digest(
    r: impl Read,
    dest: &Path,
    limits: Limits,
) -> Result<TreeSummary, ArchiveError> {
    extract_with(r, limits, dest, true, true)
}

/// Like [`extract_tar_gz`], for a tar that may or may not be gzipped
/// (app sources arrive either way).
pub fn extract_tar(r: impl Read, dest: &Path, limits: Limits) -> Result<Extracted, ArchiveError> {
    let s = extract_as(r, limits, dest, false)?;
    Ok(Extracted {
        entries: s.entries,
        bytes: s.bytes,
    })
}

/// What an extraction wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extracted {
    pub entries: u64,
    pub bytes: u64,
}

enum Record {
    File { mode: u32, content: Digest },
    Link { target: Vec<u8> },
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(200).collect()
}

/// Normalise an entry name into components: strips `./`, refuses `..` and
/// absolute names.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, ArchiveError> {
    if raw.first() == Some(&b'/') {
        return Err(ArchiveError::Absolute { entry: lossy(raw) });
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(ArchiveError::Traversal { entry: lossy(raw) }),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Make a link target safe: absolute targets are re-rooted at the archive
/// root (as if the archive were `/`), and the result must stay inside it.
/// Returns the relative target to write.
fn link_target(entry: &[&[u8]], raw_target: &[u8]) -> Result<Vec<u8>, ArchiveError> {
    let escapes = || ArchiveError::LinkEscapes {
        entry: lossy(&entry.join(&b'/')),
        target: lossy(raw_target),
    };
    if raw_target.is_empty() || raw_target.contains(&0) {
        return Err(escapes());
    }
    let parent = &entry[..entry.len().saturating_sub(1)];
    let absolute = raw_target[0] == b'/';
    // Resolve lexically from the root to check containment.
    let mut resolved: Vec<&[u8]> = if absolute {
        Vec::new()
    } else {
        parent.to_vec()
    };
    for c in raw_target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if resolved.pop().is_none() {
                    return Err(escapes());
                }
            }
            c => resolved.push(c),
        }
    }
    if !absolute {
        return Ok(raw_target.to_vec());
    }
    // Rewrite `/a/b` seen from `x/y/link` as `../../a/b`.
    let mut rel = Vec::new();
    for _ in parent {
        rel.extend_from_slice(b"../");
    }
    rel.extend_from_slice(&resolved.join(&b'/'));
    if rel.is_empty() {
        rel.push(b'.');
    }
    Ok(rel)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One filesystem operation, in archive order. Extraction runs them on a
/// writer thread while the reader decompresses, validates and digests.
enum Op {
    Dir {
        path: Vec<u8>,
        mode: u32,
    },
    /// Starts a regular file; its bytes follow as `Chunk`s.
    File {
        path: Vec<u8>,
        mode: u32,
    },
    Chunk(Vec<u8>),
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    Hardlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
}

/// Applies [`Op`]s below `dest`. Every path is checked again here: parents
/// are created one component at a time and never traversed if they are
/// symlinks. Directories already made or checked are remembered, so a tree
/// of 16,000 files does not cost 100,000 extra `lstat`s.
struct Writer<'a> {
    dest: &'a Path,
    dirs: std::collections::HashSet<PathBuf>,
    /// The parent (relative) of the last entry placed: archives list a
    /// directory's entries together, so most entries skip the parent walk.
    last_parent: Option<Vec<u8>>,
    /// The process umask: a mode it leaves whole needs no `chmod` after
    /// creation (one syscall fewer per file).
    umask: Option<u32>,
    file: Option<(fs::File, PathBuf, u32)>,
    symlinks: Vec<PathBuf>,
}

/// The umask, read without changing it (`/proc/self/status`, Linux 4.7+).
fn current_umask() -> Option<u32> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let v = s.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(v.trim(), 8).ok()
}

/// Create with `create` (which must fail with `AlreadyExists` rather than
/// follow anything at `p`); what is there is replaced, as tar does.
fn create_or_replace<T>(
    w: &mut Writer<'_>,
    p: &Path,
    create: impl Fn() -> io::Result<T>,
) -> Result<T, ArchiveError> {
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            w.clear(p)?;
            create().map_err(io_err(p))
        }
        r => r.map_err(io_err(p)),
    }
}

impl Writer<'_> {
    fn path(&self, rel: &[u8]) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        self.dest.join(std::ffi::OsStr::from_bytes(rel))
    }

    /// Create the parent directories of `rel`, refusing to pass through a
    /// symlink. Returns the entry's full path.
    fn prepare_parent(&mut self, rel: &[u8]) -> Result<PathBuf, ArchiveError> {
        let full = self.path(rel);
        let parent = &rel[..rel.iter().rposition(|b| *b == b'/').unwrap_or(0)];
        if self.last_parent.as_deref() == Some(parent) {
            return Ok(full);
        }
        let comps: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
        let mut p = self.dest.to_path_buf();
        for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
            use std::os::unix::ffi::OsStrExt;
            p.push(std::ffi::OsStr::from_bytes(c));
            if self.dirs.contains(&p) {
                continue;
            }
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(ArchiveError::ThroughSymlink {
                        entry: lossy(rel),
                        via: lossy(&comps[..=i].join(&b'/')),
                    })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ArchiveError::Corrupt(format!(
                        "entry {:?} is below a file",
                        lossy(rel)
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&p).map_err(io_err(&p))?
                }
                Err(e) => return Err(io_err(&p)(e)),
            }
            self.dirs.insert(p.clone());
        }
        self.last_parent = Some(parent.to_vec());
        Ok(full)
    }

    /// Whether `mode` needs a `chmod` after creating with it.
    fn masked(&self, mode: u32) -> bool {
        self.umask.is_none_or(|u| mode & u != 0)
    }

    /// Remove whatever sits at `p` (a later entry replaces an earlier one, as
    /// tar does), without following links.
    fn clear(&mut self, p: &Path) -> Result<(), ArchiveError> {
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => {
                self.dirs.retain(|d| !d.starts_with(p));
                self.last_parent = None;
                fs::remove_dir_all(p).map_err(io_err(p))
            }
            Ok(_) => fs::remove_file(p).map_err(io_err(p)),
            Err(_) => Ok(()),
        }
    }

    fn close_file(&mut self) -> Result<(), ArchiveError> {
        if let Some((f, p, mode)) = self.file.take() {
            if self.masked(mode) {
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err(&p))?;
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), ArchiveError> {
        if let Op::Chunk(data) = &op {
            let (f, p, _) = self
                .file
                .as_mut()
                .ok_or_else(|| ArchiveError::Corrupt("file data without a file".into()))?;
            return io::Write::write_all(f, data).map_err(io_err(p));
        }
        self.close_file()?;
        match op {
            Op::Chunk(_) => Ok(()),
            Op::Dir { path, mode } => {
                use std::os::unix::fs::DirBuilderExt;
                let p = self.prepare_parent(&path)?;
                let mode = mode | 0o700;
                let made = match fs::DirBuilder::new().mode(mode).create(&p) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if !fs::symlink_metadata(&p).map_err(io_err(&p))?.is_dir() {
                            self.clear(&p)?;
                            fs::create_dir(&p).map_err(io_err(&p))?;
                        }
                        false
                    }
                    Err(e) => return Err(io_err(&p)(e)),
                };
                if !made || self.masked(mode) {
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                        .map_err(io_err(&p))?;
                }
                self.dirs.insert(p);
                Ok(())
            }
            Op::File { path, mode } => {
                use std::os::unix::fs::OpenOptionsExt;
                let p = self.prepare_parent(&path)?;
                // O_EXCL: never opens through a link left at `p`.
                let f = create_or_replace(self, &p, || {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&p)
                })?;
                self.file = Some((f, p, mode));
                Ok(())
            }
            Op::Symlink { path, target } => {
                use std::os::unix::ffi::OsStrExt;
                let p = self.prepare_parent(&path)?;
                let t = std::ffi::OsStr::from_bytes(&target);
                create_or_replace(self, &p, || symlink(t, &p))?;
                self.symlinks.push(p);
                Ok(())
            }
            Op::Hardlink { path, target } => {
                let src = self.prepare_parent(&target)?;
                let p = self.prepare_parent(&path)?;
                create_or_replace(self, &p, || fs::hard_link(&src, &p))
            }
        }
    }

    /// Lexical checks cannot see links through links (`a -> .`,
    /// `b -> a/..`); resolve every extracted link for real and refuse any
    /// that lands outside.
    fn check_links(&self) -> Result<(), ArchiveError> {
        let root = fs::canonicalize(self.dest).map_err(io_err(self.dest))?;
        for l in &self.symlinks {
            if let Ok(real) = fs::canonicalize(l) {
                if !real.starts_with(&root) {
                    return Err(ArchiveError::LinkEscapes {
                        entry: l.strip_prefix(self.dest).unwrap_or(l).display().to_string(),
                        target: fs::read_link(l)
                            .map(|t| t.display().to_string())
                            .unwrap_or_default(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn extract(r: impl Read, limits: Limits, dest: &Path) -> Result<TreeSummary, ArchiveError> {
    extract_as(r, limits, dest, true)
}

fn extract_as(
    r: impl Read,
    limits: Limits,
    dest: &Path,
    gzip: bool,
) -> Result<TreeSummary, ArchiveError> {
    extract_with(r, limits, dest, gzip, false)
}

fn extract_with(
    r: impl Read,
    limits: Limits,
    dest: &Path,
    gzip: bool,
    hash: bool,
) -> Result<TreeSummary, ArchiveError> {
    // The reader (decompress, validate, digest) and the writer (filesystem)
    // run on two threads; the bounded channel keeps memory flat.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Op>(256);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), ArchiveError> {
            let mut w = Writer {
                dest,
                dirs: Default::default(),
                last_parent: None,
                umask: current_umask(),
                file: None,
                symlinks: Vec::new(),
            };
            for op in rx {
                w.apply(op)?;
            }
            w.close_file()?;
            w.check_links()
        });
        // A failed send means the writer stopped on an error: report that
        // one. Otherwise the reader's error (if any) is the first cause.
        let mut writer_stopped = false;
        let read = read_entries_as(r, limits, hash, gzip, &mut |op| {
            let sent = tx.send(op).is_ok();
            writer_stopped |= !sent;
            sent
        });
        drop(tx);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(ArchiveError::Corrupt("extraction thread panicked".into())));
        match (read, wrote) {
            (Err(e), _) if !writer_stopped => Err(e),
            (_, Err(w)) => Err(w),
            (read, Ok(())) => read,
        }
    })
}

/// Read every entry, validate it, feed the tree digest (when `hash`), and
/// hand each filesystem operation to `emit` (which returns false to stop).
fn read_entries(
    r: impl Read,
    limits: Limits,
    hash: bool,
    emit: &mut dyn FnMut(Op) -> bool,
) -> Result<TreeSummary, ArchiveError> {
    read_entries_as(r, limits, hash, true, emit)
}

fn read_entries_as(
    r: impl Read,
    limits: Limits,
    hash: bool,
    gzip: bool,
    emit: &mut dyn FnMut(Op) -> bool,
) -> Result<TreeSummary, ArchiveError> {
    let mut r = io::BufReader::with_capacity(256 * 1024, r);
    let head = io::BufRead::fill_buf(&mut r).map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    let inner: Box<dyn Read> = if is_gzip(head) {
        // Inflate in large blocks (its fast path); tar's 512-byte header
        // reads are then served from this buffer.
        Box::new(io::BufReader::with_capacity(
            256 * 1024,
            MultiGzDecoder::new(r),
        ))
    } else if gzip {
        return Err(ArchiveError::NotGzip);
    } else {
        Box::new(r)
    };
    let mut ar = tar::Archive::new(inner);
    let corrupt = |e: io::Error| ArchiveError::Corrupt(e.to_string());
    let stopped = || ArchiveError::Corrupt("extraction stopped".into());
    let mut records: BTreeMap<Vec<u8>, Record> = BTreeMap::new();
    // The symlinks among `records`, for the per-entry "below a link" check.
    let mut links: HashSet<Vec<u8>> = HashSet::new();
    let mut entries = 0u64;
    let mut bytes = 0u64;
    const CHUNK: usize = 128 * 1024;
    for entry in ar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        entries += 1;
        if entries > limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let comps = components(&raw)?;
        let key = comps.join(&b'/');
        // No entry may sit below a symlink of the archive: writing it would
        // follow the link. Checked here so that validation without
        // extraction (the request path) refuses it too.
        for i in (1..comps.len()).filter(|_| !links.is_empty()) {
            if links.contains(&comps[..i].join(&b'/')) {
                return Err(ArchiveError::ThroughSymlink {
                    entry: lossy(&key),
                    via: lossy(&comps[..i].join(&b'/')),
                });
            }
        }
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().map_err(corrupt)? & 0o777;
        if comps.is_empty() {
            if kind.is_dir() {
                continue;
            }
            return Err(ArchiveError::Corrupt(format!(
                "entry {:?} has no name",
                lossy(&raw)
            )));
        }
        match kind {
            EntryType::Directory => {
                if !emit(Op::Dir { path: key, mode }) {
                    return Err(stopped());
                }
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.header().size().map_err(corrupt)?;
                if bytes.saturating_add(size) > limits.max_bytes {
                    return Err(ArchiveError::TooLarge {
                        limit: limits.max_bytes,
                    });
                }
                if !emit(Op::File {
                    path: key.clone(),
                    mode,
                }) {
                    return Err(stopped());
                }
                let mut h = Hasher::new();
                let mut left = size;
                while left > 0 {
                    // Exactly what is left of the entry, up to a chunk, into
                    // an uninitialised buffer (no zeroing, no EOF probe).
                    let want = CHUNK.min(left as usize);
                    let mut buf = Vec::with_capacity(want);
                    let n = (&mut entry)
                        .take(want as u64)
                        .read_to_end(&mut buf)
                        .map_err(corrupt)?;
                    if n == 0 {
                        return Err(ArchiveError::Corrupt(format!(
                            "entry {:?} is cut short",
                            lossy(&key)
                        )));
                    }
                    left -= n as u64;
                    bytes += n as u64;
                    if bytes > limits.max_bytes {
                        return Err(ArchiveError::TooLarge {
                            limit: limits.max_bytes,
                        });
                    }
                    if hash {
                        h.update(&buf);
                    }
                    if !emit(Op::Chunk(buf)) {
                        return Err(stopped());
                    }
                }
                links.remove(&key);
                records.insert(
                    key,
                    Record::File {
                        mode,
                        content: h.finish(),
                    },
                );
            }
            EntryType::Symlink => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        ArchiveError::Corrupt(format!("symlink {:?} has no target", lossy(&raw)))
                    })?
                    .into_owned();
                let target = link_target(&comps, &raw_target)?;
                if !emit(Op::Symlink {
                    path: key.clone(),
                    target: target.clone(),
                }) {
                    return Err(stopped());
                }
                links.insert(key.clone());
                records.insert(key, Record::Link { target });
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        ArchiveError::Corrupt(format!("hardlink {:?} has no target", lossy(&raw)))
                    })?
                    .into_owned();
                let escapes = || ArchiveError::LinkEscapes {
                    entry: lossy(&raw),
                    target: lossy(&raw_target),
                };
                let tkey = components(&raw_target).map_err(|_| escapes())?.join(&b'/');
                // A hard link must name a regular file that came earlier.
                let (tmode, content) = match records.get(&tkey) {
                    Some(Record::File { mode, content }) => (*mode, *content),
                    _ => return Err(escapes()),
                };
                if !emit(Op::Hardlink {
                    path: key.clone(),
                    target: tkey,
                }) {
                    return Err(stopped());
                }
                links.remove(&key);
                records.insert(
                    key,
                    Record::File {
                        mode: tmode,
                        content,
                    },
                );
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(ArchiveError::DeviceNode { entry: lossy(&raw) })
            }
            EntryType::XGlobalHeader | EntryType::XHeader => {}
            other => {
                return Err(ArchiveError::Unsupported {
                    entry: lossy(&raw),
                    kind: format!("{other:?}"),
                })
            }
        }
    }
    let mut h = Hasher::new();
    h.field(b"kiln-tree-v1");
    for (path, rec) in &records {
        h.field(path);
        match rec {
            Record::File { mode, content } => {
                h.field(b"f")
                    .field(&mode.to_le_bytes())
                    .field(content.as_bytes());
            }
            Record::Link { target } => {
                h.field(b"l").field(target);
            }
        }
    }
    Ok(TreeSummary {
        digest: h.finish(),
        entries,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_normalise_and_refuse() {
        assert_eq!(
            components(b"./a//b/./c").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(matches!(
            components(b"/etc/passwd"),
            Err(ArchiveError::Absolute { .. })
        ));
        assert!(matches!(
            components(b"a/../../b"),
            Err(ArchiveError::Traversal { .. })
        ));
    }

    /// A tar.gz written by GNU tar from `dir`, with `extra` tar arguments.
    fn tgz(dir: &Path, extra: &[&str]) -> Vec<u8> {
        let out = std::process::Command::new("tar")
            .args(["czf", "-", "-C"])
            .arg(dir)
            .args(extra)
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn digest_ignores_packing_and_extraction_writes_the_tree() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/f"), b"data").unwrap();
        std::fs::write(src.path().join("top"), b"top").unwrap();
        std::os::unix::fs::symlink("a/b/f", src.path().join("l")).unwrap();
        let one = tgz(src.path(), &["--mtime=2001-01-01"]);
        let two = tgz(
            src.path(),
            &[
                "--mtime=2020-01-01",
                "--owner=7",
                "--group=7",
                "--sort=name",
            ],
        );
        assert_ne!(one, two);
        let d1 = digest_tar_gz(&one[..], Limits::default()).unwrap();
        let d2 = digest_tar_gz(&two[..], Limits::default()).unwrap();
        assert_eq!(d1.digest, d2.digest);
        let dest = tempfile::tempdir().unwrap();
        let x = extract_tar_gz(&one[..], dest.path(), Limits::default()).unwrap();
        assert_eq!((x.entries, x.bytes), (d1.entries, d1.bytes));
        let dest2 = tempfile::tempdir().unwrap();
        let x2 = extract_tar_gz_digest(&two[..], dest2.path(), Limits::default()).unwrap();
        assert_eq!(x2, d2, "extracting digests like the digest-only pass");
        assert_eq!(std::fs::read(dest.path().join("a/b/f")).unwrap(), b"data");
        assert_eq!(
            std::fs::read_link(dest.path().join("l")).unwrap(),
            Path::new("a/b/f")
        );
        std::fs::write(src.path().join("top"), b"changed").unwrap();
        let three = tgz(src.path(), &[]);
        assert_ne!(
            digest_tar_gz(&three[..], Limits::default()).unwrap().digest,
            d1.digest
        );
    }

    #[test]
    fn link_targets_are_rerooted_or_refused() {
        let e: Vec<&[u8]> = vec![b"lib", b"modules", b"6.1.0", b"build"];
        assert_eq!(
            link_target(&e, b"/usr/src/linux-headers-6.1.0").unwrap(),
            b"../../../usr/src/linux-headers-6.1.0".to_vec()
        );
        assert_eq!(link_target(&e, b"../../x").unwrap(), b"../../x".to_vec());
        assert!(link_target(&e, b"../../../../etc").is_err());
        let top: Vec<&[u8]> = vec![b"l"];
        assert!(link_target(&top, b"..").is_err());
        assert_eq!(link_target(&top, b"/").unwrap(), b".".to_vec());
    }
}
