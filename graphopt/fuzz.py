"""A differential fuzzer's model generator and case runner (issue 15, item 4).

:func:`make_case` builds a random small model from ``(seed, index)`` alone: Python source
of an ``nn.Module`` written with the torch calls the op registry spells (attention chains
with random scales and masks, transposes, permutes, reshapes, grouped-query repeats,
elementwise chains, concats and splits, linear layers, layer norms), random shapes with
size-1 and odd sizes, and mostly float32 with some bfloat16.  :func:`run_case` runs it
eagerly, through :func:`graphopt.optimize` and through ``torch.compile(backend="graphopt")``,
on the example inputs and on a second input set of the same shapes that the optimizer did
not see, and classifies the case:

* ``equal``: every output equals eager's within the dtype's tolerance;
* ``wrong``: an output differs from eager's (a bug);
* ``crash``: an exception escaped graphopt that is not a :class:`GraphoptError` (a bug);
* ``caught``: equal, but the report records a fallback (a rewrite the safety net refused);
* ``rejected``: graphopt raised a :class:`GraphoptError` (the model was refused).

The CLI is ``benchmarks/fuzz_differential.py``; the seeded CI run is ``tests/test_fuzz.py``.
"""
from __future__ import annotations

import linecache
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from .errors import GraphoptError

#: sizes drawn for dimensions: size 1 and odd sizes are the interesting ones
SIZES = (1, 1, 2, 3, 4, 5, 7, 8, 13)
HEAD_DIMS = (1, 2, 3, 4, 5, 8, 16)
#: graphopt options per case: small budgets keep a case well under a second
OPTIONS = {"budget": 10, "time_limit": 0.3}
#: the comparison's tolerances (rtol, atol), as graphopt.verify.TOLERANCES
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 1e-2), torch.float16: (1e-2, 1e-3),
              torch.float64: (1e-7, 1e-9)}

_HEADER = """import math
import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    def __init__(self):
        super().__init__()
"""


@dataclass
class InputSpec:
    name: str
    shape: tuple
    kind: str = "randn"    # randn | mask01 (int64 0/1 key-padding mask) | bool
    scale: float = 1.0


@dataclass
class Case:
    """One generated model: its source, inputs and what it exercises."""

    seed: int
    index: int
    dtype: torch.dtype
    init: list = field(default_factory=list)
    body: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    tags: list = field(default_factory=list)

    @property
    def source(self) -> str:
        init = "".join(f"        {line}\n" for line in self.init) or "        pass\n"
        args = ", ".join(["self"] + [s.name for s in self.inputs])
        body = "".join(f"        {line}\n" for line in self.body)
        outs = self.outputs[0] if len(self.outputs) == 1 else "(" + ", ".join(self.outputs) + ",)"
        return f"{_HEADER}{init}\n    def forward({args}):\n{body}        return {outs}\n"

    @property
    def repro(self) -> str:
        return f"python benchmarks/fuzz_differential.py --seed {self.seed} --only {self.index} --show"

    def build(self) -> torch.nn.Module:
        """The model, its weights drawn from (seed, index) alone, in eval mode."""
        filename = f"<graphopt-fuzz {self.seed}/{self.index}>"
        src = self.source
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        namespace: dict = {"__name__": f"graphopt_fuzz_{self.seed}_{self.index}"}
        exec(compile(src, filename, "exec"), namespace)  # noqa: S102  (our own generated source)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(_mix(self.seed, self.index, 7))
            model = namespace["Model"]()
        finally:
            torch.random.set_rng_state(state)
        return model.to(self.dtype).eval()

    def make_inputs(self, draw: int) -> tuple:
        """Input set ``draw`` (0: the example inputs the optimizer sees; 1, 2, ...: fresh)."""
        g = torch.Generator().manual_seed(_mix(self.seed, self.index, 100 + draw))
        out = []
        for s in self.inputs:
            if s.kind == "mask01":
                if draw == 0 and _mix(self.seed, self.index, 5) % 2 == 0:
                    t = torch.ones(s.shape, dtype=torch.int64)   # the usual all-ones example
                else:
                    t = (torch.rand(s.shape, generator=g) < 0.7).to(torch.int64)
                    t[..., 0] = 1    # every row keeps a key
            elif s.kind == "bool":
                t = torch.rand(s.shape, generator=g) < 0.7
                t[..., 0] = True
            else:
                t = (torch.randn(s.shape, generator=g) * s.scale).to(self.dtype)
            out.append(t)
        return tuple(out)


def _mix(*xs) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFF


class _Builder:
    """Emits the source lines of one model, keeping the shape of every value."""

    def __init__(self, case: Case, rng: random.Random):
        self.case, self.rng = case, rng
        self.n = 0
        self.shapes: dict = {}
        self.bound: dict = {}      # a rough bound of |value|, to keep exp and powers finite

    def fresh(self, prefix="t") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def tag(self, *tags) -> None:
        for t in tags:
            if t not in self.case.tags:
                self.case.tags.append(t)

    def input(self, shape, kind="randn", scale=1.0, prefix="x") -> str:
        name = self.fresh(prefix)
        self.case.inputs.append(InputSpec(name, tuple(shape), kind, scale))
        self.shapes[name], self.bound[name] = tuple(shape), 4.0 * scale
        return name

    def emit(self, expr, shape, bound=None, prefix="t") -> str:
        name = self.fresh(prefix)
        self.case.body.append(f"{name} = {expr}")
        self.shapes[name] = tuple(shape)
        self.bound[name] = bound if bound is not None else 10.0
        return name

    def stmt(self, line) -> None:
        self.case.body.append(line)

    def module(self, expr, prefix="m") -> str:
        name = self.fresh(prefix)
        self.case.init.append(f"self.{name} = {expr}")
        return f"self.{name}"

    def buffer(self, expr, prefix="b") -> str:
        name = self.fresh(prefix)
        self.case.init.append(f"self.register_buffer({name!r}, {expr}, persistent=False)")
        return f"self.{name}"

    def linear(self, x, out, bias=None) -> str:
        shape = self.shapes[x]
        bias = self.rng.random() < 0.5 if bias is None else bias
        lin = self.module(f"nn.Linear({shape[-1]}, {out}, bias={bias})", "lin")
        self.tag("linear-bias" if bias else "linear")
        return self.emit(f"{lin}({x})", shape[:-1] + (out,), bound=3.0 + self.bound[x])


def _lit(v: float) -> str:
    return repr(float(v))


# ---------------------------------------------------------------- elementwise

def _unary(b: _Builder, x: str) -> str:
    r, shape, bd = b.rng, b.shapes[x], b.bound[x]
    if bd > 50:
        b.tag("tanh")
        return b.emit(f"torch.tanh({x})", shape, 1.0)
    c = r.choice([0.5, 2.0, 3.0, -1.5, 0.125, 1.0, 0.7071067811865476, 10.0])
    choices = ["tanh", "mtanh", "relu", "Frelu", "neg", "mneg", "smul", "rmul", "sdiv", "sadd", "radd",
               "sq", "cube", "gelu_new", "gelu_new2", "Fgelu_tanh", "Fgelu", "sigmoid", "silu", "sub"]
    if bd <= 4:
        choices += ["exp", "mexp"]
    op = r.choice(choices)
    b.tag(op)
    table = {
        "tanh": (f"torch.tanh({x})", 1.0), "mtanh": (f"{x}.tanh()", 1.0),
        "relu": (f"torch.relu({x})", bd), "Frelu": (f"F.relu({x})", bd),
        "neg": (f"-{x}", bd), "mneg": (f"torch.neg({x})", bd),
        "smul": (f"{x} * {_lit(c)}", bd * abs(c)), "rmul": (f"{_lit(c)} * {x}", bd * abs(c)),
        "sdiv": (f"{x} / {_lit(c)}", bd / abs(c)), "sadd": (f"{x} + {_lit(c)}", bd + abs(c)),
        "radd": (f"{_lit(c)} + {x}", bd + abs(c)), "sub": (f"{x} - {_lit(c)}", bd + abs(c)),
        "sq": (f"{x} ** 2", bd * bd), "cube": (f"torch.pow({x}, 3)", bd ** 3),
        "gelu_new": (f"0.5 * {x} * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * ({x} + 0.044715 * "
                     f"torch.pow({x}, 3.0))))", bd),
        "gelu_new2": (f"{x} * 0.5 * (1.0 + torch.tanh(0.7978845608028654 * ({x} + 0.044715 * {x} ** 3)))", bd),
        "Fgelu_tanh": (f"F.gelu({x}, approximate='tanh')", bd), "Fgelu": (f"F.gelu({x})", bd),
        "sigmoid": (f"torch.sigmoid({x})", 1.0), "silu": (f"F.silu({x})", bd),
        "exp": (f"torch.exp({x})", math.exp(bd)), "mexp": (f"{x}.exp()", math.exp(bd)),
    }
    expr, nb = table[op]
    return b.emit(expr, shape, nb)


def _binary(b: _Builder, x: str, y: str) -> str:
    op = b.rng.choice(["add", "tadd", "mul", "tmul", "sub"])
    b.tag("bin-" + op)
    expr = {"add": f"{x} + {y}", "tadd": f"torch.add({x}, {y})", "mul": f"{x} * {y}",
            "tmul": f"torch.mul({x}, {y})", "sub": f"{x} - {y}"}[op]
    bx, by = b.bound[x], b.bound[y]
    return b.emit(expr, b.shapes[x], bx * by if "mul" in op else bx + by)


def _norm(b: _Builder, x: str) -> str:
    shape, r = b.shapes[x], b.rng
    d = shape[-1]
    kind = r.choice(["ln", "Fln", "rms"])
    b.tag(kind)
    if kind == "ln":
        ln = b.module(f"nn.LayerNorm({d})", "ln")
        return b.emit(f"{ln}({x})", shape, 4.0)
    if kind == "Fln":
        return b.emit(f"F.layer_norm({x}, ({d},))", shape, 4.0)
    w = b.module(f"nn.Parameter(torch.randn({d}) * 0.1 + 1.0)", "w")
    return b.emit(f"{x} * torch.rsqrt({x}.pow(2).mean(-1, keepdim=True) + 1e-6) * {w}", shape, 4.0)


def _chain(b: _Builder, x: str, n: int) -> str:
    for _ in range(n):
        x = _unary(b, x)
    return x


# ---------------------------------------------------------------- attention

def _divisors(n):
    return [g for g in range(1, n + 1) if n % g == 0]


def _heads(b: _Builder, x: str, B, T, H, d, style) -> str:
    """(B, T, H*d) -> (B, H, T, d)."""
    r = b.rng
    view = r.choice(["view", "reshape", "view-1"])
    if view == "view":
        y = b.emit(f"{x}.view({B}, {T}, {H}, {d})", (B, T, H, d))
    elif view == "reshape":
        y = b.emit(f"{x}.reshape({B}, {T}, {H}, {d})", (B, T, H, d))
    else:
        y = b.emit(f"{x}.view({B}, {T}, -1, {d})", (B, T, H, d))
    if style == "permute":
        b.tag("permute")
        return b.emit(f"{y}.permute(0, 2, 1, 3)", (B, H, T, d))
    return b.emit(f"{y}.transpose(1, 2)", (B, H, T, d))


def _repeat(b: _Builder, k: str, H: int) -> str:
    B, G, S, d = b.shapes[k]
    rep = H // G
    way = b.rng.choice(["none-index", "none-ellipsis", "unsqueeze", "repeat_interleave", "none-short"])
    b.tag("gqa-" + way)
    if way == "repeat_interleave":
        return b.emit(f"torch.repeat_interleave({k}, {rep}, dim=1)", (B, H, S, d))
    if way == "none-index":
        e = b.emit(f"{k}[:, :, None, :, :].expand({B}, {G}, {rep}, {S}, {d})", (B, G, rep, S, d))
    elif way == "none-short":
        e = b.emit(f"{k}[:, :, None].expand({B}, {G}, {rep}, {S}, {d})", (B, G, rep, S, d))
    elif way == "none-ellipsis":
        e = b.emit(f"{k}[..., None, :, :].expand({B}, {G}, {rep}, {S}, {d})", (B, G, rep, S, d))
    else:
        e = b.emit(f"{k}.unsqueeze(2).expand({B}, {G}, {rep}, {S}, {d})", (B, G, rep, S, d))
    return b.emit(f"{e}.reshape({B}, {H}, {S}, {d})", (B, H, S, d))


def _scale_value(r: random.Random, d: int):
    """(value, how it is written, multiply?)."""
    kind = r.choice(["inv-sqrt", "inv-sqrt", "sqrt-div", "random", "one", "eighth", "tensor", "input"])
    if kind == "inv-sqrt":
        return (f"{_lit(1 / math.sqrt(d))}" if r.random() < 0.5 else f"(1.0 / math.sqrt({d}))"), True, kind
    if kind == "sqrt-div":
        return (f"math.sqrt({d})" if r.random() < 0.5 else _lit(math.sqrt(d))), False, kind
    if kind == "random":
        return _lit(round(r.uniform(0.05, 2.5), 4)), r.random() < 0.5, kind
    if kind == "one":
        return "1.0", r.random() < 0.5, kind
    if kind == "eighth":
        return "0.125", True, kind
    return _lit(round(r.uniform(0.1, 1.0), 3)), r.random() < 0.5, kind   # tensor / input


def gen_attention(b: _Builder) -> None:
    r = b.rng
    case = b.case
    B = r.choice((1, 1, 2, 3))
    H = r.choice((1, 2, 2, 3, 4))
    G = H
    if H > 1 and r.random() < 0.4:
        G = r.choice([g for g in _divisors(H) if g < H])
    T = r.choice(SIZES)
    S = T if r.random() < 0.7 else r.choice(SIZES)
    d = r.choice(HEAD_DIMS)
    e = d if r.random() < 0.8 else r.choice((1, 3, 4, 8))
    source = r.choice(("inputs", "inputs-bthd", "proj", "proj", "proj-fused"))
    b.tag("attention", "src-" + source)
    if S != T:
        b.tag("cross")
    if G != H:
        b.tag("gqa")
    layers = 1
    residual = None
    if source == "inputs":
        q = b.input((B, H, T, d), prefix="q")
        k = b.input((B, G, S, d), prefix="k")
        v = b.input((B, G, S, e), prefix="v")
    elif source == "inputs-bthd":
        q = b.emit(f"{b.input((B, T, H, d), prefix='q')}.transpose(1, 2)", (B, H, T, d))
        k = b.emit(f"{b.input((B, S, G, d), prefix='k')}.transpose(1, 2)", (B, G, S, d))
        v = b.emit(f"{b.input((B, S, G, e), prefix='v')}.permute(0, 2, 1, 3)", (B, G, S, e))
    else:
        D = H * d if r.random() < 0.7 else r.choice((3, 5, 8, 16))
        x = b.input((B, T, D))
        if r.random() < 0.3:
            x = _norm(b, x)
        if S != T:
            mem = b.input((B, S, r.choice((2, 3, 8, D))), prefix="mem")
        else:
            mem = x
            if e == d and H * d == D and r.random() < 0.4:
                layers = 2
        residual = x if (H * e == D) else None
        style = r.choice(("transpose", "permute"))
        if source == "proj-fused" and mem == x:
            b.tag("fused-qkv")
            qkv = b.linear(x, (H + 2 * G) * d if e == d else H * d + G * d + G * e)
            q = b.emit(f"{qkv}[..., :{H * d}]", (B, T, H * d))
            k = b.emit(f"{qkv}[..., {H * d}:{(H + G) * d}]", (B, T, G * d))
            v = b.emit(f"{qkv}[..., {(H + G) * d}:]", (B, T, G * e))
            if r.random() < 0.5 and e == d and H == G:
                b.case.body[-3:] = []
                q, k, v = b.fresh("q"), b.fresh("k"), b.fresh("v")
                split = r.choice((f"{qkv}.split({H * d}, dim=2)", f"{qkv}.chunk(3, dim=-1)",
                                  f"torch.split({qkv}, [{H * d}, {H * d}, {H * d}], dim=-1)"))
                b.stmt(f"{q}, {k}, {v} = {split}")
                for t in (q, k, v):
                    b.shapes[t], b.bound[t] = (B, T, H * d), 10.0
            q = _heads(b, q, B, T, H, d, style)
            k = _heads(b, k, B, T, G, d, style)
            v = _heads(b, v, B, T, G, e, style)
        else:
            q = _heads(b, b.linear(x, H * d), B, T, H, d, style)
            k = _heads(b, b.linear(mem, G * d), B, S, G, d, style)
            v = _heads(b, b.linear(mem, G * e), B, S, G, e, style)
        x_in = x
    scale, multiply, scale_kind = _scale_value(r, d)
    where = r.choice(("scores", "scores", "scores", "q", "k", "none"))
    mask_kind = r.choice(("none", "none", "causal-inf", "causal-min", "causal-where", "causal-where-tensor",
                          "causal-masked_fill", "causal-slice", "zeros", "random-buffer", "input",
                          "keypad", "bool-input", "bottom-right", "query-pad", "full-buffer"))
    softmax_kind = r.choice(("torch", "F", "method", "method-dim", "dim3")
                            + (("upcast", "float") if case.dtype != torch.float32 else ()))
    out_probs = r.random() < 0.1
    wrong_axis = r.random() < 0.05 and T == S    # softmax over the queries: not attention
    if wrong_axis:
        b.tag("softmax-wrong-axis")
    dropout = r.choice((None, None, None, "F", "module"))
    post = r.choice(("merge", "merge", "raw", "contiguous"))
    b.tag("scale-" + scale_kind, "scale-at-" + where, "mask-" + mask_kind, "softmax-" + softmax_kind)
    if mask_kind == "causal-slice" and T > S:
        mask_kind = "causal-inf"
    mask_buf = None
    for layer in range(layers):
        if layer:
            q = _heads(b, b.linear(x_in, H * d), B, T, H, d, style)
            k = _heads(b, b.linear(x_in, G * d), B, S, G, d, style)
            v = _heads(b, b.linear(x_in, G * e), B, S, G, e, style)
        if G != H:
            k, v = _repeat(b, k, H), _repeat(b, v, H)
        op = "*" if multiply else "/"
        if where == "q":
            q = b.emit(f"{q} {op} {scale}", b.shapes[q])
        elif where == "k":
            k = b.emit(f"{k} {op} {scale}", b.shapes[k])
        kt = r.choice((f"{k}.transpose(-1, -2)", f"{k}.transpose(-2, -1)", f"{k}.transpose(2, 3)",
                       f"{k}.permute(0, 1, 3, 2)", f"torch.transpose({k}, 2, 3)"))
        mm = r.choice(("@", "matmul"))
        expr = f"{q} @ {kt}" if mm == "@" else f"torch.matmul({q}, {kt})"
        a = b.emit(expr, (B, H, T, S), prefix="scores")
        if where == "scores":
            if scale_kind == "tensor":
                sb = b.buffer(f"torch.tensor({scale})", "scale")
                a = b.emit(f"{a} {op} {sb}", (B, H, T, S), prefix="scores")
            elif scale_kind == "input":
                sb = b.input((), scale=0.2, prefix="s")
                b.stmt(f"{sb}_ = {sb}.abs() + 0.1")
                a = b.emit(f"{a} {op} {sb}_", (B, H, T, S), prefix="scores")
            else:
                a = b.emit(f"{a} {op} {scale}", (B, H, T, S), prefix="scores")
        a = _mask(b, a, mask_kind, B, H, T, S, mask_buf)
        if wrong_axis:
            p = _softmax_dim(b, a, -2)
        else:
            p = _softmax(b, a, softmax_kind)
        if dropout == "F":
            p = b.emit(f"F.dropout({p}, p=0.1, training=False)", b.shapes[p])
        elif dropout == "module":
            drop = b.module("nn.Dropout(0.1)", "drop")
            p = b.emit(f"{drop}({p})", b.shapes[p])
        o = b.emit(f"{p} @ {v}" if r.random() < 0.6 else f"torch.matmul({p}, {v})", (B, H, T, e), prefix="o")
        if post == "raw" and layers == 1:
            out = o
        else:
            if post == "contiguous":
                t = b.emit(f"{o}.transpose(1, 2).contiguous()", (B, T, H, e))
                out = b.emit(f"{t}.view({B}, {T}, {H * e})", (B, T, H * e))
            else:
                t = b.emit(f"{o}.transpose(1, 2)", (B, T, H, e))
                out = b.emit(f"{t}.reshape({B}, {T}, -1)", (B, T, H * e))
            if r.random() < 0.5 or layers > 1:
                out = b.linear(out, H * e)
            if residual is not None and (r.random() < 0.5 or layers > 1):
                out = b.emit(f"{residual} + {out}", (B, T, H * e))
        x_in = residual = out
    if r.random() < 0.3:
        out = _chain(b, out, r.randint(1, 3))
    case.outputs.append(out)
    if out_probs:
        b.tag("probs-out")
        case.outputs.append(p)


def _mask(b: _Builder, a: str, kind: str, B, H, T, S, cache) -> str:
    r = b.rng
    shape = (B, H, T, S)
    if kind == "none":
        return a
    mshape = r.choice(((T, S), (1, 1, T, S), (1, T, S)))
    mstr = ", ".join(map(str, mshape))
    order = r.random() < 0.8     # scores + mask, else mask + scores
    add = (lambda m: f"{a} + {m}") if order else (lambda m: f"{m} + {a}")
    additive = {   # mask buffers added to the scores
        "causal-inf": f"torch.full(({T}, {S}), float('-inf')).triu(1).view({mstr})",
        "bottom-right": f"torch.full(({T}, {S}), float('-inf')).triu({S - T + 1}).view({mstr})",
        "causal-min": f"torch.full(({T}, {S}), torch.finfo(torch.{_dt(b)}).min).triu(1).view({mstr})",
        "zeros": f"torch.zeros({mstr})",
        "random-buffer": f"torch.randn({mstr})",
    }
    if kind in additive:
        return b.emit(add(b.buffer(additive[kind], "mask")), shape, prefix="scores")
    if kind == "causal-where":
        m = b.buffer(f"torch.ones({T}, {S}, dtype=torch.bool).tril().view({mstr})", "causal")
        return b.emit(f"torch.where({m}, {a}, torch.finfo({a}.dtype).min)", shape, prefix="scores")
    if kind == "causal-where-tensor":
        m = b.buffer(f"torch.ones({T}, {S}, dtype=torch.bool).tril().view({mstr})", "causal")
        fill = b.emit(f"torch.full([], torch.finfo({a}.dtype).min, dtype={a}.dtype, device={a}.device)", ())
        return b.emit(f"torch.where({m}, {a}, {fill})", shape, prefix="scores")
    if kind == "causal-masked_fill":
        m = b.buffer(f"torch.ones({T}, {S}, dtype=torch.bool).triu(1).view({mstr})", "causal")
        fill = r.choice(("float('-inf')", f"torch.finfo({a}.dtype).min"))
        return b.emit(f"{a}.masked_fill({m}, {fill})", shape, prefix="scores")
    if kind == "causal-slice":
        n = max(T, S) + r.choice((0, 3))
        m = b.buffer(f"torch.tril(torch.ones({n}, {n}, dtype=torch.bool)).view(1, 1, {n}, {n})", "bias")
        sl = b.emit(f"{m}[:, :, {S - T}:{S}, :{S}]", (1, 1, T, S))
        return b.emit(f"torch.where({sl}, {a}, torch.finfo({a}.dtype).min)", shape, prefix="scores")
    if kind == "input":
        ishape = r.choice(((T, S), (1, 1, T, S), (B, 1, T, S), (B, H, T, S)))
        m = b.input(ishape, prefix="mask")
        return b.emit(add(m), shape, prefix="scores")
    if kind == "keypad":
        m = b.input((B, S), kind="mask01", prefix="attn_mask")
        ext = b.emit(f"{m}[:, None, None, :].to({a}.dtype)", (B, 1, 1, S))
        ext = b.emit(f"(1.0 - {ext}) * torch.finfo({a}.dtype).min", (B, 1, 1, S))
        return b.emit(add(ext), shape, prefix="scores")
    if kind == "query-pad":
        m = b.buffer(f"torch.where(torch.rand({T}, 1) < 0.7, 0.0, -1e4).view({T}, 1)", "mask")
        return b.emit(add(m), shape, prefix="scores")
    if kind == "full-buffer":
        m = b.buffer(f"torch.randn({B}, {H}, {T}, {S})", "mask")
        return b.emit(add(m), shape, prefix="scores")
    if kind == "bool-input":
        m = b.input((B, 1, T, S), kind="bool", prefix="keep")
        return b.emit(f"torch.where({m}, {a}, torch.finfo({a}.dtype).min)", shape, prefix="scores")
    raise AssertionError(kind)


def _dt(b: _Builder) -> str:
    return str(b.case.dtype).replace("torch.", "")


def _softmax(b: _Builder, a: str, kind: str) -> str:
    shape = b.shapes[a]
    expr = {"torch": f"torch.softmax({a}, -1)", "F": f"F.softmax({a}, dim=-1)",
            "method": f"{a}.softmax(-1)", "method-dim": f"{a}.softmax(dim=-1)", "dim3": f"torch.softmax({a}, dim=3)",
            "upcast": f"F.softmax({a}, dim=-1, dtype=torch.float32).to({a}.dtype)",
            "float": f"torch.softmax({a}.float(), dim=-1).type_as({a})"}[kind]
    return b.emit(expr, shape, 1.0, prefix="p")


# ---------------------------------------------------------------- graphs of layout ops

def _rand_shape(r: random.Random, rank=None) -> tuple:
    rank = rank or r.choice((2, 3, 3, 4))
    while True:
        shape = tuple(r.choice(SIZES) for _ in range(rank))
        if math.prod(shape) <= 1200:
            return shape


def gen_mix(b: _Builder) -> None:
    """A random DAG of registry ops over a pool of values."""
    r = b.rng
    b.tag("mix")
    pool = [b.input(_rand_shape(r))]
    if r.random() < 0.5:
        s = b.shapes[pool[0]]
        pool.append(b.input(s if r.random() < 0.6 else _rand_shape(r)))
    used: set = set()
    steps = r.randint(2, 9)
    for _ in range(steps):
        x = r.choice(pool)
        shape = b.shapes[x]
        rank = len(shape)
        kind = r.choice(("unary", "unary", "binary", "linear", "linears", "matmul", "transpose", "permute",
                         "reshape", "cat", "split", "sum", "softmax", "norm", "bias", "inplace", "copy"))
        if rank < 2 and kind in ("matmul", "transpose", "permute"):
            kind = "unary"
        new: list = []
        if kind == "unary":
            new = [_unary(b, x)]
        elif kind == "binary":
            same = [y for y in pool if b.shapes[y] == shape]
            new = [_binary(b, x, r.choice(same))]
        elif kind == "linear":
            new = [b.linear(x, r.choice(SIZES))]
        elif kind == "linears":
            b.tag("multi-linear")
            n = r.choice((2, 2, 3))
            outs = [b.linear(x, r.choice(SIZES) if r.random() < 0.5 else shape[-1]) for _ in range(n)]
            combine = r.choice(("keep", "add", "cat", "gate"))
            sizes = {b.shapes[o][-1] for o in outs}
            if combine == "add" and len(sizes) == 1:
                y = outs[0]
                for o in outs[1:]:
                    y = b.emit(f"{y} + {o}", b.shapes[o])
                new = [y]
            elif combine == "gate" and len(sizes) == 1:
                g = b.emit(r.choice((f"F.silu({outs[0]})", f"torch.relu({outs[0]})", f"torch.tanh({outs[0]})")),
                           b.shapes[outs[0]])
                new = [b.emit(f"{g} * {outs[1]}", b.shapes[outs[1]])]
            elif combine == "cat" and len(outs) == 2:
                s0, s1 = b.shapes[outs[0]], b.shapes[outs[1]]
                new = [b.emit(f"torch.cat([{outs[0]}, {outs[1]}], dim=-1)", s0[:-1] + (s0[-1] + s1[-1],))]
            else:
                new = outs
        elif kind == "matmul":
            b.tag("matmul")
            partners = [y for y in pool if len(b.shapes[y]) == rank and b.shapes[y][:-2] == shape[:-2]
                        and b.shapes[y][-2] == shape[-1]]
            how = r.choice(("gram", "param", "pool"))
            if how == "pool" and partners:
                y = r.choice(partners)
                new = [b.emit(f"{x} @ {y}", shape[:-1] + (b.shapes[y][-1],), b.bound[x] * b.bound[y] * shape[-1])]
            elif how == "gram":
                new = [b.emit(f"torch.matmul({x}, {x}.transpose(-1, -2))", shape[:-1] + (shape[-2],),
                              b.bound[x] ** 2 * shape[-1])]
            else:
                n = r.choice(SIZES)
                w = b.module(f"nn.Parameter(torch.randn({shape[-1]}, {n}) / {math.sqrt(shape[-1]):.4f})", "w")
                new = [b.emit(f"{x} @ {w}", shape[:-1] + (n,), b.bound[x] * 4)]
        elif kind == "transpose":
            i, j = r.sample(range(rank), 2)
            s = list(shape)
            s[i], s[j] = s[j], s[i]
            b.tag("transpose")
            neg = r.random() < 0.5
            new = [b.emit(f"{x}.transpose({i - rank if neg else i}, {j - rank if neg else j})", tuple(s), b.bound[x])]
        elif kind == "permute" and rank >= 3:
            perm = list(range(rank))
            r.shuffle(perm)
            b.tag("permute")
            new = [b.emit(f"{x}.permute({', '.join(map(str, perm))})", tuple(shape[p] for p in perm), b.bound[x])]
        elif kind == "reshape":
            b.tag("reshape")
            if rank >= 2 and r.random() < 0.5:
                s = shape[:-2] + (shape[-2] * shape[-1],)
                meth = r.choice(("reshape", "view")) if x in b.case.outputs or True else "reshape"
                new = [b.emit(f"{x}.contiguous().{meth}({', '.join(map(str, s))})" if meth == "view"
                              else f"{x}.reshape({', '.join(map(str, s))})", s, b.bound[x])]
            else:
                last = shape[-1]
                f = [k for k in range(2, last) if last % k == 0]
                if f and rank < 4:
                    k = r.choice(f)
                    s = shape[:-1] + (k, last // k)
                    new = [b.emit(f"{x}.reshape({', '.join(map(str, shape[:-1] + (k, -1)))})", s, b.bound[x])]
                else:
                    s = shape[:-1] + (1, last) if rank < 4 else (math.prod(shape[:2]),) + shape[2:]
                    new = [b.emit(f"{x}.reshape({', '.join(map(str, s))})", s, b.bound[x])]
        elif kind == "cat":
            b.tag("cat")
            dim = r.randrange(rank)
            partners = [y for y in pool if len(b.shapes[y]) == rank and all(
                a == c for k, (a, c) in enumerate(zip(b.shapes[y], shape)) if k != dim)]
            y = r.choice(partners)
            s = list(shape)
            s[dim] += b.shapes[y][dim]
            d = dim - rank if r.random() < 0.5 else dim
            fn = r.choice(("torch.cat", "torch.concat"))
            new = [b.emit(f"{fn}([{x}, {y}], dim={d})", tuple(s), max(b.bound[x], b.bound[y]))]
        elif kind == "split":
            dims = [k for k in range(rank) if shape[k] >= 2]
            if dims:
                b.tag("split")
                dim = r.choice(dims)
                n = shape[dim]
                left = r.randint(1, n - 1)
                how = r.choice(("sizes", "chunk", "even"))
                d = dim - rank if r.random() < 0.5 else dim
                p, q = b.fresh("part"), b.fresh("part")
                if how == "chunk":
                    left = (n + 1) // 2
                    b.stmt(f"{p}, {q} = {x}.chunk(2, dim={d})")
                elif how == "even":
                    left = (n + 1) // 2
                    b.stmt(f"{p}, {q} = torch.split({x}, {left}, dim={d})")
                else:
                    b.stmt(f"{p}, {q} = {x}.split([{left}, {n - left}], {d})")
                s1, s2 = list(shape), list(shape)
                s1[dim], s2[dim] = left, n - left
                b.shapes[p], b.shapes[q] = tuple(s1), tuple(s2)
                b.bound[p] = b.bound[q] = b.bound[x]
                new = [p, q]
        elif kind == "sum":
            b.tag("sum")
            dim = r.randrange(rank)
            keep = r.random() < 0.5
            s = shape[:dim] + ((1,) if keep else ()) + shape[dim + 1:]
            if not s:
                continue
            new = [b.emit(f"{x}.sum({dim - rank}, keepdim={keep})" if r.random() < 0.5
                          else f"torch.sum({x}, dim={dim}, keepdim={keep})", s, b.bound[x] * shape[dim])]
        elif kind == "softmax":
            b.tag("softmax")
            dim = r.randrange(rank) - rank
            new = [_softmax_dim(b, x, dim)]
        elif kind == "norm":
            new = [_norm(b, x)]
        elif kind == "inplace":
            inputs = [s.name for s in b.case.inputs]
            cands = [y for y in pool if y not in inputs]
            if cands:
                y = r.choice(cands)
                same = [z for z in pool if b.shapes[z] == b.shapes[y] and z != y]
                how = r.choice(("mul_", "add_", "iadd", "imul", "tanh_", "relu_", "add_t") + (("iadd_t",) if same else ()))
                b.tag("inplace-" + how)
                line = {"mul_": f"{y}.mul_(2.0)", "add_": f"{y}.add_(1.0)", "iadd": f"{y} += 0.5",
                        "imul": f"{y} *= -1.5", "tanh_": f"{y}.tanh_()", "relu_": f"{y}.relu_()",
                        "add_t": f"{y}.add_({y})", "iadd_t": f"{y} += {same[0] if same else y}"}[how]
                b.stmt(line)
                b.bound[y] = b.bound[y] * 2 + 2
                # the mutated value is read again, and its old readers must keep the old value
                new = [_unary(b, y)]
        elif kind == "copy":
            how = r.choice(("contiguous", "clone", "to", "float", "type_as", "detach"))
            b.tag("copy-" + how)
            expr = {"contiguous": f"{x}.contiguous()", "clone": f"{x}.clone()", "to": f"{x}.to(torch.{_dt(b)})",
                    "float": f"{x}.float()", "type_as": f"{x}.type_as({x})", "detach": f"{x}.detach()"}[how]
            new = [b.emit(expr, shape, b.bound[x])]
            if how == "float":   # a real cast in bfloat16: back to the model's dtype
                new = [b.emit(f"{new[0]}.to(torch.{_dt(b)})", shape, b.bound[x])]
        elif kind == "bias":
            b.tag("param-bias")
            w = b.module(f"nn.Parameter(torch.randn({shape[-1]}))", "p")
            new = [b.emit(r.choice((f"{x} + {w}", f"{w} + {x}", f"{x} * {w}")), shape, b.bound[x] * 4 + 4)]
        if new:
            used.add(x)
            pool.extend(new)
            if len(pool) > 6:
                pool = pool[-6:]
    fresh = [y for y in pool if y not in used and y not in [s.name for s in b.case.inputs]]
    outs = fresh[-3:] or [pool[-1]]
    if r.random() < 0.05:
        b.tag("duplicate-output")
        outs.append(outs[0])
    b.case.outputs.extend(outs)


def _softmax_dim(b: _Builder, x: str, dim: int) -> str:
    return b.emit(b.rng.choice((f"torch.softmax({x}, {dim})", f"{x}.softmax(dim={dim})",
                                f"F.softmax({x}, dim={dim})")), b.shapes[x], 1.0)


def gen_mlp(b: _Builder) -> None:
    """A transformer MLP: parallel projections of one input (merge rules), an activation
    written out, a down projection, a residual."""
    r = b.rng
    b.tag("mlp")
    B, T, D = r.choice((1, 2, 3)), r.choice(SIZES), r.choice((3, 4, 5, 8, 13, 16))
    Fd = r.choice((4, 5, 8, 13, 32))
    x = b.input((B, T, D))
    h = _norm(b, x) if r.random() < 0.5 else x
    kind = r.choice(("gelu", "swiglu", "geglu"))
    b.tag("mlp-" + kind)
    if kind == "gelu":
        u = b.linear(h, Fd)
        g = _unary(b, u) if r.random() < 0.3 else b.emit(
            f"0.5 * {u} * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * ({u} + 0.044715 * torch.pow({u}, 3.0))))",
            b.shapes[u])
    else:
        gate, up = b.linear(h, Fd), b.linear(h, Fd)
        act = f"F.silu({gate})" if kind == "swiglu" else f"F.gelu({gate}, approximate='tanh')"
        g = b.emit(f"{act} * {up}", b.shapes[up])
    out = b.linear(g, D)
    if r.random() < 0.7:
        out = b.emit(f"{x} + {out}", (B, T, D))
    b.case.outputs.append(out)


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the run with ``seed``: the same model and inputs every time."""
    r = random.Random(_mix(seed, index, 1))
    dtype = torch.bfloat16 if r.random() < 0.15 else torch.float32
    case = Case(seed, index, dtype)
    b = _Builder(case, r)
    kind = r.choices(("attention", "mix", "mlp"), weights=(0.5, 0.35, 0.15))[0]
    {"attention": gen_attention, "mix": gen_mix, "mlp": gen_mlp}[kind](b)
    case.tags.insert(0, str(dtype).replace("torch.", ""))
    return case


# ---------------------------------------------------------------- running a case

def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for z in x for y in _flat(z)]
    return [x]


def compare(expected, got) -> tuple:
    """``(ok, max |diff|, why)``: shapes and dtypes equal, NaNs and infinities at the same places
    with the same values, the rest within the dtype's tolerance relative to the largest finite
    magnitude of the expected output (graphopt's own rule, written independently)."""
    xs, ys = _flat(expected), _flat(got)
    if len(xs) != len(ys):
        return False, math.inf, f"{len(ys)} outputs instead of {len(xs)}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(xs, ys)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if x != y:
                return False, math.inf, f"output {i}: {y!r} != {x!r}"
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, math.inf, f"output {i}: {tuple(y.shape)} {y.dtype} != {tuple(x.shape)} {x.dtype}"
        a, c = x.detach().double(), y.detach().double()
        fa, fc = torch.isfinite(a), torch.isfinite(c)
        if not torch.equal(fa, fc):
            return False, math.inf, f"output {i}: non-finite values at other places ({int((~fa).sum())} vs {int((~fc).sum())})"
        nf = ~fa
        if nf.any() and not (torch.equal(torch.isnan(a[nf]), torch.isnan(c[nf]))
                             and torch.equal(a[nf].nan_to_num(0.0), c[nf].nan_to_num(0.0))):
            return False, math.inf, f"output {i}: different non-finite values"
        if not fa.any():
            continue
        diff = float((a[fa] - c[fa]).abs().max())
        worst = max(worst, diff)
        rtol, atol = TOLERANCES.get(x.dtype, TOLERANCES[torch.float32])
        scale = max(1.0, float(a[fa].abs().max()))
        if diff > (atol + rtol) * scale:
            return False, worst, f"output {i}: max |diff| {diff:.3g} > tolerance {(atol + rtol) * scale:.3g} ({x.dtype})"
    return True, worst, None


def _crash_text(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if "/graphopt/" in f.filename.replace("\\", "/")]
    where = f" at {mine[-1].filename.rsplit('/', 1)[-1]}:{mine[-1].lineno} ({mine[-1].name})" if mine else ""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}{where}"


def _unwrap(e: BaseException) -> BaseException:
    """The backend's own exception out of Dynamo's wrapper (BackendCompilerFailed)."""
    inner = getattr(e, "inner_exception", None)
    return inner if isinstance(inner, BaseException) else e


def _clone(xs) -> tuple:
    return tuple(x.clone() for x in xs)


def _reports_module():
    return sys.modules["graphopt.optimize"]


def run_case(case: Case, options: dict | None = None, paths=("optimize", "compile")) -> dict:
    """Run one case and classify it (see the module docstring)."""
    import graphopt  # noqa: F401  registers the backend
    options = dict(OPTIONS if options is None else options)
    res = {"seed": case.seed, "index": case.index, "tags": case.tags, "status": "equal", "problems": [],
           "fallbacks": [], "fused": {}, "max_diff": 0.0, "seconds": {}}
    start = time.perf_counter()
    try:
        model = case.build()
    except Exception as e:  # the generator's own mistake: say so loudly
        res.update(status="generator-error", problems=[f"build: {_crash_text(e)}"])
        return res
    inputs = [case.make_inputs(0), case.make_inputs(1)]
    with torch.no_grad():
        try:
            refs = [model(*_clone(x)) for x in inputs]
        except Exception as e:
            res.update(status="generator-error", problems=[f"eager: {_crash_text(e)}"])
            return res
    problems, crashes = res["problems"], []

    def check(path, which, got):
        ok, diff, why = compare(refs[which], got)
        res["max_diff"] = max(res["max_diff"], diff if math.isfinite(diff) else 0.0)
        if not ok:
            problems.append(f"{path} on {'example' if which == 0 else 'fresh'} inputs: {why}")

    def reports_of(rep):
        for g in rep.graphs:
            if g.fallback:
                res["fallbacks"].append(g.fallback)
        return rep.attention["fused"]

    for path in paths:
        t0 = time.perf_counter()
        torch._dynamo.reset()
        try:
            if path == "optimize":
                fast = graphopt.optimize(model, _clone(inputs[0]), **options)
                with torch.no_grad():
                    outs = [fast(*_clone(x)) for x in inputs]
                res["fused"][path] = reports_of(fast.report)
                del fast
            else:
                mod = _reports_module()
                mod.LAST_REPORTS.clear()
                compiled = torch.compile(model, backend="graphopt", options=options)
                with torch.no_grad():
                    outs = [compiled(*_clone(x)) for x in inputs]
                fused = 0
                for rep in list(mod.LAST_REPORTS):
                    fused += reports_of(rep)
                if not mod.LAST_REPORTS and any("captured no graph" in p for p in problems):
                    # a model without a single op (``return x2``): Dynamo has no graph to give,
                    # and graphopt.optimize refused it, both rightly
                    problems.append("compile: rejected (no graph captured either)")
                    res["status"] = "rejected"
                elif not mod.LAST_REPORTS:
                    problems.append("compile: the graphopt backend was never called")
                res["fused"][path] = fused
                del compiled
        except GraphoptError as e:
            problems.append(f"{path}: rejected ({e})")
            res["status"] = "rejected"
            continue
        except Exception as e:  # noqa: BLE001
            inner = _unwrap(e)
            if isinstance(inner, GraphoptError):
                problems.append(f"{path}: rejected ({inner})")
                res["status"] = "rejected"
                continue
            crashes.append(f"{path}: {_crash_text(inner)}")
            res["traceback"] = "".join(traceback.format_exception(type(inner), inner, inner.__traceback__))[-4000:]
            continue
        finally:
            res["seconds"][path] = round(time.perf_counter() - t0, 4)
        for which, got in enumerate(outs):
            check(path, which, got)
    # the model itself must be untouched
    with torch.no_grad():
        again = model(*_clone(inputs[0]))
    ok, _, why = compare(refs[0], again)
    if not ok:
        problems.append(f"the model changed after optimizing: {why}")
    torch._dynamo.reset()
    if crashes:
        res["status"] = "crash"
        problems[:0] = crashes
    elif any(not p.startswith(("optimize: rejected", "compile: rejected")) for p in problems):
        res["status"] = "wrong"
    elif res["status"] != "rejected" and res["fallbacks"]:
        res["status"] = "caught"
    res["seconds"]["total"] = round(time.perf_counter() - start, 4)
    return res


def setup_dynamo() -> None:
    """Dynamo's limits raised so that many small models never run eagerly by accident."""
    cfg = torch._dynamo.config
    for k in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, k):
            setattr(cfg, k, max(getattr(cfg, k), 4096))
    # an exception in a backend must reach us, not turn into a silent eager fallback
    if hasattr(cfg, "suppress_errors"):
        cfg.suppress_errors = False


__all__ = ["Case", "InputSpec", "OPTIONS", "compare", "make_case", "run_case", "setup_dynamo"]
