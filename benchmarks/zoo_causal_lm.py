"""Every causal-LM architecture of the installed ``transformers`` (its auto mapping), built
small from its own default config (random weights, eager attention; nothing downloaded),
through ``graphopt.optimize`` by Dynamo and by ``torch.export``: built or why not, equal
outputs, attention blocks fused of total, why the rest were not, optimize seconds.  Each
architecture runs in its own process (some default configs are large; a crash or a hang
in one cannot take the sweep down).

    python benchmarks/zoo_causal_lm.py [ARCH ...] [--jobs 1] [--timeout 600] [--out zoo.jsonl]
    python benchmarks/zoo_causal_lm.py --table zoo.jsonl        # the BENCHMARKS.md table

One JSON line per architecture.  A model counts as attention-based when graphopt finds a
softmax in its graph.  Kernels are counted from the outside (torch.profiler, after a
warm-up call): softmax kernels and SDPA kernels of one forward of the optimised model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

T = 37          # a prompt length that is not a multiple of 8
VOCAB = 128
SMALL = {       # config key -> small value, applied where the default config has the key
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2, "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "d_ff": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256, "rotary_dim": 8,
    "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "attention_chunk_size": 256, "mamba_n_heads": 4,
    "mamba_d_head": 32, "mamba_d_state": 16, "ssm_state_size": 16, "n_group": 1, "topk_group": 1,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
             "cls_token_id", "mask_token_id", "unk_token_id")


def _shrink(cfg) -> None:
    """Small sizes in place, for the keys this config has (and in its text sub-config)."""
    d = cfg.to_dict()
    for key, value in SMALL.items():
        if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
            setattr(cfg, key, value)
    for key in TOKEN_IDS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v >= VOCAB:
            setattr(cfg, key, 0)
    if "qk_rope_head_dim" in d:     # multi-head latent attention: head sizes that add up
        cfg.qk_head_dim = SMALL["qk_nope_head_dim"] + SMALL["qk_rope_head_dim"]
        cfg.head_dim = SMALL["qk_rope_head_dim"]
        cfg.num_key_value_heads = SMALL["num_attention_heads"]   # keys come per head from the latent
    layers = getattr(cfg, "num_hidden_layers", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and isinstance(layers, int) and any("attention" in str(t) for t in types):
        # a hybrid (linear attention or state-space layers with full attention every few):
        # enough layers to hold the first full-attention one, at most 8
        full = [k for k, t in enumerate(types) if "full" in str(t) or t == "attention"]
        layers = min(max(2, full[0] + 1 if full else 2), 8)
        cfg.num_hidden_layers = layers
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):
        v = getattr(cfg, key, None)
        if isinstance(v, list) and isinstance(layers, int) and len(v) > layers:
            setattr(cfg, key, v[:layers])
    sub = getattr(cfg, "text_config", None)
    if sub is not None and sub is not cfg and hasattr(sub, "to_dict"):
        _shrink(sub)


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


LENGTHS = (T, 53, 90)   # --dynamic: one symbolic graph called at these prompt lengths


def one(arch: str, dtype_name: str, export: bool, dynamic: bool = False) -> dict:
    """Build, optimise and check one architecture (in this process)."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    import graphopt
    from graphopt.models import Logits
    transformers.logging.set_verbosity_error()
    row = {"arch": arch, "dtype": dtype_name}
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    try:
        cfg = transformers.AutoConfig.for_model(arch)
        _shrink(cfg)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        model = Logits(model.eval().to(dtype))
        ids = torch.randint(1, VOCAB, (1, T))
        with torch.no_grad():
            ref = model(ids)
    except Exception as e:  # noqa: BLE001  a config that cannot be built small is a result
        row["built"] = False
        row["why"] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        return row
    row["built"] = True
    row["params"] = sum(p.numel() for p in model.parameters())
    fresh = torch.randint(1, VOCAB, (1, T))
    with torch.no_grad():
        ref_fresh = model(fresh)
    tol = 1e-3 if dtype_name == "float32" else 5e-2
    for capture in ("dynamo",) + (("export",) if export else ()) + (("dynamic",) if dynamic else ()):
        res = {}
        try:
            t = time.perf_counter()
            fast = graphopt.optimize(model, (ids,), capture="export" if capture == "export" else "dynamo",
                                     dynamic=capture == "dynamic")
            res["s"] = round(time.perf_counter() - t, 1)
            rep = fast.report
            res["attention"] = rep.attention
            res["not_fused"] = rep.attention_reasons
            res["fallbacks"] = [f[:200] for f in rep.fallbacks]
            with torch.no_grad():
                scale = max(1.0, float(ref.float().abs().max()))
                res["diff"] = max(_max_diff(fast(ids), ref), _max_diff(fast(fresh), ref_fresh)) / scale
                last = ids
                if capture == "dynamic":      # other prompt lengths: the same symbolic graph
                    for n in LENGTHS[1:]:
                        last = torch.randint(1, VOCAB, (1, n))
                        res["diff"] = max(res["diff"], _max_diff(fast(last), model(last)) / scale)
                    res["graphs"] = len(fast.report.graphs)
                    res["sizes"] = fast.report.to_json()["symbolic_sizes"]
                res["equal"] = res["diff"] <= tol
                fast(last)                    # warm-up, then count what runs
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fast(last)
            ev = {e.key: e.count for e in prof.key_averages()}
            res["kernels"] = {"softmax": ev.get("aten::_softmax", 0) + ev.get("aten::_safe_softmax", 0),
                              "sdpa": sum(v for k, v in ev.items() if k.startswith("aten::_scaled_dot_product"))}
        except graphopt.GraphoptError as e:
            res["error"] = f"GraphoptError: {' '.join(str(e).split())[:200]}"
        except Exception as e:  # noqa: BLE001  a crash: the sweep reports it
            res["crash"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        row[capture] = res
    return row


def _child(arch, dtype, export, timeout, dynamic=False) -> dict:
    cmd = [sys.executable, __file__, "--one", arch, "--dtype", dtype] + (["--export"] if export else []) \
        + (["--dynamic"] if dynamic else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "dtype": dtype, "built": None, "why": f"timed out after {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " ".join((p.stderr or "").strip().splitlines()[-1:])[:200]
    return {"arch": arch, "dtype": dtype, "built": None, "why": f"process died (rc {p.returncode}): {tail}"}


def architectures() -> list:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def summary(rows: list, capture: str = "dynamo") -> dict:
    built = [r for r in rows if r.get("built")]
    att = [r for r in built if (r.get(capture) or {}).get("attention", {}).get("blocks")]
    full = [r for r in att if r[capture]["attention"]["fused"] == r[capture]["attention"]["blocks"]
            and not r[capture].get("fallbacks")]
    return {"capture": capture, "architectures": len(rows), "built": len(built), "attention_based": len(att),
            "fully_fused": len(full), "share": round(len(full) / max(1, len(att)), 3),
            "wrong": [r["arch"] for r in built if (r.get(capture) or {}).get("equal") is False],
            "crashes": [r["arch"] for r in built if "crash" in (r.get(capture) or {})]}


def table(rows: list) -> str:
    out = ["| architecture | built | equal | fused (Dynamo) | fused (export) | not fused because | optimize s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("built"):
            out.append(f"| {r['arch']} | no: {r.get('why', '')[:80]} | | | | | |")
            continue
        d, e = r.get("dynamo", {}), r.get("export", {})

        def fused(x):
            if "attention" not in x:
                return (x.get("crash") or x.get("error") or "-")[:60]
            a = x["attention"]
            return f"{a['fused']}/{a['blocks']}" + (" (kept original)" if x.get("fallbacks") else "")
        why = "; ".join(f"{n}x {w}" for w, n in {**e.get("not_fused", {}), **d.get("not_fused", {})}.items())
        out.append(f"| {r['arch']} | yes | {'yes' if d.get('equal') else 'NO' if 'equal' in d else '-'} | "
                   f"{fused(d)} | {fused(e) if e else '-'} | {why[:160]} | {d.get('s', '-')} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archs", nargs="*")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--export", action="store_true", help="also capture with torch.export")
    ap.add_argument("--dynamic", action="store_true",
                    help="also optimize with symbolic sizes (dynamic=True) and call at prompt lengths 37, 53, 90")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--table", help="print the markdown table of a JSON-lines file and exit")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.dtype, args.export, args.dynamic)), flush=True)
        return
    if args.table:
        rows = [json.loads(x) for x in open(args.table) if x.startswith("{\"arch\"")]
        print(table(rows))
        print(json.dumps(summary(rows)))
        if any("export" in r for r in rows):
            print(json.dumps(summary(rows, "export")))
        return
    archs = args.archs or architectures()
    rows = []
    out = open(args.out, "a") if args.out else None
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda a: _child(a, args.dtype, args.export, args.timeout, args.dynamic), archs):
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    print(json.dumps(summary(rows)), flush=True)
    if args.dynamic:
        print(json.dumps(summary(rows, "dynamic")), flush=True)


if __name__ == "__main__":
    main()
