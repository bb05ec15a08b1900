"""Linear-algebra operators: matmul and transpose."""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import AttrSpec, FxForm, OnnxForm, OpDef, norm_axis, numel_int, register

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
                aten.bmm.default), sp.binary_tensors),),
    onnx=(OnnxForm("MatMul", ox.matmul),),
    to_onnx=ox.node("MatMul"),
))


def _transpose_infer(shapes, dtypes, attrs):
    (s,) = shapes
    d0 = norm_axis("transpose", attrs["dim0"], len(s))
    d1 = norm_axis("transpose", attrs["dim1"], len(s))
    if d0 == d1:
        raise ShapeError("transpose: dim0 and dim1 are the same axis")
    out = list(s)
    out[d0], out[d1] = out[d1], out[d0]
    return [(tuple(out), dtypes[0])]


transpose = register(OpDef(
    name="transpose", arity=1, algebraic=True, view=True,
    doc="Swap two axes (by default the last two).",
    attrs={"dim0": AttrSpec("int", -2), "dim1": AttrSpec("int", -1)},
    infer=_transpose_infer,
    compute=lambda dom, x, a: [np.swapaxes(x[0], a["dim0"], a["dim1"])],
    lower=lambda t, a: [t[0].transpose(a["dim0"], a["dim1"])],
    flops=lambda ins, outs, a: 0,
    enum_attrs=lambda shapes: [{"dim0": -2, "dim1": -1}] if len(shapes[0]) >= 2 else [],
    fx=(FxForm((torch.transpose, "method:transpose", aten.transpose.int, torch.t, "method:t", aten.t.default),
               sp.transpose),
        FxForm((torch.permute, "method:permute", aten.permute.default), sp.permute_as_transpose)),
    onnx=(OnnxForm("Transpose", ox.transpose),),
    to_onnx=ox.emit_transpose,
))
