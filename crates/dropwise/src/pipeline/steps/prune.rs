//! `prune`: magnitude, Wanda or SparseGPT; unstructured or N:M; uniform, OWL or rd allocation.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::formats::gguf::Value;
use crate::pipeline::options::{Opt, Options};
use crate::pipeline::{calibration_json, calibration_metadata, CalibSpec, Progress, Session, Step, StepReport};
use crate::prune::{self, Allocation, Method, Pattern, PruneOptions};

pub struct PruneStep {
    pub method: Method,
    /// `Some(s)`: unstructured at sparsity s; else `nm`.
    pub sparsity: Option<f64>,
    pub nm: Option<String>,
    pub allocation: Allocation,
    pub one_shot: bool,
    pub calib: CalibSpec,
}

/// Calibration windows prune draws by default.
pub const DEFAULT_WINDOWS: usize = 64;

impl PruneStep {
    /// Checks the options as the command line and a recipe give them.
    pub fn new(method: &str, sparsity: Option<f64>, pattern: Option<String>, allocation: &str, one_shot: bool, calib: CalibSpec) -> Result<Self> {
        let s = Self { method: Method::parse(method)?, sparsity, nm: pattern, allocation: Allocation::parse(allocation)?, one_shot, calib };
        s.pattern()?;
        Ok(s)
    }

    pub fn pattern(&self) -> Result<Pattern> {
        match (self.sparsity, &self.nm) {
            (Some(s), None) => Pattern::unstructured(s),
            (None, Some(p)) => Pattern::parse_nm(p),
            _ => bail!("give either --sparsity S or --pattern N:M"),
        }
    }

    fn needs_calibration(&self) -> bool {
        self.method != Method::Magnitude || self.allocation != Allocation::Uniform
    }

    pub fn from_recipe(o: &mut Options, calib: CalibSpec) -> Result<Self> {
        let method = o.string("method")?.unwrap_or_else(|| "wanda".into());
        let sparsity = o.number("sparsity")?;
        let pattern = o.string("pattern")?;
        if sparsity.is_some() == pattern.is_some() {
            return Err(o.table_error("give either sparsity = S or pattern = \"N:M\""));
        }
        let allocation = o.string("allocation")?.unwrap_or_else(|| "uniform".into());
        let one_shot = o.boolean("one_shot")?.unwrap_or(false);
        let key = if sparsity.is_some() { "sparsity" } else { "pattern" };
        let method_check = Method::parse(&method);
        o.at("method", method_check)?;
        o.at("allocation", Allocation::parse(&allocation))?;
        o.at(key, Self::new(&method, sparsity, pattern, &allocation, one_shot, calib))
    }
}

fn allocation_name(a: Allocation) -> &'static str {
    match a {
        Allocation::Uniform => "uniform",
        Allocation::Owl => "owl",
        Allocation::Rd => "rd",
    }
}

impl Step for PruneStep {
    fn kind(&self) -> &'static str {
        "prune"
    }

    fn calibration(&self) -> Option<&CalibSpec> {
        self.needs_calibration().then_some(&self.calib)
    }

    fn options(&self) -> Vec<(&'static str, Opt)> {
        let mut o = vec![("method", Opt::Str(self.method.name().into()))];
        match (self.sparsity, &self.nm) {
            (Some(s), _) => o.push(("sparsity", Opt::Num(s))),
            (None, Some(p)) => o.push(("pattern", Opt::Str(p.clone()))),
            _ => {}
        }
        o.push(("allocation", Opt::Str(allocation_name(self.allocation).into())));
        o.push(("one_shot", Opt::Bool(self.one_shot)));
        o
    }

    fn apply(&self, s: &mut Session, progress: &mut dyn Progress) -> Result<StepReport> {
        let mut opts = PruneOptions::new(self.method, self.pattern()?);
        opts.allocation = self.allocation;
        opts.one_shot = self.one_shot;
        let (offsets, windows) = if self.needs_calibration() { s.calibration(&self.calib, self.method.name())? } else { (Vec::new(), Vec::new()) };
        let blocks = s.loaded.model.blocks.len();
        progress.begin(&format!("prune {}", self.method.name()), "blocks", blocks);
        let report = prune::prune(&mut s.loaded.model, &windows, &opts, &mut |i| progress.update(i, blocks, None))?;
        progress.end();
        let mut meta = BTreeMap::new();
        meta.insert("dropwise.prune.method".to_string(), Value::String(self.method.name().into()));
        meta.insert("dropwise.prune.pattern".to_string(), Value::String(report.pattern.clone()));
        meta.insert("dropwise.prune.allocation".to_string(), Value::String(allocation_name(self.allocation).into()));
        meta.insert("dropwise.prune.one_shot".to_string(), Value::Bool(self.one_shot));
        meta.insert("dropwise.prune.layer_sparsity".to_string(), Value::Array(report.layer_sparsity.iter().map(|&s| Value::F32(s as f32)).collect()));
        meta.insert("dropwise.prune.achieved_sparsity".to_string(), Value::F32(report.achieved_sparsity as f32));
        if self.needs_calibration() {
            calibration_metadata(&mut meta, &self.calib, &offsets);
            meta.insert("dropwise.calib.seq_len".to_string(), Value::U32(self.calib.seq_len as u32));
        }
        let alloc = allocation_name(self.allocation);
        let ls: Vec<String> = report.layer_sparsity.iter().map(|s| format!("{s:.3}")).collect();
        let mut lines = vec![
            format!("{:<22} {} {} ({alloc} allocation{})", "pruned", self.method.name(), report.pattern, if self.one_shot { ", one-shot" } else { "" }),
            format!("{:<22} {:.4} over {} matrices", "achieved sparsity", report.achieved_sparsity, report.matrices.len()),
            format!("{:<22} {}", "layer sparsity", ls.join(" ")),
        ];
        if self.needs_calibration() {
            lines.push(format!("{:<22} {} windows × {} tokens, seed {}", "calibration", windows.len(), self.calib.seq_len, self.calib.seed));
        }
        lines.push(format!(
            "{:<22} allocation {:.1}s, calibrate {:.1}s, prune {:.1}s",
            "time", report.allocation_seconds, report.calibrate_seconds, report.prune_seconds
        ));
        let mut json = serde_json::to_value(&report)?;
        json["calibration"] = calibration_json(&self.calib, windows.len(), &offsets);
        let per_layer = vec![("target sparsity of the block's linears".to_string(), report.layer_sparsity.clone())];
        Ok(StepReport { json, lines, metadata: meta, per_layer })
    }
}
