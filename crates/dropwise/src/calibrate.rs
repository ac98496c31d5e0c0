//! Calibration: what the methods learn by running calibration windows through the model, in one
//! place so that every method measures it the same way.
//!
//! * [`InputStats`]: per input channel Σ x_j² of a linear layer's input (Wanda, OWL, the imatrix,
//!   activation reports, neuron scores) and, when asked, the Hessian Σ xᵀx (SparseGPT).
//! * [`LinearInputStats`]: a hook gathering [`InputStats`] for every distinct linear input of the
//!   model (linears that read the same tensor — q/k/v, gate/up — are observed once).
//! * [`BlockInputs`]: the dense hidden states entering every block, cached per window, and
//!   [`BlockInputs::run_from`]: "block l changed, so rerun blocks l.. from the cached input" —
//!   the loop behind rate–distortion pruning, layer dropping and per-layer quantization scores.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::model::kernels::column_sum_squares;
use crate::model::{Block, Hooks, LinearId, Llama, NoHooks, Positions};

/// Statistics of one linear layer's input over the calibration tokens seen so far.
#[derive(Clone, Debug)]
pub struct InputStats {
    /// Σ over tokens of x_j², one entry per input channel.
    pub sum_sq: Vec<f64>,
    /// Tokens (rows) seen.
    pub tokens: usize,
    /// Σ xᵀx (`width × width`, row-major), kept only when asked for.
    pub hessian: Option<Vec<f64>>,
    pub width: usize,
}

impl InputStats {
    pub fn new(width: usize, hessian: bool) -> Self {
        Self { sum_sq: vec![0.0; width], tokens: 0, hessian: hessian.then(|| vec![0.0; width * width]), width }
    }

    /// Adds the rows of `x` (`[.., width]`).
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let w = self.width;
        if x.dim(D::Minus1)? != w {
            bail!("calibration input of width {} where {w} was expected", x.dim(D::Minus1)?);
        }
        let rows = x.elem_count() / w.max(1);
        let x2 = x.reshape((rows, w))?;
        for (a, s) in self.sum_sq.iter_mut().zip(column_sum_squares(&x2, w)?) {
            *a += s;
        }
        self.tokens += rows;
        if let Some(h) = self.hessian.as_mut() {
            // xᵀx as xt·xtᵀ with xt = xᵀ `[w, rows]`, added into the f64 sum straight from the
            // product's buffer: for a 8,960-wide input one 321 MB f32 matrix is alive, not two.
            let xt = x2.t()?.contiguous()?;
            let xtx = crate::model::kernels::f32_product(&xt, &xt)?;
            drop(xt);
            crate::model::kernels::with_f32_slice(&xtx, |v| {
                for (a, &v) in h.iter_mut().zip(v) {
                    *a += v as f64;
                }
            })?;
        }
        Ok(())
    }

    /// Statistics of all of `xs` (`[.., width]` each).
    pub fn of(xs: &[Tensor], hessian: bool) -> Result<Self> {
        let Some(first) = xs.first() else { bail!("no calibration activations") };
        let mut st = Self::new(first.dim(D::Minus1)?, hessian);
        for x in xs {
            st.add(x)?;
        }
        Ok(st)
    }

    /// ‖X_j‖₂ over all tokens seen.
    pub fn norms(&self) -> Vec<f64> {
        self.sum_sq.iter().map(|s| s.sqrt()).collect()
    }

    /// Mean of x_j² over the tokens seen (llama.cpp's imatrix statistic).
    pub fn mean_sq(&self) -> Vec<f64> {
        let n = self.tokens.max(1) as f64;
        self.sum_sq.iter().map(|s| s / n).collect()
    }
}

/// A hook gathering [`InputStats`] for the distinct linear inputs of the model (or of one block),
/// keyed by the first linear of each shared-input group ([`Block::shared_input`]).
#[derive(Default)]
pub struct LinearInputStats {
    /// Only this block, when set.
    pub layer: Option<usize>,
    /// Also accumulate Hessians.
    pub hessian: bool,
    pub stats: BTreeMap<LinearId, InputStats>,
}

impl LinearInputStats {
    /// Statistics of block `layer` only.
    pub fn for_layer(layer: usize, hessian: bool) -> Self {
        Self { layer: Some(layer), hessian, stats: BTreeMap::new() }
    }

    /// Statistics of the input `id` reads (shared inputs resolved).
    pub fn get(&self, id: LinearId) -> Option<&InputStats> {
        self.stats.get(&LinearId::new(id.layer, Block::shared_input(id.role)))
    }
}

impl Hooks for LinearInputStats {
    fn linear_input(&mut self, id: LinearId, x: &Tensor) -> Result<Option<Tensor>> {
        if self.layer.is_some_and(|l| l != id.layer) || Block::shared_input(id.role) != id.role {
            return Ok(None);
        }
        let width = x.dim(D::Minus1)?;
        let hessian = self.hessian;
        self.stats.entry(id).or_insert_with(|| InputStats::new(width, hessian)).add(x)?;
        Ok(None)
    }
}

/// The hidden states entering every block of a model on a set of equal-length windows, cached.
pub struct BlockInputs {
    pub pos: Positions,
    /// `states[l][w]`: the hidden state `[1, seq, hidden]` entering block `l` on window `w`;
    /// `states[n]` holds the last block's outputs (before the final norm).
    pub states: Vec<Vec<Tensor>>,
}

impl BlockInputs {
    /// Runs `windows` (one length, at least 2 tokens) through `model` and keeps every block's input.
    pub fn collect<W: AsRef<[u32]>>(model: &Llama, windows: &[W]) -> Result<Self> {
        let Some(first) = windows.first() else { bail!("calibration needs at least one window") };
        let t = first.as_ref().len();
        if t < 2 || windows.iter().any(|w| w.as_ref().len() != t) {
            bail!("calibration windows must share one length of at least 2 tokens");
        }
        let pos = model.positions(0, t)?;
        let n = model.blocks.len();
        let mut states: Vec<Vec<Tensor>> = Vec::with_capacity(n + 1);
        let mut h: Vec<Tensor> = windows
            .iter()
            .map(|w| model.embed_tokens(&Tensor::new(w.as_ref(), model.device())?.unsqueeze(0)?))
            .collect::<Result<_>>()?;
        for l in 0..n {
            let next = h.iter().map(|x| model.forward_block(l, x, &pos, &mut NoHooks)).collect::<Result<_>>()?;
            states.push(std::mem::replace(&mut h, next));
        }
        states.push(h);
        Ok(Self { pos, states })
    }

    /// Inputs of block `layer`, one per window.
    pub fn input(&self, layer: usize) -> &[Tensor] {
        &self.states[layer]
    }

    /// Outputs of the last block, one per window.
    pub fn finals(&self) -> &[Tensor] {
        self.states.last().map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Window `w`'s hidden state after `model`'s blocks `from..`, started from the cached input of
    /// block `from`. Exact for a model that differs from the one collected only in blocks ≥ `from`
    /// (or, for surgery that removed block `from`, in what now sits at index `from`).
    pub fn run_from(&self, model: &Llama, from: usize, w: usize) -> Result<Tensor> {
        let mut h = self.states[from][w].clone();
        for l in from..model.blocks.len() {
            h = model.forward_block(l, &h, &self.pos, &mut NoHooks)?;
        }
        Ok(h)
    }
}
