"""Parsers shared by the operators' torch.fx spellings (``OpDef.fx``).

Each returns ``(tensor_args, attrs)`` or None.  They only look at the call's
arguments; whether the result is valid is decided by the op's shape inference.
"""
from __future__ import annotations

import numbers
import operator

import torch

aten = torch.ops.aten


def _no_kwargs(kwargs, allowed=()) -> bool:
    return all(k in allowed for k in kwargs)


def unary(args, kwargs, ctx):
    if len(args) == 1 and _no_kwargs(kwargs, ("inplace",)) and not kwargs.get("inplace", False):
        if ctx.is_tensor(args[0]):
            return [args[0]], {}
    return None


def binary_tensors(args, kwargs, ctx):
    """``f(a, b)`` where both are tensors (``alpha=1`` tolerated for add)."""
    if len(args) == 2 and _no_kwargs(kwargs, ("alpha",)) and kwargs.get("alpha", 1) == 1:
        if ctx.is_tensor(args[0]) and ctx.is_tensor(args[1]):
            return [args[0], args[1]], {}
    return None


def _is_scalar(a, ctx) -> bool:
    if isinstance(a, numbers.Number) and not isinstance(a, bool):
        return True
    return ctx.is_tensor(a) and ctx.rank(a) == 0


def tensor_by_scalar(commutative: bool):
    """``x * 2.0`` (and ``2.0 * x`` when the op commutes): tensor first, scalar second."""
    def parse(args, kwargs, ctx):
        if len(args) != 2 or not _no_kwargs(kwargs):
            return None
        a, b = args
        if ctx.is_tensor(a) and ctx.rank(a) > 0 and _is_scalar(b, ctx):
            return [a, b], {}
        if commutative and ctx.is_tensor(b) and ctx.rank(b) > 0 and _is_scalar(a, ctx):
            return [b, a], {}
        return None
    return parse


_FRESH_CALLS = {operator.matmul, torch.matmul, torch.bmm, operator.mul, operator.add, operator.truediv,
                torch.baddbmm, aten.matmul.default, aten.bmm.default, aten.mul.Tensor, aten.add.Tensor,
                aten.div.Tensor, aten.baddbmm.default}
_FRESH_METHODS = {"matmul", "bmm", "mul", "add", "div", "baddbmm"}


def tensor_and_scalar_tensor(args, kwargs, ctx):
    """``f(x, s)`` with s a 0-d tensor (``torch.max(x, torch.full((), v))``), either order."""
    if len(args) != 2 or kwargs or not all(ctx.is_tensor(a) for a in args):
        return None
    a, b = args
    if ctx.rank(a) > 0 and ctx.rank(b) == 0:
        return [a, b], {}
    if ctx.rank(b) > 0 and ctx.rank(a) == 0:
        return [b, a], {}
    return None


def in_place_by_scalar(commutative: bool):
    """``x /= 2.0`` (``operator.itruediv``), where x is a fresh result (a matmul's) that
    nothing else reads: the same value as ``x / 2.0``."""
    plain = tensor_by_scalar(commutative)

    def parse(args, kwargs, ctx):
        x = args[0] if args else None
        if not isinstance(x, torch.fx.Node) or len(x.users) != 1:
            return None
        return plain(args, kwargs, ctx) if fresh_result(x) else None
    return parse


def fresh_result(x) -> bool:
    """A new tensor computed by the call (a matmul's, a sum's), no view of another."""
    return isinstance(x, torch.fx.Node) and (
        (x.op == "call_function" and x.target in _FRESH_CALLS) or (x.op == "call_method" and x.target in _FRESH_METHODS))


def transpose(args, kwargs, ctx):
    """``x.transpose(d0, d1)`` / ``x.t()``; axes normalised to negative, smaller first."""
    if not args or not ctx.is_tensor(args[0]) or kwargs:
        return None
    rank = ctx.rank(args[0])
    if len(args) == 1:  # .t()
        if rank != 2:
            return None
        d0, d1 = 0, 1
    elif len(args) == 3 and all(isinstance(d, int) for d in args[1:]):
        d0, d1 = args[1], args[2]
    else:
        return None
    if not (-rank <= d0 < rank and -rank <= d1 < rank):
        return None
    d0, d1 = sorted((d0 % rank - rank, d1 % rank - rank))
    return [args[0]], {"dim0": d0, "dim1": d1}


def permutation(args, kwargs, ctx):
    """The axes of ``x.permute(...)`` / ``torch.permute(x, dims)``, non-negative, or None."""
    if not args or not ctx.is_tensor(args[0]) or kwargs:
        return None
    perm = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    rank = ctx.rank(args[0])
    if len(perm) != rank or not all(isinstance(p, int) for p in perm):
        return None
    return [p % rank for p in perm]


def permute_as_transpose(args, kwargs, ctx):
    """A permute that swaps exactly two axes is a transpose."""
    perm = permutation(args, kwargs, ctx)
    if perm is None:
        return None
    rank = len(perm)
    moved = [i for i, p in enumerate(perm) if p != i]
    if len(moved) != 2 or perm[moved[0]] != moved[1]:
        return None
    return [args[0]], {"dim0": moved[0] - rank, "dim1": moved[1] - rank}


def permute_many(args, kwargs, ctx):
    """A permute that moves more than two axes (``permute``; two axes: ``transpose``)."""
    perm = permutation(args, kwargs, ctx)
    if perm is None or sum(p != i for i, p in enumerate(perm)) <= 2:
        return None
    return [args[0]], {"perm": perm}


def linear_without_bias(args, kwargs, ctx):
    """``F.linear(x, w)`` / ``aten.linear(x, w)`` with no bias."""
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if bias is not None or not (ctx.is_tensor(x) and ctx.is_tensor(w)) or ctx.rank(w) != 2 or ctx.rank(x) < 2:
        return None
    return [x, w], {}


def addmm(args, kwargs, ctx):
    """``torch.addmm(b, x, w)`` / ``b.addmm(x, w)`` (beta and alpha 1) with x and w 2-D and a
    1-D bias b, GPT-2's Conv1D: ``(b, x, w)``."""
    call = _beta_alpha_call(args, kwargs, ctx, ("input", "mat1", "mat2"))
    if call is None or call[1:] != (1, 1):
        return None
    vals = call[0]
    if (ctx.rank(vals[0]), ctx.rank(vals[1]), ctx.rank(vals[2])) != (1, 2, 2):
        return None
    return vals, {}


def linear_with_bias(args, kwargs, ctx):
    """``F.linear(x, w, b)`` / ``aten.linear(x, w, b)`` with a 1-D bias: ``(x, w, b)``."""
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if bias is None or not all(ctx.is_tensor(v) for v in (x, w, bias)):
        return None
    if ctx.rank(w) != 2 or ctx.rank(x) < 2 or ctx.rank(bias) != 1:
        return None
    return [x, w, bias], {}


def dropout_at_inference(args, kwargs, ctx):
    """``F.dropout(x, p, training, inplace)`` / ``aten.dropout(x, p, train)``: x when not training."""
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
    inplace = args[3] if len(args) > 3 else kwargs.get("inplace", False)
    if not ctx.is_tensor(x) or inplace is not False or not (training is False or p == 0):
        return None
    return [x], {}


def same_value(args, kwargs, ctx):
    """A copy or cast (``contiguous``, ``clone``, ``.to(dtype)``, ...) whose result has the
    input's shape, dtype and device, where neither is written in place afterwards: the
    input's value.  (The importer checks that the inferred type is the call's.)"""
    if not args or not ctx.is_tensor(args[0]) or kwargs.get("memory_format") not in (
            None, torch.preserve_format, torch.contiguous_format):
        return None
    src, node = ctx.meta(args[0]), ctx.node_value()
    if not isinstance(src, torch.Tensor) or not isinstance(node, torch.Tensor):
        return None
    if (src.dtype, src.device) != (node.dtype, node.device) or ctx.meta_shape(args[0]) != ctx.meta_shape(ctx.node) \
            or None in ctx.meta_shape(args[0]):
        return None  # a real cast or copy to another device: not an alias
    if ctx.written_in_place(args[0]):
        return None
    return [args[0]], {}


def softmax_cast_back(args, kwargs, ctx):
    """A cast of ``softmax(x, dim, dtype=float32)`` back to x's own half-precision dtype (the
    fp32 upcast of attention weights in fp16/bf16 models): one softmax over x."""
    import torch.nn.functional as F
    if not args or not isinstance(args[0], torch.fx.Node):
        return None
    src = args[0]
    if not ((src.op == "call_method" and src.target == "softmax") or (src.op == "call_function" and src.target in (
            torch.softmax, F.softmax, aten._softmax.default, aten.softmax.int))):
        return None
    x = src.args[0] if src.args else src.kwargs.get("input")
    dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim")
    upcast = src.kwargs.get("dtype", src.args[2] if len(src.args) > 2 else None)
    if not ctx.is_tensor(x) or not isinstance(dim, int) or upcast not in (torch.float32, True):
        return None
    if ctx.dtype(x) not in ("float16", "bfloat16") or ctx.meta(src).dtype != torch.float32:
        return None
    return [x], {"axis": dim % ctx.rank(x) - ctx.rank(x)}


def repeat_heads(args, kwargs, ctx):
    """``x[..., None, :, :]`` (or ``unsqueeze(-3)``), ``expand`` the new axis, ``reshape`` it
    into the head axis: each of the g heads repeated r times (grouped-query attention)."""
    if not args or len(ctx.out_shapes) != 1:
        return None
    expand = args[0]
    if not _is_call(expand, ("expand",), (aten.expand.default,)):
        return None
    x = _unsqueezed(expand.args[0])
    if x is None or not ctx.is_tensor(x):
        return None
    xs, es, out = ctx.shape(x), ctx.meta_shape(expand), tuple(ctx.out_shapes[0])
    r = len(xs)
    if r < 3 or len(es) != r + 1 or es[:r - 2] != xs[:r - 2] or es[r - 1:] != xs[r - 2:]:
        return None
    if out != xs[:r - 3] + (xs[r - 3] * es[r - 2],) + xs[r - 2:]:
        return None
    return [x], {"heads": out[r - 3]}


def _is_call(node, methods, functions) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_method" and node.target in methods)
        or (node.op == "call_function" and node.target in functions))


def _unsqueezed(node):
    """x when ``node`` inserts one axis before x's last two, else None."""
    import operator
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


def _neg(axis: int, rank: int) -> int:
    """Axes are kept negative, as in generated rules (which then hold with batch axes)."""
    return axis % rank - rank


def _dim_arg(args, kwargs, pos, name, default=None):
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def concat(args, kwargs, ctx):
    tensors = args[0] if args else kwargs.get("tensors")
    dim = _dim_arg(args, kwargs, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not isinstance(dim, int):
        return None
    if not all(ctx.is_tensor(t) for t in tensors) or not _no_kwargs(kwargs, ("dim", "tensors")):
        return None
    return list(tensors), {"axis": _neg(dim, ctx.rank(tensors[0]))}


def split(args, kwargs, ctx):
    """``torch.split(x, [s0, s1], dim)`` or an even ``split(x, s, dim)`` into two parts."""
    if not args or not ctx.is_tensor(args[0]) or not _no_kwargs(kwargs, ("dim", "split_size_or_sections", "split_size")):
        return None
    sizes = _dim_arg(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_size"))
    dim = _dim_arg(args, kwargs, 2, "dim", 0)
    if len(ctx.out_shapes) != 2 or not isinstance(dim, int):
        return None
    if isinstance(sizes, (list, tuple)) and len(sizes) == 2 and all(isinstance(x, int) for x in sizes):
        left = sizes[0]
    elif isinstance(sizes, int):
        left = sizes
    else:
        return None
    return [args[0]], {"axis": _neg(dim, ctx.rank(args[0])), "left": left}


def reduce_sum(args, kwargs, ctx):
    if not args or not ctx.is_tensor(args[0]) or not _no_kwargs(kwargs, ("dim", "keepdim")):
        return None
    dim = _dim_arg(args, kwargs, 1, "dim")
    keepdim = _dim_arg(args, kwargs, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or not isinstance(keepdim, bool):
        return None
    return [args[0]], {"axis": _neg(dim, ctx.rank(args[0])), "keepdim": keepdim}


def to_own_shape(args, kwargs, ctx):
    """``view``/``reshape``/``expand``/``expand_as`` to the node's own (concrete) output shape,
    -1 resolved; only x is an operand (``expand_as(y)``'s y gives a shape, not a value)."""
    if not args or not ctx.is_tensor(args[0]) or kwargs or len(ctx.out_shapes) != 1:
        return None
    return [args[0]], {"shape": list(ctx.out_shapes[0])}


def _beta_alpha_call(args, kwargs, ctx, names) -> tuple | None:
    """``f(input, a, b, *, beta, alpha)`` with three tensors: ``(tensors, beta, alpha)``."""
    vals = [args[k] if k < len(args) else kwargs.get(n) for k, n in enumerate(names)]
    if len(args) > 3 or set(kwargs) - {*names, "beta", "alpha"}:
        return None
    if not all(ctx.is_tensor(v) for v in vals):
        return None
    return vals, kwargs.get("beta", 1), kwargs.get("alpha", 1)


def baddbmm(args, kwargs, ctx):
    """``torch.baddbmm(m, x, y, beta=1, alpha=a)`` / ``m.baddbmm(batch1=x, batch2=y, ...)`` with
    beta 1 and a number alpha: ``(m, x, y, alpha)``."""
    call = _beta_alpha_call(args, kwargs, ctx, ("input", "batch1", "batch2"))
    if call is None or call[1] != 1:
        return None
    vals, _, alpha = call
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        return None
    return [vals[0], vals[1], vals[2], float(alpha)], {}


def softmax(args, kwargs, ctx):
    """``softmax(x, dim)``; a ``dtype`` argument equal to x's own dtype changes nothing.
    (A real upcast, fp16 scores to fp32, stays opaque.)"""
    if not args or not ctx.is_tensor(args[0]):
        return None
    dim = _dim_arg(args, kwargs, 1, "dim")
    own = getattr(torch, ctx.dtype(args[0]))
    extra = args[2:] if len(args) > 2 else ()
    if extra not in ((), (False,), (None,), (own,)) or kwargs.get("dtype") not in (None, own):
        return None     # (_stacklevel only says where a warning points: nn.Softmax passes 5)
    if not isinstance(dim, int) or not _no_kwargs(kwargs, ("dim", "dtype", "_stacklevel")):
        return None
    return [args[0]], {"axis": _neg(dim, ctx.rank(args[0]))}


def safe_softmax(args, kwargs, ctx):
    """``aten._safe_softmax(x, dim[, dtype])``: a softmax whose all -inf rows give zeros."""
    if not args or not ctx.is_tensor(args[0]) or not _no_kwargs(kwargs, ("dtype",)):
        return None
    dim = _dim_arg(args, kwargs, 1, "dim")
    dtype = _dim_arg(args, kwargs, 2, "dtype")
    if not isinstance(dim, int) or dtype not in (None, getattr(torch, ctx.dtype(args[0]))):
        return None
    return [args[0]], {"axis": _neg(dim, ctx.rank(args[0])), "safe": True}


def broadcast_add(args, kwargs, ctx):
    """``x + b`` where ``b`` broadcasts to ``x`` (either order); the full-size operand first."""
    parsed = binary_tensors(args, kwargs, ctx)
    if parsed is None or len(ctx.out_shapes) != 1:
        return None
    a, b = parsed[0]
    return full_size_first(a, b, ctx.shape(a), ctx.shape(b), ctx.out_shapes[0])


def broadcast_mul(args, kwargs, ctx):
    """``x * b`` where ``b`` (not a scalar) broadcasts to ``x``, either order; x first."""
    parsed = broadcast_add(args, kwargs, ctx)
    if parsed is None or ctx.shape(parsed[0][0]) == ctx.shape(parsed[0][1]):
        return None          # the same shapes: mul's
    return parsed


def broadcast_sub(args, kwargs, ctx):
    """``x - b`` where ``b`` broadcasts to ``x`` (the result has x's shape)."""
    parsed = binary_tensors(args, kwargs, ctx)
    if parsed is None or len(ctx.out_shapes) != 1:
        return None
    a, b = parsed[0]
    if ctx.shape(a) != tuple(ctx.out_shapes[0]) or ctx.shape(b) == ():
        return None
    return [a, b], {}


def max_values(args, kwargs, ctx):
    """``x.max(dim, keepdim)`` / ``torch.max(x, dim)``: (values, indices); the op is the values,
    so every use must be of the values (``[0]`` or ``.values``), never of the indices."""
    if len(ctx.out_shapes) != 2 or ctx.node is None:
        return None
    if any(not (u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users))
           for u in ctx.node.users):
        return None
    return reduce_sum(args, kwargs, ctx)


def slice_as_split(args, kwargs, ctx):
    """``x[..., :k]`` / ``x[..., k:]`` (one axis sliced, negative bounds too) and
    ``aten.slice(x, dim, start, end)``: one part of ``split(x, axis, left)``; the third item
    says which output the call is."""
    if kwargs or len(args) < 2 or not ctx.is_tensor(args[0]) or len(ctx.out_shapes) != 1:
        return None
    x, shape = args[0], ctx.shape(args[0])
    rank = len(shape)
    if isinstance(args[1], int) and len(args) >= 3:        # aten.slice.Tensor(x, dim, start, end[, step])
        dim, start, end = args[1], args[2], args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        if not isinstance(dim, int) or step != 1:
            return None
        axis = dim % rank
    else:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        full = slice(None, None, None)
        sliced = [i for i, e in enumerate(index) if isinstance(e, slice) and e != full]
        if len(sliced) != 1 or any(not (e is Ellipsis or e == full or k in sliced) for k, e in enumerate(index)):
            return None
        if index.count(Ellipsis) > 1:
            return None
        k = sliced[0]
        axis = rank - (len(index) - k) if Ellipsis in index[:k] else k
        s = index[k]
        if s.step not in (None, 1) or not 0 <= axis < rank:
            return None
        start, end = s.start, s.stop
    n = shape[axis]
    start = 0 if start is None else start
    end = n if end is None or end > n else end
    if not (isinstance(start, int) and isinstance(end, int)):
        return None
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    if start == 0 and 0 < end < n:
        return [x], {"axis": _neg(axis, rank), "left": end}, 0
    if end == n and 0 < start < n:
        return [x], {"axis": _neg(axis, rank), "left": start}, 1
    return None


def full_size_first(a, b, shape_a, shape_b, out_shape):
    """``a + b`` as ``badd(full, addend)``: the operand with the result's shape first; a
    scalar addend is not badd's (it is sadd's).  Shared by the fx and ONNX spellings."""
    if shape_a == () or shape_b == ():
        return None
    if shape_a == out_shape:
        return [a, b], {}
    if shape_b == out_shape:
        return [b, a], {}
    return None


def _masking_fill(fill, ctx, dtype):
    """The fill value when it masks entries out of a softmax: -inf, or at most half the
    dtype's lowest value, so that ``x + fill`` rounds to ``fill`` (or below) for any
    attention score and the entry's weight is exactly 0 either way."""
    while isinstance(fill, torch.fx.Node) and ctx.const_value(fill) is None and _is_call(
            fill, ("detach", "clone", "contiguous"), (torch.detach, aten.detach.default, aten.detach_.default,
                                                       aten.clone.default, aten.alias.default,
                                                       aten.lift_fresh_copy.default)):
        fill = fill.args[0]      # a copy of a constant fill (export's lifted `torch.tensor(min)`)
    if isinstance(fill, torch.fx.Node):
        value = ctx.const_value(fill)
        if value is None and fill.op == "get_attr" and "lifted_tensor" in str(fill.target):
            from ..frontends.fx import fetch_attr   # a literal torch.export lifted out of forward
            value = fetch_attr(ctx.imp.gm, fill.target)
        if value is None or value.dim() != 0:
            return None
        fill = value.item()
    if not isinstance(fill, numbers.Real) or isinstance(fill, bool):
        return None
    lowest = torch.finfo(dtype).min
    return float(fill) if fill == float("-inf") or fill <= lowest / 2 else None


def where_as_mask(args, kwargs, ctx):
    """``torch.where(keep, x, fill)`` with a constant boolean ``keep`` and a masking fill
    is ``x + where(keep, 0, fill)``: an additive mask, precomputed."""
    if len(args) != 3 or kwargs or not ctx.is_tensor(args[1]):
        return None
    keep = ctx.const_value(args[0]) if isinstance(args[0], torch.fx.Node) else None
    x = args[1]
    if ctx.dtype(x) not in _FLOATS:
        return None
    dtype = getattr(torch, ctx.dtype(x))
    fill = _masking_fill(args[2], ctx, dtype)
    if keep is None or keep.dtype != torch.bool or fill is None:
        return None
    return [x, torch.where(keep, torch.zeros((), dtype=dtype), torch.full((), fill, dtype=dtype))], {}


def masked_fill_as_mask(args, kwargs, ctx):
    """``x.masked_fill(drop, fill)``: the same additive mask, with ``drop = ~keep``."""
    if len(args) != 3 or kwargs or not ctx.is_tensor(args[0]):
        return None
    x = args[0]
    drop = ctx.const_value(args[1]) if isinstance(args[1], torch.fx.Node) else None
    if ctx.dtype(x) not in _FLOATS:
        return None
    dtype = getattr(torch, ctx.dtype(x))
    fill = _masking_fill(args[2], ctx, dtype)
    if drop is None or drop.dtype != torch.bool or fill is None:
        return None
    return [x, torch.where(drop, torch.full((), fill, dtype=dtype), torch.zeros((), dtype=dtype))], {}


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _runtime_mask(mask, x, fill_arg, ctx):
    """``(x, mask)`` and the fill's attributes, for a boolean mask computed at run time that
    broadcasts to x (the result has x's shape) and a fill that masks entries out of a softmax."""
    if not isinstance(mask, torch.fx.Node) or ctx.const_value(mask) is not None:
        return None
    if not (ctx.is_tensor(mask) and ctx.is_tensor(x)) or ctx.dtype(mask) != "bool":
        return None
    dtype = ctx.dtype(x)
    if dtype not in _FLOATS or len(ctx.out_shapes) != 1 \
            or tuple(ctx.out_shapes[0]) != tuple(ctx.shape(x)):
        return None
    fill = _masking_fill(fill_arg, ctx, getattr(torch, dtype))
    if fill is None:
        return None
    return {"dtype": dtype, "neg_inf": fill == float("-inf")}


def where_runtime_mask(args, kwargs, ctx):
    """``torch.where(keep, x, fill)`` with a boolean ``keep`` computed at run time (an input,
    ``attention_mask == 1``) and a masking fill: ``fill_masked(x, keep)``.  Any fill at most
    half the dtype's lowest value gives the softmax after it the same weights as the lowest."""
    if len(args) != 3 or kwargs:
        return None
    attrs = _runtime_mask(args[0], args[1], args[2], ctx)
    return None if attrs is None else ([args[1], args[0]], dict(attrs, keep=True))


def masked_fill_runtime_mask(args, kwargs, ctx):
    """``x.masked_fill(drop, fill)`` with a boolean ``drop`` computed at run time."""
    if len(args) != 3 or kwargs:
        return None
    attrs = _runtime_mask(args[1], args[0], args[2], ctx)
    return None if attrs is None else ([args[0], args[1]], dict(attrs, keep=False))


def integer_power(args, kwargs, ctx):
    """``x ** 3`` / ``torch.pow(x, 3.0)``: a small integral exponent."""
    if len(args) != 2 or kwargs or not ctx.is_tensor(args[0]):
        return None
    e = args[1]
    if not isinstance(e, numbers.Real) or isinstance(e, bool) or e != int(e) or not 2 <= e <= 4:
        return None
    return [args[0]], {"exponent": int(e)}


def gelu_tanh(args, kwargs, ctx):
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    if not args or not ctx.is_tensor(args[0]) or approximate != "tanh" or set(kwargs) - {"approximate"}:
        return None
    return [args[0]], {}
