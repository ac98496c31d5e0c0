//! Recovery on tiny random models of every architecture: distillation lowers the student's KL
//! to the teacher, pruned zeros survive training exactly, and a run is a function of its inputs.

use anyhow::Result;
use candle_core::Tensor;
use dropwise::config::Arch;
use dropwise::model::Llama;
use dropwise::recover::{recover, Loss, Params, RecoverOptions, RecoverReport};
use dropwise::testing::{tiny_config, tiny_model, tiny_tokenizer, sample_text};

fn windows(seq: usize, count: usize, seed: u64) -> Vec<Vec<u32>> {
    let ids = dropwise::data::tokenize_files(&tiny_tokenizer().unwrap(), &[write_text()]).unwrap();
    dropwise::data::calibration_windows(&ids, seq, count, seed, None).unwrap().1
}

fn write_text() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("dropwise-recover-{}.txt", std::process::id()));
    if !p.exists() {
        std::fs::write(&p, sample_text(20000)).unwrap();
    }
    p
}

/// A pruned model: half of every block linear's weights zeroed (the smaller ones,
/// as magnitude pruning would).
fn pruned(model: &Llama) -> Result<Llama> {
    let mut s = model.clone();
    for b in &mut s.blocks {
        for (_, l) in b.linears_mut() {
            let w = l.weight_f32()?;
            let v: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            mags.sort_by(f32::total_cmp);
            let cut = mags[mags.len() / 2];
            let kept: Vec<f32> = v.iter().map(|&x| if x.abs() < cut { 0.0 } else { x }).collect();
            l.set_weight(Tensor::from_vec(kept, w.dims(), w.device())?);
        }
    }
    Ok(s)
}

fn options(loss: Loss) -> RecoverOptions {
    RecoverOptions { loss, params: Params::All, seed: 0, dropout_samples: 0, dropout: 0.0, checkpoint: None, checkpoint_every: 0, resume: None, feature_weight: 1.0, lr: 3e-3, warmup: 2, accumulate: 2, clip: Some(1.0), temperature: 1.0, weight_decay: 0.0, eval_every: 4 }
}

/// Teacher and student: the student is a pruned model of another seed, so it starts far from the
/// teacher on every architecture (a tiny random model pruned from the teacher itself can start
/// within 1e-4 of it) and training has a distance to cover.
fn run(arch: Arch, loss: Loss) -> Result<(Llama, Llama, RecoverReport)> {
    let teacher = tiny_model(tiny_config(arch), 8)?;
    let mut student = pruned(&tiny_model(tiny_config(arch), 7)?)?;
    let train = windows(24, 24, 1);
    let eval = windows(24, 4, 99);
    let report = recover(&mut student, &teacher, &train, &eval, &options(loss), &mut |_| {})?;
    Ok((teacher, student, report))
}

fn zeros_of(m: &Llama) -> Vec<Vec<bool>> {
    m.blocks.iter().flat_map(|b| b.linears().map(|(_, l)| l.weight_f32().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&x| x == 0.0).collect()).collect::<Vec<_>>()).collect()
}

#[test]
fn distillation_lowers_kl_and_pruned_zeros_stay_zero_on_every_architecture() -> Result<()> {
    for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3] {
        let before = zeros_of(&pruned(&tiny_model(tiny_config(arch), 7)?)?);
        let (_, student, report) = run(arch, Loss::Kd)?;
        let (first, last) = (report.evals.first().unwrap(), report.evals.last().unwrap());
        assert!(report.evals.len() >= 3, "{arch:?}: evaluated before, during (every 4 updates) and after");
        assert!(
            last.kl_divergence < 0.8 * first.kl_divergence,
            "{arch:?}: held-out KL {:.4} -> {:.4} did not fall by a fifth",
            first.kl_divergence,
            last.kl_divergence
        );
        assert_eq!(zeros_of(&student), before, "{arch:?}: the zero pattern changed in training");
        assert!(report.masked_weights > 0 && !student.differentiable);
        assert_eq!(report.tokens, 24 * 24);
        assert_eq!(report.steps.len(), 12);
    }
    Ok(())
}

#[test]
fn the_same_inputs_give_the_same_weights() -> Result<()> {
    let (_, a, ra) = run(Arch::Qwen3, Loss::KdFeatures)?;
    let (_, b, rb) = run(Arch::Qwen3, Loss::KdFeatures)?;
    for ((na, ta), (_, tb)) in a.named_tensors()?.iter().zip(b.named_tensors()?.iter()) {
        let (va, vb) = (ta.flatten_all()?.to_vec1::<f32>()?, tb.flatten_all()?.to_vec1::<f32>()?);
        assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{na} differs between two identical runs");
    }
    let losses = |r: &RecoverReport| r.steps.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&ra), losses(&rb));
    Ok(())
}

#[test]
fn a_student_of_another_vocabulary_is_refused() -> Result<()> {
    let teacher = tiny_model(tiny_config(Arch::Llama), 7)?;
    let mut c = tiny_config(Arch::Llama);
    c.vocab_size += 1;
    let mut student = tiny_model(c, 7)?;
    let e = recover(&mut student, &teacher, &windows(24, 2, 1), &[], &options(Loss::Kd), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("vocabulary"), "{e}");
    Ok(())
}

/// Blocks dropped from the teacher itself: every loss heals the cut, `local` by training only
/// the blocks after each cut, and the pruned zeros of a pruned student survive each loss.
#[test]
fn every_loss_heals_a_dropped_run_of_blocks() -> Result<()> {
    use dropwise::structural::{surgery, Part};
    // (A tiny Gemma 3 barely notices a dropped block — its scaled embedding dominates the
    // residual stream, KL 0.002 — so the cut is tested where it costs something.)
    for arch in [Arch::Llama, Arch::Qwen3] {
        let mut c = tiny_config(arch);
        c.num_hidden_layers = 6;
        let teacher = tiny_model(c, 8)?;
        for loss in [Loss::Kd, Loss::KdFeatures, Loss::Local] {
            let mut student = teacher.clone();
            surgery::remove(&mut student, &[1, 2, 4], Part::Block)?;
            let report = recover(&mut student, &teacher, &windows(24, 24, 1), &windows(24, 4, 99), &options(loss), &mut |_| {})?;
            assert_eq!(report.block_map, vec![0, 3, 5]);
            // Block 0 is the teacher's, untouched; the blocks after the two cuts are changed.
            assert_eq!(report.changed_blocks, vec![1, 2], "{arch:?} {loss:?}");
            let (first, last) = (report.evals.first().unwrap().kl_divergence, report.evals.last().unwrap().kl_divergence);
            assert!(last < 0.8 * first, "{arch:?} {loss:?}: held-out KL {first:.4} -> {last:.4}");
        }
        let mut student = pruned(&teacher)?;
        let before = zeros_of(&student);
        for loss in [Loss::KdFeatures, Loss::Local] {
            recover(&mut student, &teacher, &windows(24, 4, 1), &[], &options(loss), &mut |_| {})?;
            assert_eq!(zeros_of(&student), before, "{arch:?} {loss:?}: the zero pattern changed");
        }
    }
    Ok(())
}

/// A LoRA adapter merged into its weight computes what the adapted layer computed, and a
/// pruned weight's mask applies to the adapter too.
#[test]
fn a_merged_lora_adapter_is_the_adapted_layer() -> Result<()> {
    use candle_core::Device;
    use dropwise::model::llama::Adapter;
    use dropwise::model::Linear;
    let v = |n: usize, seed: u64| -> Vec<f32> {
        let mut r = dropwise::data::SplitMix64(seed);
        (0..n).map(|_| r.below(2001) as f32 / 1000.0 - 1.0).collect()
    };
    let (out, inp, rank) = (6, 8, 2);
    let mut w = v(out * inp, 1);
    for x in w.iter_mut().step_by(2) {
        *x = 0.0;
    }
    let w = Tensor::from_vec(w, (out, inp), &Device::Cpu)?;
    let mask = w.ne(0f32)?.to_dtype(candle_core::DType::F32)?;
    let mut lin = Linear::dense(w, None);
    lin.adapter = Some(Adapter { a: Tensor::from_vec(v(rank * inp, 2), (rank, inp), &Device::Cpu)?, b: Tensor::from_vec(v(out * rank, 3), (out, rank), &Device::Cpu)?, scale: 0.7, mask: Some(mask) });
    let x = Tensor::from_vec(v(3 * inp, 4), (3, inp), &Device::Cpu)?;
    let adapted = lin.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    lin.merge_adapter()?;
    assert!(lin.adapter.is_none());
    let merged = lin.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let worst = adapted.iter().zip(&merged).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-6, "merged output differs by {worst}");
    let zeros = lin.weight_f32()?.flatten_all()?.to_vec1::<f32>()?.iter().step_by(2).filter(|&&x| x == 0.0).count();
    assert_eq!(zeros, out * inp / 2, "the merged weight lost its pruned zeros");
    Ok(())
}

/// `--params lora` and `selective` heal a drop too; lora keeps a pruned student's zeros and
/// selective trains only the blocks it picks.
#[test]
fn lora_and_selective_training_heal_and_keep_their_bounds() -> Result<()> {
    use dropwise::structural::{surgery, Part};
    let mut c = tiny_config(Arch::Llama);
    c.num_hidden_layers = 6;
    let teacher = tiny_model(c, 8)?;
    for params in [Params::Lora { rank: 4 }, Params::Selective { blocks: Some(1) }] {
        let mut student = teacher.clone();
        surgery::remove(&mut student, &[1, 2, 4], Part::Block)?;
        let untouched = student.blocks[0].q.weight_f32()?.flatten_all()?.to_vec1::<f32>()?;
        let opts = RecoverOptions { params, ..options(Loss::Kd) };
        let report = recover(&mut student, &teacher, &windows(24, 24, 1), &windows(24, 4, 99), &opts, &mut |_| {})?;
        let (first, last) = (report.evals.first().unwrap().kl_divergence, report.evals.last().unwrap().kl_divergence);
        assert!(last < 0.9 * first, "{params:?}: held-out KL {first:.4} -> {last:.4}");
        if let Params::Selective { .. } = params {
            assert_eq!(report.trained_blocks.len(), 1);
            assert!(report.trained_blocks[0] == 1 || report.trained_blocks[0] == 2);
            assert_eq!(student.blocks[0].q.weight_f32()?.flatten_all()?.to_vec1::<f32>()?, untouched, "an unselected block changed");
        } else {
            assert!(student.blocks.iter().all(|b| b.linears().all(|(_, l)| l.adapter.is_none())), "adapters were not merged");
        }
    }
    let mut student = pruned(&teacher)?;
    let before = zeros_of(&student);
    let opts = RecoverOptions { params: Params::Lora { rank: 4 }, ..options(Loss::Kd) };
    recover(&mut student, &teacher, &windows(24, 4, 1), &[], &opts, &mut |_| {})?;
    assert_eq!(zeros_of(&student), before, "LoRA changed the zero pattern of a pruned student");
    Ok(())
}

/// A run stopped after a checkpoint and resumed from it ends with the weights, bit for bit, of
/// the run that never stopped; a checkpoint of another run is refused.
#[test]
fn a_resumed_run_continues_bit_identically() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("run.safetensors");
    let teacher = tiny_model(tiny_config(Arch::Llama), 8)?;
    let train = windows(24, 16, 1);
    for params in [Params::All, Params::Lora { rank: 2 }] {
        // The uninterrupted run checkpoints after update 5 of 8 (as a run killed later would
        // have); a fresh start from the same student file resumes from that checkpoint.
        let base = RecoverOptions { params, checkpoint: Some(ckpt.clone()), checkpoint_every: 5, ..options(Loss::KdFeatures) };
        let mut whole = pruned(&tiny_model(tiny_config(Arch::Llama), 7)?)?;
        let full = recover(&mut whole, &teacher, &train, &[], &base, &mut |_| {})?;
        let mut resumed = pruned(&tiny_model(tiny_config(Arch::Llama), 7)?)?;
        let again = RecoverOptions { resume: Some(ckpt.clone()), checkpoint: None, ..base.clone() };
        let rest = recover(&mut resumed, &teacher, &train, &[], &again, &mut |_| {})?;
        assert_eq!(rest.resumed_after, 5);
        for ((name, a), (_, b)) in whole.named_tensors()?.iter().zip(resumed.named_tensors()?.iter()) {
            let (va, vb) = (a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
            assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{params:?}: {name} differs after resuming");
        }
        let losses = |r: &RecoverReport, from: usize| r.steps[from..].iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
        assert_eq!(losses(&full, 5), losses(&rest, 0), "{params:?}: the losses after the resume differ");
        let other = RecoverOptions { lr: 1e-3, ..again.clone() };
        let e = recover(&mut pruned(&tiny_model(tiny_config(Arch::Llama), 7)?)?, &teacher, &train, &[], &other, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("other options"), "{e}");
    }
    Ok(())
}

/// Multi-sample dropout trains too, is seeded (two runs agree bit for bit), and differs from
/// plain training.
#[test]
fn multi_sample_dropout_is_seeded_and_heals() -> Result<()> {
    let teacher = tiny_model(tiny_config(Arch::Llama), 8)?;
    let train = windows(24, 12, 1);
    let eval = windows(24, 4, 99);
    let opts = RecoverOptions { dropout_samples: 4, dropout: 0.1, ..options(Loss::Kd) };
    let mut a = pruned(&tiny_model(tiny_config(Arch::Llama), 7)?)?;
    let ra = recover(&mut a, &teacher, &train, &eval, &opts, &mut |_| {})?;
    let mut b = pruned(&tiny_model(tiny_config(Arch::Llama), 7)?)?;
    let rb = recover(&mut b, &teacher, &train, &eval, &opts, &mut |_| {})?;
    let mut plain = pruned(&tiny_model(tiny_config(Arch::Llama), 7)?)?;
    let rp = recover(&mut plain, &teacher, &train, &eval, &options(Loss::Kd), &mut |_| {})?;
    let losses = |r: &RecoverReport| r.steps.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&ra), losses(&rb), "two seeded dropout runs differ");
    assert_ne!(losses(&ra), losses(&rp), "dropout changed nothing");
    let (first, last) = (ra.evals[0].kl_divergence, ra.evals.last().unwrap().kl_divergence);
    assert!(last < 0.8 * first, "held-out KL {first:.4} -> {last:.4} under multi-sample dropout");
    Ok(())
}
