//! Parity with Hugging Face transformers on the real all-MiniLM-L6-v2 (fetched by
//! `scripts/fetch_assets.py --minilm`, which the README's test command runs). The golden files
//! come from `scripts/golden/make_minilm_golden.py`: transformers' token ids of the first 1,000
//! sentences of persuasion.txt and sentence-transformers' embeddings of the first 100. These
//! tests fail, not skip, when the asset is missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dropwise::model::bert::{Bert, Pooling};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> &'static Bert {
    static M: OnceLock<Bert> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::var_os("DROPWISE_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("assets")).join("all-MiniLM-L6-v2");
        assert!(dir.join("model.safetensors").exists(), "{} is missing: run `python3 scripts/fetch_assets.py --minilm` first", dir.display());
        Bert::load(&dir).expect("load all-MiniLM-L6-v2")
    })
}

fn golden() -> &'static serde_json::Value {
    static G: OnceLock<serde_json::Value> = OnceLock::new();
    G.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/minilm/sentences.json")).unwrap()).unwrap())
}

fn texts() -> Vec<String> {
    golden()["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

#[test]
fn the_folder_reads_as_sentence_transformers_configures_it() {
    let m = model();
    assert_eq!((m.config.num_hidden_layers, m.config.hidden_size, m.config.num_attention_heads), (6, 384, 12));
    assert_eq!(m.pooling, Pooling::Mean);
    assert!(m.normalize);
    assert_eq!(m.max_seq_len, 256);
    // Every F32 tensor of model.safetensors but the pooler (which sentence embeddings skip).
    assert_eq!(m.param_count(), 22_565_376);
}

#[test]
fn protocol_sentences_are_the_ones_the_golden_file_was_made_from() {
    let text = dropwise::data::read_text(&root().join("assets/austen/persuasion.txt")).unwrap();
    let ours: Vec<String> = dropwise::data::sentences(&text).into_iter().take(1000).collect();
    assert_eq!(ours, texts());
}

#[test]
fn token_ids_match_transformers_on_1000_sentences() {
    let want = golden()["ids"].as_array().unwrap();
    let texts = texts();
    assert_eq!(texts.len(), 1000);
    for (i, (t, w)) in texts.iter().zip(want).enumerate() {
        let w: Vec<u32> = w.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(model().encode(t).unwrap(), w, "sentence {i}: {t:?}");
    }
}

#[test]
fn embeddings_match_sentence_transformers_on_100_sentences() {
    let bytes = std::fs::read(root().join("tests/golden/minilm/embeddings100.f32")).unwrap();
    let want: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let texts = texts();
    let ids: Vec<Vec<u32>> = texts[..100].iter().map(|t| model().encode(t).unwrap()).collect();
    // Batched (padded, masked) and one sentence at a time must both hold.
    for batch in [32, 1] {
        let got = model().embed(&ids, batch, &mut |_| {}).unwrap();
        let mut worst = 1.0f64;
        for (i, g) in got.iter().enumerate() {
            let w = &want[i * 384..(i + 1) * 384];
            let dot: f64 = g.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum();
            let (na, nb) = (g.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt(), w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt());
            worst = worst.min(dot / (na * nb));
        }
        assert!(worst >= 0.99999, "batch {batch}: worst cosine {worst}");
        eprintln!("batch {batch}: worst cosine to sentence-transformers 1 - {:.2e}", 1.0 - worst);
    }
}

/// Token reduction: each sentence reduces by its own count, so its embedding is the same alone
/// and in a padded batch; FLOPs fall with the budget and the embeddings move away gradually.
#[test]
fn token_reduction_is_per_sentence_and_costs_what_it_saves() {
    use dropwise::model::token_reduction::TokenReduction;
    let texts = texts();
    let ids: Vec<Vec<u32>> = texts[..48].iter().map(|t| model().encode(t).unwrap()).collect();
    let (dense, dense_flops) = model().embed_reduced(&ids, 16, &TokenReduction::None, &mut |_| {}).unwrap();
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum::<f64>();
    let mut last_flops = dense_flops;
    for r in [TokenReduction::Merge { ratio: 0.05 }, TokenReduction::Merge { ratio: 0.2 }, TokenReduction::Drop { keep: 0.5, layers: 2 }] {
        let (batched, flops) = model().embed_reduced(&ids, 16, &r, &mut |_| {}).unwrap();
        let (alone, flops1) = model().embed_reduced(&ids, 1, &r, &mut |_| {}).unwrap();
        assert!((flops - flops1).abs() < 1e-6 * flops, "{r:?}: FLOPs depend on the batch");
        for (a, b) in batched.iter().zip(&alone) {
            assert!(cos(a, b) > 0.99999, "{r:?}: batch changes a sentence (cosine {})", cos(a, b));
        }
        assert!(flops < dense_flops, "{r:?} saves no FLOPs");
        let mean_cos = batched.iter().zip(&dense).map(|(a, b)| cos(a, b)).sum::<f64>() / ids.len() as f64;
        assert!(mean_cos > 0.5 && mean_cos < 0.99999, "{r:?}: mean cosine to dense {mean_cos}");
        if matches!(r, TokenReduction::Merge { .. }) {
            assert!(flops < last_flops, "a larger merge ratio saves less");
            last_flops = flops;
        }
    }
}
