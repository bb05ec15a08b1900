"""Search engines side by side: backtracking (TASO), egraph (equality saturation on egglog)
and hybrid (egraph, then backtracking from its graph).

For each model (built-in examples, random weights, T=--seq-len) and engine, in one process:
the final cost under the same cost model (roofline, this machine's device entry), the search
phase's seconds, the sites rewritten, the GEMM calls per forward in the result (the LoRA merge
leaves one per adapted projection), the e-graph's figures, and the latency of the result
(median of --runs, interleaved with eager).  ``--generated-only`` runs the rule library alone
(the hand-written rulesets off): what the generated rules are worth.

    python benchmarks/bench_search.py                                  # the four models, T=512
    python benchmarks/bench_search.py --models lora --engines egraph backtracking --runs 3
    python benchmarks/bench_search.py --generated-only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import graphopt
from graphopt.models import example

GEMMS = ("linear", "matmul", "mm", "bmm", "addmm", "gemm", "method matmul")


def gemm_calls(op_counts: dict) -> int:
    return sum(n for op, n in op_counts.items() if op in GEMMS)


def run(model_name: str, engines, seq_len: int, runs: int, generated_only: bool) -> list:
    model, (ids,) = example(model_name, seq_len=seq_len)
    opts = {"rulesets": ("generated",)} if generated_only else {}
    rows, variants = [], {"eager": model}
    with torch.no_grad():
        ref = model(ids)
    for engine in engines:
        t = time.monotonic()
        fast = graphopt.optimize(model, (ids,), search=engine, **opts)
        total = time.monotonic() - t
        rep = fast.report
        j = rep.to_json()
        phase = j["phases"].get("search", {})
        counts = {}
        for g in rep.graphs:
            for op, n in (g.op_counts.get("after") or {}).items():
                counts[op] = counts.get(op, 0) + n
        before = {}
        for g in rep.graphs:
            for op, n in (g.op_counts.get("before") or {}).items():
                before[op] = before.get(op, 0) + n
        with torch.no_grad():
            diff = float((fast(ids) - ref).abs().max())
        stats = (phase.get("graph_stats") or [{}])[0]
        rows.append({"model": model_name, "engine": engine, "cost_ms": rep.cost_after * 1e3,
                     "cost_before_ms": rep.cost_before * 1e3, "search_s": phase.get("seconds", 0.0),
                     "optimize_s": total, "sites": phase.get("applied", 0), "gemms_before": gemm_calls(before),
                     "gemms_after": gemm_calls(counts), "max_diff": diff, "fallbacks": rep.fallbacks,
                     "egraph": {k: stats.get(k) for k in ("blocks", "distinct_blocks", "max_enodes", "iterations",
                                                          "stopped", "extraction")} if stats else None})
        variants[engine] = fast
    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(ids)
        for _ in range(runs):
            for k, fn in variants.items():
                s = time.perf_counter()
                fn(ids)
                times[k].append((time.perf_counter() - s) * 1e3)
    eager = statistics.median(times["eager"])
    for r in rows:
        r["latency_ms"] = statistics.median(times[r["engine"]])
        r["eager_ms"] = eager
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama", "lora", "llama-lora"])
    ap.add_argument("--engines", nargs="+", default=["backtracking", "egraph", "hybrid"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--generated-only", action="store_true", help="hand-written rulesets off")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in args.models:
        rows.extend(run(name, args.engines, args.seq_len, args.runs, args.generated_only))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={args.seq_len}, "
          f"rules: {'generated only' if args.generated_only else 'all rulesets'}")
    print(f"{'model':<11} {'engine':<13} {'cost ms':>9} {'search s':>8} {'sites':>5} {'GEMMs':>9} "
          f"{'latency ms':>10} {'vs eager':>8} {'max|diff|':>9}  e-graph")
    for r in rows:
        eg = r["egraph"]
        eg_s = (f"{eg['blocks']} blocks/{eg['distinct_blocks']} saturated, <= {eg['max_enodes']} e-nodes, "
                f"{eg['iterations']} it, stop {eg['stopped']}, {eg['extraction']}") if eg else ""
        print(f"{r['model']:<11} {r['engine']:<13} {r['cost_ms']:>9.3f} {r['search_s']:>8.2f} {r['sites']:>5} "
              f"{r['gemms_before']:>4}->{r['gemms_after']:<4} {r['latency_ms']:>10.2f} "
              f"{r['eager_ms'] / r['latency_ms']:>7.2f}x {r['max_diff']:>9.2g}  {eg_s}"
              + (f"  FALLBACK {r['fallbacks']}" if r["fallbacks"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
