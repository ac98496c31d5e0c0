//! The short (decode) path of a block-quantized linear: `x @ Wᵀ` for a few input rows, with the
//! weight kept in its GGUF block type and the activations quantized to the type's 8-bit
//! dot-product partner (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the k-quants), as
//! llama.cpp computes it.
//!
//! Why dropwise owns this instead of calling candle's `QMatMul` for every type: candle 0.11 picks
//! a kernel per CPU at run time, and on CPUs with AVX512-VNNI or AVX-VNNI it repacks Q8_0 weights
//! into tiles multiplied against activations quantized to **Q8_K** (one scale per 256 values)
//! instead of Q8_0 (one per 32): a different product from llama.cpp's, about as far from it as
//! unrounded f32 activations. The k-quant tiles use Q8_K as llama.cpp does and stay.
//!
//! The kernel tier is a choice ([`SimdPath`]), taken from `DROPWISE_SIMD` once per process, so
//! the test suite can run every tier on one machine: `scalar` (ggml's reference arithmetic, what
//! a CPU without AVX2/FMA computes), `avx2` (candle's AVX2+FMA dot products, one output at a
//! time), `native` (the default: candle's repacked VNNI tiles for Q4_K/Q6_K where the CPU has
//! them, the `avx2` tier otherwise and for every 32-block type). candle's own tile tier can be
//! forced down with its `MISTRALRS_FORCE_AVX2=1` / `MISTRALRS_FORCE_AVXVNNI=1`.

use std::sync::{Arc, OnceLock};

use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Tensor;
use rayon::prelude::*;

use super::kernels::with_f32_slice;

/// Which kernels multiply a quantized weight on the short path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdPath {
    /// ggml's reference (non-SIMD) dot products: what a CPU without AVX2 and FMA computes.
    Scalar,
    /// candle's per-output dot products, AVX2+FMA where the CPU has them (scalar otherwise).
    Avx2,
    /// The fastest correct kernels this CPU has (candle's repacked tiles for Q4_K/Q6_K).
    Native,
}

impl SimdPath {
    /// Parses `scalar`, `avx2` or `native`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "scalar" => Ok(Self::Scalar),
            "avx2" => Ok(Self::Avx2),
            "native" | "" => Ok(Self::Native),
            other => bail!("DROPWISE_SIMD must be scalar, avx2 or native, not '{other}'"),
        }
    }
}

/// The process's kernel tier: `DROPWISE_SIMD` read once (default `native`). An unknown value
/// falls back to `native` with one warning rather than failing deep inside a forward pass.
pub fn simd_path() -> SimdPath {
    static PATH: OnceLock<SimdPath> = OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("DROPWISE_SIMD") {
        Ok(v) => SimdPath::parse(&v).unwrap_or_else(|e| {
            eprintln!("warning: {e}; using native");
            SimdPath::Native
        }),
        Err(_) => SimdPath::Native,
    })
}

/// What the CPU offers, for reports: e.g. `avx512f avx512vnni avx2 fma`.
pub fn cpu_simd_features() -> String {
    let mut f: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
            ("avx512vnni", std::is_x86_feature_detected!("avx512vnni")),
            ("avxvnni", std::is_x86_feature_detected!("avxvnni")),
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("f16c", std::is_x86_feature_detected!("f16c")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    f.join(" ")
}

/// Whether a product of more than a few rows (prefill, evaluation windows) multiplies `w` with
/// candle's repacked int8 tiles instead of decoding it to f32 for an f32 GEMM: Q4_K and Q6_K
/// weights whose shape fits the tiles (rows in 16s, columns in 256s), on the `native` tier, on
/// CPUs with VNNI dot products (AVX512-VNNI or AVX-VNNI). The tiles round the activations to
/// Q8_K as llama.cpp does for these types, so it is the same product as the decode path up to
/// the order of the float sums (tested); measured on Qwen2.5-1.5B's shapes they are several
/// times faster than decoding every weight per window (`examples/qprefill.rs`, docs/results.md).
/// On AVX2-only CPUs the tiles use `maddubs` with no VNNI and are not measured here, so the
/// decode path stays there, as do all other types (candle's long product for them is one dot
/// product per output, slower than decode + GEMM).
pub fn tiles_on_long_path(w: &QTensor) -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    let vnni = *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let forced_down = std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1");
            let vnni512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni");
            !forced_down && (vnni512 || std::is_x86_feature_detected!("avxvnni"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    });
    let Ok((out, inp)) = w.shape().dims2() else { return false };
    vnni && simd_path() == SimdPath::Native && matches!(w.dtype(), GgmlDType::Q4K | GgmlDType::Q6K) && out % 16 == 0 && inp % 256 == 0
}

/// `x @ Wᵀ` for `x` `[rows, in]` (f32, few rows) and a quantized `W` `[out, in]`, on `path`.
pub fn short_product(x: &Tensor, w: &Arc<QTensor>, path: SimdPath) -> Result<Tensor> {
    let dtype = w.dtype();
    // candle's tiles are right for the k-quants (Q8_K activations, as llama.cpp) and its float
    // types do not round; only its Q8_0 tiles compute another product.
    if path == SimdPath::Native && dtype != GgmlDType::Q8_0 {
        return Ok(candle_core::Module::forward(&QMatMul::from_arc(w.clone())?, x)?);
    }
    let scalar = path == SimdPath::Scalar;
    match dtype {
        GgmlDType::Q4_0 => product::<BlockQ4_0>(x, w, scalar),
        GgmlDType::Q4_1 => product::<BlockQ4_1>(x, w, scalar),
        GgmlDType::Q5_0 => product::<BlockQ5_0>(x, w, scalar),
        GgmlDType::Q5_1 => product::<BlockQ5_1>(x, w, scalar),
        GgmlDType::Q8_0 => product::<BlockQ8_0>(x, w, scalar),
        GgmlDType::Q2K => product::<BlockQ2K>(x, w, scalar),
        GgmlDType::Q3K => product::<BlockQ3K>(x, w, scalar),
        GgmlDType::Q4K => product::<BlockQ4K>(x, w, scalar),
        GgmlDType::Q5K => product::<BlockQ5K>(x, w, scalar),
        GgmlDType::Q6K => product::<BlockQ6K>(x, w, scalar),
        // Float weights are not rounded against anything; candle's matmul is exact for them.
        _ => Ok(candle_core::Module::forward(&QMatMul::from_arc(w.clone())?, x)?),
    }
}

/// Quantizes each row of `x` to `T::VecDotType` and takes one dot product per (row, output):
/// ggml's reference arithmetic when `scalar`, candle's SIMD dot product otherwise.
fn product<T: GgmlType + Sync>(x: &Tensor, w: &QTensor, scalar: bool) -> Result<Tensor>
where
    T::VecDotType: Sync + Send,
{
    let (rows, cols) = x.dims2()?;
    let (out, inp) = w.shape().dims2()?;
    if inp != cols || cols % T::BLCK_SIZE != 0 {
        bail!("quantized product: input of {cols} columns for a [{out}, {inp}] {:?} weight", w.dtype());
    }
    let kb = cols / T::BLCK_SIZE;
    let bytes = w.data()?;
    if bytes.len() != out * kb * std::mem::size_of::<T>() {
        bail!("quantized product: {} bytes for a [{out}, {inp}] {:?} weight", bytes.len(), w.dtype());
    }
    // The block structs are plain old data; read them in place when the buffer is aligned (it
    // is candle's own typed storage), else from an aligned copy.
    let copy: Vec<T>;
    let blocks: &[T] = if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0 {
        // SAFETY: length checked above; alignment checked; every bit pattern is a valid block
        // (integers and f16 fields only).
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, out * kb) }
    } else {
        let mut v = vec![T::zeros(); out * kb];
        // SAFETY: same size, plain-old-data blocks.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len()) };
        copy = v;
        &copy
    };
    let lhs: Vec<T::VecDotType> = with_f32_slice(x, |s| {
        let mut q = vec![T::VecDotType::zeros(); rows * kb];
        for (row, dst) in s.chunks(cols).zip(q.chunks_mut(kb)) {
            T::VecDotType::from_float(row, dst);
        }
        q
    })?;
    let mut dst = vec![0f32; rows * out];
    dst.par_chunks_mut(out).zip(lhs.par_chunks(kb)).for_each(|(d, a)| {
        d.par_chunks_mut(64).enumerate().for_each(|(c, d)| {
            for (j, v) in d.iter_mut().enumerate() {
                let o = c * 64 + j;
                let wr = &blocks[o * kb..(o + 1) * kb];
                *v = if scalar { T::vec_dot_unopt(cols, wr, a) } else { T::vec_dot(cols, wr, a) };
            }
        });
    });
    Ok(Tensor::from_vec(dst, (rows, out), x.device())?)
}
