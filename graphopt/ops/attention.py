"""Attention: softmax, the reciprocal of a scalar, and fused scaled dot-product attention.

None of these is enumerated by the generator; hand-written rules
(``substitutions/handwritten.json``) relate the unfused attention subgraph to
``sdpa``, and pass the same float verifier as every other rule.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ShapeError
from . import spellings as sp
from .base import AttrSpec, FxForm, OpDef, norm_axis, numel_int, register

aten = torch.ops.aten


def _softmax_infer(shapes, dtypes, attrs):
    norm_axis("softmax", attrs["axis"], len(shapes[0]))
    return [(shapes[0], dtypes[0])]


softmax = register(OpDef(
    name="softmax", arity=1, algebraic=False,
    doc="softmax over one axis (default the last).  Fingerprint: exp surrogate, normalised.",
    attrs={"axis": AttrSpec("int", -1)},
    infer=_softmax_infer,
    compute=lambda dom, x, a: [dom.softmax(x[0], a["axis"])],
    lower=lambda t, a: [torch.softmax(t[0], a["axis"])],
    flops=lambda ins, outs, a: 5 * numel_int(outs[0]),
    fx=(FxForm((torch.softmax, F.softmax, "method:softmax", aten.softmax.int, aten._softmax.default),
               sp.softmax),),
))


def _recip_infer(shapes, dtypes, attrs):
    if len(shapes[0]) != 0:
        raise ShapeError(f"recip: input must be a scalar (shape ()), got rank {len(shapes[0])}")
    return [(shapes[0], dtypes[0])]


recip = register(OpDef(
    name="recip", arity=1, algebraic=True,
    doc="1/s of a scalar (a 0-d tensor); turns a division by a scale into a multiplication.",
    infer=_recip_infer,
    compute=lambda dom, x, a: [dom.mod(dom.recip(x[0]))],
    lower=lambda t, a: [torch.reciprocal(t[0])],
    flops=lambda ins, outs, a: 1,
))


def _sdpa_infer(shapes, dtypes, attrs):
    q, k, v, s = shapes
    if len(s) != 0:
        raise ShapeError("sdpa: the scale must be a scalar (shape ())")
    if len(q) < 2 or len(k) != len(q) or len(v) != len(q):
        raise ShapeError(f"sdpa: q, k, v need the same rank >= 2, got {len(q)}, {len(k)}, {len(v)}")
    if q[-1] != k[-1] or k[-2] != v[-2]:
        raise ShapeError(f"sdpa: head sizes do not fit: q {q}, k {k}, v {v}")
    if k[:-2] != v[:-2]:
        raise ShapeError(f"sdpa: k and v batch axes differ: {k[:-2]} vs {v[:-2]}")
    if attrs["enable_gqa"]:
        if len(q) < 3 or q[:-3] != k[:-3]:
            raise ShapeError("sdpa: grouped-query attention needs q, k, v of shape (..., heads, seq, dim)")
        hq, hk = q[-3], k[-3]
        if not (hq.is_const and hk.is_const) or hq.const % hk.const:
            raise ShapeError(f"sdpa: {hq} query heads are not a multiple of {hk} key/value heads")
    elif q[:-2] != k[:-2]:
        raise ShapeError(f"sdpa: q and k batch axes differ: {q[:-2]} vs {k[:-2]}")
    return [(q[:-1] + (v[-1],), dtypes[0])]


def _sdpa_compute(dom, x, a):
    q, k, v, s = x
    if a["enable_gqa"] and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    scores = dom.mod(np.matmul(q, np.swapaxes(k, -1, -2)) * s)
    keep = None
    if a["is_causal"]:
        t, n = scores.shape[-2], scores.shape[-1]
        keep = np.tril(np.ones((t, n), dtype=np.int64))
    return [dom.mod(np.matmul(dom.softmax(scores, -1, keep), v))]


def _sdpa_lower(t, a):
    q, k, v, s = t
    return [F.scaled_dot_product_attention(q, k, v, scale=float(s), is_causal=a["is_causal"],
                                           enable_gqa=a["enable_gqa"])]


sdpa = register(OpDef(
    name="sdpa", arity=4, algebraic=False, scalar_operand=3,
    doc="softmax(q @ k^T * s [causal]) @ v, fused (torch's scaled_dot_product_attention).",
    attrs={"is_causal": AttrSpec("bool", False), "enable_gqa": AttrSpec("bool", False)},
    infer=_sdpa_infer,
    compute=_sdpa_compute,
    lower=_sdpa_lower,
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[1][-2]) * 2,
))
