"""Verification of candidate rules: float tests and Z3 proofs.

Layer 1, the fingerprint, is exact but computed at one shape and can be fooled
by the surrogates of non-polynomial ops.  Layer 2 evaluates both sides with the
float64 reference semantics on several independent seeds and several shape
instantiations (different sizes for every shape symbol), with inputs drawn
from a symmetric distribution, so relu cuts both signs and no zeros hide a
difference.  Layer 3 applies where every op is algebraic: both sides are
evaluated on Z3 reals at a small shape and Z3 proves every output element
equal (or finds a counterexample) within a timeout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dims import evaluate_shape, shape_symbols
from .errors import NotAlgebraic, ShapeError
from .guards import get_guard
from .ir import OPAQUE, Graph, concrete_attrs
from .ops import get_op

# (rtol, atol) for comparing two computations of the same value in a dtype
TOLERANCES = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}

# sizes tried for shape symbols; distinct within an instantiation
_SIZES = (2, 3, 4, 5, 6, 7)


def graph_symbols(graph: Graph) -> list:
    out: list = []
    for inp in graph.inputs:
        for s in shape_symbols(inp.shape):
            if s not in out:
                out.append(s)
    return out


def instantiations(symbols, count: int, seed: int = 0, valid=None) -> list:
    """``count`` bindings of the symbols to sizes.

    Each binding gives every symbol a different size where possible.  The first
    is increasing in symbol order and the second decreasing, so every pair of
    symbols is tried in both size orders: a rule that holds only when ``d < c``
    (a split that is not at a concat boundary, say) fails one of them.  Later
    bindings are shuffled.  ``seed`` chooses the sizes.  ``valid(binding)`` (optional)
    skips bindings at which the rule does not type-check (grouped-query attention
    needs the query heads to be a multiple of the key/value heads).
    """
    rng = np.random.default_rng(seed + 7919)
    n = len(symbols)
    out: list = []
    k = 0
    while len(out) < count:
        if k > 1000:
            if out:
                break
            raise ValueError(f"no size binding of {symbols} type-checks the rule")
        sizes = sorted(int(x) for x in rng.choice(_SIZES, size=min(max(n, 1), len(_SIZES)), replace=False))
        if k % 3 == 1:
            sizes.reverse()
        elif k % 3 == 2:
            rng.shuffle(sizes)
        k += 1
        binding = {s: sizes[i % len(sizes)] for i, s in enumerate(symbols)}
        if valid is not None and not valid(binding):
            continue
        if binding not in out or not symbols:
            out.append(binding)
    return out


def random_inputs(graph: Graph, binding: dict, seed: int, dtype=np.float64, batch: int | None = None) -> dict:
    """Inputs of both signs and no zeros; scalars are kept away from 0 (they divide).
    With ``batch``, every tensor input gets an extra leading axis of that size."""
    rng = np.random.default_rng(seed)
    env = {}
    for inp in graph.inputs:
        shape = evaluate_shape(inp.shape, binding)
        if batch and shape:
            shape = (batch,) + shape
        if inp.guard:
            env[inp.name] = get_guard(inp.guard).sample(shape, rng).astype(dtype)
        elif shape == ():
            env[inp.name] = np.array(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0), dtype=dtype)
        else:
            env[inp.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
    return env


def close(a, b, dtype: str = "float64") -> bool:
    """Equal within the dtype's tolerance, relative to the magnitude of the values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return False
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(np.max(np.abs(a), initial=0.0)))
    return bool(np.all(np.abs(a - b) <= atol * scale + rtol * np.abs(b)))


@dataclass(frozen=True)
class FloatPlan:
    """The seeds and shape instantiations of a float test."""

    seeds: tuple = (1, 2, 3)
    shapes: int = 2
    shape_seed: int = 0
    # one more case with a leading batch axis on every tensor input: rules use negative
    # axes, so they must also hold on batched tensors (LLM activations are 3-D/4-D)
    batch: int = 3

    def cases(self, graph: Graph) -> list:
        """(binding, seed, batch) triples: seeds x shape instantiations, plus one batched case."""
        bindings = instantiations(graph_symbols(graph), self.shapes, self.shape_seed,
                                  valid=lambda b: typechecks(graph, b))
        out = [(b, s, None) for b in bindings for s in self.seeds]
        if self.batch and not _absolute_shapes(graph):
            out.append((bindings[-1], self.seeds[0] + 1000, self.batch))
        return out


def _absolute_shapes(graph: Graph) -> bool:
    """Whether the graph names whole shapes (a reshape's target): such a rule is stated, and
    matched, at its own rank only, so it has no batched case."""
    return any(get_op(n.op).attrs.get("shape") is not None for n in graph.nodes if n.op != OPAQUE)


def typechecks(graph: Graph, binding: dict) -> bool:
    """Whether every node's shape inference accepts the graph at these sizes (the graph
    rebuilt with concrete shapes, by the same ``Graph.add`` that validates any graph)."""
    g = Graph()
    try:
        for i in graph.inputs:
            g.add_input(i.name, evaluate_shape(i.shape, binding), i.dtype, i.guard)
        for node in graph.nodes:
            g.add(node.op, *node.inputs, **concrete_attrs(node.attrs, binding))
    except ShapeError:
        return False
    return True


def float_outputs(graph: Graph, cases) -> list:
    """Reference outputs of a graph for each (binding, seed, batch) case."""
    return [graph.evaluate(random_inputs(graph, b, s, batch=n), "ref", b) for b, s, n in cases]


def same_outputs(outs_a: list, outs_b: list, dtype: str = "float64") -> bool:
    return all(len(x) == len(y) and all(close(p, q, dtype) for p, q in zip(x, y))
               for x, y in zip(outs_a, outs_b))


def float_check(src: Graph, dst: Graph, plan: FloatPlan = FloatPlan()) -> bool:
    cases = plan.cases(src)
    return same_outputs(float_outputs(src, cases), float_outputs(dst, cases))


# -- the one verifier ---------------------------------------------------------------------

@dataclass
class Verdict:
    """What :func:`verify_rule` found: the evidence of a rule that holds, or why it does not."""

    passed: bool
    evidence: dict
    counterexample: str | None = None   # one line: where the two sides differ


def verify_rule(src: Graph, dst: Graph, plan: FloatPlan = FloatPlan(), *, z3: bool = True,
                z3_timeout_ms: int = 2000, fingerprint: bool = False, torch_dtypes=(),
                cache: dict | None = None) -> Verdict:
    """Turn a candidate rule ``src == dst`` into evidence: every layer the rule passes.

    The generator, the loader of text rules and ``graphopt rules verify`` all call this.

    Args:
        src, dst: the two sides (same inputs, outputs mapped by position).
        plan: the float test: seeds x shape instantiations (+ one batched case), float64.
        z3: also try a Z3 proof (rules of algebraic ops only; others get ``"not-algebraic"``).
        fingerprint: the candidate came from equal exact fingerprints (recorded, not recomputed).
        torch_dtypes: also run both sides' torch lowerings in these dtypes, each against the
            other and against the float64 reference, with the dtype's tolerance.
        cache: reuse float outputs of a graph tested before (keyed by ``id(graph)``).
    Returns:
        a :class:`Verdict`; ``evidence`` is what a rule stores (``fingerprint``, ``float``
        with its case count, ``z3``), ``counterexample`` says where a failing rule differs.

    Example:
        >>> v = verify_rule(src, dst)
        >>> v.passed, v.evidence["z3"]
        (True, 'proved')
    """
    if any(get_op(n.op).spmd for g in (src, dst) for n in g.nodes if n.op != OPAQUE):
        from .parallel.rules import verify_sharding    # a sharding rule: checked over all ranks
        return verify_sharding(src, dst)
    cases = plan.cases(src)
    outs = []
    for g in (src, dst):
        if cache is not None and id(g) in cache:
            outs.append(cache[id(g)])
            continue
        o = float_outputs(g, cases)
        if cache is not None:
            cache[id(g)] = o
        outs.append(o)
    evidence = {"fingerprint": bool(fingerprint), "float": {"passed": False, "cases": len(cases)},
                "z3": "skipped"}
    for (binding, seed, batch), a, b in zip(cases, *outs):
        if not same_outputs([a], [b]):
            return Verdict(False, evidence, _float_counterexample(a, b, binding, seed, batch))
    evidence["float"]["passed"] = True
    for dtype in torch_dtypes:
        why = _torch_check(src, dst, dtype, plan)
        if why:
            return Verdict(False, evidence, why)
    if z3:
        result, model = z3_check(src, dst, z3_timeout_ms, with_model=True)
        evidence["z3"] = result
        if result == "refuted":
            return Verdict(False, evidence, f"Z3 refutes it: {model}")
    return Verdict(True, evidence)


def _float_counterexample(a, b, binding, seed, batch) -> str:
    where = f"sizes {binding or '{}'}, input seed {seed}" + (f", batch axis {batch}" if batch else "")
    for k, (p, q) in enumerate(zip(a, b)):
        p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
        if p.shape != q.shape:
            return f"output {k} has shape {q.shape} on the right, {p.shape} on the left ({where})"
        if not close(p, q):
            with np.errstate(invalid="ignore"):
                d = np.abs(p - q)
            d = np.where(np.isnan(d), np.inf, d)
            i = np.unravel_index(int(np.argmax(d)), d.shape) if d.ndim else ()
            return (f"output {k} differs at {where}: left {float(p[i]):.6g}, right {float(q[i]):.6g} "
                    f"at index {tuple(int(x) for x in i)}")
    return f"outputs differ ({where})"


def _torch_check(src: Graph, dst: Graph, dtype: str, plan: FloatPlan) -> str | None:
    """Both torch lowerings in ``dtype`` agree with each other and with the reference."""
    import torch
    tdt = getattr(torch, dtype)
    for binding in instantiations(graph_symbols(src), 2, plan.shape_seed,
                                  valid=lambda b: typechecks(src, b)):
        src_fn, dst_fn = src.to_torch(binding), dst.to_torch(binding)
        env = random_inputs(src, binding, plan.seeds[0])
        expected = src.evaluate(env, "ref", binding)
        args = [torch.from_numpy(np.asarray(env[i.name])).to(tdt) for i in src.inputs]
        with torch.no_grad():
            a, b = src_fn(*args), dst_fn(*args)
        for x, y, ref in zip(a, b, expected):
            x, y = x.to(torch.float64).numpy(), y.to(torch.float64).numpy()
            if not close(x, y, dtype):
                return f"torch {dtype} outputs differ at sizes {binding}"
            if not close(x, ref, dtype):
                return f"torch {dtype} lowering disagrees with the reference at sizes {binding}"
    return None


# -- Z3 ---------------------------------------------------------------------------------

def z3_bindings(graph: Graph) -> list:
    """Small sizes, increasing then decreasing in symbol order (every pair both ways)."""
    syms = graph_symbols(graph)
    up = {s: 2 + i for i, s in enumerate(syms)}
    down = {s: 2 + len(syms) - 1 - i for i, s in enumerate(syms)}
    return [up] if up == down else [up, down]


def z3_check(src: Graph, dst: Graph, timeout_ms: int = 2000, with_model: bool = False):
    """Prove ``src == dst`` at small sizes, in both size orders of every pair of symbols.

    Returns:
        ``"proved"``, ``"refuted"``, ``"timeout"`` or ``"not-algebraic"`` (an op
        without exact algebraic semantics, e.g. relu or exp); with ``with_model``, a pair
        (result, a one-line counterexample or None).
    """
    results = [_z3_at(src, dst, b, timeout_ms) for b in z3_bindings(src)]
    for r in ("not-algebraic", "refuted", "timeout"):
        for res, model in results:
            if res == r:
                return (r, model) if with_model else r
    return ("proved", None) if with_model else "proved"


def _z3_at(src: Graph, dst: Graph, binding: dict, timeout_ms: int) -> str:
    import z3

    env, nonzero = {}, []
    for inp in src.inputs:
        shape = evaluate_shape(inp.shape, binding)
        n = int(np.prod(shape, dtype=np.int64))
        arr = np.empty(n, dtype=object)
        if inp.guard:   # a guarded input is the guard's value (zeros, eq:<number>), not any real
            fixed = np.asarray(get_guard(inp.guard).sample(shape, np.random.default_rng(0)), dtype=np.float64)
            if not np.all(np.isfinite(fixed)):
                return "not-algebraic", None
            for k, x in enumerate(fixed.reshape(-1)):
                arr[k] = z3.RealVal(repr(float(x)))
            env[inp.name] = arr.reshape(shape)
            continue
        for k in range(n):
            arr[k] = z3.Real(f"{inp.name}_{k}")
        env[inp.name] = arr.reshape(shape)
        if shape == ():
            nonzero.append(arr[0] != 0)  # scalars divide
    try:
        a = src.evaluate(env, "z3", binding)
        b = dst.evaluate(env, "z3", binding)
    except NotAlgebraic:
        return "not-algebraic", None
    return prove_equal(a, b, binding, timeout_ms, nonzero)


def prove_equal(a: list, b: list, binding: dict, timeout_ms: int, assumptions=()) -> tuple:
    """Z3 on two lists of outputs (arrays of Z3 terms): ``("proved" | "refuted" | "timeout",
    a one-line counterexample or None)``; ``assumptions`` are constraints on the inputs
    (scalars that divide are non-zero)."""
    import z3
    diffs = []
    for x, y in zip(a, b):
        if np.shape(x) != np.shape(y):
            return "refuted", f"output shapes {np.shape(x)} and {np.shape(y)} differ at sizes {binding}"
        for p, q in zip(np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)):
            d = z3.simplify(p - q, som=True)
            if not (z3.is_rational_value(d) and d.as_fraction() == 0):
                diffs.append(d)
    if not diffs:
        return "proved", None
    solver = z3.Solver()
    solver.set("timeout", timeout_ms)
    solver.add(*assumptions)
    solver.add(z3.Or([d != 0 for d in diffs]))
    result = solver.check()
    if result == z3.unsat:
        return "proved", None
    if result == z3.sat:
        m = solver.model()
        values = ", ".join(f"{d}={m[d]}" for d in sorted(m.decls(), key=str)[:8])
        return "refuted", f"at sizes {binding}, inputs {values}{', ...' if len(m.decls()) > 8 else ''}"
    return "timeout", None
