//! Quantization to GGUF block types: one matrix at a time ([`quantize_matrix`]), and a whole
//! model to a fractional bits-per-weight budget with bits allocated by layer importance
//! ([`plan`]).
//!
//! ggml's block types quantize along rows: 32-element blocks for Q4_0 … Q8_0, 256-element
//! super-blocks for the k-quants. A k-quant therefore only fits a tensor whose rows are a
//! multiple of 256 (on SmolLM2, hidden 576, only ffn_down's 1536-wide rows); other tensors take
//! 32-block types, as llama.cpp's own fallback does.

pub mod blocks;
pub mod plan;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::formats::gguf::ggml_dtype_name;

/// A GGUF tensor type dropwise writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum QType {
    Q2K,
    Q3K,
    Q4_0,
    Q4_1,
    Q4K,
    Q5_0,
    Q5_1,
    Q5K,
    Q6K,
    Q8_0,
    F16,
}

impl QType {
    pub const ALL: [QType; 11] =
        [QType::Q2K, QType::Q3K, QType::Q4_0, QType::Q4_1, QType::Q4K, QType::Q5_0, QType::Q5_1, QType::Q5K, QType::Q6K, QType::Q8_0, QType::F16];

    pub fn ggml(self) -> GgmlDType {
        match self {
            QType::Q2K => GgmlDType::Q2K,
            QType::Q3K => GgmlDType::Q3K,
            QType::Q4_0 => GgmlDType::Q4_0,
            QType::Q4_1 => GgmlDType::Q4_1,
            QType::Q4K => GgmlDType::Q4K,
            QType::Q5_0 => GgmlDType::Q5_0,
            QType::Q5_1 => GgmlDType::Q5_1,
            QType::Q5K => GgmlDType::Q5K,
            QType::Q6K => GgmlDType::Q6K,
            QType::Q8_0 => GgmlDType::Q8_0,
            QType::F16 => GgmlDType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        ggml_dtype_name(self.ggml())
    }

    pub fn parse(s: &str) -> Result<Self> {
        let norm = s.to_ascii_uppercase().replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|t| t.name() == norm)
            .with_context(|| format!("unknown GGUF type {s:?} (one of {})", Self::ALL.map(|t| t.name()).join(", ")))
    }

    /// Elements per block: 256 for k-quants, 32 for Q4_0 … Q8_0, 1 for F16.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bits per weight as stored (scales included): Q4_0 4.5, Q4_K 4.5, Q6_K 6.5625, ….
    pub fn bits(self) -> f64 {
        8.0 * self.ggml().type_size() as f64 / self.block_size() as f64
    }

    pub fn is_k_quant(self) -> bool {
        self.block_size() == 256
    }

    /// Whether rows of `cols` elements are whole blocks of this type.
    pub fn fits(self, cols: usize) -> bool {
        cols % self.block_size() == 0
    }

    /// llama.cpp's replacement when a k-quant does not fit a tensor's rows (llama.cpp picks
    /// IQ4_NL for Q2_K/Q3_K, which dropwise does not write; Q4_0 has the same size).
    pub fn fallback(self) -> QType {
        match self {
            QType::Q2K | QType::Q3K => QType::Q4_0,
            QType::Q4K => QType::Q5_0,
            QType::Q5K => QType::Q5_1,
            QType::Q6K => QType::Q8_0,
            t => t,
        }
    }

    /// This type if it fits rows of `cols`, else its fallback (if that fits).
    pub fn for_cols(self, cols: usize) -> Option<QType> {
        [self, self.fallback()].into_iter().find(|t| t.fits(cols))
    }
}

/// Quantizes a row-major `rows × cols` matrix to `ty`'s GGUF bytes. `imatrix` (one non-negative
/// weight per column: the mean square of that input channel over calibration tokens) makes the
/// quantizer favour the columns that carry the most activation, for every block type but Q8_0
/// and F16 (which llama.cpp quantizes the same way with or without one).
pub fn quantize_matrix(w: &[f32], rows: usize, cols: usize, ty: QType, imatrix: Option<&[f32]>) -> Result<Vec<u8>> {
    if w.len() != rows * cols {
        bail!("matrix of {} values is not {rows} × {cols}", w.len());
    }
    if !ty.fits(cols) {
        bail!("{} needs rows that are a multiple of {}; these have {cols}", ty.name(), ty.block_size());
    }
    if let Some(im) = imatrix {
        if im.len() != cols {
            bail!("importance matrix has {} columns, the matrix {cols}", im.len());
        }
    }
    if ty == QType::F16 {
        return Ok(w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect());
    }
    match (imatrix, ty) {
        (Some(im), QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1) => Ok(blocks::encode(ty, w, cols, im)),
        (Some(im), t) if t.is_k_quant() => {
            let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu)?;
            Ok(QTensor::quantize_imatrix(&t, im, ty.ggml())?.data()?.into_owned())
        }
        _ => {
            let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&t, ty.ggml())?.data()?.into_owned())
        }
    }
}

/// Decodes `ty` bytes of a `rows × cols` matrix back to f32 (ggml's own decoders, via candle).
pub fn dequantize(bytes: &[u8], rows: usize, cols: usize, ty: QType) -> Result<Vec<f32>> {
    if !ty.fits(cols) || bytes.len() != rows * cols / ty.block_size() * ty.ggml().type_size() {
        bail!("{} bytes are not a {rows} × {cols} {} matrix", bytes.len(), ty.name());
    }
    let q = qtensor_from_ggml(ty.ggml(), bytes, vec![rows, cols], &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

/// Quantize → dequantize: what the model computes with after quantization to `ty`.
pub fn roundtrip(w: &[f32], rows: usize, cols: usize, ty: QType, imatrix: Option<&[f32]>) -> Result<Vec<f32>> {
    dequantize(&quantize_matrix(w, rows, cols, ty, imatrix)?, rows, cols, ty)
}
