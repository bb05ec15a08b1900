"""Sweep of Hugging Face architectures built from their configs (2 layers, d=64, random
weights; nothing downloaded), in fp32 and bf16, through ``graphopt.optimize``: one JSON line
per (architecture, dtype) with the fused attention blocks, rewritten sites, fallbacks, the
max |diff| against eager on the example and on fresh ids, and the softmax / SDPA kernels
that ran (torch.profiler, after a warm-up call).

    python benchmarks/sweep_hf_zoo.py [ARCH ...]        # default: all below

To compare two versions of graphopt, run it once with each on PYTHONPATH.
"""
import json
import sys
import time
import warnings

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import graphopt
from graphopt.models import Logits

warnings.filterwarnings("ignore")

KW = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
          intermediate_size=96, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)
ARCHS = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256),
    "llama": dict(KW, num_key_value_heads=2), "qwen2": dict(KW, num_key_value_heads=2),
    "mistral": dict(KW, num_key_value_heads=2), "phi3": dict(KW, num_key_value_heads=2),
    "gemma": dict(KW, num_key_value_heads=1, head_dim=16), "gpt_neox": dict(KW),
    "opt": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, ffn_dim=96,
                max_position_embeddings=256, word_embed_proj_dim=64),
    "stablelm": dict(KW, num_key_value_heads=2), "olmo": dict(KW, num_key_value_heads=2),
    "granite": dict(KW, num_key_value_heads=2), "qwen3": dict(KW, num_key_value_heads=2, head_dim=16),
    "falcon": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128),
    "gptj": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256, rotary_dim=8),
    "bloom": dict(n_layer=2, hidden_size=64, n_head=4, vocab_size=128),
}


def count(fn, ids) -> dict:
    """Softmax kernels and fused SDPA kernels in one call, after a warm-up call."""
    with torch.no_grad():
        fn(ids)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(ids)
    ev = {e.key: e.count for e in prof.key_averages()}
    return {"softmax": ev.get("aten::_softmax", 0),
            "sdpa": sum(v for k, v in ev.items() if k.startswith("aten::_scaled_dot_product"))}


def main(archs) -> None:
    for arch in archs:
        for dtype in ("float32", "bfloat16"):
            row = {"arch": arch, "dtype": dtype}
            try:
                torch.manual_seed(0)
                cfg = transformers.AutoConfig.for_model(arch, **ARCHS[arch])
                cfg._attn_implementation = "eager"
                m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
                model = Logits(m.eval().to(getattr(torch, dtype)))
                ids = torch.randint(0, 128, (1, 37))
                t = time.time()
                fast = graphopt.optimize(model, (ids,))
                row["s"] = round(time.time() - t, 1)
                rep = fast.report
                row["attention"] = rep.attention
                row["applied"] = sum(rep.applied.values())
                row["rules"] = len(rep.applied)
                row["fallbacks"] = rep.fallbacks
                with torch.no_grad():
                    row["diff"] = float((model(ids).float() - fast(ids).float()).abs().max())
                    ids2 = torch.randint(0, 128, (1, 37))
                    row["diff2"] = float((model(ids2).float() - fast(ids2).float()).abs().max())
                row["profile"] = count(fast, ids)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ARCHS))
