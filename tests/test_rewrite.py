"""Matching rules in concrete graphs and rewriting them."""
import numpy as np
import pytest

from graphopt.ir import Graph
from graphopt.rewrite import MGraph, Pattern, apply_match, find_matches, to_graph
from graphopt.rules import Rule


def _rule(spec, build_src, build_dst) -> Rule:
    sides = []
    for build in (build_src, build_dst):
        g = Graph()
        for name, shape in spec:
            g.add_input(name, shape)
        out = build(g)
        g.outputs = list(out) if isinstance(out, (list, tuple)) else [out]
        sides.append(g)
    return Rule(*sides)


MERGE = _rule([("X", ["a", "b"]), ("Y", ["b", "c"]), ("Z", ["b", "d"])],
              lambda g: [g.add("matmul", "X", "Y"), g.add("matmul", "X", "Z")],
              lambda g: list(g.add("split", g.add("matmul", "X", g.add("concat", "Y", "Z", axis=-1)),
                                   axis=-1, left="c")))
TRANSPOSE = _rule([("X", ["a", "b"]), ("Y", ["b", "c"])],
                  lambda g: g.add("transpose", g.add("matmul", "X", "Y")),
                  lambda g: g.add("matmul", g.add("transpose", "Y"), g.add("transpose", "X")))


def _model(use_product_twice=False):
    """y: (2, 8, 16) activations; two projections sharing y, as q/k in attention."""
    g = Graph()
    g.add_input("y", [2, 8, 16])
    rng = np.random.default_rng(5)
    g.add_external("wq", [16, 16], "float32", value=rng.standard_normal((16, 16)))
    g.add_external("wk", [16, 8], "float32", value=rng.standard_normal((16, 8)))
    q = g.add("matmul", "y", "wq")
    k = g.add("matmul", "y", "wk")
    s = g.add("relu", q)
    outs = [s, g.add("neg", k)]
    if use_product_twice:
        outs.append(q)
    g.outputs = outs
    return g


def _env(g, seed=0):
    rng = np.random.default_rng(seed)
    return {i.name: g.constants[i.name] if i.const else rng.standard_normal(tuple(d.const for d in i.shape))
            for i in g.inputs}


def _same(g1, g2):
    env = _env(g1)
    for a, b in zip(g1.evaluate(env), g2.evaluate(env)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_merge_two_projections_with_batch_axes():
    g = _model()
    mg, _ = MGraph.from_graph(g)
    matches = find_matches(mg, Pattern.of(MERGE))
    assert len(matches) == 2  # (wq, wk) and (wk, wq)
    m = matches[0]
    assert m.binding == {"a": 8, "b": 16, "c": 16, "d": 8}
    new = apply_match(mg, m)
    out = to_graph(new, g)
    ops = [n.op for n in out.nodes]
    assert ops.count("matmul") == 1 and "concat" in ops and "split" in ops
    _same(g, out)


def test_both_directions():
    g = Graph()
    for name, shape in (("x", [4, 6]), ("w", [6, 10])):
        g.add_input(name, shape)
    g.outputs = list(g.add("split", g.add("matmul", "x", g.add("concat", "w", "w", axis=-1)), axis=-1, left=10))
    mg, _ = MGraph.from_graph(g)
    (m, *_), back = find_matches(mg, Pattern.of(MERGE, reverse=True)), None
    back = to_graph(apply_match(mg, m), g)
    assert [n.op for n in back.nodes] == ["matmul"]  # x@w computed once (hash-consing)
    _same(g, back)


def test_internal_value_used_elsewhere_blocks_the_match():
    g = Graph()
    g.add_input("x", [3, 4])
    g.add_input("y", [4, 5])
    p = g.add("matmul", "x", "y")
    g.outputs = [g.add("transpose", p)]
    mg, _ = MGraph.from_graph(g)
    assert len(find_matches(mg, Pattern.of(TRANSPOSE))) == 1
    g.outputs.append(p)  # the product is needed too: rewriting would compute it twice
    mg, _ = MGraph.from_graph(g)
    assert find_matches(mg, Pattern.of(TRANSPOSE)) == []


def test_shapes_that_do_not_unify_do_not_match():
    g = Graph()
    g.add_input("x", [3, 4])
    g.add_input("u", [4, 5])
    g.add_input("v", [7, 5])
    g.outputs = [g.add("matmul", "x", "u"), g.add("relu", "v")]
    mg, _ = MGraph.from_graph(g)
    assert find_matches(mg, Pattern.of(MERGE)) == []


def test_non_float_values_never_bind():
    g = Graph()
    g.add_external("x", [3, 4], "int64")
    g.add_input("w", [4, 5])
    g.add_opaque(object(), ["x", "w"], [((3, 5), "float32")])
    mg, _ = MGraph.from_graph(g)
    assert mg.by_op("matmul") == []


@pytest.mark.parametrize("reverse", [False, True])
def test_rewrites_keep_outputs_types(reverse):
    g = _model(use_product_twice=True)
    mg, _ = MGraph.from_graph(g)
    for m in find_matches(mg, Pattern.of(MERGE, reverse=reverse)):
        new = apply_match(mg, m)
        out = to_graph(new, g)
        assert [out.type_of(r) for r in out.outputs] == [g.type_of(r) for r in g.outputs]
        _same(g, out)


def test_structural_hash_sees_rewrites():
    g = _model()
    mg, _ = MGraph.from_graph(g)
    h0 = mg.structural_hash()
    assert MGraph.from_graph(g)[0].structural_hash() == h0
    new = apply_match(mg, find_matches(mg, Pattern.of(MERGE))[0])
    assert new.structural_hash() != h0
    assert mg.structural_hash() == h0  # the original is untouched


def test_search_merges_projections_when_it_pays():
    from cost_models import RooflineCost
    from graphopt.search import compile_patterns, search
    g = _model()
    mg, _ = MGraph.from_graph(g)
    res = search(mg, compile_patterns([MERGE, TRANSPOSE]), RooflineCost("h100"), budget=20)
    assert res.cost < res.initial_cost
    assert sum(res.applied.values()) >= 1 and any(k.startswith(MERGE.id) for k in res.applied)
    out = to_graph(res.graph, g)
    assert [n.op for n in out.nodes].count("matmul") == 1
    _same(g, out)
    again = search(mg, compile_patterns([MERGE, TRANSPOSE]), RooflineCost("h100"), budget=20)
    assert again.applied == res.applied and again.cost == res.cost  # deterministic
