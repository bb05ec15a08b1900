"""Reductions."""
from __future__ import annotations

import numpy as np
import torch

from ..dims import Dim
from . import onnx_spellings as ox
from . import spellings as sp
from .base import AttrSpec, FxForm, OnnxForm, OpDef, norm_axis, numel_int, register


def _reduce_infer(shapes, dtypes, attrs):
    (s,) = shapes
    ax = norm_axis("reduce_sum", attrs["axis"], len(s))
    out = list(s)
    if attrs["keepdim"]:
        out[ax] = Dim.of(1)
    else:
        del out[ax]
    return [(tuple(out), dtypes[0])]


reduce_sum = register(OpDef(
    name="reduce_sum", arity=1, algebraic=True,
    doc="Sum over one axis (keepdim by default, as LLM graphs use it).",
    attrs={"axis": AttrSpec("int"), "keepdim": AttrSpec("bool", True)},
    infer=_reduce_infer,
    compute=lambda dom, x, a: [dom.mod(np.sum(x[0], axis=a["axis"], keepdims=a["keepdim"]))],
    lower=lambda t, a: [t[0].sum(dim=a["axis"], keepdim=a["keepdim"])],
    flops=lambda ins, outs, a: numel_int(ins[0]),
    enum_attrs=lambda shapes: [
        {"axis": ax, "keepdim": True} for ax in range(-len(shapes[0]), 0) if shapes[0][ax] != 1
    ],
    fx=(FxForm((torch.sum, "method:sum", torch.ops.aten.sum.dim_IntList), sp.reduce_sum),),
    onnx=(OnnxForm("ReduceSum", ox.reduce_sum),),
    to_onnx=ox.emit_reduce_sum,
))
