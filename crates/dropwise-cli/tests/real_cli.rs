//! The `dropwise` binary on the real SmolLM2-135M GGUF: JSON outputs, the reference comparison,
//! peak memory, and convert round trips through the CLI. Assets come from scripts/fetch_assets.py.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assets() -> PathBuf {
    let dir = std::env::var_os("DROPWISE_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("assets"));
    assert!(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(), "assets missing: run `python3 scripts/fetch_assets.py`");
    dir
}

fn dropwise(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dropwise")).args(args).output().unwrap();
    assert!(out.status.success(), "dropwise {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("dropwise {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn inspect_reports_the_real_model() {
    let model = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let r = dropwise(&["inspect", model.to_str().unwrap(), "--json"]);
    assert_eq!(r["parameters"], 134_515_008u64);
    assert_eq!(r["config"]["num_hidden_layers"], 30);
    assert_eq!(r["bytes_by_dtype"]["Q4_1"]["tensors"], 210);
    assert_eq!(r["bytes_by_dtype"]["Q8_0"]["tensors"], 1);
    assert_eq!(r["tokenizer"], "gguf:gpt2/smollm");
    // 2 × weights + 2 × 2 × heads·head_dim × (512+1)/2 × 30 layers of causal attention.
    let flops = r["flops_per_token"].as_f64().unwrap();
    let expected = 2.0 * 134_515_008.0 - 2.0 * 576.0 * 61.0 + 2.0 * 2.0 * 576.0 * 256.5 * 30.0;
    assert!((flops - expected).abs() < 1.0, "{flops} vs {expected}");
}

#[test]
fn eval_json_reference_and_memory() {
    let a = assets();
    let model = a.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = a.join("austen/persuasion.txt");
    let r = dropwise(&["eval", model.to_str().unwrap(), "--data", text.to_str().unwrap(), "--windows", "2", "--json", "--threads", "2"]);
    for key in ["perplexity", "nll", "tokens", "windows", "tokens_per_second"] {
        assert!(r.get(key).is_some(), "eval JSON lacks {key}");
    }
    assert_eq!(r["tokens"], 2 * 511);
    assert_eq!(r["windows"], 2);
    assert!(r.get("kl_divergence").is_none());
    let peak = r["peak_memory_bytes"].as_f64().unwrap();
    let weights = r["f32_weight_bytes"].as_f64().unwrap();
    assert!(peak <= 2.0 * weights, "eval peak memory {peak} exceeds 2× the f32 weights ({weights})");

    let r = dropwise(&[
        "eval", model.to_str().unwrap(), "--data", text.to_str().unwrap(), "--windows", "1", "--json", "--reference", model.to_str().unwrap(),
    ]);
    assert_eq!(r["kl_divergence"].as_f64(), Some(0.0));
    assert_eq!(r["top1_agreement"].as_f64(), Some(1.0));
}

#[test]
fn convert_through_the_cli_in_half_precision() {
    let a = assets();
    let model = a.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = a.join("austen/persuasion.txt");
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf16");
    let g = dir.path().join("m16.gguf");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dropwise")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["convert", model.to_str().unwrap(), "-o", hf.to_str().unwrap(), "--dtype", "f16"]);
    run(&["convert", hf.to_str().unwrap(), "-o", g.to_str().unwrap(), "--dtype", "f16"]);
    assert!(hf.join("config.json").exists() && hf.join("model.safetensors").exists() && hf.join("tokenizer.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let r = dropwise(&[
        "eval", g.to_str().unwrap(), "--data", text.to_str().unwrap(), "--windows", "1", "--json", "--reference", model.to_str().unwrap(),
    ]);
    // f16 rounding of Q4_1/Q8_0 values is tiny: the model barely changes.
    assert!(r["kl_divergence"].as_f64().unwrap() < 1e-3, "{}", r["kl_divergence"]);
    assert!(r["top1_agreement"].as_f64().unwrap() > 0.98);
    let _ = dropwise::testing::gguf_py_summary(&g);
}

#[test]
fn structural_drops_on_the_real_model_evaluate_together() {
    let a = assets();
    let model = a.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = a.join("austen/persuasion.txt");
    let calib = a.join("austen/emma.txt");
    let dir = tempfile::tempdir().unwrap();
    let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
    let layers = dir.path().join("layers.gguf");
    let shrunk = dir.path().join("shrunk.gguf");
    let d = dropwise(&[
        "drop-layers", m, "--count", "2", "--metric", "additive", "--calib", calib.to_str().unwrap(), "--calib-windows", "1",
        "--seq-len", "128", "-o", layers.to_str().unwrap(), "--json", "--threads", "2",
    ]);
    assert_eq!(d["layers"].as_array().unwrap().len(), 2);
    // The additive prediction and the measurement are both reported.
    assert!(d["predicted_kl"].as_f64().unwrap() > 0.0 && d["measured_kl"].as_f64().unwrap() > 0.0);
    let s = dropwise(&[
        "shrink", m, "--neurons", "0.25", "--calib", calib.to_str().unwrap(), "--calib-windows", "1", "--seq-len", "128",
        "-o", shrunk.to_str().unwrap(), "--json", "--threads", "2",
    ]);
    assert!((s["neurons_removed"].as_f64().unwrap() - 0.25).abs() < 0.01);
    assert_eq!(s["after"][0]["ffn"], 1152);
    let r = dropwise(&[
        "eval", layers.to_str().unwrap(), shrunk.to_str().unwrap(), "--data", t, "--windows", "1", "--json", "--reference", m, "--threads", "2",
    ]);
    let r = r.as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["parameters"], d["cost"]["params_after"]);
    assert_eq!(r[1]["parameters"], s["cost"]["params_after"]);
    for e in r {
        let kl = e["kl_divergence"].as_f64().unwrap();
        assert!(kl > 0.0 && kl < 2.0, "{kl}");
    }
}

/// Mixed-precision quantization of the real model: the plan meets the budget, only ffn_down's
/// 1536-wide rows take k-quants, and the file evaluates with its weights kept quantized, close to
/// the f32 model and at the quality the table in docs/results.md reports.
#[test]
fn quantize_to_a_fractional_budget_and_evaluate_quantized() {
    let a = assets();
    let model = a.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = a.join("austen/persuasion.txt");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.gguf");
    let q = dropwise(&["quantize", model.to_str().unwrap(), "--bpw", "5.3", "--importance", "outliers", "-o", out.to_str().unwrap(), "--json"]);
    let bpw = q["file_bpw"].as_f64().unwrap();
    assert!((bpw - 5.3).abs() <= 0.05 && bpw <= 5.3 + 1e-9, "file holds {bpw} bits per weight");
    assert_eq!(q["planned_bpw"], q["file_bpw"]);
    for t in q["tensors"].as_array().unwrap() {
        let ty = t["type"].as_str().unwrap();
        assert_eq!(ty.ends_with("K"), t["cols"] == 1536, "{t}");
    }
    let r = dropwise(&[
        "eval", out.to_str().unwrap(), "--data", text.to_str().unwrap(), "--windows", "1", "--json", "--reference", model.to_str().unwrap(),
        "--quantized-matmul",
    ]);
    let kl = r["kl_divergence"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.15, "KL to f32 {kl}");
}

#[test]
fn generate_greedy_is_repeatable_and_reports_speed() {
    let model = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = model.to_str().unwrap();
    let args = ["generate", m, "--prompt", "The capital of France is", "--max-tokens", "8", "--json"];
    let a = dropwise(&args);
    let b = dropwise(&args);
    assert_eq!(a["ids"], b["ids"], "greedy decoding is deterministic");
    assert_eq!(a["prompt_ids"].as_array().unwrap().len(), 5);
    assert!(a["text"].as_str().unwrap().contains("Paris"), "{}", a["text"]);
    assert!(a["decode_tokens_per_second"].as_f64().unwrap() > 0.0 && a["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
    // The chat template's default system message and the turn markers are special tokens.
    let c = dropwise(&["generate", m, "--prompt", "Hi", "--chat", "--max-tokens", "4", "--json"]);
    let ids = c["prompt_ids"].as_array().unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one token");
    // Quantized decode steps take the short quantized path and still write the same answer.
    let q = dropwise(&["generate", m, "--prompt", "The capital of France is", "--max-tokens", "8", "--quantized-matmul", "--json"]);
    assert!(q["text"].as_str().unwrap().contains("Paris"), "{}", q["text"]);
}

/// On the real model: drop two blocks, prune with Wanda, quantize to a budget, as three runs with
/// files between them and as the recipe the last file records, run in memory: the same bytes.
#[test]
fn a_recipe_reproduces_the_chained_runs_on_the_real_model() {
    let a = assets();
    let model = a.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let calib = a.join("austen/emma.txt");
    let dir = tempfile::tempdir().unwrap();
    let (m, c) = (model.to_str().unwrap(), calib.to_str().unwrap());
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let cal = ["--calib", c, "--calib-windows", "1", "--seq-len", "64", "--threads", "2"];
    dropwise(&[&["drop-layers", m, "--layers", "3,7", "-o", &p("a.gguf"), "--json"][..], &cal].concat());
    dropwise(&[&["prune", &p("a.gguf"), "--method", "wanda", "--sparsity", "0.5", "-o", &p("b.gguf"), "--json"][..], &cal].concat());
    let q = dropwise(&["quantize", &p("b.gguf"), "--bpw", "4.5", "--importance", "outliers", "-o", &p("chained.gguf"), "--json"]);
    let recipe = q["recipe"].as_str().unwrap().to_string();
    for kind in ["drop-layers", "prune", "quantize"] {
        assert!(recipe.contains(&format!("kind = \"{kind}\"")), "{recipe}");
    }
    std::fs::write(p("recipe.toml"), &recipe).unwrap();
    let r = dropwise(&["run", &p("recipe.toml"), "-o", &p("direct.gguf"), "--json", "--threads", "2"]);
    assert_eq!(r["steps"].as_array().unwrap().len(), 3);
    let (x, y) = (std::fs::read(p("chained.gguf")).unwrap(), std::fs::read(p("direct.gguf")).unwrap());
    assert!(x == y, "the recipe's file differs from the chain's ({} and {} bytes)", x.len(), y.len());
}
