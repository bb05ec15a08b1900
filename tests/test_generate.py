"""The generator pipeline: enumeration, buckets, verification, pruning, statistics."""
import numpy as np
import pytest

from graphopt.dims import Dim
from graphopt.enumerate import EnumConfig, decode, enumerate_graphs
from graphopt.errors import GraphoptError
from graphopt.generate import GenerateSettings, generate, parse_inputs
from graphopt.ir import Input
from graphopt.verify import FloatPlan, float_check, z3_check

SMALL = (Input("X", (Dim.sym("a"), Dim.sym("b"))), Input("Y", (Dim.sym("b"), Dim.sym("c"))),
         Input("Z", (Dim.sym("b"), Dim.sym("c"))))


def _cfg(max_ops, ops=("matmul", "add", "relu", "transpose"), **kw):
    return EnumConfig(max_ops=max_ops, ops=ops, inputs=SMALL, **kw)


def test_depth_one_counts_every_valid_single_op():
    """matmul: X@Y, X@Z; add: Y+Z (one order); relu: 3; transpose: 3 -> 9 graphs."""
    res = enumerate_graphs(_cfg(1))
    assert res.graphs == 9
    assert res.buckets == {}  # no two single ops compute the same thing


def test_each_graph_is_enumerated_once():
    """Canonical order: the same graph is never reached through two orders of its ops."""
    res = enumerate_graphs(_cfg(3), workers=1)
    seen = set()
    for recs in res.buckets.values():
        for r in recs:
            key = frozenset(r.skeys)
            assert key not in seen
            seen.add(key)


def test_worker_count_does_not_change_the_result():
    one = enumerate_graphs(_cfg(3), workers=1)
    two = enumerate_graphs(_cfg(3), workers=2)
    assert (one.graphs, one.recorded, one.fingerprints) == (two.graphs, two.recorded, two.fingerprints)
    assert one.buckets.keys() == two.buckets.keys()
    for k in one.buckets:
        assert [r.nodes for r in one.buckets[k]] == [r.nodes for r in two.buckets[k]]


def test_bucket_members_compute_the_same_outputs():
    res = enumerate_graphs(_cfg(3), workers=1)
    plan = FloatPlan()
    checked = 0
    for recs in list(res.buckets.values())[:40]:
        first = decode(recs[0], SMALL)
        for other in recs[1:]:
            assert float_check(first, decode(other, SMALL), plan)
            checked += 1
    assert checked > 10


def test_identical_tensors_are_skipped():
    """transpose(transpose(X)) equals X, so no graph contains it: only the three single
    transposes exist (two transposes of different inputs are not connected)."""
    res = enumerate_graphs(_cfg(2, ops=("transpose",)), workers=1)
    assert res.graphs == 3
    with_relu = enumerate_graphs(_cfg(3, ops=("transpose", "relu")), workers=1)
    exprs = [decode(r, SMALL).expression() for recs in with_relu.buckets.values() for r in recs]
    assert any("transpose(relu(" in e for e in exprs)
    assert not any("transpose(transpose(" in e for e in exprs)


def test_z3_proves_and_refutes():
    g1, g2, g3 = Graph_(), Graph_(), Graph_()
    g1.outputs = [g1.add("transpose", g1.add("matmul", "X", "Y"))]
    g2.outputs = [g2.add("matmul", g2.add("transpose", "Y"), g2.add("transpose", "X"))]
    g3.outputs = [g3.add("matmul", g3.add("transpose", "Z"), g3.add("transpose", "X"))]
    assert z3_check(g1, g2) == "proved"
    assert z3_check(g1, g3) == "refuted"
    g4, g5 = Graph_(), Graph_()   # relu(relu(x)) == relu(x) holds, but relu has no algebraic semantics
    g4.outputs = [g4.add("relu", g4.add("matmul", "X", "Y"))]
    g5.outputs = [g5.add("relu", g5.add("relu", g5.add("matmul", "X", "Y")))]
    assert z3_check(g4, g5) == "not-algebraic"


def Graph_():
    from graphopt.ir import Graph
    g = Graph()
    for i in SMALL:
        g.add_input(i.name, i.shape)
    return g


def test_float_check_catches_relu_surrogate_coincidence():
    """relu(x) and x agree on positive inputs only; the float plan uses both signs."""
    a, b = Graph_(), Graph_()
    a.outputs = [a.add("relu", "Y")]
    b.outputs = [b.add("relu", b.add("relu", "Y"))]
    assert float_check(a, b)  # idempotent: true
    c = Graph_()
    c.outputs = [c.add("transpose", c.add("transpose", "Y"))]
    assert not float_check(a, c)


def test_statistics_are_complete_and_consistent(fresh_library):
    st = fresh_library.meta["stats"]
    for key in ("graphs_enumerated", "fingerprint_buckets", "candidate_pairs", "float_verified",
                "z3_proved", "pruned_renaming", "pruned_common_subgraph", "rules"):
        assert key in st
    assert st["rules"] == len(fresh_library) > 100
    assert st["float_tested"] == st["float_verified"] + st["float_refuted"]
    z3_total = sum(v for k, v in st.items() if k.startswith("z3_"))
    assert z3_total == st["float_verified"]
    assert st["rules"] + st["pruned_renaming"] + st.get("z3_refuted", 0) == st["float_verified"]
    assert fresh_library.meta["generator"]["max_ops"] == 3


def test_every_rule_records_its_layers(fresh_library):
    for rule in fresh_library:
        layers = rule.layers()
        assert layers[:2] == ["fingerprint", "float"]
        algebraic = all(r not in ("relu", "exp") for r in rule.ops)
        assert (rule.evidence["z3"] == "not-algebraic") == (not algebraic)


def test_generation_is_reproducible():
    s = GenerateSettings(max_ops=2, ops=("matmul", "add", "smul", "transpose"))
    a = generate(s, workers=1, progress=False)
    b = generate(s, workers=2, progress=False)
    assert [r.id for r in a] == [r.id for r in b]
    assert len(a) > 0


@pytest.mark.parametrize("text, message", [
    ("X:a,b;X:b,c", "duplicate"),
    ("X", "invalid input spec"),
    ("X:a,b;Y:b,-c", "invalid shape"),
    ("X:a,0", "zero-size"),
    ("", "no inputs"),
])
def test_bad_input_specs(text, message):
    with pytest.raises(GraphoptError, match=message):
        parse_inputs(text)


def test_parse_inputs():
    inputs = parse_inputs("X:a,b; s:")
    assert inputs[0].shape == (Dim.sym("a"), Dim.sym("b")) and inputs[1].shape == ()


def test_settings_validation():
    with pytest.raises(GraphoptError, match="cannot be enumerated"):
        GenerateSettings(ops=("reshape",)).validate()
    with pytest.raises(GraphoptError, match="max-ops"):
        GenerateSettings(max_ops=0).validate()
    with pytest.raises(GraphoptError, match="3 seeds"):
        GenerateSettings(float_seeds=2).validate()


def test_fingerprint_values_are_integers_mod_prime():
    from graphopt.enumerate import _Table
    from graphopt.ops import PRIME
    tb = _Table(_cfg(1))
    assert all(v.dtype == np.int64 and v.min() >= 1 and v.max() < PRIME for v in tb.t_val)


def test_a_rule_true_only_for_some_size_orders_is_refuted():
    """Found in review: a split of c+c+d at d is not at a concat boundary, so the rule
    below holds only when d <= c.  Every layer must try both size orders."""
    from graphopt.ir import Graph
    from graphopt.rules import Rule
    from graphopt.verify import FloatPlan, float_check, z3_check

    def side(inner):
        g = Graph()
        g.add_input("Y", ("b", "c"))
        g.add_input("Z", ("b", "c"))
        g.add_input("V", ("b", "c+d"))
        t = g.add("concat", "Y", g.add("concat", *inner, axis=-1), axis=-1)
        lo, hi = g.add("split", t, axis=-1, left="d")
        g.outputs = [lo, g.add("reduce_sum", hi, axis=-1)]
        return g
    r = Rule(side(("Z", "V")), side(("V", "Z")))
    assert not float_check(r.src, r.dst, FloatPlan())
    assert z3_check(r.src, r.dst) == "refuted"


def test_instantiations_try_both_orders():
    from graphopt.verify import instantiations
    b1, b2 = instantiations(["a", "b", "c"], 2, seed=4)
    assert b1["a"] < b1["b"] < b1["c"] and b2["a"] > b2["b"] > b2["c"]
    assert instantiations(["a", "b"], 2, seed=1) != instantiations(["a", "b"], 2, seed=2)


def test_rule_ids_do_not_depend_on_output_order():
    from graphopt.ir import Graph
    from graphopt.rules import Rule

    def sides(order):
        a, b = Graph(), Graph()
        for g in (a, b):
            g.add_input("X", ["m", "n"])
            g.add_input("Y", ["n", "k"])
            g.add_input("Z", ["n", "k"])
        outs_a = [a.add("matmul", "X", "Y"), a.add("matmul", "X", "Z")]
        outs_b = list(b.add("split", b.add("matmul", "X", b.add("concat", "Y", "Z", axis=-1)), axis=-1, left="k"))
        a.outputs, b.outputs = [outs_a[i] for i in order], [outs_b[i] for i in order]
        return Rule(a, b)
    assert sides([0, 1]).id == sides([1, 0]).id


def test_symbols_beyond_the_default_binding():
    res = enumerate_graphs(EnumConfig(max_ops=1, ops=("matmul", "transpose"),
                                      inputs=(Input("P", (Dim.sym("f"), Dim.sym("g"))),
                                              Input("Q", (Dim.sym("g"), Dim.sym("h"))))))
    assert res.graphs == 3
