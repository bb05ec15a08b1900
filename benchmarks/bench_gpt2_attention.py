"""GPT-2-small (12 layers, 768 wide, 12 heads; random weights, nothing downloaded) with
HF eager attention: what fusing attention into SDPA buys, measured side by side.

    python benchmarks/bench_gpt2_attention.py forward [--seq-len 512 1024] [--runs 5] [--dtype bfloat16]
    python benchmarks/bench_gpt2_attention.py memory [--seq-len 2048]
    python benchmarks/bench_gpt2_attention.py generate [--prompt 128] [--new-tokens 60]

forward:  one forward pass (batch 1), median of --runs, the variants interleaved in
          one process: HF eager attention, torch.compile (inductor), graphopt,
          torch.compile(backend="graphopt", inductor chained), HF attn_implementation="sdpa".
memory:   peak resident memory added by one forward pass, eager vs graphopt, each
          in its own process (RSS sampled every millisecond while it runs; glibc's
          mmap threshold fixed and freed memory trimmed first, so RSS follows the
          live tensors).
generate: greedy model.generate() of --new-tokens tokens, eager vs
          torch.compile(model.forward, backend="graphopt"), with HF's default dynamic
          KV cache and with the static one; runs bench_dynamic.py generate's variants.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

import graphopt
from graphopt import kernels
from graphopt.models import Logits


def build(attn="eager", n_layer=12, n_positions=1024):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_positions=n_positions, attn_implementation=attn)  # GPT-2-small sizes
    return GPT2LMHeadModel(cfg).eval()



def forward(args):
    dtype = getattr(torch, args.dtype)
    eager = Logits(build("eager")).to(dtype)
    sdpa = Logits(build("sdpa")).to(dtype)
    sdpa.load_state_dict(eager.state_dict())
    for T in args.seq_len:
        ids = torch.randint(0, 50257, (1, T))
        torch._dynamo.reset()
        t = time.perf_counter()
        fast = graphopt.optimize(eager, (ids,))   # default options, as a user calls it
        opt_s = time.perf_counter() - t
        variants = {
            "eager": eager,
            "inductor": torch.compile(eager),
            "graphopt": fast,
            "graphopt+inductor": torch.compile(eager, backend="graphopt", options={"inductor": True}),
            "hf-sdpa": sdpa,
        }
        times = {k: [] for k in variants}
        with torch.no_grad():
            ref = eager(ids)
            diffs = {k: (fn(ids) - ref).abs().max().item() for k, fn in variants.items()}  # also warms up
            for _ in range(args.runs):
                for k, fn in variants.items():
                    t = time.perf_counter()
                    fn(ids)
                    times[k].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        rhs = {k: r.split("->")[-1] for k, r in fast.report.rewrites.items()}
        gelu = sum(n for k, n in fast.report.applied.items() if "gelu_tanh(" in rhs.get(k, ""))
        epilogue = sum(n for k, n in fast.report.applied.items() if "addmm_gelu(" in rhs.get(k, ""))
        print(f"\n== GPT-2-small {args.dtype}, T={T}, batch 1, {torch.get_num_threads()} threads, median of {args.runs}")
        print(f"graphopt: {fast.report.attention}, GELUs fused {gelu} of 12, {epilogue} "
              f"of them as the GEMM's epilogue (optimize took {opt_s:.1f} s)")
        for k in variants:
            print(f"  {k:18s} {med[k]:9.1f} ms   {med['eager'] / med[k]:5.2f}x vs eager   "
                  f"{med['inductor'] / med[k]:5.2f}x vs inductor   max |diff| {diffs[k]:.2g}")
        print(f"  this machine's {args.dtype} GEMM rate (1024x768 @ 768x3072, plain mm): {_gemm_rate(dtype):.2f} TFLOP/s")
        for key, (name, ms) in kernels.chosen().items():
            if key[0] == dtype:
                print(f"  GEMM {kernels.describe(key)}: {name} ({ms.get(name, 0):.2f} ms; "
                      f"plain {ms.get('plain', 0):.2f} ms)")


def _gemm_rate(dtype) -> float:
    """The GEMM rate of this machine, measured in this run (the limit the figures above share)."""
    x, w = torch.randn(1024, 768, dtype=dtype), torch.randn(768, 3072, dtype=dtype)
    for _ in range(3):
        x @ w
    t = time.perf_counter()
    for _ in range(20):
        x @ w
    return 2 * 1024 * 768 * 3072 * 20 / (time.perf_counter() - t) / 1e12


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_of(fn) -> float:
    """Peak RSS growth (MiB) while fn() runs, sampled every millisecond."""
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)
    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(peak[0], _rss_mb()) - base


class Body(torch.nn.Module):
    """The transformer without the vocabulary head (whose T x 50,257 logits would hide
    the attention's memory): input_ids -> last hidden state."""

    def __init__(self, lm):
        super().__init__()
        self.transformer = lm.transformer

    def forward(self, input_ids):
        return self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state


def memory_child(variant, T, part="body"):
    lm = build("eager", n_positions=max(1024, T))  # GPT-2 has 1024 positions; more for T=2048
    model = Body(lm) if part == "body" else Logits(lm)
    ids = torch.randint(0, 50257, (1, T))
    fn = model if variant == "eager" else graphopt.optimize(model, (ids,), time_limit=30)
    import ctypes
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    with torch.no_grad():
        fn(ids)  # warm-up: lazily created buffers
        peaks = []
        for _ in range(3):
            trim(0)  # give freed memory back, so RSS is what is live
            peaks.append(_peak_of(lambda: fn(ids)))
    print(json.dumps({"variant": variant, "peak_mib": min(peaks),
                      "attention": getattr(getattr(fn, "report", None), "attention", None)}))


def memory(args):
    for T in args.seq_len:
        for part in ("body", "lm"):
            out = {}
            for variant in ("eager", "graphopt"):
                # a fixed mmap threshold: large tensors are mapped and unmapped, so RSS follows live memory
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                res = subprocess.run([sys.executable, __file__, "_memory_child", variant, str(T), part],
                                     capture_output=True, text=True, check=True, env=env)
                out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
            e, g = out["eager"]["peak_mib"], out["graphopt"]["peak_mib"]
            att = 12 * T * T * 4 / 2**20
            what = "transformer body (hidden states)" if part == "body" else "LM with logits"
            print(f"== GPT-2-small {what}, T={T}: peak RSS added by one forward pass: eager {e:.0f} MiB, "
                  f"graphopt {g:.0f} MiB ({e / g:.2f}x less); one 12-head T x T fp32 matrix is {att:.0f} MiB; "
                  f"graphopt attention: {out['graphopt']['attention']}")


def generate(args):
    """The generation benchmark, now benchmarks/bench_dynamic.py's (the same measurement with
    attention calls counted, the weights-bandwidth bound and inductor): its eager, static-cache
    and graphopt variants."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_dynamic
    args.variants = ["eager, static cache", "graphopt", "graphopt, static cache"]
    bench_dynamic.generate(args)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        return memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["forward", "memory", "generate"])
    ap.add_argument("--seq-len", type=int, nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="forward: the models' dtype")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=60)
    args = ap.parse_args()
    if args.what == "forward":
        args.seq_len = args.seq_len or [512, 1024]
        forward(args)
    elif args.what == "memory":
        args.seq_len = args.seq_len or [2048]
        memory(args)
    else:
        args.runs = min(args.runs, 3)
        generate(args)


if __name__ == "__main__":
    main()
