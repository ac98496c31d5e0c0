//! Fused CPU kernels for the inference path, where candle's composed ops would make several
//! passes over memory or compute what a causal mask throws away. None carries a gradient; the
//! differentiable mode has its own ([`super::grad_kernels`]).

use anyhow::{bail, Result};
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// Runs `f` on the f32 contents of a contiguous CPU tensor without copying them.
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else { bail!("tensor is not contiguous") };
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[a..b])),
        _ => bail!("fused kernels run on the CPU only"),
    }
}

/// Softmax over the last axis of scores `[.., rows, keys]` under a causal mask, for a block of
/// `q_block` query positions starting at `offset`: row `r` is query position `offset + r % q_block`
/// (several heads' blocks may be stacked along the rows) and attends to keys `0..=offset + r % q_block`,
/// or with a sliding `window` only to the last `window` of them (its own included).
/// Masked entries are exactly 0; only the unmasked part is computed.
pub fn causal_softmax_block(scores: &Tensor, q_block: usize, offset: usize, window: Option<usize>) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let keys = *dims.last().unwrap_or(&0);
    if dims.len() < 2 || q_block == 0 || offset + q_block > keys {
        bail!("causal softmax: block of {q_block} queries at {offset} does not fit scores {dims:?}");
    }
    let out = with_f32_slice(scores, |s| {
        let mut out: Vec<f32> = Vec::with_capacity(s.len());
        // SAFETY: every element is written below (probabilities on the unmasked prefix, zeros
        // after it) before the vector is read.
        #[allow(clippy::uninit_vec)]
        unsafe {
            out.set_len(s.len())
        };
        out.par_chunks_mut(keys).zip(s.par_chunks(keys)).enumerate().with_min_len(32).for_each(|(r, (o, x))| {
            let last = offset + r % q_block;
            let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
            let m = x[first..=last].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = super::vexp::exp_shifted(&x[first..=last], &mut o[first..=last], m);
            let inv = 1.0 / sum;
            for oj in &mut o[first..=last] {
                *oj *= inv;
            }
            o[..first].fill(0.0);
            o[last + 1..].fill(0.0);
        });
        out
    })?;
    Ok(Tensor::from_vec(out, dims, scores.device())?)
}

/// Causal softmax of full square scores `[.., seq, seq]` (optionally within a sliding window).
pub fn causal_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let t = *scores.dims().last().unwrap_or(&0);
    causal_softmax_block(scores, t, 0, window)
}

/// `silu(g) * u` in one pass.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("silu_mul shapes differ: {:?} vs {:?}", g.dims(), u.dims());
    }
    let gv = g.contiguous()?;
    let uv = u.contiguous()?;
    let out = with_f32_slice(&gv, |gs| {
        with_f32_slice(&uv, |us| {
            let mut out = vec![0f32; gs.len()];
            out.par_chunks_mut(4096).zip(gs.par_chunks(4096).zip(us.par_chunks(4096))).for_each(|(o, (g, u))| super::vexp::silu_mul(g, u, o));
            out
        })
    })??;
    Ok(Tensor::from_vec(out, g.dims(), g.device())?)
}

/// Σ over rows of x², per column, of `x` viewed as `[rows, width]`, accumulated in f64 straight
/// from the buffer with rows split across threads (candle's reduction over the row axis is a
/// strided pass and dominated calibration time).
pub fn column_sum_squares(x: &Tensor, width: usize) -> Result<Vec<f64>> {
    let rows = x.elem_count() / width.max(1);
    let x2 = x.reshape((rows, width))?;
    // At most ~64 partial sums, sized by the row count alone (never by the thread count).
    let rows_per_chunk = (rows / 64).max(64);
    with_f32_slice(&x2, |s| {
        s.par_chunks(width.max(1) * rows_per_chunk)
            .map(|chunk| {
                let mut acc = vec![0f64; width];
                for row in chunk.chunks(width) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += (v as f64) * (v as f64);
                    }
                }
                acc
            })
            // Partial sums come back in chunk order and are added in that order, so the result
            // does not depend on how many threads ran or how rayon split the work.
            .collect::<Vec<_>>()
            .into_iter()
            .fold(vec![0f64; width], |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            })
    })
}

/// `x @ Wᵀ` for `x` `[rows, in]` and a block-quantized `W` `[out, in]`, computed as llama.cpp
/// (and candle's quantized matmul) compute it, but with an f32 GEMM on the decoded weight: the
/// activations are first rounded to the weight type's 8-bit dot-product partner
/// ([`round_to_dot_partner`]). Q4_1/Q5_1 weights meet Q8_1 activations, whose per-block sum `s`
/// is stored in f16 and multiplies the weight block's offset `m`; the product then carries
/// `m · (s − Σ x')`, which is added here as a small `[rows, blocks] × [blocks, out]` product.
pub fn quantized_product(x: &Tensor, w: &candle_core::quantized::QTensor) -> Result<Tensor> {
    use candle_core::quantized::GgmlDType as G;
    let (_, cols) = x.dims2()?;
    let dense = w.dequantize(x.device())?;
    let block_bytes = match w.dtype() {
        G::Q4_1 => 20,
        G::Q5_1 => 24,
        other => return f32_product(&round_to_dot_partner(x, other)?, &dense),
    };
    let (out, inp) = w.shape().dims2()?;
    if inp != cols || cols % 32 != 0 {
        bail!("quantized product: input of {cols} columns for a [{out}, {inp}] weight");
    }
    let nb = cols / 32;
    let (xr, e) = round_rows_q8_1(x)?;
    let data = w.data()?;
    if data.len() != out * nb * block_bytes {
        bail!("quantized product: {} bytes for a [{out}, {inp}] {:?} weight", data.len(), w.dtype());
    }
    // Each block starts with its f16 scale d and then its f16 offset m.
    let m: Vec<f32> = data.chunks(block_bytes).map(|b| half::f16::from_le_bytes([b[2], b[3]]).to_f32()).collect();
    let m = Tensor::from_vec(m, (out, nb), x.device())?;
    Ok((f32_product(&xr, &dense)? + e.matmul(&m.t()?)?)?)
}

/// Rounds every row of `x` `[rows, cols]` to Q8_1 (32-value blocks) and decodes it back; also
/// returns each block's `s − Σ x'` `[rows, cols / 32]` (see [`quantized_product`]).
fn round_rows_q8_1(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = x.dims2()?;
    if cols % 32 != 0 {
        bail!("activation rows of {cols} are not whole Q8_1 blocks");
    }
    let nb = cols / 32;
    let mut v: Vec<f32> = with_f32_slice(x, |s| s.to_vec())?;
    let mut err = vec![0f32; rows * nb];
    v.par_chunks_mut(cols.max(1)).zip(err.par_chunks_mut(nb.max(1))).with_min_len(8).for_each(|(row, e)| {
        for (blk, e) in row.chunks_mut(32).zip(e.iter_mut()) {
            *e = round_q8_1_block(blk);
        }
    });
    Ok((Tensor::from_vec(v, (rows, cols), x.device())?, Tensor::from_vec(err, (rows, nb), x.device())?))
}

/// Rounds one 32-value block to Q8_1 in place (candle's `BlockQ8_1::from_float` arithmetic) and
/// returns `s − Σ x'`: the stored f16 block sum minus the sum of the rounded values.
fn round_q8_1_block(blk: &mut [f32]) -> f32 {
    use half::f16;
    let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let d16 = f16::from_f32(d);
    let mut sum_q = 0i32;
    let mut sum_x = 0f32;
    for x in blk.iter_mut() {
        let q = (*x * id).round() as i8;
        sum_q += q as i32;
        *x = q as f32 * d16.to_f32();
        sum_x += *x;
    }
    (f16::from_f32(sum_q as f32) * d16).to_f32() - sum_x
}

/// Rounds a matmul's activations `x` `[rows, cols]` as ggml does before multiplying them with a
/// weight stored as `weight`: every quantized weight type has an 8-bit "dot-product partner" the
/// activations are quantized to, block by block along each row (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1
/// for Q4_1/Q5_1, Q8_K for the k-quants); F16/BF16 weights meet activations rounded to the same
/// type; F32 leaves them alone. candle's quantized matmul does this internally; the decode +
/// f32 GEMM path of a quantized [`super::Linear`] calls this so that both paths, and llama.cpp,
/// compute the same product.
pub fn round_to_dot_partner(x: &Tensor, weight: candle_core::quantized::GgmlDType) -> Result<Tensor> {
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0};
    use candle_core::quantized::GgmlDType as G;
    use candle_core::DType;
    match weight {
        G::F32 => Ok(x.clone()),
        G::F16 => Ok(x.to_dtype(DType::F16)?.to_dtype(DType::F32)?),
        G::BF16 => Ok(x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?),
        G::Q4_0 | G::Q5_0 | G::Q8_0 => round_rows_through::<BlockQ8_0>(x),
        // The block sums (`s`) matter only with the weight's offsets: see quantized_product.
        G::Q4_1 | G::Q5_1 | G::Q8_1 => Ok(round_rows_q8_1(x)?.0),
        G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K | G::Q8K => round_rows_through::<BlockQ8K>(x),
    }
}

/// Quantizes each row of `x` `[rows, cols]` to the block type `T` and decodes it back.
fn round_rows_through<T: candle_core::quantized::k_quants::GgmlType>(x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = x.dims2()?;
    if cols % T::BLCK_SIZE != 0 {
        bail!("activation rows of {cols} are not whole {:?} blocks", T::DTYPE);
    }
    let mut v: Vec<f32> = with_f32_slice(x, |s| s.to_vec())?;
    v.par_chunks_mut(cols.max(1)).with_min_len(8).for_each(|row| {
        let mut blocks = vec![T::zeros(); cols / T::BLCK_SIZE];
        T::from_float(row, &mut blocks);
        T::to_float(&blocks, row);
    });
    Ok(Tensor::from_vec(v, (rows, cols), x.device())?)
}

/// Input rows up to which an f32 linear layer multiplies with [`gemv`] instead of a GEMM.
pub const GEMV_MAX_ROWS: usize = 4;

/// `x @ Wᵀ` for a few rows of `x` `[rows, k]` and an f32 weight `W` `[out, k]` (row-major): the
/// decode step's product, which is bound by reading `W` once. Each weight row is read once for all
/// rows of `x`, outputs are split across threads in runs of 64, and each dot product sums 16 lanes
/// apart so it vectorizes. A GEMM library's m = 1 path does several times more bookkeeping per
/// byte here.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (out, k2) = w.dims2()?;
    if k != k2 || rows == 0 || rows > GEMV_MAX_ROWS {
        bail!("gemv: [{rows}, {k}] input for a [{out}, {k2}] weight");
    }
    let xs: Vec<f32> = with_f32_slice(x, |s| s.to_vec())?;
    let mut dst = vec![0f32; rows * out];
    with_f32_slice(w, |ws| {
        // Outputs are computed in runs; results are scattered into [rows, out] afterwards.
        let runs: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(64))
            .into_par_iter()
            .map(|c| {
                let (o0, o1) = (c * 64, (c * 64 + 64).min(out));
                let mut acc = vec![0f32; rows * (o1 - o0)];
                for o in o0..o1 {
                    let wr = &ws[o * k..(o + 1) * k];
                    for r in 0..rows {
                        acc[r * (o1 - o0) + (o - o0)] = dot(wr, &xs[r * k..(r + 1) * k]);
                    }
                }
                (o0, acc)
            })
            .collect();
        for (o0, acc) in runs {
            let n = acc.len() / rows;
            for r in 0..rows {
                dst[r * out + o0..r * out + o0 + n].copy_from_slice(&acc[r * n..(r + 1) * n]);
            }
        }
    })?;
    Ok(Tensor::from_vec(dst, (rows, out), x.device())?)
}

/// `x @ Wᵀ` for f32 `x` `[rows, k]` and `W` `[out, k]`: [`gemv`] for the few rows of a decode
/// step (bound by reading `W` once), the GEMM otherwise and whenever autograd needs the graph
/// (a `Var` weight or a tracked input), then as [`super::grad_kernels::product`].
pub fn f32_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let plain = !w.is_variable() && !x.track_op() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() && w.device().is_cpu();
    if plain && x.dim(0)? <= GEMV_MAX_ROWS && w.is_contiguous() {
        gemv(x, w)
    } else if plain {
        gemm_x_wt(x, w)
    } else if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        super::grad_kernels::product(x, w)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

/// Output columns below which [`gemm_x_wt`] does not split the product across threads.
const SPLIT_MIN_COLUMNS: usize = 64;

/// `x @ Wᵀ` for f32 `x` `[m, k]` and `W` `[n, k]` on the CPU: the gemm crate (candle's own GEMM)
/// called single-threaded on runs of output columns spread over the threads, into an output
/// that is not zeroed first.
///
/// Why not `x.matmul(&w.t())`: candle zero-fills the output and hands gemm its rayon pool, and
/// gemm's own 2-thread split reached 106-197 GFLOP/s on this 2-core machine where one
/// single-threaded call per column half reached 170-212 (the shapes of SmolLM2's and
/// Qwen2.5-1.5B's linears; PyTorch's GEMM measured 181-188 beside them).
pub fn gemm_x_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        bail!("product of a [{m}, {k}] input and a [{n}, {k2}] weight");
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    // lhs is x `[m, k]` row-major; rhs is Wᵀ: element (kk, j) at `w[j·k + kk]`.
    let out = with_f32_slice(&x, |xs| with_f32_slice(&w, |ws| gemm_strided(m, n, k, Strided { data: xs, rs: k, cs: 1 }, Strided { data: ws, rs: 1, cs: k })))???;
    Ok(Tensor::from_vec(out, (m, n), x.device())?)
}

/// A matrix read through strides: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// Whether an `[rows, cols]` matrix through these strides stays inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `A B` for `A` `[m, k]` and `B` `[k, n]` read through their strides, into a new row-major
/// `[m, n]`: the gemm crate (candle's own GEMM) called single-threaded on runs of output columns
/// spread over the threads, into an output that is not zeroed first ([`gemm_x_wt`] says why).
/// Every output element is one gemm reduction over all of `k`, whatever the split, so the result
/// does not depend on the thread count.
pub fn gemm_strided(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Result<Vec<f32>> {
    if !a.fits(m, k) || !b.fits(k, n) {
        bail!("product of [{m}, {k}] and [{k}, {n}] reads outside its operands");
    }
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    if m * n > 0 && k > 0 {
        let tiles = Tiles::of(m, n, rayon::current_num_threads());
        let dst = SendPtr(out.as_mut_ptr());
        (0..tiles.runs * tiles.bands).into_par_iter().for_each(|q| {
            let (p, band) = (q / tiles.bands, q % tiles.bands);
            let (j0, j1) = (p * tiles.width, ((p + 1) * tiles.width).min(n));
            let (i0, i1) = (band * tiles.height, ((band + 1) * tiles.height).min(m));
            if j0 >= j1 || i0 >= i1 {
                return;
            }
            let dst = &dst;
            // SAFETY: dst is `[m, n]` row-major with capacity m·n; this call writes rows i0..i1 of
            // columns j0..j1 (row stride n, column stride 1) and nothing else, so the threads'
            // writes are disjoint. `a` and `b` were checked above to hold every element the
            // strides reach; a's rows i0.. start at `i0·a.rs`, b's columns j0.. at `j0·b.cs`.
            // `read_dst = false`: the uninitialized output is only written.
            unsafe {
                gemm::gemm(
                    i1 - i0,
                    j1 - j0,
                    k,
                    dst.0.add(i0 * n + j0),
                    1,
                    n as isize,
                    false,
                    a.data.as_ptr().add(i0 * a.rs),
                    a.cs as isize,
                    a.rs as isize,
                    b.data.as_ptr().add(j0 * b.cs),
                    b.cs as isize,
                    b.rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        });
    } else {
        out.resize(m * n, 0.0);
    }
    // SAFETY: every element was written above (each column run covers all m rows), or zeroed.
    unsafe { out.set_len(m * n) };
    Ok(out)
}

/// How [`gemm_strided`] cuts an `[m, n]` output over the threads: `runs` runs of `width`
/// columns, each cut into `bands` bands of `height` rows.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tiles {
    runs: usize,
    width: usize,
    bands: usize,
    height: usize,
}

impl Tiles {
    fn of(m: usize, n: usize, threads: usize) -> Tiles {
        // Four runs per thread rather than one: when the hypervisor stalls one vCPU (this VM sees
        // seconds of steal per minute), the other thread takes its remaining runs instead of
        // waiting; on an idle machine 2 and 8 runs measured the same.
        let parts = (4 * threads).min(n / SPLIT_MIN_COLUMNS).max(1);
        // Runs of whole 64-column tiles: in this layout gemm's f32 AVX-512 microkernel covers 64
        // output columns per tile, so a run of 80 (SmolLM2's 576 in eight) ends in a 16-wide tail
        // on its slowest kernel; 64-wide runs took its products from ~213 to ~247 GFLOP/s
        // (`examples/gemmsplit.rs`). Narrower outputs keep whole cache lines (16 floats), so no
        // two threads write into one line.
        let round = if n >= SPLIT_MIN_COLUMNS { SPLIT_MIN_COLUMNS } else { 16 };
        let width = n.div_ceil(parts).div_ceil(round) * round;
        let runs = n.div_ceil(width);
        // Too few runs to share evenly (192 columns: three runs on two threads): cut each into
        // row bands as well (185 → 236 GFLOP/s at 192 columns).
        let bands = if runs % threads != 0 && runs < 4 * threads && m >= 2 * threads { threads } else { 1 };
        Tiles { runs, width, bands, height: m.div_ceil(bands) }
    }
}

/// A raw output pointer the column-run threads of [`gemm_x_wt`] share (each writes its own run).
struct SendPtr(*mut f32);
// SAFETY: see gemm_x_wt: the runs written through it are disjoint.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Dot product in 16 independent lanes (vectorizes without fast-math), then the tail.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut s = lanes.iter().sum::<f32>();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}
