//! Broken encoder folders and bad `embed` arguments end in one clean `error:` line. The folder
//! is the real all-MiniLM-L6-v2 (`scripts/fetch_assets.py --minilm`, run by the test command),
//! linked file by file into a scratch folder so a case can replace one file.

use std::path::{Path, PathBuf};

mod common;
use common::*;

fn minilm() -> PathBuf {
    let dir = std::env::var_os("DROPWISE_ASSETS").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")).join("all-MiniLM-L6-v2");
    assert!(dir.join("model.safetensors").exists(), "{} is missing: run `python3 scripts/fetch_assets.py --minilm` first", dir.display());
    dir
}

/// A scratch copy of the folder: every file a link to the real one, `config.json` a copy.
fn scratch(d: &Path) -> PathBuf {
    let src = minilm();
    let out = d.join("encoder");
    std::fs::create_dir_all(out.join("1_Pooling")).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"] {
        std::os::unix::fs::symlink(src.join(f), out.join(f)).unwrap();
    }
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    out
}

fn text(d: &Path) -> PathBuf {
    let p = d.join("s.txt");
    std::fs::write(&p, "She came.\nHe did not.\n").unwrap();
    p
}

fn embed(model: &Path, data: &Path, extra: &[&str]) -> Outcome {
    dropwise([&["embed", model.to_str().unwrap(), "--data", data.to_str().unwrap()][..], extra].concat())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn control_the_scratch_folder_embeds() {
    let d = tempfile::tempdir().unwrap();
    let m = scratch(d.path());
    let o = embed(&m, &text(d.path()), &["--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["sentences"], 2);
    assert_eq!(v["dimension"], 384);
}

#[test]
fn broken_encoder_folders_are_refused() {
    let cases: Vec<(&str, Box<dyn Fn(&Path)>, &[&str])> = vec![
        ("unknown model_type", Box::new(|m| edit_config(m, |v| v["model_type"] = "roberta".into())), &["model_type \"roberta\""]),
        ("no model_type", Box::new(|m| edit_config(m, |v| drop(v.as_object_mut().unwrap().remove("model_type")))), &["model_type \"\""]),
        ("heads do not divide hidden", Box::new(|m| edit_config(m, |v| v["num_attention_heads"] = 7.into())), &["not a multiple"]),
        ("more layers than the file", Box::new(|m| edit_config(m, |v| v["num_hidden_layers"] = 7.into())), &["missing tensor encoder.layer.6"]),
        ("vocabulary larger than the embedding", Box::new(|m| edit_config(m, |v| v["vocab_size"] = 40000.into())), &["word_embeddings", "expected [40000, 384]"]),
        ("huge size", Box::new(|m| edit_config(m, |v| v["hidden_size"] = 1u64.wrapping_shl(40).into())), &["not a usable size"]),
        ("relative positions", Box::new(|m| edit_config(m, |v| v["position_embedding_type"] = "relative_key".into())), &["position_embedding_type"]),
        ("unknown activation", Box::new(|m| edit_config(m, |v| v["hidden_act"] = "swish".into())), &["hidden_act"]),
        ("config not JSON", Box::new(|m| std::fs::write(m.join("config.json"), "{").unwrap()), &["not valid JSON"]),
        ("no tokenizer", Box::new(|m| std::fs::remove_file(m.join("tokenizer.json")).unwrap()), &["no tokenizer.json"]),
        ("tokenizer not JSON", Box::new(|m| { std::fs::remove_file(m.join("tokenizer.json")).unwrap(); std::fs::write(m.join("tokenizer.json"), "[").unwrap() }), &["tokenizer.json"]),
        ("no weights", Box::new(|m| std::fs::remove_file(m.join("model.safetensors")).unwrap()), &["safetensors"]),
        ("truncated weights", Box::new(|m| {
            std::fs::remove_file(m.join("model.safetensors")).unwrap();
            let bytes = std::fs::read(minilm().join("model.safetensors")).unwrap();
            std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap()
        }), &["safetensors"]),
    ];
    for (case, corrupt, needles) in cases {
        let d = tempfile::tempdir().unwrap();
        let m = scratch(d.path());
        corrupt(&m);
        assert_clean_error(case, &embed(&m, &text(d.path()), &[]), needles);
    }
}

#[test]
fn bad_embed_arguments_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = minilm();
    let t = text(d.path());
    assert_clean_error("batch 0", &embed(&m, &t, &["--batch", "0"]), &["--batch"]);
    assert_clean_error("limit 0", &embed(&m, &t, &["--limit", "0"]), &["--limit"]);
    assert_clean_error("bad split", &embed(&m, &t, &["--split", "words"]), &["--split"]);
    assert_clean_error("neighbours 0", &embed(&m, &t, &["--neighbours", "0"]), &["--neighbours"]);
    assert_clean_error("tome past half", &embed(&m, &t, &["--tome", "0.9"]), &["--tome", "(0, 0.5]"]);
    assert_clean_error("tome nan", &embed(&m, &t, &["--tome", "nan"]), &["--tome"]);
    assert_clean_error("hired keep 1.5", &embed(&m, &t, &["--hired", "1.5"]), &["--hired", "(0, 1)"]);
    assert_clean_error("hired in 0 layers", &embed(&m, &t, &["--hired", "0.5", "--hired-layers", "0"]), &["--hired-layers must be at least 1"]);
    assert_clean_error("hired in 9 of 6 layers", &embed(&m, &t, &["--hired", "0.5", "--hired-layers", "9"]), &["--hired", "1 to 6 layers"]);
    assert_clean_error("tome and hired", &embed(&m, &t, &["--tome", "0.1", "--hired", "0.5"]), &["--tome", "--hired"]);
    assert_clean_error("reference missing", &embed(&m, &t, &["--reference", d.path().join("none").to_str().unwrap()]), &["none"]);
    assert_clean_error("no data", &dropwise(["embed", m.to_str().unwrap()]), &["--data"]);
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "\n\n  \n").unwrap();
    assert_clean_error("blank text", &embed(&m, &empty, &[]), &["no sentence"]);
    assert_clean_error("missing text", &embed(&m, &d.path().join("nope.txt"), &[]), &["nope.txt"]);
    assert_clean_error("a GGUF file", &embed(&t, &t, &[]), &["not a folder"]);
    // The decoder commands point at embed.
    let o = dropwise(["eval", m.to_str().unwrap(), "--data", t.to_str().unwrap()]);
    assert_clean_error("eval on an encoder", &o, &["encoder", "dropwise embed"]);
}
