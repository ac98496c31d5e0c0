//! The vision commands on a small synthetic IDX folder: train-vit writes a folder eval and forget
//! read; broken IDX files, folders and arguments end in one clean `error:` line.

use std::path::{Path, PathBuf};

mod common;
use common::*;

fn idx(rank: u8, dims: &[u32], values: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, rank];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(values);
    v
}

/// Images of 8×8 pixels, class k (0..4) a bright quadrant; `n` train and `n / 2` test images.
fn write_set(dir: &Path, n: usize) -> PathBuf {
    let out = dir.join("images");
    std::fs::create_dir_all(&out).unwrap();
    for (stem, count) in [("train", n), ("t10k", n / 2)] {
        let (mut px, mut labels) = (Vec::new(), Vec::new());
        for i in 0..count {
            let c = i % 4;
            for y in 0..8 {
                for x in 0..8 {
                    let inside = (x / 4 == c % 2) && (y / 4 == c / 2);
                    px.push(if inside { 200 } else { ((i * 7 + x * 3 + y) % 50) as u8 });
                }
            }
            labels.push(c as u8);
        }
        std::fs::write(out.join(format!("{stem}-images-idx3-ubyte")), idx(3, &[count as u32, 8, 8], &px)).unwrap();
        std::fs::write(out.join(format!("{stem}-labels-idx1-ubyte")), idx(1, &[count as u32], &labels)).unwrap();
    }
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Outcome {
    let base = ["train-vit", "--data", s(data), "--epochs", "2", "--hidden", "16", "--layers", "1", "--heads", "2", "--intermediate", "16", "--patch", "2", "--batch", "16", "--no-flip", "-o", s(out)];
    dropwise([&base[..], extra].concat())
}

#[test]
fn train_eval_and_forget_run_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let data = write_set(d.path(), 64);
    let vit = d.path().join("vit");
    let o = train(&data, &vit, &["--json", "--cutmix", "0.5", "--multi-sample-dropout", "2"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["epochs"].as_array().unwrap().len(), 2);
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        assert!(vit.join(f).exists(), "{f}");
    }
    let o = dropwise(["eval", s(&vit), "--data", s(&data), "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["images"], 32);
    let o = dropwise(["eval", s(&vit), "--data", s(&data), "--reference", s(&vit), "--tome", "0.25", "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(v["results"][0]["flops_ratio"].as_f64().unwrap() < 1.0);
    let logits = d.path().join("logits.f32");
    let o = dropwise(["eval", s(&vit), "--data", s(&data), "--logits", s(&logits)]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(std::fs::metadata(&logits).unwrap().len(), 32 * 4 * 4);
    let forgot = d.path().join("forgot");
    let o = dropwise(["forget", s(&vit), "--forget", "2", "--retain", s(&data), "-o", s(&forgot), "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["forget_images"], 16);
    assert!(forgot.join("model.safetensors").exists());
    // The importances are saved once and reused for another α.
    let imp = d.path().join("imp.safetensors");
    for (alpha, reused) in [("10", false), ("2", true)] {
        let out = d.path().join(format!("ssd-{alpha}"));
        let o = dropwise(["forget", s(&vit), "--forget", "2", "--retain", s(&data), "--alpha", alpha, "--importances", s(&imp), "-o", s(&out), "--json"]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["importances_reused"], reused, "alpha {alpha}");
    }
    // Another class does not reuse them.
    let o = dropwise(["forget", s(&vit), "--forget", "1", "--retain", s(&data), "--importances", s(&imp), "-o", s(&d.path().join("ssd-c1")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["importances_reused"], false);
    // A list of training images instead of a class: measured on them, the other training
    // images and the test set; its importances are keyed by the list, not reused for a class.
    let list = d.path().join("forget.txt");
    std::fs::write(&list, "# three images\n3\n10\n41\n").unwrap();
    let o = dropwise(["forget", s(&vit), "--forget", s(&list), "--retain", s(&data), "--importances", s(&imp), "-o", s(&d.path().join("ssd-list")), "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((v["forget_images"].as_u64(), v["importances_reused"].as_bool()), (Some(3), Some(false)));
    assert!(v["after"]["test_accuracy"].is_number() && v["before"]["retain_accuracy"].is_number());
    let o = dropwise(["forget", s(&vit), "--forget", s(&list), "--retain", s(&data), "--importances", s(&imp), "-o", s(&d.path().join("ssd-list2")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["importances_reused"], true);
    // Per-layer rates searched for 0.9 of the FLOPs (one layer: its attention and the patch
    // projection are never reduced), then evaluated.
    let o = dropwise(["eval", s(&vit), "--data", s(&data), "--reference", s(&vit), "--diffrate", "0.9", "--calib-images", "32", "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(v["rate_search"]["flops_ratio"].as_f64().unwrap() <= 0.9);
    assert!(v["results"][0]["flops_ratio"].as_f64().unwrap() <= 0.9 + 1e-9);
    // Fine-tuning from the model without a class.
    let tuned = d.path().join("tuned");
    let o = dropwise(["train-vit", "--data", s(&data), "--init", s(&vit), "--exclude-class", "2", "--epochs", "1", "--no-flip", "-o", s(&tuned)]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

#[test]
fn broken_image_files_are_refused() {
    let cases: Vec<(&str, Box<dyn Fn(&Path)>, &[&str])> = vec![
        ("truncated images", Box::new(|p| {
            let f = p.join("train-images-idx3-ubyte");
            let b = std::fs::read(&f).unwrap();
            std::fs::write(&f, &b[..b.len() - 10]).unwrap()
        }), &["truncated"]),
        ("truncated header", Box::new(|p| std::fs::write(p.join("train-images-idx3-ubyte"), [0u8, 0, 8, 3, 0, 0]).unwrap()), &["truncated IDX header"]),
        ("wrong magic", Box::new(|p| {
            let f = p.join("train-labels-idx1-ubyte");
            let mut b = std::fs::read(&f).unwrap();
            b[0] = 0x1f;
            std::fs::write(&f, b).unwrap()
        }), &["not an IDX file"]),
        ("wrong value type", Box::new(|p| {
            let f = p.join("train-images-idx3-ubyte");
            let mut b = std::fs::read(&f).unwrap();
            b[2] = 0x0d;
            std::fs::write(&f, b).unwrap()
        }), &["value type"]),
        ("labels file of images", Box::new(|p| std::fs::copy(p.join("train-images-idx3-ubyte"), p.join("train-labels-idx1-ubyte")).map(|_| ()).unwrap()), &["rank 3, expected 1"]),
        ("count mismatch", Box::new(|p| std::fs::write(p.join("train-labels-idx1-ubyte"), idx(1, &[10], &[0; 10])).unwrap()), &["64 images", "10 labels"]),
        ("trailing bytes", Box::new(|p| {
            let f = p.join("t10k-labels-idx1-ubyte");
            let mut b = std::fs::read(&f).unwrap();
            b.push(1);
            std::fs::write(&f, b).unwrap()
        }), &["after the"]),
        ("huge header", Box::new(|p| std::fs::write(p.join("train-images-idx3-ubyte"), idx(3, &[u32::MAX, u32::MAX, u32::MAX], &[])).unwrap()), &["truncated"]),
        ("gzipped", Box::new(|p| std::fs::rename(p.join("t10k-images-idx3-ubyte"), p.join("t10k-images-idx3-ubyte.gz")).unwrap()), &["gzipped"]),
        ("missing", Box::new(|p| std::fs::remove_file(p.join("t10k-labels-idx1-ubyte")).unwrap()), &["no t10k-labels-idx1-ubyte"]),
        ("empty", Box::new(|p| std::fs::write(p.join("train-images-idx3-ubyte"), []).unwrap()), &["too short"]),
    ];
    for (case, corrupt, needles) in cases {
        let d = tempfile::tempdir().unwrap();
        let data = write_set(d.path(), 64);
        corrupt(&data);
        assert_clean_error(case, &train(&data, &d.path().join("vit"), &[]), needles);
        assert!(!d.path().join("vit").exists(), "{case}: an output was written");
    }
    let d = tempfile::tempdir().unwrap();
    assert_clean_error("not a folder", &train(&d.path().join("nope"), &d.path().join("vit"), &[]), &["not a folder"]);
}

#[test]
fn broken_vit_folders_and_bad_arguments_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let data = write_set(d.path(), 64);
    let vit = d.path().join("vit");
    assert_eq!(train(&data, &vit, &[]).code, Some(0));
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let m = d.path().join(name);
        std::fs::create_dir_all(&m).unwrap();
        for file in ["model.safetensors", "preprocessor_config.json"] {
            std::fs::copy(vit.join(file), m.join(file)).unwrap();
        }
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(vit.join("config.json")).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(m.join("config.json"), v.to_string()).unwrap();
        m
    };
    let eval = |m: &Path, extra: &[&str]| dropwise([&["eval", s(m), "--data", s(&data)][..], extra].concat());
    // An unknown model_type is not taken for a ViT: the decoder loader names what it reads.
    assert_clean_error("unknown model_type", &eval(&edit("a", &|v| v["model_type"] = "swin".into()), &[]), &["swin"]);
    assert_clean_error("patch does not divide", &eval(&edit("b", &|v| v["patch_size"] = 3.into()), &[]), &["not a multiple of patch_size"]);
    assert_clean_error("more layers than the file", &eval(&edit("c", &|v| v["num_hidden_layers"] = 3.into()), &[]), &["missing tensor vit.encoder.layer.1"]);
    assert_clean_error("activation", &eval(&edit("e", &|v| v["hidden_act"] = "relu".into()), &[]), &["hidden_act"]);
    assert_clean_error("image size", &eval(&edit("f", &|v| v["image_size"] = 16.into()), &[]), &["position_embeddings"]);
    assert_clean_error("huge size", &eval(&edit("g", &|v| v["hidden_size"] = 1u64.wrapping_shl(40).into()), &[]), &["not a usable size"]);
    assert_clean_error("tome too large", &eval(&vit, &["--tome", "0.9"]), &["merge ratio"]);
    assert_clean_error("hired layers", &eval(&vit, &["--hired", "0.5", "--hired-layers", "9"]), &["dropped in 1 to 1 layers"]);
    assert_clean_error("two data folders", &eval(&vit, &["--data", s(&data)]), &["one image folder"]);
    assert_clean_error("zero batch", &eval(&vit, &["--batch", "0"]), &["--batch"]);
    assert_clean_error("diffrate budget", &eval(&vit, &["--diffrate", "1.5"]), &["FLOPs budget"]);
    assert_clean_error("diffrate unreachable", &eval(&vit, &["--diffrate", "0.01", "--calib-images", "8"]), &["no schedule"]);
    assert_clean_error("unknown class", &dropwise(["forget", s(&vit), "--forget", "Hat", "--retain", s(&data), "-o", s(&d.path().join("x"))]), &["not one of the model's classes"]);
    let bad_list = d.path().join("bad-list.txt");
    std::fs::write(&bad_list, "3\n64\n").unwrap();
    assert_clean_error("index past the training images", &dropwise(["forget", s(&vit), "--forget", s(&bad_list), "--retain", s(&data), "-o", s(&d.path().join("x"))]), &["line 2", "past the 64"]);
    assert_clean_error("negative alpha", &dropwise(["forget", s(&vit), "--forget", "1", "--retain", s(&data), "--alpha=-1", "-o", s(&d.path().join("x"))]), &["--alpha"]);
    assert_clean_error("zero epochs", &dropwise(["train-vit", "--data", s(&data), "--epochs", "0", "-o", s(&d.path().join("y"))]), &["--epochs"]);
    assert_clean_error("cutmix probability", &train(&data, &d.path().join("y"), &["--cutmix", "1.5"]), &["--cutmix"]);
    let fresh = |extra: &[&str]| dropwise([&["train-vit", "--data", s(&data), "-o", s(&d.path().join("y"))][..], extra].concat());
    assert_clean_error("patch", &fresh(&["--patch", "3"]), &["--patch 3"]);
    assert_clean_error("heads", &fresh(&["--heads", "3"]), &["multiple of --heads"]);
    assert_clean_error("vision flags on a language model", &dropwise(["eval", s(&d.path().join("nope.gguf")), "--data", s(&data), "--tome", "0.2"]), &["vision models"]);
}
