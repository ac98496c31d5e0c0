//! Importance-weighted encoders for ggml's 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1).
//!
//! candle quantizes these types with ggml's reference rule (scale from the block's extreme
//! value) and has no importance-matrix variant; llama.cpp does have one. Here, as there, each
//! element gets a weight `w_j = imatrix_j · sqrt(σ² + x_j²)` (σ² the row's mean square), a few
//! candidate scales around the reference one are tried, and for each candidate the scale (and for
//! the `_1` types the offset) is re-fitted by weighted least squares on the chosen integers; the
//! candidate with the least weighted error `Σ w (x − x̂)²` wins. The bytes are ggml's layouts.

use half::f16;

use super::QType;

/// Candidate scales are `(nmax + 0.1·i)` steps over the block's range for i in −SEARCH..=SEARCH.
const SEARCH: i32 = 9;

/// Encodes whole rows of `cols` values (`x.len()` a multiple of `cols`, `cols` a multiple of 32)
/// as `ty`, weighting each column by `imatrix[col]`.
pub fn encode(ty: QType, x: &[f32], cols: usize, imatrix: &[f32]) -> Vec<u8> {
    let per_block = ty.ggml().type_size();
    let mut out = Vec::with_capacity(x.len() / 32 * per_block);
    let mut w = [0f32; 32];
    for row in x.chunks(cols) {
        let sigma2 = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        for (b, blk) in row.chunks(32).enumerate() {
            let im = &imatrix[b * 32..b * 32 + 32];
            for j in 0..32 {
                w[j] = im[j] * (sigma2 + blk[j] * blk[j]).sqrt();
            }
            // A block whose columns never saw activation has no preference: weigh it evenly.
            if w.iter().all(|v| *v <= 0.0) {
                w = [1.0; 32];
            }
            let blk: &[f32; 32] = blk.try_into().expect("32-element block");
            match ty {
                QType::Q4_0 => put_sym(&mut out, blk, &w, 8, false),
                QType::Q5_0 => put_sym(&mut out, blk, &w, 16, true),
                QType::Q4_1 => put_asym(&mut out, blk, &w, 15, false),
                QType::Q5_1 => put_asym(&mut out, blk, &w, 31, true),
                other => unreachable!("{other:?} is not a 32-block type with a weighted encoder"),
            }
        }
    }
    out
}

/// Symmetric types: x ≈ d·(q − nmax), q in 0..2·nmax.
fn put_sym(out: &mut Vec<u8>, x: &[f32; 32], w: &[f32; 32], nmax: i32, five_bit: bool) {
    let max = x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let mut d = 0f32;
    if max != 0.0 {
        let mut best = f32::INFINITY;
        for i in -SEARCH..=SEARCH {
            // ggml's reference scale is d = max / −nmax; the candidates stretch it.
            let iscale = -(nmax as f32 + 0.1 * i as f32) / max;
            let (mut sxq, mut sqq) = (0f32, 0f32);
            let mut q = [0f32; 32];
            for j in 0..32 {
                q[j] = (iscale * x[j]).round().clamp(-nmax as f32, (nmax - 1) as f32);
                sxq += w[j] * x[j] * q[j];
                sqq += w[j] * q[j] * q[j];
            }
            if sqq <= 0.0 {
                continue;
            }
            let dd = sxq / sqq;
            let err: f32 = (0..32).map(|j| w[j] * (x[j] - dd * q[j]).powi(2)).sum();
            if err < best {
                best = err;
                d = dd;
            }
        }
    }
    let d16 = f16::from_f32(d);
    let df = d16.to_f32();
    let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
    let q: Vec<u8> = x.iter().map(|v| ((v * inv).round().clamp(-nmax as f32, (nmax - 1) as f32) as i32 + nmax) as u8).collect();
    out.extend_from_slice(&d16.to_le_bytes());
    pack(out, &q, five_bit);
}

/// Offset types: x ≈ d·q + m, q in 0..=nmax.
fn put_asym(out: &mut Vec<u8>, x: &[f32; 32], w: &[f32; 32], nmax: i32, five_bit: bool) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut d, mut m) = (0f32, min);
    if max > min {
        let mut best = f32::INFINITY;
        for i in -SEARCH..=SEARCH {
            let iscale = (nmax as f32 + 0.1 * i as f32) / (max - min);
            let mut q = [0f32; 32];
            let (mut a, mut b, mut c, mut dx, mut e) = (0f32, 0f32, 0f32, 0f32, 0f32);
            for j in 0..32 {
                q[j] = (iscale * (x[j] - min)).round().clamp(0.0, nmax as f32);
                a += w[j] * q[j] * q[j];
                b += w[j] * q[j];
                c += w[j];
                dx += w[j] * q[j] * x[j];
                e += w[j] * x[j];
            }
            // Weighted least squares for (d, m) given q: [a b; b c]·[d; m] = [dx; e].
            let det = a * c - b * b;
            if det <= 0.0 {
                continue;
            }
            let dd = (c * dx - b * e) / det;
            let mm = (a * e - b * dx) / det;
            let err: f32 = (0..32).map(|j| w[j] * (x[j] - dd * q[j] - mm).powi(2)).sum();
            if err < best && dd > 0.0 {
                best = err;
                d = dd;
                m = mm;
            }
        }
        if d == 0.0 {
            d = (max - min) / nmax as f32;
        }
    }
    let (d16, m16) = (f16::from_f32(d), f16::from_f32(m));
    let (df, mf) = (d16.to_f32(), m16.to_f32());
    let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
    let q: Vec<u8> = x.iter().map(|v| ((v - mf) * inv).round().clamp(0.0, nmax as f32) as u8).collect();
    out.extend_from_slice(&d16.to_le_bytes());
    out.extend_from_slice(&m16.to_le_bytes());
    pack(out, &q, five_bit);
}

/// ggml's nibble layout: byte j holds element j (low) and j+16 (high); five-bit types put each
/// element's fifth bit in a 32-bit word first (bit j for element j).
fn pack(out: &mut Vec<u8>, q: &[u8], five_bit: bool) {
    if five_bit {
        let qh: u32 = q.iter().enumerate().map(|(j, v)| (((*v >> 4) & 1) as u32) << j).sum();
        out.extend_from_slice(&qh.to_le_bytes());
    }
    for j in 0..16 {
        out.push((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        for ty in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1] {
            let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
            assert_eq!(encode(ty, &x, 64, &[1.0; 64]).len(), 2 * ty.ggml().type_size());
        }
    }
}
