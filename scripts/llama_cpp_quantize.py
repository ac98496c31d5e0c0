#!/usr/bin/env python3
"""Quantize a GGUF with llama.cpp's own quantizer (PyPI llama-cpp-python), e.g. to Q4_K_M:
    .venv-llama/bin/python scripts/llama_cpp_quantize.py IN.gguf OUT.gguf Q4_K_M
The reference mixes dropwise's layer-wise allocation is compared against."""
import ctypes
import sys

import llama_cpp


def main():
    src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind.upper(), None)
    if ftype is None:
        sys.exit(f"llama.cpp has no file type {kind}")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")


if __name__ == "__main__":
    main()
