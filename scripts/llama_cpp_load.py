"""Opens a GGUF file with llama-cpp-python, working around llama.cpp's AMX kernels where they crash.

On CPUs that report AMX (amx_tile in /proc/cpuinfo) inside some virtual machines, llama.cpp's
AMX buffer type faults on its first `ldtilecfg` (general protection fault in libggml-cpu, seen
on this project's Xeon VM with llama-cpp-python 0.3.36). There the model is opened with
`use_extra_bufts = False`: llama.cpp's plain CPU kernels (AVX-512/AVX2 dot products, same
arithmetic: activations rounded to each type's 8-bit partner), without its AMX and repacked
weight layouts, which makes it slower there. DROPWISE_LLAMA_EXTRA_BUFTS=1 or 0 forces the choice.
"""
import os

import llama_cpp
from llama_cpp import Llama


def extra_bufts_disabled():
    forced = os.environ.get("DROPWISE_LLAMA_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "0"
    try:
        return "amx_tile" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def open_llama(path, **kwargs):
    if extra_bufts_disabled():
        orig = llama_cpp.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
        try:
            return Llama(model_path=path, **kwargs)
        finally:
            llama_cpp.llama_model_default_params = orig
            llama_cpp.llama.llama_cpp.llama_model_default_params = orig
    return Llama(model_path=path, **kwargs)
