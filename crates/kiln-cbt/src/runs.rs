//! A changed-block set as sorted, disjoint runs of block indices, with a
//! prefix count per run: the n-th changed block is found by binary search,
//! so a page at offset 10,000,000 costs what a page at 0 does, and a delta of
//! millions of blocks in a few runs takes a few bytes. Serialised as
//! little-endian `(start, len)` pairs.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs {
    /// (first block, number of blocks), sorted, disjoint, not adjacent.
    runs: Vec<(u64, u64)>,
    /// prefix[i] = changed blocks before run i.
    prefix: Vec<u64>,
}

/// Collects blocks (or block ranges) in ascending order, merging neighbours.
#[derive(Debug, Default)]
pub struct RunsBuilder {
    runs: Vec<(u64, u64)>,
}

impl RunsBuilder {
    /// Add blocks `start..start+len`; calls must come in ascending order
    /// (overlaps with the previous range are merged).
    pub fn push(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            let end = last.0 + last.1;
            if start <= end {
                last.1 = last.1.max(start + len - last.0);
                return;
            }
        }
        self.runs.push((start, len));
    }

    pub fn finish(self) -> Runs {
        Runs::from_sorted(self.runs)
    }
}

impl Runs {
    fn from_sorted(runs: Vec<(u64, u64)>) -> Runs {
        let mut prefix = Vec::with_capacity(runs.len());
        let mut n = 0;
        for r in &runs {
            prefix.push(n);
            n += r.1;
        }
        Runs { runs, prefix }
    }

    /// Merge several ascending builders' outputs (e.g. per-thread scans of
    /// consecutive regions).
    pub fn concat(parts: Vec<Runs>) -> Runs {
        let mut b = RunsBuilder::default();
        for p in parts {
            for (s, l) in p.runs {
                b.push(s, l);
            }
        }
        b.finish()
    }

    /// Total changed blocks.
    pub fn count(&self) -> u64 {
        self.runs
            .last()
            .map_or(0, |r| self.prefix[self.runs.len() - 1] + r.1)
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Up to `limit` changed block indices, skipping the first `offset`.
    pub fn page(&self, offset: u64, limit: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        if offset >= self.count() {
            return out;
        }
        // The run holding the offset-th block.
        let mut i = self.prefix.partition_point(|&p| p <= offset) - 1;
        let mut within = offset - self.prefix[i];
        while out.len() < limit && i < self.runs.len() {
            let (s, l) = self.runs[i];
            let take = ((l - within) as usize).min(limit - out.len());
            out.extend((0..take as u64).map(|k| s + within + k));
            i += 1;
            within = 0;
        }
        out
    }

    /// Whether block `b` changed (binary search).
    pub fn contains(&self, b: u64) -> bool {
        let i = self.runs.partition_point(|r| r.0 <= b);
        i > 0 && b < self.runs[i - 1].0 + self.runs[i - 1].1
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.runs.len() * 16);
        for (s, l) in &self.runs {
            v.extend_from_slice(&s.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
        }
        v
    }

    /// Parse [`to_bytes`](Self::to_bytes) output; None if it is malformed.
    pub fn from_bytes(b: &[u8]) -> Option<Runs> {
        if !b.len().is_multiple_of(16) {
            return None;
        }
        let mut runs = Vec::with_capacity(b.len() / 16);
        let mut prev_end = 0u64;
        for c in b.chunks_exact(16) {
            let s = u64::from_le_bytes(c[..8].try_into().ok()?);
            let l = u64::from_le_bytes(c[8..].try_into().ok()?);
            if l == 0 || (!runs.is_empty() && s <= prev_end) {
                return None;
            }
            prev_end = s.checked_add(l)?;
            runs.push((s, l));
        }
        Some(Runs::from_sorted(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_count_page() {
        let mut b = RunsBuilder::default();
        b.push(1, 2); // 1,2
        b.push(3, 1); // adjacent: 1..=3
        b.push(10, 5); // 10..=14
        b.push(12, 5); // overlap: 10..=16
        b.push(100, 1);
        let r = b.finish();
        assert_eq!(r.runs(), &[(1, 3), (10, 7), (100, 1)]);
        assert_eq!(r.count(), 11);
        assert_eq!(r.page(0, 4), vec![1, 2, 3, 10]);
        assert_eq!(r.page(9, 5), vec![16, 100]);
        assert_eq!(r.page(11, 5), Vec::<u64>::new());
        assert!(r.contains(12) && !r.contains(17) && !r.contains(0));
        // Every block exactly once across pages of any size.
        for size in [1, 2, 3, 7] {
            let mut all = vec![];
            let mut off = 0;
            loop {
                let p = r.page(off, size);
                if p.is_empty() {
                    break;
                }
                off += p.len() as u64;
                all.extend(p);
            }
            assert_eq!(all, vec![1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 100]);
        }
        assert_eq!(Runs::from_bytes(&r.to_bytes()), Some(r));
        assert_eq!(Runs::from_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn huge_deltas_stay_small() {
        let mut b = RunsBuilder::default();
        // 20 million changed blocks in every other 1000-block stretch.
        for k in 0..20_000u64 {
            b.push(k * 2000, 1000);
        }
        let r = b.finish();
        assert_eq!(r.count(), 20_000_000);
        assert_eq!(r.to_bytes().len(), 20_000 * 16);
        assert_eq!(
            r.page(10_000_000, 3),
            vec![20_000_000, 20_000_001, 20_000_002]
        );
    }
}

/// The on-disk form kiln stores: 24-byte records `(start, len, blocks
/// before)`, little-endian, so a page is found by binary search with
/// O(log n) small reads and bounded memory, however large the delta.
pub fn to_indexed_bytes(r: &Runs) -> Vec<u8> {
    let mut v = Vec::with_capacity(r.runs.len() * 24);
    for ((s, l), p) in r.runs.iter().zip(&r.prefix) {
        v.extend_from_slice(&s.to_le_bytes());
        v.extend_from_slice(&l.to_le_bytes());
        v.extend_from_slice(&p.to_le_bytes());
    }
    v
}

/// A stored delta, read in place.
#[derive(Debug)]
pub struct RunsFile {
    f: std::fs::File,
    n: u64,
    count: u64,
}

impl RunsFile {
    pub fn open(path: &std::path::Path) -> std::io::Result<RunsFile> {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len % 24 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a kiln runs file",
            ));
        }
        let mut rf = RunsFile {
            f,
            n: len / 24,
            count: 0,
        };
        if rf.n > 0 {
            let (_, l, p) = rf.record(rf.n - 1)?;
            rf.count = p + l;
        }
        Ok(rf)
    }

    fn record(&self, i: u64) -> std::io::Result<(u64, u64, u64)> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 24];
        self.f.read_exact_at(&mut b, i * 24)?;
        let u = |k: usize| u64::from_le_bytes(b[k..k + 8].try_into().expect("8 bytes"));
        Ok((u(0), u(8), u(16)))
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// As [`Runs::page`], reading O(log n + page) records.
    pub fn page(&self, offset: u64, limit: usize) -> std::io::Result<Vec<u64>> {
        let mut out = Vec::new();
        if offset >= self.count || limit == 0 {
            return Ok(out);
        }
        // Last record whose prefix <= offset.
        let (mut lo, mut hi) = (0u64, self.n);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.record(mid)?.2 <= offset {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let mut i = lo;
        let (s, l, p) = self.record(i)?;
        let mut within = offset - p;
        let mut cur = (s, l);
        loop {
            let take = ((cur.1 - within) as usize).min(limit - out.len());
            out.extend((0..take as u64).map(|k| cur.0 + within + k));
            i += 1;
            within = 0;
            if out.len() >= limit || i >= self.n {
                return Ok(out);
            }
            let (s, l, _) = self.record(i)?;
            cur = (s, l);
        }
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn indexed_file_pages_like_memory() {
        let mut b = RunsBuilder::default();
        for k in 0..5000u64 {
            b.push(k * 7, 1 + k % 5);
        }
        let r = b.finish();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("runs");
        std::fs::write(&p, to_indexed_bytes(&r)).unwrap();
        let f = RunsFile::open(&p).unwrap();
        assert_eq!(f.count(), r.count());
        for (off, lim) in [
            (0, 10),
            (1, 3),
            (777, 256),
            (r.count() - 2, 10),
            (r.count(), 5),
            (123, 0),
        ] {
            assert_eq!(f.page(off, lim).unwrap(), r.page(off, lim), "{off} {lim}");
        }
        std::fs::write(&p, [0u8; 25]).unwrap();
        assert!(RunsFile::open(&p).is_err());
    }
}
