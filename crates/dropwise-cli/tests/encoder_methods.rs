//! prune, shrink and drop-layers on an encoder folder and a ViT folder (the tiny golden ones,
//! calibrated on a synthetic IDX folder and a short text): each writes a folder that embed or
//! eval reads; decoder-only options and bad calibration end in one clean error line.

use std::path::{Path, PathBuf};

mod common;
use common::*;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn idx(rank: u8, dims: &[u32], values: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, rank];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(values);
    v
}

/// 12×12 images of 5 classes (the tiny ViT's size): 40 train and 20 test images.
fn image_folder(dir: &Path) -> PathBuf {
    let out = dir.join("images");
    std::fs::create_dir_all(&out).unwrap();
    for (stem, count) in [("train", 40usize), ("t10k", 20)] {
        let px: Vec<u8> = (0..count * 144).map(|i| ((i * 37 + i / 144 * 11) % 256) as u8).collect();
        let labels: Vec<u8> = (0..count).map(|i| (i % 5) as u8).collect();
        std::fs::write(out.join(format!("{stem}-images-idx3-ubyte")), idx(3, &[count as u32, 12, 12], &px)).unwrap();
        std::fs::write(out.join(format!("{stem}-labels-idx1-ubyte")), idx(1, &[count as u32], &labels)).unwrap();
    }
    out
}

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("calib.txt");
    std::fs::write(&p, "It is a truth universally acknowledged.\nShe was the youngest of the two daughters.\nEmma was handsome and clever.\nThe family had long been settled in Sussex.\nSir Walter never took up any book.\n").unwrap();
    p
}

fn json(o: &Outcome) -> serde_json::Value {
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    serde_json::from_str(&o.stdout).unwrap()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn vision_model_is_pruned_shrunk_and_cut_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let data = image_folder(d.path());
    let vit = golden("tiny-vit");
    let out = d.path().join("wanda");
    let v = json(&dropwise(["prune", s(&vit), "--method", "wanda", "--sparsity", "0.5", "--calib", s(&data), "--calib-samples", "16", "-o", s(&out), "--json"]));
    assert!(v["achieved_sparsity"].as_f64().unwrap() >= 0.5);
    assert_eq!(v["calibration_batches"], 1);
    assert_eq!(json(&dropwise(["eval", s(&out), "--data", s(&data), "--json"]))["images"], 20);
    let out = d.path().join("shrunk");
    let v = json(&dropwise(["shrink", s(&vit), "--heads", "0.34", "--neurons", "0.2", "--neuron-multiple", "8", "--calib", s(&data), "-o", s(&out), "--json"]));
    assert_eq!((v["heads_before"].as_u64(), v["heads_after"].as_u64()), (Some(6), Some(4)));
    let c = config(&out);
    assert_eq!(c["intermediate_size"], 32);
    assert_eq!(c["pruned_heads"].as_object().unwrap().values().map(|h| h.as_array().unwrap().len()).sum::<usize>(), 2);
    json(&dropwise(["eval", s(&out), "--data", s(&data), "--reference", s(&vit), "--json"]));
    let out = d.path().join("cut");
    let v = json(&dropwise(["drop-layers", s(&golden("tiny-vit-pruned")), "--count", "1", "--calib", s(&data), "-o", s(&out), "--json"]));
    assert_eq!(v["layers_after"], 1);
    assert_eq!(config(&out)["num_hidden_layers"], 1);
    // Magnitude needs no calibration.
    json(&dropwise(["prune", s(&vit), "--method", "magnitude", "--pattern", "2:4", "-o", s(&d.path().join("mag")), "--json"]));
}

#[test]
fn encoder_is_pruned_and_shrunk_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let calib = text(d.path());
    let bert = golden("tiny-bert-pruned");
    let out = d.path().join("heads");
    let v = json(&dropwise(["shrink", s(&bert), "--heads", "0.25", "--allocation", "global", "--calib", s(&calib), "-o", s(&out), "--json"]));
    assert_eq!((v["heads_before"].as_u64(), v["heads_after"].as_u64()), (Some(9), Some(7)));
    assert!(out.join("tokenizer.json").exists());
    let e = json(&dropwise(["embed", s(&out), "--data", s(&calib), "--reference", s(&bert), "--json"]));
    assert!(e["flops_ratio"].as_f64().is_some_and(|f| f < 1.0), "{e}");
    let out = d.path().join("sgpt");
    let v = json(&dropwise(["prune", s(&bert), "--method", "sparsegpt", "--pattern", "2:4", "--calib", s(&calib), "-o", s(&out), "--json"]));
    assert!(v["achieved_sparsity"].as_f64().unwrap() >= 0.5);
    json(&dropwise(["embed", s(&out), "--data", s(&calib), "--json"]));
}

#[test]
fn decoder_options_and_bad_calibration_are_refused_on_encoders() {
    let d = tempfile::tempdir().unwrap();
    let data = image_folder(d.path());
    let calib = text(d.path());
    let vit = golden("tiny-vit");
    let bert = golden("tiny-bert-pruned");
    let o = |n: &str| d.path().join(n);
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        ("owl", vec!["prune".into(), s(&vit).into(), "--sparsity".into(), "0.5".into(), "--allocation".into(), "owl".into(), "--calib".into(), s(&data).into(), "-o".into(), s(&o("a")).into()], vec!["uniformly"]),
        ("ppl metric", vec!["drop-layers".into(), s(&vit).into(), "--count".into(), "1".into(), "--metric".into(), "ppl".into(), "--calib".into(), s(&data).into(), "-o".into(), s(&o("b")).into()], vec!["Block Influence"]),
        ("taylor", vec!["shrink".into(), s(&bert).into(), "--heads".into(), "0.25".into(), "--importance".into(), "taylor".into(), "--calib".into(), s(&calib).into(), "-o".into(), s(&o("c")).into()], vec!["activation"]),
        ("windows", vec!["prune".into(), s(&bert).into(), "--sparsity".into(), "0.5".into(), "--calib".into(), s(&calib).into(), "--calib-windows".into(), "4".into(), "-o".into(), s(&o("d")).into()], vec!["--calib-samples"]),
        ("no calib", vec!["prune".into(), s(&vit).into(), "--sparsity".into(), "0.5".into(), "-o".into(), s(&o("e")).into()], vec!["--calib"]),
        ("zero samples", vec!["shrink".into(), s(&vit).into(), "--heads".into(), "0.3".into(), "--calib".into(), s(&data).into(), "--calib-samples".into(), "0".into(), "-o".into(), s(&o("f")).into()], vec!["--calib-samples"]),
        ("two folders", vec!["shrink".into(), s(&vit).into(), "--heads".into(), "0.3".into(), "--calib".into(), s(&data).into(), s(&data).into(), "-o".into(), s(&o("g")).into()], vec!["one IDX folder"]),
        ("text for images", vec!["shrink".into(), s(&vit).into(), "--heads".into(), "0.3".into(), "--calib".into(), s(&calib).into(), "-o".into(), s(&o("h")).into()], vec![]),
        ("f16", vec!["prune".into(), s(&vit).into(), "--method".into(), "magnitude".into(), "--sparsity".into(), "0.5".into(), "--dtype".into(), "f16".into(), "-o".into(), s(&o("i")).into()], vec!["f32"]),
        ("every head", vec!["shrink".into(), s(&vit).into(), "--heads".into(), "1.5".into(), "--calib".into(), s(&data).into(), "-o".into(), s(&o("j")).into()], vec!["fractions"]),
        ("all blocks", vec!["drop-layers".into(), s(&vit).into(), "--count".into(), "2".into(), "--calib".into(), s(&data).into(), "-o".into(), s(&o("k")).into()], vec!["leave none"]),
        ("no block", vec!["drop-layers".into(), s(&vit).into(), "--layers".into(), "5".into(), "--calib".into(), s(&data).into(), "-o".into(), s(&o("l")).into()], vec!["no block 5"]),
        ("samples on a decoder", vec!["prune".into(), s(&valid_gguf(d.path())).into(), "--sparsity".into(), "0.5".into(), "--calib".into(), s(&calib).into(), "--calib-samples".into(), "8".into(), "-o".into(), s(&o("m.gguf")).into()], vec!["--calib-windows"]),
    ];
    for (case, args, needles) in cases {
        assert_clean_error(case, &dropwise(&args), &needles);
        assert!(!o(&args.last().unwrap().rsplit('/').next().unwrap().to_string()).exists(), "{case}: an output was written");
    }
}
