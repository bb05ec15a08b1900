"""Benchmark: the deployable artifact against the model it came from.

Hugging Face GPT-2-small (12 layers, random weights, eager attention, built from its config;
nothing downloaded) is saved as a model folder; ``graphopt optimize DIR -o model.pt2`` runs as a
user runs it (its wall time is reported), then, in this one process, with rounds interleaved so
machine noise hits every variant alike (median of --runs):

* eager: the HF model;
* graphopt module: ``graphopt.optimize(model, (ids,), capture="export")`` (with its per-call guard);
* .pt2 program: ``torch.export.load(...).module()``, the file the CLI wrote;
* with ``--aoti``: that program compiled ahead of time by AOTInductor
  (``torch._inductor.aoti_compile_and_package``; its compile time is reported);

and the outputs of each against eager.  The machine's fp32 / bf16 GEMM rate is measured in the
same run, so the figures can be read against this machine's limit.

    python benchmarks/bench_artifact.py [--seq-len 1024] [--dtype float32 --dtype bfloat16] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import graphopt
from graphopt.models import Logits


def gemm_tflops(dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--aoti", action="store_true", help="also compile the .pt2 with AOTInductor and time it")
    args = ap.parse_args()
    torch.manual_seed(0)
    for dtype_name in args.dtype or ["float32", "bfloat16"]:
        dtype = getattr(torch, dtype_name)
        with tempfile.TemporaryDirectory() as tmp:
            folder, out = Path(tmp) / "gpt2", Path(tmp) / "gpt2.pt2"
            transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config()).to(dtype).save_pretrained(folder)
            t = time.perf_counter()
            cli = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(folder), "--seq-len",
                                  str(args.seq_len), "--dtype", dtype_name, "-o", str(out), "--runs", "1", "-q",
                                  "--json"], capture_output=True, text=True)
            cli_s = time.perf_counter() - t
            if cli.returncode != 0:
                raise SystemExit(cli.stderr)
            ids = torch.randint(0, 50257, (1, args.seq_len))
            model = Logits(transformers.AutoModelForCausalLM.from_pretrained(
                folder, attn_implementation="eager", dtype=dtype).eval())
            fast = graphopt.optimize(model, (ids,), capture="export")
            ep = torch.export.load(out)
            variants = {"eager": model, "graphopt module": fast, ".pt2 program": ep.module()}
            aoti_s = None
            if args.aoti:
                t = time.perf_counter()
                package = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / "aoti.pt2"))
                aoti_s = round(time.perf_counter() - t, 1)
                variants[".pt2 + AOTInductor"] = torch._inductor.aoti_load_package(package)
            times = {k: [] for k in variants}
            with torch.no_grad():
                ref = model(ids).float()
                diffs = {k: float((fn(ids).float() - ref).abs().max()) for k, fn in variants.items()}
                for _ in range(args.runs):
                    for k, fn in variants.items():
                        t = time.perf_counter()
                        fn(ids)
                        times[k].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(json.dumps({"model": "HF GPT-2-small", "dtype": dtype_name, "seq_len": args.seq_len,
                              "cli_seconds": round(cli_s, 1), "aoti_compile_seconds": aoti_s, "pt2_MB": round(out.stat().st_size / 2 ** 20, 1),
                              "median_ms": {k: round(v, 1) for k, v in ms.items()},
                              "speedup_vs_eager": {k: round(ms["eager"] / v, 2) for k, v in ms.items()},
                              "max_abs_diff_vs_eager": diffs, "fused": json.loads(cli.stdout)["attention"],
                              "gemm_tflops_here": round(gemm_tflops(dtype), 2), "runs": args.runs}), flush=True)


if __name__ == "__main__":
    main()
