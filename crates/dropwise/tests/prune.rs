//! Weight pruning on tiny models and matrices: exact zero counts per row and per N:M group,
//! SparseGPT's reconstruction beating Wanda and magnitude, the linear algebra under SparseGPT,
//! sequential vs one-shot calibration, OWL budgets, and the exported file.

use anyhow::Result;
use candle_core::{Device, Tensor};
use dropwise::config::Arch;
use dropwise::data::SplitMix64;
use dropwise::prune::{mask, prune, prune_weights, sparsegpt, Allocation, Method, Pattern, PruneOptions};
use dropwise::testing::{tiny_config, tiny_model, TINY_VOCAB};

fn windows(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut r = SplitMix64(seed);
    (0..n).map(|_| (0..len).map(|_| r.below(TINY_VOCAB as u64) as u32).collect()).collect()
}

fn gaussian(r: &mut SplitMix64) -> f32 {
    let u1 = ((r.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = r.unit_f64();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

const METHODS: [Method; 3] = [Method::Magnitude, Method::Wanda, Method::SparseGpt];

#[test]
fn every_pruned_matrix_has_exactly_the_requested_zeros() -> Result<()> {
    let patterns = [Pattern::Unstructured(0.5), Pattern::Unstructured(0.6), Pattern::NM { n: 2, m: 4 }, Pattern::NM { n: 4, m: 8 }];
    for method in METHODS {
        for pattern in patterns {
            let mut m = tiny_model(tiny_config(Arch::Llama), 1)?;
            let report = prune(&mut m, &windows(3, 32, 2), &PruneOptions::new(method, pattern), &mut |_| {})?;
            assert_eq!(report.matrices.len(), 3 * 7);
            for b in &m.blocks {
                for (kind, lin) in b.linears() {
                    let w: Vec<f32> = lin.weight.flatten_all()?.to_vec1()?;
                    let cols = lin.in_features();
                    for row in w.chunks(cols) {
                        match pattern {
                            Pattern::Unstructured(s) => {
                                let z = row.iter().filter(|&&x| x == 0.0).count();
                                assert_eq!(z, (s * cols as f64).round() as usize, "{method:?} {pattern:?} {kind:?}");
                            }
                            Pattern::NM { n, m } => {
                                for g in row.chunks(m) {
                                    assert_eq!(g.iter().filter(|&&x| x != 0.0).count(), n, "{method:?} {pattern:?} {kind:?}");
                                }
                            }
                        }
                    }
                }
            }
            assert!((report.achieved_sparsity - pattern.sparsity()).abs() < 0.01, "{method:?} {pattern:?}: {}", report.achieved_sparsity);
            // Embeddings, norms and the head stay dense.
            assert_eq!(m.embed.flatten_all()?.to_vec1::<f32>()?.iter().filter(|&&x| x == 0.0).count(), 0);
        }
    }
    Ok(())
}

/// Calibration inputs with what makes LLM activations hard: correlated channels and a few
/// channels with large magnitude (outlier features).
fn llm_like_inputs(tokens: usize, cols: usize, seed: u64) -> Tensor {
    let mut r = SplitMix64(seed);
    let basis: Vec<f32> = (0..8 * cols).map(|_| gaussian(&mut r)).collect();
    let mut x = vec![0f32; tokens * cols];
    for t in 0..tokens {
        let z: Vec<f32> = (0..8).map(|_| gaussian(&mut r)).collect();
        for j in 0..cols {
            let mut v = 0.3 * gaussian(&mut r);
            for (k, zk) in z.iter().enumerate() {
                v += zk * basis[k * cols + j];
            }
            if j % 17 == 3 {
                v *= 20.0;
            }
            x[t * cols + j] = v;
        }
    }
    Tensor::from_vec(x, (tokens, cols), &Device::Cpu).unwrap()
}

fn reconstruction_error(w: &[f32], wp: &[f32], rows: usize, cols: usize, x: &Tensor) -> f64 {
    let w = Tensor::from_vec(w.to_vec(), (rows, cols), &Device::Cpu).unwrap();
    let wp = Tensor::from_vec(wp.to_vec(), (rows, cols), &Device::Cpu).unwrap();
    let d = x.matmul(&(w - wp).unwrap().t().unwrap()).unwrap();
    d.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

#[test]
fn sparsegpt_reconstructs_better_than_wanda_and_magnitude() -> Result<()> {
    let (rows, cols, tokens) = (48, 256, 1024);
    let x = llm_like_inputs(tokens, cols, 3);
    let mut r = SplitMix64(4);
    let w: Vec<f32> = (0..rows * cols).map(|_| gaussian(&mut r)).collect();
    for pattern in [Pattern::Unstructured(0.5), Pattern::Unstructured(0.6), Pattern::NM { n: 2, m: 4 }] {
        let err = |method| {
            let mut wp = w.clone();
            prune_weights(method, &mut wp, rows, cols, &x, pattern).unwrap();
            reconstruction_error(&w, &wp, rows, cols, &x)
        };
        let (mag, wanda, sgpt) = (err(Method::Magnitude), err(Method::Wanda), err(Method::SparseGpt));
        assert!(sgpt < wanda && wanda < mag, "{pattern:?}: ‖WX−ŴX‖² sparsegpt {sgpt:.1}, wanda {wanda:.1}, magnitude {mag:.1}");
    }
    Ok(())
}

#[test]
fn inverse_hessian_factor_is_the_cholesky_of_the_damped_inverse() -> Result<()> {
    let n = 40;
    let x = llm_like_inputs(200, n, 5);
    let h: Vec<f64> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| v as f64).collect();
    let (u, dead) = sparsegpt::inverse_hessian_factor(&h, n)?;
    assert!(dead.iter().all(|d| !d));
    let damp = sparsegpt::PERCDAMP * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    // (UᵀU)(H + λI) = I
    for i in 0..n {
        for j in 0..n {
            assert!(j >= i || u[i * n + j] == 0.0, "U is upper triangular");
            let mut s = 0.0;
            for k in 0..n {
                let utu: f64 = (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum();
                s += utu * (h[k * n + j] + if k == j { damp } else { 0.0 });
            }
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((s - want).abs() < 1e-6, "({i},{j}): {s}");
        }
    }
    let mut bad = vec![1.0, 2.0, 2.0, 1.0];
    assert!(sparsegpt::cholesky_lower(&mut bad, 2).is_err(), "an indefinite matrix is refused");
    Ok(())
}

/// The blocked Cholesky and triangular inverse (GEMM trailing updates, row-chunk staircases)
/// give the unblocked results, at sizes that leave partial blocks and partial row chunks.
#[test]
fn blocked_factorization_matches_unblocked() -> Result<()> {
    for (n, nb) in [(300usize, 16usize), (517, 128), (64, 7)] {
        let x = llm_like_inputs(2 * n, n, 9);
        let mut h: Vec<f64> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| v as f64).collect();
        for i in 0..n {
            h[i * n + i] += 1.0;
        }
        let (mut blocked, mut plain) = (h.clone(), h.clone());
        sparsegpt::cholesky_lower_blocked(&mut blocked, n, nb)?;
        sparsegpt::cholesky_lower_blocked(&mut plain, n, n)?;
        let scale = plain.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = blocked.iter().zip(&plain).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-10 * scale, "n {n}, block {nb}: Cholesky differs by {diff} (scale {scale})");
        // L · Lᵀ = H on the lower triangle.
        for i in (0..n).step_by(7) {
            for j in 0..=i {
                let s: f64 = (0..=j).map(|k| blocked[i * n + k] * blocked[j * n + k]).sum();
                assert!((s - h[i * n + j]).abs() <= 1e-9 * h[i * n + i].abs().max(1.0), "({i},{j})");
            }
        }
        let mut inv_plain = plain.clone();
        sparsegpt::invert_lower_blocked(&mut blocked, n, nb)?;
        sparsegpt::invert_lower_blocked(&mut inv_plain, n, n)?;
        let scale = inv_plain.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = blocked.iter().zip(&inv_plain).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-9 * scale, "n {n}, block {nb}: inverse differs by {diff} (scale {scale})");
        // L⁻¹ · L = I.
        for i in (0..n).step_by(5) {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| blocked[i * n + k] * plain[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-8, "n {n}: (L⁻¹L)[{i}][{j}] = {s}");
            }
        }
    }
    Ok(())
}

#[test]
fn masks_pick_the_lowest_scores() -> Result<()> {
    let scores = [5.0f32, 1.0, 3.0, 2.0, 8.0, 0.5, 7.0, 6.0];
    let m = mask::select(&scores, 1, 8, Pattern::Unstructured(0.5))?;
    assert_eq!(m, vec![false, true, true, true, false, true, false, false]);
    let m = mask::select(&scores, 2, 4, Pattern::NM { n: 2, m: 4 })?;
    assert_eq!(m, vec![false, true, false, true, false, true, false, true]);
    assert!(Pattern::parse_nm("4:2").is_err() && Pattern::parse_nm("2-4").is_err() && Pattern::unstructured(1.0).is_err());
    assert!(mask::select(&scores, 1, 8, Pattern::NM { n: 2, m: 3 }).is_err(), "8 columns do not split into groups of 3");
    Ok(())
}

#[test]
fn one_shot_and_sequential_differ_only_in_where_statistics_come_from() -> Result<()> {
    let w = windows(2, 40, 9);
    let opts = |one_shot| PruneOptions { one_shot, ..PruneOptions::new(Method::SparseGpt, Pattern::Unstructured(0.5)) };
    let mut a = tiny_model(tiny_config(Arch::Qwen2), 10)?;
    let mut b = a.clone();
    prune(&mut a, &w, &opts(false), &mut |_| {})?;
    prune(&mut b, &w, &opts(true), &mut |_| {})?;
    // Block 0's q/k/v see the same (embedding) inputs either way; later layers do not.
    let q = |m: &dropwise::model::Llama, l: usize| m.blocks[l].q.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(q(&a, 0), q(&b, 0));
    assert_ne!(q(&a, 2), q(&b, 2));
    Ok(())
}

#[test]
fn owl_keeps_the_mean_and_stays_within_lambda() -> Result<()> {
    let mut m = tiny_model(tiny_config(Arch::Llama), 11)?;
    let opts = PruneOptions { allocation: Allocation::Owl, ..PruneOptions::new(Method::Wanda, Pattern::Unstructured(0.6)) };
    let r = prune(&mut m, &windows(2, 32, 12), &opts, &mut |_| {})?;
    let mean = r.layer_sparsity.iter().sum::<f64>() / r.layer_sparsity.len() as f64;
    assert!((mean - 0.6).abs() < 1e-9, "mean layer sparsity {mean}");
    // As in OWL's reference code, outlier ratios are scaled onto a span of 2λ and centred on the
    // target, so the layer sparsities span at most 2λ.
    let (lo, hi) = r.layer_sparsity.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &s| (l.min(s), h.max(s)));
    assert!(hi - lo <= 2.0 * 0.08 + 1e-9 && hi - lo > 0.0, "span {}", hi - lo);
    let ratio = r.outlier_ratio.as_ref().unwrap();
    // The layer with the most outliers is pruned least.
    let most = (0..ratio.len()).max_by(|&a, &b| ratio[a].total_cmp(&ratio[b])).unwrap();
    let least = (0..r.layer_sparsity.len()).min_by(|&a, &b| r.layer_sparsity[a].total_cmp(&r.layer_sparsity[b])).unwrap();
    assert_eq!(most, least);
    let mut m2 = tiny_model(tiny_config(Arch::Llama), 11)?;
    let nm = PruneOptions { allocation: Allocation::Owl, ..PruneOptions::new(Method::Wanda, Pattern::NM { n: 2, m: 4 }) };
    assert!(prune(&mut m2, &windows(1, 16, 1), &nm, &mut |_| {}).is_err(), "OWL with N:M is refused");
    Ok(())
}

#[test]
fn pq_index_matches_hand_computed_values() {
    use dropwise::analyze::pq_index;
    // One non-zero of four: ‖w‖₁ = ‖w‖₂ = 1, I = 1 − 4^{1/2 − 1} = 0.5.
    assert!((pq_index(&[0.0, 3.0, 0.0, 0.0], 1.0, 2.0) - 0.5).abs() < 1e-12);
    // A flat vector is incompressible: I = 0.
    assert!(pq_index(&[2.0, -2.0, 2.0, 2.0], 1.0, 2.0).abs() < 1e-12);
    // w = (1, 2): ‖w‖₁ = 3, ‖w‖₂ = √5, I = 1 − 2^{−1/2}·3/√5.
    let want = 1.0 - 2f64.powf(-0.5) * 3.0 / 5f64.sqrt();
    assert!((pq_index(&[1.0, 2.0], 1.0, 2.0) - want).abs() < 1e-12);
    // p = 0.5, q = 1 on (1, 4): 1 − 2^{1 − 2}·(1 + 2)²/5.
    let want = 1.0 - 0.5 * 9.0 / 5.0;
    assert!((pq_index(&[1.0, 4.0], 0.5, 1.0) - want).abs() < 1e-12);
    // Pruning the smallest weights raises the index (sparser is more compressible).
    let w: Vec<f32> = (1..=100).map(|i| i as f32).collect();
    let mut p = w.clone();
    p[..50].fill(0.0);
    assert!(pq_index(&p, 1.0, 2.0) > pq_index(&w, 1.0, 2.0));
}

#[test]
fn analyze_reports_every_layer_and_a_valid_page() -> Result<()> {
    let m = tiny_model(tiny_config(Arch::Llama), 30)?;
    let rows = dropwise::analyze::analyze(&m, &windows(2, 24, 31), &mut |_| {})?;
    assert_eq!(rows.len(), m.blocks.len());
    for r in &rows {
        assert!(r.pq_index > 0.0 && r.pq_index < 1.0);
        assert_eq!(r.pq_index_by_matrix.len(), 7);
        assert!((0.0..=1.0).contains(&r.outlier_ratio));
        assert!(r.block_influence.is_finite() && r.act_norm_max >= r.act_norm_mean);
    }
    let page = dropwise::analyze::html_report("tiny", &rows, "2 windows");
    assert_eq!(page.matches("<svg").count(), 5);
    assert_eq!(page.matches("<tr>").count(), m.blocks.len() + 1);
    Ok(())
}

#[test]
fn rd_dynamic_program_finds_the_optimum_and_meets_the_budget_exactly() -> Result<()> {
    use dropwise::prune::rd_allocate;
    // Hand-built: layer 0 is fragile (distortion climbs fast), layer 2 robust.
    let offsets = [-2, -1, 0, 1, 2];
    let dist = vec![
        vec![1.0, 2.0, 4.0, 16.0, 64.0],
        vec![1.0, 1.5, 2.0, 3.0, 5.0],
        vec![1.0, 1.1, 1.2, 1.3, 1.4],
    ];
    let c = rd_allocate(&dist, &offsets)?;
    assert_eq!(c.iter().map(|&i| offsets[i]).sum::<i32>(), 0, "budget met exactly");
    // Brute force over all 125 choices.
    let mut best = (f64::INFINITY, vec![]);
    for a in 0..5 {
        for b in 0..5 {
            for d in 0..5 {
                if offsets[a] + offsets[b] + offsets[d] == 0 {
                    let v = dist[0][a] + dist[1][b] + dist[2][d];
                    if v < best.0 {
                        best = (v, vec![a, b, d]);
                    }
                }
            }
        }
    }
    let got: f64 = c.iter().enumerate().map(|(l, &i)| dist[l][i]).sum();
    assert!((got - best.0).abs() < 1e-12, "DP {got} vs brute force {}", best.0);
    assert_eq!(c, vec![0, 2, 4], "fragile layer pruned least, robust layer most");
    // Random tables: the DP always matches brute force.
    let mut r = SplitMix64(77);
    for _ in 0..50 {
        let dist: Vec<Vec<f64>> = (0..4).map(|_| (0..5).map(|_| r.below(1000) as f64).collect()).collect();
        let c = rd_allocate(&dist, &offsets)?;
        let got: f64 = c.iter().enumerate().map(|(l, &i)| dist[l][i]).sum();
        let mut bf = f64::INFINITY;
        for code in 0..625usize {
            let ch: Vec<usize> = (0..4).map(|l| code / 5usize.pow(l) % 5).collect();
            if ch.iter().map(|&i| offsets[i]).sum::<i32>() == 0 {
                bf = bf.min(ch.iter().enumerate().map(|(l, &i)| dist[l][i]).sum());
            }
        }
        assert_eq!(got, bf);
    }
    assert!(rd_allocate(&dist[..1], &[1, 2]).is_err(), "an unreachable budget is refused");
    Ok(())
}

#[test]
fn rd_allocation_prunes_to_the_exact_global_sparsity() -> Result<()> {
    for method in [Method::Wanda, Method::SparseGpt] {
        let mut m = tiny_model(tiny_config(Arch::Llama), 40)?;
        let opts = PruneOptions { allocation: Allocation::Rd, ..PruneOptions::new(method, Pattern::Unstructured(0.6)) };
        let r = prune(&mut m, &windows(2, 32, 41), &opts, &mut |_| {})?;
        let mean = r.layer_sparsity.iter().sum::<f64>() / 3.0;
        assert!((mean - 0.6).abs() < 1e-9, "{method:?}: mean layer sparsity {mean}");
        let dist = r.rd_distortion.as_ref().unwrap();
        // Pruning more distorts more (not always strictly step by step: the output responds
        // nonlinearly), and nothing is distorted without pruning.
        for row in dist {
            assert!(row.last().unwrap() > row.first().unwrap() && row.iter().all(|d| d.is_finite() && *d > 0.0), "{row:?}");
        }
        assert!((r.achieved_sparsity - 0.6).abs() < 0.01);
    }
    Ok(())
}
