"""Dynamic shapes, measured side by side in one run: generation with HF's default dynamic
KV cache, and variable-length serving (GPT-2-small, 12 layers, random weights, eager
attention; nothing downloaded).

    python benchmarks/bench_dynamic.py generate [--prompt 128] [--new-tokens 60] [--runs 3] [--variants ...]
    python benchmarks/bench_dynamic.py serving [--prompts 20] [--min-len 64] [--max-len 1024]
    python benchmarks/bench_dynamic.py onnx [--seq-len 128 512 1024] [--runs 5]

generate: greedy ``model.generate()``, batch 1: eager, then ``model.forward =
          torch.compile(model.forward, backend=B)`` for graphopt, graphopt with inductor
          chained, and inductor, each with the default dynamic cache, plus graphopt and
          eager with the static cache.  Per variant: median time after a warm-up call that
          compiles, tokens/s, the attention calls of one generate counted with
          torch.profiler (SDPA vs softmax), graphs compiled, tokens identical to eager, and
          tokens/s as a share of the weights-bandwidth bound (copy bandwidth measured in the
          same run divided by the bytes of the weights: a decode step reads every weight).
serving:  --prompts prompts of random lengths in [--min-len, --max-len] (seed 0), one
          forward each (``use_cache=False``), through eager, ``torch.compile(model,
          backend="graphopt")`` and inductor with ``dynamic=True``: total time of the first
          pass (which compiles) and of a second pass, graphs compiled, calls that ran fused.
onnx:     GPT-2-small exported once with ``torch.onnx.export(..., dynamo=True, opset_version=23)``
          and a dynamic sequence axis, ``graphopt optimize``'s file of it, onnxruntime CPU
          latency of both at each --seq-len (medians of --runs, the sessions interleaved).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter

import torch
from torch.profiler import profile


def build(n_layer=12, n_positions=1024):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_positions=n_positions, attn_implementation="eager")  # GPT-2-small sizes
    return GPT2LMHeadModel(cfg).eval()


def copy_bandwidth() -> float:
    """Bytes per second of a large copy (read + write), best of 5."""
    a = torch.randn(64 << 20 // 4 * 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:     # (GPT-2's LM head is the embedding: read once)
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles."""

    def __init__(self, inner):
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def _backend(name):
    from graphopt.optimize import Backend
    from torch._inductor.compile_fx import compile_fx
    if name == "inductor":
        return CountingBackend(compile_fx)
    opts = {"inductor": True} if name == "graphopt+inductor" else None
    return CountingBackend(Backend(opts))


def attention_calls(fn) -> Counter:
    with profile() as p:
        fn()
    names = Counter(e.name for e in p.events())
    # (inductor calls the SDPA kernel itself, without the aten::scaled_dot_product_attention op)
    sdpa = names["aten::scaled_dot_product_attention"] or sum(
        v for k, v in names.items() if k.startswith("aten::_scaled_dot_product") and k.endswith("_for_cpu"))
    return Counter(sdpa=sdpa, softmax=names["aten::softmax"] + names["aten::_softmax"])


def generate(args):
    model = build()
    ids = torch.randint(0, 50257, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    bandwidth = copy_bandwidth()
    wbytes = weight_bytes(model)
    bound = bandwidth / wbytes
    variants = [("eager", None, {}), ("eager, static cache", None, {"cache_implementation": "static"}),
                ("graphopt", "graphopt", {}), ("graphopt, static cache", "graphopt", {"cache_implementation": "static"}),
                ("graphopt+inductor", "graphopt+inductor", {}), ("inductor", "inductor", {})]
    if args.variants:
        unknown = set(args.variants) - {v[0] for v in variants}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}: choose from {[v[0] for v in variants]}")
        variants = [v for v in variants if v[0] == "eager" or v[0] in args.variants]
    rows, eager_forward = [], model.forward
    with torch.no_grad():
        for name, backend, extra in variants:
            torch._dynamo.reset()
            be = None
            model.forward = eager_forward
            if backend is not None:
                be = _backend(backend)
                model.forward = torch.compile(eager_forward, backend=be)
            out = model.generate(ids, **kw, **extra)   # warm-up (compiles)
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                out = model.generate(ids, **kw, **extra)
                times.append(time.perf_counter() - t)
            calls = attention_calls(lambda: model.generate(ids, **kw, **extra))
            rows.append((name, statistics.median(times), out, calls, be.graphs if be else 0))
    model.forward = eager_forward
    ref, eager_s = rows[0][2], rows[0][1]
    print(f"== GPT-2-small generate: prompt {args.prompt}, {args.new_tokens} new tokens, greedy, batch 1, "
          f"median of {args.runs}, {torch.get_num_threads()} threads")
    print(f"   copy bandwidth {bandwidth / 1e9:.1f} GB/s counting read + write ({bandwidth / 2e9:.1f} GB/s of "
          f"bytes copied), weights {wbytes / 1e6:.0f} MB: bound {bound:.1f} tokens/s ({bound / 2:.1f} by bytes "
          f"copied; a decode step reads every weight once)")
    print("| variant | time | tokens/s | vs eager | share of bound (read+write / bytes copied) "
          "| attention calls (SDPA / softmax) | graphs | tokens identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s, out, calls, graphs in rows:
        tps = args.new_tokens / s
        print(f"| {name} | {s:.2f} s | {tps:.1f} | {eager_s / s:.2f}x | {tps / bound:.0%} / {2 * tps / bound:.0%} | "
              f"{calls['sdpa']} / {calls['softmax']} | {graphs} | {'yes' if torch.equal(out, ref) else 'NO'} |")


def serving(args):
    from graphopt.optimize import LAST_REPORTS  # noqa: F401
    model = build()
    rng = random.Random(0)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.prompts)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (1, t), generator=gen) for t in lengths]
    print(f"== GPT-2-small variable-length serving: {len(prompts)} prompts, lengths {min(lengths)}..{max(lengths)} "
          f"(sum {sum(lengths)}), one forward each, {torch.get_num_threads()} threads")
    rows, ref = [], None
    with torch.no_grad():
        for name in ("eager", "graphopt", "graphopt+inductor", "inductor"):
            torch._dynamo.reset()
            be = None
            run = model
            if name != "eager":
                be = _backend(name)
                run = torch.compile(model, backend=be, dynamic=True if name == "inductor" else None)
            passes, outs = [], []
            for _ in range(2):
                t = time.perf_counter()
                outs = [run(p, use_cache=False).logits[:, -1] for p in prompts]
                passes.append(time.perf_counter() - t)
            fused = None
            if name.startswith("graphopt"):
                calls = attention_calls(lambda: run(prompts[-1], use_cache=False))
                fused = f"{calls['sdpa']} SDPA / {calls['softmax']} softmax"
            if ref is None:
                ref = outs
            same = max(float((a - b).abs().max()) for a, b in zip(outs, ref))
            rows.append((name, passes, be.graphs if be else 0, fused, same))
    eager_warm = rows[0][1][1]
    print("| variant | first pass (compiles) | second pass | vs eager (second) | graphs compiled | attention, last prompt | max diff vs eager |")
    print("|---|---|---|---|---|---|---|")
    for name, (first, second), graphs, fused, same in rows:
        print(f"| {name} | {first:.1f} s | {second:.1f} s | {eager_warm / second:.2f}x | {graphs} | {fused or '-'} | {same:.2g} |")


def onnx_latency(args):
    import os
    import subprocess
    import sys
    import tempfile
    import warnings

    import numpy as np
    import onnx

    from graphopt.models import Logits
    from graphopt.optimize_onnx import onnx_report, session
    with tempfile.TemporaryDirectory() as tmp:
        orig, ours = os.path.join(tmp, "gpt2.onnx"), os.path.join(tmp, "gpt2-graphopt.onnx")
        model = Logits(build()).eval()
        t = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randint(0, 50257, (1, 128)),), orig, dynamo=True, opset_version=23,
                              dynamic_shapes=({1: torch.export.Dim("seq", max=1024)},), verbose=False)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", orig, "-o", ours, "-q"], check=True)
        ours_s = time.perf_counter() - t
        out = onnx.load(ours)
        rep = onnx_report(out)
        onnx.checker.check_model(out, full_check=True)
        axes = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
        ops = [n.op_type for n in out.graph.node]
        a, b = session(onnx.load(orig)), session(out)
        print(f"== GPT-2-small ONNX with a dynamic sequence axis, onnxruntime CPU, {torch.get_num_threads()} threads, "
              f"median of {args.runs}; export {export_s:.0f} s, graphopt {ours_s:.0f} s")
        print(f"   optimised file: input axes {axes}, {ops.count('Attention')} Attention nodes "
              f"({rep['attention']['causal']} is_causal), {ops.count('Softmax')} Softmax, fallbacks {rep['fallbacks']}, "
              f"checker(full_check) passed; sizes: {rep['symbolic_sizes']}")
        print("| T | original | graphopt | speed-up | max diff |")
        print("|---|---|---|---|---|")
        for T in args.seq_len:
            ids = np.random.default_rng(T).integers(0, 50257, (1, T)).astype(np.int64)
            feeds = {out.graph.input[0].name: ids}
            ya, yb = a.run(None, feeds)[0], b.run(None, feeds)[0]
            ta, tb = [], []
            for _ in range(args.runs):
                for sess, times in ((a, ta), (b, tb)):
                    t = time.perf_counter()
                    sess.run(None, feeds)
                    times.append(time.perf_counter() - t)
            ma, mb = statistics.median(ta), statistics.median(tb)
            print(f"| {T} | {ma * 1e3:.0f} ms | {mb * 1e3:.0f} ms | {ma / mb:.2f}x | {float(np.abs(ya - yb).max()):.2g} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["generate", "serving", "onnx"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", help="generate: only these (and eager), e.g. graphopt graphopt+inductor")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args()
    {"generate": generate, "serving": serving, "onnx": onnx_latency}[args.what](args)


if __name__ == "__main__":
    main()
