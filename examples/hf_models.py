"""Optimize Hugging Face GPT-2 and Llama built from configs (random weights; nothing is
downloaded), through both capture paths.  Needs the optional extra: pip install -e ".[hf]".

    python examples/hf_models.py [--seq-len 64]
"""
import argparse

import torch

import graphopt
from graphopt.models import Logits

try:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
except ImportError:
    raise SystemExit("this example needs transformers: pip install -e '.[hf]'")



def build(name: str):
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1000, attn_implementation="eager")
        return Logits(GPT2LMHeadModel(cfg).eval())
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, attn_implementation="eager")
    return Logits(LlamaForCausalLM(cfg).eval())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    ids = torch.randint(0, 1000, (1, args.seq_len))
    for name in ("gpt2", "llama"):
        model = build(name)
        with torch.no_grad():
            ref = model(ids)
        for capture in ("dynamo", "export"):
            fast = graphopt.optimize(model, (ids,), capture=capture)
            print(f"== {name}, captured with {capture}")
            print(fast.report)
            with torch.no_grad():
                print("max |diff| vs eager:", (fast(ids) - ref).abs().max().item())
        compiled = torch.compile(model, backend="graphopt")
        with torch.no_grad():
            print(f"{name}, torch.compile(backend='graphopt'): max |diff|", (compiled(ids) - ref).abs().max().item())


if __name__ == "__main__":
    main()
