//! The decoder every architecture runs (llama, mistral, qwen2, qwen3, gemma3, phi3: see
//! [`super::arch`] for what each one decides), owned by dropwise so every stage can see inside it:
//! logits at every position, hooks on every linear input, block input/output and attention
//! probabilities, and a differentiable mode for gradient-based scores.
//!
//! Two execution modes:
//! * inference: candle's fused kernels (rms_norm, softmax, rope), which carry no gradient;
//! * differentiable: the same maths from fused kernels that carry their backward pass
//!   ([`super::grad_kernels`], each tested against its elementary-op twin), so backprop reaches
//!   every weight.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};

use super::arch::Activation;
use super::hooks::{Hooks, LinearId, NoHooks, Role};
use super::{grad_kernels, kernels, qmatmul};
use crate::config::{LayerShape, LlamaConfig};

/// Input rows up to which a block-quantized [`Linear`] multiplies in its quantized form.
pub const QMATMUL_MAX_ROWS: usize = 16;

/// A linear layer stored as PyTorch does: weight `[out, in]`, optional bias `[out]`.
///
/// The weight may be at rest instead of in `weight`: `quantized` holds it in a GGUF block type
/// (see [`Linear::quantized`]), `spilled` as f32 in a scratch file ([`super::spill`]); `weight`
/// is then a zero-stride placeholder that only carries the shape, so the model keeps no f32 copy.
/// Read values with [`Linear::weight_f32`] and replace them with [`Linear::set_weight`], which
/// work whatever the weight's form.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub quantized: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    pub spilled: Option<std::sync::Arc<super::spill::SpillSlot>>,
    /// A low-rank adapter being trained on this layer (LoRA), until [`Linear::merge_adapter`].
    pub adapter: Option<Adapter>,
}

/// A LoRA adapter: the layer computes with `W + scale · (B A) ⊙ M`, `A` `[rank, in]`, `B`
/// `[out, rank]`, and `M` the pruning mask of `W` when it has one, so the pruned entries stay
/// zero in the merged weight and the trained function is exactly the merged one.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub mask: Option<Tensor>,
}

impl Adapter {
    /// `W + scale · (B A) ⊙ M`.
    pub fn effective(&self, w: &Tensor) -> Result<Tensor> {
        let delta = (self.b.matmul(&self.a)? * self.scale)?;
        let delta = match &self.mask {
            Some(m) => (delta * m)?,
            None => delta,
        };
        Ok((w + delta)?)
    }
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// A linear layer whose `[out, in]` weight stays in a GGUF block type; `weight` is a
    /// broadcast zero that costs no memory. Its forward pass:
    /// * up to [`QMATMUL_MAX_ROWS`] input rows (token-by-token decoding): quantized dot products,
    ///   activations quantized to the type's 8-bit dot-product partner as llama.cpp does
    ///   ([`qmatmul::short_product`], on the kernel tier `DROPWISE_SIMD` picks);
    /// * more rows (prefill, evaluation windows) of a Q4_K/Q6_K weight on a VNNI CPU: candle's
    ///   repacked int8 tiles, the same product ([`qmatmul::tiles_on_long_path`]);
    /// * more rows of any other type: the weight is decoded to f32 for this one
    ///   product and dropped after it, and the activations are rounded to the same 8-bit partner
    ///   first ([`kernels::quantized_product`]), so both paths compute llama.cpp's product.
    ///   candle's quantized prefill path is a dot product per output, and for Q4_1/Q5_0/Q5_1 a
    ///   scalar one: 10-20× slower than decode + GEMM here.
    pub fn quantized(q: candle_core::quantized::QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, inp) = q.shape().dims2()?;
        Ok(Self { weight: Self::shape_only(out, inp)?, bias, quantized: Some(std::sync::Arc::new(q)), spilled: None, adapter: None })
    }

    /// A linear layer with its f32 weight in memory.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, quantized: None, spilled: None, adapter: None }
    }

    /// The weight's values as an f32 `[out, in]` tensor, decoded or read back when it is at rest.
    pub fn weight_f32(&self) -> Result<Tensor> {
        if let Some(q) = &self.quantized {
            return Ok(q.dequantize(&Device::Cpu)?);
        }
        if let Some(s) = &self.spilled {
            return s.read();
        }
        Ok(self.weight.clone())
    }

    /// Folds the adapter into the weight (`W ← W + scale · (B A) ⊙ M`, detached) and drops it.
    pub fn merge_adapter(&mut self) -> Result<()> {
        if let Some(ad) = self.adapter.take() {
            let merged = ad.effective(&self.weight_f32()?)?.detach();
            self.set_weight(merged);
        }
        Ok(())
    }

    /// Replaces the weight by the f32 tensor `w` (in memory until [`Linear::spill_to`]).
    pub fn set_weight(&mut self, w: Tensor) {
        self.weight = w;
        self.quantized = None;
        self.spilled = None;
    }

    /// Whether the weight is in memory as f32 (not at rest).
    pub fn is_dense(&self) -> bool {
        self.quantized.is_none() && self.spilled.is_none()
    }

    /// Moves an in-memory f32 weight to the scratch file `spill`; at-rest and empty weights stay.
    pub fn spill_to(&mut self, spill: &std::sync::Arc<super::spill::Spill>) -> Result<()> {
        if !self.is_dense() || self.weight.elem_count() == 0 {
            return Ok(());
        }
        let slot = spill.write(&self.weight)?;
        let (out, inp) = slot.dims();
        self.weight = Self::shape_only(out, inp)?;
        self.spilled = Some(std::sync::Arc::new(slot));
        Ok(())
    }

    /// An `[out, in]` zero that allocates nothing (stride 0): the shape of a quantized weight.
    pub fn shape_only(out: usize, inp: usize) -> Result<Tensor> {
        Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as((out, inp))?)
    }

    /// The weights of `linears` (all of one input width) stacked along the output axis into one
    /// f32 `[Σ out, in]` matrix, for one GEMM in place of several: at-rest slots are read
    /// straight into the one buffer, quantized weights decoded into it, in-memory ones copied.
    pub fn stacked_weight(linears: &[&Linear]) -> Result<Tensor> {
        let cols = linears.first().map_or(0, |l| l.in_features());
        if linears.iter().any(|l| l.in_features() != cols) {
            bail!("stacked linears differ in input width");
        }
        let rows: usize = linears.iter().map(|l| l.out_features()).sum();
        let mut buf: Vec<f32> = Vec::with_capacity(rows * cols);
        for l in linears {
            match (&l.quantized, &l.spilled) {
                (Some(q), _) => buf.extend(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?),
                (None, Some(s)) => s.read_into(&mut buf)?,
                (None, None) => kernels::with_f32_slice(&l.weight, |w| buf.extend_from_slice(w))?,
            }
        }
        Ok(Tensor::from_vec(buf, (rows, cols), &Device::Cpu)?)
    }

    /// `x @ Wᵀ + b` with a block-quantized weight decoded to f32 for this product only: exactly
    /// the product of the f32 model of record (the same decoded values, unrounded activations),
    /// holding one decoded matrix at a time. Plain [`Linear::forward`] for an f32 weight.
    pub fn forward_decoded(&self, x: &Tensor) -> Result<Tensor> {
        if self.adapter.is_some() {
            return self.forward(x);
        }
        match (&self.quantized, &self.spilled) {
            (Some(q), _) => self.on_rows(x, |x2| kernels::f32_product(x2, &q.dequantize(x2.device())?)),
            (None, Some(s)) => self.on_rows(x, |x2| kernels::f32_product(x2, &s.read()?)),
            (None, None) => self.forward(x),
        }
    }

    /// `x @ Wᵀ + b` for `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(ad) = &self.adapter {
            let w = ad.effective(&self.weight_f32()?)?;
            return self.on_rows(x, |x2| Ok(x2.matmul(&w.t()?)?));
        }
        self.on_rows(x, |x2| match (&self.quantized, &self.spilled) {
            (Some(q), _) if x2.dim(0)? <= QMATMUL_MAX_ROWS || qmatmul::tiles_on_long_path(q) => {
                qmatmul::short_product(x2, q, qmatmul::simd_path())
            }
            (Some(q), _) => kernels::quantized_product(x2, q),
            (None, Some(s)) => kernels::f32_product(x2, &s.read()?),
            (None, None) => kernels::f32_product(x2, &self.weight),
        })
    }

    /// `product(x as [rows, in]) + b`, shaped back to `[..., out]`.
    fn on_rows(&self, x: &Tensor, product: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().context("linear input has no dimensions")?;
        let rows: usize = lead.iter().product();
        self.finish_rows(product(&x.reshape((rows, *last))?)?, lead)
    }

    /// The product `y` `[rows, out]` plus the bias, shaped back to `[lead..., out]`.
    fn finish_rows(&self, y: Tensor, lead: &[usize]) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        Ok(y.reshape(out_dims)?)
    }
}

/// Keys and values of the positions seen so far, per block (`[1, kv_heads, len, head_dim]`, keys
/// rotated), for incremental decoding ([`Llama::forward_cached`]).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One decoder block. Widths are read from the weights, so a block may be narrower than the
/// config says (pruned heads or neurons).
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// Per-head RMSNorm weights `[head_dim]` of queries and keys, applied before rope (Qwen3, Gemma 3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Norms on the attention and MLP outputs before each residual add (Gemma 3).
    pub attn_output_norm: Option<Tensor>,
    pub mlp_output_norm: Option<Tensor>,
    /// Sliding-window attention with the local rope base (Gemma 3's local layers); the block
    /// keeps it through surgery, so dropped blocks take their kind with them.
    pub local: bool,
}

impl Block {
    pub fn has_attention(&self) -> bool {
        self.q.out_features() > 0
    }
    pub fn has_mlp(&self) -> bool {
        self.gate.out_features() > 0
    }
    /// The roles of this block's linear layers, in forward order.
    pub const ROLES: [Role; 7] = [Role::Q, Role::K, Role::V, Role::O, Role::GATE, Role::UP, Role::DOWN];

    /// Linears that read one and the same input tensor, in forward order; the first of each
    /// group stands for it in calibration statistics.
    pub const SHARED_INPUTS: [&'static [Role]; 4] = [&[Role::Q, Role::K, Role::V], &[Role::O], &[Role::GATE, Role::UP], &[Role::DOWN]];

    /// The role whose input statistics stand for `role`'s input (q for k and v, gate for up).
    pub fn shared_input(role: Role) -> Role {
        Self::SHARED_INPUTS.iter().find(|g| g.contains(&role)).map(|g| g[0]).unwrap_or(role)
    }

    /// The linear layer playing `role`, or an error naming the roles this block has.
    pub fn linear(&self, role: Role) -> Result<&Linear> {
        self.linears().find(|(r, _)| *r == role).map(|(_, l)| l).with_context(|| no_role(role))
    }
    pub fn linear_mut(&mut self, role: Role) -> Result<&mut Linear> {
        self.linears_mut().find(|(r, _)| *r == role).map(|(_, l)| l).with_context(|| no_role(role))
    }

    /// Every linear layer with its role, in forward order (removed ones are empty, not absent).
    pub fn linears(&self) -> impl Iterator<Item = (Role, &Linear)> {
        Self::ROLES.into_iter().zip([&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down])
    }
    pub fn linears_mut(&mut self) -> impl Iterator<Item = (Role, &mut Linear)> {
        Self::ROLES.into_iter().zip([&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down])
    }
}

fn no_role(role: Role) -> String {
    let have: Vec<&str> = Block::ROLES.iter().map(|r| r.short()).collect();
    format!("a decoder block has no linear layer '{}' (it has {})", role.canonical_name(), have.join(", "))
}

/// How weights kept block-quantized at rest are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StoredProduct {
    /// As llama.cpp: activations rounded to the weight type's 8-bit partner (`--quantized-matmul`).
    #[default]
    AsLlamaCpp,
    /// The f32 model of record exactly, in bounded memory: each weight decoded to f32 for its
    /// product only (the head in row chunks, embeddings row by row).
    DecodedF32,
}

/// Vocabulary rows of the head decoded at a time in [`StoredProduct::DecodedF32`].
const HEAD_CHUNK_ROWS: usize = 16384;

#[derive(Clone, Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Tensor>,
    /// Run the kernels that carry a gradient ([`super::grad_kernels`]) instead of the inference ones.
    pub differentiable: bool,
    /// The head's stored GGUF type when the model was loaded to run as stored
    /// ([`super::io::load_quantized`]): the head's input is then rounded to that type's 8-bit
    /// dot-product partner, as llama.cpp does. `None`: plain f32 product.
    pub head_stored_as: Option<candle_core::quantized::GgmlDType>,
    /// The head as stored, when it is block-quantized and the model runs as stored: decode steps
    /// (≤ [`QMATMUL_MAX_ROWS`] rows) multiply it quantized, reading a quarter of the f32 bytes.
    pub head_quantized: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    /// How the quantized weights above (and in [`Linear::quantized`]) are multiplied.
    pub stored_product: StoredProduct,
    /// The token embedding as stored, when it stays block-quantized ([`StoredProduct::DecodedF32`]):
    /// `embed` is then a zero-stride placeholder and rows are decoded as tokens need them.
    pub embed_quantized: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    /// Where changed weights go to rest ([`Llama::settle_block`]); set when the model was loaded
    /// with its weights at rest, `None` for a model held in memory as f32.
    pub spill: Option<std::sync::Arc<super::spill::Spill>>,
}

/// Positions a forward pass covers, with what attention needs for them: rope tables (one set
/// per rope base) and, for the full-matrix paths, additive masks.
pub struct Positions {
    pub start: usize,
    pub len: usize,
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
    mask: Option<Tensor>,
    local_mask: Option<Tensor>,
}

impl Positions {
    /// cos and sin `[len, head_dim/2]` for a block of the given kind.
    pub fn rope(&self, local: bool) -> (&Tensor, &Tensor) {
        let (c, s) = if local { self.local.as_ref().unwrap_or(&self.global) } else { &self.global };
        (c, s)
    }
    /// Additive mask `[len, len]` (0 allowed, -inf masked) for a block of the given kind; only
    /// for sequences starting at position 0.
    pub fn mask(&self, local: bool) -> Result<&Tensor> {
        let m = if local { self.local_mask.as_ref().or(self.mask.as_ref()) } else { self.mask.as_ref() };
        m.context("attention masks exist only for sequences that start at position 0")
    }
}

impl Llama {
    /// Builds the model from f32 tensors keyed by their HF names, checking every shape.
    pub fn from_tensors(config: LlamaConfig, mut t: HashMap<String, Tensor>) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        fn take(t: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Tensor> {
            let x = t.remove(name).with_context(|| format!("model has no tensor {name}"))?;
            if x.dims() != shape {
                bail!("tensor {name} has shape {:?}, expected {:?}", x.dims(), shape);
            }
            // A zero-stride placeholder (a weight kept quantized) must stay one: making it
            // contiguous would allocate the f32 matrix it stands for.
            if x.dtype() == DType::F32 && x.elem_count() > 1 && x.stride().iter().all(|&s| s == 0) {
                return Ok(x);
            }
            Ok(x.to_dtype(DType::F32)?.contiguous()?)
        }
        let embed = take(&mut t, "model.embed_tokens.weight", &[c.vocab_size, h])?;
        let dev = embed.device().clone();
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let shape = c.layer(i);
            let qd = shape.heads * c.head_dim;
            let kvd = shape.kv_heads * c.head_dim;
            let f = shape.ffn;
            // A removed sub-block (0 heads, or FFN width 0) has no tensors: its linears are empty
            // and its norm, never used, is all ones.
            let lin = |t: &mut HashMap<String, Tensor>, name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                if out * inp == 0 {
                    t.remove(&format!("{p}.{name}.weight"));
                    t.remove(&format!("{p}.{name}.bias"));
                    return Ok(Linear::dense(Tensor::zeros((out, inp), DType::F32, &dev)?, None));
                }
                let weight = take(t, &format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if bias { Some(take(t, &format!("{p}.{name}.bias"), &[out])?) } else { None };
                Ok(Linear::dense(weight, bias))
            };
            let b = c.attention_bias;
            let q = lin(&mut t, "self_attn.q_proj", qd, h, b)?;
            let k = lin(&mut t, "self_attn.k_proj", kvd, h, b)?;
            let v = lin(&mut t, "self_attn.v_proj", kvd, h, b)?;
            let o = lin(&mut t, "self_attn.o_proj", h, qd, false)?;
            let gate = lin(&mut t, "mlp.gate_proj", f, h, false)?;
            let up = lin(&mut t, "mlp.up_proj", f, h, false)?;
            let down = lin(&mut t, "mlp.down_proj", h, f, false)?;
            let norm = |t: &mut HashMap<String, Tensor>, name: &str, present: bool| -> Result<Tensor> {
                let key = format!("{p}.{name}.weight");
                if present {
                    take(t, &key, &[h])
                } else {
                    t.remove(&key);
                    Ok(Tensor::ones(h, DType::F32, &dev)?)
                }
            };
            let attn_norm = norm(&mut t, "input_layernorm", qd > 0)?;
            let mlp_norm = norm(&mut t, "post_attention_layernorm", f > 0)?;
            let (attn_output_norm, mlp_output_norm) = if c.arch.sandwich_norms() {
                (Some(norm(&mut t, "attn_output_norm", qd > 0)?), Some(norm(&mut t, "mlp_output_norm", f > 0)?))
            } else {
                (None, None)
            };
            let (q_norm, k_norm) = if c.arch.has_qk_norm() {
                let mut head_norm = |name: &str| -> Result<Tensor> {
                    let key = format!("{p}.self_attn.{name}.weight");
                    if qd > 0 {
                        take(&mut t, &key, &[c.head_dim])
                    } else {
                        t.remove(&key);
                        Ok(Tensor::ones(c.head_dim, DType::F32, &dev)?)
                    }
                };
                (Some(head_norm("q_norm")?), Some(head_norm("k_norm")?))
            } else {
                (None, None)
            };
            let local = c.is_local(i);
            blocks.push(Block { attn_norm, q, k, v, o, mlp_norm, gate, up, down, q_norm, k_norm, attn_output_norm, mlp_output_norm, local });
        }
        let final_norm = take(&mut t, "model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still ship a copy; it must equal the embedding, so drop it.
            t.remove("lm_head.weight");
            None
        } else {
            Some(take(&mut t, "lm_head.weight", &[c.vocab_size, h])?)
        };
        // Whatever is left belongs to no part of this architecture: refuse it rather than run
        // a model that silently ignores weights.
        if let Some(extra) = t.keys().min() {
            bail!("unexpected tensor {extra} for a {} model with {} blocks", c.arch.name(), c.num_hidden_layers);
        }
        Ok(Self {
            config,
            embed,
            blocks,
            final_norm,
            lm_head,
            differentiable: false,
            head_stored_as: None,
            head_quantized: None,
            stored_product: StoredProduct::default(),
            embed_quantized: None,
            spill: None,
        })
    }

    /// Every tensor by its HF name (the head only when untied). A removed sub-block contributes
    /// no tensors (not even its norm).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for g in 0..self.tensor_groups() {
            out.extend(self.named_tensors_in(g)?);
        }
        Ok(out)
    }

    /// How many groups [`Llama::named_tensors_in`] splits the tensors into: the embedding, each
    /// block, then the final norm and head.
    pub fn tensor_groups(&self) -> usize {
        self.blocks.len() + 2
    }

    /// The tensors of group `g` by HF name with their values (weights at rest decoded): what an
    /// export writes one group at a time, so no more than one block is ever materialized.
    pub fn named_tensors_in(&self, g: usize) -> Result<Vec<(String, Tensor)>> {
        self.group_tensors(g, true, true)
    }

    /// As [`Llama::named_tensors_in`] but an embedding or head kept in a block type stays a
    /// placeholder: for exports that copy it as stored ([`Llama::at_rest_tensor`]).
    pub fn named_tensors_in_keeping_stored(&self, g: usize) -> Result<Vec<(String, Tensor)>> {
        self.group_tensors(g, true, false)
    }

    /// The tensors of group `g`; block linears at rest decoded when `linears`, the embedding and
    /// head when `embed_head`, otherwise their zero-stride placeholders (shapes only).
    fn group_tensors(&self, g: usize, linears: bool, embed_head: bool) -> Result<Vec<(String, Tensor)>> {
        let n = self.blocks.len();
        let materialize = embed_head;
        let weight = |l: &Linear| if linears { l.weight_f32() } else { Ok(l.weight.clone()) };
        let mut out = Vec::new();
        if g == 0 {
            let embed = match (&self.embed_quantized, materialize) {
                (Some(q), true) => q.dequantize(&Device::Cpu)?,
                _ => self.embed.clone(),
            };
            out.push(("model.embed_tokens.weight".to_string(), embed));
        } else if g <= n {
            let i = g - 1;
            let b = &self.blocks[i];
            let p = format!("model.layers.{i}");
            if b.has_attention() {
                out.push((format!("{p}.input_layernorm.weight"), b.attn_norm.clone()));
            }
            for (role, l) in b.linears() {
                let name = role.canonical_name();
                if l.weight.elem_count() == 0 {
                    continue;
                }
                out.push((format!("{p}.{name}.weight"), weight(l)?));
                if let Some(bias) = &l.bias {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
            if b.has_attention() {
                for (name, w) in [("self_attn.q_norm", &b.q_norm), ("self_attn.k_norm", &b.k_norm), ("attn_output_norm", &b.attn_output_norm)] {
                    if let Some(w) = w {
                        out.push((format!("{p}.{name}.weight"), w.clone()));
                    }
                }
            }
            if b.has_mlp() {
                out.push((format!("{p}.post_attention_layernorm.weight"), b.mlp_norm.clone()));
                if let Some(w) = &b.mlp_output_norm {
                    out.push((format!("{p}.mlp_output_norm.weight"), w.clone()));
                }
            }
        } else if g == n + 1 {
            out.push(("model.norm.weight".to_string(), self.final_norm.clone()));
            if let Some(hd) = &self.lm_head {
                let head = match (&self.head_quantized, materialize) {
                    (Some(q), true) => q.dequantize(&Device::Cpu)?,
                    _ => hd.clone(),
                };
                out.push(("lm_head.weight".to_string(), head));
            }
        } else {
            bail!("tensor group {g} does not exist (the model has {})", self.tensor_groups());
        }
        Ok(out)
    }

    /// The embedding or head as stored in a GGUF block type, when it is kept so
    /// (`model.embed_tokens.weight`, `lm_head.weight`): exports copy it as it is.
    pub fn at_rest_tensor(&self, hf_name: &str) -> Option<&std::sync::Arc<candle_core::quantized::QTensor>> {
        match hf_name {
            "model.embed_tokens.weight" => self.embed_quantized.as_ref(),
            "lm_head.weight" if self.lm_head.is_some() => self.head_quantized.as_ref(),
            _ => None,
        }
    }

    /// Puts block `layer`'s weights that a method changed (in memory as f32) at rest in the
    /// model's scratch file, when the model keeps its weights at rest ([`Llama::spill`]): how a
    /// stage that changes a model block by block stays within one block of memory.
    pub fn settle_block(&mut self, layer: usize) -> Result<()> {
        let Some(spill) = self.spill.clone() else { return Ok(()) };
        for (_, lin) in self.blocks[layer].linears_mut() {
            lin.spill_to(&spill)?;
        }
        Ok(())
    }

    pub fn param_count(&self) -> usize {
        (0..self.tensor_groups()).filter_map(|g| self.group_tensors(g, false, false).ok()).flatten().map(|(_, t)| t.elem_count()).sum()
    }

    /// Block `i`'s widths as its weights have them.
    pub fn layer_shape(&self, i: usize) -> LayerShape {
        let b = &self.blocks[i];
        let hd = self.config.head_dim;
        LayerShape { heads: b.q.out_features() / hd, kv_heads: b.k.out_features() / hd, ffn: b.gate.out_features() }
    }

    /// Makes the config describe the blocks as they now are (after surgery): the layer count,
    /// and either one set of widths for all blocks or a per-layer list when they differ.
    pub fn sync_config(&mut self) {
        let shapes: Vec<LayerShape> = (0..self.blocks.len()).map(|i| self.layer_shape(i)).collect();
        let local: Vec<bool> = self.blocks.iter().map(|b| b.local).collect();
        let c = &mut self.config;
        c.num_hidden_layers = shapes.len();
        if c.attention.sliding_window.is_some() && c.attention.local_layers.is_some() {
            c.attention.local_layers = Some(local);
        }
        match shapes.first() {
            Some(first) if shapes.iter().all(|s| s == first) && first.heads > 0 && first.ffn > 0 => {
                c.num_attention_heads = first.heads;
                c.num_key_value_heads = first.kv_heads;
                c.intermediate_size = first.ffn;
                c.per_layer = None;
            }
            _ => {
                // The scalar widths become the widest block's, as llama.cpp reports them.
                c.num_attention_heads = shapes.iter().map(|s| s.heads).max().unwrap_or(0).max(1);
                c.num_key_value_heads = shapes.iter().map(|s| s.kv_heads).max().unwrap_or(0).max(1);
                c.intermediate_size = shapes.iter().map(|s| s.ffn).max().unwrap_or(0);
                c.per_layer = Some(shapes);
            }
        }
    }

    /// Turns every weight into a candle `Var` (so gradients flow to it), switches to the
    /// differentiable mode, and returns the variables by name.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        self.make_trainable_where(|_| true)
    }

    /// As [`Llama::make_trainable`] for the tensors `train` picks: `train(Some(i))` for block
    /// `i`'s, `train(None)` for the embedding, final norm and head. The others stay constants
    /// (the differentiable mode is on for the whole model, so gradients still pass through them).
    pub fn make_trainable_where(&mut self, train: impl Fn(Option<usize>) -> bool) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        if train(None) {
            var("model.embed_tokens.weight".into(), &mut self.embed)?;
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if !train(Some(i)) {
                continue;
            }
            // A removed sub-block's tensors (empty linears, its unused norms) take no part in
            // the forward pass, so they have no gradient and are not trained.
            let (attn, mlp) = (b.has_attention(), b.has_mlp());
            let p = format!("model.layers.{i}");
            if attn {
                var(format!("{p}.input_layernorm.weight"), &mut b.attn_norm)?;
            }
            if mlp {
                var(format!("{p}.post_attention_layernorm.weight"), &mut b.mlp_norm)?;
            }
            let norms = [("self_attn.q_norm", &mut b.q_norm, attn), ("self_attn.k_norm", &mut b.k_norm, attn), ("attn_output_norm", &mut b.attn_output_norm, attn), ("mlp_output_norm", &mut b.mlp_output_norm, mlp)];
            for (name, w, used) in norms {
                if let Some(w) = w.as_mut().filter(|_| used) {
                    var(format!("{p}.{name}.weight"), w)?;
                }
            }
            for (role, l) in b.linears_mut() {
                if l.weight.elem_count() == 0 {
                    continue;
                }
                var(format!("{p}.{}.weight", role.canonical_name()), &mut l.weight)?;
                if let Some(bias) = l.bias.as_mut() {
                    var(format!("{p}.{}.bias", role.canonical_name()), bias)?;
                }
            }
        }
        if train(None) {
            var("model.norm.weight".into(), &mut self.final_norm)?;
            if let Some(hd) = self.lm_head.as_mut() {
                var("lm_head.weight".into(), hd)?;
            }
        }
        self.differentiable = true;
        Ok(vars)
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// A copy for inference of a model in training: every tensor detached from the graph (same
    /// storage, no `Var`), fused kernels on. Evaluating or writing it records no gradients.
    pub fn detached(&self) -> Result<Llama> {
        let mut m = self.clone();
        let d = |t: &mut Tensor| *t = t.detach();
        d(&mut m.embed);
        d(&mut m.final_norm);
        if let Some(h) = m.lm_head.as_mut() {
            d(h);
        }
        for b in &mut m.blocks {
            d(&mut b.attn_norm);
            d(&mut b.mlp_norm);
            for t in [&mut b.q_norm, &mut b.k_norm, &mut b.attn_output_norm, &mut b.mlp_output_norm].into_iter().flatten() {
                d(t);
            }
            for (_, l) in b.linears_mut() {
                // An adapter in training is folded in: the copy computes what the layer does now.
                l.merge_adapter()?;
                d(&mut l.weight);
                if let Some(bias) = l.bias.as_mut() {
                    d(bias);
                }
            }
        }
        m.differentiable = false;
        Ok(m)
    }

    /// Embeds token ids `[batch, seq]` into hidden states `[batch, seq, hidden]`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let max = flat.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            bail!("token id {max} is outside the model's vocabulary of {}", self.config.vocab_size);
        }
        let h = match &self.embed_quantized {
            Some(q) => decode_rows(q, &flat.to_vec1::<u32>()?)?.reshape((b, t, self.config.hidden_size))?,
            None => self.embed.index_select(&flat, 0)?.reshape((b, t, self.config.hidden_size))?,
        };
        Ok(match self.config.arch.embedding_scale(self.config.hidden_size) {
            Some(s) => (h * s as f64)?,
            None => h,
        })
    }

    /// Everything attention needs for positions `start..start+len`: rope tables for each rope
    /// base the blocks use and, when `start` is 0, the causal (and sliding-window) masks.
    pub fn positions(&self, start: usize, len: usize) -> Result<Positions> {
        let global = self.rope_tables_for(&self.config.rope_frequencies()?, start, len)?;
        let local = match self.config.local_rope_frequencies() {
            Some(f) => Some(self.rope_tables_for(&f, start, len)?),
            None => None,
        };
        let (mask, local_mask) = if start == 0 {
            let window = self.config.attention.sliding_window.filter(|_| self.blocks.iter().any(|b| b.local));
            (Some(self.causal_mask(len)?), window.map(|w| self.window_mask(len, w)).transpose()?)
        } else {
            (None, None)
        };
        Ok(Positions { start, len, global, local, mask, local_mask })
    }

    /// Rope tables (global base) for positions `0..seq`: cos and sin of shape `[seq, head_dim/2]`.
    pub fn rope_tables(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        self.rope_tables_at(0, seq)
    }

    /// Rope tables (global base) for positions `start..start+seq`.
    pub fn rope_tables_at(&self, start: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        self.rope_tables_for(&self.config.rope_frequencies()?, start, seq)
    }

    fn rope_tables_for(&self, freqs: &[f64], start: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.config.head_dim;
        let inv: Vec<f32> = freqs.iter().map(|&f| f as f32).collect();
        let mut ang = Vec::with_capacity(seq * hd / 2);
        for p in start..start + seq {
            for f in &inv {
                ang.push(p as f32 * f);
            }
        }
        let ang = Tensor::from_vec(ang, (seq, hd / 2), self.device())?;
        Ok((ang.cos()?, ang.sin()?))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.differentiable {
            grad_kernels::rms_norm(x, w, eps)
        } else {
            Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
        }
    }

    /// Rotary embedding on `[b, heads, seq, head_dim]`, HF's rotate-half layout (inference).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
    }

    /// Linear layer `role` of block `layer` on `x`, after letting the hooks see (or replace) `x`.
    pub fn hooked_linear(&self, hooks: &mut dyn Hooks, layer: usize, role: Role, x: &Tensor) -> Result<Tensor> {
        let lin = self.blocks[layer].linear(role)?;
        let replaced = hooks.linear_input(LinearId::new(layer, role), x)?;
        self.linear_product(lin, replaced.as_ref().unwrap_or(x))
    }

    fn linear_product(&self, lin: &Linear, x: &Tensor) -> Result<Tensor> {
        match self.stored_product {
            StoredProduct::DecodedF32 => lin.forward_decoded(x),
            StoredProduct::AsLlamaCpp => lin.forward(x),
        }
    }

    /// The linears `roles` of block `layer`, which all read `x` (q/k/v, gate/up), on `x`, after
    /// letting the hooks see (or replace) each one's input. When no input was replaced the
    /// products run as one GEMM on the stacked weights ([`Linear::stacked_weight`]): one pass
    /// over `x` and one wide output instead of several narrow ones (k and v are a third of q's
    /// width in grouped-query models). In isolation that measured 1.5× faster for q/k/v on 2
    /// cores; inside `eval` no difference showed beyond this VM's noise (docs/results.md). Not
    /// fused: the differentiable mode (each weight its own `Var`), decoding steps (a few rows,
    /// bound by reading the weights, where stacking would copy them), and block-quantized
    /// weights multiplied as llama.cpp does (activations rounded per weight type).
    pub fn hooked_shared_products(&self, hooks: &mut dyn Hooks, layer: usize, roles: &[Role], x: &Tensor) -> Result<Vec<Tensor>> {
        let blk = &self.blocks[layer];
        let mut inputs = Vec::with_capacity(roles.len());
        for &role in roles {
            inputs.push(hooks.linear_input(LinearId::new(layer, role), x)?);
        }
        let lins: Vec<&Linear> = roles.iter().map(|&r| blk.linear(r)).collect::<Result<_>>()?;
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let quantized_as_llama_cpp = self.stored_product == StoredProduct::AsLlamaCpp && lins.iter().any(|l| l.quantized.is_some());
        let fuse = lins.len() > 1
            && inputs.iter().all(Option::is_none)
            && !self.differentiable
            && rows > kernels::GEMV_MAX_ROWS
            && !quantized_as_llama_cpp
            && lins.iter().all(|l| l.out_features() > 0 && l.adapter.is_none());
        if !fuse {
            return lins.iter().zip(&inputs).map(|(l, r)| self.linear_product(l, r.as_ref().unwrap_or(x))).collect();
        }
        let w = Linear::stacked_weight(&lins)?;
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().context("linear input has no dimensions")?;
        let y = kernels::f32_product(&x.reshape((rows, *last))?, &w)?;
        drop(w);
        let mut outs = Vec::with_capacity(lins.len());
        let mut col = 0;
        for l in lins {
            let n = l.out_features();
            outs.push(l.finish_rows(y.narrow(1, col, n)?, lead)?);
            col += n;
        }
        Ok(outs)
    }

    /// Runs block `layer` on hidden states `[b, seq, hidden]` at the positions `pos` describes
    /// ([`Llama::positions`]). The block is the composition of its stages ([`Llama::attn_norm`],
    /// [`Llama::attention_context`], [`Llama::attn_residual`], [`Llama::mlp_norm`],
    /// [`Llama::mlp_hidden`]), which calibration may also run one at a time.
    pub fn forward_block(&self, layer: usize, h: &Tensor, pos: &Positions, hooks: &mut dyn Hooks) -> Result<Tensor> {
        hooks.block_input(layer, h)?;
        let x = self.attn_norm(layer, h)?;
        let h = match self.attention_context(layer, &x, pos, hooks)? {
            Some(ctx) => self.attn_residual(layer, h, &ctx, hooks)?,
            None => h.clone(),
        };
        let h = self.mlp_residual(layer, &h, hooks)?;
        Ok(match hooks.block_output(layer, &h)? {
            Some(replaced) => replaced,
            None => h,
        })
    }

    /// `h` plus block `layer`'s attention output from its context `ctx` (o_proj's input),
    /// normed first where the architecture has an output norm.
    pub fn attn_residual(&self, layer: usize, h: &Tensor, ctx: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let out = self.hooked_linear(hooks, layer, Role::O, ctx)?;
        let out = match &self.blocks[layer].attn_output_norm {
            Some(w) => self.rms_norm(&out, w)?,
            None => out,
        };
        Ok((h + out)?)
    }

    /// `h` plus block `layer`'s MLP output (`h` itself when the block has no MLP left).
    pub fn mlp_residual(&self, layer: usize, h: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let x = self.mlp_norm(layer, h)?;
        Ok(match self.mlp_hidden(layer, &x, hooks)? {
            Some(a) => self.down_residual(layer, h, &a, hooks)?,
            None => h.clone(),
        })
    }

    /// `h` plus block `layer`'s MLP output from its hidden activations `a` (down_proj's input),
    /// normed first where the architecture has an output norm.
    pub fn down_residual(&self, layer: usize, h: &Tensor, a: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let out = self.hooked_linear(hooks, layer, Role::DOWN, a)?;
        let out = match &self.blocks[layer].mlp_output_norm {
            Some(w) => self.rms_norm(&out, w)?,
            None => out,
        };
        Ok((h + out)?)
    }

    /// Block `layer`'s pre-attention RMS norm: the input of q, k and v.
    pub fn attn_norm(&self, layer: usize, h: &Tensor) -> Result<Tensor> {
        self.rms_norm(h, &self.blocks[layer].attn_norm)
    }

    /// Block `layer`'s pre-MLP RMS norm: the input of gate and up.
    pub fn mlp_norm(&self, layer: usize, h: &Tensor) -> Result<Tensor> {
        self.rms_norm(h, &self.blocks[layer].mlp_norm)
    }

    /// Attention of block `layer` from its normed input `x` `[b, seq, hidden]` up to the input of
    /// o_proj `[b, seq, heads·head_dim]`; `None` when the block has no heads left.
    pub fn attention_context(&self, layer: usize, x: &Tensor, pos: &Positions, hooks: &mut dyn Hooks) -> Result<Option<Tensor>> {
        let local = self.blocks[layer].local;
        let window = self.window(layer);
        let (cos, sin) = pos.rope(local);
        let Some((q, k, v)) = self.project_qkv(layer, x, cos, sin, hooks)? else { return Ok(None) };
        let (b, n_q, t, hd) = q.dims4()?;
        let n_kv = k.dim(1)?;
        let rep = n_q / n_kv;
        let ctx = if self.differentiable || hooks.wants_attention_probs() {
            // Grouped-query attention without copying K/V: the `rep` query heads sharing one KV
            // head are stacked along the sequence axis, so one matmul serves the whole group.
            let qg = q.reshape((b, n_kv, rep * t, hd))?;
            let scores = qg.matmul(&k.t()?)?.reshape((b, n_q, t, t))?;
            let probs = if self.differentiable {
                if pos.start != 0 {
                    bail!("the differentiable mode runs whole sequences from position 0");
                }
                grad_kernels::causal_softmax(&scores, window)?
            } else {
                kernels::causal_softmax(&scores, window)?
            };
            hooks.attention_probs(layer, &probs)?;
            probs.reshape((b, n_kv, rep * t, t))?.matmul(&v)?.reshape((b, n_q, t, hd))?
        } else {
            self.causal_attention_blocked(&q, &k, &v, rep, pos.start, window)?
        };
        Ok(Some(ctx.transpose(1, 2)?.reshape((b, t, n_q * hd))?))
    }

    /// The sliding window block `layer` attends within, if it is a local block.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.config.attention.sliding_window.filter(|_| self.blocks[layer].local)
    }

    /// Block `layer`'s queries, keys and values from its normed input `x` `[b, seq, hidden]`:
    /// `[b, heads, seq, head_dim]` each, q and k rotated (`cos`/`sin` for the positions of `x`)
    /// and q scaled ([`LlamaConfig::query_scale`]); `None` when the block has no heads left.
    fn project_qkv(
        &self,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let blk = &self.blocks[layer];
        let (b, t, _) = x.dims3()?;
        let hd = self.config.head_dim;
        let n_q = blk.q.out_features() / hd;
        let n_kv = blk.k.out_features() / hd;
        if n_q == 0 {
            return Ok(None);
        }
        if n_kv == 0 || n_q % n_kv != 0 {
            bail!("block {layer}: {n_q} query heads cannot share {n_kv} key/value heads");
        }
        let mut qkv = self.hooked_shared_products(hooks, layer, &[Role::Q, Role::K, Role::V], x)?.into_iter();
        let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else { bail!("block {layer}: no q/k/v products") };
        let mut q = q.reshape((b, t, n_q, hd))?;
        let mut k = k.reshape((b, t, n_kv, hd))?;
        if let Some(w) = &blk.q_norm {
            q = self.rms_norm(&q, w)?;
        }
        if let Some(w) = &blk.k_norm {
            k = self.rms_norm(&k, w)?;
        }
        let v = v.reshape((b, t, n_kv, hd))?.transpose(1, 2)?.contiguous()?;
        if self.differentiable {
            let q = grad_kernels::rope_heads(&q, cos, sin, self.config.query_scale())?;
            let k = grad_kernels::rope_heads(&k, cos, sin, 1.0)?;
            return Ok(Some((q, k, v)));
        }
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let q = (self.rope(&q, cos, sin)? * self.config.query_scale())?;
        let k = self.rope(&k, cos, sin)?.contiguous()?;
        Ok(Some((q, k, v)))
    }

    /// Runs the blocks on `ids` `[1, n]`, the tokens at positions `cache.len()..cache.len()+n`,
    /// attending to the keys and values `cache` holds for the earlier positions and appending
    /// theirs; returns the last block's hidden states `[1, n, hidden]`. Calling it on a prompt
    /// and then token by token computes what [`Llama::forward_hidden`] computes on the whole
    /// sequence (incremental decoding).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if b != 1 || n == 0 {
            bail!("incremental decoding takes one non-empty sequence, not [{b}, {n}]");
        }
        if cache.layers.len() != self.blocks.len() {
            cache.layers = vec![None; self.blocks.len()];
            cache.len = 0;
        }
        let start = cache.len;
        let pos = self.positions(start, n)?;
        let mut h = self.embed_tokens(ids)?;
        for layer in 0..self.blocks.len() {
            let x = self.attn_norm(layer, &h)?;
            let (cos, sin) = pos.rope(self.blocks[layer].local);
            if let Some((q, k, v)) = self.project_qkv(layer, &x, cos, sin, &mut NoHooks)? {
                let (k, v) = match cache.layers[layer].take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                let (_, n_q, _, hd) = q.dims4()?;
                let ctx = self.causal_attention_blocked(&q, &k, &v, n_q / k.dim(1)?, start, self.window(layer))?;
                let ctx = ctx.transpose(1, 2)?.reshape((1, n, n_q * hd))?;
                h = self.attn_residual(layer, &h, &ctx, &mut NoHooks)?;
                cache.layers[layer] = Some((k, v));
            }
            h = self.mlp_residual(layer, &h, &mut NoHooks)?;
        }
        cache.len = start + n;
        Ok(h)
    }

    /// The MLP of block `layer` from its normed input up to the input of down_proj,
    /// `act(gate(x)) · up(x)` (silu or tanh-GELU, as the architecture says); `None` when the
    /// block has no neurons left.
    pub fn mlp_hidden(&self, layer: usize, x: &Tensor, hooks: &mut dyn Hooks) -> Result<Option<Tensor>> {
        if self.blocks[layer].gate.out_features() == 0 {
            return Ok(None);
        }
        let mut gu = self.hooked_shared_products(hooks, layer, &[Role::GATE, Role::UP], x)?.into_iter();
        let (Some(g), Some(u)) = (gu.next(), gu.next()) else { bail!("block {layer}: no gate/up products") };
        Ok(Some(match (self.config.arch.activation(), self.differentiable) {
            (Activation::Silu, false) => kernels::silu_mul(&g, &u)?,
            (Activation::Silu, true) => grad_kernels::gated(&g, &u, grad_kernels::Gate::Silu)?,
            (Activation::GeluTanh, false) => (g.gelu()? * u)?,
            (Activation::GeluTanh, true) => grad_kernels::gated(&g, &u, grad_kernels::Gate::GeluTanh)?,
        }))
    }

    /// Inference attention in blocks of query positions: block `[s, s+B)` only multiplies
    /// against keys `0..offset+s+B`, so the masked upper triangle is mostly never computed (37%
    /// fewer score entries at seq 512). `q` is `[b, n_q, t, hd]` (rope'd, scaled) for positions
    /// `offset..offset+t`, `k`/`v` are `[b, n_kv, offset+t, hd]` (earlier positions first, as a
    /// KV cache holds them); returns the context `[b, n_q, t, hd]`. With a sliding `window`, a
    /// block multiplies only against the keys its rows can reach.
    fn causal_attention_blocked(&self, q: &Tensor, k: &Tensor, v: &Tensor, rep: usize, offset: usize, window: Option<usize>) -> Result<Tensor> {
        const BLOCK: usize = 128;
        let (b, n_q, t, hd) = q.dims4()?;
        let n_kv = n_q / rep;
        let q5 = q.reshape((b, n_kv, rep, t, hd))?;
        let mut outs = Vec::with_capacity(t.div_ceil(BLOCK));
        let mut s = 0;
        while s < t {
            let tb = BLOCK.min(t - s);
            let kend = offset + s + tb;
            let kstart = window.map_or(0, |w| (offset + s + 1).saturating_sub(w));
            let qb = q5.narrow(3, s, tb)?.contiguous()?.reshape((b, n_kv, rep * tb, hd))?;
            let kb = k.narrow(2, kstart, kend - kstart)?.contiguous()?;
            let vb = v.narrow(2, kstart, kend - kstart)?.contiguous()?;
            let scores = qb.matmul(&kb.t()?)?;
            let probs = kernels::causal_softmax_block(&scores, tb, offset + s - kstart, window)?;
            outs.push(probs.matmul(&vb)?.reshape((b, n_kv, rep, tb, hd))?);
            s += tb;
        }
        Ok(Tensor::cat(&outs, 3)?.reshape((b, n_q, t, hd))?)
    }

    /// Additive causal mask `[seq, seq]`: 0 on and below the diagonal, -inf above.
    pub fn causal_mask(&self, seq: usize) -> Result<Tensor> {
        self.window_mask(seq, usize::MAX)
    }

    /// Additive causal mask within a sliding window: key j is seen by query i when
    /// `0 <= i - j < window`.
    pub fn window_mask(&self, seq: usize, window: usize) -> Result<Tensor> {
        let m: Vec<f32> = (0..seq).flat_map(|i| (0..seq).map(move |j| if j <= i && i - j < window { 0.0 } else { f32::NEG_INFINITY })).collect();
        Ok(Tensor::from_vec(m, (seq, seq), self.device())?)
    }

    /// Final norm and output head: hidden `[b, seq, hidden]` to logits `[b, seq, vocab]`.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let w = self.head_weight();
        if let Some(q) = self.head_quantized.as_ref().filter(|q| (b * t <= QMATMUL_MAX_ROWS || qmatmul::tiles_on_long_path(q)) && !self.differentiable && self.stored_product == StoredProduct::AsLlamaCpp) {
            // The short quantized path (and the tiles) round the input to the head type's partner itself.
            let x = self.rms_norm(h, &self.final_norm)?.reshape((b * t, self.config.hidden_size))?;
            let logits = qmatmul::short_product(&x, q, qmatmul::simd_path())?;
            return Ok(logits.reshape((b, t, w.dims()[0]))?);
        }
        if let (Some(q), StoredProduct::DecodedF32) = (self.head_quantized.as_ref(), self.stored_product) {
            let x = self.head_input(h)?;
            let (vocab, _) = q.shape().dims2()?;
            let parts: Vec<Tensor> = (0..vocab).step_by(HEAD_CHUNK_ROWS).map(|start| self.head_rows(&x, start, HEAD_CHUNK_ROWS.min(vocab - start))).collect::<Result<_>>()?;
            return Ok(Tensor::cat(&parts, 1)?.reshape((b, t, vocab))?);
        }
        let logits = kernels::f32_product(&self.head_input(h)?, w)?;
        Ok(logits.reshape((b, t, w.dims()[0]))?)
    }

    /// The output head's input: final-normed hidden states flattened to `[b*seq, hidden]`.
    pub fn head_input(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.rms_norm(h, &self.final_norm)?;
        let (b, t, hdim) = x.dims3()?;
        let x = x.reshape((b * t, hdim))?;
        match self.head_stored_as {
            Some(dtype) => kernels::round_to_dot_partner(&x, dtype),
            None => Ok(x),
        }
    }

    /// Logits for vocabulary rows `base..base+len` from head inputs `x` `[n, hidden]`
    /// ([`Llama::head_input`]): `x @ W[base..base+len]ᵀ`, the rows decoded from the stored head
    /// when it stays quantized ([`StoredProduct::DecodedF32`]), so no f32 head is ever held whole.
    pub fn head_rows(&self, x: &Tensor, base: usize, len: usize) -> Result<Tensor> {
        match (&self.head_quantized, self.stored_product) {
            (Some(q), StoredProduct::DecodedF32) => {
                let rows: Vec<u32> = (base..base + len).map(|r| r as u32).collect();
                kernels::f32_product(x, &decode_rows(q, &rows)?)
            }
            _ => kernels::f32_product(x, &self.head_weight().narrow(0, base, len)?),
        }
    }

    /// The output head's weight `[vocab, hidden]` (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits `[b, seq, vocab]` for every position of `ids` `[b, seq]`.
    pub fn forward_with_hooks(&self, ids: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let h = self.forward_hidden(ids, hooks)?;
        self.head(&h)
    }

    /// The last block's hidden states `[b, seq, hidden]` (before the final norm): lets a caller
    /// run the blocks on a batch and the (vocabulary-sized) head one sequence at a time.
    pub fn forward_hidden(&self, ids: &Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if t == 0 {
            bail!("cannot run the model on an empty sequence");
        }
        let pos = self.positions(0, t)?;
        let mut h = self.embed_tokens(ids)?;
        for layer in 0..self.blocks.len() {
            h = self.forward_block(layer, &h, &pos, hooks)?;
        }
        Ok(h)
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with_hooks(ids, &mut NoHooks)
    }

    /// FLOPs to process one token at position-average context `seq` (causal): 2 per weight
    /// multiply-add in every linear layer and the head, plus QKᵀ and PV over the (seq+1)/2
    /// positions a token attends to on average.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let hd = self.config.head_dim as f64;
        let mut f = 0.0;
        for b in &self.blocks {
            for (_, l) in b.linears() {
                f += 2.0 * l.weight.elem_count() as f64;
            }
            let n_q = (b.q.out_features() as f64) / hd;
            f += 2.0 * 2.0 * n_q * hd * (seq as f64 + 1.0) / 2.0;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        f + 2.0 * head.elem_count() as f64
    }
}

/// Rows `rows` of a block-quantized matrix decoded to f32 `[rows.len(), cols]`: blocks run along
/// rows, so each row's bytes decode alone, to the values the whole matrix decodes to.
pub fn decode_rows(q: &candle_core::quantized::QTensor, rows: &[u32]) -> Result<Tensor> {
    let (n, cols) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = data.len() / n.max(1);
    let mut buf = Vec::with_capacity(rows.len() * row_bytes);
    for &r in rows {
        let r = r as usize;
        if r >= n {
            bail!("row {r} of a {n}-row matrix");
        }
        buf.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let part = candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &buf, vec![rows.len(), cols], &Device::Cpu)?;
    Ok(part.dequantize(&Device::Cpu)?)
}
