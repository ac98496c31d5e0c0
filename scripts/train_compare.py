#!/usr/bin/env python3
"""Distillation training throughput and progress: dropwise `recover --loss kd` beside a plain
PyTorch loop (transformers + torch.optim.AdamW, all parameters, lr 1e-4, one 512-token window
per step, full-vocabulary KL(teacher || student) at every position), same student, teacher,
training windows and thread count, interleaved round by round in one run.

  (.venv-torch: pip install torch transformers gguf accelerate)
  .venv-torch/bin/python scripts/train_compare.py STUDENT.gguf TEACHER.gguf [--steps 8] [--rounds 2] [--threads 2]

Both sides read the student and teacher GGUF files (transformers through its GGUF loader, in
f32) and train on windows of assets/austen/{emma,mansfield,pride,sense}* (never persuasion or
northangerabbey). A round runs --steps training steps of each: PyTorch in a worker process that
keeps its models loaded (the first step of its first round is a warm-up and not timed), dropwise
as one `recover` process of --steps windows (its own training tokens/s over the steps after its
first, loading excluded: a fresh process's first step pays the first touch of its memory, as
PyTorch's untimed warm-up step does; the rate with the first step is printed beside it).
Prints tokens/s per round and the median ratio dropwise / PyTorch. With --kl-minutes M, instead
runs the PyTorch loop alone for M minutes and prints its held-out KL on the first 4 persuasion
windows every minute (the reference curve for `recover --eval`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TRAIN = [os.path.join(ROOT, "assets/austen", f) for f in ("emma.txt", "mansfieldpark.txt", "prideprejudice.txt", "sensesensibility.txt")]
HELD_OUT = os.path.join(ROOT, "assets/austen/persuasion.txt")
SEQ = 512
BIN = os.path.join(ROOT, "target/release/dropwise")


def load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32, attn_implementation="sdpa")
    return tok, model


def windows(tok, files, count, seed):
    """Windows at seeded offsets (any fixed draw serves: both sides see their own)."""
    import random
    ids = []
    for f in files:
        ids += tok(open(f, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    adds_bos = bool(getattr(tok, "add_bos_token", False))
    text_len = SEQ - 1 if adds_bos else SEQ
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        o = rng.randrange(len(ids) - text_len + 1)
        out.append(([tok.bos_token_id] if adds_bos else []) + ids[o:o + text_len])
    return out


def held_out(tok):
    ids = tok(open(HELD_OUT, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    adds_bos = bool(getattr(tok, "add_bos_token", False))
    text_len = SEQ - 1 if adds_bos else SEQ
    return [([tok.bos_token_id] if adds_bos else []) + ids[i * text_len:(i + 1) * text_len] for i in range(4)]


def kd(student_logits, teacher_logits):
    import torch.nn.functional as F
    return F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean")


def eval_kl(student, teacher, wins):
    import torch
    total, n = 0.0, 0
    with torch.inference_mode():
        for w in wins:
            x = torch.tensor([w])
            s, t = student(x).logits[0, :-1], teacher(x).logits[0, :-1]
            total += float(kd(s, t)) * s.shape[0]
            n += s.shape[0]
    return total / n


def worker(args):
    """Reads commands from stdin: `steps N` runs N training steps and prints their seconds."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok, student = load(args.student)
    _, teacher = load(args.teacher)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    wins = windows(tok, TRAIN, 100000, 1)
    at = 0

    def step():
        nonlocal at
        x = torch.tensor([wins[at % len(wins)]])
        at += 1
        with torch.no_grad():
            t = teacher(x).logits[0]
        loss = kd(student(x).logits[0], t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    if args.kl_minutes:
        ho = held_out(tok)
        print(json.dumps({"minute": 0, "tokens": 0, "kl": eval_kl(student, teacher, ho)}), flush=True)
        start, trained, minute = time.perf_counter(), 0.0, 1
        while minute <= args.kl_minutes:
            t0 = time.perf_counter()
            step()
            trained += time.perf_counter() - t0
            if trained >= 60 * minute:
                print(json.dumps({"minute": minute, "tokens": at * SEQ, "kl": eval_kl(student, teacher, ho), "tokens_per_second": at * SEQ / trained}), flush=True)
                minute += 1
        return
    step()  # warm-up
    for line in sys.stdin:
        n = int(line.split()[1])
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": n * SEQ}), flush=True)


def dropwise_round(args):
    out = "/tmp/dropwise-train-compare.gguf"
    cmd = [BIN, "--threads", str(args.threads), "recover", args.student, "--teacher", args.teacher, "--train", *TRAIN,
           "--tokens", str(args.steps * SEQ), "--seq-len", str(SEQ), "--lr", "1e-4", "--warmup", "0", "--clip", "0", "-o", out, "--json"]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    os.remove(out)
    # Steady state, as for PyTorch (whose worker's first step is an untimed warm-up): the steps
    # after this fresh process's first one, whose time holds the first touch of ~6 GB of arenas.
    steps = r["steps"]
    if len(steps) > 1:
        warm = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["seconds"] - steps[0]["seconds"])
    else:
        warm = r["tokens_per_second"]
    return warm, r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("student")
    p.add_argument("teacher")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kl-minutes", type=int, default=0)
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker or args.kl_minutes:
        return worker(args)
    w = subprocess.Popen([sys.executable, __file__, args.student, args.teacher, "--threads", str(args.threads), "--worker"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ratios = []
    for r in range(args.rounds):
        w.stdin.write(f"steps {args.steps}\n")
        w.stdin.flush()
        t = json.loads(w.stdout.readline())
        torch_tps = t["tokens"] / t["seconds"]
        dw_tps, rep = dropwise_round(args)
        ratios.append(dw_tps / torch_tps)
        print(f"round {r + 1}: PyTorch {torch_tps:.1f} tokens/s, dropwise {dw_tps:.1f} tokens/s after its first step "
              f"({rep['tokens_per_second']:.1f} with it) "
              f"(teacher {rep['teacher_seconds']:.1f}s, forward {rep['forward_seconds']:.1f}s, backward {rep['backward_seconds']:.1f}s, "
              f"optimizer {rep['optimizer_seconds']:.1f}s), ratio {dw_tps / torch_tps:.2f}", flush=True)
    w.stdin.close()
    w.wait()
    print(f"median dropwise / PyTorch training tokens/s over {args.rounds} rounds: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
