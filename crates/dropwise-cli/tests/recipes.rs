//! Recipes (`dropwise run`): a chain of CLI runs and the recipe its last file records write the
//! same bytes; `--print-recipe` round-trips; bad recipes get one error line naming the line.

use std::path::{Path, PathBuf};

mod common;
use common::*;

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("calib.txt");
    // The tiny tokenizer's words, repeated: enough tokens for a few windows of 16.
    std::fs::write(&p, "the cat sat on the mat. the dog ran. ".repeat(40)).unwrap();
    p
}

fn ok(args: &[&str]) -> Outcome {
    let o = dropwise(args);
    assert_eq!(o.code, Some(0), "dropwise {args:?} failed: {}", o.stderr);
    o
}

fn recipe_of(path: &Path) -> String {
    let g = dropwise::formats::gguf::GgufFile::open(path).unwrap();
    g.get("dropwise.recipe").and_then(|v| v.as_str()).expect("no dropwise.recipe in the output").to_string()
}

/// drop-layers → shrink → prune as three runs with files between them, then the recipe the
/// last file records run in memory: the same bytes, and the recipe names all three steps.
#[test]
fn a_chain_of_runs_and_its_recipe_write_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = valid_gguf(d);
    let calib = text(d);
    let (m, c) = (model.to_str().unwrap(), calib.to_str().unwrap());
    let a = d.join("a.gguf");
    let b = d.join("b.gguf");
    let chained = d.join("chained.gguf");
    let cal = ["--calib", c, "--calib-windows", "2", "--seq-len", "16"];
    ok(&[&["drop-layers", m, "--count", "1", "--metric", "additive", "-o", a.to_str().unwrap()][..], &cal].concat());
    ok(&[&["shrink", a.to_str().unwrap(), "--neurons", "0.25", "--neuron-multiple", "4", "-o", b.to_str().unwrap()][..], &cal].concat());
    ok(&[&["prune", b.to_str().unwrap(), "--method", "sparsegpt", "--pattern", "2:4", "-o", chained.to_str().unwrap()][..], &cal].concat());
    let recipe = recipe_of(&chained);
    for kind in ["drop-layers", "shrink", "prune"] {
        assert!(recipe.contains(&format!("kind = \"{kind}\"")), "recipe lacks {kind}:\n{recipe}");
    }
    assert!(recipe.starts_with(&format!("model = \"{m}\"")), "the recipe starts from the first input:\n{recipe}");
    let rfile = d.join("recipe.toml");
    std::fs::write(&rfile, &recipe).unwrap();
    let direct = d.join("direct.gguf");
    let o = ok(&["run", rfile.to_str().unwrap(), "-o", direct.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["steps"].as_array().unwrap().len(), 3);
    let (x, y) = (std::fs::read(&chained).unwrap(), std::fs::read(&direct).unwrap());
    assert!(x == y, "the recipe's output differs from the chain's ({} and {} bytes)", x.len(), y.len());
    assert_eq!(recipe_of(&direct), recipe);
}

/// `--print-recipe` prints what the command would do; `run` of it writes the command's bytes.
#[test]
fn print_recipe_runs_as_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = valid_gguf(d);
    let calib = text(d);
    let (m, c) = (model.to_str().unwrap(), calib.to_str().unwrap());
    let cmd_out = d.join("cmd.gguf");
    let args = ["prune", m, "--method", "wanda", "--sparsity", "0.5", "--calib", c, "--calib-windows", "2", "--seq-len", "16", "-o", cmd_out.to_str().unwrap()];
    let printed = ok(&[&args[..], &["--print-recipe"]].concat()).stdout;
    assert!(!cmd_out.exists(), "--print-recipe wrote a model");
    assert!(printed.contains("method = \"wanda\"") && printed.contains("sparsity = 0.5") && printed.contains("calib_windows = 2"), "{printed}");
    ok(&args);
    let rfile = d.join("prune.toml");
    std::fs::write(&rfile, &printed).unwrap();
    let run_out = d.join("run.gguf");
    ok(&["run", rfile.to_str().unwrap(), "-o", run_out.to_str().unwrap()]);
    assert!(std::fs::read(&cmd_out).unwrap() == std::fs::read(&run_out).unwrap(), "run of the printed recipe differs from the command");
    // `run --print-recipe` prints the same recipe back (every option was explicit already).
    let again = ok(&["run", rfile.to_str().unwrap(), "--print-recipe"]).stdout;
    assert_eq!(again, printed);
}

/// A recipe with evaluation reports the written model against the one it started from.
#[test]
fn run_evaluates_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = valid_gguf(d);
    let calib = text(d);
    let out = d.join("out.gguf");
    let recipe = format!(
        "model = {m:?}\noutput = {o:?}\n\n[calibration]\nfiles = [{c:?}]\nseq_len = 16\n\n[evaluation]\nfiles = [{c:?}]\nwindows = 2\nseq_len = 16\n\n\
         [[step]]\nkind = \"drop-layers\"\nlayers = [0]\n\n[[step]]\nkind = \"prune\"\nmethod = \"magnitude\"\nsparsity = 0.25\n",
        m = model.to_str().unwrap(),
        o = out.to_str().unwrap(),
        c = calib.to_str().unwrap()
    );
    let rfile = d.join("r.toml");
    std::fs::write(&rfile, recipe).unwrap();
    let report = d.join("report");
    let o = ok(&["run", rfile.to_str().unwrap(), "--json", "--report", report.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let page = std::fs::read_to_string(report.join("index.html")).unwrap();
    for needle in ["<svg", "quality against size", "quality against measured speed", "Step 1 — drop-layers", "Step 2 — prune", "kind = &quot;prune&quot;"] {
        assert!(page.contains(needle), "the report lacks {needle}");
    }
    // Nothing is fetched at view time: no scripts, stylesheets or images by address.
    for fetch in ["src=", "<link", "<script", "@import"] {
        assert!(!page.contains(fetch), "the report fetches something ({fetch})");
    }
    let e = &v["evaluation"];
    assert_eq!(e["dense"]["kl_divergence"].as_f64(), Some(0.0));
    let kl = e["model"]["kl_divergence"].as_f64().unwrap();
    assert!(kl > 0.0 && kl.is_finite(), "KL of the dropped and pruned model {kl}");
    assert!(out.exists());
    assert!(v["cost"]["params_after"].as_u64() < v["cost"]["params_before"].as_u64());
}

/// Bad recipes: one `error:` line that names the recipe's line, nothing written.
#[test]
fn bad_recipes_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = valid_gguf(d);
    let calib = text(d);
    let head = format!("model = {:?}\noutput = {:?}\n[calibration]\nfiles = [{:?}]\n", model.to_str().unwrap(), d.join("o.gguf").to_str().unwrap(), calib.to_str().unwrap());
    // (case, recipe after the 4 head lines, the line the error must name, words it must hold)
    let cases: &[(&str, &str, usize, &[&str])] = &[
        ("unknown step", "[[step]]\nkind = \"distill\"\n", 6, &["unknown step 'distill'", "prune"]),
        ("unknown option", "[[step]]\nkind = \"prune\"\nsparsity = 0.5\nsparsty = 0.5\n", 8, &["unknown option 'sparsty'"]),
        ("wrong type", "[[step]]\nkind = \"prune\"\nsparsity = \"half\"\n", 7, &["sparsity", "expected a number"]),
        ("impossible value", "[[step]]\nkind = \"prune\"\nsparsity = 1.5\n", 7, &["sparsity 1.5 is impossible"]),
        ("bad choice", "[[step]]\nkind = \"prune\"\nsparsity = 0.5\nmethod = \"best\"\n", 8, &["unknown pruning method 'best'"]),
        ("impossible order", "[[step]]\nkind = \"quantize\"\nuniform = \"Q8_0\"\n[[step]]\nkind = \"prune\"\nsparsity = 0.5\n", 8, &["quantize must be the last step"]),
        ("both budgets", "[[step]]\nkind = \"prune\"\nsparsity = 0.5\npattern = \"2:4\"\n", 5, &["either sparsity"]),
        ("not toml", "[[step]\nkind = \"prune\"\n", 5, &["not TOML"]),
        ("no kind", "[[step]]\nsparsity = 0.5\n", 5, &["kind"]),
        ("negative count", "[[step]]\nkind = \"drop-layers\"\ncount = -2\n", 7, &["count", "whole number"]),
        ("unknown top key", "[[step]]\nkind = \"prune\"\nsparsity = 0.5\n[evaluaton]\nfiles = []\n", 8, &["unknown option 'evaluaton'"]),
    ];
    for (case, body, line, needles) in cases {
        let rfile = d.join("bad.toml");
        std::fs::write(&rfile, format!("{head}{body}")).unwrap();
        let o = dropwise(["run", rfile.to_str().unwrap()]);
        let mut want = vec![format!("line {line}:")];
        want.extend(needles.iter().map(|s| s.to_string()));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_clean_error(case, &o, &want);
        assert!(!d.join("o.gguf").exists(), "case {case}: wrote a model");
    }
    let o = dropwise(["run", d.join("missing.toml").to_str().unwrap()]);
    assert_clean_error("missing recipe", &o, &["cannot read recipe"]);
    let rfile = d.join("noout.toml");
    std::fs::write(&rfile, format!("model = {:?}\n[[step]]\nkind = \"drop-layers\"\nlayers = [0]\n", model.to_str().unwrap())).unwrap();
    assert_clean_error("no output", &dropwise(["run", rfile.to_str().unwrap()]), &["names no output"]);
    let o = dropwise(["run", rfile.to_str().unwrap(), "-o", d.join("o.gguf").to_str().unwrap(), "--report", calib.to_str().unwrap()]);
    assert_clean_error("report is a file", &o, &["exists and is not a folder"]);
    assert!(!d.join("o.gguf").exists(), "a refused --report still wrote a model");
    // A budget no combination can meet, refused by prediction, nothing written.
    let o = dropwise([
        "fit", model.to_str().unwrap(), "--target-size", "0.000001", "--calib", calib.to_str().unwrap(), "--calib-windows", "1", "--seq-len", "16",
        "--bpw", "8.5", "--neurons", "0", "--max-depth", "0", "-o", d.join("o.gguf").to_str().unwrap(),
    ]);
    assert_clean_error("fit budget impossible", &o, &["no candidate meets"]);
    assert!(!d.join("o.gguf").exists(), "an impossible fit wrote a model");
    let o = dropwise(["fit", model.to_str().unwrap(), "--target-size", "1", "--bpw", "8.5", "-o", d.join("o.gguf").to_str().unwrap()]);
    assert_clean_error("fit without calibration", &o, &["needs calibration text"]);
    // Files in the place of fit's folders and caches: refused before any measuring.
    let out_path = d.join("o.gguf");
    let fit_with = |extra: &[&str]| {
        let base = ["fit", model.to_str().unwrap(), "--target-size", "1", "--calib", calib.to_str().unwrap(), "--calib-windows", "1", "--seq-len", "16", "--bpw", "8.5", "-o", out_path.to_str().unwrap()];
        dropwise([&base[..], extra].concat())
    };
    assert_clean_error("fit --keep-checked a file", &fit_with(&["--keep-checked", calib.to_str().unwrap()]), &["--keep-checked", "not a folder"]);
    assert_clean_error("fit --report a file", &fit_with(&["--report", calib.to_str().unwrap()]), &["--report", "not a folder"]);
    assert_clean_error("fit --costs not JSON", &fit_with(&["--costs", calib.to_str().unwrap()]), &["not a fit costs file"]);
    assert!(!d.join("o.gguf").exists(), "a refused fit wrote a model");
}

/// `fit` on the tiny model: a size budget between the smallest and the largest file the bit
/// levels make alone; the written file meets it when measured, records the recipe of the chosen
/// combination, and `run` of that recipe writes the same bytes.
#[test]
fn fit_meets_a_size_budget_and_records_a_runnable_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = valid_gguf(d);
    let calib = text(d);
    let (m, c) = (model.to_str().unwrap(), calib.to_str().unwrap());
    let out = d.join("fit.gguf");
    let common = ["--calib", c, "--calib-windows", "2", "--seq-len", "16", "--bpw", "4.5,6,8.5", "--neurons", "0.25", "--max-depth", "0.34", "--check", "2"];
    let dry = ok(&[&["fit", m, "--target-size", "1000", "--dry-run", "--json", "-o", out.to_str().unwrap()][..], &common].concat());
    assert!(!out.exists(), "--dry-run wrote a model");
    let v: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    let sizes: Vec<u64> = v["costs"]["bits"].as_array().unwrap().iter().map(|e| e["bytes"].as_u64().unwrap()).collect();
    assert_eq!(sizes.len(), 3);
    assert!(sizes[0] < sizes[2], "{sizes:?}");
    assert!(v["front"].as_array().unwrap().len() >= 2);
    assert!(v["checked"].as_array().unwrap().is_empty());
    // Just under the 6-bit file: 6 bits alone does not fit, so something smaller must be found.
    let budget_mb = (sizes[1] - 1) as f64 / 1e6;
    let budget = format!("{budget_mb}");
    let costs = d.join("costs.json");
    let with_costs = [&common[..], &["--costs", costs.to_str().unwrap()]].concat();
    let r = ok(&[&["fit", m, "--target-size", &budget, "--json", "-o", out.to_str().unwrap()][..], &with_costs].concat());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["costs_reused"], false);
    // Every single family under the budget is checked beside the best predicted.
    let families: Vec<&str> = v["checked"].as_array().unwrap().iter().map(|c| c["family"].as_str().unwrap()).collect();
    assert!(families.contains(&"bits") && families.contains(&"depth+bits") && families.contains(&"width+bits"), "{families:?}");
    let chosen = v["chosen"].as_u64().expect("nothing chosen") as usize;
    let c = &v["checked"][chosen];
    let bytes = std::fs::metadata(&out).unwrap().len();
    assert_eq!(c["measured"]["bytes"].as_u64(), Some(bytes));
    assert!(bytes as f64 <= budget_mb * 1e6, "{bytes} bytes over the budget {budget_mb} MB");
    for checked in v["checked"].as_array().unwrap() {
        let (p, m) = (checked["predicted_kl"].as_f64().unwrap(), checked["measured"]["kl"].as_f64().unwrap());
        assert!(p.is_finite() && m.is_finite() && m >= 0.0, "{checked}");
    }
    // Nothing left beside the output.
    let left: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert!(left.is_empty(), "fit left {left:?}");
    let recipe = recipe_of(&out);
    assert!(recipe.contains("kind = \"quantize\""), "{recipe}");
    let rfile = d.join("fit.toml");
    std::fs::write(&rfile, &recipe).unwrap();
    let again = d.join("again.gguf");
    ok(&["run", rfile.to_str().unwrap(), "-o", again.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "run of fit's recipe writes other bytes");
    // The costs file serves a second run with the same options: the same choice, the same bytes.
    let out2 = d.join("fit2.gguf");
    let r = ok(&[&["fit", m, "--target-size", &budget, "--json", "-o", out2.to_str().unwrap()][..], &with_costs].concat());
    let v2: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v2["costs_reused"], true);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(), "a rerun from the costs file chose differently");
    // Other options than the costs file's: refused, nothing written.
    let other = [&with_costs[..], &["--bpw", "6,8.5"]].concat();
    let o = dropwise([&["fit", m, "--target-size", &budget, "-o", d.join("o3.gguf").to_str().unwrap()][..], &other].concat());
    assert_clean_error("costs of other options", &o, &["holds the costs of another model or other fit options"]);
    assert!(!d.join("o3.gguf").exists());
    // A budget the start file meets: it is the best (KL 0) and is written unchanged.
    let big = format!("{}", std::fs::metadata(&model).unwrap().len() as f64 / 1e6 + 1.0);
    let same = d.join("same.gguf");
    let r = ok(&[&["fit", m, "--target-size", &big, "--json", "-o", same.to_str().unwrap()][..], &common].concat());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["checked"][v["chosen"].as_u64().unwrap() as usize]["family"], "start");
    assert!(std::fs::read(&model).unwrap() == std::fs::read(&same).unwrap(), "the start file chosen but not written as it is");
}

/// `fit --recover-budget` on the tiny model: the best structural candidate is also built healed
/// (its share of the budget turned into whole training windows), measured beside the one-shot
/// ones, and its file records a recipe with the recover step that `run` reproduces byte for
/// byte. Training on the check text is refused before any measuring.
#[test]
fn fit_heals_structural_candidates_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = valid_gguf(d);
    let calib = text(d);
    let train = d.join("train.txt");
    std::fs::write(&train, "the dog sat on the mat. the cat ran on. ".repeat(40)).unwrap();
    let (m, c, t) = (model.to_str().unwrap(), calib.to_str().unwrap(), train.to_str().unwrap());
    let out = d.join("fit.gguf");
    let kept = d.join("kept");
    let common = ["--calib", c, "--calib-windows", "2", "--seq-len", "16", "--bpw", "6,8.5", "--neurons", "0.25", "--max-depth", "0.34", "--check", "1", "--target-size", "1000"];
    let o = dropwise([&["fit", m, "--recover-budget", "0.02", "-o", out.to_str().unwrap()][..], &common].concat());
    assert_clean_error("fit healing on its check text", &o, &["both recovery training text and fit's check text"]);
    assert!(!out.exists());
    let r = ok(&[
        &["fit", m, "--recover-budget", "0.02", "--recover-train", t, "--heal", "1", "--keep-checked", kept.to_str().unwrap(), "--json", "-o", out.to_str().unwrap()][..],
        &common,
    ]
    .concat());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let checked = v["checked"].as_array().unwrap();
    let healed: Vec<(usize, &serde_json::Value)> = checked.iter().enumerate().filter(|(_, c)| !c["healed"].is_null()).collect();
    assert_eq!(healed.len(), 1, "one candidate healed: {checked:?}");
    let (i, h) = healed[0];
    let tokens = h["healed"]["tokens"].as_u64().unwrap();
    assert!(tokens >= 16 && tokens % 16 == 0, "whole windows: {tokens}");
    assert!(h["healed"]["probe_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(h["blocks"].as_array().unwrap().len() + (h["neurons"].as_f64().unwrap() > 0.0) as usize > 0, "a structural candidate: {h}");
    assert!(h["measured"]["kl"].as_f64().unwrap().is_finite());
    let family = h["family"].as_str().unwrap();
    let file = kept.join(format!("candidate-{i}-{family}+recover.gguf"));
    let recipe = recipe_of(&file);
    assert!(recipe.contains("kind = \"recover\"") && recipe.contains(&format!("tokens = {tokens}")), "{recipe}");
    let rfile = d.join("healed.toml");
    std::fs::write(&rfile, &recipe).unwrap();
    let again = d.join("again.gguf");
    ok(&["run", rfile.to_str().unwrap(), "-o", again.to_str().unwrap()]);
    assert!(std::fs::read(&file).unwrap() == std::fs::read(&again).unwrap(), "run of the healed candidate's recipe writes other bytes");
    let o_path = d.join("o.gguf");
    let o = o_path.to_str().unwrap();
    let cases: [(&str, &[&str], &str); 3] = [
        ("budget 0", &["--recover-budget", "0", "--heal", "1"], "--recover-budget"),
        ("heal 0", &["--recover-budget", "1", "--heal", "0"], "--heal"),
        ("lr 0", &["--recover-budget", "1", "--recover-lr", "0"], "--recover-lr"),
    ];
    for (what, extra, needle) in cases {
        let args = [&["fit", m, "--recover-train", t, "-o", o][..], &common, extra].concat();
        assert_clean_error(what, &dropwise(args), &[needle]);
        assert!(!o_path.exists());
    }
}
