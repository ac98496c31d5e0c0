//! `drop-layers`: whole blocks, or their attention or MLP sub-blocks, chosen by a metric or listed.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::formats::gguf::Value;
use crate::pipeline::options::{Opt, Options};
use crate::pipeline::{calibration_json, calibration_metadata, CalibSpec, Progress, Session, Step, StepReport, MAX_CALIB_TOKENS};
use crate::structural::learned::Init;
use crate::structural::{self, surgery, LayerMetric, LearnedOptions, Part};

/// How many to drop.
#[derive(Clone, Debug, PartialEq)]
pub enum Which {
    Count(usize),
    Fraction(f64),
    /// Exactly these blocks, no scoring.
    Layers(Vec<usize>),
}

pub struct DropLayersStep {
    pub which: Which,
    pub metric: LayerMetric,
    pub part: Part,
    pub learned: LearnedOptions,
    pub calib: CalibSpec,
}

pub const DEFAULT_WINDOWS: usize = 8;

pub fn metric_name(m: LayerMetric) -> &'static str {
    match m {
        LayerMetric::Bi => "bi",
        LayerMetric::Additive => "additive",
        LayerMetric::Ppl => "ppl",
        LayerMetric::Learned => "learned",
    }
}

fn init_name(i: Init) -> &'static str {
    match i {
        Init::Additive => "additive",
        Init::Uniform => "uniform",
    }
}

pub fn parse_init(s: &str) -> Result<Init> {
    Ok(match s {
        "additive" => Init::Additive,
        "uniform" => Init::Uniform,
        o => bail!("unknown --learn-init '{o}' (supported: additive, uniform)"),
    })
}

/// The learned-depth options' checks (the command line's and a recipe's).
pub fn check_learned(l: &LearnedOptions) -> Result<()> {
    if l.tokens == 0 || l.tokens > MAX_CALIB_TOKENS {
        bail!("--learn-tokens must be in 1..={MAX_CALIB_TOKENS}, not {}", l.tokens);
    }
    if l.lora_rank == 0 || l.lora_rank > 4096 {
        bail!("--learn-lora-rank must be in 1..=4096, not {}", l.lora_rank);
    }
    if !(l.lr.is_finite() && l.lr > 0.0 && l.lr <= 1.0) {
        bail!("--learn-lr must be a number in (0, 1], not {}", l.lr);
    }
    if l.group_size == Some(0) {
        bail!("--group-size must be at least 1");
    }
    Ok(())
}

impl DropLayersStep {
    pub fn new(which: Which, metric: LayerMetric, part: Part, learned: LearnedOptions, calib: CalibSpec) -> Result<Self> {
        if let Which::Fraction(f) = which {
            if !(f > 0.0 && f < 1.0) {
                bail!("--fraction must be in (0, 1), got {f}");
            }
        }
        check_learned(&learned)?;
        Ok(Self { which, metric, part, learned, calib })
    }

    pub fn from_recipe(o: &mut Options, calib: CalibSpec) -> Result<Self> {
        let count = o.count("count")?;
        let fraction = o.number("fraction")?;
        let layers = o.naturals("layers")?;
        let which = match (count, fraction, layers) {
            (Some(c), None, None) => Which::Count(c),
            (None, Some(f), None) => Which::Fraction(f),
            (None, None, Some(l)) => Which::Layers(l),
            _ => return Err(o.table_error("give one of count, fraction or layers")),
        };
        let metric = o.string("metric")?.unwrap_or_else(|| "additive".into());
        let metric = o.at("metric", LayerMetric::parse(&metric))?;
        let part = o.string("part")?.unwrap_or_else(|| "block".into());
        let part = o.at("part", Part::parse(&part))?;
        let group_size = o.count("group_size")?;
        let tokens = o.count("learn_tokens")?.unwrap_or(16384);
        let lora_rank = o.count("learn_lora_rank")?.unwrap_or(8);
        let lr = o.number("learn_lr")?.unwrap_or(5e-4);
        let init = o.string("learn_init")?.unwrap_or_else(|| "additive".into());
        let init = o.at("learn_init", parse_init(&init))?;
        let learned = LearnedOptions { group_size, tokens, lora_rank, lr, seed: calib.seed, init };
        let key = if o.has("fraction") { "fraction" } else { "metric" };
        o.at(key, Self::new(which, metric, part, learned, calib))
    }

    fn scored(&self) -> bool {
        !matches!(self.which, Which::Layers(_))
    }
}

impl Step for DropLayersStep {
    fn kind(&self) -> &'static str {
        "drop-layers"
    }

    fn calibration(&self) -> Option<&CalibSpec> {
        self.scored().then_some(&self.calib)
    }

    fn trains(&self) -> bool {
        self.scored() && self.metric == LayerMetric::Learned
    }

    fn options(&self) -> Vec<(&'static str, Opt)> {
        let mut o = vec![match &self.which {
            Which::Count(c) => ("count", Opt::Int(*c as u64)),
            Which::Fraction(f) => ("fraction", Opt::Num(*f)),
            Which::Layers(l) => ("layers", Opt::Ints(l.clone())),
        }];
        o.push(("part", Opt::Str(self.part.name().into())));
        if self.scored() {
            o.push(("metric", Opt::Str(metric_name(self.metric).into())));
            if self.metric == LayerMetric::Learned {
                let l = &self.learned;
                if let Some(g) = l.group_size {
                    o.push(("group_size", Opt::Int(g as u64)));
                }
                o.push(("learn_tokens", Opt::Int(l.tokens as u64)));
                o.push(("learn_lora_rank", Opt::Int(l.lora_rank as u64)));
                o.push(("learn_lr", Opt::Num(l.lr)));
                o.push(("learn_init", Opt::Str(init_name(l.init).into())));
            }
        }
        o
    }

    fn apply(&self, s: &mut Session, progress: &mut dyn Progress) -> Result<StepReport> {
        let n = s.loaded.model.blocks.len();
        let mut meta = BTreeMap::new();
        let mut json = serde_json::json!({});
        let mut lines = Vec::new();
        let chosen = match &self.which {
            Which::Layers(list) => {
                surgery::remove(&mut s.loaded.model, list, self.part)?;
                list.clone()
            }
            which => {
                let count = match which {
                    Which::Count(c) => *c,
                    Which::Fraction(f) => (f * n as f64).round() as usize,
                    Which::Layers(_) => unreachable!(),
                };
                let (offsets, windows) = s.calibration(&self.calib, "drop-layers")?;
                progress.begin(&format!("drop-layers {:?}", self.metric), "candidates", 1);
                let plan = structural::plan_layers_with(&s.loaded.model, &windows, self.metric, self.part, count, &self.learned, &mut |i, total| {
                    progress.update(i, total, None)
                })?;
                progress.end();
                surgery::remove(&mut s.loaded.model, &plan.layers, self.part)?;
                calibration_metadata(&mut meta, &self.calib, &offsets);
                json = serde_json::to_value(&plan)?;
                json["calibration"] = calibration_json(&self.calib, windows.len(), &offsets);
                plan.layers
            }
        };
        meta.insert("dropwise.drop.part".to_string(), Value::String(self.part.name().into()));
        let metric = if self.scored() { metric_name(self.metric) } else { "list" };
        meta.insert("dropwise.drop.metric".to_string(), Value::String(metric.into()));
        meta.insert("dropwise.drop.layers".to_string(), Value::Array(chosen.iter().map(|&l| Value::U32(l as u32)).collect()));
        json["part"] = self.part.name().into();
        json["layers"] = serde_json::json!(chosen);
        let what = match self.part {
            Part::Block => "blocks",
            Part::Attn => "attention sub-blocks of blocks",
            Part::Mlp => "MLP sub-blocks of blocks",
        };
        let mut sorted = chosen.clone();
        sorted.sort_unstable();
        lines.push(format!("{:<22} {} {what} {:?}", "dropped", sorted.len(), sorted));
        if self.scored() {
            lines.push(format!("{:<22} {:?}", "metric", self.metric));
            if let Some(scores) = json["scores"].as_array() {
                let txt: Vec<String> = scores.iter().map(|s| s.as_f64().map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())).collect();
                lines.push(format!("{:<22} {}", "score per block", txt.join(" ")));
            }
            if let Some(p) = json["predicted_kl"].as_f64() {
                lines.push(format!("{:<22} {:.4} (sum of single removals)", "predicted KL", p));
            }
            lines.push(format!("{:<22} {:.4} (calibration windows)", "measured KL", json["measured_kl"].as_f64().unwrap_or(f64::NAN)));
            lines.push(format!(
                "{:<22} {:.3} -> {:.3}",
                "calibration ppl",
                json["dense_calib_ppl"].as_f64().unwrap_or(f64::NAN),
                json["calib_ppl"].as_f64().unwrap_or(f64::NAN)
            ));
        }
        let mut per_layer = vec![(format!("{} removed (1) or kept (0)", self.part.name()), (0..n).map(|l| if chosen.contains(&l) { 1.0 } else { 0.0 }).collect())];
        if let Some(scores) = json["scores"].as_array() {
            per_layer.push((format!("{} score", metric_name(self.metric)), scores.iter().map(|s| s.as_f64().unwrap_or(f64::NAN)).collect()));
        }
        Ok(StepReport { json, lines, metadata: meta, per_layer })
    }
}
