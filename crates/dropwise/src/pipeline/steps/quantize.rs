//! `quantize`: GGUF block types per tensor at a bits-per-weight budget, bits allocated by layer
//! importance, or one uniform type. It decides how the output is encoded, so it comes last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::formats::gguf::Value;
use crate::pipeline::options::{Opt, Options};
use crate::pipeline::{calibration_json, calibration_metadata, CalibSpec, Encoding, Progress, Session, Step, StepReport};
use crate::quant::plan::{self, Importance, LayerScores};
use crate::quant::QType;

pub struct QuantizeStep {
    /// `Some`: a budget in bits per weight of the block linears; else `uniform`.
    pub bpw: Option<f64>,
    pub uniform: Option<QType>,
    pub importance: Importance,
    pub imatrix: bool,
    pub embed: QType,
    /// Layer scores from an earlier `quantize --json` output instead of measuring them.
    pub reuse_scores: Option<PathBuf>,
    pub calib: CalibSpec,
}

pub const DEFAULT_WINDOWS: usize = 8;

fn importance_name(i: Importance) -> String {
    format!("{i:?}").to_lowercase()
}

impl QuantizeStep {
    pub fn new(bpw: Option<f64>, importance: &str, imatrix: bool, uniform: Option<&str>, embed: &str, reuse_scores: Option<PathBuf>, calib: CalibSpec) -> Result<Self> {
        let embed = QType::parse(embed)?;
        let importance = Importance::parse(importance)?;
        let uniform = uniform.map(QType::parse).transpose()?;
        match (bpw, uniform) {
            (Some(_), Some(_)) => bail!("--bpw and --uniform are alternatives; give one"),
            (None, None) => bail!("give a budget (--bpw B) or one type (--uniform TYPE)"),
            _ => {}
        }
        Ok(Self { bpw, uniform, importance, imatrix, embed, reuse_scores, calib })
    }

    pub fn from_recipe(o: &mut Options, calib: CalibSpec) -> Result<Self> {
        let bpw = o.number("bpw")?;
        let uniform = o.string("uniform")?;
        let importance = o.string("importance")?.unwrap_or_else(|| "lim".into());
        o.at("importance", Importance::parse(&importance))?;
        let imatrix = o.boolean("imatrix")?.unwrap_or(false);
        let embed = o.string("embed_type")?.unwrap_or_else(|| "Q8_0".into());
        o.at("embed_type", QType::parse(&embed))?;
        let reuse = o.paths("reuse_scores")?.and_then(|mut v| (v.len() == 1).then(|| v.remove(0)));
        if let Some(u) = &uniform {
            o.at("uniform", QType::parse(u))?;
        }
        if bpw.is_some() == uniform.is_some() {
            return Err(o.table_error("give a budget (bpw = B) or one type (uniform = \"TYPE\")"));
        }
        o.at("bpw", Self::new(bpw, &importance, imatrix, uniform.as_deref(), &embed, reuse, calib))
    }

    fn needs_windows(&self) -> bool {
        self.imatrix || (self.bpw.is_some() && self.importance != Importance::Outliers && self.reuse_scores.is_none())
    }
}

/// Layer scores from an earlier `quantize --json` run, checked to describe the same model,
/// importance and imatrix setting.
fn reused_scores(path: &Path, model: &Path, importance: Importance, imatrix: bool, layers: usize) -> Result<LayerScores> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not a quantize --json output", path.display()))?;
    let want = serde_json::to_value(importance)?;
    if v["importance"] != want || v["imatrix"] != serde_json::Value::Bool(imatrix) {
        bail!("{} holds {} scores (imatrix {}), not {} (imatrix {imatrix})", path.display(), v["importance"], v["imatrix"], want);
    }
    if v["model"].as_str().map(Path::new) != Some(model) {
        bail!("{} was scored on {}, not {}", path.display(), v["model"], model.display());
    }
    let raw: Vec<f64> = serde_json::from_value(v["layer_scores"].clone()).with_context(|| format!("{} has no layer_scores", path.display()))?;
    if raw.len() != layers {
        bail!("{} scores {} layers; the model has {layers}", path.display(), raw.len());
    }
    Ok(LayerScores::from_raw(importance, raw))
}

impl Step for QuantizeStep {
    fn kind(&self) -> &'static str {
        "quantize"
    }

    fn calibration(&self) -> Option<&CalibSpec> {
        self.needs_windows().then_some(&self.calib)
    }

    fn encodes_output(&self) -> bool {
        true
    }

    fn options(&self) -> Vec<(&'static str, Opt)> {
        let mut o = Vec::new();
        match (self.bpw, self.uniform) {
            (Some(b), _) => {
                o.push(("bpw", Opt::Num(b)));
                o.push(("importance", Opt::Str(importance_name(self.importance))));
            }
            (None, Some(t)) => o.push(("uniform", Opt::Str(t.name().into()))),
            _ => {}
        }
        o.push(("imatrix", Opt::Bool(self.imatrix)));
        o.push(("embed_type", Opt::Str(self.embed.name().into())));
        if let Some(p) = &self.reuse_scores {
            o.push(("reuse_scores", Opt::Paths(vec![p.clone()])));
        }
        o
    }

    fn apply(&self, s: &mut Session, progress: &mut dyn Progress) -> Result<StepReport> {
        let t0 = std::time::Instant::now();
        let mut units = plan::units(&s.loaded.model)?;
        let (lo, hi) = plan::feasible_range(&units);
        if let Some(b) = self.bpw {
            // Refuse an impossible budget before any calibration work.
            plan::check_budget(&units, b)?;
        }
        let (offsets, windows) = if self.needs_windows() { s.calibration(&self.calib, "quantize (imatrix, lim and kld)")? } else { (Vec::new(), Vec::new()) };
        let imatrix = if self.imatrix {
            progress.begin("imatrix", "windows", windows.len());
            let im = plan::Imatrix::collect(&s.loaded.model, &windows, &mut |i| progress.update(i, windows.len(), None))?;
            progress.end();
            Some(im)
        } else {
            None
        };
        let calib_s = t0.elapsed().as_secs_f64();
        let layers = s.loaded.model.blocks.len();
        let scores = match (self.bpw, self.uniform) {
            (Some(b), None) => {
                let sc = match &self.reuse_scores {
                    Some(p) => reused_scores(p, &s.loaded.path, self.importance, self.imatrix, layers)?,
                    None => {
                        progress.begin("importance", "layers", layers);
                        let sc = plan::score_layers(&mut s.loaded.model, &windows, self.importance, imatrix.as_ref(), &mut |i, _| progress.update(i, layers, None))?;
                        progress.end();
                        sc
                    }
                };
                plan::allocate(&mut units, &sc.rank_key, b)?;
                Some(sc)
            }
            (None, Some(t)) => {
                plan::uniform(&mut units, t)?;
                None
            }
            _ => bail!("give a budget (--bpw B) or one type (--uniform TYPE)"),
        };
        let plan_s = t0.elapsed().as_secs_f64() - calib_s;
        let planned = plan::bits_per_weight(&units);
        let layer_types: Vec<String> = (0..layers)
            .map(|l| {
                let mut ts: Vec<&str> = units.iter().filter(|u| u.layer == l).map(|u| u.ty.name()).collect();
                ts.dedup();
                ts.join("/")
            })
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("dropwise.quantize.bpw".to_string(), Value::F32(planned as f32));
        meta.insert("dropwise.quantize.imatrix".to_string(), Value::Bool(self.imatrix));
        let allocation = match (&scores, self.uniform) {
            (Some(sc), _) => importance_name(sc.importance),
            (None, Some(t)) => format!("uniform {}", t.name()),
            _ => unreachable!(),
        };
        meta.insert("dropwise.quantize.allocation".to_string(), Value::String(allocation));
        meta.insert("dropwise.quantize.layer_types".to_string(), Value::Array(layer_types.iter().map(|t| Value::String(t.clone())).collect()));
        if !offsets.is_empty() {
            calibration_metadata(&mut meta, &self.calib, &offsets);
        }
        let mut lines = Vec::new();
        if let Some(sc) = &scores {
            lines.push(format!("{:<6} {:>12} {:>5}  types", "layer", importance_name(sc.importance), "rank"));
            let mut order: Vec<usize> = (0..sc.raw.len()).collect();
            order.sort_by(|&a, &b| sc.rank_key[b].total_cmp(&sc.rank_key[a]).then(a.cmp(&b)));
            let mut rank = vec![0; sc.raw.len()];
            for (r, &l) in order.iter().enumerate() {
                rank[l] = r + 1;
            }
            for (l, t) in layer_types.iter().enumerate() {
                lines.push(format!("{:<6} {:>12.5} {:>5}  {}", l, sc.raw[l], rank[l], t));
            }
        }
        lines.push(format!(
            "{:<22} {:.4} planned (budget {}; feasible {lo:.3}-{hi:.3})",
            "bits per weight",
            planned,
            self.bpw.map(|b| format!("{b}")).unwrap_or_else(|| "uniform".into())
        ));
        lines.push(format!("{:<22} {} (token embedding), imatrix {}", "embedding", self.embed.name(), if self.imatrix { "yes" } else { "no" }));
        lines.push(format!("{:<22} calibrate {:.1}s, plan {:.1}s", "time", calib_s, plan_s));
        let json = serde_json::json!({
            "target_bpw": self.bpw,
            "uniform": self.uniform.map(|t| t.name()),
            "importance": scores.as_ref().map(|s| s.importance),
            "layer_scores": scores.as_ref().map(|s| &s.raw),
            "imatrix": self.imatrix,
            "embed_type": self.embed.name(),
            "feasible_bpw": [lo, hi],
            "planned_bpw": planned,
            "layer_types": layer_types,
            "tensors": units,
            "calibration": calibration_json(&self.calib, windows.len(), &offsets),
            "calibrate_seconds": calib_s,
            "plan_seconds": plan_s,
        });
        let mut per_layer = vec![(
            "bits per weight of the block's linears".to_string(),
            (0..layers)
                .map(|l| {
                    let us: Vec<_> = units.iter().filter(|u| u.layer == l).cloned().collect();
                    plan::bits_per_weight(&us)
                })
                .collect(),
        )];
        if let Some(sc) = &scores {
            per_layer.push((format!("{} importance", importance_name(sc.importance)), sc.raw.clone()));
        }
        s.encoding = Some(Encoding { units, imatrix, embed: self.embed });
        Ok(StepReport { json, lines, metadata: meta, per_layer })
    }
}
