"""Benchmark of the optimizer: search time, and forward latency side by side.

1. Search time on the built-in GPT-2-small graph (12 layers, random weights,
   T=1024): the graph is captured with Dynamo and imported once; the rule
   patterns are loaded once (reported separately); then the search runs with the
   default settings.
2. Forward latency, in one process, median of --runs each, rounds interleaved so
   machine noise hits every variant alike: eager; torch.compile (inductor);
   graphopt; graphopt chained into inductor.  Outputs are compared with eager.

    python benchmarks/bench_optimize.py                       # gpt2 + llama at T=256
    python benchmarks/bench_optimize.py --models gpt2 --seq-len 1024 --runs 5
    python benchmarks/bench_optimize.py --skip-latency        # search time only
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import graphopt
from graphopt.models import example


def search_time(seq_len: int) -> dict:
    """The pipeline's IR stages on GPT-2's captured graph: each schedule phase and its time."""
    from cost_models import get_cost_model
    from graphopt.frontends.fx import import_fx
    from graphopt.optimize import _parameters
    from graphopt.options import Options
    from graphopt.pipeline import transform
    from graphopt.report import GraphReport
    from graphopt.schedule import planned

    model, (ids,) = example("gpt2", seq_len=seq_len)
    caps = []

    def grab(gm, ex):
        caps.append((gm, ex))
        return gm
    with torch.no_grad():
        torch.compile(model, backend=grab)(ids)
    gm, ex = caps[0]
    opts = Options(time_limit=60.0)
    t = time.monotonic()
    plan = planned(opts)
    load_s = time.monotonic() - t
    imp = import_fx(gm, ex, constant_inputs=_parameters(gm, ex))
    rep = GraphReport()
    transform(imp.graph, plan, get_cost_model("roofline", device="cpu"), opts, rep)
    return {"fx_nodes": len(gm.graph.nodes), "ir_nodes": len(imp.graph.nodes),
            "patterns": sum(len(s.patterns) for s in plan), "pattern_load_s": load_s,
            "search_s": rep.search_seconds, "phases": rep.phases, "applied": dict(rep.applied),
            "cost_ms": (rep.cost_before * 1e3, rep.cost_after * 1e3)}


def latency(name: str, seq_len: int, runs: int, layers=None) -> dict:
    model, (ids,) = example(name, seq_len=seq_len, layers=layers)
    variants = {"eager": model}
    t = time.monotonic()
    variants["inductor"] = torch.compile(model)
    with torch.no_grad():
        ref = model(ids)
        variants["inductor"](ids)
    compile_s = {"inductor": time.monotonic() - t}
    t = time.monotonic()
    fast = graphopt.optimize(model, (ids,))
    compile_s["graphopt"] = time.monotonic() - t
    variants["graphopt"] = fast
    t = time.monotonic()
    chained = torch.compile(model, backend="graphopt", options={"inductor": True})
    with torch.no_grad():
        chained(ids)
    compile_s["graphopt+inductor"] = time.monotonic() - t
    variants["graphopt+inductor"] = chained
    times = {k: [] for k in variants}
    diffs = {}
    with torch.no_grad():
        for k, fn in variants.items():
            diffs[k] = float((fn(ids) - ref).abs().max())
        for _ in range(runs):
            for k, fn in variants.items():
                s = time.perf_counter()
                fn(ids)
                times[k].append((time.perf_counter() - s) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "seq_len": seq_len, "median_ms": med, "diff": diffs, "compile_s": compile_s,
            "report": fast.report.to_json()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--search-seq-len", type=int, default=1024)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if not args.skip_search:
        s = search_time(args.search_seq_len)
        print(f"\n## search, GPT-2-small 12 layers, T={args.search_seq_len}")
        print(f"fx nodes {s['fx_nodes']}, IR nodes {s['ir_nodes']}, patterns {s['patterns']} "
              f"(loaded in {s['pattern_load_s']:.1f} s)")
        phases = ", ".join(f"{k} {v['seconds']:.2f} s ({v['applied']} sites)" for k, v in s["phases"].items())
        print(f"schedule {s['search_s']:.2f} s: {phases}; "
              f"model cost {s['cost_ms'][0]:.2f} -> {s['cost_ms'][1]:.2f} ms; applied {s['applied']}")
    if not args.skip_latency:
        print(f"\n## forward latency, T={args.seq_len}, median of {args.runs} (interleaved rounds)")
        print("| model | eager ms | inductor ms | graphopt ms | graphopt+inductor ms | graphopt vs eager | "
              "graphopt vs inductor | graphopt+inductor vs inductor | max diff | rules applied |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models:
            r = latency(name, args.seq_len, args.runs)
            m = r["median_ms"]
            applied = sum(r["report"]["rules_applied"].values())
            print(f"| {name} | {m['eager']:.1f} | {m['inductor']:.1f} | {m['graphopt']:.1f} | "
                  f"{m['graphopt+inductor']:.1f} | {m['eager'] / m['graphopt']:.2f}x | "
                  f"{m['inductor'] / m['graphopt']:.2f}x | {m['inductor'] / m['graphopt+inductor']:.2f}x | "
                  f"{max(r['diff'].values()):.2g} | {applied} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
