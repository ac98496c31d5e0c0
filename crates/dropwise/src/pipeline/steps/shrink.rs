//! `shrink`: remove attention heads and MLP neurons; tensors become physically smaller.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::formats::gguf::Value;
use crate::pipeline::options::{Opt, Options};
use crate::pipeline::{calibration_json, calibration_metadata, CalibSpec, Progress, Session, Step, StepReport};
use crate::structural::width::{self, HeadUnit, Importance, ShrinkOptions, WidthAllocation};

pub struct ShrinkStep {
    pub opts: ShrinkOptions,
    pub calib: CalibSpec,
}

pub const DEFAULT_WINDOWS: usize = 8;

fn lower(d: impl std::fmt::Debug) -> String {
    format!("{d:?}").to_lowercase()
}

impl ShrinkStep {
    pub fn from_recipe(o: &mut Options, calib: CalibSpec) -> Result<Self> {
        let heads = o.number("heads")?.unwrap_or(0.0);
        let neurons = o.number("neurons")?.unwrap_or(0.0);
        let importance = o.string("importance")?.unwrap_or_else(|| "activation".into());
        let importance = o.at("importance", Importance::parse(&importance))?;
        let allocation = o.string("allocation")?.unwrap_or_else(|| "uniform".into());
        let allocation = o.at("allocation", WidthAllocation::parse(&allocation))?;
        let head_unit = o.string("head_unit")?.unwrap_or_else(|| "query".into());
        let head_unit = o.at("head_unit", HeadUnit::parse(&head_unit))?;
        let neuron_multiple = o.count("neuron_multiple")?.unwrap_or(32);
        let opts = ShrinkOptions { heads, neurons, importance, allocation, head_unit, neuron_multiple };
        o.at(if o.has("neurons") { "neurons" } else { "heads" }, width::check_options(&opts))?;
        Ok(Self { opts, calib })
    }
}

impl Step for ShrinkStep {
    fn kind(&self) -> &'static str {
        "shrink"
    }

    fn calibration(&self) -> Option<&CalibSpec> {
        (self.opts.importance != Importance::Magnitude).then_some(&self.calib)
    }

    fn options(&self) -> Vec<(&'static str, Opt)> {
        let o = &self.opts;
        vec![
            ("heads", Opt::Num(o.heads)),
            ("neurons", Opt::Num(o.neurons)),
            ("importance", Opt::Str(lower(o.importance))),
            ("allocation", Opt::Str(lower(o.allocation))),
            ("head_unit", Opt::Str(lower(o.head_unit))),
            ("neuron_multiple", Opt::Int(o.neuron_multiple as u64)),
        ]
    }

    fn apply(&self, s: &mut Session, _progress: &mut dyn Progress) -> Result<StepReport> {
        let opts = &self.opts;
        let (offsets, windows) = if self.calibration().is_some() { s.calibration(&self.calib, "shrink")? } else { (Vec::new(), Vec::new()) };
        let report = width::shrink(&mut s.loaded.model, &windows, opts)?;
        let mut meta = BTreeMap::new();
        meta.insert("dropwise.shrink.importance".to_string(), Value::String(lower(opts.importance)));
        meta.insert("dropwise.shrink.allocation".to_string(), Value::String(lower(opts.allocation)));
        meta.insert("dropwise.shrink.heads".to_string(), Value::F32(opts.heads as f32));
        meta.insert("dropwise.shrink.neurons".to_string(), Value::F32(opts.neurons as f32));
        if self.calibration().is_some() {
            calibration_metadata(&mut meta, &self.calib, &offsets);
        }
        let m = &s.loaded.model;
        let shapes = (0..m.blocks.len())
            .map(|i| {
                let s = m.layer_shape(i);
                format!("{}/{}/{}", s.heads, s.kv_heads, s.ffn)
            })
            .collect::<Vec<_>>()
            .join(" ");
        let lines = vec![
            format!(
                "{:<22} heads {:.1} %, neurons {:.1} % ({:?} importance, {:?} allocation, {:?} head units)",
                "removed",
                100.0 * report.heads_removed,
                100.0 * report.neurons_removed,
                opts.importance,
                opts.allocation,
                opts.head_unit
            ),
            format!("{:<22} {shapes}", "heads/kv/ffn by layer"),
        ];
        let per_layer = vec![
            ("query heads kept".to_string(), report.after.iter().map(|s| s.heads as f64).collect()),
            ("MLP neurons kept".to_string(), report.after.iter().map(|s| s.ffn as f64).collect()),
        ];
        let mut json = serde_json::to_value(&report)?;
        json["calibration"] = calibration_json(&self.calib, windows.len(), &offsets);
        Ok(StepReport { json, lines, metadata: meta, per_layer })
    }
}
