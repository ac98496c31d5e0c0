//! Per-layer diagnostics that guide where to prune: PQ Index (compressibility of the weights),
//! OWL outlier ratio, Block Influence, and activation-norm statistics, plus an SVG/HTML report.

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::calibrate::LinearInputStats;
use crate::model::hooks::BlockCosineStats;
use crate::model::{Hooks, LinearId, Llama, Role};

/// PQ Index of a weight vector (Diao et al., "Pruning Deep Neural Networks from a Sparsity
/// Perspective"): `I(w) = 1 − d^{1/q − 1/p} ‖w‖_p / ‖w‖_q` for 0 < p < q. 0 for a flat vector,
/// approaching 1 as the mass concentrates on few weights (more compressible).
pub fn pq_index(w: &[f32], p: f64, q: f64) -> f64 {
    let d = w.len() as f64;
    let (mut sp, mut sq) = (0f64, 0f64);
    for &x in w {
        let a = (x as f64).abs();
        sp += a.powf(p);
        sq += a.powf(q);
    }
    if sq == 0.0 {
        return 0.0;
    }
    1.0 - d.powf(1.0 / q - 1.0 / p) * sp.powf(1.0 / p) / sq.powf(1.0 / q)
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerAnalysis {
    pub layer: usize,
    /// PQ Index (p = 1, q = 2) of all the block's linear weights together.
    pub pq_index: f64,
    /// PQ Index of each linear layer, in q, k, v, o, gate, up, down order.
    pub pq_index_by_matrix: Vec<f64>,
    /// OWL outlier ratio: share of Wanda scores |W|·‖X‖ above 5 × the block's mean.
    pub outlier_ratio: f64,
    /// 1 − mean cos(h_in, h_out) over calibration tokens.
    pub block_influence: f64,
    /// ‖X_j‖ (RMS over tokens) of the attention input channels: mean, max, and max / median.
    pub act_norm_mean: f64,
    pub act_norm_max: f64,
    pub act_norm_max_over_median: f64,
}

/// One hook pass collecting input norms and block cosines together.
#[derive(Default)]
struct AnalyzeHooks {
    norms: LinearInputStats,
    cos: BlockCosineStats,
}

impl Hooks for AnalyzeHooks {
    fn block_input(&mut self, layer: usize, h: &Tensor) -> Result<()> {
        self.cos.block_input(layer, h)
    }
    fn block_output(&mut self, layer: usize, h: &Tensor) -> Result<Option<Tensor>> {
        self.cos.block_output(layer, h)
    }
    fn linear_input(&mut self, id: LinearId, x: &Tensor) -> Result<Option<Tensor>> {
        self.norms.linear_input(id, x)
    }
}

/// Runs the calibration windows through the model (one window at a time) and analyzes every block.
pub fn analyze(model: &Llama, windows: &[Vec<u32>], progress: &mut dyn FnMut(usize)) -> Result<Vec<LayerAnalysis>> {
    let mut hooks = AnalyzeHooks::default();
    for (i, w) in windows.iter().enumerate() {
        let ids = Tensor::new(w.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        model.forward_hidden(&ids, &mut hooks)?;
        progress(i + 1);
    }
    let bi = hooks.cos.block_influence();
    let mut out = Vec::with_capacity(model.blocks.len());
    for (layer, b) in model.blocks.iter().enumerate() {
        let mut all = Vec::new();
        let mut pq_by = Vec::new();
        let mut scores = Vec::new();
        for (role, lin) in b.linears() {
            let w: Vec<f32> = lin.weight_f32()?.flatten_all()?.to_vec1()?;
            pq_by.push(pq_index(&w, 1.0, 2.0));
            let cols = lin.in_features();
            if let Some(n) = hooks.norms.get(LinearId::new(layer, role)).map(|st| st.norms()) {
                scores.extend(w.chunks(cols).flat_map(|row| row.iter().zip(&n).map(|(x, s)| x.abs() as f64 * s)));
            }
            all.extend(w);
        }
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        let outlier_ratio = scores.iter().filter(|&&s| s > 5.0 * mean).count() as f64 / scores.len().max(1) as f64;
        let attn_input = hooks.norms.get(LinearId::new(layer, Role::Q));
        let mut act: Vec<f64> = attn_input.map(|st| st.norms().iter().map(|n| n / (st.tokens.max(1) as f64).sqrt()).collect()).unwrap_or_default();
        act.sort_by(|a, b| a.total_cmp(b));
        let median = act.get(act.len() / 2).copied().unwrap_or(0.0);
        let max = act.last().copied().unwrap_or(0.0);
        out.push(LayerAnalysis {
            layer,
            pq_index: pq_index(&all, 1.0, 2.0),
            pq_index_by_matrix: pq_by,
            outlier_ratio,
            block_influence: bi.get(layer).copied().unwrap_or(f64::NAN),
            act_norm_mean: act.iter().sum::<f64>() / act.len().max(1) as f64,
            act_norm_max: max,
            act_norm_max_over_median: if median > 0.0 { max / median } else { f64::NAN },
        });
    }
    Ok(out)
}

/// One line chart of `values` across depth, as an SVG fragment.
pub(crate) fn svg_chart(title: &str, values: &[f64]) -> String {
    let (w, h, pad) = (520.0, 200.0, 40.0);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(lo + 1e-12);
    let n = values.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / (hi - lo);
    let pts: Vec<String> = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
    let dots: String = values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\"><title>layer {i}: {v:.4}</title></circle>", x(i), y(v)))
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
<text x=\"{pad}\" y=\"20\" font-family=\"sans-serif\" font-size=\"14\">{title}</text>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#888\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#888\"/>\
<text x=\"{pad}\" y=\"{lb}\" font-family=\"sans-serif\" font-size=\"10\">layer 0</text>\
<text x=\"{rl}\" y=\"{lb}\" font-family=\"sans-serif\" font-size=\"10\">layer {last}</text>\
<text x=\"2\" y=\"{ty}\" font-family=\"sans-serif\" font-size=\"10\">{hi:.3}</text><text x=\"2\" y=\"{b}\" font-family=\"sans-serif\" font-size=\"10\">{lo:.3}</text>\
<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/><g fill=\"#1f77b4\">{dots}</g></svg>",
        pts.join(" "),
        b = h - pad,
        r = w - pad,
        lb = h - pad + 15.0,
        rl = w - pad - 40.0,
        ty = pad + 4.0,
        last = values.len().saturating_sub(1),
    )
}

/// An HTML page with one chart per metric across depth and the full table.
pub fn html_report(model_name: &str, rows: &[LayerAnalysis], calib: &str) -> String {
    let series: [(&str, Vec<f64>); 5] = [
        ("PQ Index (p=1, q=2) of the block's weights", rows.iter().map(|r| r.pq_index).collect()),
        ("OWL outlier ratio (Wanda scores > 5× mean)", rows.iter().map(|r| r.outlier_ratio).collect()),
        ("Block Influence 1 − cos(h_in, h_out)", rows.iter().map(|r| r.block_influence).collect()),
        ("attention-input channel RMS: max / median", rows.iter().map(|r| r.act_norm_max_over_median).collect()),
        ("attention-input channel RMS: mean", rows.iter().map(|r| r.act_norm_mean).collect()),
    ];
    let charts: String = series.iter().map(|(t, v)| svg_chart(t, v)).collect::<Vec<_>>().join("\n");
    let table: String = rows
        .iter()
        .map(|r| {
            format!(
                "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.3}</td><td>{:.3}</td><td>{:.1}</td></tr>",
                r.layer, r.pq_index, r.outlier_ratio, r.block_influence, r.act_norm_mean, r.act_norm_max, r.act_norm_max_over_median
            )
        })
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>dropwise analyze: {model_name}</title>\
<style>body{{font-family:sans-serif;margin:2em}} svg{{margin:0.5em;border:1px solid #eee}} td,th{{padding:2px 8px;text-align:right}}</style></head><body>\
<h1>dropwise analyze</h1><p>model: {model_name}<br>calibration: {calib}</p>{charts}\
<table><tr><th>layer</th><th>PQ Index</th><th>outlier ratio</th><th>Block Influence</th><th>act RMS mean</th><th>act RMS max</th><th>max/median</th></tr>{table}</table></body></html>"
    )
}
