"""GPU check: how fast graphopt makes two causal LMs on one GPU, next to eager, torch.compile and HF SDPA.

What it measures, for GPT-2-small and a Llama-3.2-1B-shaped model (both built from their
configs with random bf16 weights; nothing is downloaded):

* prefill: one forward pass over ``input_ids`` of shape (1, T), T = 1024 and 4096, no KV
  cache, logits out; the median of several timed runs after warm-up, in ms, and the
  achieved TFLOP/s and its percentage of the device's peak bf16 dense rate;
* decode: greedy ``generate`` of 128 new tokens after a 128-token prompt
  (default dynamic cache); tokens/s = new tokens / wall time of the whole call, and
  GB/s = weight bytes x tokens/s (each new token reads every weight once; KV-cache and
  activation traffic are not counted) as a percentage of the device's peak bandwidth;
  ``tokens_equal`` says whether a variant generated exactly eager's tokens.

Variants: ``eager`` (HF eager attention), ``graphopt`` (prefill: ``graphopt.optimize`` of the
logits wrapper; decode: ``torch.compile(lm.forward, backend="graphopt")``), ``torch.compile``
(inductor, default mode; prefill compiled with ``dynamic=False`` as graphopt's capture is, so
each T gets its own static graph) and ``hf-sdpa`` (``attn_implementation="sdpa"``, same weights).

FLOPs of a prefill are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one untimed
call of the eager model: every matmul including the full T x T attention products (the
causal half that is masked out is counted too; SDPA kernels on CPU are not counted by the
counter, eager's matmuls are everywhere).  Times use ``torch.cuda.synchronize`` around a
``time.perf_counter`` interval, so the CPU dry run exercises the same timing code.

Usage (the wrapper ``benchmarks/gpu_check.sh`` installs the project, then runs this)::

    python3 benchmarks/gpu_check.py                  # needs CUDA; about 5-8 minutes on an H100/H200
    python3 benchmarks/gpu_check.py --dry-run        # the same code on CPU with tiny models
    python3 benchmarks/gpu_check.py --out DIR --budget-s 420

Output: ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (also printed).  A row that would end
after ``--budget-s`` seconds (judged by the longest earlier row of its phase and variant) is not
started and is recorded as ``skipped: time budget``; a variant that fails records its error in
one line and the others still run.  In the dry run graphopt's search gets 1 s per graph instead
of its default 10 s; everything else is the GPU run's code at tiny sizes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Peak bf16 dense tensor-core rate (TFLOP/s) and memory bandwidth (TB/s), by a substring of
# torch.cuda.get_device_name(), most specific first.  Sources: NVIDIA H100 Tensor Core GPU
# datasheet (SXM: 989 TFLOP/s bf16 dense, i.e. 1,979 with sparsity, 3.35 TB/s; NVL: 835,
# 3.9 TB/s; PCIe: 756, 2.0 TB/s) and NVIDIA H200 Tensor Core GPU datasheet (SXM: 989 TFLOP/s
# bf16 dense, 4.8 TB/s; NVL: 835, 4.8 TB/s).  Any other H100/H200 name is taken as SXM.
PEAKS = (("H200 NVL", 835.0, 4.8), ("H200", 989.0, 4.8),
         ("H100 NVL", 835.0, 3.9), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)
TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0)
VARIANTS = ("eager", "hf-sdpa", "graphopt", "torch.compile")
# graphopt's options: its defaults on the GPU; in the dry run a 1 s search per graph (its default,
# 10 s, would make the dry run's graphopt rows most of its time on two CPU cores); one prompt
# length and 3 new tokens (the first decode steps already recompile with a dynamic length) keep
# inductor's compiles, most of the dry run's time, few

FULL = dict(seq_lens=(1024, 4096), prompt=128, new_tokens=128, warmup=2, runs=5, decode_runs=3, graphopt={})
DRY = dict(seq_lens=(32,), prompt=16, new_tokens=3, warmup=1, runs=3, decode_runs=1,
           graphopt=dict(time_limit=1.0))

def device_peaks(device: torch.device) -> dict:
    """The peak TFLOP/s and GB/s to divide by: the datasheet table on CUDA (None when the GPU is
    not in it), or on CPU a bf16 GEMM rate and a copy bandwidth measured here and now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops, tbps in PEAKS:
            if key in name:
                return dict(device=name, tflops=tflops, gbps=tbps * 1000, source=f"NVIDIA {key} datasheet")
        return dict(device=name, tflops=None, gbps=None, source="unknown device: no peak, no percentages")
    n = 512
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    gemm = min(_wall(lambda: a @ b, device) for _ in range(5))
    src, dst = torch.empty(16 << 20), torch.empty(16 << 20)   # 64 MiB of float32 each
    copy = min(_wall(lambda: dst.copy_(src), device) for _ in range(5))
    return dict(device="cpu", tflops=2 * n ** 3 / gemm / 1e12, gbps=2 * src.nbytes / copy / 1e9,
                source="measured here (bf16 512x512 GEMM; 64 MiB copy, read + write)")

def _wall(fn, device) -> float:
    """Seconds one call of ``fn`` takes, with the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start

def median_s(fn, device, warmup: int, runs: int) -> float:
    """The median wall time of ``runs`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(_wall(fn, device) for _ in range(runs))

def graphopt_summary(reports) -> dict:
    """What graphopt did, from its reports: graphs, attention blocks fused, fallbacks."""
    js = [r.to_json() for r in reports]
    return dict(graphs=sum(j["graphs"] for j in js), attention_blocks=sum(j["attention"]["blocks"] for j in js),
                attention_fused=sum(j["attention"]["fused"] for j in js),
                fallbacks=[f for j in js for f in j["fallbacks"]],
                max_abs_diff=max((j["max_abs_diff"] for j in js), default=0.0))

def build_models(name: str, dry: bool, device: torch.device, max_t: int):
    """The eager-attention model and an SDPA-attention copy with the same random weights, and notes."""
    import transformers
    notes = []
    if name == "gpt2-small":
        cfg = transformers.GPT2Config(**(TINY_GPT2 if dry else {}))
        if max_t > cfg.n_positions:
            notes.append(f"gpt2-small: n_positions raised from {cfg.n_positions} to {max_t} for T={max_t}")
            cfg.n_positions = max_t
    else:
        cfg = transformers.LlamaConfig(**(TINY_LLAMA if dry else LLAMA_1B))
    torch.manual_seed(0)
    models = []
    for attn in ("eager", "sdpa"):
        with device:
            # a config of its own: from_config records the attention implementation in the config
            lm = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn,
                                                               dtype=torch.bfloat16)
        assert lm.config._attn_implementation == attn, (attn, lm.config._attn_implementation)
        models.append(lm.to(device).eval())
    models[1].load_state_dict(models[0].state_dict())
    return models[0], models[1], notes

def prefill_rows(name, eager_lm, sdpa_lm, t, p, peaks, device, run_row):
    """Time one prefill of length ``t`` for each variant (each through ``run_row``)."""
    import graphopt
    from graphopt.models import Logits
    from torch.utils.flop_counter import FlopCounterMode
    ids = torch.randint(0, eager_lm.config.vocab_size, (1, t), device=device)
    wrapper = Logits(eager_lm)
    try:
        with FlopCounterMode(display=False) as counter:
            wrapper(ids)
        flops = counter.get_total_flops()
    except Exception:  # noqa: BLE001  (the eager row will record what is wrong; no TFLOP/s then)
        flops = None
    makers = {"eager": lambda: wrapper, "hf-sdpa": lambda: Logits(sdpa_lm),
              "graphopt": lambda: graphopt.optimize(wrapper, (ids,), **p["graphopt"]),
              "torch.compile": lambda: torch.compile(wrapper, dynamic=False)}
    eager_ms = None
    for variant in VARIANTS:
        def measure(variant=variant):
            fn = None
            def first():  # noqa: E306  (graphopt optimises here, torch.compile at the first call)
                nonlocal fn
                fn = makers[variant]()
                fn(ids)
            first_s = _wall(first, device)
            ms = median_s(lambda: fn(ids), device, p["warmup"] - 1, p["runs"]) * 1e3
            tflops = flops / (ms / 1e3) / 1e12 if flops else None
            row = dict(ms=ms, tflops=tflops, pct_peak=_pct(tflops, peaks["tflops"]), first_call_s=first_s,
                       speedup=eager_ms / ms if eager_ms else None, flops=flops)
            if variant == "graphopt":
                row["graphopt"] = graphopt_summary([fn.report])
            return row
        row = run_row(dict(model=name, phase="prefill", T=t, variant=variant), measure)
        if variant == "eager" and row.get("ms"):
            eager_ms = row["ms"]

def decode_rows(name, eager_lm, sdpa_lm, p, peaks, device, run_row):
    """Time greedy generation for each variant and compare its tokens with eager's."""
    import graphopt  # noqa: F401  (registers torch.compile's backend="graphopt")
    from graphopt.optimize import LAST_REPORTS
    ids = torch.randint(0, eager_lm.config.vocab_size, (1, p["prompt"]), device=device)
    weight_bytes = sum(q.numel() * q.element_size() for q in eager_lm.parameters())
    n = p["new_tokens"]
    pad = eager_lm.config.eos_token_id
    ref = {}
    for variant in VARIANTS:
        def measure(variant=variant):
            lm = sdpa_lm if variant == "hf-sdpa" else eager_lm
            if variant == "graphopt":
                lm.forward = torch.compile(lm.forward, backend="graphopt", options=p["graphopt"])
            elif variant == "torch.compile":
                lm.forward = torch.compile(lm.forward)
            LAST_REPORTS.clear()
            try:
                gen = lambda: lm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,  # noqa: E731
                                          pad_token_id=pad)
                tokens = []
                first_s = _wall(lambda: tokens.append(gen()), device)  # compiles; the tokens to compare
                out = tokens[0]
                s = median_s(gen, device, 0, p["decode_runs"])
            finally:
                lm.__dict__.pop("forward", None)  # back to the class's forward
            if variant == "eager":
                ref["tokens"], ref["tps"] = out, n / s
            tps = n / s
            gbps = weight_bytes * tps / 1e9
            equal = bool(torch.equal(out, ref["tokens"])) if "tokens" in ref else None
            row = dict(tokens_per_s=tps, gbps=gbps, pct_peak=_pct(gbps, peaks["gbps"]), tokens_equal=equal,
                       speedup=tps / ref["tps"] if "tps" in ref else None, weight_bytes=weight_bytes,
                       first_call_s=first_s)
            if variant == "graphopt":
                row["graphopt"] = graphopt_summary(LAST_REPORTS)
            return row
        run_row(dict(model=name, phase="decode", T=p["prompt"], new_tokens=n, variant=variant), measure)

def one_line(e: BaseException) -> str:
    """An exception as one short line: the innermost cause (Dynamo wraps a backend's error), its type
    and the first line of its message, without the ``|`` that would split a Markdown cell."""
    while getattr(e, "inner_exception", None) or e.__cause__:
        e = getattr(e, "inner_exception", None) or e.__cause__
    msg = (str(e).strip().splitlines() or [""])[0][:200].replace("|", "/")
    return f"{type(e).__name__}: {msg}"

def _pct(value, peak):
    """``value`` as a percentage of ``peak``, or None without one of them."""
    return 100.0 * value / peak if peak and value is not None else None

def _fmt(x, digits=1):
    """A table cell: a number with ``digits`` decimals (3 significant for small ones), or a dash."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"

def markdown(result: dict) -> str:
    """The summary as a Markdown table, with the device, peaks and notes above it."""
    pk = result["peaks"]
    lines = [f"# graphopt GPU check{' (dry run, CPU)' if result['dry_run'] else ''}", "",
             f"device: {pk['device']}; peak {_fmt(pk['tflops'], 3)} TFLOP/s, {_fmt(pk['gbps'])} GB/s "
             f"({pk['source']}); wall {result['wall_s']:.1f} s", ""]
    lines += [f"* {note}" for note in result["notes"]] + ([""] if result["notes"] else [])
    lines += ["| model | phase | T | variant | ms or tokens/s | TFLOP/s or GB/s | % of peak | speedup vs eager "
              "| tokens_equal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * 4
        elif r["phase"] == "prefill":
            cells = [f"{_fmt(r['ms'], 2)} ms", _fmt(r["tflops"], 2), _fmt(r["pct_peak"]), _fmt(r["speedup"], 2), "-"]
        else:
            cells = [f"{_fmt(r['tokens_per_s'])} tok/s", _fmt(r["gbps"], 2), _fmt(r["pct_peak"]),
                     _fmt(r["speedup"], 2), _fmt(r["tokens_equal"])]
        lines.append("| " + " | ".join([r["model"], r["phase"], str(r["T"]), r["variant"]] + cells).replace("\n", " ")
                     + " |")
    lines.append("")
    for r in result["rows"]:
        if "graphopt" in r:
            g = r["graphopt"]
            fallbacks = f", fallbacks: {'; '.join(g['fallbacks'])}" if g["fallbacks"] else ""
            lines.append(f"* graphopt, {r['model']} {r['phase']} T={r['T']}: {g['graphs']} graph(s), attention "
                         f"{g['attention_fused']} of {g['attention_blocks']} blocks fused, first call "
                         f"{r['first_call_s']:.1f} s{fallbacks}")
    return "\n".join(lines) + "\n"

def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

def main(argv=None) -> int:
    """Parse the arguments, run every row that fits in the budget, write and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny models on CPU (what the test suite runs)")
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no row that would end after this many seconds (judged by the longest earlier "
                    "row of its phase and variant); default 420, so that all ends within 8 minutes")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    try:
        import transformers
    except ImportError:
        print("gpu_check: needs transformers (pip install 'graphopt[hf]')", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    dynamo = torch._dynamo.config   # many compiles of one forward (T, decode lengths, variants)
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    start = time.monotonic()
    device = torch.device("cpu" if args.dry_run else "cuda")
    p = DRY if args.dry_run else FULL
    peaks = device_peaks(device)
    rows, notes = [], []

    took: dict = {}   # (phase, variant) -> the longest such row so far, in seconds

    def run_row(key: dict, measure) -> dict:
        """Run one measurement unless it would end past the budget (judged by the longest row of the
        same phase and variant so far); record its numbers or its error."""
        row, began = dict(key), time.monotonic()
        kind = (key["phase"], key["variant"])
        if began - start + took.get(kind, 0.0) > args.budget_s:
            row["status"] = "skipped: time budget"
        else:
            try:
                with torch.no_grad():
                    row.update(measure())
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (one failing variant must not stop the others)
                row["status"] = f"error: {one_line(e)}"
            finally:
                torch._dynamo.reset()   # each compiled variant starts from an empty Dynamo cache
            took[kind] = max(took.get(kind, 0.0), time.monotonic() - began)
        rows.append(row)
        print(f"[{time.monotonic() - start:6.1f} s] {row['model']} {row['phase']} T={row['T']} "
              f"{row['variant']}: {row['status']}", file=sys.stderr, flush=True)
        return row

    models = {}
    for name in ("gpt2-small", "llama-3.2-1b-shaped"):
        try:
            eager_lm, sdpa_lm, model_notes = build_models(name, args.dry_run, device, max(p["seq_lens"]))
        except Exception as e:  # noqa: BLE001  (the other model still runs)
            notes.append(f"{name}: not built, no rows ({one_line(e)})")
            continue
        models[name] = (eager_lm, sdpa_lm)
        notes += model_notes
    with torch.no_grad():
        for t in p["seq_lens"]:                  # phase-major: prefill of both models first
            for name, (eager_lm, sdpa_lm) in models.items():
                prefill_rows(name, eager_lm, sdpa_lm, t, p, peaks, device, run_row)
        for name, (eager_lm, sdpa_lm) in models.items():
            decode_rows(name, eager_lm, sdpa_lm, p, peaks, device, run_row)
    notes.append("random weights, bf16, batch 1; prefill FLOPs counted on eager (full T x T attention)")
    result = dict(dry_run=args.dry_run, peaks=peaks, params=p, torch=torch.__version__,
                  transformers=transformers.__version__, notes=notes, rows=rows,
                  wall_s=time.monotonic() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "gpu_check.json", json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    write_atomic(out / "gpu_check.md", table)
    print(table)
    return 0

if __name__ == "__main__":
    sys.exit(main())
