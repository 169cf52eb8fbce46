//! A reader of kiln's own for QCOW2 allocation metadata: the header, the L1
//! table and the L2 tables of each layer above the base, read straight from
//! the files. No process is spawned and only metadata is read, so an
//! overlay's delta costs what its L2 tables weigh. Images this reader does
//! not cover (extended L2 entries, external data files, encryption) return
//! `None` and the caller falls back to `qemu-img map`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Runs, RunsBuilder};

struct Layer {
    file: File,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    backing: Option<PathBuf>,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn open(path: &Path) -> std::io::Result<Option<Layer>> {
    let file = File::open(path)?;
    let mut h = [0u8; 104];
    if file.read_at(&mut h, 0)? < 72 || &h[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let version = be32(&h, 4);
    if version == 3 {
        let incompatible = be64(&h, 72);
        // Only "dirty" (bit 0) is harmless here; corrupt, external data
        // file, compression type, extended L2: not for this reader.
        if incompatible & !1 != 0 {
            return Ok(None);
        }
    } else if version != 2 {
        return Ok(None);
    }
    if be32(&h, 32) != 0 {
        return Ok(None); // encrypted
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Ok(None);
    }
    let (bf_off, bf_len) = (be64(&h, 8), be32(&h, 16) as usize);
    let backing = if bf_off != 0 && bf_len > 0 && bf_len < 4096 {
        let mut name = vec![0u8; bf_len];
        file.read_exact_at(&mut name, bf_off)?;
        let name = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
        let full = if name.is_absolute() {
            name
        } else {
            path.parent().unwrap_or(Path::new(".")).join(name)
        };
        Some(std::fs::canonicalize(&full).unwrap_or(full))
    } else {
        None
    };
    Ok(Some(Layer {
        file,
        cluster_bits,
        size: be64(&h, 24),
        l1_size: be32(&h, 36),
        l1_offset: be64(&h, 40),
        backing,
    }))
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Allocated guest clusters of one layer (data, compressed or zero).
fn allocated(l: &Layer, mut each: impl FnMut(u64)) -> std::io::Result<()> {
    let cs = 1u64 << l.cluster_bits;
    let per_l2 = cs / 8;
    let mut l1 = vec![0u8; l.l1_size as usize * 8];
    l.file.read_exact_at(&mut l1, l.l1_offset)?;
    let mut l2 = vec![0u8; cs as usize];
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let off = u64::from_be_bytes(e.try_into().expect("8 bytes")) & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        l2.resize(cs as usize, 0);
        l.file.read_exact_at(&mut l2, off)?;
        for (j, e) in l2.chunks_exact(8).enumerate() {
            if u64::from_be_bytes(e.try_into().expect("8 bytes")) & !(1 << 63) != 0 {
                each(i as u64 * per_l2 + j as u64);
            }
        }
    }
    Ok(())
}

/// The changed blocks of `target` against `base` from the layers' own
/// metadata; `None` when `base` is not in the chain or a layer is not one
/// this reader covers. Returns the runs and the target's virtual size.
pub fn overlay_delta_native(
    target: &Path,
    base: &Path,
    block_size: u64,
) -> std::io::Result<Option<(Runs, u64)>> {
    let base = std::fs::canonicalize(base)?;
    let mut layers = Vec::new();
    let mut cur = std::fs::canonicalize(target)?;
    loop {
        if cur == base {
            break;
        }
        let Some(l) = open(&cur)? else {
            return Ok(None);
        };
        let next = l.backing.clone();
        layers.push(l);
        match next {
            Some(n) if layers.len() < 64 => cur = n,
            _ => return Ok(None), // base not in the chain
        }
    }
    if layers.is_empty() {
        return Ok(None);
    }
    let size = layers[0].size;
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for l in &layers {
        let cs = 1u64 << l.cluster_bits;
        allocated(l, |c| {
            let start = c * cs;
            if start < size {
                let end = (start + cs).min(size);
                blocks.push((start / block_size, (end - 1) / block_size));
            }
        })?;
    }
    blocks.sort_unstable();
    let mut b = RunsBuilder::default();
    for (first, last) in blocks {
        b.push(first, last - first + 1);
    }
    Ok(Some((b.finish(), size)))
}
