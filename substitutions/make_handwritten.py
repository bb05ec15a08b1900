"""Build substitutions/handwritten.json: rules written by hand, in the same format
as generated ones and checked by the same verifier.

These are identities the generator cannot find: the target is a bare input
(no operator), the fingerprint surrogates hide the identity (relu is
idempotent, but its surrogate x(x+1)+1 is not), or an op is not enumerated
(fused attention, softmax, the reciprocal of a scale).

    python substitutions/make_handwritten.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from graphopt.ir import Graph
from graphopt.rules import Rule, RuleLibrary
from graphopt.verify import FloatPlan, TOLERANCES, float_check, z3_check

OUT = Path(__file__).resolve().parent / "handwritten.json"
PLAN = FloatPlan(seeds=(1, 2, 3), shapes=2)


def _graph(inputs):
    g = Graph()
    for name, shape in inputs:
        g.add_input(name, shape)
    return g


def rule(name, inputs, build_src, build_dst, reason) -> Rule:
    src, dst = _graph(inputs), _graph(inputs)
    src.outputs = [build_src(src)]
    dst.outputs = [build_dst(dst)]
    if not float_check(src, dst, PLAN):
        raise SystemExit(f"hand-written rule {name} fails the float test")
    z3 = z3_check(src, dst)
    if z3 == "refuted":
        raise SystemExit(f"hand-written rule {name} is refuted by Z3")
    evidence = {"fingerprint": False, "float": {"passed": True, "cases": len(PLAN.cases(src))}, "z3": z3}
    return Rule(src, dst, evidence, {"source": "hand-written", "reason": reason}, name=name)


X = [("X", ["a", "b"])]
QKV = [("Q", ["t", "d"]), ("K", ["n", "d"]), ("V", ["n", "e"]), ("s", [])]


def _scores(g, scale_op):
    return g.add(scale_op, g.add("matmul", "Q", g.add("transpose", "K")), "s")


RULES = [
    rule("attention-scale-mul", QKV,
         lambda g: g.add("matmul", g.add("softmax", _scores(g, "smul")), "V"),
         lambda g: g.add("sdpa", "Q", "K", "V", "s"),
         "fused attention: softmax(Q K^T * s) V, the T x T scores never materialised"),
    rule("attention-scale-div", QKV,
         lambda g: g.add("matmul", g.add("softmax", _scores(g, "sdiv")), "V"),
         lambda g: g.add("sdpa", "Q", "K", "V", g.add("recip", "s")),
         "fused attention: softmax(Q K^T / s) V; the scale 1/s is exact (folded from the constant s)"),
    rule("sdiv-to-smul-recip", X + [("s", [])],
         lambda g: g.add("sdiv", "X", "s"), lambda g: g.add("smul", "X", g.add("recip", "s")),
         "canonical form: dividing by a scalar is multiplying by its reciprocal"),
    rule("transpose-involution", X,
         lambda g: g.add("transpose", g.add("transpose", "X")), lambda g: "X",
         "a target without operators cannot be enumerated"),
    rule("neg-involution", X,
         lambda g: g.add("neg", g.add("neg", "X")), lambda g: "X",
         "a target without operators cannot be enumerated"),
    rule("relu-idempotent", X,
         lambda g: g.add("relu", g.add("relu", "X")), lambda g: g.add("relu", "X"),
         "the relu surrogate x(x+1)+1 is not idempotent, so fingerprints miss it"),
    rule("sdiv-smul-cancel", X + [("s", [])],
         lambda g: g.add("sdiv", g.add("smul", "X", "s"), "s"), lambda g: "X",
         "a target without operators cannot be enumerated"),
]


def main() -> int:
    lib = RuleLibrary(RULES, meta={"description": __doc__.strip().splitlines()[0],
                                   "float_plan": {"dtype": "float64", "tolerance": list(TOLERANCES["float64"]),
                                                  "seeds": list(PLAN.seeds), "shapes": PLAN.shapes}})
    lib.save(OUT)
    print(f"wrote {len(lib)} rules to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
