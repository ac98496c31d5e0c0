//! Layer-wise mixed precision (seed: "Layer-Wise Quantization … Beyond Integer Bit-Levels"):
//! rank the decoder blocks by importance, then give the most important blocks the next-higher
//! rung of a ladder of type pairs until the average bits per weight reaches the budget.
//!
//! The budget counts the quantized block linears (q, k, v, o, gate, up, down) — the tensors the
//! plan allocates. The token embedding (the tied output head on SmolLM2) gets one fixed type,
//! Q8_0 by default, which is llama.cpp's choice for a tied output whose rows do not fit Q6_K; it
//! is reported with the file size but is outside the budget.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::{quantize_matrix, roundtrip, QType};
use crate::eval::{score_window, Acc};
use crate::formats::gguf::{self, GgufFile, TensorOut, Value, WriteDType};
use crate::calibrate::{BlockInputs, LinearInputStats};
use crate::model::io::{gguf_to_hf_name, save_gguf_encoded, LoadedModel};
use crate::model::{Block, LinearId, Llama, Role};
use crate::structural::{layers::block_influence, Part};

/// How layers are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// Layer Input Modification: 1 − mean cos(block input, block output) on calibration tokens.
    Lim,
    /// The share of a block's weights more than one standard deviation from their matrix's mean
    /// (z-score > 1); a smaller share (heavier tails: a few large weights) ranks higher.
    Outliers,
    /// Measured: KL divergence to the unquantized model on calibration windows when this block
    /// alone is quantized to the ladder's lowest rung.
    Kld,
}

impl Importance {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "lim" => Importance::Lim,
            "outliers" => Importance::Outliers,
            "kld" => Importance::Kld,
            _ => bail!("unknown importance {s:?} (lim, outliers or kld)"),
        })
    }
}

/// The rungs: (type for rows that are not a multiple of 256, type for rows that are). Q4_1 is
/// left out on purpose: a model whose weights came from a Q4_1 file (the bundled SmolLM2) goes
/// back to Q4_1 almost exactly, which would reward that type for an accident of provenance.
pub const LADDER: [(QType, QType); 10] = [
    (QType::Q4_0, QType::Q2K),
    (QType::Q4_0, QType::Q3K),
    (QType::Q4_0, QType::Q4K),
    (QType::Q5_0, QType::Q4K),
    (QType::Q5_0, QType::Q5K),
    (QType::Q5_1, QType::Q5K),
    (QType::Q5_1, QType::Q6K),
    (QType::Q8_0, QType::Q6K),
    (QType::Q8_0, QType::Q8_0),
    (QType::F16, QType::F16),
];

/// One quantized matrix: a block linear.
#[derive(Debug, Clone, Serialize)]
pub struct Unit {
    pub layer: usize,
    #[serde(rename = "kind", serialize_with = "ser_role")]
    pub role: Role,
    pub rows: usize,
    pub cols: usize,
    #[serde(rename = "type")]
    pub ty: QType,
}

fn ser_role<S: serde::Serializer>(r: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.canonical_name())
}

impl Unit {
    fn elems(&self) -> usize {
        self.rows * self.cols
    }
    pub fn id(&self) -> LinearId {
        LinearId::new(self.layer, self.role)
    }
    pub fn hf_name(&self) -> String {
        self.id().weight_name()
    }
}

fn rung_type(rung: usize, cols: usize) -> QType {
    let (t32, tk) = LADDER[rung];
    if tk.fits(cols) {
        tk
    } else {
        t32
    }
}

/// The block linears of `model` (removed sub-blocks have none), typed `ty` for now.
pub fn units(model: &Llama) -> Result<Vec<Unit>> {
    let mut out = Vec::new();
    for (layer, b) in model.blocks.iter().enumerate() {
        for (role, lin) in b.linears() {
            let w = &lin.weight;
            if w.elem_count() == 0 {
                continue;
            }
            let (rows, cols) = w.dims2()?;
            if cols % 32 != 0 {
                bail!("{}: rows of {cols} are not whole 32-element blocks; no GGUF block type fits", LinearId::new(layer, role).weight_name());
            }
            out.push(Unit { layer, role, rows, cols, ty: QType::F16 });
        }
    }
    if out.is_empty() {
        bail!("the model has no block linears to quantize");
    }
    Ok(out)
}

/// Average bits per weight of `units` as typed.
pub fn bits_per_weight(units: &[Unit]) -> f64 {
    let bits: f64 = units.iter().map(|u| u.elems() as f64 * u.ty.bits()).sum();
    bits / units.iter().map(|u| u.elems()).sum::<usize>().max(1) as f64
}

/// The rungs that differ on this model (a model whose rows all fit k-quants, or none do, sees
/// some rungs twice), lowest first.
fn distinct_rungs(units: &[Unit]) -> Vec<usize> {
    let mut seen: Vec<Vec<QType>> = Vec::new();
    let mut out = Vec::new();
    for r in 0..LADDER.len() {
        let sig: Vec<QType> = units.iter().map(|u| rung_type(r, u.cols)).collect();
        if !seen.contains(&sig) {
            seen.push(sig);
            out.push(r);
        }
    }
    out
}

/// The budgets a plan can meet: every block on the lowest rung … every block on the highest.
pub fn feasible_range(units: &[Unit]) -> (f64, f64) {
    let at = |r: usize| {
        let mut u = units.to_vec();
        u.iter_mut().for_each(|x| x.ty = rung_type(r, x.cols));
        bits_per_weight(&u)
    };
    (at(0), at(LADDER.len() - 1))
}

/// How close to the budget a plan must land.
pub const BPW_TOLERANCE: f64 = 0.05;

/// Refuses a budget no plan of `units` can meet, naming the feasible range.
pub fn check_budget(units: &[Unit], bpw: f64) -> Result<()> {
    let (lo, hi) = feasible_range(units);
    if !bpw.is_finite() || bpw < lo - BPW_TOLERANCE || bpw > hi + BPW_TOLERANCE {
        bail!("a budget of {bpw} bits per weight cannot be met: this model's block linears can take {lo:.3} to {hi:.3} (the 32-block types on rows that are not a multiple of 256)");
    }
    Ok(())
}

/// Types every unit so the average meets `bpw` (within [`BPW_TOLERANCE`], never above it by more
/// than that): all blocks start on the highest rung whose uniform average fits, then blocks are
/// lifted one rung in order of `importance` (higher first) while the budget allows; whatever is
/// left is spent on single matrices of the next blocks in that order, smallest first.
pub fn allocate(units: &mut [Unit], importance: &[f64], bpw: f64) -> Result<()> {
    check_budget(units, bpw)?;
    let (_, hi) = feasible_range(units);
    let n_layers = units.iter().map(|u| u.layer).max().unwrap_or(0) + 1;
    if importance.len() != n_layers {
        bail!("{} importance scores for {n_layers} layers", importance.len());
    }
    let rungs = distinct_rungs(units);
    let total: f64 = units.iter().map(|u| u.elems() as f64).sum();
    let budget = bpw.min(hi) * total;
    let bits_at = |u: &Unit, r: usize| u.elems() as f64 * rung_type(r, u.cols).bits();
    // The base rung: the highest whose uniform plan fits.
    let mut base = 0;
    for (i, &r) in rungs.iter().enumerate() {
        if units.iter().map(|u| bits_at(u, r)).sum::<f64>() <= budget + 1e-6 {
            base = i;
        }
    }
    let lower = rungs[base];
    for u in units.iter_mut() {
        u.ty = rung_type(lower, u.cols);
    }
    if base + 1 < rungs.len() {
        let upper = rungs[base + 1];
        let mut used: f64 = units.iter().map(|u| bits_at(u, lower)).sum();
        let mut order: Vec<usize> = (0..n_layers).collect();
        order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
        let mut partial_from = order.len();
        for (pos, &l) in order.iter().enumerate() {
            let delta: f64 = units.iter().filter(|u| u.layer == l).map(|u| bits_at(u, upper) - bits_at(u, lower)).sum();
            if used + delta > budget + 1e-6 {
                partial_from = pos;
                break;
            }
            used += delta;
            for u in units.iter_mut().filter(|u| u.layer == l) {
                u.ty = rung_type(upper, u.cols);
            }
        }
        for &l in &order[partial_from.min(order.len())..] {
            let mut idx: Vec<usize> = (0..units.len()).filter(|&i| units[i].layer == l).collect();
            idx.sort_by_key(|&i| units[i].elems());
            for i in idx {
                let delta = bits_at(&units[i], upper) - bits_at(&units[i], lower);
                if used + delta <= budget + 1e-6 {
                    used += delta;
                    units[i].ty = rung_type(upper, units[i].cols);
                }
            }
        }
    }
    let got = bits_per_weight(units);
    if (got - bpw).abs() > BPW_TOLERANCE {
        bail!("the closest plan to {bpw} bits per weight reaches {got:.3} (this model's matrices are too few or too large for a finer step)");
    }
    Ok(())
}

/// One type for every unit (k-quants fall back where rows do not fit, as llama.cpp does).
pub fn uniform(units: &mut [Unit], ty: QType) -> Result<()> {
    for u in units.iter_mut() {
        u.ty = ty.for_cols(u.cols).with_context(|| format!("{}: neither {} nor its fallback fits rows of {}", u.hf_name(), ty.name(), u.cols))?;
    }
    Ok(())
}

/// Per-column importance weights of every block linear's input: the mean square of that input
/// channel over the calibration tokens (llama.cpp's imatrix statistic).
#[derive(Debug, Clone, Default)]
/// Keyed by the first linear of each shared-input group ([`Block::shared_input`]).
pub struct Imatrix(pub BTreeMap<LinearId, Vec<f32>>);

impl Imatrix {
    pub fn collect(model: &Llama, windows: &[Vec<u32>], progress: &mut dyn FnMut(usize)) -> Result<Self> {
        let mut st = LinearInputStats::default();
        for (i, w) in windows.iter().enumerate() {
            model.forward_hidden(&Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?, &mut st)?;
            progress(i + 1);
        }
        Ok(Imatrix(st.stats.iter().map(|(id, s)| (*id, s.mean_sq().into_iter().map(|m| m as f32).collect())).collect()))
    }
    /// Importance of the input linear `id` reads.
    pub fn get(&self, id: LinearId) -> Option<&[f32]> {
        self.0.get(&LinearId::new(id.layer, Block::shared_input(id.role))).map(|v| v.as_slice())
    }
}

/// Share of `w`'s values whose z-score (against `w`'s own mean and standard deviation) exceeds 1.
pub fn z_share(w: &[f32]) -> f64 {
    let n = w.len().max(1) as f64;
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    if var <= 0.0 {
        return 0.0;
    }
    let sd = var.sqrt();
    w.iter().filter(|&&x| ((x as f64 - mean) / sd).abs() > 1.0).count() as f64 / n
}

/// Per-layer scores: `raw` as the method defines it, `rank_key` higher = more important.
#[derive(Debug, Clone, Serialize)]
pub struct LayerScores {
    pub importance: Importance,
    pub raw: Vec<f64>,
    #[serde(skip)]
    pub rank_key: Vec<f64>,
}

impl LayerScores {
    /// Scores as the method defines them; the ranking key follows (a smaller outlier share ranks
    /// higher).
    pub fn from_raw(importance: Importance, raw: Vec<f64>) -> Self {
        let rank_key = match importance {
            Importance::Outliers => raw.iter().map(|v| -v).collect(),
            _ => raw.clone(),
        };
        Self { importance, raw, rank_key }
    }
}

/// Scores every block by `importance` on `windows` (`outliers` needs none). `kld` quantizes one
/// block at a time to the lowest rung (with `imatrix` when given) and runs only that block and
/// the ones after it from cached dense inputs.
pub fn score_layers(model: &mut Llama, windows: &[Vec<u32>], importance: Importance, imatrix: Option<&Imatrix>, progress: &mut dyn FnMut(usize, usize)) -> Result<LayerScores> {
    let n = model.blocks.len();
    let raw = match importance {
        Importance::Lim => block_influence(model, windows, Part::Block)?,
        Importance::Outliers => {
            let mut v = Vec::with_capacity(n);
            for b in &model.blocks {
                let (mut s, mut c) = (0.0, 0usize);
                for (_, lin) in b.linears() {
                    if lin.weight.elem_count() == 0 {
                        continue;
                    }
                    let x: Vec<f32> = lin.weight_f32()?.flatten_all()?.to_vec1()?;
                    s += z_share(&x) * x.len() as f64;
                    c += x.len();
                }
                v.push(s / c.max(1) as f64);
            }
            v
        }
        Importance::Kld => kld_scores(model, windows, imatrix, progress)?,
    };
    Ok(LayerScores::from_raw(importance, raw))
}

fn kld_scores(model: &mut Llama, windows: &[Vec<u32>], imatrix: Option<&Imatrix>, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<f64>> {
    if windows.is_empty() {
        bail!("kld importance needs calibration windows");
    }
    let n = model.blocks.len();
    let dense = BlockInputs::collect(model, windows)?;
    let mut out = Vec::with_capacity(n);
    for l in 0..n {
        let saved = model.blocks[l].clone();
        for (role, lin) in model.blocks[l].linears_mut() {
            if lin.weight.elem_count() == 0 {
                continue;
            }
            let (rows, cols) = lin.weight.dims2()?;
            let w: Vec<f32> = lin.weight_f32()?.flatten_all()?.to_vec1()?;
            let q = roundtrip(&w, rows, cols, rung_type(0, cols), imatrix.and_then(|im| im.get(LinearId::new(l, role))))?;
            lin.set_weight(Tensor::from_vec(q, (rows, cols), lin.weight.device())?);
        }
        let mut acc = Acc::default();
        for (wi, w) in windows.iter().enumerate() {
            let h = dense.run_from(model, l, wi)?;
            // The head is untouched, so the model serves as its own reference for it.
            let (a, _) = score_window(model, &h, Some((model, &dense.finals()[wi])), w)?;
            acc = acc.add(a);
        }
        model.blocks[l] = saved;
        out.push(acc.kl / acc.n.max(1) as f64);
        progress(l + 1, n);
    }
    Ok(out)
}

/// llama.cpp's `general.file_type` for a file mostly of type `t`.
fn llama_file_type(t: QType) -> u32 {
    match t {
        QType::F16 => 1,
        QType::Q4_0 => 2,
        QType::Q4_1 => 3,
        QType::Q8_0 => 7,
        QType::Q5_0 => 8,
        QType::Q5_1 => 9,
        QType::Q2K => 10,
        QType::Q3K => 12,
        QType::Q4K => 15,
        QType::Q5K => 17,
        QType::Q6K => 18,
    }
}

/// What was written, read back from the file.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub file_bytes: u64,
    /// Bits per weight of the block linears as stored in the file.
    pub bpw_in_file: f64,
    /// Bytes per GGUF type over all tensors.
    pub bytes_by_type: BTreeMap<String, u64>,
}

/// Writes `model` as GGUF with each block linear typed as in `units` (quantized with `imatrix`
/// when given), the embedding (and an untied head) as `embed`, norms as F32; then reads the file
/// back and reports the block linears' bits per weight as stored.
pub fn write(loaded: &LoadedModel, model: &Llama, units: &[Unit], imatrix: Option<&Imatrix>, embed: QType, path: &Path, extra: &BTreeMap<String, Value>) -> Result<Written> {
    let by_name: BTreeMap<String, &Unit> = units.iter().map(|u| (u.hf_name(), u)).collect();
    let mut weight_by_type: BTreeMap<QType, usize> = BTreeMap::new();
    for u in units {
        *weight_by_type.entry(u.ty).or_default() += u.elems();
    }
    let dominant = weight_by_type.iter().max_by_key(|(_, n)| **n).map(|(t, _)| *t).unwrap_or(QType::F16);
    let mut encode = |gname: &str, t: &Tensor| -> Result<TensorOut> {
        let hf = gguf_to_hf_name(model.config.arch, gname).unwrap_or_default();
        let shape = t.dims().to_vec();
        let ty = if let Some(u) = by_name.get(&hf) {
            if shape != [u.rows, u.cols] {
                bail!("planned as {} × {}, the model has {:?}", u.rows, u.cols, shape);
            }
            Some((u.ty, imatrix.and_then(|im| im.get(u.id()))))
        } else if t.rank() == 2 && (hf == "model.embed_tokens.weight" || hf == "lm_head.weight") {
            Some((embed.for_cols(shape[1]).with_context(|| format!("{} does not fit rows of {}", embed.name(), shape[1]))?, None))
        } else {
            None
        };
        match ty {
            Some((ty, im)) => {
                let (rows, cols) = t.dims2()?;
                let data = crate::model::kernels::with_f32_slice(t, |w| quantize_matrix(w, rows, cols, ty, im))??;
                Ok(TensorOut { name: gname.to_string(), shape, dtype: ty.ggml(), data })
            }
            None => TensorOut::from_tensor(gname, t, if t.rank() == 1 { WriteDType::F32 } else { WriteDType::F16 }),
        }
    };
    save_gguf_encoded(model, &loaded.tokenizer_meta, &loaded.name, path, llama_file_type(dominant), extra, false, &mut encode)?;
    let g = GgufFile::open(path)?;
    let (mut bits, mut elems) = (0u64, 0u64);
    let mut bytes_by_type = BTreeMap::new();
    for info in &g.tensors {
        *bytes_by_type.entry(gguf::ggml_dtype_name(info.dtype).to_string()).or_insert(0) += info.n_bytes;
        if gguf_to_hf_name(model.config.arch, &info.name).is_some_and(|h| by_name.contains_key(&h)) {
            bits += 8 * info.n_bytes;
            elems += info.elem_count() as u64;
        }
    }
    Ok(Written { file_bytes: g.file_len(), bpw_in_file: bits as f64 / elems.max(1) as f64, bytes_by_type })
}
