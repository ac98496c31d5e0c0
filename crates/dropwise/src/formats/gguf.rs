//! GGUF v2/v3 reading and v3 writing.
//!
//! The reader trusts nothing in the file: every count, length, dimension and offset is checked
//! against the bytes that are actually there before anything is allocated, so a hostile header
//! gets a one-line error instead of a panic or a huge allocation. Tensor data is memory-mapped
//! and only copied when a tensor is dequantized.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};

const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// More dimensions than this is not a tensor any runtime writes.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any integer value as u64 (negative values are refused).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor element types dropwise reads from GGUF.
pub fn ggml_dtype_from_u32(t: u32) -> Result<GgmlDType> {
    Ok(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        other => bail!(
            "unsupported GGUF tensor type {other} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)"
        ),
    })
}

pub fn ggml_dtype_to_u32(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

pub fn ggml_dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A tensor's entry in the GGUF header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (the reverse of GGUF's `ne` order): a linear weight is `[out, in]`.
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened GGUF file: parsed header plus the memory-mapped bytes.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
    mmap: memmap2::Mmap,
}

/// Bounds-checked little-endian cursor over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.pos {
            bail!(
                "truncated GGUF header: needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count that must fit in what is left of the file, given each item takes at least `min_item` bytes.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64()?;
        let max = (self.remaining() / min_item.max(1)) as u64;
        if n > max {
            bail!("corrupt GGUF: {what} count {n} cannot fit in the {} bytes left in the file", self.remaining());
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count("string length", 1)?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).context("corrupt GGUF: a string is not valid UTF-8")
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("corrupt GGUF: boolean value {b}"),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    bail!("corrupt GGUF: arrays nested too deeply");
                }
                let item_ty = self.u32()?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => bail!("corrupt GGUF: unknown metadata value type {t}"),
                };
                let n = self.count("array", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => bail!("corrupt GGUF: unknown metadata value type {t}"),
        })
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bytes a tensor of this type and element count takes, or an error if the count is not whole blocks.
pub fn tensor_n_bytes(dtype: GgmlDType, elems: u64) -> Result<u64> {
    let bs = dtype.block_size() as u64;
    if elems % bs != 0 {
        bail!("{elems} elements is not a whole number of {}-element {} blocks", bs, ggml_dtype_name(dtype));
    }
    Ok(elems / bs * dtype.type_size() as u64)
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the mapping is read-only and dropwise never writes to its inputs. Another process
        // truncating the file while we read it is outside what any reader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(mmap).with_context(|| format!("{}", path.display()))
    }

    fn parse(mmap: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &mmap[..], pos: 0 };
        if c.remaining() < 4 || c.take(4)? != MAGIC {
            bail!("not a GGUF file (bad magic)");
        }
        let version = c.u32()?;
        if version != 2 && version != 3 {
            bail!("unsupported GGUF version {version} (supported: 2 and 3)");
        }
        // A tensor entry takes at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = c.count("tensor", 24)?;
        // A key/value takes at least 8 (key len) + 4 (type) + 1 bytes.
        let n_kv = c.count("metadata key/value", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0).with_context(|| format!("metadata key {key}"))?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => bail!("corrupt GGUF: general.alignment must be a power of two"),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail!("corrupt GGUF: tensor {name} has {n_dims} dimensions");
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            // The product of the non-zero dims is bounded too: a zero dim makes the tensor empty,
            // but shape and stride arithmetic downstream still multiplies the other dims.
            let mut nonzero: u64 = 1;
            for _ in 0..n_dims {
                let d = c.u64()?;
                nonzero = nonzero
                    .checked_mul(d.max(1))
                    .filter(|&e| e <= mmap.len() as u64 * 8)
                    .with_context(|| format!("corrupt GGUF: tensor {name} has impossible dimensions"))?;
                ne.push(d as usize);
            }
            let elems = if ne.contains(&0) { 0 } else { nonzero };
            let dtype = ggml_dtype_from_u32(c.u32()?).with_context(|| format!("tensor {name}"))?;
            let offset = c.u64()?;
            if offset % alignment != 0 {
                bail!("corrupt GGUF: tensor {name} offset {offset} is not aligned to {alignment}");
            }
            let n_bytes = tensor_n_bytes(dtype, elems).with_context(|| format!("corrupt GGUF: tensor {name}"))?;
            ne.reverse();
            tensors.push(TensorInfo { name, shape: ne, dtype, offset, n_bytes });
        }
        let data_offset = align_up(c.pos as u64, alignment);
        let data_len = (mmap.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                bail!(
                    "truncated or corrupt GGUF: tensor {} ({} bytes at data offset {}) runs past the end of the file",
                    t.name,
                    t.n_bytes,
                    t.offset
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &tensors {
            if !names.insert(t.name.as_str()) {
                bail!("corrupt GGUF: tensor {} appears twice", t.name);
            }
        }
        Ok(Self { version, metadata, tensors, data_offset, mmap })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor as stored.
    /// Where tensor `info`'s data starts in the file.
    pub fn tensor_file_offset(&self, info: &TensorInfo) -> u64 {
        self.data_offset + info.offset
    }

    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.n_bytes as usize]
    }

    /// Dequantizes one tensor to an f32 tensor with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self.tensor_info(name).with_context(|| format!("GGUF has no tensor {name}"))?;
        self.dequantize(info)
    }

    pub fn dequantize(&self, info: &TensorInfo) -> Result<Tensor> {
        let bytes = self.tensor_bytes(info);
        let t = match info.dtype {
            GgmlDType::F32 => {
                let v: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                Tensor::from_vec(v, info.shape.as_slice(), &Device::Cpu)?
            }
            _ => {
                // candle's block decoders use ggml's bit layouts; blocks run along the rows, so the
                // row length (the last row-major dimension) must be whole blocks.
                let row = *info.shape.last().unwrap_or(&0);
                if row % info.dtype.block_size() != 0 {
                    bail!(
                        "tensor {}: rows of {row} elements are not whole {}-element {} blocks",
                        info.name,
                        info.dtype.block_size(),
                        ggml_dtype_name(info.dtype)
                    );
                }
                let q = qtensor_from_ggml(info.dtype, bytes, info.shape.clone(), &Device::Cpu)
                    .with_context(|| format!("cannot decode tensor {}", info.name))?;
                q.dequantize(&Device::Cpu)?
            }
        };
        self.release(info);
        Ok(t)
    }

    /// Drops the mapped pages of a tensor that has been copied out: they are file pages, so
    /// nothing is lost (a later read faults them back in), but while resident they count in the
    /// process's RSS: a 7 GB f32 input would otherwise add its embedding's 0.9 GB to the peak.
    pub fn release(&self, info: &TensorInfo) {
        let start = (self.data_offset + info.offset) as usize;
        // SAFETY: the mapping is a read-only map of a file; MADV_DONTNEED only discards resident
        // copies of its pages, which the kernel reads back from the file on the next access, so
        // every slice into the map keeps its contents.
        let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, info.n_bytes as usize) };
    }

    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }
}

/// Element type written for a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDType {
    F32,
    F16,
    BF16,
}

impl WriteDType {
    pub fn ggml(self) -> GgmlDType {
        match self {
            WriteDType::F32 => GgmlDType::F32,
            WriteDType::F16 => GgmlDType::F16,
            WriteDType::BF16 => GgmlDType::BF16,
        }
    }
}

/// A tensor to be written: already-encoded bytes plus its row-major shape and type.
pub struct TensorOut {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    pub data: Vec<u8>,
}

impl TensorOut {
    /// A block-quantized tensor as it is stored.
    pub fn from_qtensor(name: &str, q: &candle_core::quantized::QTensor) -> Result<Self> {
        Ok(Self { name: name.to_string(), shape: q.shape().dims().to_vec(), dtype: q.dtype(), data: q.data()?.into_owned() })
    }

    /// Encodes an f32 tensor as F32, F16 or BF16.
    pub fn from_tensor(name: &str, t: &Tensor, dtype: WriteDType) -> Result<Self> {
        let shape = t.dims().to_vec();
        let v: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let data = match dtype {
            WriteDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            WriteDType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            WriteDType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        };
        Ok(Self { name: name.to_string(), shape, dtype: dtype.ggml(), data })
    }
}

fn write_string(w: &mut (impl Write + ?Sized), s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut (impl Write + ?Sized), v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => write_string(w, s)?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Array(items) => {
            let item_ty = items.first().map(|i| i.type_id()).unwrap_or(4);
            if items.iter().any(|i| i.type_id() != item_ty) {
                bail!("GGUF arrays must hold one value type");
            }
            w.write_all(&item_ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                write_value(w, i)?;
            }
        }
    }
    Ok(())
}

/// Writes a GGUF v3 file to a temporary name beside `path` and renames it when complete.
pub fn write_gguf(path: &Path, metadata: &BTreeMap<String, Value>, tensors: &[TensorOut]) -> Result<()> {
    let mut w = GgufWriter::beside(path)?;
    for t in tensors {
        w.add_ref(t)?;
    }
    w.finish(path, metadata)
}

/// A GGUF file written one tensor at a time, for models bigger than memory: each tensor's data
/// goes to an unlinked spool file beside the output as soon as it is added (the header, which
/// lists every tensor before any data, can only be written once all are known); [`finish`]
/// then writes header and spooled data to a temporary name and renames it.
///
/// [`finish`]: GgufWriter::finish
pub struct GgufWriter {
    spool: std::io::BufWriter<std::fs::File>,
    infos: Vec<(String, Vec<usize>, GgmlDType, u64)>,
    offset: u64,
}

impl GgufWriter {
    /// A writer whose spool lives in `path`'s folder (the output's file system).
    pub fn beside(path: &Path) -> Result<Self> {
        crate::util::check_parent(path)?;
        // Before this writer makes a name of its own: a dead writer's `.tmp` is removed now,
        // not only when this one reaches its rename, so a kill during the spool's brief named
        // moment cannot leave a second leftover beside the first.
        crate::util::sweep_stale_temps(path);
        let spool_path = crate::util::temp_sibling(path).with_extension("spool");
        let spool = crate::util::unlinked_scratch_file(&spool_path).with_context(|| format!("cannot create {}", spool_path.display()))?;
        Ok(Self { spool: std::io::BufWriter::with_capacity(1 << 20, spool), infos: Vec::new(), offset: 0 })
    }

    /// Appends a tensor (its data is written now and dropped with `t`).
    pub fn add(&mut self, t: TensorOut) -> Result<()> {
        self.add_ref(&t)
    }

    pub fn add_ref(&mut self, t: &TensorOut) -> Result<()> {
        let expected = tensor_n_bytes(t.dtype, t.shape.iter().product::<usize>() as u64)?;
        if expected != t.data.len() as u64 {
            bail!("tensor {} has {} bytes of data but its shape needs {expected}", t.name, t.data.len());
        }
        let pad = align_up(t.data.len() as u64, DEFAULT_ALIGNMENT) - t.data.len() as u64;
        self.spool.write_all(&t.data).context("cannot write the output (disk full?)")?;
        self.spool.write_all(&vec![0u8; pad as usize])?;
        self.infos.push((t.name.clone(), t.shape.clone(), t.dtype, self.offset));
        self.offset += t.data.len() as u64 + pad;
        Ok(())
    }

    /// Writes the file: header (`metadata` and the tensors in the order added), then the data.
    pub fn finish(mut self, path: &Path, metadata: &BTreeMap<String, Value>) -> Result<()> {
        use std::io::Seek;
        let infos = std::mem::take(&mut self.infos);
        let mut spool = self.spool.into_inner().map_err(|e| anyhow::anyhow!("cannot write the output: {}", e.error()))?;
        spool.seek(std::io::SeekFrom::Start(0))?;
        crate::util::write_atomically(path, |w| {
            let mut w = std::io::BufWriter::new(w);
            w.write_all(MAGIC)?;
            w.write_all(&3u32.to_le_bytes())?;
            w.write_all(&(infos.len() as u64).to_le_bytes())?;
            w.write_all(&(metadata.len() as u64).to_le_bytes())?;
            let mut header_len: u64 = 4 + 4 + 8 + 8;
            let mut counter = CountingWriter(0);
            for (k, v) in metadata {
                for out in [&mut w as &mut dyn Write, &mut counter as &mut dyn Write] {
                    write_string(out, k)?;
                    out.write_all(&v.type_id().to_le_bytes())?;
                }
                write_value(&mut w, v)?;
                write_value(&mut counter, v)?;
            }
            for (name, shape, dtype, offset) in &infos {
                for out in [&mut w as &mut dyn Write, &mut counter as &mut dyn Write] {
                    write_string(out, name)?;
                    out.write_all(&(shape.len() as u32).to_le_bytes())?;
                    for d in shape.iter().rev() {
                        out.write_all(&(*d as u64).to_le_bytes())?;
                    }
                    out.write_all(&ggml_dtype_to_u32(*dtype).to_le_bytes())?;
                    out.write_all(&offset.to_le_bytes())?;
                }
            }
            header_len += counter.0;
            let pad = align_up(header_len, DEFAULT_ALIGNMENT) - header_len;
            w.write_all(&vec![0u8; pad as usize])?;
            std::io::copy(&mut spool, &mut w).context("cannot copy the spooled tensor data")?;
            w.flush()?;
            Ok(())
        })
    }
}

struct CountingWriter(u64);
impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
