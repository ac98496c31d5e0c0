//! Which of the teacher's blocks each student block stands for, and what a student block has to
//! reproduce: the teacher's hidden state from just before it (after the previous kept block) to
//! just after it — across any blocks dropped in between, which it now has to do the work of.
//!
//! The map is read from the weights, not from metadata, so it holds for any student cut from
//! the teacher (GGUF or HF, chained steps): with as many blocks, block i is block i; with fewer,
//! each student block is the teacher block with the same norm weights (no method changes a
//! block's norms: pruning, shrinking and quantizing keep them, dropping removes them whole).

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::model::{Block, Llama};

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && a.flatten_all().and_then(|x| x.to_vec1::<f32>()).ok() == b.flatten_all().and_then(|x| x.to_vec1::<f32>()).ok()
}

/// Whether a student block can be the teacher block: its remaining sub-blocks' norms match.
fn norms_match(s: &Block, t: &Block) -> bool {
    let attn = !s.has_attention() || same(&s.attn_norm, &t.attn_norm);
    let mlp = !s.has_mlp() || same(&s.mlp_norm, &t.mlp_norm);
    (s.has_attention() || s.has_mlp()) && attn && mlp
}

/// For each student block, the index of the teacher block it stands for (increasing).
pub fn block_map(student: &Llama, teacher: &Llama) -> Result<Vec<usize>> {
    let (ns, nt) = (student.blocks.len(), teacher.blocks.len());
    if student.config.hidden_size != teacher.config.hidden_size {
        bail!("the student's hidden size ({}) differs from the teacher's ({}): it was not cut from this teacher", student.config.hidden_size, teacher.config.hidden_size);
    }
    if ns == nt {
        return Ok((0..ns).collect());
    }
    if ns > nt {
        bail!("the student has more blocks ({ns}) than the teacher ({nt})");
    }
    let mut map = Vec::with_capacity(ns);
    let mut next = 0;
    for (i, s) in student.blocks.iter().enumerate() {
        // Leave enough teacher blocks for the student blocks still to place.
        let last = nt - (ns - i);
        let Some(j) = (next..=last).find(|&j| norms_match(s, &teacher.blocks[j])) else {
            bail!("student block {i} matches none of the teacher's blocks {next}..={last} (by its norm weights): recovery needs a student cut from this teacher");
        };
        map.push(j);
        next = j + 1;
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
        let other = tiny_model(tiny_config(Arch::Llama), 4).unwrap();
        assert!(block_map(&other, &teacher).is_err(), "a model of another seed is no student of this teacher");
    }
}
