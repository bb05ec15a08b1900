"""Micro-benchmark of one attention block: unmasked attention (scale by a division,
softmax, @ V) eager vs graphopt (fused into SDPA by the hand-written rules),
median of --runs, interleaved, one process.  The whole-model figures (GPT-2 with
its causal mask, memory, generation) are in bench_gpt2_attention.py.

    python benchmarks/bench_attention.py [--seq-len 1024] [--heads 12] [--dim 64] [--runs 7]
"""
import argparse
import statistics
import time

import torch

import graphopt


class Attention(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) / self.scale).softmax(-1) @ v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, args.dim) for _ in range(3))
    model = Attention(args.dim)
    fast = graphopt.optimize(model, (q, k, v))
    fused = any("sdpa" in r for r in fast.report.to_json()["rewrites"].values())
    times = {"eager": [], "graphopt": []}
    with torch.no_grad():
        diff = (fast(q, k, v) - model(q, k, v)).abs().max().item()
        for _ in range(args.runs):
            for name, fn in (("eager", model), ("graphopt", fast)):
                t = time.perf_counter()
                fn(q, k, v)
                times[name].append((time.perf_counter() - t) * 1e3)
    e, g = statistics.median(times["eager"]), statistics.median(times["graphopt"])
    print(f"T={args.seq_len}, {args.heads} heads x {args.dim}: eager {e:.1f} ms, graphopt {g:.1f} ms "
          f"({e / g:.2f}x), fused: {fused}, max |diff| {diff:.2g}, median of {args.runs}")


if __name__ == "__main__":
    main()
