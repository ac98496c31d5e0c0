//! SparseGPT (Frantar & Alistarh, 2023): prune a linear layer so that its output on calibration
//! inputs changes least, using the inverse Hessian of the layer-wise reconstruction problem.
//!
//! For `W` `[out, in]` with calibration inputs `X` (H = XᵀX): damp H by 1 % of its mean diagonal,
//! take the upper Cholesky factor `U` of H⁻¹ (UᵀU = H⁻¹), and sweep the columns in blocks of 128.
//! Within a block the mask is chosen adaptively from the *current* (already error-compensated)
//! weights by `w² / U_jj²`; each column is then zeroed where masked and its error
//! `(w − q) / U_jj` is spread over the block's later columns, and after the block over all later
//! columns with one matrix product. Masks are chosen per output row so every row gets exactly its
//! share of zeros (rounded per block so the row total is exact); N:M picks per group of M.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::mask::{lowest_k, zeros_per_row, Pattern};

/// Column block width of the sweep (the paper's B).
pub const BLOCK: usize = 128;
/// Dampening as a fraction of the mean Hessian diagonal (the paper's λ).
pub const PERCDAMP: f64 = 0.01;

/// Column-block width of the blocked Cholesky and triangular inverse: the diagonal blocks and
/// panels are done by dot products, the rest (all but O(n²·nb) of the work) by matrix products.
pub const FACTOR_BLOCK: usize = 128;

/// Rows per GEMM call in the trailing updates: the unit of parallel work, and the step of the
/// staircase that skips the upper triangle.
const ROW_CHUNK: usize = 256;

/// In-place lower Cholesky factor of the symmetric positive-definite `n × n` matrix `a`
/// (row-major, only the lower triangle read); the strict upper triangle is zeroed.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<()> {
    cholesky_lower_blocked(a, n, FACTOR_BLOCK)
}

/// [`cholesky_lower`] with column blocks of `nb` (right-looking, as LAPACK's `dpotrf`): factor
/// the diagonal block, solve the panel below it, and subtract the panel's outer product from the
/// trailing matrix with GEMMs (lower part only). The unblocked form streamed the trailing matrix
/// through memory once per column, n³/6 loads: for n = 8,960 (a 1.5B model's down_proj) that
/// is minutes of memory traffic, where the GEMMs run near the f64 peak.
pub fn cholesky_lower_blocked(a: &mut [f64], n: usize, nb: usize) -> Result<()> {
    if a.len() != n * n || nb == 0 {
        bail!("Cholesky: {} entries for a {n} × {n} matrix (block {nb})", a.len());
    }
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + nb).min(n);
        // The diagonal block: columns before k0 are already subtracted from it.
        for j in k0..k1 {
            let (head, tail) = a.split_at_mut((j + 1) * n);
            let row_j = &mut head[j * n..];
            let d = row_j[j] - dot(&row_j[k0..j], &row_j[k0..j]);
            if !(d > 0.0) || !d.is_finite() {
                bail!("matrix is not positive definite (pivot {j} is {d})");
            }
            let d = d.sqrt();
            row_j[j] = d;
            for row_i in tail.chunks_mut(n).take(k1 - j - 1) {
                row_i[j] = (row_i[j] - dot(&row_i[k0..j], &row_j[k0..j])) / d;
            }
        }
        if k1 < n {
            // The panel below it: L21 = A21 · L11⁻ᵀ, a forward substitution per row.
            let (head, tail) = a.split_at_mut(k1 * n);
            let l11 = &head[k0 * n..];
            tail.par_chunks_mut(n).with_min_len(16).for_each(|row| {
                for j in k0..k1 {
                    let lj = &l11[(j - k0) * n..(j - k0 + 1) * n];
                    row[j] = (row[j] - dot(&row[k0..j], &lj[k0..j])) / lj[j];
                }
            });
            // The trailing matrix: A22 −= L21 · L21ᵀ.
            let p = SendF64(a.as_mut_ptr());
            row_chunks(k1, n).into_par_iter().for_each(|(r0, r1)| {
                let p = &p;
                // SAFETY: `a` is n × n row-major. This writes rows r0..r1, columns k1..r1 (the
                // chunk's part of the lower trailing triangle, disjoint across chunks) and reads
                // columns k0..k1 < k1 of rows k1..r1, which no chunk writes.
                unsafe {
                    gemm_row_major(r1 - r0, r1 - k1, k1 - k0, p.0.add(r0 * n + k1), n as isize, true, p.0.add(r0 * n + k0), n as isize, p.0.add(k1 * n + k0), n as isize, 1, 1.0, -1.0)
                };
            });
        }
        k0 = k1;
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(())
}

/// Inverts the lower-triangular `n × n` matrix `l` (row-major, strict upper triangle zero) in
/// place, by column blocks of [`FACTOR_BLOCK`] from the last (LAPACK's `dtrtri`).
pub fn invert_lower_in_place(l: &mut [f64], n: usize) -> Result<()> {
    invert_lower_blocked(l, n, FACTOR_BLOCK)
}

/// [`invert_lower_in_place`] with column blocks of `nb`. With the trailing block T = L22⁻¹
/// already in place, block column j of L⁻¹ is (L11⁻¹, −T · L21 · L11⁻¹): one triangular GEMM
/// (T is lower triangular, so each row chunk stops at its diagonal), the small diagonal block
/// inverted by `dtrti2`'s column recurrence, and one GEMM by it. The strict upper triangle must
/// be zero (as [`cholesky_lower`] leaves it): the GEMMs read it.
pub fn invert_lower_blocked(l: &mut [f64], n: usize, nb: usize) -> Result<()> {
    if l.len() != n * n || nb == 0 {
        bail!("triangular inverse: {} entries for a {n} × {n} matrix (block {nb})", l.len());
    }
    let starts: Vec<usize> = (0..n).step_by(nb).collect();
    for &j0 in starts.iter().rev() {
        let j1 = (j0 + nb).min(n);
        let (b, m) = (j1 - j0, n - j1);
        // tmp = T · L21 (m × b), row-chunked: row r of T has entries only in columns ..=r.
        let mut tmp = vec![0f64; m * b];
        if m > 0 {
            let (p, t) = (SendF64(l.as_mut_ptr()), SendF64(tmp.as_mut_ptr()));
            row_chunks(j1, n).into_par_iter().for_each(|(r0, r1)| {
                let (p, t) = (&p, &t);
                // SAFETY: reads rows r0..r1, columns j1..r1 of `l` (T) and rows j1..r1, columns
                // j0..j1 (L21); writes rows r0−j1..r1−j1 of tmp (m × b), disjoint across chunks.
                unsafe {
                    gemm_row_major(r1 - r0, b, r1 - j1, t.0.add((r0 - j1) * b), b as isize, false, p.0.add(r0 * n + j1), n as isize, p.0.add(j1 * n + j0), 1, n as isize, 0.0, 1.0)
                };
            });
        }
        invert_diagonal_block(l, n, j0, j1)?;
        if m > 0 {
            // L21 ← −tmp · L11⁻¹ (b × b, lower triangular with a zero upper part).
            let (p, t) = (SendF64(l.as_mut_ptr()), SendF64(tmp.as_mut_ptr()));
            row_chunks(j1, n).into_par_iter().for_each(|(r0, r1)| {
                let (p, t) = (&p, &t);
                // SAFETY: writes rows r0..r1, columns j0..j1 of `l` (disjoint across chunks),
                // reads tmp and the diagonal block (rows j0..j1 < j1), which no chunk writes.
                unsafe {
                    gemm_row_major(r1 - r0, b, b, p.0.add(r0 * n + j0), n as isize, false, t.0.add((r0 - j1) * b), b as isize, p.0.add(j0 * n + j0), 1, n as isize, 0.0, -1.0)
                };
            });
        }
    }
    Ok(())
}

/// Inverts the diagonal block rows/columns j0..j1 of `l` in place, column by column from the
/// last (`dtrti2`): column j below the diagonal is −L⁻¹[j+1.., j+1..] · L[j+1.., j] / L[j][j],
/// and the block's trailing part already holds its inverse.
fn invert_diagonal_block(l: &mut [f64], n: usize, j0: usize, j1: usize) -> Result<()> {
    for j in (j0..j1).rev() {
        let d = l[j * n + j];
        if d == 0.0 || !d.is_finite() {
            bail!("triangular matrix is singular (diagonal {j} is {d})");
        }
        let inv = 1.0 / d;
        l[j * n + j] = inv;
        let x: Vec<f64> = (j + 1..j1).map(|i| l[i * n + j]).collect();
        for (r, row) in l[(j + 1) * n..j1 * n].chunks_mut(n).enumerate() {
            // Row i = j+1+r of the inverse times the old column segment x (entries j+1..=i).
            row[j] = -inv * dot(&row[j + 1..=j + 1 + r], &x[..=r]);
        }
    }
    Ok(())
}

/// `dst = alpha·dst + beta·lhs·rhs` on one thread, for a row-major `dst` (`m × n`, row stride
/// `dst_rs`) and `lhs` (`m × k`, row stride `lhs_rs`) and an `rhs` (`k × n`) of any strides.
///
/// # Safety
/// The pointers must address those extents; `dst` must not overlap `lhs` or `rhs`, and no other
/// thread may write what this call reads or writes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_row_major(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f64,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f64,
    lhs_rs: isize,
    rhs: *const f64,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f64,
    beta: f64,
) {
    // SAFETY: forwarded to the caller.
    unsafe { gemm::gemm(m, n, k, dst, 1, dst_rs, read_dst, lhs, 1, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, false, false, false, gemm::Parallelism::None) }
}

/// Rows from..to in chunks of [`ROW_CHUNK`].
fn row_chunks(from: usize, to: usize) -> Vec<(usize, usize)> {
    (from..to).step_by(ROW_CHUNK).map(|r0| (r0, (r0 + ROW_CHUNK).min(to))).collect()
}

/// A raw pointer into the matrix the row-chunk threads share (each writes its own rows).
struct SendF64(*mut f64);
// SAFETY: see the callers: the regions written through it are disjoint.
unsafe impl Send for SendF64 {}
unsafe impl Sync for SendF64 {}

/// Dot product in 8 independent lanes (vectorizes without fast-math), then the tail.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f64>() + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f64>()
}

/// Upper Cholesky factor `U` of the inverse of the damped Hessian (UᵀU = (H + λI)⁻¹), row-major,
/// with columns that never saw an input (zero diagonal) made inert. Returns U and the dead columns.
///
/// Computed in one n × n buffer besides `h` (for a 1.5B model's down_proj, n = 8,960: 0.64 GB,
/// where forming H⁻¹ and factoring it again held four such matrices), with the reversal J
/// (J = J⁻¹ flips row and column order, so reversing the row-major buffer computes J·A·J):
/// factor J H J = L Lᵀ; then H = R Rᵀ with R = J L J upper triangular, so H⁻¹ = (R⁻¹)ᵀ R⁻¹ and
/// U = R⁻¹ = J L⁻¹ J: one Cholesky, one in-place triangular inverse and two reversals.
pub fn inverse_hessian_factor(h: &[f64], n: usize) -> Result<(Vec<f64>, Vec<bool>)> {
    if h.len() != n * n {
        bail!("SparseGPT: Hessian of {} entries does not match {n} columns", h.len());
    }
    let mut a = h.to_vec();
    let mut dead = vec![false; n];
    for i in 0..n {
        if a[i * n + i] == 0.0 {
            dead[i] = true;
            a[i * n + i] = 1.0;
        }
    }
    let mean_diag = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
    let damp = PERCDAMP * mean_diag;
    for i in 0..n {
        a[i * n + i] += damp;
    }
    a.reverse();
    cholesky_lower(&mut a, n)?;
    invert_lower_in_place(&mut a, n)?;
    a.reverse();
    Ok((a, dead))
}

/// Prunes `w` (`rows × cols`, row-major) in place with SparseGPT given the Hessian `h` = Σ xᵀx
/// (`cols × cols`) of its calibration inputs.
pub fn prune(w: &mut [f32], rows: usize, cols: usize, h: &[f64], pattern: Pattern) -> Result<()> {
    let (u, dead) = inverse_hessian_factor(h, cols)?;
    prune_with_factor(w, rows, cols, &u, &dead, pattern)
}

/// The column sweep of [`prune`] with a precomputed [`inverse_hessian_factor`], so several
/// sparsities of one layer share the factorization.
pub fn prune_with_factor(w: &mut [f32], rows: usize, cols: usize, u: &[f64], dead: &[bool], pattern: Pattern) -> Result<()> {
    pattern.check_cols(cols)?;
    if w.len() != rows * cols || u.len() != cols * cols || dead.len() != cols {
        bail!("SparseGPT: weight {}×{} does not match its {}-column factor", rows, cols, dead.len());
    }
    for row in w.chunks_mut(cols) {
        for (x, &d) in row.iter_mut().zip(dead) {
            if d {
                *x = 0.0;
            }
        }
    }
    let sparsity = pattern.sparsity();
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + BLOCK).min(cols);
        let bs = i2 - i1;
        // Zeros this block owes each row: cumulative rounding keeps the row total exact.
        let k_block = zeros_per_row(sparsity, i2) - zeros_per_row(sparsity, i1);
        let diag: Vec<f64> = (i1..i2).map(|j| u[j * cols + j]).collect();
        // Each row's sweep within the block depends only on that row and U: run rows in parallel.
        let errs: Vec<f32> = w
            .par_chunks_mut(cols)
            .flat_map_iter(|row| {
                let w1 = &mut row[i1..i2];
                let mut err = vec![0f32; bs];
                let mut masked = vec![false; bs];
                if let Pattern::Unstructured(_) = pattern {
                    let score: Vec<f32> = w1.iter().zip(&diag).map(|(&x, &d)| ((x as f64).powi(2) / (d * d)) as f32).collect();
                    for j in lowest_k(&score, k_block) {
                        masked[j] = true;
                    }
                }
                for i in 0..bs {
                    if let Pattern::NM { n, m } = pattern {
                        if (i1 + i) % m == 0 {
                            let end = (i + m).min(bs);
                            let score: Vec<f32> =
                                (i..end).map(|j| ((w1[j] as f64).powi(2) / (diag[j] * diag[j])) as f32).collect();
                            for j in lowest_k(&score, m - n) {
                                masked[i + j] = true;
                            }
                        }
                    }
                    let x = w1[i];
                    let q = if masked[i] { 0.0 } else { x };
                    let e = ((x - q) as f64 / diag[i]) as f32;
                    err[i] = e;
                    if e != 0.0 {
                        let urow = &u[(i1 + i) * cols + i1 + i..(i1 + i) * cols + i2];
                        for (wj, &uij) in w1[i..].iter_mut().zip(urow) {
                            *wj -= (e as f64 * uij) as f32;
                        }
                    }
                    w1[i] = q;
                }
                err
            })
            .collect();
        if i2 < cols {
            // W[:, i2:] -= Err · U[i1:i2, i2:]
            let e = Tensor::from_vec(errs, (rows, bs), &Device::Cpu)?;
            let ub: Vec<f32> = (i1..i2).flat_map(|r| u[r * cols + i2..(r + 1) * cols].iter().map(|&x| x as f32)).collect();
            let ub = Tensor::from_vec(ub, (bs, cols - i2), &Device::Cpu)?;
            let upd: Vec<f32> = e.matmul(&ub)?.flatten_all()?.to_vec1()?;
            w.par_chunks_mut(cols).zip(upd.par_chunks(cols - i2)).for_each(|(row, d)| {
                for (x, y) in row[i2..].iter_mut().zip(d) {
                    *x -= y;
                }
            });
        }
        i1 = i2;
    }
    Ok(())
}
