//! Zip archives (app sources): each entry's name must stay inside the
//! destination (`..` and absolute names are refused), links are refused
//! outright, and the entry count and the decompressed bytes are capped as
//! they are read, so a zip bomb stops at the cap, not at the disk's end.

use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use crate::{ArchiveError, Extracted, Limits};

/// Does this look like a zip (local file header magic)?
pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06")
}

/// Extract a zip below `dest`, which must exist.
pub fn extract_zip(
    r: impl Read + Seek,
    dest: &Path,
    limits: Limits,
) -> Result<Extracted, ArchiveError> {
    let corrupt = |e: zip::result::ZipError| ArchiveError::Corrupt(e.to_string());
    let mut ar = zip::ZipArchive::new(r).map_err(corrupt)?;
    if ar.len() as u64 > limits.max_entries {
        return Err(ArchiveError::TooManyEntries {
            limit: limits.max_entries,
        });
    }
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 128 * 1024];
    for i in 0..ar.len() {
        let mut e = ar.by_index(i).map_err(corrupt)?;
        let raw = e.name().to_string();
        let name: PathBuf = match e.enclosed_name() {
            Some(n) => n,
            None if raw.starts_with('/') => return Err(ArchiveError::Absolute { entry: raw }),
            None => return Err(ArchiveError::Traversal { entry: raw }),
        };
        if name
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(ArchiveError::Traversal { entry: raw });
        }
        let mode = e.unix_mode().unwrap_or(0o644);
        if mode & 0o170000 == 0o120000 {
            return Err(ArchiveError::ZipLink { entry: raw });
        }
        let path = dest.join(&name);
        let io = |source| ArchiveError::Io {
            path: path.clone(),
            source,
        };
        if e.is_dir() {
            std::fs::create_dir_all(&path).map_err(io)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 })
                .open(&path)
                .map_err(io)?
        };
        loop {
            let n = e
                .read(&mut buf)
                .map_err(|x| ArchiveError::Corrupt(x.to_string()))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            if bytes > limits.max_bytes {
                return Err(ArchiveError::TooLarge {
                    limit: limits.max_bytes,
                });
            }
            f.write_all(&buf[..n]).map_err(io)?;
        }
    }
    Ok(Extracted {
        entries: ar.len() as u64,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (n, d) in entries {
            w.start_file(*n, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(d).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn extracts_and_refuses_escapes_and_bombs() {
        let d = tempfile::tempdir().unwrap();
        let z = zip_of(&[("app/Dockerfile", b"FROM scratch\n"), ("app/x/y", b"y")]);
        assert!(is_zip(&z));
        let x = extract_zip(std::io::Cursor::new(z), d.path(), Limits::default()).unwrap();
        assert_eq!(x.entries, 2);
        assert_eq!(
            std::fs::read(d.path().join("app/Dockerfile")).unwrap(),
            b"FROM scratch\n"
        );
        let e = tempfile::tempdir().unwrap();
        let z = zip_of(&[("../evil", b"x")]);
        assert!(matches!(
            extract_zip(std::io::Cursor::new(z), e.path(), Limits::default()),
            Err(ArchiveError::Traversal { .. })
        ));
        let z = zip_of(&[("big", &vec![0u8; 1 << 20])]);
        let small = Limits {
            max_bytes: 1000,
            max_entries: 10,
        };
        assert!(matches!(
            extract_zip(std::io::Cursor::new(z), e.path(), small),
            Err(ArchiveError::TooLarge { .. })
        ));
        assert!(!e.path().join("../evil").exists());
    }
}
