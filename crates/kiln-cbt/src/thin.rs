//! LVM thin snapshots: `thin_delta` compares two thin devices' mappings in
//! the pool's metadata (a metadata snapshot on a live pool), so the cost
//! follows the metadata. Its XML names ranges of pool data blocks
//! (`data_block_size` sectors each) that differ, or exist on one side only;
//! all of those are changed blocks of the target.

use std::path::Path;

use kiln_exec::Cmd;
use tokio_util::sync::CancellationToken;

use crate::{check_block_size, CbtError, Runs, RunsBuilder};

fn attr(tag: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=\"");
    let i = tag.find(&key)? + key.len();
    tag[i..].split('"').next()?.parse().ok()
}

/// Parse `thin_delta` output into changed blocks of `block_size` bytes.
pub fn parse_thin_delta(xml: &str, block_size: u64) -> Result<Runs, String> {
    check_block_size(block_size).map_err(|e| e.to_string())?;
    let sb = xml
        .split('<')
        .find(|t| t.starts_with("superblock"))
        .ok_or("no <superblock> in thin_delta output")?;
    let sectors = attr(sb, "data_block_size").ok_or("no data_block_size")?;
    if sectors == 0 {
        return Err("data_block_size is 0".into());
    }
    let unit = sectors * 512;
    let mut ranges = Vec::new();
    for tag in xml.split('<') {
        let changed = ["different", "left_only", "right_only"]
            .iter()
            .any(|k| tag.starts_with(k) && tag[k.len()..].starts_with(' '));
        if !changed {
            continue;
        }
        let (b, l) = match (attr(tag, "begin"), attr(tag, "length")) {
            (Some(b), Some(l)) => (b, l),
            _ => return Err(format!("malformed range <{}", tag.trim())),
        };
        if l > 0 {
            ranges.push((b * unit, (b + l) * unit));
        }
    }
    ranges.sort_unstable();
    let mut out = RunsBuilder::default();
    for (start, end) in ranges {
        let first = start / block_size;
        let last = (end - 1) / block_size;
        out.push(first, last - first + 1);
    }
    Ok(out.finish())
}

/// Run `thin_delta` on pool metadata (a device or a file) for two thin
/// device ids and parse it.
pub async fn thin_delta(
    metadata: &Path,
    base_id: u64,
    target_id: u64,
    block_size: u64,
    cancel: &CancellationToken,
) -> Result<Runs, CbtError> {
    let cmd = Cmd::new("thin_delta")
        .arg("--snap1")
        .arg(base_id.to_string())
        .arg("--snap2")
        .arg(target_id.to_string())
        .arg(metadata);
    let out = crate::run_captured("thin_delta", cmd, cancel).await?;
    parse_thin_delta(&out, block_size).map_err(|message| CbtError::Format {
        path: metadata.into(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_in_pool_blocks() {
        // 128 sectors = 64 KiB pool blocks.
        let xml = r#"<superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="1024">
  <diff left="1" right="2">
    <same begin="0" length="10"/>
    <different begin="10" length="2"/>
    <right_only begin="100" length="1"/>
    <left_only begin="101" length="3"/>
  </diff>
</superblock>"#;
        let r = parse_thin_delta(xml, 65536).unwrap();
        assert_eq!(r.page(0, 100), vec![10, 11, 100, 101, 102, 103]);
        // At 512 KiB blocks, pool blocks 10-11 are in block 1, 100-103 in block 12.
        assert_eq!(
            parse_thin_delta(xml, 524288).unwrap().page(0, 10),
            vec![1, 12]
        );
        assert!(parse_thin_delta("<nothing/>", 65536).is_err());
        assert!(parse_thin_delta(
            r#"<superblock data_block_size="128"><different begin="x"/>"#,
            65536
        )
        .is_err());
    }
}
