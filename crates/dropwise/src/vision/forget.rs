//! Selective Synaptic Dampening (Foster et al., 2023): forgetting without retraining. The
//! importance of each parameter to a dataset is its Fisher information diagonal, estimated as
//! SSD's reference code does — the squared gradient of the mean loss of each batch, averaged
//! over the batches. Parameters far more important to the forget set than to the training data
//! (`I_f > α · I_D`) are scaled by `β = min(λ · I_D / I_f, 1)`; all others are left alone.
//!
//! As in SSD's code, the reference importance `I_D` is taken over the full training data (the
//! forget images included), and every tensor of the model is a candidate.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::idx::ImageSet;
use super::train::soft_cross_entropy;
use crate::model::kernels::with_f32_slice;
use crate::model::token_reduction::TokenReduction;
use crate::model::vit::Vit;

/// Fisher diagonals by tensor name.
pub type Importance = BTreeMap<String, Vec<f32>>;

/// The Fisher diagonal of every tensor of `vit` on `set`, `batch` images per gradient.
pub fn importance(vit: &Vit, set: &ImageSet, batch: usize, progress: &mut dyn FnMut(usize)) -> Result<Importance> {
    if set.is_empty() {
        bail!("no images to score");
    }
    let mut m = vit.clone();
    let vars = m.make_trainable()?;
    let classes = m.config.labels.len();
    let mut acc: Vec<Vec<f64>> = vars.iter().map(|(_, v)| vec![0f64; v.as_tensor().elem_count()]).collect();
    let plane = set.rows * set.cols;
    let mut batches = 0usize;
    let mut start = 0;
    while start < set.len() {
        let end = (start + batch.max(1)).min(set.len());
        let n = end - start;
        let x = m.patchify(&m.normalize(&set.pixels[start * plane..end * plane]), n)?;
        let feats = m.forward(&x, n, &TokenReduction::None)?.features;
        let mut t = vec![0f32; n * classes];
        for (r, &l) in set.labels[start..end].iter().enumerate() {
            if l as usize >= classes {
                bail!("label {l} is outside the model's {classes} classes");
            }
            t[r * classes + l as usize] = 1.0;
        }
        let loss = soft_cross_entropy(&m.classifier.forward(&feats)?, &Tensor::from_vec(t, (n, classes), &Device::Cpu)?)?;
        let grads = loss.backward()?;
        for ((name, v), a) in vars.iter().zip(&mut acc) {
            let Some(g) = grads.get(v.as_tensor()) else { bail!("no gradient reached {name}") };
            with_f32_slice(g, |g| {
                for (a, &x) in a.iter_mut().zip(g) {
                    *a += (x as f64) * (x as f64);
                }
            })?;
        }
        batches += 1;
        start = end;
        progress(end);
    }
    Ok(vars.iter().zip(acc).map(|((name, _), a)| (name.clone(), a.into_iter().map(|v| (v / batches as f64) as f32).collect())).collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct Dampening {
    pub alpha: f64,
    pub lambda: f64,
    pub parameters: usize,
    /// Parameters whose forget importance exceeded α × the training data's (and were scaled).
    pub selected: usize,
    /// Mean scale applied to the selected parameters.
    pub mean_scale: f64,
}

/// Scales the parameters of `vit` SSD selects, from the two importances.
pub fn dampen(vit: &mut Vit, forget: &Importance, full: &Importance, alpha: f64, lambda: f64) -> Result<Dampening> {
    if !(alpha.is_finite() && alpha > 0.0) {
        bail!("--alpha must be a positive number, not {alpha}");
    }
    if !(lambda.is_finite() && lambda > 0.0) {
        bail!("--lambda must be a positive number, not {lambda}");
    }
    let (mut parameters, mut selected, mut scale_sum) = (0usize, 0usize, 0f64);
    vit.map_tensors(|name, t| {
        let (Some(f), Some(d)) = (forget.get(name), full.get(name)) else { bail!("no importance for {name}") };
        let mut w = with_f32_slice(t, |s| s.to_vec())?;
        if w.len() != f.len() || w.len() != d.len() {
            bail!("importance of {name} has the wrong length");
        }
        parameters += w.len();
        for ((w, &fi), &di) in w.iter_mut().zip(f).zip(d) {
            if (fi as f64) > alpha * di as f64 {
                let beta = (lambda * di as f64 / fi as f64).min(1.0);
                *w = (*w as f64 * beta) as f32;
                selected += 1;
                scale_sum += beta;
            }
        }
        Ok(Tensor::from_vec(w, t.dims(), t.device())?)
    })?;
    Ok(Dampening { alpha, lambda, parameters, selected, mean_scale: if selected == 0 { 1.0 } else { scale_sum / selected as f64 } })
}

/// A fingerprint of a model's weights (FNV-1a over every tensor's name and f32 bits), so saved
/// importances are only reused for the model they were computed on.
pub fn fingerprint(vit: &Vit) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h = (h ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    for (name, t) in vit.named_tensors() {
        eat(name.as_bytes());
        with_f32_slice(&t, |v| v.iter().for_each(|x| eat(&x.to_bits().to_le_bytes())))?;
    }
    Ok(format!("{h:016x}"))
}

/// Writes both importances to one safetensors file (`forget.<name>`, `train.<name>`), tagged
/// with the model's fingerprint and the class.
pub fn save_importances(path: &std::path::Path, vit: &Vit, class: usize, forget: &Importance, full: &Importance) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, imp) in [("forget", forget), ("train", full)] {
        for (name, v) in imp {
            tensors.push((format!("{prefix}.{name}"), Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?));
        }
    }
    let meta = BTreeMap::from([("model".to_string(), fingerprint(vit)?), ("class".to_string(), class.to_string())]);
    crate::formats::safetensors::write_file(path, &tensors, crate::formats::gguf::WriteDType::F32, &meta)
}

/// Reads importances [`save_importances`] wrote, if they are for this model and class.
pub fn load_importances(path: &std::path::Path, vit: &Vit, class: usize) -> Result<Option<(Importance, Importance)>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: not an importance file ({e})", path.display()))?;
    let m = meta.metadata().clone().unwrap_or_default();
    if m.get("model") != Some(&fingerprint(vit)?) || m.get("class") != Some(&class.to_string()) {
        return Ok(None);
    }
    let mut raw = std::collections::HashMap::new();
    crate::formats::safetensors::read_file(path, &mut raw, &mut Vec::new())?;
    let (mut forget, mut full) = (Importance::new(), Importance::new());
    for (name, t) in vit.named_tensors() {
        for (prefix, out) in [("forget", &mut forget), ("train", &mut full)] {
            let key = format!("{prefix}.{name}");
            let v = raw.get(&key).ok_or_else(|| anyhow::anyhow!("{}: no {key}", path.display()))?.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != t.elem_count() {
                bail!("{}: {key} has {} values for {}", path.display(), v.len(), t.elem_count());
            }
            out.insert(name.clone(), v);
        }
    }
    Ok(Some((forget, full)))
}
