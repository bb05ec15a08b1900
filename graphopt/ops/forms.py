"""Ops that stand for other ops: the canonical forms both frontends share.

A frontend only *spells* operators; it never rewrites the graph.  What used to be
canonicalisation code in each frontend is here, once:

* ``alias``: a value that is its input's: dropout at inference, ``contiguous``/``clone``,
  a cast to the dtype the tensor already has, ONNX ``Identity``.  The ``canonical``
  ruleset's ``alias(X) == X`` removes it, so the attention rules see softmax feed ``@ V``.
* ``linear``: ``F.linear(x, w)`` without bias, defined (``expand``) as
  ``matmul(x, transpose(w))``, so the rules see the matmul and merge projections.
* ``linear_bias``: ``F.linear(x, w, b)``, defined as ``addmm(b, x, transpose(w))``, so the
  GEMM's epilogue rules see its output.
* ``permute``: a permutation of more than two axes, defined as a chain of two-axis
  transposes (front to back, so ``(0, 2, 3, 1)`` of (B, T, H, D) ends with the swap of the
  last two: the ``transpose(K)`` the attention rules look for).

The pipeline's first stage substitutes every op that has an ``expand``
(:func:`graphopt.pipeline.expand_composites`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..dims import Dim
from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import AttrSpec, FxForm, OnnxForm, OpDef, numel_int, register
from .linalg import addmm_value

aten = torch.ops.aten

alias = register(OpDef(
    name="alias", arity=1, algebraic=True, view=True,
    doc="The input's value (dropout at inference, contiguous, clone, a cast to the same dtype).",
    infer=lambda shapes, dtypes, attrs: [(shapes[0], dtypes[0])],
    compute=lambda dom, x, a: [x[0]],
    lower=lambda t, a: [t[0]],
    flops=lambda ins, outs, a: 0,
    fx=(FxForm((F.dropout, torch.dropout, aten.dropout.default), sp.dropout_at_inference),
        FxForm(("method:contiguous", "method:clone", "method:float", "method:type", "method:to", "method:type_as",
                aten.clone.default, aten.alias.default, aten.contiguous.default, aten.to.dtype, aten.type_as.default,
                aten.to.dtype_layout, aten._to_copy.default), sp.same_value)),
    onnx=(OnnxForm("Identity", ox.unary), OnnxForm("Dropout", ox.dropout_at_inference),
          OnnxForm("Cast", ox.unary_any_attrs)),
    to_onnx=ox.node("Identity"),
))


def _linear_infer(shapes, dtypes, attrs):
    x, w = shapes
    if len(w) != 2 or len(x) < 2:
        raise ShapeError(f"linear: weight must have rank 2 and x rank >= 2, got ranks {len(x)} and {len(w)}")
    if x[-1] != w[1]:
        raise ShapeError(f"linear: in-features differ: {x[-1]} vs {w[1]}")
    return [(x[:-1] + (w[0],), dtypes[0])]


linear = register(OpDef(
    name="linear", arity=2, algebraic=True,
    doc="F.linear without bias, x @ w^T; expanded to matmul(x, transpose(w)).",
    infer=_linear_infer,
    compute=lambda dom, x, a: [dom.mod(np.matmul(x[0], np.swapaxes(x[1], -1, -2)))],
    lower=lambda t, a: [F.linear(t[0], t[1])],
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[0][-1]),
    fx=(FxForm((F.linear, aten.linear.default), sp.linear_without_bias),),
    expand=lambda shapes, attrs: [("transpose", [1], {"dim0": -2, "dim1": -1}),
                                  ("matmul", [0, ("step", 0)], {})],
))


def _linear_bias_infer(shapes, dtypes, attrs):
    x, w, b = shapes
    (out, dt), = _linear_infer((x, w), dtypes[:2], attrs)
    if tuple(b) != (w[0],):
        raise ShapeError(f"linear: the bias must have shape ({w[0]},), got {b}")
    return [(out, dt)]


def _linear_bias_compute(dom, x, a):
    return [addmm_value(dom, x[2], x[0], np.swapaxes(x[1], -1, -2))]


linear_bias = register(OpDef(
    name="linear_bias", arity=3, algebraic=True,
    doc="F.linear with a bias, x @ w^T + b; expanded to addmm(b, x, transpose(w)).",
    infer=_linear_bias_infer,
    compute=_linear_bias_compute,
    lower=lambda t, a: [F.linear(t[0], t[1], t[2])],
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[0][-1]) + numel_int(outs[0]),
    fx=(FxForm((F.linear, aten.linear.default), sp.linear_with_bias),),
    expand=lambda shapes, attrs: [("transpose", [1], {"dim0": -2, "dim1": -1}),
                                  ("addmm", [2, 0, ("step", 0)], {})],
))


def _perm(attrs) -> list:
    out = []
    for p in attrs["perm"]:
        if isinstance(p, Dim):
            if not p.is_const:
                raise ShapeError(f"permute: axis {p} is not a number")
            p = p.const
        out.append(int(p))
    return out


def _permute_infer(shapes, dtypes, attrs):
    (s,) = shapes
    perm = _perm(attrs)
    if sorted(perm) != list(range(len(s))):
        raise ShapeError(f"permute: {perm} is not a permutation of the {len(s)} axes")
    return [(tuple(s[p] for p in perm), dtypes[0])]


def _swaps(shapes, attrs):
    """The permutation as two-axis swaps, front to back (negative axes, as rules use)."""
    perm = _perm(attrs)
    rank = len(perm)
    cur, steps = list(range(rank)), []
    for i in range(rank):
        j = cur.index(perm[i])
        if j != i:
            cur[i], cur[j] = cur[j], cur[i]
            src = 0 if not steps else ("step", len(steps) - 1)
            steps.append(("transpose", [src], {"dim0": i - rank, "dim1": j - rank}))
    return steps or None


permute = register(OpDef(
    name="permute", arity=1, algebraic=True, view=True,
    doc="A permutation of the axes; expanded to two-axis transposes.",
    attrs={"perm": AttrSpec("dims")},
    infer=_permute_infer,
    compute=lambda dom, x, a: [np.transpose(x[0], _perm(a))],
    lower=lambda t, a: [t[0].permute(*_perm(a))],
    flops=lambda ins, outs, a: 0,
    fx=(FxForm((torch.permute, "method:permute", aten.permute.default), sp.permute_many),),
    onnx=(OnnxForm("Transpose", ox.permute_many),),
    to_onnx=ox.emit_permute,
    expand=_swaps,
))
