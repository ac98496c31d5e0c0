//! Checkpoints of a recovery run: every trained tensor, its AdamW moments and where the run
//! stands, in one safetensors file (f32, written atomically), so a stopped run continues where
//! it was and computes what an uninterrupted run computes, bit for bit.
//!
//! Tensors: `NAME` (the trained value), `NAME.adam_m`, `NAME.adam_v`. Metadata: the update the
//! checkpoint was written after, AdamW's step count, the tokens seen and the run's recipe
//! (`recipe`, JSON), which a resumed run must match.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::adamw::AdamW;
use crate::formats::gguf::WriteDType;

/// Where a checkpointed run stood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// Updates done.
    pub update: usize,
    pub tokens: usize,
    /// The run's options and inputs, serialized: a resume must come from the same run.
    pub recipe: String,
}

/// Writes the optimizer's parameters and moments with `pos` to `path`.
pub fn save(path: &Path, opt: &AdamW, pos: &Position) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(3 * opt.params.len());
    for p in &opt.params {
        let shape = p.var.as_tensor().shape().clone();
        tensors.push((p.name.clone(), p.var.as_tensor().detach()));
        let (m, v) = p.moments();
        tensors.push((format!("{}.adam_m", p.name), Tensor::from_slice(m, shape.clone(), &candle_core::Device::Cpu)?));
        tensors.push((format!("{}.adam_v", p.name), Tensor::from_slice(v, shape, &candle_core::Device::Cpu)?));
    }
    let mut meta = BTreeMap::new();
    meta.insert("dropwise.recover.update".to_string(), pos.update.to_string());
    meta.insert("dropwise.recover.adam_step".to_string(), opt.step.to_string());
    meta.insert("dropwise.recover.tokens".to_string(), pos.tokens.to_string());
    meta.insert("dropwise.recover.recipe".to_string(), pos.recipe.clone());
    crate::formats::safetensors::write_file(path, &tensors, WriteDType::F32, &meta)
}

/// Reads a checkpoint into `opt` (which must train the same tensors) and returns its position.
pub fn load(path: &Path, opt: &mut AdamW) -> Result<Position> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: not a safetensors checkpoint: {e}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| meta.get(&format!("dropwise.recover.{k}")).with_context(|| format!("{} is not a recover checkpoint (no {k})", path.display()));
    let num = |k: &str| -> Result<usize> { get(k)?.parse().with_context(|| format!("{}: bad {k}", path.display())) };
    let pos = Position { update: num("update")?, tokens: num("tokens")?, recipe: get("recipe")?.clone() };
    let step = num("adam_step")? as u64;
    let mut tensors = HashMap::new();
    crate::formats::safetensors::read_file(path, &mut tensors, &mut Vec::new())?;
    if tensors.len() != 3 * opt.params.len() {
        bail!("{} holds {} tensors; this run trains {} (with moments, {})", path.display(), tensors.len(), opt.params.len(), 3 * opt.params.len());
    }
    for p in &mut opt.params {
        let take = |k: &str| -> Result<Tensor> {
            let t = tensors.get(k).with_context(|| format!("{} has no {k}: it comes from another run", path.display()))?;
            if t.dims() != p.var.as_tensor().dims() {
                bail!("{}: {k} has shape {:?}, this run's is {:?}", path.display(), t.dims(), p.var.as_tensor().dims());
            }
            Ok(t.clone())
        };
        let (w, m, v) = (take(&p.name)?, take(&format!("{}.adam_m", p.name))?, take(&format!("{}.adam_v", p.name))?);
        p.var.set(&w)?;
        p.set_moments(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?);
    }
    opt.step = step;
    Ok(pos)
}
