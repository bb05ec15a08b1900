"""Linear-algebra operators: matmul."""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import FxForm, OnnxForm, OpDef, numel_int, register

aten = torch.ops.aten


def _matmul_infer(shapes, dtypes, attrs):
    a, b = shapes
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"matmul: inputs must have rank >= 2, got ranks {len(a)} and {len(b)}")
    # batch axes: equal, or one side has none / fewer (it is broadcast, as x @ W in a model)
    ba, bb = a[:-2], b[:-2]
    short, long_ = (ba, bb) if len(ba) <= len(bb) else (bb, ba)
    if short and short != long_[len(long_) - len(short):]:
        raise ShapeError(f"matmul: batch dimensions differ: {ba} vs {bb}")
    if a[-1] != b[-2]:
        raise ShapeError(f"matmul: inner dimensions differ: {a[-1]} vs {b[-2]}")
    return [(long_ + (a[-2], b[-1]), dtypes[0])]


matmul = register(OpDef(
    name="matmul", arity=2, algebraic=True,
    doc="Matrix product over the last two axes (equal batch axes).",
    infer=_matmul_infer,
    compute=lambda dom, x, a: [dom.mod(np.matmul(x[0], x[1]))],
    lower=lambda t, a: [t[0] @ t[1]],
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[0][-1]),
    enum_attrs=lambda shapes: [{}],
    fx=(FxForm((torch.matmul, operator.matmul, "method:matmul", aten.matmul.default, aten.mm.default,
                torch.bmm, "method:bmm", aten.bmm.default), sp.binary_tensors),),
    onnx=(OnnxForm("MatMul", ox.matmul),),
    to_onnx=ox.node("MatMul"),
))


def _baddbmm_infer(shapes, dtypes, attrs):
    m, x, y, s = shapes
    if len(s) != 0:
        raise ShapeError("baddbmm: alpha must be a scalar")
    (out, dt), = _matmul_infer((x, y), dtypes[1:3], {})
    if len(m) > len(out) or any(dm != do and not (dm.is_const and dm.const == 1)
                                for dm, do in zip(reversed(m), reversed(out))):
        raise ShapeError(f"baddbmm: the added tensor's shape {m} does not broadcast to {out}")
    return [(out, dt)]


def _baddbmm_lower(t, a):
    m, x, y, s = t
    alpha = float(s) if isinstance(s, (int, float)) else s.item()
    return [torch.baddbmm(m, x, y, alpha=alpha)]


baddbmm = register(OpDef(
    name="baddbmm", arity=4, algebraic=True, scalar_operand=3,
    doc="M + alpha * (X @ Y) (torch.baddbmm with beta=1: BLOOM adds its ALiBi bias to the scores "
        "this way); expanded to matmul, smul and badd, so the attention rules see the scores.",
    infer=_baddbmm_infer,
    compute=lambda dom, x, a: [dom.mod(x[0] + dom.mod(dom.mod(np.matmul(x[1], x[2])) * x[3]))],
    lower=_baddbmm_lower,
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[1][-1]),
    fx=(FxForm((torch.baddbmm, "method:baddbmm", aten.baddbmm.default), sp.baddbmm),),
    expand=lambda shapes, attrs: [("matmul", [1, 2], {}), ("smul", [("step", 0), 3], {}),
                                  ("badd", [("step", 1), 0], {})],
))
