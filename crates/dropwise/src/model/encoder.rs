//! The interface every encoder architecture (a file such as `bert.rs` or `vit.rs`) offers the
//! structural and pruning methods in [`crate::encoder`]: its blocks' six linears named by one
//! role set, their weights read and replaced as `[out, in]` matrices with biases, the heads
//! each block has removed (transformers' `pruned_heads`), hooks on the inputs of the linears and
//! on each block's input and output during a forward pass, and writing the model back to its
//! folder. The methods are written once against this trait; an architecture only says where
//! its tensors live.

use std::path::Path;

use anyhow::Result;
use candle_core::Tensor;

/// A linear layer of an encoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EncRole {
    Query,
    Key,
    Value,
    AttnOut,
    Up,
    Down,
}

impl EncRole {
    pub const ALL: [EncRole; 6] = [EncRole::Query, EncRole::Key, EncRole::Value, EncRole::AttnOut, EncRole::Up, EncRole::Down];

    /// Where this linear reads its input (queries, keys and values share one).
    pub fn site(self) -> Site {
        match self {
            EncRole::Query | EncRole::Key | EncRole::Value => Site::AttnIn,
            EncRole::AttnOut => Site::Context,
            EncRole::Up => Site::MlpIn,
            EncRole::Down => Site::MlpHidden,
        }
    }

    /// The one of `[query, key, value, attn_out, up, down]` this role names.
    pub fn pick<T>(self, [q, k, v, o, up, down]: [T; 6]) -> T {
        match self {
            EncRole::Query => q,
            EncRole::Key => k,
            EncRole::Value => v,
            EncRole::AttnOut => o,
            EncRole::Up => up,
            EncRole::Down => down,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EncRole::Query => "query",
            EncRole::Key => "key",
            EncRole::Value => "value",
            EncRole::AttnOut => "attn_out",
            EncRole::Up => "up",
            EncRole::Down => "down",
        }
    }
}

/// The input of one or more linears of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// What queries, keys and values read (the normed block input in a pre-norm ViT, the block
    /// input itself in a post-norm BERT).
    AttnIn,
    /// The attention context, heads side by side (the output projection's input).
    Context,
    /// The MLP's input.
    MlpIn,
    /// The MLP's activations (the down projection's input).
    MlpHidden,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnIn, Site::Context, Site::MlpIn, Site::MlpHidden];
}

/// Observers of an encoder's forward pass. Every tensor holds real tokens only (padding rows are
/// left out), one row per token.
pub trait EncoderHooks {
    /// Whether the pass should call the hooks at all (gathering rows costs a copy).
    fn active(&self) -> bool {
        true
    }
    /// The rows `[tokens, width]` entering the linears at `site` of block `layer`.
    fn input(&mut self, _layer: usize, _site: Site, _x: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Block `layer`'s input and output rows (`[tokens, hidden]` each).
    fn block(&mut self, _layer: usize, _input: &Tensor, _output: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Hooks that observe nothing.
pub struct NoEncoderHooks;

impl EncoderHooks for NoEncoderHooks {
    fn active(&self) -> bool {
        false
    }
}

/// An encoder model as the methods see it.
pub trait Encoder {
    /// One calibration batch (token ids of some sentences, pixels of some images).
    type Batch;

    /// What the model is, for reports ("bert", "vit").
    fn kind(&self) -> &'static str;
    fn layer_count(&self) -> usize;
    /// Heads per block before any were removed (`num_attention_heads`).
    fn head_count(&self) -> usize;
    fn head_dim(&self) -> usize;
    /// The original numbers of the heads block `layer` has removed, sorted.
    fn pruned_heads(&self, layer: usize) -> Vec<usize>;
    /// Records that block `layer` has now removed `heads` (original numbers, sorted). The q/k/v
    /// rows and output columns are sliced by the caller through [`Encoder::set_linear`].
    fn set_pruned_heads(&mut self, layer: usize, heads: Vec<usize>);
    /// The linear's weight `[out, in]` (f32) and bias `[out]`.
    fn linear(&self, layer: usize, role: EncRole) -> Result<(Tensor, Tensor)>;
    fn set_linear(&mut self, layer: usize, role: EncRole, weight: Tensor, bias: Tensor) -> Result<()>;
    /// Records the MLP width every block now has (the file formats hold one for all blocks).
    fn set_intermediate_size(&mut self, n: usize);
    /// Keeps only the blocks `keep` (ascending), renumbering what refers to them.
    fn retain_layers(&mut self, keep: &[usize]) -> Result<()>;
    /// Runs the model on `batch`, calling `hooks` as it goes.
    fn run_hooked(&self, batch: &Self::Batch, hooks: &mut dyn EncoderHooks) -> Result<()>;
    fn param_count(&self) -> usize;
    /// Writes the model as a folder of the kind it was read from (atomically).
    fn save(&self, dir: &Path) -> Result<()>;

    /// The original numbers of the heads block `layer` keeps, in their order in its weights.
    fn kept_heads(&self, layer: usize) -> Vec<usize> {
        let gone = self.pruned_heads(layer);
        (0..self.head_count()).filter(|h| !gone.contains(h)).collect()
    }

    /// Neurons in block `layer`'s MLP.
    fn neurons(&self, layer: usize) -> Result<usize> {
        Ok(self.linear(layer, EncRole::Up)?.0.dim(0)?)
    }
}

/// Index of the rows of a padded `[batch·len]` layout whose token size is positive (the real
/// tokens), or None when every row is real.
pub fn real_rows(sizes: &[f32]) -> Result<Option<Tensor>> {
    if sizes.iter().all(|&s| s > 0.0) {
        return Ok(None);
    }
    let idx: Vec<u32> = sizes.iter().enumerate().filter(|(_, &s)| s > 0.0).map(|(i, _)| i as u32).collect();
    let n = idx.len();
    Ok(Some(Tensor::from_vec(idx, n, &candle_core::Device::Cpu)?))
}

/// `x`'s rows at `rows` (all of them when None).
pub fn gather_rows(x: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
    Ok(match rows {
        Some(r) => x.index_select(r, 0)?,
        None => x.clone(),
    })
}

/// Heads removed per layer as config.json's `pruned_heads` holds them (`{"layer": [heads]}`),
/// checked against the model's `layers` and `heads`: sorted, deduplicated, never every head.
pub fn parse_pruned_heads(v: &serde_json::Value, layers: usize, heads: usize) -> Result<std::collections::BTreeMap<usize, Vec<usize>>> {
    use anyhow::{bail, Context};
    let mut out = std::collections::BTreeMap::new();
    let Some(m) = v.get("pruned_heads").and_then(|x| x.as_object()) else { return Ok(out) };
    for (k, hs) in m {
        let l: usize = k.parse().ok().filter(|&l| l < layers).with_context(|| format!("config.json: pruned_heads names layer {k:?} of {layers}"))?;
        let mut list: Vec<usize> = hs
            .as_array()
            .context("config.json: pruned_heads holds lists of heads")?
            .iter()
            .map(|h| h.as_u64().map(|h| h as usize).filter(|&h| h < heads))
            .collect::<Option<_>>()
            .with_context(|| format!("config.json: pruned_heads of layer {l} names heads outside 0..{heads}"))?;
        list.sort_unstable();
        list.dedup();
        if list.len() >= heads {
            bail!("config.json: pruned_heads removes every head of layer {l}");
        }
        if !list.is_empty() {
            out.insert(l, list);
        }
    }
    Ok(out)
}

/// `pruned_heads` as config.json holds it.
pub fn pruned_heads_json(p: &std::collections::BTreeMap<usize, Vec<usize>>) -> serde_json::Value {
    p.iter().filter(|(_, h)| !h.is_empty()).map(|(l, h)| (l.to_string(), serde_json::json!(h))).collect::<serde_json::Map<_, _>>().into()
}

/// `pruned_heads` after keeping only the blocks `keep` (ascending): the kept blocks renumbered.
pub fn renumber_pruned_heads(p: &std::collections::BTreeMap<usize, Vec<usize>>, keep: &[usize]) -> std::collections::BTreeMap<usize, Vec<usize>> {
    keep.iter().enumerate().filter_map(|(new, old)| p.get(old).map(|h| (new, h.clone()))).collect()
}

/// The blocks `keep` (ascending, distinct, at least one) of `blocks`.
pub fn retained<T: Clone>(blocks: &[T], keep: &[usize]) -> Result<Vec<T>> {
    if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&l| l >= blocks.len()) {
        anyhow::bail!("blocks to keep must be ascending, distinct, at least one and below {}", blocks.len());
    }
    Ok(keep.iter().map(|&l| blocks[l].clone()).collect())
}
