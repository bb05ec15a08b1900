"""onnxruntime CPU latency of GPT-2-small (12 layers, random weights) exported to ONNX
with ``torch.onnx.export(..., dynamo=True, opset_version=23)``: the original file, the
file ``graphopt optimize`` writes, and the file onnxruntime's own transformers optimizer
writes (``python -m onnxruntime.transformers.optimizer --model_type gpt2``); medians
of --runs, the three sessions interleaved in one process.

    python benchmarks/bench_onnx.py [--seq-len 512 1024] [--runs 5] [--keep DIR]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from graphopt.models import Logits
from graphopt.optimize_onnx import onnx_report, session



def export(path, T):
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = Logits(GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()).eval()
    with torch.no_grad():  # HF initialises biases to 0 and the exporter drops zero biases; trained
        for name, p in model.named_parameters():  # GPT-2 has them (and ORT's optimizer expects them)
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(0, 50257, (1, T)),), path, dynamo=True, opset_version=23,
                          external_data=False)


def main():
    import onnx
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", help="directory to keep the .onnx files in")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="graphopt-bench-onnx-")
    os.makedirs(work, exist_ok=True)
    for T in args.seq_len:
        orig = os.path.join(work, f"gpt2_T{T}.onnx")
        ours = os.path.join(work, f"gpt2_T{T}.graphopt.onnx")
        ortx = os.path.join(work, f"gpt2_T{T}.ort-transformers.onnx")
        t = time.perf_counter()
        export(orig, T)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", orig, "-o", ours, "--runs", "1",
                              "--time-limit", "30"], capture_output=True, text=True)
        ours_s = time.perf_counter() - t
        if res.returncode:
            raise SystemExit(res.stderr)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "onnxruntime.transformers.optimizer", "--input", orig,
                              "--output", ortx, "--model_type", "gpt2", "--num_heads", "12", "--hidden_size", "768"],
                             capture_output=True, text=True)
        ortx_s = time.perf_counter() - t
        variants = {"original": orig, "graphopt": ours}
        if res.returncode == 0 and os.path.exists(ortx):
            variants["ort-transformers"] = ortx
        else:
            print("onnxruntime.transformers.optimizer failed:", (res.stderr or res.stdout).strip().splitlines()[-1:])
        sessions = {k: session(onnx.load(p)) for k, p in variants.items()}
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 50257, (1, T)).astype(np.int64)}
        outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}  # also warms up
        times = {k: [] for k in sessions}
        for _ in range(args.runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[k].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        rep = onnx_report(onnx.load(ours, load_external_data=False))
        print(f"\n== GPT-2-small ONNX (opset 23), T={T}, batch 1, onnxruntime {__import__('onnxruntime').__version__} CPU, "
              f"median of {args.runs}; export {export_s:.0f} s, graphopt {ours_s:.0f} s, ort optimizer {ortx_s:.0f} s")
        print(f"graphopt: attention {rep['attention']}, rules {rep['rules_applied']}")
        for k in sessions:
            ops = {}
            for n in onnx.load(variants[k], load_external_data=False).graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            fused = {op: c for op, c in ops.items() if "Attention" in op}
            print(f"  {k:17s} {med[k]:9.1f} ms  {med['original'] / med[k]:5.2f}x vs original   "
                  f"max |diff| {np.abs(outs[k] - outs['original']).max():.2g}   attention ops {fused}")


if __name__ == "__main__":
    main()
