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
    let mut h = crate::util::Fnv1a::new();
    for (name, t) in vit.named_tensors() {
        h.eat(name.as_bytes());
        with_f32_slice(&t, |v| v.iter().for_each(|x| h.eat(&x.to_bits().to_le_bytes())))?;
    }
    Ok(h.hex())
}

/// What is forgotten: every training image of one class, or the training images a list names
/// (SSD's sub-class and random forgetting: a forget set inside the training data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForgetSet {
    Class(usize),
    /// 0-based indices into the training split, ascending, no repeats.
    Samples(Vec<usize>),
}

impl ForgetSet {
    /// The key saved importances are tagged with: the class, or a fingerprint of the list.
    pub fn key(&self) -> String {
        match self {
            ForgetSet::Class(c) => c.to_string(),
            ForgetSet::Samples(ix) => {
                let mut h = crate::util::Fnv1a::new();
                ix.iter().for_each(|&i| h.eat(&(i as u64).to_le_bytes()));
                format!("samples:{}:{}", ix.len(), h.hex())
            }
        }
    }

    /// The forget images of `train`.
    pub fn images(&self, train: &ImageSet) -> ImageSet {
        match self {
            ForgetSet::Class(c) => train.filter(|l| l as usize == *c),
            ForgetSet::Samples(ix) => train.pick(ix),
        }
    }

    /// The training images that are not forgotten.
    pub fn others(&self, train: &ImageSet) -> ImageSet {
        match self {
            ForgetSet::Class(c) => train.filter(|l| l as usize != *c),
            ForgetSet::Samples(ix) => {
                let mut inside = vec![false; train.len()];
                ix.iter().for_each(|&i| inside[i] = true);
                train.pick(&(0..train.len()).filter(|&i| !inside[i]).collect::<Vec<_>>())
            }
        }
    }
}

/// Largest sample list read (a list holds at most one line per training image).
const MAX_LIST_BYTES: u64 = 64 << 20;

/// Reads a list of training-image indices: one 0-based index per line, `#` starts a comment,
/// blank lines are skipped. Every index must be below `train_len` and appear once.
pub fn read_sample_list(path: &std::path::Path, train_len: usize) -> Result<Vec<usize>> {
    let shown = path.display();
    let size = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?.len();
    if size > MAX_LIST_BYTES {
        bail!("{shown}: {size} bytes is too large for a list of image indices (at most {MAX_LIST_BYTES})");
    }
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| anyhow::anyhow!("{shown}: not text (a list of training-image indices, one per line)"))?;
    let mut seen = vec![false; train_len];
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let item = line.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        let Ok(i) = item.parse::<usize>() else { bail!("{shown} line {}: {item:?} is not an image index (0-based, one per line)", n + 1) };
        if i >= train_len {
            bail!("{shown} line {}: index {i} is past the {train_len} training images", n + 1);
        }
        if std::mem::replace(&mut seen[i], true) {
            bail!("{shown} line {}: index {i} is listed twice", n + 1);
        }
        out.push(i);
    }
    if out.is_empty() {
        bail!("{shown}: lists no image index");
    }
    if out.len() == train_len {
        bail!("{shown}: lists every training image; nothing would be left to retain");
    }
    out.sort_unstable();
    Ok(out)
}

/// Writes both importances to one safetensors file (`forget.<name>`, `train.<name>`), tagged
/// with the model's fingerprint and the forget set's key.
pub fn save_importances(path: &std::path::Path, vit: &Vit, target: &ForgetSet, forget: &Importance, full: &Importance) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, imp) in [("forget", forget), ("train", full)] {
        for (name, v) in imp {
            tensors.push((format!("{prefix}.{name}"), Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?));
        }
    }
    let meta = BTreeMap::from([("model".to_string(), fingerprint(vit)?), ("class".to_string(), target.key())]);
    crate::formats::safetensors::write_file(path, &tensors, crate::formats::gguf::WriteDType::F32, &meta)
}

/// Reads importances [`save_importances`] wrote, if they are for this model and forget set.
pub fn load_importances(path: &std::path::Path, vit: &Vit, target: &ForgetSet) -> Result<Option<(Importance, Importance)>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: not an importance file ({e})", path.display()))?;
    let m = meta.metadata().clone().unwrap_or_default();
    if m.get("model") != Some(&fingerprint(vit)?) || m.get("class") != Some(&target.key()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str, n: usize) -> Result<Vec<usize>> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("list.txt");
        std::fs::write(&p, text).unwrap();
        read_sample_list(&p, n)
    }

    #[test]
    fn sample_lists_are_read_and_refused() {
        assert_eq!(list("5\n# a comment\n\n 2 # trailing\n0\n", 8).unwrap(), vec![0, 2, 5]);
        let err = |t: &str| list(t, 8).unwrap_err().to_string();
        assert!(err("1\nx\n").contains("line 2"));
        assert!(err("-1\n").contains("not an image index"));
        assert!(err("8\n").contains("past the 8"));
        assert!(err("3\n3\n").contains("twice"));
        assert!(err("# nothing\n").contains("no image index"));
        assert!(err("0\n1\n2\n3\n4\n5\n6\n7\n").contains("every training image"));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bin");
        std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
        assert!(read_sample_list(&p, 8).unwrap_err().to_string().contains("not text"));
    }

    #[test]
    fn forget_sets_split_the_training_images() {
        let set = ImageSet { rows: 1, cols: 1, pixels: (0..6).collect(), labels: vec![0, 1, 0, 1, 2, 0] };
        let split = |s: ForgetSet| (s.images(&set), s.others(&set));
        let (f, r) = split(ForgetSet::Class(0));
        assert_eq!((f.pixels, r.pixels), (vec![0, 2, 5], vec![1, 3, 4]));
        let (f, r) = split(ForgetSet::Samples(vec![1, 4]));
        assert_eq!((f.pixels, f.labels, r.pixels), (vec![1, 4], vec![1, 2], vec![0, 2, 3, 5]));
        assert_ne!(ForgetSet::Samples(vec![1, 4]).key(), ForgetSet::Samples(vec![1, 5]).key());
        assert_ne!(ForgetSet::Class(1).key(), ForgetSet::Samples(vec![1]).key());
    }
}
