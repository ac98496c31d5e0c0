//! Which weights to drop, given a score per weight: per output row (unstructured) or per group of
//! M consecutive input weights (N:M). Lower score = dropped first.

use anyhow::{bail, Result};
use rayon::prelude::*;

/// The sparsity pattern of a pruned matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// A fraction of every output row's weights is zero.
    Unstructured(f64),
    /// In every group of `m` consecutive input weights of a row, `n` are kept.
    NM { n: usize, m: usize },
}

impl Pattern {
    pub fn parse_nm(s: &str) -> Result<Self> {
        let Some((n, m)) = s.split_once(':') else { bail!("pattern '{s}' is not N:M (e.g. 2:4)") };
        let (n, m): (usize, usize) = match (n.trim().parse(), m.trim().parse()) {
            (Ok(n), Ok(m)) => (n, m),
            _ => bail!("pattern '{s}' is not N:M with whole numbers (e.g. 2:4)"),
        };
        if m == 0 || n == 0 || n >= m || m > 256 {
            bail!("pattern {n}:{m} is impossible: need 0 < N < M ≤ 256");
        }
        Ok(Pattern::NM { n, m })
    }

    pub fn unstructured(s: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&s) || s.is_nan() {
            bail!("sparsity {s} is impossible: need 0 ≤ S < 1");
        }
        Ok(Pattern::Unstructured(s))
    }

    /// The fraction of weights this pattern zeroes.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Pattern::Unstructured(s) => s,
            Pattern::NM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }

    /// Checks that a matrix with rows of `cols` weights can take this pattern.
    pub fn check_cols(&self, cols: usize) -> Result<()> {
        if let Pattern::NM { n, m } = *self {
            if cols % m != 0 {
                bail!("rows of {cols} weights cannot be cut into groups of {m} for {n}:{m} sparsity");
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match *self {
            Pattern::Unstructured(s) => format!("{:.1}% unstructured", 100.0 * s),
            Pattern::NM { n, m } => format!("{n}:{m}"),
        }
    }
}

/// Zeros per row of `cols` weights at unstructured sparsity `s` (rounded to the nearest weight).
pub fn zeros_per_row(s: f64, cols: usize) -> usize {
    ((s * cols as f64).round() as usize).min(cols)
}

/// Indices of the `k` lowest scores of `row` (ties broken by position, so masks are deterministic).
pub fn lowest_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < row.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)));
    }
    idx.truncate(k);
    idx
}

/// The drop mask (`true` = zero this weight) of a `rows × cols` score matrix under `pattern`.
pub fn select(scores: &[f32], rows: usize, cols: usize, pattern: Pattern) -> Result<Vec<bool>> {
    pattern.check_cols(cols)?;
    let mut mask = vec![false; rows * cols];
    mask.par_chunks_mut(cols).zip(scores.par_chunks(cols)).for_each(|(mrow, srow)| match pattern {
        Pattern::Unstructured(s) => {
            for j in lowest_k(srow, zeros_per_row(s, cols)) {
                mrow[j] = true;
            }
        }
        Pattern::NM { n, m } => {
            for (mg, sg) in mrow.chunks_mut(m).zip(srow.chunks(m)) {
                for j in lowest_k(sg, m - n) {
                    mg[j] = true;
                }
            }
        }
    });
    Ok(mask)
}

/// Checks that a pruned `rows × cols` matrix has at least the zeros its pattern requires in every
/// row (or group); returns the achieved fraction of zeros. Weights that were already exactly zero
/// may add to the count, never subtract.
pub fn verify(w: &[f32], rows: usize, cols: usize, pattern: Pattern) -> Result<f64> {
    let zeros_total = w.iter().filter(|&&x| x == 0.0).count();
    for (r, row) in w.chunks(cols).enumerate().take(rows) {
        match pattern {
            Pattern::Unstructured(s) => {
                let z = row.iter().filter(|&&x| x == 0.0).count();
                if z < zeros_per_row(s, cols) {
                    bail!("row {r} has {z} zeros, fewer than the {} its sparsity requires", zeros_per_row(s, cols));
                }
            }
            Pattern::NM { n, m } => {
                for (g, grp) in row.chunks(m).enumerate() {
                    let z = grp.iter().filter(|&&x| x == 0.0).count();
                    if z < m - n {
                        bail!("row {r}, group {g} keeps {} of {m} weights, more than {n}", m - z);
                    }
                }
            }
        }
    }
    Ok(zeros_total as f64 / (rows * cols).max(1) as f64)
}
