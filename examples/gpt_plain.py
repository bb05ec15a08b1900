"""Optimize a plain-PyTorch GPT (GPT-2 architecture, random weights) two ways.

    python examples/gpt_plain.py [--layers 2] [--seq-len 128]
"""
import argparse

import torch

import graphopt
from graphopt.models import example

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--seq-len", type=int, default=128)
args = ap.parse_args()

model, (ids,) = example("gpt2", seq_len=args.seq_len, layers=args.layers)

# 1. the API: a module with the same call signature, and a report
fast = graphopt.optimize(model, (ids,))
print(fast.report)
with torch.no_grad():
    print("max |diff| vs eager:", (fast(ids) - model(ids)).abs().max().item())

# 2. as a torch.compile backend, optionally handing the result on to inductor
compiled = torch.compile(model, backend="graphopt", options={"inductor": True})
with torch.no_grad():
    print("max |diff| vs eager (graphopt + inductor):", (compiled(ids) - model(ids)).abs().max().item())
