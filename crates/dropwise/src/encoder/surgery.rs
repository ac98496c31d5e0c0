//! Removing heads and neurons from an encoder's blocks, written once for every architecture:
//! rows of the query, key and value projections and columns of the output projection for a head;
//! a row of the up projection and a column of the down projection for a neuron. Heads are named
//! by their original numbers, as transformers' `pruned_heads` names them.

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::model::encoder::{EncRole, Encoder};

fn index(ix: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(ix.iter().map(|&i| i as u32).collect::<Vec<_>>(), ix.len(), &candle_core::Device::Cpu)?)
}

/// Removes heads `remove` (original numbers, each still present) from block `layer`.
pub fn remove_heads<M: Encoder>(model: &mut M, layer: usize, remove: &[usize]) -> Result<()> {
    if remove.is_empty() {
        return Ok(());
    }
    let kept = model.kept_heads(layer);
    if let Some(h) = remove.iter().find(|h| !kept.contains(h)) {
        bail!("block {layer} has no head {h} left to remove");
    }
    if remove.len() >= kept.len() {
        bail!("removing {} heads would leave block {layer} none", remove.len());
    }
    let hd = model.head_dim();
    // Positions, in the block's weights, of the heads that stay.
    let rows: Vec<usize> = kept.iter().enumerate().filter(|(_, h)| !remove.contains(h)).flat_map(|(p, _)| p * hd..(p + 1) * hd).collect();
    let rows = index(&rows)?;
    for role in [EncRole::Query, EncRole::Key, EncRole::Value] {
        let (w, b) = model.linear(layer, role)?;
        model.set_linear(layer, role, w.index_select(&rows, 0)?, b.index_select(&rows, 0)?)?;
    }
    let (w, b) = model.linear(layer, EncRole::AttnOut)?;
    model.set_linear(layer, EncRole::AttnOut, w.index_select(&rows, 1)?, b)?;
    let mut gone = model.pruned_heads(layer);
    gone.extend_from_slice(remove);
    gone.sort_unstable();
    gone.dedup();
    model.set_pruned_heads(layer, gone);
    Ok(())
}

/// Keeps only neurons `keep` (ascending positions) of block `layer`'s MLP.
pub fn keep_neurons<M: Encoder>(model: &mut M, layer: usize, keep: &[usize]) -> Result<()> {
    let n = model.neurons(layer)?;
    if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&j| j >= n) {
        bail!("neurons to keep in block {layer} must be ascending, distinct, at least one and below {n}");
    }
    let ix = index(keep)?;
    let (w, b) = model.linear(layer, EncRole::Up)?;
    model.set_linear(layer, EncRole::Up, w.index_select(&ix, 0)?, b.index_select(&ix, 0)?)?;
    let (w, b) = model.linear(layer, EncRole::Down)?;
    model.set_linear(layer, EncRole::Down, w.index_select(&ix, 1)?, b)?;
    Ok(())
}
