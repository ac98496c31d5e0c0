//! safetensors reading (single file or sharded with `model.safetensors.index.json`) and writing.
//!
//! Parsing is delegated to the `safetensors` crate, which checks that the header's offsets tile
//! the data exactly and that every shape matches its byte size; on top of that we refuse dtypes
//! we cannot convert and write atomically.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::formats::gguf::WriteDType;

fn mmap(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping of an input file dropwise never writes.
    unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))
}

/// What a stored tensor was before conversion to f32: name, dtype name, bytes.
pub type StoredStat = (String, String, u64);

/// Reads every tensor of one safetensors file as f32.
pub fn read_file(path: &Path, out: &mut HashMap<String, Tensor>, stats: &mut Vec<StoredStat>) -> Result<()> {
    let m = mmap(path)?;
    let st = SafeTensors::deserialize(&m).map_err(|e| anyhow::anyhow!("{}: corrupt safetensors file: {e}", path.display()))?;
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        // BERT files carry the position-id buffer (0..n as I64): an index, not a weight.
        if name.ends_with("position_ids") && matches!(view.dtype(), Dtype::I64 | Dtype::I32) {
            continue;
        }
        let v: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => bail!("{}: tensor {name} has dtype {other:?}; dropwise reads F32, F16 and BF16", path.display()),
        };
        stats.push((name.clone(), format!("{:?}", view.dtype()), data.len() as u64));
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?;
        if out.insert(name.clone(), t).is_some() {
            bail!("tensor {name} appears in more than one shard");
        }
    }
    Ok(())
}

/// Reads all weights of an HF model folder (single `model.safetensors` or sharded).
pub fn read_folder(dir: &Path) -> Result<(HashMap<String, Tensor>, Vec<StoredStat>)> {
    let mut out = HashMap::new();
    let mut stats = Vec::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        read_file(&single, &mut out, &mut stats)?;
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let j: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = j.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            if s.contains('/') || s.contains("..") {
                bail!("shard name '{s}' in {} points outside the folder", index.display());
            }
            read_file(&dir.join(s), &mut out, &mut stats)?;
        }
    } else {
        bail!("{} has neither model.safetensors nor model.safetensors.index.json", dir.display());
    }
    Ok((out, stats))
}

/// Writes tensors to one safetensors file, atomically.
pub fn write_file(path: &Path, tensors: &[(String, Tensor)], dtype: WriteDType, metadata: &BTreeMap<String, String>) -> Result<()> {
    let (dname, width) = match dtype {
        WriteDType::F32 => ("F32", 4),
        WriteDType::F16 => ("F16", 2),
        WriteDType::BF16 => ("BF16", 2),
    };
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for (name, t) in &sorted {
        let n = t.elem_count() * width;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dname, "shape": t.dims(), "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut hjson = serde_json::to_string(&header)?.into_bytes();
    while hjson.len() % 8 != 0 {
        hjson.push(b' ');
    }
    crate::util::write_atomically(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&(hjson.len() as u64).to_le_bytes())?;
        w.write_all(&hjson)?;
        for (_, t) in &sorted {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let bytes: Vec<u8> = match dtype {
                WriteDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                WriteDType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                WriteDType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            w.write_all(&bytes)?;
        }
        w.flush()?;
        Ok(())
    })
}
