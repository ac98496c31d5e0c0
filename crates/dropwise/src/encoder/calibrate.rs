//! One calibration pass over an encoder: statistics of every linear input (Σx², and Σxᵀx where a
//! method needs Hessians) and of every block (its input's mean squared norm, and Block
//! Influence, the mean of 1 − cos(input, output) over the tokens), for the blocks asked for.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, D};

use crate::calibrate::InputStats;
use crate::model::encoder::{Encoder, EncoderHooks, Site};

/// What one pass gathered.
#[derive(Default)]
pub struct EncoderStats {
    pub inputs: BTreeMap<(usize, Site), InputStats>,
    /// Per block: Σ over tokens of ‖input‖², Σ of 1 − cos(input, output), and tokens.
    pub blocks: BTreeMap<usize, (f64, f64, usize)>,
}

impl EncoderStats {
    pub fn input(&self, layer: usize, site: Site) -> Result<&InputStats> {
        self.inputs.get(&(layer, site)).with_context(|| format!("no calibration statistics for block {layer} ({site:?})"))
    }

    /// Block Influence of `layer` (ShortGPT): mean over tokens of 1 − cos(input, output).
    pub fn block_influence(&self, layer: usize) -> Result<f64> {
        let (_, bi, n) = self.blocks.get(&layer).with_context(|| format!("no calibration statistics for block {layer}"))?;
        Ok(bi / (*n).max(1) as f64)
    }

    /// Mean squared norm of the residual stream entering `layer`, per token.
    pub fn input_norm_sq(&self, layer: usize) -> Result<f64> {
        let (sq, _, n) = self.blocks.get(&layer).with_context(|| format!("no calibration statistics for block {layer}"))?;
        Ok(sq / (*n).max(1) as f64)
    }
}

/// Which statistics to gather.
pub struct Wanted<'a> {
    /// Only these blocks (all when None).
    pub layers: Option<&'a [usize]>,
    /// Sites whose Σxᵀx is kept (SparseGPT, head contributions).
    pub hessian: &'a dyn Fn(Site) -> bool,
}

struct Gather<'a> {
    wanted: &'a Wanted<'a>,
    stats: EncoderStats,
}

impl Gather<'_> {
    fn wants(&self, layer: usize) -> bool {
        self.wanted.layers.is_none_or(|ls| ls.contains(&layer))
    }
}

impl EncoderHooks for Gather<'_> {
    fn input(&mut self, layer: usize, site: Site, x: &Tensor) -> Result<()> {
        if !self.wants(layer) {
            return Ok(());
        }
        let width = x.dim(D::Minus1)?;
        let hessian = (self.wanted.hessian)(site);
        self.stats.inputs.entry((layer, site)).or_insert_with(|| InputStats::new(width, hessian)).add(x)
    }

    fn block(&mut self, layer: usize, input: &Tensor, output: &Tensor) -> Result<()> {
        if !self.wants(layer) {
            return Ok(());
        }
        let sq_in = input.sqr()?.sum(D::Minus1)?;
        let sq_out = output.sqr()?.sum(D::Minus1)?;
        let dot = (input * output)?.sum(D::Minus1)?;
        let cos = dot.div(&(sq_in.clone() * sq_out)?.sqrt()?.clamp(1e-12, f64::INFINITY)?)?;
        let n = cos.elem_count();
        let one_minus: f64 = cos.to_vec1::<f32>()?.iter().map(|c| 1.0 - *c as f64).sum();
        let sq: f64 = sq_in.to_vec1::<f32>()?.iter().map(|&v| v as f64).sum();
        let e = self.stats.blocks.entry(layer).or_insert((0.0, 0.0, 0));
        e.0 += sq;
        e.1 += one_minus;
        e.2 += n;
        Ok(())
    }
}

/// Runs `model` on every batch and gathers the statistics `wanted` asks for; `progress` is told
/// the batches done.
pub fn gather<M: Encoder>(model: &M, batches: &[M::Batch], wanted: &Wanted<'_>, progress: &mut dyn FnMut(usize)) -> Result<EncoderStats> {
    let mut g = Gather { wanted, stats: EncoderStats::default() };
    for (i, b) in batches.iter().enumerate() {
        model.run_hooked(b, &mut g)?;
        progress(i + 1);
    }
    Ok(g.stats)
}
