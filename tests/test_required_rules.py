"""The rules the issue names must be discovered by the generator (and shipped).

Each rule is built by hand here; its canonical id does not depend on input
names, operand order of commutative ops, output order or direction, so finding
the id in a library proves the generator found the same rule.
"""
import pytest

from graphopt.ir import Graph
from graphopt.rules import Rule


def _inputs(g: Graph, spec):
    for name, shape in spec:
        g.add_input(name, shape)
    return g


def _pair(spec, build_src, build_dst) -> Rule:
    src, dst = _inputs(Graph(), spec), _inputs(Graph(), spec)
    src.outputs = list(_as_list(build_src(src)))
    dst.outputs = list(_as_list(build_dst(dst)))
    return Rule(src, dst)


def _as_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


XYW = [("X", ["a", "b"]), ("Y", ["b", "c"]), ("W", ["c", "d"])]
XYZ = [("X", ["a", "b"]), ("Y", ["b", "c"]), ("Z", ["b", "c"])]
XY = [("X", ["a", "b"]), ("Y", ["b", "c"])]
XYs = [("X", ["a", "b"]), ("Y", ["b", "c"]), ("s", [])]
YZ = [("Y", ["b", "c"]), ("Z", ["b", "c"])]

REQUIRED = {
    "matmul associativity: (X@Y)@W = X@(Y@W)": _pair(
        XYW,
        lambda g: g.add("matmul", g.add("matmul", "X", "Y"), "W"),
        lambda g: g.add("matmul", "X", g.add("matmul", "Y", "W"))),
    "x@A + x@B = x@(A+B)": _pair(
        XYZ,
        lambda g: g.add("add", g.add("matmul", "X", "Y"), g.add("matmul", "X", "Z")),
        lambda g: g.add("matmul", "X", g.add("add", "Y", "Z"))),
    "two matmuls sharing X = one matmul with concatenated weights + split (TASO Fig. b)": _pair(
        XYZ,
        lambda g: [g.add("matmul", "X", "Y"), g.add("matmul", "X", "Z")],
        lambda g: list(g.add("split", g.add("matmul", "X", g.add("concat", "Y", "Z", axis=-1)),
                             axis=-1, left="c"))),
    "transpose(A@B) = transpose(B)@transpose(A)": _pair(
        XY,
        lambda g: g.add("transpose", g.add("matmul", "X", "Y")),
        lambda g: g.add("matmul", g.add("transpose", "Y"), g.add("transpose", "X"))),
    "scalar multiplication moves through matmul (right)": _pair(
        XYs,
        lambda g: g.add("smul", g.add("matmul", "X", "Y"), "s"),
        lambda g: g.add("matmul", "X", g.add("smul", "Y", "s"))),
    "scalar multiplication moves through matmul (left)": _pair(
        XYs,
        lambda g: g.add("smul", g.add("matmul", "X", "Y"), "s"),
        lambda g: g.add("matmul", g.add("smul", "X", "s"), "Y")),
    "relu commutes with concat (axis -2)": _pair(
        YZ,
        lambda g: g.add("relu", g.add("concat", "Y", "Z", axis=-2)),
        lambda g: g.add("concat", g.add("relu", "Y"), g.add("relu", "Z"), axis=-2)),
    "relu commutes with concat (axis -1)": _pair(
        YZ,
        lambda g: g.add("relu", g.add("concat", "Y", "Z", axis=-1)),
        lambda g: g.add("concat", g.add("relu", "Y"), g.add("relu", "Z"), axis=-1)),
    "relu commutes with split": _pair(
        [("V", ["b", "c+d"])],
        lambda g: list(g.add("split", g.add("relu", "V"), axis=-1, left="c")),
        lambda g: [g.add("relu", s) for s in g.add("split", "V", axis=-1, left="c")]),
    "matmul then split = split the (fused) weight, then two matmuls": _pair(
        [("X", ["a", "b"]), ("V", ["b", "c+d"])],
        lambda g: list(g.add("split", g.add("matmul", "X", "V"), axis=-1, left="c")),
        lambda g: [g.add("matmul", "X", s) for s in g.add("split", "V", axis=-1, left="c")]),
}


@pytest.mark.parametrize("name", list(REQUIRED))
def test_generator_finds_rule(fresh_library, name):
    rule = REQUIRED[name]
    assert rule.id in fresh_library, f"{name} ({rule.summary()}) not generated"


@pytest.mark.parametrize("name", list(REQUIRED))
def test_default_library_ships_rule(default_library, name):
    rule = REQUIRED[name]
    assert rule.id in default_library, f"{name} ({rule.summary()}) missing from substitutions/default.json"
    shipped = default_library[rule.id]
    assert {"fingerprint", "float"} <= set(shipped.layers())
    if all(op in ("matmul", "add", "smul", "transpose", "concat", "split") for op in shipped.ops):
        assert "z3" in shipped.layers(), "an all-algebraic rule should carry a Z3 proof"


def test_a_wrong_rule_is_not_found(fresh_library):
    """The id check itself can fail: a false rule (X@Y = X@Z) is absent."""
    wrong = _pair(XYZ, lambda g: g.add("matmul", "X", "Y"), lambda g: g.add("matmul", "X", "Z"))
    assert wrong.id not in fresh_library


def test_canonical_id_ignores_names_order_and_direction():
    a = REQUIRED["x@A + x@B = x@(A+B)"]
    spec = [("P", ["m", "n"]), ("Q", ["n", "k"]), ("R", ["n", "k"])]
    b = _pair(spec,
              lambda g: g.add("matmul", "P", g.add("add", "R", "Q")),
              lambda g: g.add("add", g.add("matmul", "P", "R"), g.add("matmul", "P", "Q")))
    assert a.id == b.id

