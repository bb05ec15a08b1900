"""Masks computed from sizes, proved for every size.

With a symbolic sequence length an attention mask built from the sizes alone
(``arange`` comparisons, HF's mask functions, ``tril``) is no longer a constant
that a guard can check.  This module reads such a mask *symbolically*: every
tensor of the mask's computation is a function of its element's index, stated
with sympy over index variables (one per axis, counted from the right, as
broadcasting aligns them) and the graph's size symbols:

* an integer tensor is an affine function of the indices (``arange(n) + s`` is
  ``i + s``),
* a boolean tensor is a conjunction of linear constraints (``kv <= q`` is
  ``i[-2] + s - i[-1] >= 0``),
* an additive float mask is ``where(keep, 0, fill)``.

A conjunction is *causal* when every constraint holds on the whole index box
except one that is exactly ``i[-2] - i[-1] >= 0`` on a square ``(T, T)`` mask,
and *all kept* when every constraint holds on the box (a decode step's one query
seeing the whole cache).  Both are proofs over every value of the size symbols
(sizes are at least 1), never samples.  Anything else is not understood: the
mask stays the explicit ``attn_mask`` it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from .guards import masked_below

aten = torch.ops.aten


def _var(axis: int) -> sympy.Symbol:
    """The index variable of an axis counted from the right (-1 is the last)."""
    return sympy.Symbol(f"_i{-axis}", integer=True, nonnegative=True)


@dataclass(frozen=True)
class IntFn:
    """An integer tensor of ``shape`` whose element at an index is ``expr`` of it."""
    expr: object
    shape: tuple            # sympy sizes


@dataclass(frozen=True)
class BoolFn:
    """A boolean tensor: true where every ``expr >= 0`` (``eq``: ``expr == 0``) holds."""
    ge: tuple
    eq: tuple
    shape: tuple


@dataclass(frozen=True)
class Additive:
    """``where(keep, 0, fill)``: an additive attention mask."""
    keep: BoolFn
    fill: float
    shape: tuple


def _positive(d) -> bool:
    """Every symbol of a SymInt is at least 1 (its shape environment's range says so): the
    proofs below assume it.  A symbolic int that may be 0 or negative is not read."""
    env = d.node.shape_env
    ranges = getattr(env, "var_to_range", None) or {}
    for sym in d.node.expr.free_symbols:
        r = ranges.get(sym)
        try:
            if r is None or not r.lower >= 1:
                return False
        except TypeError:
            return False
    return True


def _size(d):
    if isinstance(d, torch.SymInt):
        return d.node.expr if _positive(d) else None
    if isinstance(d, int):
        return sympy.Integer(d)
    return None


def _shape(node) -> tuple | None:
    v = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    shape = tuple(_size(d) for d in v.shape)
    return None if any(d is None for d in shape) else shape


def _scalar(a):
    """An int, a SymInt (its expression) or None."""
    if isinstance(a, bool):
        return None
    if isinstance(a, int):
        return sympy.Integer(a)
    if isinstance(a, fx.Node):
        v = a.meta.get("val", a.meta.get("example_value"))
        if isinstance(v, torch.SymInt):
            return v.node.expr if _positive(v) else None
        if isinstance(v, int) and not isinstance(v, bool):
            return sympy.Integer(v)
    return None


def _fix_unit_axes(expr, shape):
    """Axes of size 1 have index 0 (the function then broadcasts along them)."""
    subs = {_var(k - len(shape)): 0 for k, d in enumerate(shape) if d == 1}
    return expr.subs(subs) if subs else expr


def _int(expr, shape) -> IntFn:
    return IntFn(sympy.expand(_fix_unit_axes(expr, shape)), shape)


def _bool(ge, eq, shape) -> BoolFn | bool:
    ge = tuple(sympy.expand(_fix_unit_axes(e, shape)) for e in ge)
    eq = tuple(sympy.expand(_fix_unit_axes(e, shape)) for e in eq)
    if any(e.is_number and e < 0 for e in ge) or any(e.is_number and e != 0 for e in eq):
        return BoolFn((sympy.Integer(-1),), (), shape)      # false everywhere
    ge = tuple(dict.fromkeys(e for e in ge if not (e.is_number and e >= 0)))
    eq = tuple(dict.fromkeys(e for e in eq if not (e.is_number and e == 0)))
    return BoolFn(ge, eq, shape)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    out = []
    for k in range(1, max(len(a), len(b)) + 1):
        x = a[-k] if k <= len(a) else sympy.Integer(1)
        y = b[-k] if k <= len(b) else sympy.Integer(1)
        if x == 1:
            out.append(y)
        elif y == 1 or sympy.simplify(x - y) == 0:
            out.append(x)
        else:
            return None
    return tuple(reversed(out))


def _always(e, shape) -> bool:
    """``e >= 0`` for every index in the box of ``shape`` and every size (sizes >= 1)."""
    low = e
    for k in range(len(shape)):
        v = _var(k - len(shape))
        c = sympy.expand(e).coeff(v)
        if c.free_symbols & _index_vars(e):
            return False
        low = low.subs(v, 0) if _nonneg(c) else low.subs(v, shape[k] - 1) if _nonneg(-c) else None
        if low is None:
            return False
    return _nonneg(sympy.expand(low))


def _index_vars(e) -> set:
    return {s for s in e.free_symbols if s.name.startswith("_i")}


def _nonneg(e) -> bool:
    """A polynomial in size symbols (each >= 1) that is >= 0 for all of them: every
    coefficient non-negative after writing each symbol as 1 + (a non-negative part)."""
    e = sympy.expand(e)
    if _index_vars(e):
        return False
    if e.is_number:
        return bool(e >= 0)
    shifted = {s: s + 1 for s in e.free_symbols}
    try:
        poly = sympy.Poly(sympy.expand(e.subs(shifted, simultaneous=True)), *sorted(e.free_symbols, key=str))
        return all(bool(c >= 0) for c in poly.coeffs())
    except (sympy.PolynomialError, TypeError, ValueError):   # (floor division, Max, ...): not proved
        return False


def classify(value) -> str | None:
    """``"causal"``, ``"zeros"`` (nothing masked) or None, for an analysed mask value.
    A boolean keep mask counts as its additive form."""
    if isinstance(value, Additive):
        keep = value.keep
    elif isinstance(value, BoolFn):
        keep = value
    else:
        return None
    shape = keep.shape
    if len(shape) < 2 or keep.eq and not all(_always(e, shape) and _always(-e, shape) for e in keep.eq):
        return None
    rest = [e for e in keep.ge if not _always(e, shape)]
    if not rest:
        return "zeros"
    q, k = _var(-2), _var(-1)
    if len(rest) == 1 and sympy.simplify(shape[-2] - shape[-1]) == 0 and sympy.expand(rest[0] - (q - k)) == 0:
        return "causal"
    return None


class MaskAnalysis:
    """Reads the fx nodes of a graph symbolically (memoised); :meth:`guards` says which
    guards a node's value passes for every size."""

    def __init__(self, gm: fx.GraphModule, written=()):
        """``written``: nodes an in-place call changes (the importer's ``FxImport.written``);
        they, and everything computed from them (a view of a tensor written later), are
        not read."""
        self.values: dict = {}
        tainted = set(written)      # written in place: the operands, and what they view
        for node in gm.graph.nodes:
            if _writes(node) and node.args:
                tainted.update(_view_chain(node.args[0]))
        for node in gm.graph.nodes:   # ... and everything computed from them, before or after the write
            if node in tainted or _writes(node) or any(a in tainted for a in node.all_input_nodes):
                tainted.add(node)
                continue
            try:
                v = self._eval(node)
            except (TypeError, ValueError, AttributeError, IndexError, sympy.SympifyError):
                v = None
            if v is not None:
                self.values[node] = v

    def guards(self, node) -> set:
        """The guards a node's value passes for every size: ``causal``/``zeros`` for an
        additive float mask; for a boolean mask ``causal-keep``/``zeros-keep`` when it keeps
        the entries of the causal (or every) entry, ``causal-drop``/``zeros-drop`` when it
        drops the others (``masked_fill``'s polarity)."""
        v = self.values.get(node)
        meta = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(v, BoolFn):
            if not isinstance(meta, torch.Tensor) or meta.dtype != torch.bool:
                return set()
            out = {f"{kind}-keep"} if (kind := classify(v)) else set()
            if len(v.ge) == 1 and not v.eq and (kind := classify(_bool((-v.ge[0] - 1,), (), v.shape))):
                out.add(f"{kind}-drop")
            elif v.ge == (sympy.Integer(-1),) and not v.eq:
                out.add("zeros-drop")
            return out
        if not isinstance(v, Additive):
            return set()
        kind = classify(v)
        meta = node.meta.get("val", node.meta.get("example_value"))
        if kind is None or not isinstance(meta, torch.Tensor) or not meta.dtype.is_floating_point:
            return set()
        if v.fill != float("-inf") and v.fill > masked_below(meta.dtype):
            return set()
        return {kind}

    # -- the abstract interpreter -----------------------------------------------------
    def _get(self, a):
        if isinstance(a, fx.Node):
            return self.values.get(a)
        return None

    def _eval(self, node):
        if node.op not in ("call_function", "call_method"):
            return None
        t, args, kw = node.target, node.args, dict(node.kwargs)
        shape = _shape(node)
        name = t if isinstance(t, str) else getattr(t, "__name__", "")
        if isinstance(t, torch._ops.OpOverload):
            name = t.overloadpacket.__name__
        kw.pop("device", None), kw.pop("pin_memory", None), kw.pop("layout", None)
        if name == "arange" and shape is not None and len(shape) == 1:
            nums = [_scalar(a) for a in args]
            if any(n is None for n in nums) or kw.get("step", 1) != 1 or len(nums) > 2:
                return None
            start = nums[0] if len(nums) == 2 else kw.get("start", 0)
            return _int(_var(-1) + start, shape)
        if name in ("to", "type", "clone", "contiguous", "_to_copy", "detach", "alias", "lift_fresh_copy"):
            x = self._get(args[0]) if args else None
            same = _shape(args[0]) == shape if args else False
            meta_in = args[0].meta.get("val", args[0].meta.get("example_value")) if args else None
            meta_out = node.meta.get("val", node.meta.get("example_value"))
            if x is None or not same or not isinstance(meta_in, torch.Tensor) or \
                    not isinstance(meta_out, torch.Tensor) or meta_in.dtype != meta_out.dtype:
                return None
            return x
        if name in ("new_ones", "ones", "full", "new_full", "zeros", "new_zeros") and shape is not None:
            fill = {"new_ones": 1, "ones": 1, "zeros": 0, "new_zeros": 0}.get(name)
            if fill is None:
                fill = args[-1] if args else kw.get("fill_value")
            meta = node.meta.get("val", node.meta.get("example_value"))
            if not isinstance(meta, torch.Tensor):
                return None
            if meta.dtype == torch.bool and isinstance(fill, (bool, int)):
                return _bool((), (), shape) if fill else _bool((sympy.Integer(-1),), (), shape)
            if isinstance(fill, bool):
                fill = int(fill)
            if isinstance(fill, int) and not meta.dtype.is_floating_point:
                return _int(sympy.Integer(fill), shape)
            if isinstance(fill, (int, float)) and float(fill) == 0.0:
                return ("zero", shape)
            if isinstance(fill, float) and meta.dtype.is_floating_point:
                return ("fill", fill, shape)
            return None
        if name in ("add", "sub", "__add__", "__sub__", "iadd") and len(args) == 2 and shape is not None \
                and not kw:      # (add(x, y, alpha=a) is not read)
            sign = -1 if "sub" in name else 1
            return self._affine(args[0], args[1], sign, shape)
        if name in ("__radd__",) and len(args) == 2 and shape is not None:
            return self._affine(args[0], args[1], 1, shape)
        if name in ("le", "lt", "ge", "gt", "eq", "ne", "__le__", "__lt__", "__ge__", "__gt__", "__eq__",
                    "__ne__") and len(args) == 2 and shape is not None:
            return self._compare(name.strip("_"), args[0], args[1], shape)
        if name in ("and_", "__and__", "logical_and", "bitwise_and", "__iand__", "mul") and len(args) == 2:
            a, b = self._get(args[0]), self._get(args[1])
            if isinstance(a, BoolFn) and isinstance(b, BoolFn) and shape is not None:
                return _bool(a.ge + b.ge, a.eq + b.eq, shape)
            return None
        if name in ("expand", "expand_as", "broadcast_to", "unsqueeze", "view", "reshape", "getitem",
                    "__getitem__", "index", "squeeze"):
            return self._layout(node, name, args, shape)
        if name == "slice" and args:        # aten.slice(x, dim, start, end, step): x[..., start:end]
            x, src = self._get(args[0]), _shape(args[0])
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            start = args[2] if len(args) > 2 else kw.get("start")
            step = args[4] if len(args) > 4 else kw.get("step", 1)
            if x is None or src is None or shape is None or not isinstance(dim, int) or step != 1 \
                    or not (start is None or (isinstance(start, int) and start >= 0)) or len(src) != len(shape):
                return None
            axis = dim % len(src)
            subs = {_var(k - len(src)): _var(k - len(shape)) + ((start or 0) if k == axis else 0)
                    for k in range(len(src))}
            return self._substitute(x, subs, shape)
        if name == "diff":
            return self._diff(args, kw, shape)
        if name == "cumsum":
            x = self._get(args[0])
            if isinstance(x, BoolFn) and x.ge == (sympy.Integer(-1),):   # all false: zeros
                return _int(sympy.Integer(0), shape)
            if isinstance(x, IntFn) and x.expr == 0:
                return x
            return None
        if name in ("tril", "triu") and args:
            return self._triangle(name, args, kw, shape)
        if name in ("logical_not", "bitwise_not", "__invert__", "invert") and len(args) == 1:
            x = self._get(args[0])
            if isinstance(x, BoolFn) and len(x.ge) == 1 and not x.eq and shape is not None:
                return _bool((-x.ge[0] - 1,), (), shape)      # not (e >= 0)  ==  -e - 1 >= 0
            return None
        if name in ("masked_fill", "masked_fill_") and len(args) == 3 and shape is not None:
            x, drop, fill = self._get(args[0]), self._get(args[1]), args[2]
            if isinstance(x, tuple) and x[0] == "zero" and isinstance(drop, BoolFn) and len(drop.ge) == 1 \
                    and not drop.eq and isinstance(fill, (int, float)) and not isinstance(fill, bool):
                return Additive(_bool((-drop.ge[0] - 1,), (), shape), float(fill), shape)
            return None
        if name == "where" and len(args) == 3:
            keep = self._get(args[0])
            zero = self._get(args[1])
            fill = args[2]
            if isinstance(fill, fx.Node):
                return None
            if isinstance(keep, BoolFn) and zero is not None and zero[0] == "zero" and isinstance(fill, (int, float)) \
                    and shape is not None:
                return Additive(keep, float(fill), shape)
            return None
        return None

    def _triangle(self, name, args, kw, shape):
        """``tril(x, k)`` keeps ``j - i <= k``, ``triu(x, k)`` keeps ``j - i >= k`` (i, j the
        last two indices): of a boolean x, the conjunction; of a float x full of a masking
        value, ``triu(full(fill), 1)`` is the additive causal mask (fill above the diagonal)."""
        x = self._get(args[0])
        k = args[1] if len(args) > 1 else kw.get("diagonal", 0)
        if not isinstance(k, int) or isinstance(k, bool) or shape is None or len(shape) < 2:
            return None
        q, j = _var(-2), _var(-1)
        keep = (q - j + k) if name == "tril" else (j - q - k)     # >= 0 where the entry is kept
        if isinstance(x, BoolFn):
            return _bool(x.ge + (keep,), x.eq, shape)
        if isinstance(x, tuple) and x[0] == "fill" and name == "triu":
            # entries kept by triu hold the fill (masked), the others are 0
            return Additive(_bool((-keep - 1,), (), shape), x[1], shape)
        return None

    def _operand(self, a, shape):
        """An operand of an integer op as (expr, shape)."""
        v = self._get(a)
        if isinstance(v, IntFn):
            return v.expr, v.shape
        s = _scalar(a)
        return (s, ()) if s is not None else None

    def _affine(self, a, b, sign, shape):
        x, y = self._operand(a, shape), self._operand(b, shape)
        if x is None or y is None or not (isinstance(self._get(a), IntFn) or isinstance(self._get(b), IntFn)):
            return None
        return _int(x[0] + sign * y[0], shape)

    def _compare(self, op, a, b, shape):
        x, y = self._operand(a, shape), self._operand(b, shape)
        if x is None or y is None:
            return None
        d = x[0] - y[0]      # op(a, b) as a constraint on d = a - b (integers)
        if op == "le":
            return _bool((-d,), (), shape)
        if op == "lt":
            return _bool((-d - 1,), (), shape)
        if op == "ge":
            return _bool((d,), (), shape)
        if op == "gt":
            return _bool((d - 1,), (), shape)
        if op == "eq":
            return _bool((), (d,), shape)
        if op == "ne":
            d = sympy.expand(_fix_unit_axes(d, shape))
            if d.is_number:
                return _bool((), (), shape) if d != 0 else _bool((sympy.Integer(-1),), (), shape)
        return None

    def _layout(self, node, name, args, shape):
        x = self._get(args[0]) if args else None
        src = _shape(args[0]) if args else None
        if x is None or shape is None or src is None:
            return None
        if name in ("getitem", "__getitem__", "index"):
            index = args[1] if name != "index" else args[1]
            index = index if isinstance(index, (tuple, list)) else (index,)
            if any(isinstance(e, fx.Node) for e in index):
                return self._gather(x, src, index, shape)
            return self._basic_index(x, src, index, shape)
        # expand / view / unsqueeze / squeeze: only size-1 axes added, dropped or broadcast
        core_src = [d for d in src if d != 1]
        core_out = [d for d in shape if d != 1]
        if name in ("expand", "expand_as", "broadcast_to"):
            if len(shape) < len(src) or any(s != 1 and sympy.simplify(s - o) != 0
                                            for s, o in zip(reversed(src), reversed(shape))):
                return None
            return self._rebuild(x, src, shape, list(range(len(src))), len(shape) - len(src))
        if len(core_src) != len(core_out) or any(sympy.simplify(a - b) != 0 for a, b in zip(core_src, core_out)):
            return None
        # map the non-unit axes in order
        src_axes = [k for k, d in enumerate(src) if d != 1]
        out_axes = [k for k, d in enumerate(shape) if d != 1]
        return self._remap(x, src, shape, dict(zip(src_axes, out_axes)))

    def _rebuild(self, x, src, shape, axes, offset):
        return self._remap(x, src, shape, {k: k + offset for k in axes if src[k] != 1})

    def _remap(self, x, src, shape, axis_map):
        """x's value with its axis k read as the result's axis axis_map[k]."""
        subs = {_var(k - len(src)): _var(j - len(shape)) for k, j in axis_map.items()}
        return self._substitute(x, subs, shape)

    def _basic_index(self, x, src, index, shape):
        """``x[None, :, 0:1]``-style indexing: new unit axes and slices with a non-negative
        start and step 1 (the result's shape is the node's)."""
        if index.count(Ellipsis) > 1:
            return None
        expanded = []
        for e in index:
            if e is Ellipsis:
                n_used = sum(1 for f in index if f is not None and f is not Ellipsis)
                expanded += [slice(None)] * (len(src) - n_used)
            else:
                expanded.append(e)
        k, out, subs = 0, 0, {}
        for e in expanded:
            if e is None:
                out += 1
                continue
            if not isinstance(e, slice) or e.step not in (None, 1) or not (e.start is None or (
                    isinstance(e.start, int) and e.start >= 0)) or isinstance(e.stop, fx.Node):
                return None
            if k >= len(src) or out >= len(shape):
                return None
            subs[_var(k - len(src))] = _var(out - len(shape)) + (e.start or 0)
            k, out = k + 1, out + 1
        while k < len(src):
            subs[_var(k - len(src))] = _var(out - len(shape))
            k, out = k + 1, out + 1
        if out != len(shape):
            return None
        return self._substitute(x, subs, shape)

    def _substitute(self, x, subs, shape):
        if isinstance(x, IntFn):
            return _int(x.expr.subs(subs, simultaneous=True), shape)
        if isinstance(x, BoolFn):
            return _bool(tuple(e.subs(subs, simultaneous=True) for e in x.ge),
                         tuple(e.subs(subs, simultaneous=True) for e in x.eq), shape)
        if isinstance(x, Additive):
            return Additive(self._substitute(x.keep, subs, shape), x.fill, shape)
        if isinstance(x, tuple) and x[0] == "zero":
            return ("zero", shape)
        return None

    def _gather(self, x, src, index, shape):
        """``x[(i0, i1, ...)]`` with an integer index tensor for every axis of x."""
        if len(index) != len(src) or not isinstance(x, (IntFn, BoolFn)):
            return None
        subs = {}
        for k, e in enumerate(index):
            ix = self._get(e)
            if not isinstance(ix, IntFn) or not _always(ix.expr, ix.shape):
                return None     # (a negative index reads from the end)
            off = len(shape) - len(ix.shape)
            ix_expr = ix.expr.subs({_var(j - len(ix.shape)): _var(j + off - len(shape))
                                    for j in range(len(ix.shape))}, simultaneous=True)
            subs[_var(k - len(src))] = ix_expr
        return self._substitute(x, subs, shape)

    def _diff(self, args, kw, shape):
        """``torch.diff(x, dim=-1, prepend=p)`` of an affine x with a constant step c along
        the axis, and ``x[0] - p == c``: c everywhere."""
        x = self._get(args[0]) if args else None
        dim = kw.get("dim", -1)
        p = self._get(kw.get("prepend")) if "prepend" in kw else None
        src = _shape(args[0]) if args else None
        if len(args) != 1 or not isinstance(x, IntFn) or not isinstance(p, IntFn) \
                or dim not in (-1, len(src) - 1) or kw.get("append") is not None or kw.get("n", 1) != 1 \
                or (_shape(kw.get("prepend")) or (None,))[-1] != 1:
            return None
        v = _var(-1)
        step = sympy.expand(x.expr - x.expr.subs(v, v - 1))
        first = sympy.expand(x.expr.subs(v, 0) - p.expr.subs(v, 0))
        if _index_vars(step) or sympy.expand(step - first) != 0:
            return None
        return _int(step, shape)


def _writes(node) -> bool:
    """An in-place call: its operand (and what views it) changes."""
    from .frontends.fx import _mutates
    return _mutates(node)


def _view_chain(node) -> set:
    """A written operand and the tensors it is a view of (first arguments, up to an input)."""
    out = set()
    while isinstance(node, fx.Node) and node not in out:
        out.add(node)
        if node.op in ("placeholder", "get_attr") or not node.args:
            break
        node = node.args[0]
    return out


def mask_facts(gm: fx.GraphModule, written=()) -> dict:
    """fx node -> the guards (``causal``, ``zeros``) its value passes for every size."""
    analysis = MaskAnalysis(gm, written)
    out = {}
    for node in analysis.values:
        try:
            g = analysis.guards(node)
        except Exception:  # noqa: BLE001  (an expression sympy cannot decide: nothing proved)
            g = set()
        if g:
            out[node] = g
    return out


__all__ = ["MaskAnalysis", "mask_facts", "classify", "IntFn", "BoolFn", "Additive"]
