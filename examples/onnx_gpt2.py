"""Export a small Hugging Face GPT-2 (random weights, nothing downloaded) to ONNX at
opset 23, optimize the file with graphopt, and compare the two in onnxruntime.
Needs the optional extras: pip install -e ".[hf,onnx]".

    python examples/onnx_gpt2.py [--seq-len 64] [--out /tmp/gpt2.graphopt.onnx]
"""
import argparse
import os
import tempfile

import numpy as np
import onnx
import torch

import graphopt
from graphopt.models import Logits
from graphopt.optimize_onnx import random_inputs, session


def main():
    from transformers import GPT2Config, GPT2LMHeadModel
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "gpt2.graphopt.onnx"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Logits(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1000,
                                              attn_implementation="eager")).eval())
    src = os.path.join(tempfile.gettempdir(), "gpt2.onnx")
    torch.onnx.export(model, (torch.randint(0, 1000, (1, args.seq_len)),), src, dynamo=True, opset_version=23)
    optimized = graphopt.optimize_onnx(src)
    onnx.save(optimized, args.out)
    report = graphopt.onnx_report(optimized)
    print("attention:", report["attention"])
    print("rules applied:", report["rules_applied"])
    feeds = random_inputs(onnx.load(src))
    a, b = session(onnx.load(src)).run(None, feeds)[0], session(optimized).run(None, feeds)[0]
    print(f"wrote {args.out}; max |optimized - original| in onnxruntime: {np.abs(a - b).max():.3g}")


if __name__ == "__main__":
    main()
