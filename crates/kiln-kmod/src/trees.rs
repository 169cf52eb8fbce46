//! Extracted kernel header trees, kept by the content digest of the tree.
//!
//! Writing out 16,000 header files is most of what a cold build costs
//! beyond `make`, and deleting them after every build costs as much again
//! (on ext4 without a journal, creating inodes shortly after mass deletes
//! slows to a millisecond each). So a tree is extracted once, made usable
//! where it lies (its absolute Makefile includes point into it), renamed
//! into place whole, and shared by every build against those headers
//! (bubblewrap shows it read-only). Trees beyond a byte cap are evicted least
//! recently used, never while a build holds a [`TreeLease`] on them.
//!
//! On disk: `<root>/<hex>/` is a tree, `<root>/<hex>.json` its marker
//! (written last, so a tree without one is debris), `<root>/tmp/` holds
//! extractions in progress and trees being deleted; it is emptied at start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use kiln_archive::{ArchiveError, Limits, TreeSummary};
use kiln_core::{Digest, KernelVersion};
use serde::{Deserialize, Serialize};

use crate::tree::{find_kernel_tree, rewrite_includes_for, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum TreesError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The archive is sound (and digested) but holds no build tree for the
    /// kernel: the request still becomes a job, which fails saying so, as
    /// it does when only a digest was taken.
    #[error("{source}")]
    NoBuildTree {
        summary: TreeSummary,
        #[source]
        source: TreeError,
    },
    #[error("header tree store: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TreesError + 'a {
    move |source| TreesError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What `<hex>.json` records of a tree.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// Each kernel version's build tree (`KDIR`) found in it so far,
    /// relative to the tree's directory (one archive may hold several).
    kdirs: BTreeMap<String, PathBuf>,
    bytes: u64,
    /// The directory the tree was prepared for; its Makefile includes name
    /// it, so a tree found anywhere else is not used.
    prepared_at: PathBuf,
}

#[derive(Debug)]
struct Entry {
    kdirs: BTreeMap<String, PathBuf>,
    bytes: u64,
    used: SystemTime,
    pins: usize,
}

#[derive(Debug, Default)]
struct State {
    trees: HashMap<Digest, Entry>,
    /// Kernel versions whose headers a request is extracting right now.
    staging: HashSet<String>,
}

#[derive(Debug)]
pub struct HeaderTrees {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

/// A build's hold on a tree: it is not evicted while this lives.
#[derive(Debug)]
pub struct TreeLease {
    trees: Arc<HeaderTrees>,
    digest: Digest,
    dir: PathBuf,
    kdir: PathBuf,
}

impl TreeLease {
    /// The kernel build tree, for `make KDIR=`.
    pub fn kdir(&self) -> &Path {
        &self.kdir
    }

    /// The whole extracted archive (the `-common` and kbuild halves too).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl Drop for TreeLease {
    fn drop(&mut self) {
        let mut st = self.trees.lock();
        if let Some(e) = st.trees.get_mut(&self.digest) {
            e.pins = e.pins.saturating_sub(1);
            e.used = SystemTime::now();
        }
    }
}

/// A request's claim to extract one kernel version's headers; others for
/// the same version only digest theirs meanwhile.
#[derive(Debug)]
pub struct Staging {
    trees: Arc<HeaderTrees>,
    kver: String,
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.trees.lock().staging.remove(&self.kver);
    }
}

impl HeaderTrees {
    /// Open (and create) the store below `root`, keeping the trees a
    /// previous run left complete and removing its own debris (anything
    /// else in the directory is left alone).
    pub fn open(root: &Path, max_bytes: u64) -> Result<Arc<HeaderTrees>, TreesError> {
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        let root = std::fs::canonicalize(root).map_err(io("resolve", root))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            let old = root.join(format!("tmp.{}", uuid::Uuid::new_v4().simple()));
            std::fs::rename(&tmp, &old).map_err(io("rename", &tmp))?;
            remove_in_background(old);
        }
        std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        let mut trees = HashMap::new();
        for e in std::fs::read_dir(&root).map_err(io("list", &root))? {
            let path = e.map_err(io("list", &root))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name == "tmp" {
                continue;
            }
            let (stem, is_marker) = match name.strip_suffix(".json") {
                Some(s) => (s.to_string(), true),
                None => (name.to_string(), false),
            };
            let Ok(digest) = stem.parse::<Digest>() else {
                // Only what kiln names is kiln's to remove.
                if name.starts_with("tmp.") {
                    remove_in_background(path);
                } else {
                    tracing::warn!(path = %path.display(), "not a header tree; left alone");
                }
                continue;
            };
            if is_marker {
                if !root.join(&stem).is_dir() {
                    let _ = std::fs::remove_file(&path);
                }
                continue; // otherwise read with its tree
            }
            let marker = root.join(format!("{stem}.json"));
            let kept = std::fs::read(&marker)
                .ok()
                .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
                .filter(|m| {
                    m.prepared_at == path && m.kdirs.values().all(|k| path.join(k).is_dir())
                });
            match kept {
                Some(m) => {
                    let used = std::fs::metadata(&marker)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    trees.insert(
                        digest,
                        Entry {
                            kdirs: m.kdirs,
                            bytes: m.bytes,
                            used,
                            pins: 0,
                        },
                    );
                }
                None => {
                    let _ = std::fs::remove_file(&marker);
                    remove_in_background(path);
                }
            }
        }
        let n = trees.len();
        let t = Arc::new(HeaderTrees {
            root,
            max_bytes,
            state: Mutex::new(State {
                trees,
                staging: HashSet::new(),
            }),
        });
        t.evict();
        tracing::info!(root = %t.root.display(), trees = n, max_bytes, "header tree store");
        Ok(t)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claim the extraction of `kver`'s headers at request time. None when
    /// a tree for `kver` is already kept (the upload is most likely a
    /// repack of it, answered from the tree digest alone) or another
    /// request is extracting one.
    pub fn claim(self: &Arc<Self>, kver: &KernelVersion) -> Option<Staging> {
        let mut st = self.lock();
        let k = kver.as_str();
        if st.staging.contains(k) || st.trees.values().any(|e| e.kdirs.contains_key(k)) {
            return None;
        }
        st.staging.insert(k.to_string());
        Some(Staging {
            trees: self.clone(),
            kver: k.to_string(),
        })
    }

    /// True while a request extracts headers for `kver`.
    pub fn staging(&self, kver: &KernelVersion) -> bool {
        self.lock().staging.contains(kver.as_str())
    }

    /// Hold the tree with this digest, if it is kept, with its build tree
    /// for `kver`. A version not built against this tree before has its
    /// build tree looked up (and its Makefile prepared) now.
    pub fn lease(
        self: &Arc<Self>,
        digest: &Digest,
        kver: &KernelVersion,
    ) -> Result<Option<TreeLease>, TreesError> {
        let mut st = self.lock();
        let Some(e) = st.trees.get_mut(digest) else {
            return Ok(None);
        };
        let dir = self.root.join(digest.hex());
        if !dir.is_dir() {
            st.trees.remove(digest);
            return Ok(None);
        }
        let rel = match e.kdirs.get(kver.as_str()) {
            Some(rel) => rel.clone(),
            None => {
                let rel = prepare(&dir, kver, &dir)?;
                e.kdirs.insert(kver.to_string(), rel.clone());
                self.write_marker(digest, e)?;
                rel
            }
        };
        e.pins += 1;
        e.used = SystemTime::now();
        drop(st);
        // The marker's mtime is the last use a restart sees.
        let marker = self.root.join(format!("{}.json", digest.hex()));
        let _ = std::fs::File::options()
            .append(true)
            .open(&marker)
            .and_then(|f| f.set_modified(SystemTime::now()));
        Ok(Some(TreeLease {
            trees: self.clone(),
            digest: *digest,
            kdir: dir.join(rel),
            dir,
        }))
    }

    /// Write `<hex>.json` for a tree in place (temp file, then rename).
    fn write_marker(&self, digest: &Digest, e: &Entry) -> Result<(), TreesError> {
        let hex = digest.hex();
        let marker = Marker {
            kdirs: e.kdirs.clone(),
            bytes: e.bytes,
            prepared_at: self.root.join(&hex),
        };
        let path = self.root.join(format!("{hex}.json"));
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{hex}.json.{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, serde_json::to_vec(&marker).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io("write", &path))
    }

    /// Extract `archive` (a headers tar.gz, already known safe or not),
    /// validating and digesting it in the same pass, find the build tree for
    /// `kver`, prepare it and keep it. Blocking: run it on a blocking thread.
    pub fn stage(
        self: &Arc<Self>,
        archive: &Path,
        kver: &KernelVersion,
        limits: Limits,
    ) -> Result<(TreeSummary, TreeLease), TreesError> {
        let f = std::fs::File::open(archive).map_err(io("open", archive))?;
        self.stage_from(f, kver, limits)
    }

    /// [`stage`](Self::stage) from a reader: an upload still arriving.
    pub fn stage_from(
        self: &Arc<Self>,
        archive: impl std::io::Read,
        kver: &KernelVersion,
        limits: Limits,
    ) -> Result<(TreeSummary, TreeLease), TreesError> {
        let tmp = self
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let r = self.stage_in(archive, kver, limits, &tmp);
        if tmp.exists() {
            remove_in_background(tmp);
        }
        let (summary, lease) = r?;
        self.evict();
        Ok((summary, lease))
    }

    fn stage_in(
        self: &Arc<Self>,
        archive: impl std::io::Read,
        kver: &KernelVersion,
        limits: Limits,
        tmp: &Path,
    ) -> Result<(TreeSummary, TreeLease), TreesError> {
        let summary = kiln_archive::extract_tar_gz_digest(archive, tmp, limits)?;
        let no_tree = |e: TreesError| match e {
            TreesError::Tree(source) => TreesError::NoBuildTree { summary, source },
            e => e,
        };
        if let Some(l) = self.lease(&summary.digest, kver).map_err(no_tree)? {
            return Ok((summary, l));
        }
        let hex = summary.digest.hex();
        let dir = self.root.join(&hex);
        let rel = prepare(tmp, kver, &dir).map_err(no_tree)?;
        if let Err(e) = std::fs::rename(tmp, &dir) {
            // Another extraction of the same tree won the race.
            if let Some(l) = self.lease(&summary.digest, kver).map_err(no_tree)? {
                return Ok((summary, l));
            }
            return Err(io("rename", &dir)(e));
        }
        let entry = Entry {
            kdirs: BTreeMap::from([(kver.to_string(), rel.clone())]),
            bytes: summary.bytes,
            used: SystemTime::now(),
            pins: 1,
        };
        self.write_marker(&summary.digest, &entry)?;
        self.lock().trees.insert(summary.digest, entry);
        tracing::info!(kernel_version = %kver, tree = %hex, entries = summary.entries, bytes = summary.bytes, "header tree kept");
        Ok((
            summary,
            TreeLease {
                trees: self.clone(),
                digest: summary.digest,
                kdir: dir.join(rel),
                dir,
            },
        ))
    }

    /// Drop least recently used unleased trees until the store is within
    /// its cap. The deletion itself runs in the background.
    fn evict(&self) {
        let mut st = self.lock();
        let mut total: u64 = st.trees.values().map(|e| e.bytes).sum();
        while total > self.max_bytes {
            let Some(victim) = st
                .trees
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.used)
                .map(|(d, _)| *d)
            else {
                break;
            };
            let e = st.trees.remove(&victim).expect("victim is in the map");
            total -= e.bytes;
            let hex = victim.hex();
            let _ = std::fs::remove_file(self.root.join(format!("{hex}.json")));
            let gone = self
                .root
                .join("tmp")
                .join(format!("{hex}.{}", uuid::Uuid::new_v4().simple()));
            if std::fs::rename(self.root.join(&hex), &gone).is_ok() {
                remove_in_background(gone);
            }
            tracing::info!(tree = %hex, bytes = e.bytes, "header tree evicted (LRU)");
        }
    }
}

/// Find `kver`'s build tree in the extracted archive at `root` and point its
/// absolute Makefile includes at `at`, where `root` is (or will be) kept.
/// Returns the build tree relative to `root`.
fn prepare(root: &Path, kver: &KernelVersion, at: &Path) -> Result<PathBuf, TreesError> {
    let kdir = find_kernel_tree(root, kver)?;
    let rel = kdir
        .strip_prefix(root)
        .map_err(|_| TreeError::NotFound {
            kver: kver.to_string(),
        })?
        .to_path_buf();
    rewrite_includes_for(&kdir, root, at)?;
    Ok(rel)
}

/// Delete a directory tree off the caller's path (thousands of files).
fn remove_in_background(path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("kiln-rm".into())
        .spawn(move || {
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = r {
                tracing::warn!(path = %path.display(), error = %e, "removing a header tree");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to remove a header tree");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debian-shaped headers tarball: the arch tree includes `-common`
    /// by absolute path.
    fn debian_tgz(dir: &Path, kver: &str, extra: &str) -> PathBuf {
        let base = kver.trim_end_matches("-amd64");
        let src = dir.join(format!("src-{extra}"));
        let arch = src.join(format!("usr/src/linux-headers-{kver}"));
        let common = src.join(format!("usr/src/linux-headers-{base}-common"));
        std::fs::create_dir_all(arch.join("include")).unwrap();
        std::fs::create_dir_all(&common).unwrap();
        std::fs::write(
            arch.join("Makefile"),
            format!("include /usr/src/linux-headers-{base}-common/Makefile\n"),
        )
        .unwrap();
        std::fs::write(common.join("Makefile"), format!("all:\n# {extra}\n")).unwrap();
        let out = dir.join(format!("{kver}-{extra}.tgz"));
        let st = std::process::Command::new("tar")
            .arg("czf")
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg("usr")
            .status()
            .unwrap();
        assert!(st.success());
        out
    }

    #[test]
    fn staged_tree_is_prepared_shared_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let kver: KernelVersion = "6.1.0-9-amd64".parse().unwrap();
        let tgz = debian_tgz(d.path(), kver.as_str(), "a");
        let store = HeaderTrees::open(&d.path().join("trees"), 1 << 30).unwrap();
        let claim = store.claim(&kver).expect("nothing kept yet");
        assert!(store.claim(&kver).is_none(), "one extraction per version");
        assert!(store.staging(&kver));
        let (sum, lease) = store.stage(&tgz, &kver, Limits::default()).unwrap();
        drop(claim);
        assert!(!store.staging(&kver));
        let digest =
            kiln_archive::digest_tar_gz(std::fs::File::open(&tgz).unwrap(), Limits::default())
                .unwrap();
        assert_eq!(sum, digest, "the staged digest is the tree digest");
        assert!(lease
            .kdir()
            .ends_with("usr/src/linux-headers-6.1.0-9-amd64"));
        let mk = std::fs::read_to_string(lease.kdir().join("Makefile")).unwrap();
        assert_eq!(
            mk,
            format!(
                "include {}/usr/src/linux-headers-6.1.0-9-common/Makefile\n",
                lease.dir().display()
            ),
            "the include points into the kept tree"
        );
        assert!(
            store.claim(&kver).is_none(),
            "a tree for this version is kept"
        );
        // Staging the same tree again shares it.
        let (_, again) = store.stage(&tgz, &kver, Limits::default()).unwrap();
        assert_eq!(again.dir(), lease.dir());
        let dir = lease.dir().to_path_buf();
        drop((lease, again));
        drop(store);
        let store = HeaderTrees::open(&d.path().join("trees"), 1 << 30).unwrap();
        let l = store
            .lease(&sum.digest, &kver)
            .unwrap()
            .expect("kept across a restart");
        assert_eq!(l.dir(), dir);
    }

    #[test]
    fn one_archive_with_two_kernels_gives_each_its_own_build_tree() {
        let d = tempfile::tempdir().unwrap();
        let k1: KernelVersion = "6.1.0-1-amd64".parse().unwrap();
        let k2: KernelVersion = "6.1.0-2-amd64".parse().unwrap();
        let both = d.path().join("both");
        for k in [&k1, &k2] {
            let one = debian_tgz(d.path(), k.as_str(), "z");
            let st = std::process::Command::new("tar")
                .arg("xzf")
                .arg(&one)
                .arg("-C")
                .arg({
                    std::fs::create_dir_all(&both).unwrap();
                    &both
                })
                .status()
                .unwrap();
            assert!(st.success());
        }
        let tgz = d.path().join("both.tgz");
        assert!(std::process::Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(&both)
            .arg("usr")
            .status()
            .unwrap()
            .success());
        let store = HeaderTrees::open(&d.path().join("trees"), 1 << 30).unwrap();
        let (sum, l1) = store.stage(&tgz, &k1, Limits::default()).unwrap();
        let l2 = store.lease(&sum.digest, &k2).unwrap().expect("same tree");
        assert_eq!(l1.dir(), l2.dir());
        assert!(l1.kdir().ends_with("linux-headers-6.1.0-1-amd64"));
        assert!(l2.kdir().ends_with("linux-headers-6.1.0-2-amd64"));
        let mk = std::fs::read_to_string(l2.kdir().join("Makefile")).unwrap();
        assert!(
            mk.starts_with(&format!("include {}/", l2.dir().display())),
            "{mk}"
        );
        assert!(store.claim(&k2).is_none(), "k2 is now known in the tree");
        let k3: KernelVersion = "6.1.0-3-amd64".parse().unwrap();
        assert!(matches!(
            store.lease(&sum.digest, &k3),
            Err(TreesError::Tree(TreeError::NotFound { .. }))
        ));
        // Staged for a kernel it lacks: refused, with the digest.
        match store.stage(&tgz, &k3, Limits::default()) {
            Err(TreesError::NoBuildTree { summary, .. }) => assert_eq!(summary, sum),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn eviction_spares_leased_trees_and_drops_debris() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("trees");
        let k1: KernelVersion = "6.1.0-1-amd64".parse().unwrap();
        let k2: KernelVersion = "6.1.0-2-amd64".parse().unwrap();
        let (t1, t2) = (
            debian_tgz(d.path(), k1.as_str(), "x"),
            debian_tgz(d.path(), k2.as_str(), "y"),
        );
        // A cap smaller than one tree: only leases keep trees.
        let store = HeaderTrees::open(&root, 1).unwrap();
        let (s1, l1) = store.stage(&t1, &k1, Limits::default()).unwrap();
        let (s2, l2) = store.stage(&t2, &k2, Limits::default()).unwrap();
        assert!(store.lease(&s1.digest, &k1).unwrap().is_some());
        assert!(store.lease(&s2.digest, &k2).unwrap().is_some());
        drop(l1);
        let (_, l2b) = store.stage(&t2, &k2, Limits::default()).unwrap();
        assert!(
            store.lease(&s1.digest, &k1).unwrap().is_none(),
            "the unleased tree went"
        );
        assert!(store.lease(&s2.digest, &k2).unwrap().is_some());
        drop((l2, l2b));
        // Debris: a tree without a marker and a marker without a tree are
        // removed at open; what kiln did not name is left alone.
        let debris = root.join(Digest::of(b"x").hex());
        std::fs::create_dir_all(&debris).unwrap();
        let orphan = root.join(format!("{}.json", Digest::of(b"y").hex()));
        std::fs::write(&orphan, b"{}").unwrap();
        std::fs::write(root.join("junk"), b"").unwrap();
        drop(store);
        let store = HeaderTrees::open(&root, 1 << 30).unwrap();
        assert!(store.lease(&Digest::of(b"x"), &k1).unwrap().is_none());
        assert!(!orphan.exists());
        assert!(
            root.join("junk").exists(),
            "a file kiln did not make was removed"
        );
        let t = std::time::Instant::now();
        while debris.exists() {
            assert!(t.elapsed().as_secs() < 10, "debris kept");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A bad archive leaves nothing behind.
        let bad = d.path().join("bad.tgz");
        std::fs::write(&bad, b"\x1f\x8bnot really").unwrap();
        assert!(matches!(
            store.stage(&bad, &k1, Limits::default()),
            Err(TreesError::Archive(_))
        ));
    }
}
