"""Cost of the per-call weight guard (graphopt/runtime.py) on GPT-2-small.

Hugging Face's GPT-2-small (GPT2Config() defaults: 12 layers, 768 wide, random weights,
eager attention), optimised with graphopt.optimize at T=--seq-len.  In one process:

* the optimised call, median of --runs (torch.no_grad);
* the guard alone (GuardedGraph.check on the arguments Dynamo passes), median of
  --checks calls, and the number of tensors it watches;
* the share: guard / call (target: under 1%);
* the optimised graph without its guard (the exported GraphModule called directly)
  against the guarded one, rounds interleaved, as a side-by-side check of the same share;
* what a change costs: a load_state_dict followed by one call (the folded constants
  are computed again), against a plain call.

GPT-2's projections are already merged (Conv1D), so it folds no weights and the guard
watches none; ``--model llama`` (GPT-2-small's sizes in Llama's form) merges q/k/v and
gate/up and watches every merged weight.

    python benchmarks/bench_guard_overhead.py                 # T=128, 20 runs
    python benchmarks/bench_guard_overhead.py --model llama
    python benchmarks/bench_guard_overhead.py --seq-len 128 --runs 30 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import graphopt


def _median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("gpt2", "llama"), default="gpt2",
                    help="gpt2: HF GPT-2-small; llama: a Llama of GPT-2-small's sizes")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--checks", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    else:   # GPT-2-small's sizes in Llama's form: q/k/v and gate/up are merged, folded and watched
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=50257, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12, attn_implementation="eager")).eval()
    ids = torch.randint(0, 50257, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    fast = graphopt.optimize(model, (ids,))
    guards = [g.runtime for g in fast.report.graphs if hasattr(g.runtime, "check")]
    if len(guards) != 1:
        raise SystemExit(f"expected one optimised graph, got {len(guards)}: {fast.report.fallbacks}")
    guard = guards[0]
    seen = []
    real_check = guard.check
    guard.check = lambda a, **kw: (seen.append(a), real_check(a, **kw))[1]
    with torch.no_grad():
        fast(ids)
    guard.check = real_check
    graph_args = seen[0]

    with torch.no_grad():
        for _ in range(3):
            fast(ids)
        call = _median_seconds(lambda: fast(ids), args.runs)
        check = _median_seconds(lambda: guard.check(graph_args), args.checks)
        guarded, bare = [], []
        for _ in range(args.runs):           # interleaved: the same noise for both
            t = time.perf_counter()
            guard(*graph_args)
            guarded.append(time.perf_counter() - t)
            t = time.perf_counter()
            guard.fast(*graph_args)
            bare.append(time.perf_counter() - t)
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def reload_and_call():
            model.load_state_dict(state)
            fast(ids)
        reload = _median_seconds(reload_and_call, max(3, args.runs // 4))
        load_only = _median_seconds(lambda: model.load_state_dict(state), max(3, args.runs // 4))
    out = {
        "model": {"gpt2": "gpt2-small", "llama": "llama (gpt2-small sizes)"}[args.model] + " (HF, random weights)", "seq_len": args.seq_len, "threads": torch.get_num_threads(),
        "watched_tensors": len(guard.watched), "refold_tensors": sum(w.refold for w in guard.watched),
        "call_ms": round(call * 1e3, 3), "guard_us": round(check * 1e6, 2),
        "guard_share_pct": round(100 * check / call, 4),
        "guarded_graph_ms": round(statistics.median(guarded) * 1e3, 3),
        "bare_graph_ms": round(statistics.median(bare) * 1e3, 3),
        "side_by_side_overhead_pct": round(100 * (statistics.median(guarded) / statistics.median(bare) - 1), 2),
        "load_state_dict_then_call_ms": round(reload * 1e3, 2),
        "load_state_dict_ms": round(load_only * 1e3, 2),
        "refold_ms_estimate": round((reload - load_only - call) * 1e3, 2),
        "stats": {k: v for k, v in fast.stats().items() if k != "graphs"},
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")
    return out


if __name__ == "__main__":
    main()
