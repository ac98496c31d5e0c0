//! Exact structural surgery on the llama block: remove whole blocks, the attention or MLP
//! sub-block of a block, query heads / whole KV groups, or MLP neurons. Tensors become physically
//! smaller; the config is re-derived from the weights afterwards.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::model::{Linear, Llama};

/// Which part of a block a layer plan removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Block,
    Attn,
    Mlp,
}

impl Part {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "block" => Part::Block,
            "attn" => Part::Attn,
            "mlp" => Part::Mlp,
            o => bail!("unknown part '{o}' (supported: block, attn, mlp)"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Part::Block => "block",
            Part::Attn => "attn",
            Part::Mlp => "mlp",
        }
    }
}

fn empty_linear(rows: usize, cols: usize) -> Result<Linear> {
    Ok(Linear::dense(Tensor::zeros((rows, cols), DType::F32, &candle_core::Device::Cpu)?, None))
}

/// Removes `part` of every block in `layers` (indices into the current blocks, any order).
pub fn remove(model: &mut Llama, layers: &[usize], part: Part) -> Result<()> {
    let n = model.blocks.len();
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != layers.len() {
        bail!("a layer is listed twice");
    }
    if let Some(&l) = sorted.iter().find(|&&l| l >= n) {
        bail!("layer {l} does not exist (the model has {n} blocks, numbered from 0)");
    }
    let h = model.config.hidden_size;
    match part {
        Part::Block => {
            if sorted.len() == n {
                bail!("cannot remove all {n} blocks");
            }
            for &l in sorted.iter().rev() {
                model.blocks.remove(l);
            }
        }
        Part::Attn => {
            for &l in &sorted {
                let b = &mut model.blocks[l];
                b.q = empty_linear(0, h)?;
                b.k = empty_linear(0, h)?;
                b.v = empty_linear(0, h)?;
                b.o = empty_linear(h, 0)?;
            }
        }
        Part::Mlp => {
            for &l in &sorted {
                let b = &mut model.blocks[l];
                b.gate = empty_linear(0, h)?;
                b.up = empty_linear(0, h)?;
                b.down = empty_linear(h, 0)?;
            }
        }
    }
    model.sync_config();
    Ok(())
}

/// Rows `keep` (each a run of `unit` rows starting at `index·unit`) of `t` `[rows, ..]`.
fn keep_rows(t: &Tensor, keep: &[usize], unit: usize) -> Result<Tensor> {
    let idx: Vec<u32> = keep.iter().flat_map(|&k| (k * unit..(k + 1) * unit).map(|r| r as u32)).collect();
    let ids = Tensor::new(idx.as_slice(), t.device())?;
    Ok(t.index_select(&ids, 0)?.contiguous()?)
}

fn keep_cols(t: &Tensor, keep: &[usize], unit: usize) -> Result<Tensor> {
    let idx: Vec<u32> = keep.iter().flat_map(|&k| (k * unit..(k + 1) * unit).map(|r| r as u32)).collect();
    let ids = Tensor::new(idx.as_slice(), t.device())?;
    Ok(t.index_select(&ids, 1)?.contiguous()?)
}

fn slice_out(lin: &Linear, keep: &[usize], unit: usize) -> Result<Linear> {
    Ok(Linear::dense(
        keep_rows(&lin.weight_f32()?, keep, unit)?,
        lin.bias.as_ref().map(|b| keep_rows(&b.unsqueeze(1)?, keep, unit).and_then(|x| Ok(x.squeeze(1)?))).transpose()?,
    ))
}

/// Keeps query heads `q_keep` and KV heads `kv_keep` (original indices) of block `layer`, slicing
/// q/k/v rows and o_proj columns. Grouped-query attention needs every kept query head's KV head
/// kept and the same number of kept query heads in every kept group; both are checked. Keeping
/// nothing removes the attention sub-block.
pub fn keep_heads(model: &mut Llama, layer: usize, q_keep: &[usize], kv_keep: &[usize]) -> Result<()> {
    let hd = model.config.head_dim;
    let shape = model.layer_shape(layer);
    if q_keep.is_empty() || kv_keep.is_empty() {
        if !(q_keep.is_empty() && kv_keep.is_empty()) {
            bail!("layer {layer}: query heads and KV heads must be removed together");
        }
        return remove(model, &[layer], Part::Attn);
    }
    let rep = shape.heads / shape.kv_heads.max(1);
    let strictly_increasing = |v: &[usize], n: usize| v.windows(2).all(|w| w[0] < w[1]) && v.iter().all(|&x| x < n);
    if !strictly_increasing(q_keep, shape.heads) || !strictly_increasing(kv_keep, shape.kv_heads) {
        bail!("layer {layer}: head lists must be increasing and within the layer's {} / {} heads", shape.heads, shape.kv_heads);
    }
    let per_group = q_keep.len() / kv_keep.len();
    for (gi, &g) in kv_keep.iter().enumerate() {
        let in_group: Vec<usize> = q_keep.iter().copied().filter(|&q| q / rep == g).collect();
        if in_group.len() != per_group || q_keep[gi * per_group..(gi + 1) * per_group] != in_group[..] {
            bail!("layer {layer}: every kept KV group must keep the same number of query heads");
        }
    }
    if q_keep.iter().any(|&q| !kv_keep.contains(&(q / rep))) {
        bail!("layer {layer}: a kept query head's KV head was removed");
    }
    let b = &mut model.blocks[layer];
    b.q = slice_out(&b.q, q_keep, hd)?;
    b.k = slice_out(&b.k, kv_keep, hd)?;
    b.v = slice_out(&b.v, kv_keep, hd)?;
    b.o = Linear::dense(keep_cols(&b.o.weight_f32()?, q_keep, hd)?, b.o.bias.clone());
    model.sync_config();
    Ok(())
}

/// Keeps MLP neurons `keep` (increasing original indices) of block `layer`: gate/up rows and
/// down_proj columns. Keeping none removes the MLP sub-block.
pub fn keep_neurons(model: &mut Llama, layer: usize, keep: &[usize]) -> Result<()> {
    let f = model.layer_shape(layer).ffn;
    if keep.is_empty() {
        return remove(model, &[layer], Part::Mlp);
    }
    if !(keep.windows(2).all(|w| w[0] < w[1]) && keep.iter().all(|&k| k < f)) {
        bail!("layer {layer}: neuron list must be increasing and within the layer's {f} neurons");
    }
    let b = model.blocks.get_mut(layer).context("no such layer")?;
    b.gate = slice_out(&b.gate, keep, 1)?;
    b.up = slice_out(&b.up, keep, 1)?;
    b.down = Linear::dense(keep_cols(&b.down.weight_f32()?, keep, 1)?, b.down.bias.clone());
    model.sync_config();
    Ok(())
}
