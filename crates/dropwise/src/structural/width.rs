//! Width pruning: scoring attention heads and MLP neurons and spending a width budget across
//! layers, then slicing them out with [`super::surgery`].
//!
//! Units. Grouped-query attention shares each KV head among `rep` query heads, and a block
//! needs the same number of query heads per kept group. So heads go in units: with
//! `HeadUnit::Query` a unit is one query head from every KV group (the lowest-scored remaining
//! one in each group); with `HeadUnit::Group` a unit is a whole KV group (its query heads and its
//! K/V rows). Neurons go in units of `neuron_multiple` (default 32, one GGUF quant block, so
//! exported widths stay quantizable), the lowest-scored first.
//!
//! Importance of a head or neuron:
//! * `activation` — the squared norm of its contribution to the residual stream over the
//!   calibration tokens (`‖ctx_h W_o,hᵀ‖²`, `Σ a_j² ‖W_down[:, j]‖²`), divided by the mean
//!   squared norm of the residual entering the block, so layers with small residual streams (the
//!   first ones) are not stripped just for that;
//! * `magnitude` — the squared norm of its weights (q rows and o columns; gate/up rows and the
//!   down column);
//! * `taylor` — first-order Taylor estimate of the calibration loss change when it is removed,
//!   |Σ w·∂L/∂w| over its weights, with real gradients from the differentiable mode.
//!
//! Allocation: `uniform` removes the same number of units from every layer (the remainder, when
//! the budget does not divide evenly, from the layers whose next unit scores lowest); `global`
//! removes the lowest-scored units wherever they are, keeping at least one unit per layer.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var, D};
use serde::Serialize;

use super::surgery;
use crate::config::LayerShape;
use crate::calibrate::InputStats;
use crate::model::kernels::with_f32_slice;
use crate::model::{Hooks, Linear, LinearId, Llama, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    Activation,
    Magnitude,
    Taylor,
}

impl Importance {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "activation" => Importance::Activation,
            "magnitude" => Importance::Magnitude,
            "taylor" => Importance::Taylor,
            o => bail!("unknown importance '{o}' (supported: activation, magnitude, taylor)"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WidthAllocation {
    Uniform,
    Global,
}

impl WidthAllocation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "uniform" => WidthAllocation::Uniform,
            "global" => WidthAllocation::Global,
            o => bail!("unknown allocation '{o}' (supported: uniform, global)"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadUnit {
    Query,
    Group,
}

impl HeadUnit {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "query" => HeadUnit::Query,
            "group" => HeadUnit::Group,
            o => bail!("unknown head unit '{o}' (supported: query, group)"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ShrinkOptions {
    /// Fraction of all query heads to remove (0 = none).
    pub heads: f64,
    /// Fraction of all MLP neurons to remove (0 = none).
    pub neurons: f64,
    pub importance: Importance,
    pub allocation: WidthAllocation,
    pub head_unit: HeadUnit,
    pub neuron_multiple: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShrinkReport {
    pub importance: Importance,
    pub allocation: WidthAllocation,
    pub head_unit: HeadUnit,
    pub neuron_multiple: usize,
    pub before: Vec<LayerShape>,
    pub after: Vec<LayerShape>,
    /// Achieved fractions of query heads and neurons removed.
    pub heads_removed: f64,
    pub neurons_removed: f64,
    pub params_before: usize,
    pub params_after: usize,
}

/// Per-layer scores of every query head, KV head (magnitude only adds K/V rows) and neuron.
pub struct WidthScores {
    pub heads: Vec<Vec<f64>>,
    pub kv: Vec<Vec<f64>>,
    pub neurons: Vec<Vec<f64>>,
}

fn rows_sq(w: &[f32], cols: usize) -> Vec<f64> {
    w.chunks(cols).map(|r| r.iter().map(|&x| x as f64 * x as f64).sum()).collect()
}

fn cols_sq(w: &[f32], cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; cols];
    for r in w.chunks(cols) {
        for (o, &x) in out.iter_mut().zip(r) {
            *o += x as f64 * x as f64;
        }
    }
    out
}

/// Sums `v` in consecutive runs of `unit`.
fn per_unit(v: &[f64], unit: usize) -> Vec<f64> {
    v.chunks(unit).map(|c| c.iter().sum()).collect()
}

/// A linear layer's weight values, decoded when at rest.
fn weights(lin: &Linear) -> Result<Vec<f32>> {
    Ok(lin.weight_f32()?.flatten_all()?.to_vec1()?)
}

fn magnitude_scores(model: &Llama) -> Result<WidthScores> {
    let hd = model.config.head_dim;
    let mut s = WidthScores { heads: vec![], kv: vec![], neurons: vec![] };
    for b in &model.blocks {
        let h = b.q.in_features();
        let q = per_unit(&rows_sq(&weights(&b.q)?, h), hd);
        let o = per_unit(&cols_sq(&weights(&b.o)?, b.o.in_features()), hd);
        s.heads.push(q.iter().zip(&o).map(|(a, b)| a + b).collect());
        let k = per_unit(&rows_sq(&weights(&b.k)?, h), hd);
        let v = per_unit(&rows_sq(&weights(&b.v)?, h), hd);
        s.kv.push(k.iter().zip(&v).map(|(a, b)| a + b).collect());
        let g = rows_sq(&weights(&b.gate)?, h);
        let u = rows_sq(&weights(&b.up)?, h);
        let d = cols_sq(&weights(&b.down)?, b.down.in_features());
        s.neurons.push(g.iter().zip(&u).zip(&d).map(|((a, b), c)| a + b + c).collect());
    }
    Ok(s)
}

/// Calibration statistics for `activation`: per layer, Σ over tokens of each head's o_proj
/// output norm², Σ a_j² per neuron, and Σ ‖h_in‖² with the token count.
struct ActivationStats {
    head_out: Vec<Vec<f64>>,
    neurons: Vec<InputStats>,
    resid: Vec<(f64, usize)>,
    head_dim: usize,
    o_weights: Vec<Tensor>,
}

impl Hooks for ActivationStats {
    fn block_input(&mut self, layer: usize, h: &Tensor) -> Result<()> {
        let n = h.elem_count() / h.dim(D::Minus1)?;
        let s = h.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        self.resid[layer].0 += s;
        self.resid[layer].1 += n;
        Ok(())
    }
    fn linear_input(&mut self, id: LinearId, x: &Tensor) -> Result<Option<Tensor>> {
        let layer = id.layer;
        match id.role {
            Role::O => {
                let qd = x.dim(D::Minus1)?;
                let x2 = x.reshape((x.elem_count() / qd, qd))?;
                let w = &self.o_weights[layer];
                let hd = self.head_dim;
                for h in 0..qd / hd {
                    let y = x2.narrow(1, h * hd, hd)?.matmul(&w.narrow(1, h * hd, hd)?.t()?)?;
                    self.head_out[layer][h] += y.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            Role::DOWN => self.neurons[layer].add(x)?,
            _ => {}
        }
        Ok(None)
    }
}

fn activation_scores(model: &Llama, windows: &[Vec<u32>]) -> Result<WidthScores> {
    let n = model.blocks.len();
    let mut st = ActivationStats {
        head_out: (0..n).map(|l| vec![0.0; model.layer_shape(l).heads]).collect(),
        neurons: (0..n).map(|l| InputStats::new(model.layer_shape(l).ffn, false)).collect(),
        resid: vec![(0.0, 0); n],
        head_dim: model.config.head_dim,
        o_weights: model.blocks.iter().map(|b| b.o.weight_f32()).collect::<Result<_>>()?,
    };
    for w in windows {
        model.forward_hidden(&Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?, &mut st)?;
    }
    let mut s = WidthScores { heads: vec![], kv: vec![], neurons: vec![] };
    for l in 0..n {
        let resid = st.resid[l].0 / st.resid[l].1.max(1) as f64;
        let norm = 1.0 / resid.max(1e-30);
        s.heads.push(st.head_out[l].iter().map(|x| x * norm).collect());
        s.kv.push(vec![0.0; model.layer_shape(l).kv_heads]);
        let down = cols_sq(&weights(&model.blocks[l].down)?, model.blocks[l].down.in_features());
        s.neurons.push(st.neurons[l].sum_sq.iter().zip(&down).map(|(a, d)| a * d * norm).collect());
    }
    Ok(s)
}

/// |Σ w·g| over runs of weights: rows (`unit` rows at a time) or columns.
fn taylor_rows(w: &[f32], g: &[f32], cols: usize, unit: usize) -> Vec<f64> {
    let per_row: Vec<f64> = w.chunks(cols).zip(g.chunks(cols)).map(|(a, b)| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()).collect();
    per_unit(&per_row, unit)
}

fn taylor_cols(w: &[f32], g: &[f32], cols: usize, unit: usize) -> Vec<f64> {
    let mut per_col = vec![0.0; cols];
    for (a, b) in w.chunks(cols).zip(g.chunks(cols)) {
        for ((o, x), y) in per_col.iter_mut().zip(a).zip(b) {
            *o += *x as f64 * *y as f64;
        }
    }
    per_unit(&per_col, unit)
}

fn taylor_scores(model: &Llama, windows: &[Vec<u32>]) -> Result<WidthScores> {
    let mut m = model.clone();
    m.differentiable = true;
    // Only the block linears need gradients.
    let mut vars: Vec<Vec<Var>> = Vec::new();
    for b in m.blocks.iter_mut() {
        let mut v = Vec::new();
        for (_, lin) in b.linears_mut() {
            let var = Var::from_tensor(&lin.weight_f32()?)?;
            lin.set_weight(var.as_tensor().clone());
            v.push(var);
        }
        vars.push(v);
    }
    let mut grads: Vec<Vec<Vec<f32>>> = vars.iter().map(|v| v.iter().map(|x| vec![0f32; x.elem_count()]).collect()).collect();
    for w in windows {
        let t = w.len();
        let ids = Tensor::new(&w[..t - 1], m.device())?.unsqueeze(0)?;
        let logits = m.forward(&ids)?.squeeze(0)?;
        let target = Tensor::new(&w[1..], m.device())?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        let g = loss.backward()?;
        for (lv, lg) in vars.iter().zip(grads.iter_mut()) {
            for (v, acc) in lv.iter().zip(lg.iter_mut()) {
                let gt = g.get(v.as_tensor()).context("a block weight received no gradient")?;
                with_f32_slice(gt, |s| {
                    for (a, x) in acc.iter_mut().zip(s) {
                        *a += x;
                    }
                })?;
            }
        }
    }
    let hd = model.config.head_dim;
    let mut s = WidthScores { heads: vec![], kv: vec![], neurons: vec![] };
    for (b, g) in model.blocks.iter().zip(&grads) {
        let h = b.q.in_features();
        // Block::ROLES order: q, k, v, o, gate, up, down.
        let q = taylor_rows(&weights(&b.q)?, &g[0], h, hd);
        let o = taylor_cols(&weights(&b.o)?, &g[3], b.o.in_features(), hd);
        s.heads.push(q.iter().zip(&o).map(|(a, b)| (a + b).abs()).collect());
        let k = taylor_rows(&weights(&b.k)?, &g[1], h, hd);
        let v = taylor_rows(&weights(&b.v)?, &g[2], h, hd);
        s.kv.push(k.iter().zip(&v).map(|(a, b)| (a + b).abs()).collect());
        let gt = taylor_rows(&weights(&b.gate)?, &g[4], h, 1);
        let up = taylor_rows(&weights(&b.up)?, &g[5], h, 1);
        let d = taylor_cols(&weights(&b.down)?, &g[6], b.down.in_features(), 1);
        s.neurons.push(gt.iter().zip(&up).zip(&d).map(|((a, b), c)| (a + b + c).abs()).collect());
    }
    Ok(s)
}

pub fn scores(model: &Llama, windows: &[Vec<u32>], importance: Importance) -> Result<WidthScores> {
    if importance != Importance::Magnitude && windows.is_empty() {
        bail!("{importance:?} importance needs calibration windows");
    }
    match importance {
        Importance::Magnitude => magnitude_scores(model),
        Importance::Activation => activation_scores(model, windows),
        Importance::Taylor => taylor_scores(model, windows),
    }
}

/// One layer's removal units in the order they would go, each with its score and the items
/// (query heads, KV heads, or neurons) it removes.
struct Units {
    scores: Vec<f64>,
    items: Vec<(Vec<usize>, Vec<usize>)>,
}

fn sorted_by_score(idx: impl Iterator<Item = usize>, score: &[f64]) -> Vec<usize> {
    let mut v: Vec<usize> = idx.collect();
    v.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
    v
}

fn head_units(shape: LayerShape, heads: &[f64], kv: &[f64], unit: HeadUnit) -> Units {
    let (nq, nkv) = (shape.heads, shape.kv_heads);
    if nq == 0 {
        return Units { scores: vec![], items: vec![] };
    }
    let rep = nq / nkv;
    match unit {
        HeadUnit::Query => {
            // Unit k removes the k-th lowest query head of every group.
            let per_group: Vec<Vec<usize>> = (0..nkv).map(|g| sorted_by_score(g * rep..(g + 1) * rep, heads)).collect();
            let items: Vec<(Vec<usize>, Vec<usize>)> = (0..rep).map(|k| (per_group.iter().map(|g| g[k]).collect(), vec![])).collect();
            let scores = items.iter().map(|(q, _)| q.iter().map(|&h| heads[h]).sum()).collect();
            Units { scores, items }
        }
        HeadUnit::Group => {
            let group_score: Vec<f64> = (0..nkv).map(|g| heads[g * rep..(g + 1) * rep].iter().sum::<f64>() + kv[g]).collect();
            let order = sorted_by_score(0..nkv, &group_score);
            let items = order.iter().map(|&g| ((g * rep..(g + 1) * rep).collect(), vec![g])).collect();
            Units { scores: order.iter().map(|&g| group_score[g]).collect(), items }
        }
    }
}

fn neuron_units(neurons: &[f64], multiple: usize) -> Units {
    let order = sorted_by_score(0..neurons.len(), neurons);
    let items: Vec<(Vec<usize>, Vec<usize>)> = order.chunks(multiple).filter(|c| c.len() == multiple).map(|c| (c.to_vec(), vec![])).collect();
    let scores = items.iter().map(|(n, _)| n.iter().map(|&j| neurons[j]).sum()).collect();
    Units { scores, items }
}

/// How many units each layer gives up so that `total` units go in all.
fn allocate(units: &[Units], total: usize, allocation: WidthAllocation) -> Result<Vec<usize>> {
    let n = units.len();
    let avail: usize = units.iter().map(|u| u.scores.len()).sum();
    if total == 0 {
        return Ok(vec![0; n]);
    }
    let mut take = vec![0usize; n];
    match allocation {
        WidthAllocation::Uniform => {
            // Every layer keeps at least one unit.
            let each = total / n;
            if units.iter().any(|u| u.scores.len() <= each) {
                bail!("the budget would remove every unit of some layer; ask for less");
            }
            take.iter_mut().for_each(|t| *t = each);
            // The remainder comes from the layers whose next unit scores lowest.
            let mut next: Vec<usize> = (0..n).filter(|&l| units[l].scores.len() > each + 1).collect();
            next.sort_by(|&a, &b| units[a].scores[each].total_cmp(&units[b].scores[each]));
            let rest = total - each * n;
            if next.len() < rest {
                bail!("the budget would remove every unit of some layer; ask for less");
            }
            for &l in next.iter().take(rest) {
                take[l] += 1;
            }
        }
        WidthAllocation::Global => {
            // Every layer keeps at least one unit; within a layer units go lowest first, and
            // unit scores rise within a layer, so taking the globally lowest respects that.
            let mut all: Vec<(f64, usize, usize)> = Vec::with_capacity(avail);
            for (l, u) in units.iter().enumerate() {
                for (k, &s) in u.scores.iter().enumerate().take(u.scores.len().saturating_sub(1)) {
                    all.push((s, l, k));
                }
            }
            if all.len() < total {
                bail!("the budget asks for {total} units but only {} can go while every layer keeps one", all.len());
            }
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            for &(_, l, _) in all.iter().take(total) {
                take[l] += 1;
            }
        }
    }
    Ok(take)
}

/// The checks options pass before any model is read.
pub fn check_options(opts: &ShrinkOptions) -> Result<()> {
    if !(0.0..1.0).contains(&opts.heads) || !(0.0..1.0).contains(&opts.neurons) {
        bail!("--heads and --neurons are fractions in [0, 1)");
    }
    if opts.heads == 0.0 && opts.neurons == 0.0 {
        bail!("nothing to shrink: give --heads F and/or --neurons F");
    }
    if opts.neuron_multiple == 0 {
        bail!("--neuron-multiple must be at least 1");
    }
    Ok(())
}

/// Plans and applies width pruning in place; returns the report.
pub fn shrink(model: &mut Llama, windows: &[Vec<u32>], opts: &ShrinkOptions) -> Result<ShrinkReport> {
    check_options(opts)?;
    let n = model.blocks.len();
    let before: Vec<LayerShape> = (0..n).map(|l| model.layer_shape(l)).collect();
    let params_before = model.param_count();
    let sc = scores(model, windows, opts.importance)?;
    let total_heads: usize = before.iter().map(|s| s.heads).sum();
    let total_neurons: usize = before.iter().map(|s| s.ffn).sum();
    let mut head_keep: Vec<Option<(Vec<usize>, Vec<usize>)>> = vec![None; n];
    if opts.heads > 0.0 {
        let units: Vec<Units> = (0..n).map(|l| head_units(before[l], &sc.heads[l], &sc.kv[l], opts.head_unit)).collect();
        let heads_per_unit = units.iter().find_map(|u| u.items.first().map(|i| i.0.len())).context("no attention heads to remove")?;
        let total = ((opts.heads * total_heads as f64) / heads_per_unit as f64).round() as usize;
        if total == 0 {
            bail!("--heads {} removes less than one unit of {heads_per_unit} heads; ask for more", opts.heads);
        }
        let take = allocate(&units, total, opts.allocation)?;
        for l in 0..n {
            if take[l] == 0 {
                continue;
            }
            let (mut dq, mut dkv) = (Vec::new(), Vec::new());
            for (q, kv) in &units[l].items[..take[l]] {
                dq.extend(q);
                dkv.extend(kv);
            }
            let q: Vec<usize> = (0..before[l].heads).filter(|h| !dq.contains(h)).collect();
            let kv: Vec<usize> = (0..before[l].kv_heads).filter(|g| !dkv.contains(g)).collect();
            head_keep[l] = Some((q, kv));
        }
    }
    let mut neuron_keep: Vec<Option<Vec<usize>>> = vec![None; n];
    if opts.neurons > 0.0 {
        let units: Vec<Units> = (0..n).map(|l| neuron_units(&sc.neurons[l], opts.neuron_multiple)).collect();
        let total = ((opts.neurons * total_neurons as f64) / opts.neuron_multiple as f64).round() as usize;
        if total == 0 {
            bail!("--neurons {} removes less than one unit of {} neurons; ask for more", opts.neurons, opts.neuron_multiple);
        }
        let take = allocate(&units, total, opts.allocation)?;
        for l in 0..n {
            if take[l] > 0 {
                let drop: Vec<usize> = units[l].items[..take[l]].iter().flat_map(|(v, _)| v.iter().copied()).collect();
                neuron_keep[l] = Some((0..before[l].ffn).filter(|j| !drop.contains(j)).collect());
            }
        }
    }
    for l in 0..n {
        if let Some((q, kv)) = &head_keep[l] {
            surgery::keep_heads(model, l, q, kv)?;
        }
        if let Some(keep) = &neuron_keep[l] {
            surgery::keep_neurons(model, l, keep)?;
        }
        model.settle_block(l)?;
    }
    let after: Vec<LayerShape> = (0..n).map(|l| model.layer_shape(l)).collect();
    let heads_after: usize = after.iter().map(|s| s.heads).sum();
    let neurons_after: usize = after.iter().map(|s| s.ffn).sum();
    Ok(ShrinkReport {
        importance: opts.importance,
        allocation: opts.allocation,
        head_unit: opts.head_unit,
        neuron_multiple: opts.neuron_multiple,
        before,
        after,
        heads_removed: 1.0 - heads_after as f64 / total_heads.max(1) as f64,
        neurons_removed: 1.0 - neurons_after as f64 / total_neurons.max(1) as f64,
        params_before,
        params_after: model.param_count(),
    })
}
