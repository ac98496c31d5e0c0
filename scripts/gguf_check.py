#!/usr/bin/env python3
"""Read a GGUF file with llama.cpp's own reader (PyPI `gguf`, GGUFReader) and summarize it as JSON.

Used by dropwise's tests as the outside reference for the files dropwise writes and reads:
  python scripts/gguf_check.py FILE.gguf  ->  {"version", "metadata": {key: value|len}, "tensors": {name:
  {"shape": row-major shape, "type": name, "n_bytes", "sum", "abs_sum", "head": first 8 values}}}
Values are dequantized with gguf.quants.dequantize (llama.cpp's reference decoders ported to numpy).
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize


def field_value(f):
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        if len(f.types) > 1 and f.types[1] not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            # Numeric arrays (per-layer widths of deci files) are short: give their values.
            return {"array_len": len(f.data), "values": [f.parts[i].tolist()[0] for i in f.data]}
        return {"array_len": len(f.data)}
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def main():
    r = GGUFReader(sys.argv[1])
    out = {"metadata": {}, "tensors": {}}
    for k, f in r.fields.items():
        out["metadata"][k] = field_value(f)
    out["version"] = out["metadata"].get("GGUF.version")
    for t in r.tensors:
        vals = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        out["tensors"][t.name] = {
            "shape": [int(x) for x in reversed(t.shape.tolist())],
            "type": t.tensor_type.name,
            "n_bytes": int(t.n_bytes),
            "sum": float(vals.sum()),
            "abs_sum": float(np.abs(vals).sum()),
            "head": [float(x) for x in vals[:8]],
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
