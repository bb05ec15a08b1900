"""Parsers and writers shared by the operators' ONNX spellings (``OpDef.onnx`` and
``OpDef.to_onnx``).  Parsers return ``(tensor_args, attrs)`` or None, like the fx
ones; writers emit ONNX nodes through a ``backends.onnx.Builder``."""
from __future__ import annotations

import numpy as np

from ..errors import GraphoptError
from .spellings import full_size_first


def _neg(axis: int, rank: int) -> int:
    return axis % rank - rank


# -- parsers --------------------------------------------------------------------------------

def same_shapes(inputs, attrs, ctx):
    if len(inputs) == 2 and not attrs and ctx.shape(inputs[0]) == ctx.shape(inputs[1]) is not None:
        return list(inputs), {}
    return None


def broadcast(inputs, attrs, ctx):
    """``Add(x, b)`` with b broadcasting to x (either order): the full-size one first."""
    if len(inputs) != 2 or attrs or len(ctx.out_shapes) != 1:
        return None
    return full_size_first(*inputs, ctx.shape(inputs[0]), ctx.shape(inputs[1]), ctx.out_shapes[0])


def _scalar(name, ctx):
    """A scalar operand: a rank-0 tensor, or a one-element constant (made rank 0)."""
    shape = ctx.shape(name)
    if shape == ():
        return name
    value = ctx.const(name)
    if value is not None and value.size == 1:
        return value.reshape(())
    return None


def by_scalar(commutative: bool):
    def parse(inputs, attrs, ctx):
        if len(inputs) != 2 or attrs:
            return None
        a, b = inputs
        for x, s in ((a, b), (b, a)) if commutative else ((a, b),):
            shape = ctx.shape(x)
            if shape and shape == (ctx.out_shapes[0] if ctx.out_shapes else None):
                sv = _scalar(s, ctx)
                if sv is not None:
                    return [x, sv], {}
        return None
    return parse


def unary(inputs, attrs, ctx):
    return (list(inputs), {}) if len(inputs) == 1 and not attrs else None


def unary_any_attrs(inputs, attrs, ctx):
    """One input, attributes that do not matter (a Cast: the importer checks that the inferred
    type, here the input's, is the node's, so only a cast to the same type is accepted)."""
    return (list(inputs), {}) if len(inputs) == 1 else None


def dropout_at_inference(inputs, attrs, ctx):
    """Dropout whose mask output is unused and with no training_mode input: its input."""
    if not inputs or len(inputs) > 2 or len(ctx.out_shapes) > 1 or set(attrs) - {"seed"}:
        return None
    return [inputs[0]], {}


def permute_many(inputs, attrs, ctx):
    """A Transpose that moves more than two axes."""
    rank = len(ctx.shape(inputs[0]) or ())
    perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
    if set(attrs) - {"perm"} or sum(p != i for i, p in enumerate(perm)) <= 2:
        return None
    return [inputs[0]], {"perm": perm}


def matmul(inputs, attrs, ctx):
    return (list(inputs), {}) if len(inputs) == 2 and not attrs else None


def transpose(inputs, attrs, ctx):
    """A Transpose that swaps two axes (other perms are ``permute``)."""
    rank = len(ctx.shape(inputs[0]) or ())
    perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
    moved = [i for i, p in enumerate(perm) if p != i]
    if len(moved) != 2 or perm[moved[0]] != moved[1] or set(attrs) - {"perm"}:
        return None
    return [inputs[0]], {"dim0": moved[0] - rank, "dim1": moved[1] - rank}


def reshape(inputs, attrs, ctx):
    if len(inputs) != 2 or attrs.get("allowzero", 0) or len(ctx.out_shapes) != 1 or ctx.out_shapes[0] is None:
        return None
    return [inputs[0]], {"shape": list(ctx.out_shapes[0])}


def softmax(inputs, attrs, ctx):
    if len(inputs) != 1 or ctx.opset < 13 or set(attrs) - {"axis"}:
        return None
    return [inputs[0]], {"axis": _neg(attrs.get("axis", -1), len(ctx.shape(inputs[0])))}


def concat(inputs, attrs, ctx):
    if len(inputs) != 2 or set(attrs) != {"axis"}:
        return None
    return list(inputs), {"axis": _neg(attrs["axis"], len(ctx.shape(inputs[0])))}


def split(inputs, attrs, ctx):
    if len(ctx.out_shapes) != 2 or set(attrs) - {"axis", "num_outputs", "split"}:
        return None
    rank = len(ctx.shape(inputs[0]))
    axis = attrs.get("axis", 0) % rank
    return [inputs[0]], {"axis": axis - rank, "left": ctx.out_shapes[0][axis]}


def reduce_sum(inputs, attrs, ctx):
    axes = ctx.const(inputs[1]) if len(inputs) > 1 else None
    if axes is None or axes.size != 1 or set(attrs) - {"keepdims"} or ctx.opset < 13:
        return None
    rank = len(ctx.shape(inputs[0]))
    return [inputs[0]], {"axis": _neg(int(axes.reshape(-1)[0]), rank), "keepdim": bool(attrs.get("keepdims", 1))}


def repeat_heads(inputs, attrs, ctx):
    """``Reshape(Expand(Unsqueeze(x, [-3]), (.., g, r, n, d)), (.., g*r, n, d))``: grouped-query
    attention's repetition of each key/value head."""
    if len(ctx.out_shapes) != 1 or ctx.out_shapes[0] is None:
        return None
    expand = ctx.producer(inputs[0])
    if expand is None or expand[0] != "Expand":
        return None
    unsq = ctx.producer(expand[1][0])
    if unsq is None or unsq[0] != "Unsqueeze" or len(unsq[1]) != 2:
        return None
    x = unsq[1][0]
    xs, es, axes = ctx.shape(x), ctx.shape(inputs[0]), ctx.const(unsq[1][1])
    out = ctx.out_shapes[0]
    if xs is None or es is None or axes is None or axes.size != 1 or len(xs) < 3:
        return None
    r = len(xs)
    if int(axes.reshape(-1)[0]) % (r + 1) != r - 2 or len(es) != r + 1:
        return None
    if es[:r - 2] != xs[:r - 2] or es[r - 1:] != xs[r - 2:]:
        return None
    if tuple(out) != tuple(xs[:r - 3]) + (xs[r - 3] * es[r - 2],) + tuple(xs[r - 2:]):
        return None
    return [x], {"heads": out[r - 3]}


def integer_power(inputs, attrs, ctx):
    e = ctx.const(inputs[1]) if len(inputs) == 2 else None
    if e is None or e.size != 1 or attrs:
        return None
    e = float(e.reshape(-1)[0])
    return ([inputs[0]], {"exponent": int(e)}) if e == int(e) and 2 <= e <= 4 else None


def gelu_tanh(inputs, attrs, ctx):
    return ([inputs[0]], {}) if len(inputs) == 1 and attrs.get("approximate") in ("tanh", b"tanh") else None


def recip(inputs, attrs, ctx):
    return ([inputs[0]], {}) if len(inputs) == 1 and ctx.shape(inputs[0]) == () else None


# -- writers ---------------------------------------------------------------------------------

def node(op_type):
    def emit(b, ins, attrs, outs):
        b.node(op_type, ins, outs)
    return emit


def emit_transpose(b, ins, attrs, outs):
    rank = len(b.shape(ins[0]))
    perm = list(range(rank))
    d0, d1 = attrs["dim0"] % rank, attrs["dim1"] % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    b.node("Transpose", ins, outs, perm=perm)


def emit_permute(b, ins, attrs, outs):
    b.node("Transpose", ins, outs, perm=[int(getattr(p, "const", p)) for p in attrs["perm"]])


def emit_reshape(b, ins, attrs, outs):
    b.node("Reshape", [ins[0], b.dims(attrs["shape"])], outs)


def emit_concat(b, ins, attrs, outs):
    b.node("Concat", ins, outs, axis=int(attrs["axis"]))


def emit_split(b, ins, attrs, outs):
    shape = b.shape(ins[0])
    axis = attrs["axis"] % len(shape)
    left = attrs["left"]
    b.node("Split", [ins[0], b.dims([left, shape[axis] - left])], outs, axis=axis)


def emit_reduce_sum(b, ins, attrs, outs):
    b.node("ReduceSum", [ins[0], b.const(np.array([attrs["axis"]], dtype=np.int64))], outs,
           keepdims=int(attrs["keepdim"]))


def emit_reduce_max(b, ins, attrs, outs):
    if b.opset >= 18:       # axes became an input in opset 18
        b.node("ReduceMax", [ins[0], b.const(np.array([attrs["axis"]], dtype=np.int64))], outs,
               keepdims=int(attrs["keepdim"]))
    else:
        b.node("ReduceMax", [ins[0]], outs, axes=[int(attrs["axis"])], keepdims=int(attrs["keepdim"]))


def emit_softmax(b, ins, attrs, outs):
    b.node("Softmax", ins, outs, axis=int(attrs["axis"]))


def emit_repeat_heads(b, ins, attrs, outs):
    shape = b.shape(ins[0])
    g, heads = shape[-3], int(attrs["heads"])
    wide = list(shape[:-3]) + [g, heads // g] + list(shape[-2:])
    un = b.node("Unsqueeze", [ins[0], b.const(np.array([len(shape) - 2], dtype=np.int64))], 1)
    ex = b.node("Expand", [un[0], b.dims(wide)], 1)
    b.node("Reshape", [ex[0], b.dims(list(shape[:-3]) + [heads] + list(shape[-2:]))], outs)


def emit_attention(masked: bool):
    """ONNX ``Attention`` (opset 23): q, k, v of shape (batch, heads, seq, dim); grouped
    key/value heads are native; ``scale`` must be a constant."""
    def emit(b, ins, attrs, outs):
        if b.opset < 23:
            raise GraphoptError(f"fused attention needs ONNX opset 23 (the Attention operator); the model has {b.opset}")
        q, k, v = ins[:3]
        scale = b.const_value(ins[-1])
        if scale is None:
            raise GraphoptError("fused attention: the scale is not a constant")
        rank = len(b.shape(q))
        if rank > 4:
            raise GraphoptError(f"fused attention: rank-{rank} q/k/v cannot be written as ONNX Attention")
        pad = 4 - rank
        if pad:
            axes = b.const(np.arange(pad, dtype=np.int64))
            q, k, v = (b.node("Unsqueeze", [t, axes], 1)[0] for t in (q, k, v))
        extra = [ins[3]] if masked else []
        kw = {"scale": float(scale)}
        if attrs.get("is_causal"):
            kw["is_causal"] = 1
        if pad:
            out = b.node("Attention", [q, k, v] + extra, 1, **kw)
            b.node("Squeeze", [out[0], b.const(np.arange(pad, dtype=np.int64))], outs)
        else:
            b.node("Attention", [q, k, v] + extra, outs, **kw)
    return emit


def emit_pow(b, ins, attrs, outs):
    dtype = b.dtype(ins[0])
    b.node("Pow", [ins[0], b.const(np.array(float(attrs["exponent"]), dtype=dtype))], outs)


def emit_gelu_tanh(b, ins, attrs, outs):
    """ONNX Gelu (opset 20) with approximate="tanh"; below that, its formula."""
    if b.opset >= 20:
        b.node("Gelu", ins, outs, approximate="tanh")
        return
    from .elementwise import GELU_A, GELU_B  # the op's own constants (elementwise imports this module)
    dtype = b.dtype(ins[0])
    c = {k: b.const(np.array(v, dtype=dtype)) for k, v in
         (("half", 0.5), ("b", GELU_B), ("a", GELU_A), ("one", 1.0), ("three", 3.0))}
    x = ins[0]
    cube = b.node("Pow", [x, c["three"]], 1)[0]
    inner = b.node("Add", [x, b.node("Mul", [cube, c["b"]], 1)[0]], 1)[0]
    t = b.node("Tanh", [b.node("Mul", [inner, c["a"]], 1)[0]], 1)[0]
    b.node("Mul", [b.node("Mul", [x, c["half"]], 1)[0], b.node("Add", [t, c["one"]], 1)[0]], outs)
