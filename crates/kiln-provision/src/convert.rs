//! Writing an image into a volume. QCOW2 goes through `qemu-img convert`
//! with the flags that suit the target; raw images are copied by kiln itself
//! (holes and zero blocks are skipped or punched, never written out on a
//! file). Afterwards everything past the image's end is zeroed and the
//! volume is flushed, so a job is complete only when its bytes are durable.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_exec::{CaptureSink, Cmd, LogSink, Stream};
use tokio_util::sync::CancellationToken;

use crate::volume::Volume;
use crate::ImageType;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the image is not a usable {format}: {why}")]
    BadImage { format: &'static str, why: String },
    #[error("the image's virtual size ({image} bytes) is larger than the volume ({volume} bytes)")]
    TooBig { image: u64, volume: u64 },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Exec(#[from] kiln_exec::ExecError),
    #[error("cancelled")]
    Cancelled,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ConvertError + 'a {
    move |source| ConvertError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What `qemu-img info` says about an image kiln is about to trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub virtual_size: u64,
}

/// Check an image is what the request said, and has no external parts: a
/// QCOW2 with a backing file or an external data file could make qemu-img
/// read any file on the host into the volume, so those are refused.
pub async fn inspect(
    path: &Path,
    ty: ImageType,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Info, ConvertError> {
    match ty {
        ImageType::Raw => {
            let m = std::fs::metadata(path).map_err(io("inspect", path))?;
            Ok(Info {
                virtual_size: m.len(),
            })
        }
        ImageType::Qcow2 => {
            let sink = Arc::new(CaptureSink::default());
            Cmd::new("qemu-img")
                .args(["info", "--output=json", "-f", "qcow2"])
                .arg(path)
                .timeout(timeout)
                .run(sink.clone(), cancel)
                .await
                .map_err(|e| match e {
                    kiln_exec::ExecError::Failed { stderr_tail, .. } => ConvertError::BadImage {
                        format: "qcow2",
                        why: stderr_tail,
                    },
                    e => e.into(),
                })?;
            parse_info(&sink.stdout())
        }
    }
}

fn parse_info(json: &str) -> Result<Info, ConvertError> {
    let bad = |why: String| ConvertError::BadImage {
        format: "qcow2",
        why,
    };
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("qemu-img info: {e}")))?;
    if v.get("format").and_then(|f| f.as_str()) != Some("qcow2") {
        return Err(bad(format!("qemu-img reports format {}", v["format"])));
    }
    if let Some(b) = v.get("backing-filename") {
        return Err(bad(format!(
            "it names a backing file ({b}); images must be self-contained"
        )));
    }
    if let Some(d) = v.pointer("/format-specific/data/data-file") {
        return Err(bad(format!(
            "it names an external data file ({d}); images must be self-contained"
        )));
    }
    let virtual_size = v
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| bad("qemu-img info gave no virtual-size".into()))?;
    Ok(Info { virtual_size })
}

/// Reads `qemu-img -p` progress lines (`    (12.50/100%)`) and passes every
/// other line on to the job log.
struct ProgressSink {
    on: Arc<dyn Fn(f64) + Send + Sync>,
    log: Arc<dyn LogSink>,
}

fn parse_progress(line: &str) -> Option<f64> {
    let t = line.trim();
    let inner = t.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

impl LogSink for ProgressSink {
    fn line(&self, stream: Stream, line: &str) {
        match parse_progress(line) {
            Some(p) => (self.on)(p / 100.0),
            None if line.trim().is_empty() => {}
            None => self.log.line(stream, line),
        }
    }
}

/// `qemu-img convert` of a QCOW2 into the volume. `-n`: the volume exists
/// and keeps its size; `-W`: out-of-order writes; block devices get
/// `-t none` (O_DIRECT), files writeback followed by an fsync;
/// `--target-is-zero` only when the volume is a new, sparse file.
pub async fn qemu_convert(
    src: &Path,
    vol: &Volume,
    timeout: Duration,
    cancel: &CancellationToken,
    log: Arc<dyn LogSink>,
    progress: Arc<dyn Fn(f64) + Send + Sync>,
) -> Result<(), ConvertError> {
    let mut c = Cmd::new("qemu-img")
        .args([
            "convert", "-p", "-n", "-W", "-f", "qcow2", "-O", "raw", "-t",
        ])
        .arg(if vol.block { "none" } else { "writeback" })
        .timeout(timeout);
    if vol.zeroed {
        c = c.arg("--target-is-zero");
    }
    let c = c.arg(src).arg(&vol.path);
    log.line(Stream::Stdout, &format!("$ {}", c.display()));
    c.run(Arc::new(ProgressSink { on: progress, log }), cancel)
        .await?;
    Ok(())
}

const CHUNK: usize = 4 << 20;
/// The granularity of zero detection in a raw copy.
const BLOCK: usize = 64 << 10;
const ALIGN: u64 = 4096;

fn is_zero(b: &[u8]) -> bool {
    // Folding whole 4 KiB blocks (no early exit inside) vectorises.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Make `[off, off+len)` of the volume read as zeros: a punched hole in a
/// file; `blkdiscard --zeroout` (BLKZEROOUT) on the aligned middle of a
/// device, written zeros on its unaligned edges.
pub async fn zero_range(
    vol: &Volume,
    off: u64,
    len: u64,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(), ConvertError> {
    if len == 0 {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&vol.path)
        .map_err(io("open", &vol.path))?;
    if !vol.block {
        use nix::fcntl::{fallocate, FallocateFlags};
        let r = fallocate(
            f.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        );
        if r.is_ok() {
            return Ok(());
        }
        // A filesystem without hole punching: write the zeros.
        return write_zeros(&f, &vol.path, off, len);
    }
    let end = off + len;
    let a = off.div_ceil(ALIGN) * ALIGN;
    let b = end / ALIGN * ALIGN;
    if a >= b {
        return write_zeros(&f, &vol.path, off, len);
    }
    write_zeros(&f, &vol.path, off, a - off)?;
    write_zeros(&f, &vol.path, b, end - b)?;
    drop(f);
    Cmd::new("blkdiscard")
        .args(["--zeroout", "--offset"])
        .arg(a.to_string())
        .arg("--length")
        .arg((b - a).to_string())
        .arg(&vol.path)
        .timeout(timeout)
        .run(Arc::new(kiln_exec::NullSink), cancel)
        .await?;
    Ok(())
}

fn write_zeros(f: &std::fs::File, path: &Path, mut off: u64, len: u64) -> Result<(), ConvertError> {
    let zeros = vec![0u8; CHUNK.min(len as usize)];
    let end = off + len;
    while off < end {
        let n = ((end - off) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], off)
            .map_err(io("write", path))?;
        off += n as u64;
    }
    Ok(())
}

/// kiln's raw copy: data regions (found with SEEK_DATA/SEEK_HOLE) are read
/// in 4 MiB chunks; all-zero 64 KiB blocks and holes are not written but collected
/// as ranges to zero, which [`zero_range`] does cheaply afterwards (and not
/// at all on a new sparse file). Returns those ranges.
pub fn copy_raw(
    src: &Path,
    vol: &Volume,
    size: u64,
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<Vec<(u64, u64)>, ConvertError> {
    let mut s = std::fs::File::open(src).map_err(io("open", src))?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .open(&vol.path)
        .map_err(io("open", &vol.path))?;
    let mut zero_ranges: Vec<(u64, u64)> = Vec::new();
    let mut add_zero = |off: u64, len: u64| {
        if len == 0 {
            return;
        }
        match zero_ranges.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => zero_ranges.push((off, len)),
        }
    };
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let fd = s.as_raw_fd();
    while off < size {
        if cancel.is_cancelled() {
            return Err(ConvertError::Cancelled);
        }
        // Skip a hole in the source, if the filesystem tells us of one.
        let data = match nix::unistd::lseek(fd, off as i64, nix::unistd::Whence::SeekData) {
            Ok(p) => (p as u64).min(size),
            Err(nix::errno::Errno::ENXIO) => size,
            Err(_) => off,
        };
        if data > off {
            add_zero(off, data - off);
            off = data;
            continue;
        }
        let hole = match nix::unistd::lseek(fd, off as i64, nix::unistd::Whence::SeekHole) {
            Ok(p) => (p as u64).min(size),
            Err(_) => size,
        };
        s.seek(SeekFrom::Start(off)).map_err(io("seek", src))?;
        while off < hole {
            if cancel.is_cancelled() {
                return Err(ConvertError::Cancelled);
            }
            let n = ((hole - off) as usize).min(CHUNK);
            s.read_exact(&mut buf[..n]).map_err(io("read", src))?;
            // Runs of non-zero 64 KiB blocks are written with one pwrite;
            // zero blocks become zero ranges.
            let mut i = 0;
            while i < n {
                let blk = |i: usize| &buf[i..(i + BLOCK).min(n)];
                if is_zero(blk(i)) {
                    let len = blk(i).len();
                    add_zero(off + i as u64, len as u64);
                    i += len;
                    continue;
                }
                let mut j = i;
                while j < n && !is_zero(blk(j)) {
                    j += blk(j).len();
                }
                d.write_all_at(&buf[i..j], off + i as u64)
                    .map_err(io("write", &vol.path))?;
                i = j;
            }
            off += n as u64;
            progress(off as f64 / size.max(1) as f64);
        }
    }
    Ok(zero_ranges)
}

/// fsync the volume (on a block device this flushes the device's cache).
pub fn flush(vol: &Volume) -> Result<(), ConvertError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&vol.path)
        .map_err(io("open", &vol.path))?;
    f.sync_all().map_err(io("fsync", &vol.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("    (45.00/100%)"), Some(45.0));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("qemu-img: error"), None);
    }

    #[test]
    fn info_refuses_external_files() {
        let ok = r#"{"format":"qcow2","virtual-size":1048576,"format-specific":{"type":"qcow2","data":{"compat":"1.1"}}}"#;
        assert_eq!(parse_info(ok).unwrap().virtual_size, 1 << 20);
        let backing = r#"{"format":"qcow2","virtual-size":1,"backing-filename":"/etc/shadow"}"#;
        assert!(parse_info(backing)
            .unwrap_err()
            .to_string()
            .contains("backing file"));
        let data = r#"{"format":"qcow2","virtual-size":1,"format-specific":{"data":{"data-file":"/dev/sda"}}}"#;
        assert!(parse_info(data)
            .unwrap_err()
            .to_string()
            .contains("data file"));
        assert!(parse_info(r#"{"format":"raw","virtual-size":1}"#).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 10000]));
        let mut b = vec![0u8; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));
    }

    #[tokio::test]
    async fn raw_copy_keeps_data_and_skips_zeros() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(20 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 5000], 9 << 20).unwrap();
        f.write_all_at(b"tail", (20 << 20) - 4).unwrap();
        drop(f);
        let dst = d.path().join("dst");
        let g = std::fs::File::create(&dst).unwrap();
        g.set_len(32 << 20).unwrap();
        g.write_all_at(&[0xAAu8; 1 << 20], 4 << 20).unwrap(); // stale data in a zero region
        g.write_all_at(&[0xBBu8; 4096], 25 << 20).unwrap(); // stale data past the end
        drop(g);
        let vol = Volume {
            path: dst.clone(),
            created: false,
            block: false,
            size: 32 << 20,
            zeroed: false,
        };
        let zeros = copy_raw(&src, &vol, 20 << 20, &CancellationToken::new(), &|_| {}).unwrap();
        let c = CancellationToken::new();
        for (o, l) in zeros {
            zero_range(&vol, o, l, Duration::from_secs(5), &c)
                .await
                .unwrap();
        }
        zero_range(&vol, 20 << 20, 12 << 20, Duration::from_secs(5), &c)
            .await
            .unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(b.len(), 32 << 20);
        assert_eq!(&b[..20 << 20], &a[..]);
        assert!(b[20 << 20..].iter().all(|&x| x == 0));
    }
}
