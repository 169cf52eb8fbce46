//! A DKMS package given to `--dkms`: a Debian package name (fetched with
//! `apt-get download`), a `*-dkms` `.deb`, or a source directory holding
//! `dkms.conf`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_engine::JobLog;
use kiln_exec::Cmd;
use tokio_util::sync::CancellationToken;

use crate::headers::field;
use crate::{io, run, DkmsError};

#[derive(Debug, Clone)]
pub struct SourcePkg {
    /// As given on the command line.
    pub label: String,
    /// The directory holding `dkms.conf`.
    pub dir: PathBuf,
    /// The `-dkms` package's name and version, when it came from a `.deb`.
    pub dkms_package: Option<String>,
    pub deb_version: Option<String>,
    /// Its `copyright` file, shipped in the binary package.
    pub copyright: Option<PathBuf>,
}

impl SourcePkg {
    /// What the sandbox must show of the host for this source: its
    /// directory (bubblewrap hides /tmp, /usr/src and /lib/modules).
    pub(crate) fn visible(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }
}

fn valid_package_name(s: &str) -> bool {
    s.len() >= 2
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

/// Resolve one `--dkms` value into a source directory under `work`.
pub async fn prepare(
    input: &str,
    work: &Path,
    log: &Arc<JobLog>,
    cancel: &CancellationToken,
) -> Result<SourcePkg, DkmsError> {
    let p = Path::new(input);
    if p.is_dir() {
        let dir = std::fs::canonicalize(p).map_err(io(p))?;
        if !dir.join("dkms.conf").is_file() {
            return Err(DkmsError::Input(format!(
                "{input}: a DKMS source directory must contain dkms.conf"
            )));
        }
        let copyright = ["copyright", "COPYING", "LICENSE"]
            .iter()
            .map(|n| dir.join(n))
            .find(|c| c.is_file());
        return Ok(SourcePkg {
            label: input.to_string(),
            dir,
            dkms_package: None,
            deb_version: None,
            copyright,
        });
    }
    let deb = if input.ends_with(".deb") {
        if !p.is_file() {
            return Err(DkmsError::Input(format!("{input}: no such .deb")));
        }
        std::fs::canonicalize(p).map_err(io(p))?
    } else if valid_package_name(input) {
        let dl = work.join("debs").join(input);
        std::fs::create_dir_all(&dl).map_err(io(&dl))?;
        run(
            &format!("download {input}"),
            Cmd::new("apt-get")
                .args(["download", "-q", input])
                .cwd(&dl)
                .timeout(std::time::Duration::from_secs(600)),
            log,
            cancel,
        )
        .await
        .map_err(|e| {
            DkmsError::Input(format!(
                "{input}: not a directory or .deb, and apt-get download failed: {e}"
            ))
        })?;
        std::fs::read_dir(&dl)
            .map_err(io(&dl))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| DkmsError::Input(format!("{input}: apt-get download left no .deb")))?
    } else {
        return Err(DkmsError::Input(format!(
            "{input}: not a DKMS source directory, a .deb, or a Debian package name"
        )));
    };
    let pkg = field(&deb, "Package").await?;
    let version = field(&deb, "Version").await?;
    let dst = work.join("src").join(format!("{pkg}_{version}"));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).map_err(io(&dst))?;
    run(
        "unpack",
        Cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(&dst),
        log,
        cancel,
    )
    .await?;
    let usr_src = dst.join("usr/src");
    let confs: Vec<PathBuf> = std::fs::read_dir(&usr_src)
        .map_err(|_| {
            DkmsError::Input(format!(
                "{input}: {pkg} has no /usr/src: not a DKMS package"
            ))
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("dkms.conf").is_file())
        .collect();
    let [dir] = confs.as_slice() else {
        return Err(DkmsError::Input(format!(
            "{input}: want exactly one /usr/src/*/dkms.conf in {pkg}, found {}",
            confs.len()
        )));
    };
    let copyright = dst.join(format!("usr/share/doc/{pkg}/copyright"));
    Ok(SourcePkg {
        label: input.to_string(),
        dir: dir.clone(),
        dkms_package: Some(pkg),
        deb_version: Some(version),
        copyright: copyright.is_file().then_some(copyright),
    })
}
