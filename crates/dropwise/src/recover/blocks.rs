//! Which of the teacher's blocks each student block stands for, and what a student block has to
//! reproduce: the teacher's hidden state from just before it (after the previous kept block) to
//! just after it — across any blocks dropped in between, which it now has to do the work of.
//!
//! The map is read from the weights, not from metadata, so it holds for any student cut from
//! the teacher (GGUF or HF, chained steps): with as many blocks, block i is block i; with fewer,
//! the student's blocks are assigned to teacher blocks in order, each to the one whose norm
//! weights are nearest (the assignment with the least total distance, by dynamic programming).
//! Pruning, shrinking and quantizing keep a block's norms and dropping removes them whole, so
//! untouched blocks match exactly and anchor the rest; a block an earlier recovery trained has
//! drifted a little (9 % relative on SmolLM2 after `--loss local`, where neighbouring layers
//! differ by 6-16 %) and lands between its anchors.

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::model::{Block, Llama};

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && a.flatten_all().and_then(|x| x.to_vec1::<f32>()).ok() == b.flatten_all().and_then(|x| x.to_vec1::<f32>()).ok()
}

/// Relative distance of a student block's norms to a teacher block's: ‖s − t‖ / ‖t‖ over the
/// norms of the sub-blocks the student block still has.
fn norm_distance(s: &Block, t: &Block) -> f64 {
    let flat = |x: &Tensor| x.flatten_all().and_then(|x| x.to_vec1::<f32>()).unwrap_or_default();
    let mut pairs = Vec::new();
    if s.has_attention() {
        pairs.push((flat(&s.attn_norm), flat(&t.attn_norm)));
    }
    if s.has_mlp() {
        pairs.push((flat(&s.mlp_norm), flat(&t.mlp_norm)));
    }
    let (mut diff, mut size) = (0f64, 0f64);
    for (a, b) in &pairs {
        if a.len() != b.len() {
            return f64::INFINITY;
        }
        diff += a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
        size += b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>();
    }
    if pairs.is_empty() {
        return f64::INFINITY;
    }
    (diff / size.max(1e-30)).sqrt()
}

/// The mean norm distance above which a student is taken not to come from this teacher.
const MAX_MEAN_DISTANCE: f64 = 0.1;

/// For each student block, the index of the teacher block it stands for (increasing).
pub fn block_map(student: &Llama, teacher: &Llama) -> Result<Vec<usize>> {
    let (ns, nt) = (student.blocks.len(), teacher.blocks.len());
    if student.config.hidden_size != teacher.config.hidden_size {
        bail!("the student's hidden size ({}) differs from the teacher's ({}): it was not cut from this teacher", student.config.hidden_size, teacher.config.hidden_size);
    }
    if ns == nt {
        return Ok((0..ns).collect());
    }
    if ns > nt || ns == 0 {
        bail!("the student has {ns} blocks and the teacher {nt}: a student cut from it has fewer, and at least one");
    }
    let cost: Vec<Vec<f64>> = student.blocks.iter().map(|s| teacher.blocks.iter().map(|t| norm_distance(s, t)).collect()).collect();
    // best[i][j]: least total cost of placing student blocks 0..=i with block i on teacher block j.
    let mut best = vec![vec![f64::INFINITY; nt]; ns];
    let mut from = vec![vec![0usize; nt]; ns];
    best[0][..nt].copy_from_slice(&cost[0]);
    for i in 1..ns {
        let (mut run_min, mut run_at) = (f64::INFINITY, 0);
        for j in i..nt {
            if best[i - 1][j - 1] < run_min {
                run_min = best[i - 1][j - 1];
                run_at = j - 1;
            }
            best[i][j] = run_min + cost[i][j];
            from[i][j] = run_at;
        }
    }
    let (mut j, total) = (ns - 1..nt).map(|j| (j, best[ns - 1][j])).fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let mean = total / ns as f64;
    // An infinite or NaN mean (no feasible assignment) is refused too.
    if !mean.is_finite() || mean > MAX_MEAN_DISTANCE {
        bail!("the student's blocks match none of the teacher's (mean norm distance {mean:.3}): recovery needs a student cut from this teacher");
    }
    let mut map = vec![0; ns];
    for i in (0..ns).rev() {
        map[i] = j;
        j = from[i][j];
    }
    Ok(map)
}

/// What student block `i` reproduces, as indices into the teacher's cached states
/// ([`crate::calibrate::BlockInputs::states`]: `k` enters teacher block `k`, `n` is the last
/// block's output): from the state after the previous kept block (the embedding for the first)
/// to the state after block `map[i]` (the teacher's last output for the last student block, so
/// blocks dropped at the end are covered too).
pub fn spans(map: &[usize], teacher_blocks: usize) -> Vec<(usize, usize)> {
    let n = map.len();
    (0..n)
        .map(|i| {
            let from = if i == 0 { 0 } else { map[i - 1] + 1 };
            let to = if i + 1 == n { teacher_blocks } else { map[i] + 1 };
            (from, to)
        })
        .collect()
}

/// Whether student block `i` differs from what it stands for: it spans dropped blocks, or its
/// weights differ from the teacher block's (pruned, shrunk, a sub-block removed).
pub fn changed(student: &Llama, teacher: &Llama, map: &[usize], i: usize) -> bool {
    let (from, to) = spans(map, teacher.blocks.len())[i];
    if to - from != 1 {
        return true;
    }
    let (s, t) = (&student.blocks[i], &teacher.blocks[map[i]]);
    s.linears().zip(t.linears()).any(|((_, a), (_, b))| match (a.weight_f32(), b.weight_f32()) {
        (Ok(x), Ok(y)) => !same(&x, &y),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;
    use crate::structural::surgery::{self, Part};
    use crate::testing::{tiny_config, tiny_model};

    #[test]
    fn dropped_blocks_are_found_by_their_norms_and_spans_cover_them() {
        let mut c = tiny_config(Arch::Llama);
        c.num_hidden_layers = 6;
        let teacher = tiny_model(c, 3).unwrap();
        let mut student = teacher.clone();
        surgery::remove(&mut student, &[0, 2, 3, 5], Part::Block).unwrap();
        let map = block_map(&student, &teacher).unwrap();
        assert_eq!(map, vec![1, 4]);
        // Block 1 of the teacher now starts from the embedding (block 0 dropped); teacher block 4
        // starts after block 1 and ends with the last output (block 5 dropped).
        assert_eq!(spans(&map, 6), vec![(0, 2), (2, 6)]);
        assert!(changed(&student, &teacher, &map, 0) && changed(&student, &teacher, &map, 1));
        let same_blocks = teacher.clone();
        let identity = block_map(&same_blocks, &teacher).unwrap();
        assert_eq!(identity, (0..6).collect::<Vec<_>>());
        assert!(!(0..6).any(|i| changed(&same_blocks, &teacher, &identity, i)));
        // A block a recovery retrained (its norms moved by 5 %) still finds its place.
        let mut trained = student.clone();
        trained.blocks[1].mlp_norm = (&trained.blocks[1].mlp_norm * 1.05).unwrap();
        assert_eq!(block_map(&trained, &teacher).unwrap(), vec![1, 4]);
        // Norms unlike any of the teacher's: not a student of it.
        let mut other = tiny_model(tiny_config(Arch::Llama), 4).unwrap();
        for b in &mut other.blocks {
            b.attn_norm = (&b.attn_norm * 2.0).unwrap();
            b.mlp_norm = (&b.mlp_norm * 2.0).unwrap();
        }
        assert!(block_map(&other, &teacher).is_err(), "a model with other norms is no student of this teacher");
    }
}
