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
    for name, shape, *guard in inputs:
        g.add_input(name, shape, guard=guard[0] if guard else None)
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
S = [("s", [])]
QKV = [("Q", ["t", "d"]), ("K", ["n", "d"]), ("V", ["n", "e"])]
GQA = [("Q", ["h", "t", "d"]), ("K", ["g", "n", "d"]), ("V", ["g", "n", "e"])]
MASK = [("M", ["t", "n"])]
KEY_MASK = [("M", ["1", "n"])]

# where the model applies the scale 1/sqrt(d): to the scores, or folded into Q or K;
# as a multiplication or a division (whose scale for SDPA is recip(s), folded exactly)
SCALINGS = {
    "mul": lambda g: g.add("smul", g.add("matmul", "Q", g.add("transpose", "K")), "s"),
    "div": lambda g: g.add("sdiv", g.add("matmul", "Q", g.add("transpose", "K")), "s"),
    "q-mul": lambda g: g.add("matmul", g.add("smul", "Q", "s"), g.add("transpose", "K")),
    "q-div": lambda g: g.add("matmul", g.add("sdiv", "Q", "s"), g.add("transpose", "K")),
    "k-mul": lambda g: g.add("matmul", "Q", g.add("transpose", g.add("smul", "K", "s"))),
    "k-div": lambda g: g.add("matmul", "Q", g.add("transpose", g.add("sdiv", "K", "s"))),
}


def _scale(g, how):
    return g.add("recip", "s") if how.endswith("div") else "s"


def attention_rules() -> list:
    """softmax(scores [+ M]) @ V -> sdpa / sdpa_masked, for each placement of the scale."""
    out = []
    for how, scores in SCALINGS.items():
        scale = "scale" if how in ("mul", "div") else how[:1] + "-scale"
        kind = how.split("-")[-1]
        out.append(rule(
            f"attention-{scale}-{kind}", QKV + S,
            lambda g, f=scores: g.add("matmul", g.add("softmax", f(g)), "V"),
            lambda g, h=how: g.add("sdpa", "Q", "K", "V", _scale(g, h)),
            "fused attention: softmax(Q K^T * s) V, the T x T scores never materialised"))
        for mask, what in ((MASK, "masked"), (KEY_MASK, "keymasked")):
            out.append(rule(
                f"attention-{what}-{scale}-{kind}", QKV + mask + S,
                lambda g, f=scores: g.add("matmul", g.add("softmax", g.add("badd", f(g), "M")), "V"),
                lambda g, h=how: g.add("sdpa_masked", "Q", "K", "V", "M", _scale(g, h)),
                "fused attention with an additive mask M (broadcast over batch and heads)"
                + ("; a key-padding mask, the same for every query" if what == "keymasked" else "")))
    return out


def mask_rules() -> list:
    """A constant mask that is provably causal (or all zeros) becomes is_causal (or goes)."""
    out = []
    for gqa in (False, True):
        ins, tag = (GQA, "-gqa") if gqa else (QKV, "")
        mshape = ["1", "t", "n"] if gqa else ["t", "n"]  # with a head axis: one mask for all heads
        causal = ("M", mshape, "causal")
        zeros = ("M", mshape, "zeros")
        out.append(rule(
            f"causal-mask{tag}", ins + [causal] + S,
            lambda g, q=gqa: g.add("sdpa_masked", "Q", "K", "V", "M", "s", enable_gqa=q),
            lambda g, q=gqa: g.add("sdpa", "Q", "K", "V", "s", is_causal=True, enable_gqa=q),
            "the mask is the causal mask (guard checked on its value): SDPA's is_causal, "
            "which the flash kernels accept"))
        out.append(rule(
            f"zero-mask{tag}", ins + [zeros] + S,
            lambda g, q=gqa: g.add("sdpa_masked", "Q", "K", "V", "M", "s", enable_gqa=q),
            lambda g, q=gqa: g.add("sdpa", "Q", "K", "V", "s", enable_gqa=q),
            "the mask masks nothing (guard checked on its value): no mask"))
    return out


def gqa_rules() -> list:
    """Repeated key/value heads (grouped-query attention) -> SDPA's enable_gqa."""
    def rep(g, x):
        return g.add("repeat_heads", x, heads="h")
    out = []
    for causal in (False, True):
        out.append(rule(
            "gqa" + ("-causal" if causal else ""), GQA + S,
            lambda g, c=causal: g.add("sdpa", "Q", rep(g, "K"), rep(g, "V"), "s", is_causal=c),
            lambda g, c=causal: g.add("sdpa", "Q", "K", "V", "s", is_causal=c, enable_gqa=True),
            "grouped-query attention without materialising the repeated K/V heads"))
    out.append(rule(
        "gqa-masked", GQA + [("M", ["1", "t", "n"])] + S,
        lambda g: g.add("sdpa_masked", "Q", rep(g, "K"), rep(g, "V"), "M", "s"),
        lambda g: g.add("sdpa_masked", "Q", "K", "V", "M", "s", enable_gqa=True),
        "grouped-query attention without materialising the repeated K/V heads"))
    return out


def gelu_rules() -> list:
    """HF's NewGELUActivation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as written
    (8 kernels in eager mode) -> one GELU kernel; the scalars are guarded to be GELU's."""
    from graphopt.ops.elementwise import GELU_A, GELU_B
    scalars = [("A", [], "eq:0.5"), ("B", [], f"eq:{GELU_B!r}"), ("C", [], f"eq:{GELU_A!r}"), ("D", [], "eq:1.0")]

    def chain(g):
        inner = g.add("add", "X", g.add("smul", g.add("spow", "X", exponent=3), "B"))
        return g.add("mul", g.add("smul", "X", "A"), g.add("sadd", g.add("tanh", g.add("smul", inner, "C")), "D"))
    return [rule("gelu-tanh", X + scalars, chain, lambda g: g.add("gelu_tanh", "X"),
                 "GELU's tanh approximation written out (GPT-2's gelu_new): one fused kernel")]


RULES = attention_rules() + mask_rules() + gqa_rules() + gelu_rules() + [
    rule("sdiv-to-smul-recip", X + S,
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
    rule("sdiv-smul-cancel", X + S,
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
