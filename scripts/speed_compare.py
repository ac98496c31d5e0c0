#!/usr/bin/env python3
"""dropwise, PyTorch (transformers eager, f32, sdpa) and llama.cpp on the same windows,
interleaved round by round in one run, and the ratios.

  python3 scripts/speed_compare.py F32.gguf [--quantized Q.gguf] [--windows 4] [--rounds 3] [--threads 2] [--warmup 1]

F32.gguf is the f32 file all three run (dropwise `eval`, transformers loading that GGUF, llama.cpp
on it). With --quantized, dropwise `eval --quantized-matmul` and llama.cpp also run that file.
Every round runs each contender once over the first W austen-512 windows of persuasion.txt
(the BOS rule where the tokenizer adds BOS): dropwise as a fresh `eval` process (its own
forward-time tokens/s; loading is excluded), torch and llama.cpp in worker processes that
keep their model loaded (`.venv-torch`: torch, transformers, gguf, accelerate; `.venv-llama`) and time the forward passes only.
All computed logits at every position. Each run's first --warmup windows are computed but not
timed, for every contender alike: a fresh dropwise process would otherwise pay its first-touch
page faults and cold caches inside the timing while the workers are warm from earlier rounds.
Prints tokens/s per round and the median ratio of dropwise to each other contender over rounds;
one JSON object with --json. This machine is a shared VM whose host steals CPU time in bursts
(seconds of /proc/stat steal per run at times): each round also prints the steal ticks it saw,
and only ratios within a round mean anything.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TEXT = os.path.join(ROOT, "assets/austen/persuasion.txt")
SEQ = 512


def windows_of(ids, bos, w):
    text_len = SEQ - 1 if bos is not None else SEQ
    out = []
    for i in range(w):
        win = ids[i * text_len:(i + 1) * text_len]
        out.append(([bos] if bos is not None else []) + list(win))
    return out


def worker(kind, path, w, threads, warmup):
    if kind == "torch":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(threads)
        d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
        ids = tok(open(TEXT, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
        adds_bos = bool(getattr(tok, "add_bos_token", False))
        wins = windows_of(ids, tok.bos_token_id if adds_bos else None, w)

        def run():
            t = 0.0
            with torch.inference_mode():
                for i, win in enumerate(wins):
                    x = torch.tensor([win])
                    t0 = time.perf_counter()
                    model(x).logits
                    if i >= warmup:
                        t += time.perf_counter() - t0
            return t
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from llama_cpp_load import open_llama
        llm = open_llama(path, n_ctx=SEQ, n_batch=SEQ, n_ubatch=SEQ, logits_all=True, verbose=False, n_threads=threads)
        ids = llm.tokenize(open(TEXT, "rb").read(), add_bos=False, special=False)
        adds_bos = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        wins = windows_of(ids, llm.token_bos() if adds_bos else None, w)

        def run():
            t = 0.0
            for i, win in enumerate(wins):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(win)
                if i >= warmup:
                    t += time.perf_counter() - t0
            return t
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        secs = run()
        print(json.dumps({"seconds": secs, "tokens": sum(len(x) for x in wins[warmup:])}), flush=True)


class Worker:
    def __init__(self, python, kind, path, w, threads, warmup):
        self.p = subprocess.Popen([python, os.path.abspath(__file__), "--worker", kind, path, str(w), str(threads), str(warmup)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"{kind} worker for {path} did not start")

    def run(self):
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        r = json.loads(self.p.stdout.readline())
        return r["tokens"] / r["seconds"]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def dropwise_tps(path, w, threads, quantized, warmup):
    cmd = [os.path.join(ROOT, "target/release/dropwise"), "--threads", str(threads), "eval", path, "--data", TEXT, "--windows", str(w), "--json"]
    if quantized:
        cmd.append("--quantized-matmul")
    v = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return v["seq_len"] * (w - warmup) / sum(v["window_seconds"][warmup:])


def steal_ticks():
    """CPU time the hypervisor took from this VM so far (/proc/stat, in clock ticks); 0 elsewhere."""
    try:
        return int(open("/proc/stat").readline().split()[8])
    except (OSError, IndexError, ValueError):
        return 0


def main():
    a = sys.argv[1:]
    if a and a[0] == "--worker":
        return worker(a[1], a[2], int(a[3]), int(a[4]), int(a[5]))
    opt = {"--quantized": None, "--windows": "4", "--rounds": "3", "--threads": "2", "--warmup": "1"}
    as_json = "--json" in a
    a = [x for x in a if x != "--json"]
    f32 = a[0]
    rest = a[1:]
    while rest:
        k, v, rest = rest[0], rest[1], rest[2:]
        if k not in opt:
            raise SystemExit(f"unknown option {k}")
        opt[k] = v
    w, rounds, threads, warmup = int(opt["--windows"]), int(opt["--rounds"]), int(opt["--threads"]), int(opt["--warmup"])
    if not 0 <= warmup < w:
        raise SystemExit("--warmup must leave at least one timed window")
    torch_py = os.path.join(ROOT, ".venv-torch/bin/python")
    llama_py = os.path.join(ROOT, ".venv-llama/bin/python")
    contenders = {"torch f32": Worker(torch_py, "torch", f32, w, threads, warmup), "llama.cpp f32": Worker(llama_py, "llama", f32, w, threads, warmup)}
    if opt["--quantized"]:
        contenders["llama.cpp quantized"] = Worker(llama_py, "llama", opt["--quantized"], w, threads, warmup)
    rows = []
    for r in range(rounds):
        s0 = steal_ticks()
        row = {"dropwise f32": dropwise_tps(f32, w, threads, False, warmup)}
        for name, c in contenders.items():
            if name == "llama.cpp quantized":
                row["dropwise quantized-matmul"] = dropwise_tps(opt["--quantized"], w, threads, True, warmup)
            row[name] = c.run()
        row["steal ticks"] = steal_ticks() - s0
        rows.append(row)
        if not as_json:
            print("round %d: " % (r + 1) + ", ".join(("%s %d" if k == "steal ticks" else "%s %.1f tok/s") % (k, v) for k, v in row.items()), flush=True)
    for c in contenders.values():
        c.close()
    ratio = lambda a, b: statistics.median(x[a] / x[b] for x in rows)
    ratios = {"dropwise f32 / torch f32": ratio("dropwise f32", "torch f32"), "dropwise f32 / llama.cpp f32": ratio("dropwise f32", "llama.cpp f32")}
    if opt["--quantized"]:
        ratios["dropwise quantized-matmul / llama.cpp quantized"] = ratio("dropwise quantized-matmul", "llama.cpp quantized")
    if as_json:
        print(json.dumps({"f32": f32, "quantized": opt["--quantized"], "windows": w, "warmup": warmup, "rounds": rows, "threads": threads, "median_ratios": ratios}, indent=1))
    else:
        for k, v in ratios.items():
            print("%-48s %.2f×" % (k, v))
        print("(%d rounds × %d timed windows of 512 tokens after %d warm-up, %d threads)" % (rounds, w - warmup, warmup, threads))


if __name__ == "__main__":
    main()
