//! What a model is: architecture, shapes, parameters, bytes by stored dtype, FLOPs per token.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::LlamaConfig;
use crate::model::io::LoadedModel;

#[derive(Debug, Serialize)]
pub struct DtypeBytes {
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct LayerShape {
    pub layer: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub format: String,
    pub name: String,
    pub config: LlamaConfig,
    pub tokenizer: String,
    pub parameters: usize,
    pub f32_bytes: u64,
    pub stored_bytes: u64,
    pub bytes_by_dtype: BTreeMap<String, DtypeBytes>,
    pub seq_len: usize,
    pub flops_per_token: f64,
    pub layers: Vec<LayerShape>,
}

pub fn inspect(m: &LoadedModel, seq_len: usize) -> InspectReport {
    let mut by = BTreeMap::<String, DtypeBytes>::new();
    for s in &m.stored {
        let e = by.entry(s.dtype.clone()).or_insert(DtypeBytes { tensors: 0, elements: 0, bytes: 0 });
        e.tensors += 1;
        e.elements += s.elems;
        e.bytes += s.bytes;
    }
    let hd = m.model.config.head_dim;
    let layers = m
        .model
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| LayerShape { layer: i, q_heads: b.q.out_features() / hd, kv_heads: b.k.out_features() / hd, ffn: b.gate.out_features() })
        .collect();
    let params = m.model.param_count();
    InspectReport {
        path: m.path.display().to_string(),
        format: m.format.to_string(),
        name: m.name.clone(),
        config: m.model.config.clone(),
        tokenizer: m.tokenizer.source.clone(),
        parameters: params,
        f32_bytes: params as u64 * 4,
        stored_bytes: m.stored.iter().map(|s| s.bytes).sum(),
        bytes_by_dtype: by,
        seq_len,
        flops_per_token: m.model.flops_per_token(seq_len),
        layers,
    }
}
