//! Hooks: how calibration, scoring and surgery see (and change) the model's insides without
//! the model knowing about any of them.
//!
//! The model calls a hook at every linear layer's input, at each block's input and output, and
//! with each block's attention probabilities. A hook that returns `Some(tensor)` replaces the
//! value the model goes on with; `None` leaves it alone. Statistics are accumulated inside the
//! hook as windows stream through, so no more than one window's activations is ever held.

use anyhow::Result;
use candle_core::Tensor;

/// The seven linear layers of a llama block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] =
        [LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O, LinearKind::Gate, LinearKind::Up, LinearKind::Down];

    /// Name inside an HF block (`model.layers.N.<name>.weight`).
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// Name inside a GGUF block (`blk.N.<name>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "attn_q",
            LinearKind::K => "attn_k",
            LinearKind::V => "attn_v",
            LinearKind::O => "attn_output",
            LinearKind::Gate => "ffn_gate",
            LinearKind::Up => "ffn_up",
            LinearKind::Down => "ffn_down",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            LinearKind::Q => "q",
            LinearKind::K => "k",
            LinearKind::V => "v",
            LinearKind::O => "o",
            LinearKind::Gate => "gate",
            LinearKind::Up => "up",
            LinearKind::Down => "down",
        }
    }
}

/// Observation and intervention points. Every method has a do-nothing default.
pub trait Hooks {
    /// Hidden states `[batch, seq, hidden]` entering block `layer`.
    fn block_input(&mut self, _layer: usize, _h: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Hidden states leaving block `layer`; return `Some` to replace them.
    fn block_output(&mut self, _layer: usize, _h: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Input `[batch, seq, in]` of a linear layer; return `Some` to replace it (for that layer only).
    fn linear_input(&mut self, _layer: usize, _kind: LinearKind, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Attention probabilities `[batch, heads, seq, seq]` of block `layer` (rows sum to 1).
    /// Called only when [`Hooks::wants_attention_probs`] says so.
    fn attention_probs(&mut self, _layer: usize, _p: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Whether to materialize the full attention matrix for [`Hooks::attention_probs`]; without
    /// it the model computes attention in causal blocks and skips the masked half.
    fn wants_attention_probs(&self) -> bool {
        false
    }
}

/// No hooks: the plain forward pass.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Per-input-channel sum of squares of every linear layer's input, accumulated over windows:
/// the statistic behind Wanda's `‖X_j‖₂` and activation-norm reports.
#[derive(Default)]
pub struct InputNormStats {
    /// (layer, kind) → Σ over tokens of x_j², one entry per input channel.
    pub sum_sq: std::collections::BTreeMap<(usize, LinearKind), Vec<f64>>,
    pub tokens: std::collections::BTreeMap<(usize, LinearKind), usize>,
}

impl InputNormStats {
    /// ‖X_j‖₂ over all tokens seen so far.
    pub fn norms(&self, layer: usize, kind: LinearKind) -> Option<Vec<f64>> {
        self.sum_sq.get(&(layer, kind)).map(|v| v.iter().map(|s| s.sqrt()).collect())
    }
}

impl Hooks for InputNormStats {
    fn linear_input(&mut self, layer: usize, kind: LinearKind, x: &Tensor) -> Result<Option<Tensor>> {
        let dims = x.dims();
        let width = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / width.max(1);
        let sq = super::kernels::column_sum_squares(x, width)?;
        let acc = self.sum_sq.entry((layer, kind)).or_insert_with(|| vec![0.0; width]);
        for (a, s) in acc.iter_mut().zip(sq) {
            *a += s;
        }
        *self.tokens.entry((layer, kind)).or_insert(0) += rows;
        Ok(None)
    }
}

/// Block Influence statistics: mean cosine similarity between each block's input and output
/// hidden state, per token, accumulated over windows.
#[derive(Default)]
pub struct BlockCosineStats {
    input: Option<Tensor>,
    pub sum_cos: Vec<f64>,
    pub count: Vec<usize>,
}

impl BlockCosineStats {
    /// `1 − mean cos(h_in, h_out)` per layer.
    pub fn block_influence(&self) -> Vec<f64> {
        self.sum_cos.iter().zip(&self.count).map(|(s, &n)| 1.0 - s / n.max(1) as f64).collect()
    }
}

impl Hooks for BlockCosineStats {
    fn block_input(&mut self, _layer: usize, h: &Tensor) -> Result<()> {
        self.input = Some(h.clone());
        Ok(())
    }
    fn block_output(&mut self, layer: usize, h: &Tensor) -> Result<Option<Tensor>> {
        if let Some(inp) = self.input.take() {
            let dot = (&inp * h)?.sum(candle_core::D::Minus1)?;
            let n1 = inp.sqr()?.sum(candle_core::D::Minus1)?.sqrt()?;
            let n2 = h.sqr()?.sum(candle_core::D::Minus1)?.sqrt()?;
            let cos = (dot / (n1 * n2)?.clamp(1e-12, f64::INFINITY)?)?;
            let v = cos.flatten_all()?.to_vec1::<f32>()?;
            if self.sum_cos.len() <= layer {
                self.sum_cos.resize(layer + 1, 0.0);
                self.count.resize(layer + 1, 0);
            }
            self.sum_cos[layer] += v.iter().map(|&c| c as f64).sum::<f64>();
            self.count[layer] += v.len();
        }
        Ok(None)
    }
}
