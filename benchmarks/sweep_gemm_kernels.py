"""Measured GEMM schedules (graphopt.kernels) on models nobody here wrote: Hugging Face
architectures built from their configs at a width where the GEMMs are measured (d=768, 2
layers, random weights, nothing downloaded), fp32 and bf16, a prompt length that is not a
multiple of 8, three calls each on fresh ids, against eager.

    python benchmarks/sweep_gemm_kernels.py [ARCH ...] [--dtype float32 bfloat16] [--seq-len 301]

Per architecture and dtype: equal outputs on calls 1-3 (max relative difference), the GEMM
schedules chosen (graphopt.kernels.chosen()), GELU epilogues fused (rule applications), and
the kernels one call ran, counted from the outside (torch.profiler, after the warm-up):
oneDNN linear calls, mm/addmm calls, SDPA and softmax kernels.
"""
from __future__ import annotations

import argparse
import time

import torch

import graphopt
from graphopt import kernels
from graphopt.models import Logits

ARCHS = ("gpt2", "openai-gpt", "llama", "qwen2", "mistral", "opt", "gpt_neox", "phi", "falcon",
         "bloom", "gpt_bigcode", "codegen", "gptj", "gemma", "stablelm")
SIZES = {"hidden_size": 768, "n_embd": 768, "intermediate_size": 3072, "n_inner": 3072, "ffn_dim": 3072,
         "num_hidden_layers": 2, "n_layer": 2, "num_attention_heads": 12, "n_head": 12,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8000, "max_position_embeddings": 1024,
         "n_positions": 1024, "rotary_dim": 32, "n_ctx": 1024}
PROFILED = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax")


def build(arch: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(arch)
    for k, v in SIZES.items():
        if hasattr(cfg, k):
            try:
                setattr(cfg, k, v)
            except AttributeError:      # a derived property (Falcon's head_dim)
                pass
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Logits(AutoModelForCausalLM.from_config(cfg).eval()).to(dtype)


def one(arch: str, dtype, T: int) -> str:
    kernels._CHOICE.clear()
    torch._dynamo.reset()
    try:
        model = build(arch, dtype)
    except Exception as e:  # noqa: BLE001
        return f"{arch:12s} not built: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    vocab = 8000
    ids = torch.randint(0, vocab, (1, T))
    t = time.perf_counter()
    fast = graphopt.optimize(model, (ids,))
    opt_s = time.perf_counter() - t
    rhs = {k: r.split("->")[-1] for k, r in fast.report.rewrites.items()}
    epilogues = sum(n for k, n in fast.report.applied.items() if "addmm_gelu(" in rhs.get(k, ""))
    worst = 0.0
    with torch.no_grad():
        for call in range(3):
            x = torch.randint(0, vocab, (1, T))
            want, got = model(x).float(), fast(x).float()
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fast(ids)
    counts = {e.key: e.count for e in prof.key_averages() if e.key in PROFILED}
    chosen = ", ".join(f"{kernels.describe(k)}: {v[0]}" for k, v in kernels.chosen().items())
    short = {k.split("::")[-1].replace("_scaled_dot_product_flash_attention_for_cpu", "sdpa"): v
             for k, v in counts.items()}
    return (f"{arch:12s} {str(dtype)[6:]:8s} rel diff {worst:.2g}  attention {fast.report.attention['fused']}/"
            f"{fast.report.attention['blocks']}  GELU epilogues {epilogues}  optimize {opt_s:.1f} s\n"
            f"    kernels of one call: {short}\n    schedules: {chosen or '(none measured)'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("archs", nargs="*", default=list(ARCHS))
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--seq-len", type=int, default=301)
    args = ap.parse_args()
    for arch in args.archs:
        for dt in args.dtype:
            print(one(arch, getattr(torch, dt), args.seq_len), flush=True)


if __name__ == "__main__":
    main()
