"""fx calls that are several registry ops, or none.

``F.linear(x, w)`` is ``x @ w.T``: importing it as ``matmul(x, transpose(w))``
lets the rules see the matmul (and merge projections that share ``x``).  Each
entry maps a call target (``"method:name"`` for methods) to a function
``(args, kwargs, ctx) -> steps | None``; a step is ``(op, inputs, attrs)`` and an
input is an fx argument or ``("step", k)``, the output of an earlier step.  The
last step is the result.

Some calls compute nothing at inference: dropout with ``training=False``, a cast
to the dtype a tensor already has, ``contiguous``/``clone``.  Their function
returns ``(ALIAS, x)``: the call's value is ``x``'s (the importer also checks
that the shape and dtype are unchanged).  Removing them at import is the
canonicalisation that lets the attention rules see softmax feeding ``@ V``.

Grouped-query attention repeats each key/value head for the query heads that
share it, as ``x[:, :, None].expand(b, g, r, n, d).reshape(b, g*r, n, d)``;
that chain is the registry's ``repeat_heads``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F


def _linear(args, kwargs, ctx):
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if bias is not None or not (ctx.is_tensor(x) and ctx.is_tensor(w)) or ctx.rank(w) != 2:
        return None
    return [("transpose", [w], {"dim0": -2, "dim1": -1}), ("matmul", [x, ("step", 0)], {})]


ALIAS = "alias"
aten = torch.ops.aten


def _dropout(args, kwargs, ctx):
    """``F.dropout(x, p, training, inplace)`` / ``aten.dropout(x, p, train)``: x when not training."""
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
    inplace = args[3] if len(args) > 3 else kwargs.get("inplace", False)
    if not ctx.is_tensor(x) or inplace is not False or not (training is False or p == 0):
        return None
    return (ALIAS, x)


def _first_tensor_alias(args, kwargs, ctx):
    """A copy or cast whose result has the input's shape and dtype (checked by the importer)."""
    if args and ctx.is_tensor(args[0]) and kwargs.get("memory_format") in (None, torch.preserve_format,
                                                                           torch.contiguous_format):
        return (ALIAS, args[0])
    return None


def _cast_back(args, kwargs, ctx):
    """A cast; when it casts ``softmax(x, dtype=float32)`` back to x's own dtype (the fp32
    upcast of attention weights in fp16/bf16 models), the pair is one softmax over x."""
    if not args or not isinstance(args[0], torch.fx.Node):
        return None
    src = args[0]
    if not _is_call(src, ("softmax",), (torch.softmax, F.softmax, aten._softmax.default, aten.softmax.int)):
        return _first_tensor_alias(args, kwargs, ctx)
    x = src.args[0] if src.args else src.kwargs.get("input")
    dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim")
    upcast = src.kwargs.get("dtype", src.args[2] if len(src.args) > 2 else None)
    if not ctx.is_tensor(x) or not isinstance(dim, int) or upcast not in (torch.float32, True):
        return _first_tensor_alias(args, kwargs, ctx)
    own = getattr(torch, ctx.dtype(x))
    if own not in (torch.float16, torch.bfloat16) or ctx.meta(src).dtype != torch.float32:
        return _first_tensor_alias(args, kwargs, ctx)
    return [("softmax", [x], {"axis": dim % ctx.rank(x) - ctx.rank(x)})]


def _permute(args, kwargs, ctx):
    """A permute of several axes is a chain of two-axis transposes (front to back, so
    ``(0, 2, 3, 1)`` of (B, T, H, D) ends with the swap of the last two: K^T)."""
    from .spellings import permutation
    perm = permutation(args, kwargs, ctx)
    if perm is None:
        return None
    rank = len(perm)
    cur, steps = list(range(rank)), []
    for i in range(rank):
        j = cur.index(perm[i])
        if j != i:
            cur[i], cur[j] = cur[j], cur[i]
            src = args[0] if not steps else ("step", len(steps) - 1)
            steps.append(("transpose", [src], {"dim0": i - rank, "dim1": j - rank}))
    return steps if len(steps) > 1 else None  # one swap: the transpose spelling takes it


def _repeat_heads(args, kwargs, ctx):
    """``x[..., None, :, :]`` (or ``unsqueeze(-3)``), ``expand`` the new axis, ``reshape``
    it into the head axis: each of the g heads repeated r times -> ``repeat_heads``."""
    if not args or len(ctx.out_shapes) != 1:
        return None
    expand = args[0]
    if not _is_call(expand, ("expand",), (aten.expand.default,)):
        return None
    unsq = expand.args[0]
    x = _unsqueezed(unsq)
    if x is None or not ctx.is_tensor(x):
        return None
    xs, es, out = ctx.shape(x), tuple(ctx.meta(expand).shape), tuple(ctx.out_shapes[0])
    r = len(xs)
    if r < 3 or len(es) != r + 1 or es[:r - 2] != xs[:r - 2] or es[r - 1:] != xs[r - 2:]:
        return None
    if out != xs[:r - 3] + (xs[r - 3] * es[r - 2],) + xs[r - 2:]:
        return None
    return [("repeat_heads", [x], {"heads": out[r - 3]})]


def _is_call(node, methods, functions) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_method" and node.target in methods)
        or (node.op == "call_function" and node.target in functions))


def _unsqueezed(node):
    """x when ``node`` inserts one axis before x's last two, else None."""
    if _is_call(node, ("unsqueeze",), (torch.unsqueeze, aten.unsqueeze.default)):
        x, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        rank = node.meta.get("val", node.meta.get("example_value")).dim()
        return x if isinstance(dim, int) and dim % rank == rank - 3 else None
    if _is_call(node, (), (operator.getitem,)):
        x, index = node.args
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        nones = [i for i, e in enumerate(index) if e is None]
        if len(nones) != 1 or any(e is not None and e is not Ellipsis and e != full for e in index):
            return None
        rank = node.meta.get("val", node.meta.get("example_value")).dim()
        k = nones[0]  # the new axis, counted from the front, or from the back after an Ellipsis
        axis = rank - (len(index) - k) if Ellipsis in index[:k] else k
        return x if axis == rank - 3 else None
    return None


COMPOSITES = {
    F.linear: _linear,
    aten.linear.default: _linear,
    F.dropout: _dropout,
    torch.dropout: _dropout,
    aten.dropout.default: _dropout,
    "method:contiguous": _first_tensor_alias,
    "method:clone": _first_tensor_alias,
    "method:type": _cast_back,
    "method:to": _cast_back,
    "method:permute": _permute,
    torch.permute: _permute,
    aten.permute.default: _permute,
    "method:float": _first_tensor_alias,
    aten.clone.default: _first_tensor_alias,
    aten.alias.default: _first_tensor_alias,
    aten.contiguous.default: _first_tensor_alias,
    aten.to.dtype: _cast_back,
    aten.to.dtype_layout: _cast_back,
    aten._to_copy.default: _cast_back,
    "method:reshape": _repeat_heads,
    "method:view": _repeat_heads,
    aten.reshape.default: _repeat_heads,
    aten.view.default: _repeat_heads,
    aten._unsafe_view.default: _repeat_heads,
}
