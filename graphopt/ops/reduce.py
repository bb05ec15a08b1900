"""Reductions."""
from __future__ import annotations

import numpy as np
import torch

from ..dims import Dim
from . import onnx_spellings as ox
from . import spellings as sp
from .base import AttrSpec, FxForm, OnnxForm, OpDef, norm_axis, numel_int, register


def _reduction(name):
    return lambda shapes, dtypes, attrs: _reduce_infer(shapes, dtypes, attrs, name)


def _reduce_infer(shapes, dtypes, attrs, name="reduce_sum"):
    (s,) = shapes
    ax = norm_axis(name, attrs["axis"], len(s))
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


def _amax_compute(dom, x, a):
    """The largest entry; in the fingerprint domain (residues have no order) the largest
    residue, which is deterministic (no generated rule holds this op)."""
    return [np.max(x[0], axis=a["axis"], keepdims=a["keepdim"])]


amax = register(OpDef(
    name="amax", arity=1, algebraic=False,
    doc="The largest entry along one axis (``amax``, ``max(dim).values``): what a model "
        "subtracts from the scores before a softmax (gpt-oss), which the softmax itself does.",
    attrs={"axis": AttrSpec("int"), "keepdim": AttrSpec("bool", True)},
    infer=_reduction("amax"),
    compute=_amax_compute,
    lower=lambda t, a: [t[0].amax(dim=a["axis"], keepdim=a["keepdim"])],
    flops=lambda ins, outs, a: numel_int(ins[0]),
    fx=(FxForm((torch.amax, "method:amax", torch.ops.aten.amax.default), sp.reduce_sum),
        FxForm((torch.max, "method:max", torch.ops.aten.max.dim), sp.max_values)),
    to_onnx=ox.emit_reduce_max,
))


def _logsumexp_compute(dom, x, a):
    if dom.name == "float":
        m = np.max(x[0], axis=a["axis"], keepdims=True)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out = np.log(np.sum(np.exp(x[0] - m), axis=a["axis"], keepdims=True)) + m
        return [out if a["keepdim"] else np.squeeze(out, axis=a["axis"])]
    # fingerprint: the exp surrogate summed (no generated rule holds this op)
    return [dom.mod(np.sum(dom.exp(x[0]), axis=a["axis"], keepdims=a["keepdim"]))]


logsumexp = register(OpDef(
    name="logsumexp", arity=1, algebraic=False,
    doc="log(sum(exp(x))) along one axis, computed stably: the log of a softmax's denominator "
        "(Granite's attention sinks rescale the output by it).",
    attrs={"axis": AttrSpec("int"), "keepdim": AttrSpec("bool", False)},
    infer=_reduction("logsumexp"),
    compute=_logsumexp_compute,
    lower=lambda t, a: [torch.logsumexp(t[0], dim=a["axis"], keepdim=a["keepdim"])],
    flops=lambda ins, outs, a: 4 * numel_int(ins[0]),
    fx=(FxForm((torch.logsumexp, "method:logsumexp", torch.ops.aten.logsumexp.default), sp.reduce_sum),),
))
