"""Tensor-parallel plans (``graphopt.plan_parallel``) over Hugging Face causal-LM architectures
that no test names, built small from their default configs (random weights; nothing is
downloaded), at 2 and 4 ranks in float32 and at 2 ranks in bfloat16, on token ids of shape
(2, 24), costed on an H100.  Every rank's program is run in one process and compared with the
model (plan_parallel raises if any rank differs); the sweep also runs the rank programs on
fresh ids, which the plan never saw, and compares them with the model.

    python benchmarks/sweep_parallel.py [--arch mistral,phi3 ...] [--json sweep_parallel.json]
    python benchmarks/sweep_parallel.py --table sweep_parallel.json   # the table of a saved run

Each (architecture, world, dtype) runs in its own subprocess, one at a time (a crash or a
hang in one cannot take the sweep down).  Per row: built or why not, plan made, outputs equal
(or the error's first line, and for an error inside graphopt the traceback's last lines),
weights per rank as % of the model, 2-D weights split / replicated, collectives per call,
seconds of plan_parallel, and at 4 ranks whether the k/v projections were replicated
(R: all replicated, split, mixed: some layers each way).  "Megatron/plan" is the estimated
time of Megatron-LM's hand-written plan over the plan found's (below 1: Megatron's is
estimated faster).

Weights come from ``torch.manual_seed(0)`` before each build (a plan may depend on them:
the search checks each call's layouts on the captured values).  Configs are shrunk the way ``benchmarks/zoo_causal_lm.py`` does it (a small value for each key
the default config has, token ids kept within the vocabulary), with the sizes below, passed as
``overrides`` to ``graphopt.hf.from_config``; a key the config lacks is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_causal_lm import TOKEN_IDS  # noqa: E402  (the token-id keys the zoo keeps in the vocabulary)

ARCHS = ("mistral", "phi3", "gemma", "qwen3", "olmo2", "falcon", "gpt_neox", "bloom", "opt",
         "starcoder2", "stablelm", "granite", "gptj", "phi", "mixtral")
RUNS = ((2, "float32"), (4, "float32"), (2, "bfloat16"))     # (world, dtype); bf16 at 2 ranks only
BATCH, SEQ = 2, 24
HIDDEN, HEADS, KV_HEADS, VOCAB = 128, 4, 2, 512
SMALL = {   # config key -> small value, where the default config has the key
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "word_embed_proj_dim": HIDDEN,
    "intermediate_size": 256, "n_inner": 256, "ffn_dim": 256, "ffn_hidden_size": 256,
    "num_attention_heads": HEADS, "n_head": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS,
    "head_dim": HIDDEN // HEADS, "rotary_dim": 16,              # rotary_dim <= head_dim (gptj)
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64,
    "num_local_experts": 4, "num_experts_per_tok": 2,            # mixtral: 4 experts, not 8
}
KV_NAMES = re.compile(r"\.(k_proj|v_proj|key|value|k|v)\.weight$")
FUSED_QKV = re.compile(r"\.(qkv_proj|query_key_value|c_attn|Wqkv|qkv)\.weight$")


def overrides(arch: str, kv_heads: int = KV_HEADS) -> tuple:
    """(overrides for hf.from_config, keys skipped) for this architecture's default config."""
    import transformers
    d = transformers.AutoConfig.for_model(arch).to_dict()
    out = {k: v for k, v in SMALL.items() if k in d}
    for k in ("num_key_value_heads", "num_kv_heads"):
        if k in out:
            out[k] = kv_heads
    if "head_dim" in out and d.get("head_dim") is None:
        del out["head_dim"]            # computed from hidden_size / heads by the model itself
    for key in TOKEN_IDS:               # as zoo_causal_lm._shrink: ids within the small vocabulary
        v = d.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= VOCAB:
            out[key] = 0
    skipped = sorted(k for k in SMALL if k not in d)
    return out, skipped


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _tail(e: BaseException, n: int = 6) -> list:
    lines = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines()
    return lines[-n:]


def _stage(e: BaseException) -> str:
    """Where in plan_parallel an exception came from: plan (capture and search), lower, run, check."""
    names = [f.name for f in traceback.extract_tb(e.__traceback__)]
    if "make_plan" in names:
        return "plan"
    if "rank_graph" in names or "rank_state" in names:
        return "lower"
    if "run" in names and any(f.filename.endswith("lower.py") for f in traceback.extract_tb(e.__traceback__)):
        return "run"
    return "check" if "does not compute the model" in str(e) else "other"


def _kv(layers: list) -> str:
    """How the key/value projections are laid out: R (replicated), split, mixed, or the fused
    q/k/v projection's layout."""
    kv = [ln for ln in layers if KV_NAMES.search(ln.weight)]
    if kv:
        split = {ln.layout.startswith("S") for ln in kv}
        return "R" if split == {False} else "split" if split == {True} else "mixed"
    fused = sorted({ln.layout for ln in layers if FUSED_QKV.search(ln.weight)})
    return f"fused qkv {'/'.join(fused)}" if fused else "-"


def one(arch: str, world: int, dtype_name: str) -> dict:
    """Build one architecture and plan it over ``world`` ranks (in this process)."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    import graphopt
    from graphopt import hf
    from graphopt.parallel.lower import Simulation
    from graphopt.parallel.plan import _outputs_match

    dtype = getattr(torch, dtype_name)
    row = {"arch": arch, "world": world, "dtype": dtype_name}
    over, skipped = overrides(arch)
    try:
        torch.manual_seed(0)
        model = hf.from_config(arch, layers=2, dtype=dtype, overrides=over)
    except Exception as e:  # noqa: BLE001  (equal q and k/v heads where the model needs them)
        first = _first_line(e)
        over4, _ = overrides(arch, HEADS)
        if over4 == over:
            return {**row, "built": False, "why": first, "overrides": over}
        try:
            torch.manual_seed(0)
            model = hf.from_config(arch, layers=2, dtype=dtype, overrides=over4)
            over = over4
            row["kv_note"] = f"built with {HEADS} k/v heads ({KV_HEADS} refused: {first[:120]})"
        except Exception as e2:  # noqa: BLE001
            return {**row, "built": False, "why": _first_line(e2), "overrides": over4}
    row.update(built=True, overrides=over, skipped=skipped,
               params=sum(p.numel() for p in model.parameters()))
    cfg = model.model.config
    row["kv_heads"] = next((getattr(cfg, k) for k in ("num_key_value_heads", "num_kv_heads")
                            if isinstance(getattr(cfg, k, None), int)), None)
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        row["kv_heads"] = 1           # falcon-7b style: one k/v head
    ids = hf.example_ids(model, BATCH, SEQ)
    t = time.perf_counter()
    try:
        rep, modules = graphopt.plan_parallel(model, (ids,), world, device="h100")
    except Exception as e:  # noqa: BLE001  (a refusal or a crash is a result)
        row["s"] = round(time.perf_counter() - t, 2)
        stage = _stage(e)
        row.update(plan=stage not in ("plan", "other"), equal=False if stage in ("check",) else None,
                   stage=stage, error=_first_line(e), graphopt_error=isinstance(e, graphopt.GraphoptError),
                   traceback=_tail(e))
        return row
    row["s"] = round(time.perf_counter() - t, 2)
    row.update(plan=True, equal=True, checked=rep.checked)
    row["rank_pct"] = round(100 * rep.rank_bytes / max(rep.weight_bytes, 1), 1)
    two = [ln for ln in rep.layers if len(ln.shape) == 2]
    more = [ln for ln in rep.layers if len(ln.shape) > 2]
    row["split_2d"] = sum(ln.layout.startswith("S") for ln in two)
    row["repl_2d"] = sum(ln.layout == "R" for ln in two)
    row["other_2d"] = sorted({ln.layout for ln in two if ln.layout[0] not in "SR"})
    if more:
        row["split_nd"] = sum(ln.layout.startswith("S") for ln in more)
        row["repl_nd"] = sum(ln.layout == "R" for ln in more)
    row["collectives"] = {k: n for k, (n, _) in sorted(rep.collectives.items())}
    row["n_collectives"] = sum(row["collectives"].values())
    row["kv"] = _kv(rep.layers)
    row["notes"] = list(rep.notes)
    row["replicated_2d"] = [ln.weight.removeprefix("model.") for ln in two if ln.layout == "R"]
    row["layouts"] = {ln.weight.removeprefix("model."): ln.layout for ln in rep.layers}
    row["megatron_ratio"] = round(rep.megatron / rep.time_plan, 3) if rep.megatron and rep.time_plan else None
    row["megatron_note"] = rep.megatron_note[:200]
    row["predictions"] = [lb for lb, _, _ in rep.predictions]
    # rank 0's actual state against the report's bytes per rank
    held = sum(v.numel() * v.element_size() for k, v in modules[0].state_dict().items()
               if not k.rsplit(".", 1)[-1].startswith("_graphopt_vocab_start"))
    row["rank0_state_pct"] = round(100 * held / max(rep.weight_bytes, 1), 1)
    # the rank programs on ids the plan never saw
    fresh = hf.example_ids(model, BATCH, SEQ, seed=1)
    try:
        with torch.no_grad():
            want = model(fresh)
            outs = Simulation(modules).run(fresh)
        why = next((f"rank {r}: {w}" for r, got in enumerate(outs) if (w := _outputs_match([want], got))), "")
        row["fresh_equal"] = not why
        if why:
            row["fresh_why"] = why
    except Exception as e:  # noqa: BLE001
        row["fresh_equal"] = None
        row["fresh_why"] = _first_line(e)
    return row


def _child(arch: str, world: int, dtype: str, timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", arch, "--world", str(world), "--dtype", dtype]
    row = {"arch": arch, "world": world, "dtype": dtype}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "built": None, "why": f"timed out after {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr or "").strip().splitlines()[-6:]
    return {**row, "built": None, "why": f"process died (rc {p.returncode})", "traceback": tail}


def _cell(r: dict) -> list:
    if not r.get("built"):
        why = r.get("why", "")
        return ["no" if r.get("built") is False else "?", "", "", "", "", "", "", "", "", f"{why[:90]}"]
    if not r.get("plan") or not r.get("equal"):
        plan = "yes" if r.get("plan") else "no"
        equal = "NO" if r.get("equal") is False else "-"
        err = r.get("error", "").replace("GraphoptError: ", "").replace("plan_parallel: ", "")
        return ["yes", plan, equal, "", "", "", "", "", f"{r.get('s', '')}", f"{r.get('stage')}: {err[:110]}"]
    colls = ", ".join(f"{n} {k}" for k, n in r["collectives"].items())
    kv = r["kv"] if r["world"] == 4 else ""
    if kv and r.get("kv_heads") is not None:
        kv += f" ({r['kv_heads']} kv heads)"
    notes = []
    if r.get("fresh_equal") is False or r.get("fresh_equal") is None:
        notes.append(f"fresh ids: {r.get('fresh_why', '')[:80]}")
    if r["split_2d"] == 0:
        notes.append("nothing split")
    if r.get("other_2d"):
        notes.append(f"2-D layouts {r['other_2d']}")
    if "split_nd" in r:
        notes.append(f">2-D: {r['split_nd']} split / {r['repl_nd']} repl")
    if abs(r.get("rank0_state_pct", r["rank_pct"]) - r["rank_pct"]) > 1:
        notes.append(f"rank 0 holds {r['rank0_state_pct']}%")
    if r.get("kv_note"):
        notes.append(r["kv_note"][:60])
    if any("do not divide" in n for n in r.get("notes", [])):
        notes.append("heads do not divide: attention replicated")
    for n in r.get("notes", []):
        if "do not split evenly" in n:
            notes.append("memory budget not met: searched again without one")
        elif "do not divide" not in n:
            notes.append(n[:80])
    return ["yes", "yes", "yes", f"{r['rank_pct']}%", f"{r['split_2d']}/{r['repl_2d']}",
            f"{r['n_collectives']} ({colls})", kv, f"{r['megatron_ratio']}" if r.get("megatron_ratio") else
            "n/a", f"{r['s']}", "; ".join(notes)]


def table(rows: list) -> str:
    out = ["| arch | world | dtype | built | plan | equal | weights/rank | 2-D split/repl | collectives "
           "| k/v at 4 ranks | Megatron/plan | s | notes |", "|" + "---|" * 13]
    for r in rows:
        out.append("| " + " | ".join([r["arch"], str(r["world"]), r["dtype"].replace("float", "f")
                                       .replace("bf16", "bf16")] + _cell(r)) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="architectures to run (comma-separated, repeatable); "
                    f"default: {', '.join(ARCHS)}")
    ap.add_argument("--json", help="also write the rows as JSON to this path")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    ap.add_argument("--table", help="print the markdown table of a saved --json file and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.world, args.dtype)), flush=True)
        return
    if args.table:
        print(table(json.load(open(args.table))))
        return
    archs = [a for x in (args.arch or [",".join(ARCHS)]) for a in x.split(",") if a]
    rows = []
    for arch in archs:
        for world, dtype in RUNS:
            t = time.perf_counter()
            row = _child(arch, world, dtype, args.timeout)
            rows.append(row)
            status = "not built" if not row.get("built") else "ok" if row.get("equal") else \
                f"FAILED ({row.get('stage')})"
            print(f"{arch} world={world} {dtype}: {status} [{time.perf_counter() - t:.0f} s]", file=sys.stderr,
                  flush=True)
            if args.json:           # written as it goes, so that an interrupted sweep keeps its rows
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
