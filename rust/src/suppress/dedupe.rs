//! Which rows of an import file change anything (docs/suppression.md, "Import"): a row is
//! left out when the same address (in its scope) had the same event in an earlier row of
//! the file, so folding the rows kept gives the live set that folding every row in file
//! order would: each address's last row holds.
//!
//! The file is read a batch of rows at a time; `LatestRows` keeps, across batches, each
//! fingerprint's event code of its latest row so far. Fingerprints are keyed hashes
//! already, uniformly spread, so the map hashes them by one multiplication.

use hashbrown::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that are uniform hashes already: one odd multiplication spreads
/// their bits over the high ones, which hashbrown reads for its control bytes.
#[derive(Default)]
pub struct SpreadHasher(u64);

impl Hasher for SpreadHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What `LatestRows::rows` says of one batch: one byte (0 or 1) a row each.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RowMarks {
    /// The row changes something: keep it.
    pub keep: Vec<u8>,
    /// The file has not named the row's address before (its first row).
    pub first: Vec<u8>,
    /// Rows left out because an earlier row had the same address and event.
    pub duplicates: usize,
}

/// Each fingerprint's event code in its latest row so far.
#[derive(Default)]
pub struct LatestRows {
    latest: HashMap<u64, u8, BuildHasherDefault<SpreadHasher>>,
}

impl LatestRows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fingerprints seen so far.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// Mark the next batch of rows, in file order: `fingerprints` and `codes` one a row,
    /// `refused` the rows whose address was refused (never kept, never remembered).
    pub fn rows(&mut self, fingerprints: &[u64], codes: &[u8], refused: &[usize]) -> RowMarks {
        let n = fingerprints.len().min(codes.len());
        let mut marks = RowMarks {
            keep: vec![1; n],
            first: vec![1; n],
            duplicates: 0,
        };
        for &row in refused.iter().filter(|&&row| row < n) {
            marks.keep[row] = 0;
            marks.first[row] = 0;
        }
        self.latest.reserve(n);
        for row in 0..n {
            if marks.keep[row] == 0 {
                continue;
            }
            let code = codes[row];
            if let Some(before) = self.latest.insert(fingerprints[row], code) {
                marks.first[row] = 0;
                if before == code {
                    marks.keep[row] = 0;
                    marks.duplicates += 1;
                }
            }
        }
        marks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_event_is_left_out_and_a_changed_one_kept() {
        let mut latest = LatestRows::new();
        // a: complaint, hard bounce, complaint (each changes the last word); b twice the same.
        let marks = latest.rows(&[1, 2, 1, 2], &[2, 3, 1, 3], &[]);
        assert_eq!(marks.keep, [1, 1, 1, 0]);
        assert_eq!(marks.first, [1, 1, 0, 0]);
        assert_eq!(marks.duplicates, 1);
        let marks = latest.rows(&[1, 3, 2], &[2, 3, 1], &[]);
        assert_eq!(marks.keep, [1, 1, 1]);
        assert_eq!(marks.first, [0, 1, 0]);
        let marks = latest.rows(&[1], &[2], &[]);
        assert_eq!(marks.keep, [0]);
        assert_eq!(latest.len(), 3);
    }

    #[test]
    fn refused_rows_are_neither_kept_nor_remembered() {
        let mut latest = LatestRows::new();
        let marks = latest.rows(&[7, 7, 8], &[1, 1, 1], &[0, 9]);
        assert_eq!(marks.keep, [0, 1, 1]);
        assert_eq!(marks.first, [0, 1, 1]);
        assert_eq!(marks.duplicates, 0);
    }
}
