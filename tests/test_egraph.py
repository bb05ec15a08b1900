"""The equality-saturation engine (graphopt/egraph.py): rules as egglog rules, guards and
types as conditions, DAG extraction, blocks, and the LoRA merge through graphopt.optimize."""
from __future__ import annotations

import pytest
import torch

import graphopt
from cost_models import get_cost_model
from graphopt.egraph import ENode, Extraction, Limits, _template, block_signature, cut_blocks, egraph_search
from graphopt.ir import Graph
from graphopt.options import Options
from graphopt.rewrite import INPUT, MGraph
from graphopt.rulelang import parse_rules
from graphopt.rules import load_rules
from graphopt.search import GraphCost, compile_patterns, search

COST = get_cost_model("roofline", device="cpu")

ALGEBRA = """
rule assoc:
    inputs X:(a,b) Y:(b,c) W:(c,d)
    matmul(matmul(X, Y), W)  ==  matmul(X, matmul(Y, W))
rule distrib:
    inputs X:(a,b) Y:(b,c) Z:(b,c)
    add(matmul(X, Y), matmul(X, Z))  ==  matmul(X, add(Y, Z))
rule scale-into-weight:
    inputs X:(a,b) Y:(b,c) s:()
    smul(matmul(X, Y), s)  ==  matmul(X, smul(Y, s))
"""


def _lora_graph(d=512, r=8, layers=1):
    g = Graph()
    x = g.add_external("x", (d, d), "float32")
    torch.manual_seed(0)
    for i in range(layers):
        w = g.add_external(f"W{i}", (d, d), "float32", value=torch.randn(d, d))
        a = g.add_external(f"A{i}", (d, r), "float32", value=torch.randn(d, r))
        b = g.add_external(f"B{i}", (r, d), "float32", value=torch.randn(r, d))
        s = g.add_external(f"s{i}", (), "float32", value=torch.tensor(2.0))
        x = g.add("relu", g.add("add", g.add("matmul", x, w), g.add("smul", g.add("matmul", g.add("matmul", x, a), b), s)))
    g.outputs = [x]
    return MGraph.from_graph(g)[0]


def _runtime_ops(mg: MGraph, op: str) -> int:
    const = mg.const_nodes()
    return sum(1 for nid, n in mg.nodes.items() if n.op == op and nid not in const)


def test_lora_chain_needs_an_expensive_intermediate():
    """(x@A)@B -> x@(A@B) costs 32x more until the distributivity after it folds A@B into W:
    the e-graph finds one runtime matmul per layer, backtracking (alpha 1.05) does not."""
    mg = _lora_graph(layers=2)
    pats = compile_patterns(parse_rules(ALGEBRA))
    res = egraph_search(mg, pats, COST, Options())
    assert _runtime_ops(res.graph, "matmul") == 2
    assert res.cost < res.initial_cost
    assert res.stats["engine"] == "egraph" and res.stats["max_enodes"] > 0
    bt = search(mg, pats, COST)
    assert _runtime_ops(bt.graph, "matmul") > 2 and bt.cost > res.cost
    res.graph.topo_order()   # acyclic


def test_repeated_blocks_are_saturated_once():
    mg = _lora_graph(d=256, layers=6)
    blocks = cut_blocks(mg, min_nodes=3)
    sigs = {block_signature(mg, b) for b in blocks}
    assert len(blocks) >= 3 and len(sigs) < len(blocks)
    res = egraph_search(mg, compile_patterns(parse_rules(ALGEBRA)), COST, Options())
    assert _runtime_ops(res.graph, "matmul") == 6
    assert res.stats["distinct_blocks"] < res.stats["blocks"]


def test_types_are_conditions():
    """A rule applies only where the matched sizes fit its type scheme: distributivity over
    matmuls whose right operands differ in shape never fires."""
    g = Graph()
    x = g.add_external("x", (64, 32), "float32")
    y = g.add_external("y", (32, 16), "float32")
    z = g.add_external("z", (64, 16), "float32")   # not a matmul by x: no common factor
    g.outputs = [g.add("add", g.add("matmul", x, y), g.add("relu", z))]
    mg = MGraph.from_graph(g)[0]
    res = egraph_search(mg, compile_patterns(parse_rules(ALGEBRA)), COST, Options())
    assert res.graph is mg and not res.applied


def test_guard_blocks_a_rewrite():
    """``badd(X, Z) == X if Z zeros``: applied where the constant is zeros, not where it is ones."""
    rules = parse_rules("""
rule add-zeros:
    inputs X:(a,b) Z:(a,b)
    badd(X, Z)  ==  X  if Z zeros
""")
    g = Graph()
    x = g.add_external("x", (8, 8), "float32")
    zeros = g.add_external("Z", (8, 8), "float32", value=torch.zeros(8, 8))
    ones = g.add_external("O", (8, 8), "float32", value=torch.ones(8, 8))
    g.outputs = [g.add("relu", g.add("badd", x, zeros)), g.add("relu", g.add("badd", x, ones))]
    mg = MGraph.from_graph(g)[0]
    res = egraph_search(mg, compile_patterns(rules), COST, Options())
    assert sum(1 for n in res.graph.nodes.values() if n.op == "badd") == 1
    kept = next(n for n in res.graph.nodes.values() if n.op == "badd")
    assert res.graph.nodes[kept.inputs[1][0]].name == "O"


def _two_projections(const: bool):
    g = Graph()
    x = g.add_external("x", (256, 64), "float32")
    torch.manual_seed(0)
    ws = [g.add_external(f"W{i}", (64, 64), "float32", value=torch.randn(64, 64) if const else None)
          for i in (1, 2)]
    g.outputs = [g.add("relu", g.add("matmul", x, w)) for w in ws]
    return MGraph.from_graph(g)[0]


def test_projection_merge_is_a_multi_pattern():
    """x@W1, x@W2 -> split(x @ concat(W1, W2)): a rule with two outputs, brought into a block
    without concat or split because it merges, and only where the concat is folded."""
    lib = load_rules()
    merge = [r for r in lib.rules if r.id == "r62ab1e52c1"]
    assert merge, "the projection merge rule of the shipped library"
    pats = compile_patterns(merge)
    res = egraph_search(_two_projections(const=True), pats, COST, Options())
    assert _runtime_ops(res.graph, "matmul") == 1 and _runtime_ops(res.graph, "split") == 1
    assert res.applied
    # two activations are not copied into one to save a GEMM call
    res = egraph_search(_two_projections(const=False), pats, COST, Options())
    assert _runtime_ops(res.graph, "matmul") == 2 and not res.applied
    off = egraph_search(_two_projections(const=True), pats, COST, Options(), Limits(merges=False))
    assert _runtime_ops(off.graph, "matmul") == 2


def _gated_mlp():
    """h@Wg -> silu (opaque) -> * h@Wu -> @Wd: the gate and up projections on either side
    of a call the e-graph cannot rewrite."""
    g = Graph()
    h = g.add_external("h", (128, 64), "float32")
    torch.manual_seed(0)
    wg, wu, wd = (g.add_external(n, shape, "float32", value=torch.randn(*shape))
                  for n, shape in (("Wg", (64, 96)), ("Wu", (64, 96)), ("Wd", (96, 64))))
    gate = g.add("matmul", h, wg)
    act = g.add_opaque(object(), [gate], [((128, 96), "float32")])
    g.outputs = [g.add("matmul", g.add("bmul", act, g.add("matmul", h, wu)), wd)]
    return MGraph.from_graph(g)[0]


def test_an_opaque_call_is_a_wall_inside_a_block():
    mg = _gated_mlp()
    blocks = cut_blocks(mg)
    assert len(blocks) == 1, [b.nodes for b in blocks]
    (b,) = blocks
    assert sum(mg.nodes[nid].op == "matmul" for nid in b.nodes) == 3
    gate_out = next(i for i, v in enumerate(b.outs) if mg.nodes[v[0]].op == "matmul")
    act_leaf = next(i for i, v in enumerate(b.leaves) if mg.nodes[v[0]].op == "opaque")
    assert (gate_out, act_leaf) in b.forbid      # the gate must not be computed from silu(gate)
    merge = [r for r in load_rules().rules if r.id == "r62ab1e52c1"]
    res = egraph_search(mg, compile_patterns(merge), COST, Options())
    assert _runtime_ops(res.graph, "matmul") == 2 and res.applied   # gate and up merged, then down
    res.graph.topo_order()


def test_extraction_respects_walls():
    """An out may not be extracted as a term that reads the opaque result computed from it."""
    from graphopt.egraph import _respects_walls
    info = ((), (((4, 4), "float32"),))
    choice = {"L": ENode("leaf", 1, ()), "X": ENode("leaf", 0, ()), "R": ENode("relu", info, ("L",)),
              "S": ENode("relu", info, ("X",))}
    assert not _respects_walls(choice, ["L", "R"], ["R"], [(0, 1)])
    assert _respects_walls(choice, ["X", "S"], ["S"], [(0, 1)])


def _cyclic_classes():
    g = Graph()
    g.add_external("x", (4, 4), "float32")
    g.outputs = ["x"]
    mg = MGraph.from_graph(g)[0]
    info = ((), (((4, 4), "float32"),))
    classes = {"A": [ENode("relu", info, ("B",))],
               "B": [ENode("relu", info, ("A",)), ENode("relu", info, ("C",))],
               "C": [ENode("leaf", 0, ())]}
    leaves = [v for v in [(nid, 0) for nid, n in mg.nodes.items() if n.op == INPUT]]
    return Extraction(classes, leaves, mg, GraphCost(COST)), classes


def test_extraction_refuses_cycles():
    ex, classes = _cyclic_classes()
    choice = ex.greedy(["A"])
    assert choice["B"].kids == ("C",)
    cyclic = {"A": classes["A"][0], "B": classes["B"][0], "C": classes["C"][0]}
    assert ex.dag_cost(cyclic, ["A"]) is None and _template(cyclic, ["A"]) is None
    exact, status = ex.ilp(["A"], seconds=5)
    assert status == "Optimal" and exact["B"].kids == ("C",)
    assert ex.dag_cost(exact, ["A"]) == pytest.approx(ex.dag_cost(choice, ["A"]))


def test_shared_values_are_paid_once():
    """DAG cost: a value read twice counts once."""
    ex, classes = _cyclic_classes()
    one = ex.own_cost("B", classes["B"][1])
    classes["D"] = [ENode("add", ((), (((4, 4), "float32"),)), ("B", "B"))]
    ex2 = Extraction(classes, ex.leaves, ex.mg, ex.cost)
    choice = ex2.greedy(["D"])
    add = ex2.own_cost("D", classes["D"][0])
    assert ex2.dag_cost(choice, ["D"]) == pytest.approx(one + add)


class _LoRA(torch.nn.Module):
    def __init__(self, d=128, r=4, layers=3):
        super().__init__()
        self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(d, d) / d ** 0.5) for _ in range(layers))
        self.As = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(d, r) / d ** 0.5) for _ in range(layers))
        self.Bs = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(r, d) / r ** 0.5) for _ in range(layers))

    def forward(self, x):
        for w, a, b in zip(self.ws, self.As, self.Bs):
            x = torch.relu(x @ w + (x @ a) @ b * 2.0)
        return x


@pytest.mark.parametrize("engine", ["egraph", "hybrid"])
def test_lora_merge_through_optimize(engine):
    torch.manual_seed(0)
    model = _LoRA().eval()
    x = torch.randn(64, 128)
    fast = graphopt.optimize(model, (x,), search=engine)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    after = fast.report.graphs[0].op_counts["after"]
    gemms = sum(n for op, n in after.items() if op in ("gemm", "matmul", "mm", "linear", "method matmul"))
    assert gemms == 3, after
    assert fast.report.phases["search"]["engine"] == engine
    assert "e-graph" in str(fast.report)


def test_unknown_engine_is_one_clear_error():
    with pytest.raises(graphopt.GraphoptError, match="unknown search engine 'beam'"):
        Options.of({"search": "beam"})


@pytest.mark.parametrize("engine", ["backtracking", "egraph", "hybrid"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-lora"])
def test_engines_on_the_builtin_models(engine, name):
    from graphopt.models import example
    model, (ids,) = example(name, seq_len=16, layers=2)
    fast = graphopt.optimize(model, (ids,), search=engine, time_limit=4.0)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-4, atol=1e-4)
    rep = fast.report
    assert not rep.fallbacks
    assert rep.attention["fused"] == rep.attention["blocks"] == 2
    assert rep.cost_after <= rep.cost_before
