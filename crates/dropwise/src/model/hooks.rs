//! Hooks: how calibration, scoring and surgery see (and change) the model's insides without
//! the model knowing about any of them.
//!
//! The model calls a hook at every linear layer's input, at each block's input and output, and
//! with each block's attention probabilities. A hook that returns `Some(tensor)` replaces the
//! value the model goes on with; `None` leaves it alone. Statistics are accumulated inside the
//! hook as windows stream through, so no more than one window's activations is ever held.

use anyhow::Result;
use candle_core::Tensor;

/// A linear layer's role inside a block, named by its canonical path inside the block (the HF
/// llama name, `model.layers.N.<role>.weight`; each architecture file maps it to its own names).
/// The set is open: a block kind with a layer of its own (an encoder's, a vision tower's) names a
/// new role with [`Role::new`]; nothing downstream enumerates a closed list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Role(&'static str);

impl Role {
    pub const Q: Role = Role("self_attn.q_proj");
    pub const K: Role = Role("self_attn.k_proj");
    pub const V: Role = Role("self_attn.v_proj");
    pub const O: Role = Role("self_attn.o_proj");
    pub const GATE: Role = Role("mlp.gate_proj");
    pub const UP: Role = Role("mlp.up_proj");
    pub const DOWN: Role = Role("mlp.down_proj");

    pub const fn new(canonical: &'static str) -> Role {
        Role(canonical)
    }

    /// Canonical name inside a block (`self_attn.q_proj`).
    pub fn canonical_name(self) -> &'static str {
        self.0
    }

    /// Short name for reports: the last path segment without `_proj` (`q`, `gate`).
    pub fn short(self) -> &'static str {
        let last = self.0.rsplit('.').next().unwrap_or(self.0);
        last.strip_suffix("_proj").unwrap_or(last)
    }
}

/// One linear layer of the model: block index and role. Statistics, plans and hooks are keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub layer: usize,
    pub role: Role,
}

impl LinearId {
    pub fn new(layer: usize, role: Role) -> Self {
        Self { layer, role }
    }
    /// Canonical tensor name of its weight (`model.layers.3.self_attn.q_proj.weight`).
    pub fn weight_name(self) -> String {
        format!("model.layers.{}.{}.weight", self.layer, self.role.canonical_name())
    }
}

impl std::fmt::Display for LinearId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.layer, self.role.short())
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
    fn linear_input(&mut self, _id: LinearId, _x: &Tensor) -> Result<Option<Tensor>> {
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
