"""Linear-algebra operators: matmul, baddbmm, addmm and addmm_gelu."""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from ..kernels import gemm
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
    lower=lambda t, a: [gemm(t[0], t[1]) if t[1].dim() == 2 else t[0] @ t[1]],
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


def _addmm_infer(shapes, dtypes, attrs):
    b, x, w = shapes
    if len(w) != 2:
        raise ShapeError(f"addmm: the weight must have rank 2, got rank {len(w)}")
    (out, dt), = _matmul_infer((x, w), dtypes[1:], {})
    if tuple(b) != (w[1],):
        raise ShapeError(f"addmm: the bias must have shape ({w[1]},), got {b}")
    return [(out, dt)]


def addmm_value(dom, b, xx, w):
    """x @ w + b in a semantic domain (also evaluated in a batch: a leading axis on every input)."""
    if w.ndim == 3:     # evaluated in a batch (a leading axis on every input): line w and b up
        w = w.reshape(w.shape[0], *([1] * (xx.ndim - 3)), *w.shape[1:])
        b = b.reshape(b.shape[0], *([1] * (xx.ndim - 2)), b.shape[-1])
    return dom.mod(dom.mod(np.matmul(xx, w)) + b)


def _addmm_flops(ins, outs, a):
    return 2 * numel_int(outs[0]) * int(ins[1][-1]) + numel_int(outs[0])


addmm = register(OpDef(
    name="addmm", arity=3, algebraic=True,
    doc="x @ w + b, one GEMM that adds its bias (torch.addmm: GPT-2's Conv1D); x may carry "
        "batch axes, w is 2-D, b of shape (n,).  Run by graphopt.kernels.gemm.",
    infer=_addmm_infer,
    compute=lambda dom, x, a: [addmm_value(dom, *x)],
    lower=lambda t, a: [gemm(t[1], t[2], t[0])],
    flops=_addmm_flops,
    fx=(FxForm((torch.addmm, "method:addmm", aten.addmm.default), sp.addmm),),
))


def _addmm_gelu_compute(dom, x, a):
    from .elementwise import gelu_tanh      # (imported here: the registry's order is linalg's first)
    return gelu_tanh.compute(dom, [addmm_value(dom, *x)], {})


addmm_gelu = register(OpDef(
    name="addmm_gelu", arity=3, algebraic=False,
    doc="GELU (tanh approximation) of x @ w + b: the GEMM applies it as it writes its output "
        "(oneDNN's epilogue on the CPU, when graphopt.kernels.gemm measures it faster).",
    infer=_addmm_infer,
    compute=_addmm_gelu_compute,
    lower=lambda t, a: [gemm(t[1], t[2], t[0], gelu=True)],
    flops=lambda ins, outs, a: _addmm_flops(ins, outs, a) + 8 * numel_int(outs[0]),
))
