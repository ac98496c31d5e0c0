//! Quantization: every type's quantize → dequantize error stays within its known bound, the
//! importance-matrix encoders lower the weighted error they target, plans meet their budget, and
//! the written file holds exactly the planned bits — as llama.cpp's own reader decodes it.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use dropwise::config::Arch;
use dropwise::formats::gguf::WriteDType;
use dropwise::model::io::{load, load_quantized};
use dropwise::model::{LinearId, Role};
use dropwise::quant::plan::{self, Importance, Imatrix};
use dropwise::quant::{dequantize, quantize_matrix, roundtrip, QType};
use dropwise::testing::{gguf_py_summary, tiny_config, tiny_model, write_tiny_gguf, TINY_VOCAB};

/// Gaussian-ish values (sum of uniforms) with a few large outliers, like trained weights.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = dropwise::data::SplitMix64(seed);
    let mut u = || r.unit_f64();
    (0..n)
        .map(|i| {
            let g = (0..4).map(|_| u()).sum::<f64>() - 2.0;
            (if i % 97 == 0 { 6.0 * g } else { g }) as f32 * 0.05
        })
        .collect()
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

#[test]
fn bits_per_weight_of_every_type() {
    let expect = [
        (QType::Q2K, 2.625),
        (QType::Q3K, 3.4375),
        (QType::Q4_0, 4.5),
        (QType::Q4_1, 5.0),
        (QType::Q4K, 4.5),
        (QType::Q5_0, 5.5),
        (QType::Q5_1, 6.0),
        (QType::Q5K, 5.5),
        (QType::Q6K, 6.5625),
        (QType::Q8_0, 8.5),
        (QType::F16, 16.0),
    ];
    for (t, b) in expect {
        assert_eq!(t.bits(), b, "{}", t.name());
        assert_eq!(QType::parse(&t.name().to_lowercase()).unwrap(), t);
    }
    assert!(QType::parse("Q3_0").is_err());
    // llama.cpp's fallbacks where k-quants do not fit rows of 576.
    assert_eq!(QType::Q4K.for_cols(576), Some(QType::Q5_0));
    assert_eq!(QType::Q6K.for_cols(576), Some(QType::Q8_0));
    assert_eq!(QType::Q4K.for_cols(1536), Some(QType::Q4K));
}

/// The 32-block types: every value is within its block's step of the original (half a step for
/// round-to-nearest, a whole one where ggml's symmetric types clamp the top level), plus f16
/// rounding of the scale.
#[test]
fn block_types_stay_within_their_step() {
    let (rows, cols) = (16, 256);
    let x = data(rows * cols, 1);
    for (ty, with_im) in [(QType::Q4_0, false), (QType::Q4_0, true), (QType::Q5_0, false), (QType::Q5_0, true), (QType::Q4_1, false), (QType::Q4_1, true), (QType::Q5_1, false), (QType::Q5_1, true), (QType::Q8_0, false)] {
        let im: Vec<f32> = (0..cols).map(|c| 1.0 + (c % 7) as f32).collect();
        let y = roundtrip(&x, rows, cols, ty, with_im.then_some(im.as_slice())).unwrap();
        for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let range = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max) - xb.iter().copied().fold(f32::INFINITY, f32::min);
            let bound = match ty {
                // The weighted search may stretch the scale by up to 9 tenths of a level.
                QType::Q4_0 => amax / (8.0 - 0.9) * 1.01,
                QType::Q5_0 => amax / (16.0 - 0.9) * 1.01,
                QType::Q4_1 => range / (15.0 - 0.9) * if with_im { 1.01 } else { 0.51 },
                QType::Q5_1 => range / (31.0 - 0.9) * if with_im { 1.01 } else { 0.51 },
                QType::Q8_0 => amax / 127.0 * 0.51,
                _ => unreachable!(),
            } + 1e-3 * amax;
            let err = xb.iter().zip(yb).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= bound, "{} (imatrix {with_im}) block {b}: error {err} > bound {bound}", ty.name());
        }
    }
}

/// k-quants: relative RMS error on this data within bounds set about 1.5× above what ggml's
/// quantizers reach on Gaussian weights (Q2_K ≈ 0.33, Q3_K ≈ 0.17, Q4_K ≈ 0.085, Q5_K ≈ 0.043,
/// Q6_K ≈ 0.021), and each type better than the one below it.
#[test]
fn k_quants_error_falls_with_bits() {
    let (rows, cols) = (8, 1536);
    let x = data(rows * cols, 2);
    let mut last = f64::INFINITY;
    for (ty, bound) in [(QType::Q2K, 0.5), (QType::Q3K, 0.26), (QType::Q4K, 0.13), (QType::Q5K, 0.065), (QType::Q6K, 0.032), (QType::Q8_0, 0.01), (QType::F16, 1e-3)] {
        let y = roundtrip(&x, rows, cols, ty, None).unwrap();
        let e: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
        let rel = rms(&e) / rms(&x);
        assert!(rel < bound, "{}: relative RMS error {rel}", ty.name());
        assert!(rel < last, "{} is not better than the type below it", ty.name());
        last = rel;
    }
}

#[test]
fn importance_matrix_lowers_the_weighted_error() {
    let (rows, cols) = (32, 512);
    let x = data(rows * cols, 3);
    // A few input channels carry most of the activation energy.
    let im: Vec<f32> = (0..cols).map(|c| if c % 16 == 3 { 50.0 } else { 0.2 }).collect();
    let werr = |y: &[f32]| -> f64 { x.iter().zip(y).enumerate().map(|(i, (a, b))| im[i % cols] as f64 * ((a - b) as f64).powi(2)).sum() };
    for ty in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q2K, QType::Q3K, QType::Q4K, QType::Q5K, QType::Q6K] {
        let plain = werr(&roundtrip(&x, rows, cols, ty, None).unwrap());
        let weighted = werr(&roundtrip(&x, rows, cols, ty, Some(&im)).unwrap());
        assert!(weighted < 0.9 * plain, "{}: weighted error {weighted} vs {plain} without the imatrix", ty.name());
    }
}

#[test]
fn bad_shapes_are_refused() {
    let x = data(2 * 576, 4);
    assert!(quantize_matrix(&x, 2, 576, QType::Q4K, None).unwrap_err().to_string().contains("multiple of 256"));
    assert!(quantize_matrix(&x, 3, 576, QType::Q4_0, None).is_err());
    assert!(quantize_matrix(&x, 2, 576, QType::Q4_0, Some(&[1.0; 10])).is_err());
    assert!(dequantize(&[0u8; 7], 1, 32, QType::Q4_0).is_err());
}

fn model_for_plans() -> dropwise::model::Llama {
    let mut c = tiny_config(Arch::Llama);
    c.num_hidden_layers = 6;
    c.hidden_size = 64;
    c.intermediate_size = 256; // down_proj rows of 256: k-quants fit there only
    tiny_model(c, 7).unwrap()
}

#[test]
fn plans_meet_the_budget_and_follow_importance() {
    let m = model_for_plans();
    let base = plan::units(&m).unwrap();
    let (lo, hi) = plan::feasible_range(&base);
    assert!(lo < 4.2 && hi == 16.0, "range {lo}..{hi}");
    let importance = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2];
    for bpw in [lo, 4.5, 4.8, 5.25, 5.6, 6.0, 7.0, 8.5, 12.0, hi] {
        let mut u = base.clone();
        plan::allocate(&mut u, &importance, bpw).unwrap();
        let got = plan::bits_per_weight(&u);
        assert!((got - bpw).abs() <= plan::BPW_TOLERANCE && got <= bpw + 1e-9, "budget {bpw}: plan has {got}");
        // A more important layer never gets fewer bits than a less important one.
        let layer_bits = |l: usize| plan::bits_per_weight(&u.iter().filter(|x| x.layer == l).cloned().collect::<Vec<_>>());
        for a in 0..6 {
            for b in 0..6 {
                if importance[a] > importance[b] {
                    assert!(layer_bits(a) >= layer_bits(b) - 1e-9, "budget {bpw}: layer {a} has fewer bits than less important {b}");
                }
            }
        }
        // Rows that are not a multiple of 256 never get a k-quant.
        assert!(u.iter().all(|x| x.ty.fits(x.cols)));
    }
    for bad in [lo - 0.2, hi + 1.0, f64::NAN] {
        let err = plan::allocate(&mut base.clone(), &importance, bad).unwrap_err().to_string();
        assert!(err.contains("cannot be met") && err.contains(&format!("{lo:.3}")), "{err}");
    }
}

#[test]
fn written_file_holds_the_planned_bits_and_llama_cpp_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model_for_plans(), &src, WriteDType::F32).unwrap();
    let loaded = load(&src).unwrap();
    let windows: Vec<Vec<u32>> = (0..3).map(|s| {
        let mut r = dropwise::data::SplitMix64(50 + s);
        (0..48).map(|_| r.below(TINY_VOCAB as u64) as u32).collect()
    }).collect();
    let mut model = loaded.model.clone();
    let im = Imatrix::collect(&model, &windows, &mut |_| {}).unwrap();
    assert_eq!(im.get(LinearId::new(2, Role::DOWN)).unwrap().len(), 256);
    for importance in [Importance::Lim, Importance::Outliers, Importance::Kld] {
        let sc = plan::score_layers(&mut model, &windows, importance, Some(&im), &mut |_, _| {}).unwrap();
        assert_eq!(sc.raw.len(), 6);
        assert!(sc.raw.iter().all(|v| v.is_finite() && *v >= 0.0), "{importance:?}: {:?}", sc.raw);
        let mut u = plan::units(&model).unwrap();
        plan::allocate(&mut u, &sc.rank_key, 5.3).unwrap();
        let out = dir.path().join(format!("q-{importance:?}.gguf"));
        let w = plan::write(&loaded, &model, &u, Some(&im), QType::Q8_0, &out, &BTreeMap::new()).unwrap();
        assert!((w.bpw_in_file - plan::bits_per_weight(&u)).abs() < 1e-12);
        // llama.cpp's reader decodes every quantized tensor to what candle's decoders give.
        let s = gguf_py_summary(&out);
        let q = dropwise::formats::gguf::GgufFile::open(&out).unwrap();
        for info in &q.tensors {
            let t = &s["tensors"][&info.name];
            assert_eq!(t["type"].as_str().unwrap(), dropwise::formats::gguf::ggml_dtype_name(info.dtype), "{}", info.name);
            let ours: f64 = q.dequantize(info).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let theirs = t["abs_sum"].as_f64().unwrap();
            assert!((ours - theirs).abs() <= 1e-4 * theirs.max(1.0), "{}: |x| sums {ours} vs {theirs}", info.name);
        }
        // Keeping the blocks quantized computes the function of the decoded weights, up to the
        // 8-bit rounding of the activations that quantized matmuls do (llama.cpp's arithmetic);
        // both forward paths of a quantized linear agree (`quantized_linear_paths_agree...`).
        let deq = load(&out).unwrap().model;
        let qm = load_quantized(&out).unwrap().model;
        assert!(qm.blocks[0].q.quantized.is_some() && qm.blocks[0].down.quantized.is_some());
        assert_eq!(qm.head_stored_as, Some(candle_core::quantized::GgmlDType::Q8_0), "the head input is rounded as for its stored type");
        let rel_diff = |a: &Tensor, b: &Tensor| {
            ((a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
                / a.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sqrt()
        };
        let ids = Tensor::new(windows[0].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let rel = rel_diff(&deq.forward(&ids).unwrap(), &qm.forward(&ids).unwrap());
        assert!(rel > 0.0 && rel < 0.05, "{importance:?}: quantized-matmul logits off by {rel}");
        // Single-token steps take candle's quantized matmul path.
        let one = Tensor::new(&windows[0][..1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let rel = rel_diff(&deq.forward(&one).unwrap(), &qm.forward(&one).unwrap());
        assert!(rel < 0.05, "{importance:?}: decode-path logits off by {rel}");
        // Decoding on demand (eval's bounded-memory load) is the f32 model of record: the same
        // logits as the full f32 load, with no f32 copy of the weights, embedding or head kept.
        let dm = dropwise::model::io::load_decoded(&out).unwrap().model;
        assert!(dm.embed_quantized.is_some() && dm.head_quantized.is_some() && !dm.blocks[1].up.is_dense());
        assert_eq!(dm.embed.stride(), &[0, 0], "the embedding is a placeholder");
        for x in [&ids, &one] {
            let d = (deq.forward(x).unwrap() - dm.forward(x).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-5, "{importance:?}: decoded-on-demand logits differ from the f32 load by {d}");
        }
    }
}

/// The worst disagreement, relative to the output's scale, between the short path (`short`, a
/// function of the few-row input) and the long path (decode + f32 GEMM on rounded activations)
/// of a quantized `[out, inp]` linear, for every block type that fits the shape; also how far
/// plain f32 activations would be. Asserts the two paths agree within 1e-4 of the scale.
fn check_paths_agree(
    label: &str,
    short: &dyn Fn(&Tensor, &std::sync::Arc<candle_core::quantized::QTensor>) -> Tensor,
) {
    use candle_core::quantized::{GgmlDType as G, QTensor};
    use dropwise::model::{kernels, QMATMUL_MAX_ROWS};
    // One shape every type fits (k-quant rows of 256, candle's 16-row tiles), one only the
    // 32-block types fit (SmolLM2's hidden width).
    for (out, inp, seed) in [(64usize, 512usize, 11u64), (40, 576, 13)] {
        let rows = 40;
        let w = Tensor::from_vec(data(out * inp, seed), (out, inp), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(data(rows * inp, seed + 1).iter().map(|v| v * 20.0).collect::<Vec<_>>(), (rows, inp), &Device::Cpu).unwrap();
        for dtype in [G::Q4_0, G::Q4_1, G::Q5_0, G::Q5_1, G::Q8_0, G::Q2K, G::Q3K, G::Q4K, G::Q5K, G::Q6K] {
            if inp % dtype.block_size() != 0 {
                continue;
            }
            let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let long = kernels::quantized_product(&x, &q).unwrap();
            let steps: Vec<Tensor> =
                (0..rows).step_by(QMATMUL_MAX_ROWS).map(|r| short(&x.narrow(0, r, QMATMUL_MAX_ROWS.min(rows - r)).unwrap(), &q)).collect();
            let one = short(&x.narrow(0, 0, 1).unwrap(), &q); // a single decode row
            let short = Tensor::cat(&steps, 0).unwrap();
            let scale = short.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (&long - &short).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d1 = (&long.narrow(0, 0, 1).unwrap() - &one).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // Plain f32 activations would be off by the 8-bit rounding, ~1e-2 of the scale.
            let plain = x.matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap();
            let dp = (&plain - &short).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{label} [{out}x{inp}] {dtype:?}: rounded {:.2e}, plain {:.2e} (scale {scale:.3})", d.max(d1) / scale, dp / scale);
            assert!(d.max(d1) <= 1e-4 * scale, "{label} {dtype:?} [{out}x{inp}]: paths differ by {} (scale {scale})", d.max(d1));
        }
    }
}

/// The two forward paths of a quantized linear — the short path (≤ 16 rows, quantized dot
/// products on the tier `DROPWISE_SIMD` picks) and decode + f32 GEMM on activations rounded to
/// the type's 8-bit partner (longer inputs) — compute the same product, for every block type.
#[test]
fn quantized_linear_paths_agree_for_every_type() {
    use dropwise::model::{qmatmul, Linear};
    let label = format!(
        "{:?}{}",
        qmatmul::simd_path(),
        std::env::var("MISTRALRS_FORCE_AVX2").map(|_| "+candle-avx2").or(std::env::var("MISTRALRS_FORCE_AVXVNNI").map(|_| "+candle-avxvnni")).unwrap_or_default()
    );
    check_paths_agree(&label, &|x, q| {
        let (out, inp) = q.shape().dims2().unwrap();
        let lin = Linear { weight: Linear::shape_only(out, inp).unwrap(), bias: None, quantized: Some(q.clone()), spilled: None, adapter: None };
        lin.forward(x).unwrap()
    });
}

/// A quantized linear's forward on a long input (prefill: candle's int8 tiles for Q4_K/Q6_K on
/// VNNI CPUs, decode + GEMM otherwise) is the product of the decode path on rounded activations,
/// for every block type, at a width the tiles take and at one they refuse.
#[test]
fn quantized_linear_long_input_is_the_rounded_product() {
    use candle_core::quantized::{GgmlDType as G, QTensor};
    use dropwise::model::{kernels, qmatmul, Linear};
    for (out, inp, rows) in [(64usize, 512usize, 72usize), (48, 768, 40), (40, 512, 33)] {
        let w = Tensor::from_vec(data(out * inp, 21), (out, inp), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(data(rows * inp, 22).iter().map(|v| v * 20.0).collect::<Vec<_>>(), (rows, inp), &Device::Cpu).unwrap();
        for dtype in [G::Q4_0, G::Q4_1, G::Q5_0, G::Q5_1, G::Q8_0, G::Q2K, G::Q3K, G::Q4K, G::Q5K, G::Q6K] {
            let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let lin = Linear { weight: Linear::shape_only(out, inp).unwrap(), bias: None, quantized: Some(q.clone()), spilled: None, adapter: None };
            let got = lin.forward(&x).unwrap();
            let want = kernels::quantized_product(&x, &q).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("[{out}x{inp}] {rows} rows {dtype:?} tiles={}: {:.2e} of the scale", qmatmul::tiles_on_long_path(&q), d / scale);
            assert!(d <= 1e-4 * scale, "{dtype:?} [{out}x{inp}]: long input differs by {d} (scale {scale})");
        }
    }
}

/// Every kernel tier the short path can take agrees with the long path on this machine: the
/// scalar (reference) and AVX2 dot products and the native tier in this process, and candle's
/// repacked tiles forced down to their AVX-VNNI and AVX2 levels in child processes (candle reads
/// those switches once per process). candle's AVX-VNNI switch skips its own CPU check, so on a
/// CPU without AVX-VNNI (an AVX2-only EPYC, an AVX512-VNNI-only Ice Lake) forcing it would run
/// instructions the CPU lacks (SIGILL): that tier is checked only where the CPU has it.
#[test]
fn quantized_short_path_agrees_at_every_simd_tier() {
    use dropwise::model::qmatmul::{cpu_simd_features, short_product, SimdPath};
    eprintln!("cpu: {}", cpu_simd_features());
    {
        // The cause of issue 11, shown not asserted (it depends on the CPU): candle's own QMatMul
        // for Q8_0 weights, which on VNNI CPUs rounds the activations to Q8_K.
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        let (out, inp) = (64, 512);
        let w = Tensor::from_vec(data(out * inp, 11), (out, inp), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(data(4 * inp, 12).iter().map(|v| v * 20.0).collect::<Vec<_>>(), (4, inp), &Device::Cpu).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let ours = short_product(&x, &q, SimdPath::Native).unwrap();
        let theirs = candle_core::Module::forward(&QMatMul::from_arc(q.clone()).unwrap(), &x).unwrap();
        let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = ours.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("candle QMatMul on Q8_0 vs llama.cpp's product on this CPU: {:.2e} of the scale", d / scale);
    }
    for path in [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Native] {
        check_paths_agree(&format!("{path:?}"), &|x, q| short_product(x, q, path).unwrap());
    }
    let exe = std::env::current_exe().unwrap();
    for force in ["MISTRALRS_FORCE_AVXVNNI", "MISTRALRS_FORCE_AVX2"] {
        #[cfg(target_arch = "x86_64")]
        if force == "MISTRALRS_FORCE_AVXVNNI" && !std::is_x86_feature_detected!("avxvnni") {
            eprintln!("{force}=1 not run: this CPU has no AVX-VNNI");
            continue;
        }
        let out = std::process::Command::new(&exe)
            .args(["--exact", "quantized_linear_paths_agree_for_every_type", "--nocapture", "--test-threads", "1"])
            .env(force, "1")
            .env("DROPWISE_SIMD", "native")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        eprint!("{err}");
        assert!(out.status.success(), "{force}=1: the child test failed:\n{err}\n{}", String::from_utf8_lossy(&out.stdout));
        assert!(err.contains("Q8_0: rounded"), "{force}=1: the child test did not run:\n{err}");
    }
}
