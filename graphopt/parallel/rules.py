"""The sharding rules (``substitutions/parallel.rules``): compiled, verified, read as strategies.

A sharding rule is a rule of graphopt's rule language (:mod:`graphopt.rulelang`) whose right
side uses the parallel ops (:mod:`graphopt.ops.parallel`).  It is verified by evaluating both
sides for every rank at once (arrays with a leading rank axis): per-rank inputs (those the
left side passes straight to a collective) get different random values on every rank, the
others the same value; outputs must be equal on every rank, in the float reference domain
(several seeds and sizes, float64 tolerances), in the fingerprint domain (exactly, modulo
the prime) and, where every op is algebraic, by a Z3 proof.  Rules are written for 2 ranks
and verified again with the world size rewritten to 4.

The planner reads a rule ``op(a, b) == C(op(T_a(a), T_b(b)))`` as a strategy for ``op``:
operand layouts from ``T`` (``shard`` -> S(axis), ``partial`` -> P, none -> R) or from the
left side's collectives, result layout from ``C`` (``all_gather`` -> S(axis), ``all_reduce``
-> P, none -> R).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..dims import evaluate_shape
from ..errors import NotAlgebraic, RuleFormatError
from ..ir import Graph, parse_ref
from ..ops import PRIME, get_op
from ..verify import TOLERANCES, close, graph_symbols, instantiations, prove_equal, typechecks
from .layouts import P, R, S, Layout

RULES_FILE = Path(__file__).resolve().parents[2] / "substitutions" / "parallel.rules"
COLLECTIVE_LAYOUT = {"all_gather": "S", "all_reduce": "P", "reduce_scatter": "S"}


@dataclass(frozen=True)
class Strategy:
    """How an op can run on split tensors: operand layouts -> result layout (one rule)."""

    rule: str
    op: str
    ins: tuple      # Layout per operand
    out: Layout
    reason: str = ""


def per_rank_inputs(graph: Graph) -> set:
    """Inputs the graph passes straight to a collective: values that differ between ranks."""
    out = set()
    for node in graph.nodes:
        if node.op in COLLECTIVE_LAYOUT:
            out |= {r for r in node.inputs if not r.startswith("%")}
    return out


def _stacked_env(rule, binding, world, draw) -> dict:
    per_rank = per_rank_inputs(rule.src) | per_rank_inputs(rule.dst)
    env = {}
    for inp in rule.src.inputs:
        shape = evaluate_shape(inp.shape, binding)
        if shape == ():
            env[inp.name] = draw(inp.name, (), 0)   # a scalar operand broadcasts over the ranks
        elif inp.name in per_rank:
            env[inp.name] = np.stack([draw(inp.name, shape, r) for r in range(world)])
        else:
            env[inp.name] = np.stack([draw(inp.name, shape, 0)] * world)
    return env


def _line_up_ranks(opdef, args: list) -> list:
    """Before a per-rank op, operands of lower rank get unit axes after the rank axis, so that
    numpy's broadcasting (from the last axis) lines the rank axes up."""
    if opdef.spmd:
        return args
    top = max(np.ndim(a) for a in args)
    return [a if np.ndim(a) in (0, top) else np.reshape(a, (a.shape[0],) + (1,) * (top - np.ndim(a)) + a.shape[1:])
            for a in args]


def evaluate_stacked(graph: Graph, env: dict, semantics: str, binding: dict) -> list:
    """Evaluate a graph for every rank at once: arrays carry a leading rank axis (0-d scalars
    do not: they are the same on every rank)."""
    return graph.evaluate(env, semantics, binding, prepare=_line_up_ranks)


def verify_parallel_rule(rule, world: int, seeds=(1, 2, 3), shapes: int = 2) -> tuple:
    """``(passed, evidence, counterexample)`` for one sharding rule (anything with ``src`` and
    ``dst`` graphs) at one world size."""
    cases = instantiations(graph_symbols(rule.src), shapes, 0, valid=lambda b: typechecks(rule.src, b))
    evidence = {"world": world, "float": 0, "fingerprint": False, "z3": "skipped"}
    for binding in cases:
        for seed in seeds:
            rng = np.random.default_rng(seed)
            cache = {}

            def draw(name, shape, r, cache=cache, rng=rng):
                if (name, r) not in cache:
                    cache[name, r] = np.array(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0)) if shape == () \
                        else rng.uniform(-1.0, 1.0, size=shape)
                return cache[name, r]
            env = _stacked_env(rule, binding, world, draw)
            a = evaluate_stacked(rule.src, env, "ref", binding)
            b = evaluate_stacked(rule.dst, env, "ref", binding)
            if not all(close(x, y, "float64") for x, y in zip(a, b)):
                return False, evidence, f"differs at sizes {binding}, seed {seed}, {world} ranks"
            evidence["float"] += 1
    binding = cases[0]
    rng = np.random.default_rng(7)
    env = _stacked_env(rule, binding, world, lambda n, s, r: np.asarray(rng.integers(1, 1000, size=s), dtype=np.int64))
    fa, fb = evaluate_stacked(rule.src, env, "fingerprint", binding), evaluate_stacked(rule.dst, env, "fingerprint", binding)
    if not all(np.array_equal(np.asarray(x) % PRIME, np.asarray(y) % PRIME) for x, y in zip(fa, fb)):
        return False, evidence, f"fingerprints differ at sizes {binding}, {world} ranks"
    evidence["fingerprint"] = True
    evidence["z3"] = _z3(rule, world)
    if evidence["z3"] == "refuted":
        return False, evidence, f"Z3 refutes it at {world} ranks"
    return True, evidence, ""


def _z3(rule, world: int) -> str:
    import z3
    binding = {s: 2 for s in graph_symbols(rule.src)}

    def draw(name, shape, r):
        n = int(np.prod(shape, dtype=np.int64))
        arr = np.empty(n, dtype=object)
        for k in range(n):
            arr[k] = z3.Real(f"{name}_{r}_{k}")
        return arr.reshape(shape)
    env = _stacked_env(rule, binding, world, draw)
    try:
        a, b = evaluate_stacked(rule.src, env, "z3", binding), evaluate_stacked(rule.dst, env, "z3", binding)
    except NotAlgebraic:
        return "not-algebraic"
    return prove_equal(a, b, binding, timeout_ms=4000)[0]


def world_of(graph: Graph) -> int | None:
    """The world size the parallel ops of a graph name (None: no parallel op)."""
    worlds = {n.attr_dict["world"] for n in graph.nodes if get_op(n.op).spmd}
    return next(iter(worlds)) if len(worlds) == 1 else (None if not worlds else -1)


def verify_sharding(src: Graph, dst: Graph):
    """:func:`graphopt.verify.verify_rule` for a rule with parallel ops: a Verdict."""
    from types import SimpleNamespace

    from ..verify import Verdict
    world = world_of(src) or world_of(dst)
    if world is None or world < 1 or (world_of(src) not in (None, world)):
        return Verdict(False, {}, "the parallel ops of a rule must all name the same world size")
    ok, evidence, why = verify_parallel_rule(SimpleNamespace(src=src, dst=dst), world)
    out = {"fingerprint": evidence["fingerprint"], "float": {"passed": ok, "cases": evidence["float"]},
           "z3": evidence["z3"], "world": world}
    return Verdict(ok, out, why or None)


def _at_world(text: str, world: int) -> str:
    """The rule text for another world size: ``world=2`` and the dims ``2x``/``4x`` (one and
    two rank-multiples of a size) rewritten."""
    text = re.sub(r"world=2\b", f"world={world}", text)
    scale = {"2": world, "4": 2 * world}
    return re.sub(r"(?<![\w.])([24])([a-z])\b", lambda m: f"{scale[m.group(1)]}{m.group(2)}", text)


@lru_cache(maxsize=4)
def load_parallel_rules(path: str | None = None, worlds: tuple = (2, 4)) -> tuple:
    """The sharding rules of ``path`` (default ``substitutions/parallel.rules``), each verified
    at every world size of ``worlds``; evidence per world in ``rule.evidence["parallel"]``.

    Raises:
        RuleFormatError: the file does not parse, or a rule does not hold (the message names it).
    """
    from ..rulelang import parse_rules
    path = Path(path or RULES_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RuleFormatError(f"{path}: cannot read sharding rules ({type(e).__name__})") from None
    rules = parse_rules(text, str(path))
    for world in worlds:
        at = rules if world == 2 else parse_rules(_at_world(text, world), str(path))
        for rule, checked in zip(rules, at):
            ok, evidence, why = verify_parallel_rule(checked, world)
            if not ok:
                raise RuleFormatError(f"{path}:{rule.provenance.get('line')}: sharding rule {rule.name} "
                                      f"does not hold: {why}")
            rule.evidence.setdefault("parallel", []).append(evidence)
    return tuple(rules)


def _layout_of_operand(graph: Graph, ref: str) -> tuple:
    """(input name, layout) of an operand of the right side's op: shard/partial of an input."""
    idx, _ = parse_ref(ref)
    if isinstance(idx, str):
        return idx, R
    node = graph.nodes[idx]
    attrs = node.attr_dict
    if node.op == "shard" and not node.inputs[0].startswith("%"):
        return node.inputs[0], S(attrs["axis"])
    if node.op == "partial" and not node.inputs[0].startswith("%"):
        return node.inputs[0], P
    return None, None


def strategy_of(rule) -> Strategy | None:
    """The strategy a rule states, or None for an identity between collectives."""
    src, dst = rule.src, rule.dst
    root = src.nodes[parse_ref(src.outputs[0])[0]] if src.outputs[0].startswith("%") else None
    if root is None or get_op(root.op).spmd:
        return None
    ins = []
    for ref in root.inputs:
        idx, _ = parse_ref(ref)
        if isinstance(idx, str):
            ins.append((idx, None))
            continue
        c = src.nodes[idx]
        if c.op not in COLLECTIVE_LAYOUT:
            return None
        ins.append((c.inputs[0], S(c.attr_dict["axis"]) if COLLECTIVE_LAYOUT[c.op] == "S" else P))
    top = dst.nodes[parse_ref(dst.outputs[0])[0]]
    out, body = R, top
    if top.op in COLLECTIVE_LAYOUT:
        a = top.attr_dict
        out = S(a["axis"]) if COLLECTIVE_LAYOUT[top.op] == "S" else P
        body = dst.nodes[parse_ref(top.inputs[0])[0]]
    if body.op != root.op:
        return None
    layouts = []
    for (name, lhs_layout), ref in zip(ins, body.inputs):
        if lhs_layout is not None:
            layouts.append(lhs_layout)
            continue
        got, layout = _layout_of_operand(dst, ref)
        if got != name:
            return None
        layouts.append(layout)
    return Strategy(rule.name, root.op, tuple(layouts), out, rule.provenance.get("reason", ""))


def strategies(path: str | None = None) -> dict:
    """op name -> [Strategy, ...] from the verified sharding rules."""
    out: dict = {}
    for rule in load_parallel_rules(path):
        st = strategy_of(rule)
        if st is not None:
            out.setdefault(st.op, []).append(st)
    return out


def rule_named(name: str, path: str | None = None):
    for rule in load_parallel_rules(path):
        if rule.name == name:
            return rule
    raise KeyError(name)


__all__ = ["Strategy", "load_parallel_rules", "verify_parallel_rule", "strategies", "strategy_of",
           "TOLERANCES"]
