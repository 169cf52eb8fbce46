//! Deltas from QCOW2 metadata: when the base is in the target's backing
//! chain, the blocks that changed are exactly those allocated (data or
//! zeroes) in the layers above it. `qemu-img map` reports that from the L1/L2
//! tables, so the cost follows the metadata, not the volume size.

use std::path::{Path, PathBuf};

use kiln_exec::Cmd;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{check_block_size, CbtError, Runs, RunsBuilder};

async fn qemu_img_json(
    args: &[&str],
    image: &Path,
    cancel: &CancellationToken,
) -> Result<serde_json::Value, CbtError> {
    let out = crate::run_captured(
        "qemu-img",
        Cmd::new("qemu-img").args(args).arg(image),
        cancel,
    )
    .await?;
    serde_json::from_str(&out).map_err(|e| CbtError::Format {
        path: image.into(),
        message: format!(
            "qemu-img {}: {e}",
            args.first().copied().unwrap_or_default()
        ),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
}

/// The image and its backing files, top first, with canonical paths.
pub async fn backing_chain(
    image: &Path,
    cancel: &CancellationToken,
) -> Result<Vec<ChainEntry>, CbtError> {
    let v = qemu_img_json(
        &["info", "-U", "--backing-chain", "--output=json"],
        image,
        cancel,
    )
    .await?;
    let arr = v.as_array().ok_or_else(|| CbtError::Format {
        path: image.into(),
        message: "qemu-img info did not return a chain".into(),
    })?;
    Ok(arr
        .iter()
        .map(|e| {
            let f = e["filename"].as_str().unwrap_or_default();
            ChainEntry {
                path: std::fs::canonicalize(f).unwrap_or_else(|_| PathBuf::from(f)),
                format: e["format"].as_str().unwrap_or_default().to_string(),
                virtual_size: e["virtual-size"].as_u64().unwrap_or(0),
            }
        })
        .collect())
}

#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
}

/// The changed blocks of `target` against `base`, if `base` is one of its
/// backing files (None otherwise: use the full scan). Returns the runs and
/// the target's virtual size.
pub async fn overlay_delta(
    target: &Path,
    base: &Path,
    block_size: u64,
    cancel: &CancellationToken,
) -> Result<Option<(Runs, u64)>, CbtError> {
    check_block_size(block_size)?;
    let (t, b) = (target.to_path_buf(), base.to_path_buf());
    let native =
        tokio::task::spawn_blocking(move || crate::overlay_delta_native(&t, &b, block_size))
            .await
            .map_err(|_| CbtError::Cancelled)?;
    match native {
        Ok(Some(found)) => return Ok(Some(found)),
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "native qcow2 reader gave up; asking qemu-img"),
    }
    overlay_delta_qemu(target, base, block_size, cancel).await
}

/// [`overlay_delta`] through `qemu-img map`, for images kiln's own reader
/// does not cover.
pub async fn overlay_delta_qemu(
    target: &Path,
    base: &Path,
    block_size: u64,
    cancel: &CancellationToken,
) -> Result<Option<(Runs, u64)>, CbtError> {
    let chain = backing_chain(target, cancel).await?;
    let base = std::fs::canonicalize(base).map_err(|source| CbtError::Io {
        path: base.into(),
        source,
    })?;
    let Some(depth) = chain
        .iter()
        .skip(1)
        .position(|e| e.path == base)
        .map(|i| i as u64 + 1)
    else {
        return Ok(None);
    };
    let map = qemu_img_json(&["map", "-U", "--output=json"], target, cancel).await?;
    let entries: Vec<MapEntry> = serde_json::from_value(map).map_err(|e| CbtError::Format {
        path: target.into(),
        message: format!("qemu-img map: {e}"),
    })?;
    let mut b = RunsBuilder::default();
    for e in entries {
        // Allocated (data or zeroes) in a layer above the base.
        if e.present && e.depth < depth && e.length > 0 {
            let first = e.start / block_size;
            let last = (e.start + e.length - 1) / block_size;
            b.push(first, last - first + 1);
        }
    }
    Ok(Some((b.finish(), chain[0].virtual_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(cmd: &str) {
        let o = std::process::Command::new("bash")
            .args(["-ec", cmd])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    #[tokio::test]
    async fn chain_deltas_follow_the_allocation_map() {
        if kiln_exec::which("qemu-img").is_none() {
            panic!("qemu-img is required (scripts/test.sh installs qemu-utils)");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().display();
        // base (data everywhere it was written) <- mid <- top, 64 MiB, 64 KiB blocks.
        sh(&format!(
            "cd {p}
             qemu-img create -q -f qcow2 base.qcow2 64M
             qemu-io -c 'write -P 0x11 0 8M' base.qcow2 >/dev/null
             qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
             qemu-io -c 'write -P 0x22 1M 64k' -c 'write -P 0x22 10M 200k' mid.qcow2 >/dev/null
             qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
             qemu-io -c 'write -P 0x33 2M 1' -c 'write -z 20M 128k' -c 'write -P 0x33 63M 64k' top.qcow2 >/dev/null"
        ));
        let c = CancellationToken::new();
        let bs = 64 * 1024;
        let blk = |mib: u64| mib * 16; // MiB offset to 64 KiB block
        let top = d.path().join("top.qcow2");
        let (r, size) = overlay_delta(&top, &d.path().join("mid.qcow2"), bs, &c)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, 64 << 20);
        // top only: 2M (one byte -> its cluster), 20M+128k zeroes, 63M.
        assert_eq!(r.page(0, 100), vec![blk(2), blk(20), blk(20) + 1, blk(63)]);
        let (r, _) = overlay_delta(&top, &d.path().join("base.qcow2"), bs, &c)
            .await
            .unwrap()
            .unwrap();
        // mid and top: 1M, 10M..10M+200k (4 blocks), plus the above.
        let mut want = vec![
            blk(1),
            blk(2),
            blk(10),
            blk(10) + 1,
            blk(10) + 2,
            blk(10) + 3,
            blk(20),
            blk(20) + 1,
            blk(63),
        ];
        want.sort();
        assert_eq!(r.page(0, 100), want);
        // kiln's own reader and qemu-img map agree, layer by layer.
        for base in ["mid.qcow2", "base.qcow2"] {
            let native = crate::overlay_delta_native(&top, &d.path().join(base), bs)
                .unwrap()
                .unwrap();
            let qemu = overlay_delta_qemu(&top, &d.path().join(base), bs, &c)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(native, qemu, "{base}");
        }
        // An image outside the chain: not answerable from metadata.
        sh(&format!(
            "cd {p} && qemu-img create -q -f qcow2 other.qcow2 64M"
        ));
        assert!(overlay_delta(&top, &d.path().join("other.qcow2"), bs, &c)
            .await
            .unwrap()
            .is_none());
        // Cross-check against a full compare of the flattened images.
        sh(&format!("cd {p} && qemu-img convert -O raw top.qcow2 top.raw && qemu-img convert -O raw base.qcow2 base.raw"));
        let (full, _) = crate::full_scan(
            &d.path().join("base.raw"),
            &d.path().join("top.raw"),
            bs,
            2,
            &Default::default(),
            &Default::default(),
        )
        .unwrap();
        // The 20M zero write is over unwritten (zero) base data, so data-wise
        // it is no change; every other block matches.
        let data: Vec<u64> = want
            .iter()
            .copied()
            .filter(|b| *b != blk(20) && *b != blk(20) + 1)
            .collect();
        assert_eq!(full.page(0, 100), data);
    }
}
