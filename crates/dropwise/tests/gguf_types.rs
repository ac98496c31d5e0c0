//! Every GGUF tensor type dropwise reads decodes to the same values as llama.cpp's reference
//! decoders (PyPI `gguf`, `gguf.quants.dequantize`), on a file holding one tensor of each type.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use dropwise::formats::gguf::{ggml_dtype_name, write_gguf, GgufFile, TensorOut, Value, WriteDType};

#[test]
fn every_supported_type_decodes_like_llama_cpp() -> Result<()> {
    let dev = Device::Cpu;
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    let src = Tensor::randn(0f32, 1.0, (8, 512), &dev)?;
    let mut tensors = Vec::new();
    for t in types {
        let q = QTensor::quantize(&src, t)?;
        tensors.push(TensorOut { name: format!("t.{}", ggml_dtype_name(t)), shape: vec![8, 512], dtype: t, data: q.data()?.to_vec() });
    }
    for d in [WriteDType::F32, WriteDType::F16, WriteDType::BF16] {
        let mut t = TensorOut::from_tensor("x", &src, d)?;
        t.name = format!("t.{}", ggml_dtype_name(d.ggml()));
        tensors.push(t);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("types.gguf");
    let mut meta = BTreeMap::new();
    meta.insert("general.architecture".to_string(), Value::String("test".into()));
    meta.insert("test.array".to_string(), Value::Array(vec![Value::U32(1), Value::U32(2)]));
    write_gguf(&path, &meta, &tensors)?;

    let ours = GgufFile::open(&path)?;
    let py = dropwise::testing::gguf_py_summary(&path);
    assert_eq!(py["metadata"]["test.array"]["array_len"], 2);
    for info in &ours.tensors {
        let t = &py["tensors"][&info.name];
        assert_eq!(t["type"].as_str().unwrap(), ggml_dtype_name(info.dtype), "{}", info.name);
        let v = ours.dequantize(info)?.flatten_all()?.to_vec1::<f32>()?;
        let abs: f64 = v.iter().map(|&x| x.abs() as f64).sum();
        let pabs = t["abs_sum"].as_f64().unwrap();
        assert!((abs - pabs).abs() <= 1e-5 * pabs, "{}: |w| sum {abs} vs llama.cpp {pabs}", info.name);
        for (a, b) in v.iter().zip(t["head"].as_array().unwrap()) {
            let b = b.as_f64().unwrap();
            assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1e-2), "{}: {a} vs llama.cpp {b}", info.name);
        }
    }
    Ok(())
}
