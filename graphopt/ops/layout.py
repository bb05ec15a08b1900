"""Layout operators: transpose, concat, split and reshape."""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..dims import Dim, same_size
from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import AttrSpec, FxForm, OnnxForm, OpDef, norm_axis, register

aten = torch.ops.aten


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


def _concat_infer(shapes, dtypes, attrs):
    a, b = shapes
    if len(a) != len(b):
        raise ShapeError(f"concat: ranks differ: {len(a)} vs {len(b)}")
    ax = norm_axis("concat", attrs["axis"], len(a))
    for i, (x, y) in enumerate(zip(a, b)):
        if i != ax and x != y:
            raise ShapeError(f"concat: dimension {i} differs: {x} vs {y}")
    out = list(a)
    out[ax] = a[ax] + b[ax]
    return [(tuple(out), dtypes[0])]


concat = register(OpDef(
    name="concat", arity=2, algebraic=True,
    doc="Concatenate two tensors along an axis.",
    attrs={"axis": AttrSpec("int")},
    infer=_concat_infer,
    compute=lambda dom, x, a: [np.concatenate([x[0], x[1]], axis=a["axis"])],
    lower=lambda t, a: [torch.cat([t[0], t[1]], dim=a["axis"])],
    flops=lambda ins, outs, a: 0,
    # negative axes: a rule then also holds with leading batch axes
    enum_attrs=lambda shapes: [{"axis": ax} for ax in (-2, -1) if -ax <= len(shapes[0])],
    fx=(FxForm((torch.cat, torch.concat, aten.cat.default), sp.concat),),
    onnx=(OnnxForm("Concat", ox.concat),),
    to_onnx=ox.emit_concat,
))


def _split_infer(shapes, dtypes, attrs):
    (s,) = shapes
    ax = norm_axis("split", attrs["axis"], len(s))
    left = attrs["left"]
    right = Dim.of(s[ax]).minus(left)
    if right is None or left == 0:
        raise ShapeError(f"split: cannot split dimension {s[ax]} at {left}")
    first, second = list(s), list(s)
    first[ax], second[ax] = left, right
    return [(tuple(first), dtypes[0]), (tuple(second), dtypes[0])]


def _split_points(shapes):
    """Where the enumerator splits a tensor: TASO splits where a concat joined two
    tensors.  A symbolic dimension such as ``b+c`` or ``2c`` remembers that it is a
    sum, so every proper part of it (``b``, ``c``) is a split point."""
    out = []
    for ax in (-2, -1):
        if -ax > len(shapes[0]):
            continue
        d = shapes[0][ax]
        for left in _proper_parts(d):
            out.append({"axis": ax, "left": left})
    return out


def _proper_parts(d: Dim) -> list:
    parts = [()]
    for sym, coeff in d.terms:
        parts = [p + ((sym, k),) for p in parts for k in range(coeff + 1)]
    whole = tuple(d.terms)
    return [Dim(p) for p in parts if any(k for _, k in p) and p != whole]


split = register(OpDef(
    name="split", arity=1, algebraic=True, view=True,
    doc="Split a tensor in two along an axis; the first part has size `left`.",
    attrs={"axis": AttrSpec("int"), "left": AttrSpec("dim")},
    infer=_split_infer,
    compute=lambda dom, x, a: np.split(x[0], [a["left"]], axis=a["axis"]),
    # narrow, not torch.split: no iteration, so fx can trace it (a saved GraphModule is re-traced)
    lower=lambda t, a: [t[0].narrow(a["axis"], 0, a["left"]),
                        t[0].narrow(a["axis"], a["left"], t[0].shape[a["axis"]] - a["left"])],
    flops=lambda ins, outs, a: 0,
    enum_attrs=_split_points,
    fx=(FxForm((torch.split, "method:split", aten.split_with_sizes.default, aten.split.Tensor), sp.split),
        FxForm((operator.getitem, aten.slice.Tensor), sp.slice_as_split)),
    onnx=(OnnxForm("Split", ox.split),),
    to_onnx=ox.emit_split,
))


def _expand_infer(shapes, dtypes, attrs):
    (s,) = shapes
    target = attrs["shape"]
    if len(s) > len(target) or any(d != t and not (d.is_const and d.const == 1)
                                   for d, t in zip(reversed(s), reversed(target))):
        raise ShapeError(f"expand: {s} does not broadcast to {target}")
    return [(target, dtypes[0])]


expand = register(OpDef(
    name="expand", arity=1, algebraic=True, view=True, any_dtype=True,
    doc="Broadcast to a larger shape without copying (``expand``, ``expand_as``, "
        "``broadcast_to``): a mask made as large as the scores it masks.",
    attrs={"shape": AttrSpec("dims")},
    infer=_expand_infer,
    compute=lambda dom, x, a: [np.broadcast_to(x[0], tuple(int(d) for d in a["shape"]))],
    lower=lambda t, a: [t[0].expand(*[int(d) if isinstance(d, (int, Dim)) else d for d in a["shape"]])],
    flops=lambda ins, outs, a: 0,
    fx=(FxForm(("method:expand", "method:expand_as", torch.broadcast_to, "method:broadcast_to",
                aten.expand.default, aten.expand_as.default), sp.to_own_shape),),
))


def _reshape_infer(shapes, dtypes, attrs):
    (s,) = shapes
    target = attrs["shape"]
    if s == target:
        return [(target, dtypes[0])]
    if not all(d.is_const for d in s) or not all(d.is_const for d in target):
        if same_size(s, target):   # (b*h, t, n) <-> (b, h, t, n): the same product for every size
            return [(target, dtypes[0])]
        raise ShapeError(f"reshape: {s} cannot be reshaped to {target} for every size")
    n_in = _product(d.const for d in s)
    n_out = _product(d.const for d in target)
    if n_in != n_out:
        raise ShapeError(f"reshape: cannot reshape {n_in} elements into {n_out}")
    return [(target, dtypes[0])]


def _product(values) -> int:
    n = 1
    for v in values:
        n *= v
    return n


reshape = register(OpDef(
    name="reshape", arity=1, any_dtype=True, algebraic=True, view=True,
    doc="Reshape to a shape with the same number of elements (row-major order).",
    attrs={"shape": AttrSpec("dims")},
    infer=_reshape_infer,
    compute=lambda dom, x, a: [np.reshape(x[0], tuple(a["shape"]))],
    lower=lambda t, a: [t[0].reshape(tuple(a["shape"]))],
    flops=lambda ins, outs, a: 0,
    enum_attrs=None,  # shape-changing reshapes need concrete sizes; not enumerated
    fx=(FxForm((torch.reshape, "method:reshape", "method:view", aten.view.default, aten.reshape.default,
                aten._unsafe_view.default, torch.unsqueeze, "method:unsqueeze", aten.unsqueeze.default),
               sp.to_own_shape),),
    onnx=(OnnxForm("Reshape", ox.reshape),),
    to_onnx=ox.emit_reshape,
))
