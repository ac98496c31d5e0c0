//! Weights at rest on disk: f32 matrices that a method has changed, moved off the heap once the
//! method is done with their block, and read back for each product or export.
//!
//! A model loaded with its weights at rest ([`super::io::load_decoded`]) holds each block linear
//! in its stored GGUF type and decodes it per product. Pruning, shrinking or quantization
//! round-trips replace a block's weights with new f32 values; kept on the heap they would add
//! up to the whole f32 model (7 GB for a 1.5B model). Instead each finished block is written
//! here, so memory stays bounded by one block whatever the model's size.
//!
//! The file is created in the temporary directory (`TMPDIR`) and unlinked at once: it takes no
//! name and vanishes with the process, even after a crash.
//!
//! The same slots serve f32 and f16 weights of a GGUF source read in place ([`Spill::source`]):
//! such a model keeps none of its block weights in memory either.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};

/// An append-only scratch file of f32 matrices.
#[derive(Debug)]
pub struct Spill {
    file: File,
    len: Mutex<u64>,
}

/// One matrix in a [`Spill`]: `rows × cols` at `offset` in GGUF type `dtype` (f32 for what a
/// method wrote; f32, f16 or a block type for a source read in place), its rows taken in
/// `row_order` when given (a GGUF source's Q/K rope permutation, undone on read).
#[derive(Debug)]
pub struct SpillSlot {
    spill: Arc<Spill>,
    offset: u64,
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    row_order: Option<Vec<usize>>,
}

impl Spill {
    /// A new, already unlinked scratch file in the temporary directory.
    pub fn anonymous() -> Result<Arc<Self>> {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("dropwise-spill-{}-{}", std::process::id(), unique()));
        let file = crate::util::unlinked_scratch_file(&path)
            .with_context(|| format!("cannot create a scratch file in {} (set TMPDIR to a folder with room for the changed weights)", dir.display()))?;
        Ok(Arc::new(Self { file, len: Mutex::new(0) }))
    }

    /// A model file read in place (never written): slots into it come from [`Spill::slot`].
    pub fn source(path: &std::path::Path) -> Result<Arc<Self>> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Arc::new(Self { file, len: Mutex::new(0) }))
    }

    /// The `rows × cols` matrix stored at `offset` as `dtype`, rows in `row_order` when given.
    pub fn slot(self: &Arc<Self>, offset: u64, rows: usize, cols: usize, dtype: GgmlDType, row_order: Option<Vec<usize>>) -> Result<SpillSlot> {
        if cols % dtype.block_size() != 0 {
            anyhow::bail!("rows of {cols} are not whole blocks of {dtype:?}");
        }
        if let Some(order) = &row_order {
            if order.len() != rows || order.iter().any(|&r| r >= rows) {
                anyhow::bail!("a row order of {} entries for a matrix of {rows} rows", order.len());
            }
        }
        Ok(SpillSlot { spill: Arc::clone(self), offset, rows, cols, dtype, row_order })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        *self.len.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the f32 matrix `w` `[rows, cols]`.
    pub fn write(self: &Arc<Self>, w: &Tensor) -> Result<SpillSlot> {
        let (rows, cols) = w.dims2()?;
        let v: Vec<f32> = w.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in &v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        drop(v);
        let mut len = self.len.lock().unwrap_or_else(|e| e.into_inner());
        let offset = *len;
        self.file.write_all_at(&bytes, offset).context("cannot write to the scratch file (disk full?)")?;
        *len += bytes.len() as u64;
        self.slot(offset, rows, cols, GgmlDType::F32, None)
    }
}

impl SpillSlot {
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix back as an f32 tensor.
    pub fn read(&self) -> Result<Tensor> {
        let mut v = Vec::new();
        self.read_into(&mut v)?;
        Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Appends the matrix's `rows × cols` f32 values (row-major) to `out`, so several slots can
    /// be read into one buffer (the stacked q/k/v and gate/up weights of a fused product).
    /// An f32 slot is read straight into `out`'s memory, row by row where the rows are
    /// reordered: no zeroed staging buffer and no second copy, which a profile of `eval`
    /// showed costing ~8 % of an f32 model's run.
    pub fn read_into(&self, out: &mut Vec<f32>) -> Result<()> {
        let n = self.rows * self.cols;
        if self.dtype == GgmlDType::F32 && cfg!(target_endian = "little") {
            let start = out.len();
            out.reserve(n);
            let row_bytes = self.cols * 4;
            {
                // SAFETY: the `n` floats after `start` are within the reserved capacity; they are
                // viewed as bytes only to be filled by the reads below, and `out`'s length covers
                // them only once every read has succeeded (an error leaves `out` as it was).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().add(start) as *mut u8, n * 4) };
                let read = |buf: &mut [u8], at: u64| self.spill.file.read_exact_at(buf, at).context("cannot read weights back from disk");
                match &self.row_order {
                    None => read(dst, self.offset)?,
                    Some(order) => {
                        for (row, &src) in dst.chunks_exact_mut(row_bytes.max(1)).zip(order) {
                            read(row, self.offset + (src * row_bytes) as u64)?;
                        }
                    }
                }
            }
            // SAFETY: all `n` values were written by the reads above.
            unsafe { out.set_len(start + n) };
            return Ok(());
        }
        let len = n / self.dtype.block_size() * self.dtype.type_size();
        let mut bytes = vec![0u8; len];
        self.spill.file.read_exact_at(&mut bytes, self.offset).context("cannot read weights back from disk")?;
        if let Some(order) = &self.row_order {
            // Blocks run along rows, so whole rows of bytes move.
            let rb = len / self.rows.max(1);
            bytes = order.iter().flat_map(|&r| bytes[r * rb..(r + 1) * rb].iter().copied()).collect();
        }
        match self.dtype {
            GgmlDType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            GgmlDType::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
            t => {
                let q = qtensor_from_ggml(t, &bytes, vec![self.rows, self.cols], &Device::Cpu).context("cannot decode weights read from disk")?;
                drop(bytes);
                out.extend(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// The stored type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ N.fetch_add(1, Ordering::Relaxed)
}
