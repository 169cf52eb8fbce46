//! The full compare of two independent images or devices: both are read in
//! large aligned chunks by one thread per core, each over its own
//! consecutive region, and compared block by block. Bytes past the end of
//! a shorter base compare as zeros (a grown volume reads zeros there).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{check_block_size, CbtError, Runs, RunsBuilder};

const CHUNK: u64 = 8 << 20;

/// The size of a file or block device.
pub fn volume_size(path: &Path) -> Result<u64, CbtError> {
    let mut f = File::open(path).map_err(|source| CbtError::Io {
        path: path.into(),
        source,
    })?;
    f.seek(SeekFrom::End(0)).map_err(|source| CbtError::Io {
        path: path.into(),
        source,
    })
}

/// Read up to `buf.len()` bytes at `pos`; zeros past the end.
fn read_full(f: &File, path: &Path, pos: u64, buf: &mut [u8]) -> Result<(), CbtError> {
    let mut done = 0;
    while done < buf.len() {
        let n = f
            .read_at(&mut buf[done..], pos + done as u64)
            .map_err(|source| CbtError::Io {
                path: path.into(),
                source,
            })?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Every block of `target` that differs from `base`, at `block_size`.
/// Returns the runs and the target's size. `done` counts bytes compared;
/// setting `cancel` stops the scan.
pub fn full_scan(
    base: &Path,
    target: &Path,
    block_size: u64,
    threads: usize,
    done: &AtomicU64,
    cancel: &AtomicBool,
) -> Result<(Runs, u64), CbtError> {
    check_block_size(block_size)?;
    let size = volume_size(target)?;
    let open = |p: &Path| {
        File::open(p).map_err(|source| CbtError::Io {
            path: p.into(),
            source,
        })
    };
    let (fb, ft) = (open(base)?, open(target)?);
    let chunk = CHUNK.max(block_size);
    let chunks = size.div_ceil(chunk);
    let threads = (threads.max(1) as u64).min(chunks.max(1));
    let per = chunks.div_ceil(threads);
    let parts: Vec<Result<Runs, CbtError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (fb, ft) = (&fb, &ft);
                s.spawn(move || -> Result<Runs, CbtError> {
                    let mut b = RunsBuilder::default();
                    let mut bb = vec![0u8; chunk as usize];
                    let mut tb = vec![0u8; chunk as usize];
                    let (from, to) = (t * per * chunk, ((t + 1) * per * chunk).min(size));
                    let mut pos = from;
                    while pos < to {
                        if cancel.load(Ordering::Relaxed) {
                            return Err(CbtError::Cancelled);
                        }
                        let n = chunk.min(to - pos) as usize;
                        read_full(ft, target, pos, &mut tb[..n])?;
                        read_full(fb, base, pos, &mut bb[..n])?;
                        if tb[..n] != bb[..n] {
                            for (i, (x, y)) in tb[..n]
                                .chunks(block_size as usize)
                                .zip(bb[..n].chunks(block_size as usize))
                                .enumerate()
                            {
                                if x != y {
                                    b.push(pos / block_size + i as u64, 1);
                                }
                            }
                        }
                        pos += n as u64;
                        done.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(b.finish())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(CbtError::Cancelled)))
            .collect()
    });
    let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((Runs::concat(parts), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_changed_blocks() {
        let d = tempfile::tempdir().unwrap();
        let (b, t) = (d.path().join("b"), d.path().join("t"));
        let bs = 64 * 1024u64;
        let size = 40 * (1 << 20) + 12345; // not a multiple of the block or chunk size
        let base: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut tgt = base.clone();
        let changed = [0u64, 1, 127, 128, 300, (size - 1) / bs];
        for &blk in &changed {
            tgt[(blk * bs) as usize + 7 % bs as usize] ^= 0xff;
        }
        std::fs::write(&b, &base).unwrap();
        std::fs::write(&t, &tgt).unwrap();
        for threads in [1, 2, 3, 8] {
            let (done, cancel) = (AtomicU64::new(0), AtomicBool::new(false));
            let (runs, sz) = full_scan(&b, &t, bs, threads, &done, &cancel).unwrap();
            assert_eq!(sz, size);
            assert_eq!(runs.page(0, 100), changed.to_vec(), "threads {threads}");
            assert_eq!(done.load(Ordering::Relaxed), size);
        }
        // A shorter base reads as zeros past its end.
        std::fs::write(&b, &base[..(bs * 10) as usize]).unwrap();
        let (runs, _) =
            full_scan(&b, &t, bs, 2, &AtomicU64::new(0), &AtomicBool::new(false)).unwrap();
        assert_eq!(runs.page(0, 1)[0], 0);
        assert!(runs.contains(10) && runs.count() > 600);
        assert!(full_scan(&b, &t, 1000, 1, &AtomicU64::new(0), &AtomicBool::new(false)).is_err());
        let cancel = AtomicBool::new(true);
        assert!(matches!(
            full_scan(&b, &t, bs, 1, &AtomicU64::new(0), &cancel),
            Err(CbtError::Cancelled)
        ));
    }
}
