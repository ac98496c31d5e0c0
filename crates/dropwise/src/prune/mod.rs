//! Weight pruning of the decoder blocks' linear layers (q, k, v, o, gate, up, down): magnitude,
//! Wanda and SparseGPT, unstructured or N:M, with uniform or OWL layer budgets.
//!
//! Calibration streams the calibration windows through the model block by block, holding only
//! the hidden states entering the current block. By default it is sequential at sub-layer
//! granularity: q/k/v are scored on the block's normed input, pruned, and the attention output
//! that o_proj sees is computed with the pruned q/k/v; likewise gate/up before down, and the next
//! block receives the pruned block's output (the papers' sequential setting). `one_shot` takes
//! every statistic from the dense model instead.

pub mod mask;
pub mod sparsegpt;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

pub use mask::Pattern;

use crate::calibrate::{BlockInputs, InputStats, LinearInputStats};
use crate::model::{Block, LinearId, Llama, NoHooks, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Magnitude,
    Wanda,
    SparseGpt,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "magnitude" => Method::Magnitude,
            "wanda" => Method::Wanda,
            "sparsegpt" => Method::SparseGpt,
            o => bail!("unknown pruning method '{o}' (supported: magnitude, wanda, sparsegpt)"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::SparseGpt => "sparsegpt",
        }
    }
    fn needs_calibration(self) -> bool {
        self != Method::Magnitude
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    Uniform,
    Owl,
    Rd,
}

impl Allocation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "uniform" => Allocation::Uniform,
            "owl" => Allocation::Owl,
            "rd" => Allocation::Rd,
            o => bail!("unknown allocation '{o}' (supported: uniform, owl, rd)"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub method: Method,
    pub pattern: Pattern,
    pub allocation: Allocation,
    pub one_shot: bool,
    /// OWL: a weight is an outlier when its Wanda score exceeds `owl_m` × its layer's mean.
    pub owl_m: f64,
    /// OWL: layer sparsities span at most 2·`owl_lambda`, centred on the target.
    pub owl_lambda: f64,
}

impl PruneOptions {
    pub fn new(method: Method, pattern: Pattern) -> Self {
        Self { method, pattern, allocation: Allocation::Uniform, one_shot: false, owl_m: 5.0, owl_lambda: 0.08 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MatrixReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub sparsity: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub method: Method,
    pub pattern: String,
    pub allocation: Allocation,
    pub one_shot: bool,
    /// Target sparsity of each block's linear layers.
    pub layer_sparsity: Vec<f64>,
    /// OWL's per-layer outlier ratios (share of Wanda scores above M × the layer mean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_ratio: Option<Vec<f64>>,
    /// rd: the sparsity grid and each layer's measured output distortion at every grid point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rd_grid: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rd_distortion: Option<Vec<Vec<f64>>>,
    /// Zeros over all pruned weights, as measured in the pruned matrices.
    pub achieved_sparsity: f64,
    pub matrices: Vec<MatrixReport>,
    pub allocation_seconds: f64,
    pub calibrate_seconds: f64,
    pub prune_seconds: f64,
}

fn weight_vec(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (r, c) = t.dims2()?;
    Ok((t.flatten_all()?.to_vec1()?, r, c))
}

/// Prunes a `rows × cols` weight matrix in place by `method`, from its input statistics.
pub fn prune_matrix(w: &mut [f32], rows: usize, cols: usize, stats: Option<&InputStats>, method: Method, pattern: Pattern) -> Result<()> {
    pattern.check_cols(cols)?;
    match method {
        Method::Magnitude | Method::Wanda => {
            let scores: Vec<f32> = match (method, stats) {
                (Method::Wanda, Some(st)) => {
                    let norms: Vec<f32> = st.sum_sq.iter().map(|s| s.sqrt() as f32).collect();
                    w.chunks(cols).flat_map(|row| row.iter().zip(&norms).map(|(x, n)| x.abs() * n)).collect()
                }
                (Method::Wanda, None) => bail!("Wanda needs calibration statistics"),
                _ => w.iter().map(|x| x.abs()).collect(),
            };
            let m = mask::select(&scores, rows, cols, pattern)?;
            for (x, drop) in w.iter_mut().zip(m) {
                if drop {
                    *x = 0.0;
                }
            }
        }
        Method::SparseGpt => {
            let h = stats.and_then(|s| s.hessian.as_ref()).context("SparseGPT needs calibration Hessians")?;
            if let Pattern::NM { m, .. } = pattern {
                if sparsegpt::BLOCK % m != 0 {
                    bail!("SparseGPT's {}-column blocks cannot hold whole groups of {m}", sparsegpt::BLOCK);
                }
            }
            sparsegpt::prune(w, rows, cols, h, pattern)?;
        }
    }
    Ok(())
}

/// Prunes one weight matrix `w` (`rows × cols`) given its calibration inputs `x` (`[tokens, cols]`;
/// magnitude ignores them): the single-layer form of [`prune`], for tests and experiments.
pub fn prune_weights(method: Method, w: &mut [f32], rows: usize, cols: usize, x: &Tensor, pattern: Pattern) -> Result<()> {
    let mut st = InputStats::new(cols, method == Method::SparseGpt);
    st.add(x)?;
    prune_matrix(w, rows, cols, Some(&st), method, pattern)
}

/// Prunes linear layer `id` in place, verifies its pattern, and reports it.
fn prune_linear(model: &mut Llama, id: LinearId, stats: Option<&InputStats>, method: Method, pattern: Pattern) -> Result<MatrixReport> {
    let name = id.weight_name();
    let lin = model.blocks[id.layer].linear_mut(id.role)?;
    let (mut w, rows, cols) = weight_vec(&lin.weight_f32()?)?;
    prune_matrix(&mut w, rows, cols, stats, method, pattern).with_context(|| name.clone())?;
    let achieved = mask::verify(&w, rows, cols, pattern).with_context(|| name.clone())?;
    lin.set_weight(Tensor::from_vec(w, (rows, cols), lin.weight.device())?);
    Ok(MatrixReport { name, rows, cols, sparsity: achieved })
}

/// How many calibration windows [`stream_blocks`] multiplies as one batch. Measured on SmolLM2
/// (Wanda, 64 windows, 2 threads, same machine): calibration 64 s one window at a time, 52 s
/// with 4, the same output bytes. The activations of all windows are held either way, so a
/// batch costs no memory beyond its attention scores.
pub const STREAM_BATCH: usize = 4;

/// Streams `windows` through the model block by block, calling `visit(layer, group, stats)`
/// after each group's statistics are complete (so the visitor may prune that group before the
/// next group's inputs are computed). With `dense_propagation`, the hidden states passed on are
/// computed with the weights as they were before the visit of each group.
fn stream_blocks(
    model: &mut Llama,
    windows: &[Vec<u32>],
    hessian: bool,
    dense_propagation: bool,
    progress: &mut dyn FnMut(usize),
    visit: &mut dyn FnMut(&mut Llama, usize, usize, &InputStats) -> Result<()>,
) -> Result<()> {
    let t = windows[0].len();
    let pos = model.positions(0, t)?;
    if windows.iter().any(|w| w.len() != t) {
        bail!("calibration windows differ in length");
    }
    // Windows go through the blocks [`STREAM_BATCH`] at a time, as one `[batch, t, hidden]`
    // tensor: one product per linear for the batch instead of one per window.
    let mut h: Vec<Tensor> = windows
        .chunks(STREAM_BATCH)
        .map(|ws| {
            let ids: Vec<u32> = ws.iter().flat_map(|w| w.iter().copied()).collect();
            model.embed_tokens(&Tensor::from_vec(ids, (ws.len(), t), model.device())?)
        })
        .collect::<Result<_>>()?;
    for layer in 0..model.blocks.len() {
        // The dense copy of this block, kept only when statistics must come from dense weights.
        let dense = dense_propagation.then(|| model.blocks[layer].clone());
        // Group 0: q/k/v read the normed block input.
        let xs: Vec<Tensor> = h.iter().map(|hi| model.attn_norm(layer, hi)).collect::<Result<_>>()?;
        visit(model, layer, 0, &InputStats::of(&xs, hessian)?)?;
        let with = |model: &mut Llama, f: &mut dyn FnMut(&Llama) -> Result<Tensor>| -> Result<Tensor> {
            match &dense {
                Some(d) => {
                    let pruned = std::mem::replace(&mut model.blocks[layer], d.clone());
                    let r = f(model);
                    model.blocks[layer] = pruned;
                    r
                }
                None => f(model),
            }
        };
        let mut ctxs = Vec::with_capacity(xs.len());
        for x in &xs {
            let c = with(model, &mut |m| m.attention_context(layer, x, &pos, &mut NoHooks)?.context("block has no heads"))?;
            ctxs.push(c);
        }
        drop(xs);
        // Group 1: o_proj reads the attention context.
        visit(model, layer, 1, &InputStats::of(&ctxs, hessian)?)?;
        for (hi, c) in h.iter_mut().zip(&ctxs) {
            let prev = hi.clone();
            *hi = with(model, &mut |m| m.attn_residual(layer, &prev, c, &mut NoHooks))?;
        }
        drop(ctxs);
        // Group 2: gate/up read the normed residual.
        let xs: Vec<Tensor> = h.iter().map(|hi| model.mlp_norm(layer, hi)).collect::<Result<_>>()?;
        visit(model, layer, 2, &InputStats::of(&xs, hessian)?)?;
        let mut acts = Vec::with_capacity(xs.len());
        for x in &xs {
            acts.push(with(model, &mut |m| m.mlp_hidden(layer, x, &mut NoHooks)?.context("block has no MLP"))?);
        }
        drop(xs);
        // Group 3: down reads act(gate)·up.
        visit(model, layer, 3, &InputStats::of(&acts, hessian)?)?;
        for (hi, a) in h.iter_mut().zip(&acts) {
            let prev = hi.clone();
            *hi = with(model, &mut |m| m.down_residual(layer, &prev, a, &mut NoHooks))?;
        }
        // Block `layer` is final: its changed weights may go to rest.
        model.settle_block(layer)?;
        progress(layer + 1);
    }
    Ok(())
}

/// OWL layer sparsities: outlier ratio D_l = share of Wanda scores in block l above `m` × the
/// block's mean score (dense model); D is scaled to [0, 2λ], centred, and layer density is
/// (1 − target) + (D_l − mean D), so layers with more outliers are pruned less. As in OWL's
/// reference code, the sparsities span 2λ around the target (not ±λ about it) and keep its mean.
fn owl_sparsities(model: &mut Llama, windows: &[Vec<u32>], opts: &PruneOptions, target: f64) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = model.blocks.len();
    let mut above = vec![0usize; n];
    let mut total = vec![0usize; n];
    let mut scores_by_layer: Vec<Vec<f32>> = vec![Vec::new(); n];
    stream_blocks(model, windows, false, true, &mut |_| {}, &mut |m, layer, group, st| {
        let norms: Vec<f32> = st.sum_sq.iter().map(|s| s.sqrt() as f32).collect();
        for role in Block::SHARED_INPUTS[group] {
            let (w, _, cols) = weight_vec(&m.blocks[layer].linear(*role)?.weight_f32()?)?;
            scores_by_layer[layer].extend(w.chunks(cols).flat_map(|row| row.iter().zip(&norms).map(|(x, n)| x.abs() * n)));
        }
        if group == 3 {
            let s = std::mem::take(&mut scores_by_layer[layer]);
            let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
            above[layer] = s.iter().filter(|&&x| x as f64 > opts.owl_m * mean).count();
            total[layer] = s.len();
        }
        Ok(())
    })?;
    let ratio: Vec<f64> = above.iter().zip(&total).map(|(&a, &t)| a as f64 / t.max(1) as f64).collect();
    let (lo, hi) = ratio.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &r| (l.min(r), h.max(r)));
    let scaled: Vec<f64> = ratio.iter().map(|r| if hi > lo { (r - lo) / (hi - lo) * 2.0 * opts.owl_lambda } else { 0.0 }).collect();
    let mean = scaled.iter().sum::<f64>() / n as f64;
    let sparsity: Vec<f64> = scaled.iter().map(|d| (target - (d - mean)).clamp(0.0, 0.99)).collect();
    Ok((sparsity, ratio))
}

/// Grid step of the rd allocation's per-layer sparsities, and how many steps either side of the target.
pub const RD_STEP: f64 = 0.05;
pub const RD_SPAN: i32 = 4;
/// rd measures distortions on this many calibration windows, cut to [`RD_TOKENS`] tokens: each
/// grid point of each layer costs a forward pass through the rest of the model.
pub const RD_WINDOWS: usize = 2;
pub const RD_TOKENS: usize = 256;

/// Which shared-input group of [`Block::SHARED_INPUTS`] `role` belongs to.
fn group_of(role: Role) -> usize {
    Block::SHARED_INPUTS.iter().position(|g| g.contains(&role)).unwrap_or(0)
}

/// rd step 1: the model's output distortion caused by each block alone at a grid of sparsities.
/// For block l and sparsity s, block l alone is pruned (by `method`, from the dense model's
/// statistics) and the rest of the model runs dense; the distortion is the squared error of the
/// final normed hidden state (the output head's input) against the dense model's, summed over
/// the first [`RD_WINDOWS`] calibration windows (first [`RD_TOKENS`] tokens of each). Measured at
/// the output, not at the block, so that distortions of different layers are in one currency and
/// add up (the additivity the dynamic program relies on). Returns the grid and the
/// `[layer][grid point]` table.
pub fn rd_distortions(model: &mut Llama, windows: &[Vec<u32>], method: Method, target: f64) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let sizes: Vec<usize> = model.blocks.iter().map(|b| b.linears().map(|(_, l)| l.weight.elem_count()).sum()).collect();
    if sizes.iter().any(|&s| s != sizes[0]) {
        bail!("rd allocation needs blocks of equal size to meet the budget exactly; this model's blocks differ");
    }
    let grid: Vec<f64> = (-RD_SPAN..=RD_SPAN).map(|k| target + k as f64 * RD_STEP).filter(|g| (0.0..0.995).contains(g)).collect();
    let ws: Vec<&[u32]> = windows.iter().take(RD_WINDOWS).map(|w| &w[..w.len().min(RD_TOKENS)]).collect();
    let n = model.blocks.len();
    // Dense hidden states entering every block, and the dense output.
    let dense = BlockInputs::collect(model, &ws)?;
    let dense_out: Vec<Tensor> = dense.finals().iter().map(|x| model.head_input(x)).collect::<Result<_>>()?;
    let mut table = Vec::with_capacity(n);
    for layer in 0..n {
        // The block's input statistics on the dense model, for the pruning method.
        let mut stats = LinearInputStats::for_layer(layer, method == Method::SparseGpt);
        for x in dense.input(layer) {
            model.forward_block(layer, x, &dense.pos, &mut stats)?;
        }
        let groups: Vec<&InputStats> = Block::SHARED_INPUTS
            .iter()
            .map(|g| stats.get(LinearId::new(layer, g[0])).context("a linear layer saw no input"))
            .collect::<Result<_>>()?;
        // SparseGPT's factorization depends on the Hessian only: share it across the grid.
        let factors: Vec<Option<(Vec<f64>, Vec<bool>)>> = groups
            .iter()
            .map(|g| match &g.hessian {
                Some(hs) if method == Method::SparseGpt => sparsegpt::inverse_hessian_factor(hs, g.width).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let dense_block = model.blocks[layer].clone();
        let mut row = Vec::with_capacity(grid.len());
        for &s in &grid {
            let pattern = Pattern::Unstructured(s);
            let mut blk = dense_block.clone();
            for (role, lin) in blk.linears_mut() {
                let g = group_of(role);
                let (mut w, rows, cols) = weight_vec(&lin.weight_f32()?)?;
                match &factors[g] {
                    Some((u, dead)) => sparsegpt::prune_with_factor(&mut w, rows, cols, u, dead, pattern)?,
                    None => prune_matrix(&mut w, rows, cols, Some(groups[g]), method, pattern)?,
                }
                lin.set_weight(Tensor::from_vec(w, (rows, cols), lin.weight.device())?);
            }
            model.blocks[layer] = blk;
            let mut d = 0.0;
            for (wi, y) in dense_out.iter().enumerate() {
                let hx = dense.run_from(model, layer, wi)?;
                d += (model.head_input(&hx)? - y)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            model.blocks[layer] = dense_block.clone();
            row.push(d);
        }
        table.push(row);
    }
    Ok((grid, table))
}

/// rd step 2: the choice of one grid point per layer minimizing the summed distortion
/// `Σ_l dist[l][c_l]` subject to `Σ_l offsets[c_l] = 0` (the layers' sparsities average exactly to
/// the target, blocks being of equal size), by dynamic programming over the running offset sum.
pub fn rd_allocate(dist: &[Vec<f64>], offsets: &[i32]) -> Result<Vec<usize>> {
    let n = dist.len();
    if n == 0 || offsets.is_empty() || dist.iter().any(|r| r.len() != offsets.len()) {
        bail!("rd: the distortion table must have one value per layer and grid point");
    }
    let kmax = offsets.iter().map(|k| k.unsigned_abs() as usize).max().unwrap_or(0);
    let width = 2 * n * kmax + 1;
    let shift = (n * kmax) as i64;
    // best[b]: least distortion of the layers so far with offset sum b − shift; choice[l][b]: the
    // grid point layer l took on that path.
    let mut best = vec![f64::INFINITY; width];
    best[shift as usize] = 0.0;
    let mut choice = vec![vec![usize::MAX; width]; n];
    for l in 0..n {
        let mut next = vec![f64::INFINITY; width];
        for (b, &cost) in best.iter().enumerate() {
            if !cost.is_finite() {
                continue;
            }
            for (c, &k) in offsets.iter().enumerate() {
                let nb = b as i64 + k as i64;
                if nb < 0 || nb >= width as i64 {
                    continue;
                }
                let v = cost + dist[l][c];
                if v < next[nb as usize] {
                    next[nb as usize] = v;
                    choice[l][nb as usize] = c;
                }
            }
        }
        best = next;
    }
    if !best[shift as usize].is_finite() {
        bail!("rd: no choice of grid points meets the budget exactly");
    }
    let mut out = vec![0; n];
    let mut b = shift;
    for l in (0..n).rev() {
        let c = choice[l][b as usize];
        out[l] = c;
        b -= offsets[c] as i64;
    }
    Ok(out)
}

/// Prunes the model's decoder linear layers in place. `windows` are the calibration windows
/// (ignored by magnitude pruning); `progress` is told after each block.
pub fn prune(model: &mut Llama, windows: &[Vec<u32>], opts: &PruneOptions, progress: &mut dyn FnMut(usize)) -> Result<PruneReport> {
    let n = model.blocks.len();
    if opts.method.needs_calibration() && windows.is_empty() {
        bail!("{} needs calibration windows", opts.method.name());
    }
    if opts.allocation != Allocation::Uniform && windows.is_empty() {
        bail!("the {:?} allocation needs calibration windows", opts.allocation);
    }
    let t0 = Instant::now();
    let (mut rd_grid, mut rd_distortion) = (None, None);
    let (layer_sparsity, outlier_ratio) = match (opts.allocation, opts.pattern) {
        (Allocation::Uniform, p) => (vec![p.sparsity(); n], None),
        (Allocation::Owl, Pattern::Unstructured(s)) => {
            let (sp, r) = owl_sparsities(model, windows, opts, s)?;
            (sp, Some(r))
        }
        (Allocation::Rd, Pattern::Unstructured(s)) => {
            let (grid, dist) = rd_distortions(model, windows, opts.method, s)?;
            let offsets: Vec<i32> = grid.iter().map(|g| ((g - s) / RD_STEP).round() as i32).collect();
            let choice = rd_allocate(&dist, &offsets)?;
            let sp = choice.iter().map(|&c| grid[c]).collect();
            rd_grid = Some(grid);
            rd_distortion = Some(dist);
            (sp, None)
        }
        (_, Pattern::NM { .. }) => bail!("OWL and rd allocations vary sparsity by layer; they apply to unstructured sparsity, not N:M"),
    };
    let allocation_seconds = t0.elapsed().as_secs_f64();
    let pattern_for = |layer: usize| match opts.pattern {
        Pattern::Unstructured(_) => Pattern::Unstructured(layer_sparsity[layer]),
        p => p,
    };
    let mut matrices = Vec::new();
    let mut prune_seconds = 0.0;
    let t1 = Instant::now();
    if opts.method.needs_calibration() {
        let hessian = opts.method == Method::SparseGpt;
        let mut pending: Vec<(usize, InputStats)> = Vec::new();
        stream_blocks(model, windows, hessian, opts.one_shot, progress, &mut |m, layer, group, st| {
            let tp = Instant::now();
            if opts.one_shot {
                // Statistics come from the dense block; prune the whole block once all are in.
                pending.push((group, st.clone()));
                if group == Block::SHARED_INPUTS.len() - 1 {
                    for (g, s) in pending.drain(..) {
                        for role in Block::SHARED_INPUTS[g] {
                            matrices.push(prune_linear(m, LinearId::new(layer, *role), Some(&s), opts.method, pattern_for(layer))?);
                        }
                    }
                }
            } else {
                for role in Block::SHARED_INPUTS[group] {
                    matrices.push(prune_linear(m, LinearId::new(layer, *role), Some(st), opts.method, pattern_for(layer))?);
                }
            }
            prune_seconds += tp.elapsed().as_secs_f64();
            Ok(())
        })?;
    } else {
        for layer in 0..n {
            for role in Block::ROLES {
                matrices.push(prune_linear(model, LinearId::new(layer, role), None, opts.method, pattern_for(layer))?);
            }
            model.settle_block(layer)?;
            progress(layer + 1);
        }
        prune_seconds = t1.elapsed().as_secs_f64();
    }
    let total_time = t1.elapsed().as_secs_f64();
    let weights: usize = matrices.iter().map(|m| m.rows * m.cols).sum();
    let zeros: f64 = matrices.iter().map(|m| m.sparsity * (m.rows * m.cols) as f64).sum();
    Ok(PruneReport {
        method: opts.method,
        pattern: opts.pattern.describe(),
        allocation: opts.allocation,
        one_shot: opts.one_shot,
        layer_sparsity,
        outlier_ratio,
        rd_grid,
        rd_distortion,
        achieved_sparsity: zeros / weights.max(1) as f64,
        matrices,
        allocation_seconds,
        calibrate_seconds: total_time - prune_seconds,
        prune_seconds,
    })
}
