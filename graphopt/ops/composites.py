"""fx calls that are several registry ops.

``F.linear(x, w)`` is ``x @ w.T``: importing it as ``matmul(x, transpose(w))``
lets the rules see the matmul (and merge projections that share ``x``).  Each
entry maps a call target to a function ``(args, kwargs, ctx) -> steps | None``;
a step is ``(op, inputs, attrs)`` and an input is an fx argument or
``("step", k)``, the output of an earlier step.  The last step is the result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _linear(args, kwargs, ctx):
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if bias is not None or not (ctx.is_tensor(x) and ctx.is_tensor(w)) or ctx.rank(w) != 2:
        return None
    return [("transpose", [w], {"dim0": -2, "dim1": -1}), ("matmul", [x, ("step", 0)], {})]


COMPOSITES = {
    F.linear: _linear,
    torch.ops.aten.linear.default: _linear,
}
