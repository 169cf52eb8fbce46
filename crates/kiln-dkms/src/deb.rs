//! The binary package (`dpkg-deb --build` of a staged root we lay out:
//! modules, copyright, changelog, control, md5sums, maintainer scripts) and
//! the flat apt repository index over every `.deb` in the out-dir
//! (`Packages`, `Packages.gz`, `Release`), so `deb [trusted=yes] file:DIR ./`
//! works with apt as it is.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_engine::JobLog;
use kiln_exec::{CaptureSink, Cmd};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{io, run, DkmsConf, DkmsError, SourcePkg};

pub(crate) struct Package<'a> {
    pub conf: &'a DkmsConf,
    pub src: &'a SourcePkg,
    pub kver: &'a str,
    pub arch: &'a str,
    pub maintainer: &'a str,
    pub stage: &'a Path,
    pub out_dir: &'a Path,
    pub modules: &'a [String],
    pub log: &'a Arc<JobLog>,
    pub cancel: &'a CancellationToken,
}

/// `acpi_call` → `acpi-call`: a valid Debian package name part.
pub fn package_base(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DkmsError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    std::fs::write(path, bytes).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Write `bytes` to `path` by temp file, fsync and rename.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), DkmsError> {
    let tmp = path.with_extension("kiln-tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).expect("writing to memory");
    e.finish().expect("writing to memory")
}

/// An extended description: lines of at most 79 columns, each indented.
fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for w in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + w.len() > 78 {
            out.push_str(&format!(" {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        out.push_str(&format!(" {line}\n"));
    }
    out
}

fn rfc2822_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default()
}

pub(crate) async fn package(p: &Package<'_>) -> Result<PathBuf, DkmsError> {
    let base = package_base(&p.conf.name);
    let pkg = format!("{base}-modules-{}", p.kver);
    let mut version = p
        .src
        .deb_version
        .clone()
        .unwrap_or_else(|| p.conf.version.clone());
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        version = format!("0+{version}");
    }
    let from = p
        .src
        .dkms_package
        .clone()
        .unwrap_or_else(|| format!("{} (DKMS source)", p.conf.name));
    let doc = p.stage.join(format!("usr/share/doc/{pkg}"));
    let copyright = match &p.src.copyright {
        Some(c) => std::fs::read(c).map_err(io(c))?,
        None => format!(
            "Binary modules built by kiln dkms2bin from {from} {}.\nSee that source for its copyright and license.\n",
            p.conf.version
        )
        .into_bytes(),
    };
    write_file(&doc.join("copyright"), &copyright, 0o644)?;
    let changelog = format!(
        "{pkg} ({version}) unstable; urgency=medium\n\n  * Binary kernel modules for Linux {kver}, built by kiln dkms2bin\n    from {from} {v}.\n\n -- {m}  {date}\n",
        kver = p.kver,
        v = p.conf.version,
        m = p.maintainer,
        date = rfc2822_now()
    );
    let changelog_name = if version.contains('-') {
        "changelog.Debian.gz"
    } else {
        "changelog.gz"
    };
    write_file(
        &doc.join(changelog_name),
        &gzip(changelog.as_bytes()),
        0o644,
    )?;

    // md5sums and Installed-Size over the payload.
    let mut md5sums = String::new();
    let mut kib = 0u64;
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(p.stage)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|f| !f.starts_with(p.stage.join("DEBIAN")))
        .collect();
    files.sort();
    for f in &files {
        let bytes = std::fs::read(f).map_err(io(f))?;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).map_err(io(f))?;
        kib += (bytes.len() as u64).div_ceil(1024);
        let rel = f.strip_prefix(p.stage).unwrap_or(f);
        md5sums.push_str(&format!(
            "{}  {}\n",
            hex::encode(Md5::digest(&bytes)),
            rel.display()
        ));
    }
    let control = format!(
        "Package: {pkg}\nSource: {src}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {m}\nInstalled-Size: {kib}\nDepends: linux-image-{kver} | linux-image-{kver}-unsigned\nProvides: {base}-modules\nConflicts: {base}-dkms\nSection: kernel\nPriority: optional\nDescription: {name} kernel modules for Linux {kver}\n{long}",
        src = p.src.dkms_package.clone().unwrap_or_else(|| format!("{base}-dkms")),
        arch = p.arch,
        m = p.maintainer,
        kver = p.kver,
        name = p.conf.name,
        long = wrap(&format!(
            "Prebuilt binary kernel modules ({}) for Linux {}, built by kiln dkms2bin from {from} {}, so that the host needs neither a compiler nor kernel headers. They install into /lib/modules/{}/updates/dkms/.",
            p.modules.join(", "),
            p.kver,
            p.conf.version,
            p.kver
        )),
    );
    let dpkg = p.stage.join("DEBIAN");
    write_file(&dpkg.join("control"), control.as_bytes(), 0o644)?;
    write_file(&dpkg.join("md5sums"), md5sums.as_bytes(), 0o644)?;
    // DPKG_ROOT is set by dpkg --root --force-script-chrootless; depmod then
    // updates that root's module index instead of the host's.
    let depmod = format!(
        "#!/bin/sh\nset -e\nif command -v depmod >/dev/null 2>&1 && [ -d \"${{DPKG_ROOT:-}}/lib/modules/{kver}\" ]; then\n\tdepmod -b \"${{DPKG_ROOT:-/}}\" -a {kver}\nfi\n",
        kver = p.kver
    );
    write_file(&dpkg.join("postinst"), depmod.as_bytes(), 0o755)?;
    write_file(&dpkg.join("postrm"), depmod.as_bytes(), 0o755)?;

    std::fs::create_dir_all(p.out_dir).map_err(io(p.out_dir))?;
    let file = format!("{pkg}_{version}_{}.deb", p.arch).replace(':', "%3a");
    let out = p.out_dir.join(&file);
    let tmp = p.out_dir.join(format!(".{file}.kiln-tmp"));
    run(
        "dpkg-deb --build",
        Cmd::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(p.stage)
            .arg(&tmp),
        p.log,
        p.cancel,
    )
    .await?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    Ok(out)
}

/// Index every `.deb` in `dir` as a flat apt repository.
pub async fn write_apt_index(dir: &Path) -> Result<usize, DkmsError> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    let mut packages = String::new();
    let mut arches = std::collections::BTreeSet::new();
    for deb in &debs {
        let sink = Arc::new(CaptureSink::default());
        Cmd::new("dpkg-deb")
            .arg("-f")
            .arg(deb)
            .run(sink.clone(), &CancellationToken::new())
            .await
            .map_err(|source| DkmsError::Exec {
                step: format!("read the control file of {}", deb.display()),
                source,
            })?;
        let fields = sink.stdout();
        for l in fields.lines() {
            if let Some(a) = l.strip_prefix("Architecture: ") {
                arches.insert(a.trim().to_string());
            }
        }
        let bytes = std::fs::read(deb).map_err(io(deb))?;
        let name = deb.file_name().unwrap_or_default().to_string_lossy();
        packages.push_str(fields.trim_end());
        packages.push_str(&format!(
            "\nFilename: ./{name}\nSize: {}\nMD5sum: {}\nSHA256: {}\n\n",
            bytes.len(),
            hex::encode(Md5::digest(&bytes)),
            hex::encode(Sha256::digest(&bytes)),
        ));
    }
    let gz = gzip(packages.as_bytes());
    atomic_write(&dir.join("Packages"), packages.as_bytes())?;
    atomic_write(&dir.join("Packages.gz"), &gz)?;
    let sums = |f: fn(&[u8]) -> String| {
        format!(
            " {} {} Packages\n {} {} Packages.gz\n",
            f(packages.as_bytes()),
            packages.len(),
            f(&gz),
            gz.len()
        )
    };
    let release = format!(
        "Origin: kiln\nLabel: kiln dkms2bin\nDate: {}\nArchitectures: {}\nDescription: Binary kernel-module packages built by kiln dkms2bin\nMD5Sum:\n{}SHA256:\n{}",
        rfc2822_now(),
        arches.into_iter().collect::<Vec<_>>().join(" "),
        sums(|b| hex::encode(Md5::digest(b))),
        sums(|b| hex::encode(Sha256::digest(b))),
    );
    atomic_write(&dir.join("Release"), release.as_bytes())?;
    Ok(debs.len())
}
