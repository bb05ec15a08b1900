"""Tensor parallelism (``graphopt.parallelize``), measured and predicted.

    python benchmarks/bench_parallel.py gloo [--seq-len 512] [--layers 4] [--world 2] [--runs 5]
    python benchmarks/bench_parallel.py predict [--models llama2-7b llama3-70b] [--worlds 2 4 8]

gloo:    the built-in Llama-style model (graphopt.models "llama": d=512, 8 heads of 64, 2 key/value
         heads, SwiGLU 1376, vocabulary 32000; random weights), prefill at --seq-len, sharded over
         --world local CPU processes on a gloo group (graphopt.parallel.launch: one thread each)
         against the model in one process with the same total threads.  Per rank: the largest
         output difference (example and fresh inputs), the bytes of weights it holds as a share of
         the model's, the median call time; on rank 0 the collectives, matmuls and attention
         kernels of one call counted with torch.profiler, and the plan's report (its interconnect
         measured on the group).  On 2 cores this measures what communication costs, not a
         speed-up.
predict: the cost model's estimate for Llama-2-7B-shaped (d=4096, 32 heads, SwiGLU 11008, 32
         layers, vocabulary 32000) and Llama-3-70B-shaped (d=8192, 64 heads, 8 key/value heads,
         28672, 80 layers, 128256) configs in bfloat16 on 2, 4 and 8 H100s (NVLink 4): prefill of
         T=2048 tokens (batch 1) and one decode step at batch 1 and 32 (one token per sequence;
         attention over the KV cache is not modelled).  The plan is searched on a narrow twin of
         each config (the same layers and heads, head size 4, every other width divided alike;
         random weights, so that every layout is checked on values) and costed with the real
         config's shapes, from a torch.export of it on the meta device (nothing allocated).
         Each config is planned at 2 and 4 layers (--sample-layers) and the estimates extended
         along the line through them to 32 or 80 layers: every layer has the same shapes and
         gets the same plan, so each adds the same time (planning 80 layers directly takes
         tens of minutes on 2 cores; at 8 layers the plan made directly is within 0.4% of the
         line).
         Each estimate also without the fixed cost per call (3 us per kernel launch in the
         device table): what a launch-free runtime (CUDA graphs, as gpt-fast uses) approaches.
         Printed next to published tensor-parallel figures (sources in BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import functools
import time

import torch


def build_llama(seq_len: int, layers: int):
    from graphopt.models import example
    return example("llama", seq_len=seq_len, layers=layers)


def cmd_gloo(args) -> None:
    from graphopt.parallel.launch import _timed, run_local
    threads = torch.get_num_threads()
    build = functools.partial(build_llama, args.seq_len, args.layers)
    start = time.perf_counter()
    results = run_local(build, args.world, runs=args.runs, profile=True)
    wall = time.perf_counter() - start
    model, inputs = build()
    one = _timed(model, inputs, args.runs)
    with torch.no_grad():
        from graphopt.parallel.launch import profile_counts
        model_counts = profile_counts(model, inputs)
    r0 = results[0]
    print(r0["report"])
    print()
    print(f"Llama-style model, {args.layers} layers, prefill T={args.seq_len}, {args.world} gloo processes "
          f"x {max(1, threads // args.world)} thread(s) vs 1 process x {threads} threads "
          f"(spawn + capture + search + check + timing: {wall:.1f} s)")
    print("| rank | max diff (example / fresh) | weights held | share of the model | median call |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rank']} | {r['diff']:.2e} / {r['diff_fresh']:.2e} | {r['rank_bytes'] / 1e6:.2f} MB | "
              f"{100 * r['rank_bytes'] / r['whole_bytes']:.1f}% | {r['seconds'] * 1e3:.1f} ms |")
    plan_s = max(r["seconds"] for r in results)
    print(f"| model, 1 process | | {r0['whole_bytes'] / 1e6:.2f} MB | 100% | {one * 1e3:.1f} ms |")
    print(f"time: plan {plan_s * 1e3:.1f} ms vs model {one * 1e3:.1f} ms: {one / plan_s:.2f}x "
          f"(median of {args.runs}; same total threads)")
    print(f"one call, counted with torch.profiler: rank 0 {r0['counts']}, model {model_counts}")


# -- predictions -------------------------------------------------------------------------

CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       num_hidden_layers=80, vocab_size=128256),
}
TWIN_HEAD = 4


def twin_config(cfg: dict) -> dict:
    """The same layers and heads, head size 4, other widths divided by the same factor (kept a
    multiple of 8, so that 2, 4 and 8 ranks divide them as they divide the real ones)."""
    factor = cfg["hidden_size"] // cfg["num_attention_heads"] // TWIN_HEAD

    def narrow(n):
        return max(8, (n // factor) // 8 * 8)
    return dict(cfg, hidden_size=cfg["num_attention_heads"] * TWIN_HEAD, head_dim=TWIN_HEAD,
                intermediate_size=narrow(cfg["intermediate_size"]), vocab_size=narrow(cfg["vocab_size"]))


def _lm(cfg: dict, meta: bool):
    import transformers as tf

    from graphopt.models import Logits
    config = tf.LlamaConfig(**cfg, max_position_embeddings=4096)
    if meta:
        with torch.device("meta"):
            lm = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    else:
        torch.manual_seed(0)
        lm = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return Logits(lm.eval())


SCENARIOS = {"prefill T=2048": (1, 2048), "decode batch 1": (1, 1), "decode batch 32": (32, 1)}


def _estimate(name: str, label: str, world: int, layers: int, beam: int):
    """(one device, plan, Megatron-LM's plan, launch-free one device, launch-free plan) in
    seconds for the config cut to ``layers`` layers."""
    from graphopt.parallel.plan import export_shapes, make_plan
    cfg = dict(CONFIGS[name], num_hidden_layers=layers)
    batch, t = SCENARIOS[label]
    big, twin = _lm(cfg, meta=True), _lm(twin_config(cfg), meta=False)
    shapes = export_shapes(big, (torch.zeros(batch, t, dtype=torch.long, device="meta"),))
    ids = torch.randint(0, 64, (batch, 8 if t > 1 else 1))
    _, _, rep = make_plan(twin, (ids,), world, device="h100", shapes=shapes, beam=beam, scenarios={})
    return (rep.time_one, rep.time_plan, rep.megatron, *rep.launch_free)


def cmd_predict(args) -> None:
    rows = []
    a, b = args.sample_layers
    for name in args.models:
        layers = CONFIGS[name]["num_hidden_layers"]
        for label in SCENARIOS:
            for world in args.worlds:
                start = time.perf_counter()
                lo, hi = _estimate(name, label, world, a, args.beam), _estimate(name, label, world, b, args.beam)
                # every layer costs the same (same shapes, same plan per layer): a line through
                # the two samples gives the whole model's estimate
                est = [x + (layers - a) * (y - x) / (b - a) for x, y in zip(lo, hi)]
                rows.append((name, label, world, *est, time.perf_counter() - start))
                one, par, meg = est[:3]
                print(f"{name} {label} x{world}: {one * 1e3:.2f} ms -> {par * 1e3:.2f} ms ({one / par:.2f}x), "
                      f"Megatron-LM's plan {meg * 1e3:.2f} ms, {rows[-1][-1]:.1f} s", flush=True)
    print()
    print("| config | scenario | H100s | one GPU (est.) | plan (est.) | speed-up | Megatron-LM's plan (est.) "
          "| launch-free: one GPU -> plan |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, world, one, par, meg, one_free, par_free, _ in rows:
        print(f"| {name} | {label} | {world} | {one * 1e3:.2f} ms | {par * 1e3:.2f} ms | {one / par:.2f}x | "
              f"{meg * 1e3:.2f} ms ({one / meg:.2f}x) | {one_free * 1e3:.2f} -> {par_free * 1e3:.2f} ms "
              f"({one_free / par_free:.2f}x) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gloo")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--world", type=int, default=2)
    g.add_argument("--runs", type=int, default=5)
    g.set_defaults(func=cmd_gloo)
    p = sub.add_parser("predict")
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--beam", type=int, default=16)
    p.add_argument("--sample-layers", nargs=2, type=int, default=[2, 4],
                   help="the configs are planned at these two depths and the estimates extended along "
                        "the line through them to the real depth (every layer costs the same)")
    p.set_defaults(func=cmd_predict)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
