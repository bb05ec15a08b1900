"""Attention: softmax, the reciprocal of a scalar, fused scaled dot-product attention
(without and with an additive mask), and the repetition of key/value heads of
grouped-query attention.

None of these is enumerated by the generator; hand-written rules
(``substitutions/attention.rules``, compiled to ``substitutions/handwritten.json``)
relate the unfused attention subgraph to ``sdpa``/``sdpa_masked`` and pass the
same float verifier as every other rule.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F

from ..dims import Dim
from ..errors import ShapeError
from . import onnx_spellings as ox
from . import spellings as sp
from .base import PRIME, AttrSpec, FxForm, OnnxForm, OpDef, norm_axis, numel_int, register

aten = torch.ops.aten


def _softmax_infer(shapes, dtypes, attrs):
    norm_axis("softmax", attrs["axis"], len(shapes[0]))
    return [(shapes[0], dtypes[0])]


softmax = register(OpDef(
    name="softmax", arity=1, algebraic=False,
    doc="softmax over one axis (default the last).  Fingerprint: exp surrogate, normalised.  "
        "``safe``: a row whose entries are all -inf gives zeros, not NaN (aten._safe_softmax, "
        "what SDPA's own decomposition computes).",
    attrs={"axis": AttrSpec("int", -1), "safe": AttrSpec("bool", False)},
    infer=_softmax_infer,
    compute=lambda dom, x, a: [dom.softmax(x[0], a["axis"])],
    lower=lambda t, a: [aten._safe_softmax(t[0], a["axis"]) if a["safe"] else torch.softmax(t[0], a["axis"])],
    flops=lambda ins, outs, a: 5 * numel_int(outs[0]),
    fx=(FxForm((torch.softmax, F.softmax, "method:softmax", aten.softmax.int, aten._softmax.default),
               sp.softmax),
        # the fp32 upcast of half-precision attention weights, cast back: one softmax
        FxForm(("method:to", "method:type", aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default),
               sp.softmax_cast_back, priority=1),
        FxForm((aten._safe_softmax, aten._safe_softmax.default), sp.safe_softmax)),
    onnx=(OnnxForm("Softmax", ox.softmax),),
    to_onnx=ox.emit_softmax,
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
    onnx=(OnnxForm("Reciprocal", ox.recip),),
    to_onnx=ox.node("Reciprocal"),
))


def _unit_scale_infer(shapes, dtypes, attrs):
    return [((), dtypes[0])]


unit_scale = register(OpDef(
    name="unit_scale", arity=1, algebraic=False, type_only=True,
    doc="The scale 1 in the dtype of its input (attention written without a scale: T5, "
        "GPT-Neo); a constant, folded when constants are folded.",
    infer=_unit_scale_infer,
    compute=lambda dom, x, a: [np.ones((), dtype=np.asarray(x[0]).dtype)],
    lower=lambda t, a: [torch.ones((), dtype=t[0].dtype)],
    flops=lambda ins, outs, a: 0,
    to_onnx=None,
))


def _fill(dtype: str, neg_inf: bool) -> float:
    return float("-inf") if neg_inf else torch.finfo(getattr(torch, dtype)).min


def _mask_bias_infer(shapes, dtypes, attrs):
    return [(shapes[0], attrs["dtype"])]


def _mask_bias_compute(dom, x, a):
    """0 / the fill; in the fingerprint domain the fill is the residue -1 (these ops appear in
    no rule, so their fingerprint only needs to be deterministic)."""
    keep = np.asarray(x[0]).astype(bool) == a["keep"]
    if dom.name == "fingerprint":
        return [np.where(keep, 0, PRIME - 1).astype(np.int64)]
    return [np.where(keep, 0.0, -np.inf if a["neg_inf"] else -1e30)]


def _mask_bias_lower(t, a):
    drop = ~t[0] if a["keep"] else t[0]
    zeros = torch.zeros_like(t[0], dtype=getattr(torch, a["dtype"]))
    return [zeros.masked_fill(drop, _fill(a["dtype"], a["neg_inf"]))]


mask_bias = register(OpDef(
    name="mask_bias", arity=1, algebraic=False,
    doc="A boolean mask as an additive one: 0 where an entry takes part, the masking fill "
        "(-inf, or the dtype's lowest value) where it does not.  ``keep``: True marks the "
        "entries that take part (``where(keep, x, fill)``), False the ones masked out "
        "(``masked_fill(drop, fill)``).",
    attrs={"dtype": AttrSpec("dtype"), "neg_inf": AttrSpec("bool", True), "keep": AttrSpec("bool", True)},
    bool_operands=(0,),
    infer=_mask_bias_infer,
    compute=_mask_bias_compute,
    lower=_mask_bias_lower,
    flops=lambda ins, outs, a: numel_int(outs[0]),
))


def _fill_masked_infer(shapes, dtypes, attrs):
    x, m = shapes
    if dtypes[0] != attrs["dtype"]:
        raise ShapeError(f"fill_masked: scores of dtype {dtypes[0]}, fill of dtype {attrs['dtype']}")
    if len(m) > len(x) or any(dm != dx and not (dm.is_const and dm.const == 1) for dm, dx in zip(reversed(m), reversed(x))):
        raise ShapeError(f"fill_masked: the mask's shape {m} does not broadcast to {x}")
    return [(x, dtypes[0])]


def _fill_masked_lower(t, a):
    x, m = t
    fill = _fill(a["dtype"], a["neg_inf"])
    return [torch.where(m, x, fill) if a["keep"] else x.masked_fill(m, fill)]


fill_masked = register(OpDef(
    name="fill_masked", arity=2, algebraic=False,
    doc="Scores with the entries a boolean mask excludes set to a masking fill (``where(keep, "
        "x, fill)``, ``x.masked_fill(drop, fill)`` with a mask computed at run time); expanded "
        "to ``badd(x, mask_bias(mask))``, which the softmax after it cannot tell apart.",
    attrs={"dtype": AttrSpec("dtype"), "neg_inf": AttrSpec("bool", True), "keep": AttrSpec("bool", True)},
    bool_operands=(1,),
    infer=_fill_masked_infer,
    compute=lambda dom, x, a: [dom.mod(x[0] + _mask_bias_compute(dom, x[1:], a)[0])],
    lower=_fill_masked_lower,
    flops=lambda ins, outs, a: numel_int(outs[0]),
    fx=(FxForm((torch.where, "method:where", aten.where.self, aten.where.ScalarOther), sp.where_runtime_mask),
        FxForm(("method:masked_fill", torch.masked_fill, aten.masked_fill.Scalar,
                aten.masked_fill.Tensor), sp.masked_fill_runtime_mask)),
    expand=lambda shapes, attrs: [("mask_bias", [1], dict(attrs)), ("badd", [0, ("step", 0)], {})],
))


def _sdpa_infer(shapes, dtypes, attrs):
    q, k, v, s = shapes
    if len(s) != 0:
        raise ShapeError("sdpa: the scale must be a scalar (shape ())")
    _check_qkv(q, k, v, attrs["enable_gqa"])
    return [(q[:-1] + (v[-1],), dtypes[0])]


def _check_qkv(q, k, v, gqa: bool):
    if len(q) < 2 or len(k) != len(q) or len(v) != len(q):
        raise ShapeError(f"sdpa: q, k, v need the same rank >= 2, got {len(q)}, {len(k)}, {len(v)}")
    if q[-1] != k[-1] or k[-2] != v[-2]:
        raise ShapeError(f"sdpa: head sizes do not fit: q {q}, k {k}, v {v}")
    if k[:-2] != v[:-2]:
        raise ShapeError(f"sdpa: k and v batch axes differ: {k[:-2]} vs {v[:-2]}")
    if gqa:
        if len(q) < 3 or q[:-3] != k[:-3]:
            raise ShapeError("sdpa: grouped-query attention needs q, k, v of shape (..., heads, seq, dim)")
        _check_groups("sdpa", q[-3], k[-3])
    elif q[:-2] != k[:-2]:
        raise ShapeError(f"sdpa: q and k batch axes differ: {q[:-2]} vs {k[:-2]}")


def _check_groups(name, heads, groups):
    """``heads`` query heads share ``groups`` key/value heads: a multiple (checked when known)."""
    if heads.is_const and groups.is_const and (heads.const % groups.const or heads.const < groups.const):
        raise ShapeError(f"{name}: {heads} query heads are not a multiple of {groups} key/value heads")


def _sdpa_flops(ins, outs, a):
    full = 2 * numel_int(outs[0]) * int(ins[1][-2]) * 2
    return full // 2 if a.get("is_causal") else full


def _sdpa_compute(dom, x, a, mask=None, sink=None):
    """softmax(q k^T s [+ mask] [causal]) v; with ``sink`` (..., t, 1), one more logit per row
    joins the softmax and its column is dropped after it."""
    q, k, v, s = x
    if a.get("enable_gqa") and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    scores = dom.mod(np.matmul(q, np.swapaxes(k, -1, -2)) * s)
    if mask is not None:
        scores = dom.mod(scores + mask)
    t, n = scores.shape[-2], scores.shape[-1]
    keep = np.tril(np.ones((t, n), dtype=np.int64)) if a.get("is_causal") else None
    if sink is not None:
        scores = np.concatenate([scores, np.broadcast_to(sink, scores.shape[:-1] + (1,))], axis=-1)
        keep = None if keep is None else np.concatenate([keep, np.ones((t, 1), dtype=np.int64)], axis=-1)
    return [dom.mod(np.matmul(dom.softmax(scores, -1, keep)[..., :n], v))]


def _scale(s):
    """SDPA's ``scale`` must be a python number: a constant one is written into the graph as
    it is, a scale computed at run time is read from its 0-d tensor (``.item()``)."""
    return float(s) if isinstance(s, (int, float)) else s.item()


def _batched(fn):
    """SDPA's fused CPU and GPU kernels take (batch, heads, seq, dim): a 3-D (batch*heads, seq,
    dim) call (the bmm form) gets a leading axis and loses it after, else torch runs its
    unfused math fallback, which materialises the scores again."""
    def lower(t, a):
        if t[0].dim() != 3:
            return fn(t, a)
        q, k, v, *rest = t
        if len(rest) == 2 and rest[0].dim() == 3:    # sdpa_masked's mask
            rest[0] = rest[0].unsqueeze(0)
        out = fn([q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), *rest], a)
        return [out[0].squeeze(0)]
    return lower


def _sdpa_lower(t, a):
    q, k, v, s = t
    return [F.scaled_dot_product_attention(q, k, v, scale=_scale(s), is_causal=a["is_causal"],
                                           enable_gqa=a["enable_gqa"])]


sdpa = register(OpDef(
    name="sdpa", arity=4, algebraic=False, scalar_operand=3,
    doc="softmax(q @ k^T * s [causal]) @ v, fused (torch's scaled_dot_product_attention).",
    attrs={"is_causal": AttrSpec("bool", False), "enable_gqa": AttrSpec("bool", False)},
    infer=_sdpa_infer,
    compute=_sdpa_compute,
    lower=_batched(_sdpa_lower),
    flops=_sdpa_flops,
    onnx=(),
    to_onnx=ox.emit_attention(False),
))


def _sdpa_masked_infer(shapes, dtypes, attrs):
    q, k, v, m, s = shapes
    if len(s) != 0:
        raise ShapeError("sdpa_masked: the scale must be a scalar (shape ())")
    _check_qkv(q, k, v, attrs["enable_gqa"])
    scores = q[:-1] + (k[-2],)
    if len(m) > len(scores) or any(dm != ds and not (dm.is_const and dm.const == 1)
                                   for dm, ds in zip(reversed(m), reversed(scores))):
        raise ShapeError(f"sdpa_masked: the mask's shape {m} does not broadcast to the scores' {scores}")
    return [(q[:-1] + (v[-1],), dtypes[0])]


def _sdpa_masked_lower(t, a):
    q, k, v, m, s = t
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=_scale(s), enable_gqa=a["enable_gqa"])
    if m.is_floating_point() and not a["safe"]:
        # a query whose keys are all masked with -inf: eager softmax gives NaN for its row, torch's
        # SDPA gives 0; keep eager's answer (found by the differential fuzzer, tests/test_fuzz.py)
        dead = torch.isneginf(m).all(-1, keepdim=True)
        out = out.masked_fill(dead, float("nan"))
    return [out]


sdpa_masked = register(OpDef(
    name="sdpa_masked", arity=5, algebraic=False, scalar_operand=4,
    doc="softmax(q @ k^T * s + mask) @ v, fused; the additive mask broadcasts to the scores.  "
        "A query whose keys are all masked with -inf gets NaN as in eager softmax, or zeros "
        "with ``safe`` (a safe softmax).",
    attrs={"enable_gqa": AttrSpec("bool", False), "safe": AttrSpec("bool", False)},
    infer=_sdpa_masked_infer,
    compute=lambda dom, x, a: _sdpa_compute(dom, (x[0], x[1], x[2], x[4]), a, mask=x[3]),
    lower=_batched(_sdpa_masked_lower),
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[1][-2]) * 2 + numel_int(ins[0][:-1]) * int(ins[1][-2]),
    onnx=(),
    to_onnx=ox.emit_attention(True),
))


def _sink_shape_check(name, z, q):
    """The sinks: one extra logit per query row, (..., t, 1), broadcasting to q's rows."""
    rows = q[:-1] + (Dim.of(1),)
    if len(z) > len(rows) or any(dz != dr and not (dz.is_const and dz.const == 1)
                                 for dz, dr in zip(reversed(z), reversed(rows))):
        raise ShapeError(f"{name}: the sinks' shape {z} does not broadcast to the query rows {rows}")


def _sdpa_sink_infer(shapes, dtypes, attrs):
    q, k, v, z, s = shapes
    out = _sdpa_infer((q, k, v, s), dtypes, {"enable_gqa": False})
    _sink_shape_check("sdpa_sink", z, q)
    return out


def _sdpa_sink_masked_infer(shapes, dtypes, attrs):
    q, k, v, m, z, s = shapes
    out = _sdpa_masked_infer((q, k, v, m, s), dtypes, {"enable_gqa": False})
    _sink_shape_check("sdpa_sink_masked", z, q)
    return out


def sink_attention(q, k, v, z, scale, mask=None, is_causal=False):
    """Attention with a sink z (one extra logit per query row, its column dropped after the
    softmax), fused.  The kernel is chosen by device when it runs, so the emitted graph holds
    this function as one call (``handle_torch_function`` records it when traced).

    On the CPU, torch's flash kernel gives each row's log-sum-exp L with the output O; the
    sink only adds e^z to the softmax's denominator: O * e^L / (e^L + e^z) = O * sigmoid(L - z),
    exact (a row whose keys are all masked gets O = 0, as in eager).  Elsewhere: one extra key
    whose score is z and whose value is 0, through public SDPA."""
    args = (q, k, v, z, scale, mask, is_causal)
    if torch.overrides.has_torch_function(args):
        return torch.overrides.handle_torch_function(sink_attention, args, *args)
    if q.device.type == "cpu" and q.dim() == 4 and q.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and q.shape[-1] == v.shape[-1]:     # (the CPU flash kernel: one head size for q, k and v)
        if mask is not None and mask.dtype != q.dtype:
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf")) \
                if mask.dtype == torch.bool else mask.to(q.dtype)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        zz = z.squeeze(-1) if z.dim() > 0 else z        # (..., t, 1) -> (..., t), against L's rows
        return out * torch.sigmoid(lse - zz.float()).unsqueeze(-1).to(out.dtype)
    t, n, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q2 = torch.cat([q, (z.to(q.dtype) / scale).expand(*q.shape[:-1], 1)], -1)
    k2 = torch.cat([k, k.new_zeros(*k.shape[:-1], 1)], -1)
    extra = k.new_zeros(*k.shape[:-2], 1, d + 1)
    extra[..., -1] = 1
    k2 = torch.cat([k2, extra], -2)
    v2 = torch.cat([v, v.new_zeros(*v.shape[:-2], 1, v.shape[-1])], -2)
    if is_causal:
        mask = torch.ones(t, n, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        col = (torch.ones(*mask.shape[:-1], 1, dtype=torch.bool, device=mask.device)
               if mask.dtype == torch.bool else mask.new_zeros(*mask.shape[:-1], 1))
        mask = torch.cat([mask, col], -1)
    return F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, scale=scale)


sdpa_sink = register(OpDef(
    name="sdpa_sink", arity=5, algebraic=False, scalar_operand=4,
    doc="Attention with a sink: softmax over [q @ k^T * s [causal], z] with the last column "
        "(the sink, one logit per query row, z of shape (..., t, 1)) dropped, @ v (gpt-oss, "
        "DeepSeek-V4, MiMo).  Fused: SDPA's log-sum-exp rescales its output.",
    attrs={"is_causal": AttrSpec("bool", False)},
    infer=_sdpa_sink_infer,
    compute=lambda dom, x, a: _sdpa_compute(dom, (x[0], x[1], x[2], x[4]), a, sink=x[3]),
    lower=lambda t, a: [sink_attention(*t[:4], _scale(t[4]), is_causal=a["is_causal"])],
    flops=_sdpa_flops,
))

sdpa_sink_masked = register(OpDef(
    name="sdpa_sink_masked", arity=6, algebraic=False, scalar_operand=5,
    doc="Attention with a sink and an additive mask: softmax over [q @ k^T * s + mask, z], the "
        "sink column dropped, @ v.",
    infer=_sdpa_sink_masked_infer,
    compute=lambda dom, x, a: _sdpa_compute(dom, (x[0], x[1], x[2], x[5]), a, mask=x[3], sink=x[4]),
    lower=lambda t, a: [sink_attention(t[0], t[1], t[2], t[4], _scale(t[5]), mask=t[3])],
    flops=_sdpa_flops,
))


def _repeat_heads_infer(shapes, dtypes, attrs):
    (x,) = shapes
    if len(x) < 3:
        raise ShapeError(f"repeat_heads: input must be (..., heads, seq, dim), got rank {len(x)}")
    _check_groups("repeat_heads", attrs["heads"], x[-3])
    return [(x[:-3] + (attrs["heads"],) + x[-2:], dtypes[0])]


def _repeat_heads_compute(dom, x, a):
    (t,) = x
    return [np.repeat(t, int(a["heads"]) // t.shape[-3], axis=-3)]


def _repeat_heads_lower(x, heads: int):
    if x.shape[-3] == 1:   # one key/value head (multi-query attention): a broadcast, no copy
        return x.expand(*x.shape[:-3], heads, *x.shape[-2:])
    return torch.repeat_interleave(x, heads // x.shape[-3], dim=-3)


repeat_heads = register(OpDef(
    name="repeat_heads", arity=1, algebraic=True,
    doc="Each key/value head repeated for the query heads that share it (grouped-query "
        "attention's expand + reshape): (..., g, n, d) -> (..., heads, n, d).",
    attrs={"heads": AttrSpec("dim")},
    infer=_repeat_heads_infer,
    compute=_repeat_heads_compute,
    lower=lambda t, a: [_repeat_heads_lower(t[0], int(a["heads"]))],
    flops=lambda ins, outs, a: 0,
    fx=(FxForm(("method:reshape", "method:view", aten.reshape.default, aten.view.default,
                aten._unsafe_view.default), sp.repeat_heads, priority=1),),
    onnx=(OnnxForm("Reshape", ox.repeat_heads, priority=1),),
    to_onnx=ox.emit_repeat_heads,
))


def _matmul_heads_infer(shapes, dtypes, attrs):
    a, b = shapes
    if len(a) < 3 or len(a) != len(b) or a[:-3] != b[:-3] or a[-1] != b[-2]:
        raise ShapeError(f"matmul_heads: shapes do not fit: {a} @ {b}")
    if (a[-3], b[-3]).count(Dim.of(1)) != 1:
        raise ShapeError(f"matmul_heads: exactly one operand must have a single head, got {a[-3]} and {b[-3]}")
    heads = b[-3] if a[-3] == 1 else a[-3]
    return [(a[:-3] + (heads, a[-2], b[-1]), dtypes[0])]


def _matmul_heads_expand(shapes, attrs):
    a, b = shapes
    heads = b[-3] if a[-3] == 1 else a[-3]
    heads = heads.const if isinstance(heads, Dim) and heads.is_const else heads
    if a[-3] == 1:
        return [("repeat_heads", [0], {"heads": heads}), ("matmul", [("step", 0), 1], {})]
    return [("repeat_heads", [1], {"heads": heads}), ("matmul", [0, ("step", 0)], {})]


matmul_heads = register(OpDef(
    name="matmul_heads", arity=2, algebraic=True,
    doc="A matmul whose one operand has a single head that broadcasts over the other's heads "
        "(multi-query attention: Falcon's q @ k^T and p @ v); expanded to repeat_heads + matmul, "
        "which the grouped-query rules turn into SDPA's enable_gqa.",
    infer=_matmul_heads_infer,
    compute=lambda dom, x, a: [dom.mod(np.matmul(x[0], x[1]))],
    lower=lambda t, a: [t[0] @ t[1]],
    flops=lambda ins, outs, a: 2 * numel_int(outs[0]) * int(ins[0][-1]),
    fx=(FxForm((torch.matmul, operator.matmul, "method:matmul", aten.matmul.default), sp.binary_tensors),),
    expand=_matmul_heads_expand,
))
