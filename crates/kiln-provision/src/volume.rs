//! Volumes: where an image is written. Three backends, chosen by config:
//! `lvm` (`/dev/VG/NAME`, created with lvcreate), `dir` (raw files
//! `DIR/NAME`, like a libvirt directory pool) and `device` (existing block
//! devices or links to them in `DIR/NAME`, never created or removed).
//!
//! One rule for all: a volume within ±5% of the request is reused (grown to
//! the request when smaller), a smaller one is grown when that is safe (not
//! a device, not open), anything else is refused and left untouched. Only a
//! volume this job created is ever removed on rollback.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_exec::{CaptureSink, Cmd, LogSink};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name {name:?}: {why}")]
    Name { name: String, why: &'static str },
    #[error("volume {path} exists and is {have} bytes; the request is {want} bytes, and it is only reused within ±5% (or grown when smaller); refused and left untouched")]
    Incompatible { path: PathBuf, have: u64, want: u64 },
    #[error("volume {path} is not usable: {why}; refused and left untouched")]
    Unusable { path: PathBuf, why: String },
    #[error("volume {0} is being provisioned by another job")]
    Busy(PathBuf),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Exec(#[from] kiln_exec::ExecError),
    #[error("{tool} printed something unexpected: {output:?}")]
    Parse { tool: &'static str, output: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A volume name: a file name and an LV name at once, so it can never be a
/// path or an option. 1–120 of `A-Za-z0-9._+-`, starting with a letter or
/// digit.
pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let bad = |why| {
        Err(VolumeError::Name {
            name: name.chars().take(200).collect(),
            why,
        })
    };
    if name.is_empty() || name.len() > 120 {
        return bad("it must be 1 to 120 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("it must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    {
        return bad("only letters, digits and . _ + - are allowed");
    }
    // Names LVM keeps for itself.
    if name.starts_with("snapshot") || name.starts_with("pvmove") {
        return bad("LVM reserves names starting with snapshot or pvmove");
    }
    for r in [
        "_cdata", "_cmeta", "_corig", "_mlog", "_mimage", "_pmspare", "_rimage", "_rmeta",
        "_tdata", "_tmeta", "_vorigin", "_vdata",
    ] {
        if name.contains(r) {
            return bad("LVM reserves names containing _cdata, _mlog, _rimage, _tmeta and similar");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// LVs in a volume group. `metadata_only` passes `--driverloaded n -an
    /// -Zn` to LVM (hosts without device-mapper): LVs are created, grown
    /// and removed in the metadata only, so writing them then fails.
    Lvm { vg: String, metadata_only: bool },
    /// Raw files in a directory.
    Dir(PathBuf),
    /// Existing block devices (or links to them) in a directory.
    Device(PathBuf),
}

/// A volume ready to be written.
#[derive(Debug, Clone)]
pub struct Volume {
    pub path: PathBuf,
    /// This job created it (so rollback may remove it).
    pub created: bool,
    /// A block device (rather than a file).
    pub block: bool,
    pub size: u64,
    /// Known to read as zeros everywhere (a new sparse file).
    pub zeroed: bool,
}

/// What preparing a volume will do; decided before anything is downloaded,
/// so a refusal costs nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Create,
    Reuse { have: u64 },
    Grow { have: u64 },
}

/// Volumes held by running jobs of this process.
#[derive(Debug, Default)]
pub struct Locks(Mutex<HashSet<PathBuf>>);

#[derive(Debug)]
pub struct VolumeLock {
    locks: Arc<Locks>,
    path: PathBuf,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        self.locks
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.path);
    }
}

impl Locks {
    pub fn take(self: &Arc<Self>, path: &Path) -> Result<VolumeLock, VolumeError> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(path.to_path_buf()) {
            return Err(VolumeError::Busy(path.to_path_buf()));
        }
        Ok(VolumeLock {
            locks: self.clone(),
            path: path.to_path_buf(),
        })
    }
}

/// The ±5% rule.
fn decide(path: &Path, have: u64, want: u64, can_grow: bool) -> Result<Plan, VolumeError> {
    let lo = want - want / 20;
    let hi = want + want / 20;
    if (lo..=hi).contains(&have) && (have >= want || can_grow) {
        return Ok(if have >= want {
            Plan::Reuse { have }
        } else {
            Plan::Grow { have }
        });
    }
    if have < want && can_grow {
        return Ok(Plan::Grow { have });
    }
    Err(VolumeError::Incompatible {
        path: path.to_path_buf(),
        have,
        want,
    })
}

/// Bytes of a block device.
pub fn device_size(path: &Path) -> Result<u64, VolumeError> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    f.seek(std::io::SeekFrom::End(0)).map_err(io("size", path))
}

impl Backend {
    pub fn describe(&self) -> String {
        match self {
            Backend::Lvm { vg, metadata_only } => {
                format!(
                    "lvm (volume group {vg}{})",
                    if *metadata_only {
                        ", metadata only"
                    } else {
                        ""
                    }
                )
            }
            Backend::Dir(d) => format!("dir ({})", d.display()),
            Backend::Device(d) => format!("device ({})", d.display()),
        }
    }

    /// Where volume `name` lives.
    pub fn path(&self, name: &str) -> PathBuf {
        match self {
            Backend::Lvm { vg, .. } => Path::new("/dev").join(vg).join(name),
            Backend::Dir(d) | Backend::Device(d) => d.join(name),
        }
    }

    fn lvm(&self, sub: &str, timeout: Duration) -> Cmd {
        let mut c = Cmd::new(sub).timeout(timeout);
        if let Backend::Lvm {
            metadata_only: true,
            ..
        } = self
        {
            c = c.args(["--driverloaded", "n"]);
        }
        c
    }

    /// Size and open state of LV `name`, `None` if absent.
    async fn lv(
        &self,
        vg: &str,
        name: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<(u64, String)>, VolumeError> {
        let sink = Arc::new(CaptureSink::default());
        let r = self
            .lvm("lvs", timeout)
            .args([
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_size,lv_attr,segtype",
                "-S",
            ])
            .arg(format!("lv_name={name}"))
            .arg(vg)
            .run(sink.clone(), cancel)
            .await;
        r?;
        let out = sink.stdout();
        let line = out.lines().map(str::trim).find(|l| !l.is_empty());
        let Some(line) = line else { return Ok(None) };
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [size, attr, seg] => {
                let size = size.parse().map_err(|_| VolumeError::Parse {
                    tool: "lvs",
                    output: line.to_string(),
                })?;
                Ok(Some((size, format!("{attr} {seg}"))))
            }
            _ => Err(VolumeError::Parse {
                tool: "lvs",
                output: line.to_string(),
            }),
        }
    }

    /// Decide what to do with volume `name` for a request of `want` bytes.
    pub async fn plan(
        &self,
        name: &str,
        want: u64,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Plan, VolumeError> {
        validate_name(name)?;
        let path = self.path(name);
        match self {
            Backend::Dir(_) => match std::fs::symlink_metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Plan::Create),
                Err(e) => Err(io("inspect", &path)(e)),
                Ok(m) if m.file_type().is_file() => decide(&path, m.len(), want, true),
                Ok(_) => Err(VolumeError::Unusable {
                    path,
                    why: "it is not a regular file (a link, directory or device)".into(),
                }),
            },
            Backend::Device(_) => {
                let m = std::fs::metadata(&path).map_err(|e| VolumeError::Unusable {
                    path: path.clone(),
                    why: format!("the device backend only writes existing block devices ({e})"),
                })?;
                if !m.file_type().is_block_device() {
                    return Err(VolumeError::Unusable {
                        path,
                        why: "it is not a block device".into(),
                    });
                }
                decide(&path, device_size(&path)?, want, false)
            }
            Backend::Lvm { vg, .. } => match self.lv(vg, name, timeout, cancel).await? {
                None => Ok(Plan::Create),
                Some((have, attr)) => {
                    let (a, seg) = attr.split_once(' ').unwrap_or((&attr, ""));
                    // lv_attr: type, permissions, ..., 6th = open.
                    let kind = a.chars().next().unwrap_or('-');
                    if !matches!(kind, '-' | 'V') || !matches!(seg, "linear" | "striped" | "thin") {
                        return Err(VolumeError::Unusable {
                            path,
                            why: format!("it is a {seg} LV (attributes {a}), not a plain volume"),
                        });
                    }
                    if a.chars().nth(1) == Some('r') {
                        return Err(VolumeError::Unusable {
                            path,
                            why: "it is read-only".into(),
                        });
                    }
                    let open = a.chars().nth(5) == Some('o');
                    decide(&path, have, want, !open).map_err(|e| match e {
                        VolumeError::Incompatible { .. } if open && have < want => {
                            VolumeError::Unusable {
                                path: path.clone(),
                                why: format!("it is {have} bytes and open (in use), so it cannot be grown to {want}"),
                            }
                        }
                        e => e,
                    })
                }
            },
        }
    }

    /// Carry out a plan.
    pub async fn apply(
        &self,
        name: &str,
        plan: &Plan,
        want: u64,
        timeout: Duration,
        cancel: &CancellationToken,
        log: Arc<dyn LogSink>,
    ) -> Result<Volume, VolumeError> {
        let path = self.path(name);
        match (self, plan) {
            (Backend::Dir(dir), Plan::Create) => {
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io("create", &path))?;
                f.set_len(want).map_err(io("size", &path))?;
                f.sync_all().map_err(io("fsync", &path))?;
                Ok(Volume {
                    path,
                    created: true,
                    block: false,
                    size: want,
                    zeroed: true,
                })
            }
            (Backend::Dir(_), Plan::Reuse { have } | Plan::Grow { have }) => {
                let size = (*have).max(want);
                if size > *have {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io("open", &path))?;
                    f.set_len(size).map_err(io("grow", &path))?;
                    f.sync_all().map_err(io("fsync", &path))?;
                }
                Ok(Volume {
                    path,
                    created: false,
                    block: false,
                    size,
                    zeroed: false,
                })
            }
            (Backend::Device(_), Plan::Reuse { have }) => Ok(Volume {
                path,
                created: false,
                block: true,
                size: *have,
                zeroed: false,
            }),
            (Backend::Device(_), _) => Err(VolumeError::Unusable {
                path,
                why: "devices are never created or grown".into(),
            }),
            (Backend::Lvm { vg, metadata_only }, plan) => {
                let (cmd, created) = match plan {
                    Plan::Create => {
                        let mut c = self
                            .lvm("lvcreate", timeout)
                            .args(["--yes", "-n", name, "-L"])
                            .arg(format!("{want}b"));
                        if *metadata_only {
                            c = c.args(["-an", "-Zn"]);
                        }
                        (Some(c.arg(vg)), true)
                    }
                    Plan::Grow { .. } => (
                        Some(
                            self.lvm("lvextend", timeout)
                                .arg("-L")
                                .arg(format!("{want}b"))
                                .arg(format!("{vg}/{name}")),
                        ),
                        false,
                    ),
                    Plan::Reuse { .. } => (None, false),
                };
                if let Some(c) = cmd {
                    c.run(log, cancel).await?;
                }
                let size = match plan {
                    Plan::Reuse { have } => *have,
                    _ => want,
                };
                Ok(Volume {
                    path,
                    created,
                    block: true,
                    size,
                    zeroed: false,
                })
            }
        }
    }

    /// Undo a failed job's volume: only one this job created is removed.
    pub async fn rollback(
        &self,
        name: &str,
        vol: &Volume,
        timeout: Duration,
        log: Arc<dyn LogSink>,
    ) -> Result<(), VolumeError> {
        if !vol.created {
            return Ok(());
        }
        match self {
            Backend::Dir(_) => match std::fs::remove_file(&vol.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io("remove", &vol.path)(e))
                }
                _ => Ok(()),
            },
            Backend::Device(_) => Ok(()),
            Backend::Lvm { vg, .. } => {
                // Not cancellable: rollback runs after a cancel.
                self.lvm("lvremove", timeout)
                    .args(["--yes", "-f"])
                    .arg(format!("{vg}/{name}"))
                    .run(log, &CancellationToken::new())
                    .await?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "vm-root-disk-1",
            "itx-master-controlplane-1",
            "a",
            "A.b_c+d",
            "9",
        ] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "-n",
            "../etc",
            "a/b",
            ".hidden",
            "a b",
            "x\0",
            "snapshot1",
            "lv_tmeta",
            "é",
            &"a".repeat(121),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn five_percent_rule() {
        let p = Path::new("/v");
        let g = 100u64;
        assert_eq!(decide(p, 100, g, true).unwrap(), Plan::Reuse { have: 100 });
        assert_eq!(decide(p, 105, g, true).unwrap(), Plan::Reuse { have: 105 });
        assert_eq!(decide(p, 96, g, true).unwrap(), Plan::Grow { have: 96 });
        assert_eq!(decide(p, 10, g, true).unwrap(), Plan::Grow { have: 10 });
        assert!(decide(p, 106, g, true).is_err());
        assert!(decide(p, 96, g, false).is_err());
        assert_eq!(decide(p, 104, g, false).unwrap(), Plan::Reuse { have: 104 });
    }

    #[tokio::test]
    async fn dir_backend_creates_reuses_refuses_and_rolls_back_only_its_own() {
        let d = tempfile::tempdir().unwrap();
        let b = Backend::Dir(d.path().to_path_buf());
        let t = Duration::from_secs(10);
        let c = CancellationToken::new();
        let log: Arc<dyn LogSink> = Arc::new(kiln_exec::NullSink);
        let plan = b.plan("v1", 1 << 20, t, &c).await.unwrap();
        assert_eq!(plan, Plan::Create);
        let v = b
            .apply("v1", &plan, 1 << 20, t, &c, log.clone())
            .await
            .unwrap();
        assert!(v.created && v.zeroed);
        assert_eq!(std::fs::metadata(&v.path).unwrap().len(), 1 << 20);
        let plan = b.plan("v1", 1 << 20, t, &c).await.unwrap();
        assert_eq!(plan, Plan::Reuse { have: 1 << 20 });
        let again = b
            .apply("v1", &plan, 1 << 20, t, &c, log.clone())
            .await
            .unwrap();
        b.rollback("v1", &again, t, log.clone()).await.unwrap();
        assert!(v.path.exists(), "a reused volume is never removed");
        assert!(matches!(
            b.plan("v1", 1 << 19, t, &c).await,
            Err(VolumeError::Incompatible { .. })
        ));
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        assert!(matches!(
            b.plan("link", 1 << 20, t, &c).await,
            Err(VolumeError::Unusable { .. })
        ));
        b.rollback("v1", &v, t, log).await.unwrap();
        assert!(!v.path.exists());
    }
}
