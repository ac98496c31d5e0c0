//! `dropwise train-vit` and `dropwise eval` on a vision model: training a ViT on an IDX image
//! folder (Fashion-MNIST), its test accuracy, and token reduction beside the dense model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use dropwise::model::token_reduction::TokenReduction;
use dropwise::model::vit::Vit;
use dropwise::vision::forget::{self, ForgetSet};
use dropwise::vision::idx::{self, Split};
use dropwise::vision::train::{self, TrainOptions, VitShape};
use dropwise::vision::vit_eval;

/// Fashion-MNIST's class names, in label order.
pub const FASHION_LABELS: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

pub struct TrainVitArgs {
    pub data: PathBuf,
    /// Start from this model (fine-tuning) instead of a fresh one.
    pub init: Option<PathBuf>,
    /// Leave this class's training images out (a class number or name).
    pub exclude_class: Option<String>,
    pub shape: VitShape,
    pub opts: TrainOptions,
    pub out: PathBuf,
    pub json: bool,
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    pb
}

/// The class names for a label set: Fashion-MNIST's when there are ten, else numbers.
fn labels_for(classes: usize) -> Vec<String> {
    if classes == FASHION_LABELS.len() {
        FASHION_LABELS.iter().map(|s| s.to_string()).collect()
    } else {
        (0..classes).map(|i| i.to_string()).collect()
    }
}

pub fn cmd_train_vit(a: TrainVitArgs) -> Result<()> {
    a.opts.check()?;
    if let Some(init) = &a.init {
        dropwise::pipeline::run::refuse_overwrite(init, &a.out)?;
    }
    dropwise::util::probe_writable(&a.out)?;
    crate::recover_cmd::keep_freed_memory();
    let train_set = idx::read_split(&a.data, Split::Train)?;
    let test_set = idx::read_split(&a.data, Split::Test)?;
    if (train_set.rows, train_set.cols) != (test_set.rows, test_set.cols) {
        bail!("train images are {}×{}, test images {}×{}", train_set.rows, train_set.cols, test_set.rows, test_set.cols);
    }
    let classes = train_set.classes().max(test_set.classes());
    if classes < 2 {
        bail!("the labels name fewer than 2 classes");
    }
    let vit = match &a.init {
        Some(dir) => Vit::load(dir)?,
        None => train::new_vit(&train_set, &a.shape, labels_for(classes), a.opts.seed)?,
    };
    let mut train_set = train_set;
    if let Some(c) = &a.exclude_class {
        let class = class_index(&vit, c)?;
        train_set = train_set.filter(|l| l as usize != class);
        if train_set.is_empty() {
            bail!("no training image is left without class {c}");
        }
    }
    let used = a.opts.limit.map_or(train_set.len(), |l| l.min(train_set.len()));
    let steps = used.div_ceil(a.opts.batch) * a.opts.epochs;
    let pb = bar(steps as u64, "train-vit [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, eta {eta} {msg}");
    let mut done = 0u64;
    let (vit, report) = train::train(vit, &train_set, &test_set, &a.opts, &mut |p| {
        done += 1;
        pb.set_position(done);
        pb.set_message(format!("epoch {} loss {:.4}", p.epoch + 1, p.loss));
    })?;
    pb.finish_and_clear();
    vit.save(&a.out)?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["output"] = a.out.display().to_string().into();
        v["options"] = serde_json::json!({
            "epochs": a.opts.epochs, "batch": a.opts.batch, "lr": a.opts.lr, "weight_decay": a.opts.weight_decay,
            "cutmix": a.opts.cutmix, "multi_sample_dropout": a.opts.multi_sample_dropout, "dropout": a.opts.dropout,
            "flip": a.opts.flip, "seed": a.opts.seed,
            "hidden": a.shape.hidden, "layers": a.shape.layers, "heads": a.shape.heads, "intermediate": a.shape.intermediate, "patch": a.shape.patch,
        });
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:>5} {:>9} {:>9} {:>8}", "epoch", "loss", "test acc", "seconds");
    for e in &report.epochs {
        println!("{:>5} {:>9.4} {:>8.2}% {:>8.1}", e.epoch, e.loss, 100.0 * e.test_accuracy, e.seconds);
    }
    println!("{} parameters, {} training images, {:.0} images/s; wrote {}", report.parameters, report.train_images, report.images_per_second, a.out.display());
    Ok(())
}

pub struct EvalVitArgs {
    pub data: Vec<PathBuf>,
    pub reference: Option<PathBuf>,
    pub reduction: TokenReduction,
    pub batch: usize,
    pub limit: Option<usize>,
    /// Search per-layer prune and merge rates for this fraction of the dense FLOPs first.
    pub diffrate: Option<f64>,
    /// Training images the rate search scores on.
    pub calib_images: usize,
    /// Write the test images' logits here (f32, little-endian, images × classes).
    pub logits: Option<PathBuf>,
    pub json: bool,
}

/// A class given by number or by name.
pub fn class_index(vit: &Vit, c: &str) -> Result<usize> {
    let labels = &vit.config.labels;
    if let Ok(i) = c.parse::<usize>() {
        if i < labels.len() {
            return Ok(i);
        }
    }
    if let Some(i) = labels.iter().position(|l| l.eq_ignore_ascii_case(c)) {
        return Ok(i);
    }
    bail!("{c:?} is not one of the model's classes: 0..{} or {}", labels.len(), labels.join(", "))
}

pub struct ForgetArgs {
    pub forget: String,
    pub retain: PathBuf,
    pub alpha: f64,
    pub lambda: f64,
    pub batch: usize,
    /// Keep the two importances here (reused when they are for the same model and class).
    pub importances: Option<PathBuf>,
    pub out: PathBuf,
    pub json: bool,
}

/// Accuracy before or after dampening: for a class, on its test images (`forget`) and the other
/// classes' (`retain`); for a list, on the listed training images, the other training images
/// and the test set.
struct Measured {
    forget: f64,
    retain: f64,
    test: Option<f64>,
}

impl Measured {
    fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"forget_accuracy": self.forget, "retain_accuracy": self.retain});
        if let Some(t) = self.test {
            v["test_accuracy"] = t.into();
        }
        v
    }
}

/// Test accuracy on `class`'s images and on the others'.
fn split_accuracy(vit: &Vit, test: &idx::ImageSet, class: usize) -> Result<(f64, f64)> {
    let a = vit_eval::accuracy(vit, test, 100, &TokenReduction::None)?;
    let (mut right, mut total) = (0.0, 0usize);
    for (k, (&acc, &n)) in a.per_class.iter().zip(&a.class_counts).enumerate() {
        if k != class {
            right += acc * n as f64;
            total += n;
        }
    }
    Ok((a.per_class[class], right / total.max(1) as f64))
}

pub fn cmd_forget(model: &Path, a: ForgetArgs) -> Result<()> {
    if a.batch == 0 || a.batch > 65_536 {
        bail!("--batch must be in 1..=65536, not {}", a.batch);
    }
    // Beyond 1e6 neither selects or scales anything a float can tell apart from no change.
    for (name, v) in [("--alpha", a.alpha), ("--lambda", a.lambda)] {
        if !(v.is_finite() && v > 0.0 && v <= 1e6) {
            bail!("{name} must be in (0, 1e6], not {v}");
        }
    }
    dropwise::pipeline::run::refuse_overwrite(model, &a.out)?;
    dropwise::util::probe_writable(&a.out)?;
    crate::recover_cmd::keep_freed_memory();
    let mut vit = Vit::load(model)?;
    let train_set = idx::read_split(&a.retain, Split::Train)?;
    let test = idx::read_split(&a.retain, Split::Test)?;
    // A value naming an existing file is a list of training images; anything else a class.
    let target = if Path::new(&a.forget).is_file() {
        ForgetSet::Samples(forget::read_sample_list(Path::new(&a.forget), train_set.len())?)
    } else {
        ForgetSet::Class(class_index(&vit, &a.forget).map_err(|e| anyhow::anyhow!("{e}; nor is it a file listing training images"))?)
    };
    let forget_set = target.images(&train_set);
    if forget_set.is_empty() {
        bail!("{} holds no training image of class {}", a.retain.display(), a.forget);
    }
    let measure = |vit: &Vit| -> Result<Measured> {
        Ok(match &target {
            ForgetSet::Class(c) => {
                let (f, r) = split_accuracy(vit, &test, *c)?;
                Measured { forget: f, retain: r, test: None }
            }
            ForgetSet::Samples(_) => Measured {
                forget: vit_eval::accuracy(vit, &forget_set, 100, &TokenReduction::None)?.accuracy,
                // Only a list is measured on the other training images (a class on the test
                // split), so only it gathers them.
                retain: vit_eval::accuracy(vit, &target.others(&train_set), 100, &TokenReduction::None)?.accuracy,
                test: Some(vit_eval::accuracy(vit, &test, 100, &TokenReduction::None)?.accuracy),
            },
        })
    };
    let before = measure(&vit)?;
    let t0 = std::time::Instant::now();
    let cached = match &a.importances {
        Some(p) => forget::load_importances(p, &vit, &target)?,
        None => None,
    };
    let reused = cached.is_some();
    let (i_forget, i_full) = match cached {
        Some(c) => c,
        None => {
            let pb = bar((forget_set.len() + train_set.len()) as u64, "forget [{bar:30}] {pos}/{len} images scored, {elapsed} elapsed, eta {eta}");
            let f = forget::importance(&vit, &forget_set, a.batch, &mut |d| pb.set_position(d as u64))?;
            let nf = forget_set.len() as u64;
            let d = forget::importance(&vit, &train_set, a.batch, &mut |d| pb.set_position(nf + d as u64))?;
            pb.finish_and_clear();
            if let Some(p) = &a.importances {
                forget::save_importances(p, &vit, &target, &f, &d)?;
            }
            (f, d)
        }
    };
    let d = forget::dampen(&mut vit, &i_forget, &i_full, a.alpha, a.lambda)?;
    let seconds = t0.elapsed().as_secs_f64();
    let after = measure(&vit)?;
    vit.save(&a.out)?;
    let mut v = serde_json::json!({
        "model": model.display().to_string(), "output": a.out.display().to_string(),
        "forget_images": forget_set.len(), "train_images": train_set.len(),
        "alpha": d.alpha, "lambda": d.lambda, "parameters": d.parameters, "dampened": d.selected, "mean_scale": d.mean_scale,
        "seconds": seconds, "importances_reused": reused,
        "before": before.json(), "after": after.json(),
        "peak_memory_bytes": dropwise::util::peak_rss_bytes(),
    });
    let what = match &target {
        ForgetSet::Class(c) => {
            v["forget_class"] = (*c).into();
            v["forget_label"] = vit.config.labels[*c].clone().into();
            format!("class {c} ({})", vit.config.labels[*c])
        }
        ForgetSet::Samples(ix) => {
            v["forget_list"] = a.forget.clone().into();
            format!("{} listed training images", ix.len())
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("forget {what}, α {} λ {}: {} of {} parameters dampened (mean scale {:.3}) in {seconds:.1}s", d.alpha, d.lambda, d.selected, d.parameters, d.mean_scale);
    match &target {
        ForgetSet::Class(_) => {
            println!("{:<8} {:>14} {:>16}", "", "forget class", "other classes");
            for (name, m) in [("before", &before), ("after", &after)] {
                println!("{name:<8} {:>13.2}% {:>15.2}%", 100.0 * m.forget, 100.0 * m.retain);
            }
        }
        ForgetSet::Samples(_) => {
            println!("{:<8} {:>14} {:>16} {:>10}", "", "forget images", "other train", "test");
            for (name, m) in [("before", &before), ("after", &after)] {
                println!("{name:<8} {:>13.2}% {:>15.2}% {:>9.2}%", 100.0 * m.forget, 100.0 * m.retain, 100.0 * m.test.unwrap_or(0.0));
            }
        }
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The image folder of `--data` (one folder).
fn image_dir(data: &[PathBuf]) -> Result<&Path> {
    match data {
        [d] => Ok(d),
        _ => bail!("a vision model is evaluated on one image folder: pass --data DIR (IDX files)"),
    }
}

pub fn cmd_eval_vit(models: &[PathBuf], mut a: EvalVitArgs) -> Result<()> {
    if a.batch == 0 || a.batch > 65_536 {
        bail!("--batch must be in 1..=65536, not {}", a.batch);
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.calib_images == 0 || a.calib_images > 60_000 {
        bail!("--calib-images must be in 1..=60000, not {}", a.calib_images);
    }
    let dir = image_dir(&a.data)?.to_path_buf();
    let dir = dir.as_path();
    let vits: Vec<Vit> = models.iter().map(|m| Vit::load(m)).collect::<Result<_>>()?;
    for v in &vits {
        a.reduction.check(v.config.num_hidden_layers)?;
    }
    let reference = a.reference.as_deref().map(Vit::load).transpose()?;
    let mut test = idx::read_split(dir, Split::Test)?;
    if let Some(l) = a.limit {
        test.truncate(l);
    }
    let mut search = None;
    if let Some(budget) = a.diffrate {
        if vits.len() != 1 {
            bail!("--diffrate searches rates for one model; pass one model");
        }
        let train_set = idx::read_split(dir, Split::Train)?;
        // A seeded sample of the training images: calibration never sees the test set.
        let calib = train_set.sample(a.calib_images, 0xD1FF);
        let pb = ProgressBar::new_spinner();
        pb.set_message("searching per-layer rates");
        let t0 = std::time::Instant::now();
        let r = vit_eval::search_rates(&vits[0], &calib, budget, 0.05, &mut |n| pb.set_message(format!("searching per-layer rates: {n} schedules scored")))?;
        pb.finish_and_clear();
        a.reduction = r.schedule.clone();
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = t0.elapsed().as_secs_f64().into();
        v["calib_images"] = calib.len().into();
        if !a.json {
            eprintln!("rates for {budget} of the FLOPs ({} schedules scored on {} training images, {:.1}s): {}", r.evaluations, calib.len(), t0.elapsed().as_secs_f64(), r.schedule.name());
        }
        search = Some(v);
    }
    if let Some(out) = &a.logits {
        if vits.len() != 1 {
            bail!("--logits writes one model's logits; pass one model");
        }
        let l = vit_eval::logits(&vits[0], &test, a.batch, &a.reduction)?;
        let bytes: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
        dropwise::util::write_atomically(out, |f| Ok(std::io::Write::write_all(f, &bytes)?))?;
    }
    let mut rows = Vec::new();
    for (vit, path) in vits.iter().zip(models) {
        let pb = bar(test.len() as u64, "eval [{bar:30}] {pos}/{len} images, {elapsed} elapsed, eta {eta}");
        let mut v = if let Some(r) = &reference {
            let c = vit_eval::compare(vit, &a.reduction, r, &test, a.batch, &mut |d| pb.set_position(d as u64))?;
            serde_json::to_value(&c)?
        } else {
            let acc = vit_eval::accuracy(vit, &test, a.batch, &a.reduction)?;
            let mut v = serde_json::to_value(&acc)?;
            v["reduction"] = a.reduction.name().into();
            v
        };
        pb.finish_and_clear();
        v["model"] = path.display().to_string().into();
        v["parameters"] = vit.param_count().into();
        rows.push(v);
    }
    if a.json {
        let mut v = serde_json::json!({"images": test.len(), "results": rows, "rate_search": search});
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let pct = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{:.2}%", 100.0 * x));
    for r in &rows {
        if let Some(acc) = r.get("accuracy").and_then(|x| x.get("accuracy")) {
            let rf = &r["reference"];
            println!("{}  ({}, {} test images)", r["model"].as_str().unwrap_or(""), r["reduction"].as_str().unwrap_or(""), test.len());
            println!("  {:<20} {} (reference {})", "accuracy", pct(acc), pct(&rf["accuracy"]));
            println!("  {:<20} {}", "same class as ref", pct(&r["agreement"]));
            println!("  {:<20} {:.3} of the reference's", "FLOPs", r["flops_ratio"].as_f64().unwrap_or(0.0));
            println!(
                "  {:<20} {:.0} vs {:.0} (×{:.2}, timed batch by batch in turn)",
                "images/s",
                r["images_per_second"].as_f64().unwrap_or(0.0),
                r["reference_images_per_second"].as_f64().unwrap_or(0.0),
                r["speedup"].as_f64().unwrap_or(0.0)
            );
        } else {
            println!("{}  ({}, {} test images)", r["model"].as_str().unwrap_or(""), r["reduction"].as_str().unwrap_or(""), test.len());
            println!("  {:<20} {}", "accuracy", pct(&r["accuracy"]));
            println!("  {:<20} {:.2} M", "FLOPs per image", r["flops_per_image"].as_f64().unwrap_or(0.0) / 1e6);
            if let Some(pc) = r["per_class"].as_array() {
                let cells: Vec<String> = pc.iter().map(|x| format!("{:.1}", 100.0 * x.as_f64().unwrap_or(0.0))).collect();
                println!("  {:<20} {}", "per class (%)", cells.join(" "));
            }
        }
    }
    Ok(())
}
