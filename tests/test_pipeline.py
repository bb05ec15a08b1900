"""The pipeline shared by the torch and ONNX paths: stages, schedule, engines, lint and
the one output comparison both safety nets use."""
import math

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import GraphoptError
from graphopt.lint import LintError, lint_mgraph
from graphopt.options import Options
from graphopt.pipeline import compare_outputs, expand_composites
from graphopt.rewrite import MGraph, MNode
from graphopt.schedule import DEFAULT_SCHEDULE, Phase, load_rulesets, plan_schedule, without_ruleset

INF, NAN = math.inf, math.nan


# -- one output comparison ---------------------------------------------------------------------

@pytest.mark.parametrize("a, b, ok", [
    ([1.0, INF, -INF], [1.0, INF, -INF], True),       # equal infinities are equal
    ([1.0, NAN], [1.0, NAN], True),                   # a NaN where the original has one
    ([1.0, 2.0], [1.0, NAN], False),                  # a NaN where the original has none
    ([1.0, 2.0], [1.0, INF], False),
    ([1.0, INF], [1.0, -INF], False),
    ([1.0, INF], [1.0, 3.0], False),
    ([1.0, 2.0], [1.0, 2.0 + 1e-6], True),            # within the float32 tolerance
    ([1.0, 2.0], [1.0, 2.01], False),
])
def test_compare_outputs_torch_and_numpy_agree(a, b, ok):
    t = compare_outputs([torch.tensor(a)], [torch.tensor(b)])
    n = compare_outputs([np.array(a, dtype=np.float32)], [np.array(b, dtype=np.float32)])
    assert t[0] is ok and n[0] is ok, (t, n)


def test_compare_outputs_types_and_integers():
    assert not compare_outputs([torch.ones(2)], [torch.ones(3)])[0]
    assert not compare_outputs([torch.ones(2)], [torch.ones(2, dtype=torch.float64)])[0]
    assert not compare_outputs([torch.tensor([1, 2])], [torch.tensor([1, 3])])[0]
    assert compare_outputs([torch.tensor([1, 2])], [torch.tensor([1, 2])])[0]
    assert not compare_outputs([torch.ones(2)], [])[0]
    assert not compare_outputs([3], [4])[0] and compare_outputs([3], [3])[0]
    ok, diff, why = compare_outputs([torch.zeros(4)], [torch.tensor([0.0, 0.0, 0.5, 0.0])])
    assert not ok and diff == 0.5 and "output 0" in why
    assert compare_outputs([torch.ones(2, dtype=torch.bfloat16)], [torch.ones(2, dtype=torch.bfloat16) * 1.004])[0]


# -- lint -------------------------------------------------------------------------------------

def _tiny():
    g = graphopt.Graph()
    g.add_input("X", (2, 3))
    g.outputs = [g.add("neg", g.add("transpose", "X"))]
    return MGraph.from_graph(g)[0]


def test_lint_passes_a_good_graph_and_names_the_stage_of_a_bad_one():
    mg = _tiny()
    lint_mgraph(mg, "import")
    nid = max(mg.nodes)
    n = mg.nodes[nid]
    mg.nodes[nid] = MNode(n.op, n.inputs, n.attrs, (((9, 9), "float32"),))
    with pytest.raises(LintError, match=r"after fuse: node \d+ \(neg\)"):
        lint_mgraph(mg, "fuse")


def test_lint_finds_a_cycle_and_a_dangling_input():
    mg = _tiny()
    a, b = sorted(mg.nodes)[1:]
    n = mg.nodes[a]
    mg.nodes[a] = MNode(n.op, ((b, 0),), n.attrs, n.outs)
    with pytest.raises(LintError, match="cycle"):
        lint_mgraph(mg, "search")
    mg = _tiny()
    n = mg.nodes[b]
    mg.nodes[b] = MNode(n.op, ((99, 0),), n.attrs, n.outs)
    with pytest.raises(LintError, match="does not exist"):
        lint_mgraph(mg, "search")


# -- expansion of registry composites ----------------------------------------------------------

def test_linear_and_permute_expand_to_their_canonical_forms():
    g = graphopt.Graph()
    g.add_input("X", (2, 3, 4, 5))
    g.add_input("W", (7, 5))
    p = g.add("permute", "X", perm=(0, 2, 3, 1))
    g.outputs = [g.add("linear", g.add("transpose", p, dim0=-2, dim1=-1), "W")]
    mg, count = expand_composites(MGraph.from_graph(g)[0])
    assert count == 2
    lint_mgraph(mg, "expand")
    ops = sorted(n.op for n in mg.nodes.values() if n.op != "input")
    assert ops == ["matmul"] + ["transpose"] * 4


# -- schedule -----------------------------------------------------------------------------------

def test_default_schedule_runs_canonical_and_fusion_greedily_then_searches_generated():
    plan = plan_schedule(load_rulesets(("default", "handwritten")))
    assert [(s.phase.name, s.phase.engine, s.phase.rulesets) for s in plan] == [
        ("canonicalise", "greedy", ("canonical",)),
        ("fuse", "greedy", ("attention", "fusion")),
        ("search", "backtracking", ("generated",))]
    assert all(p.rule_id.endswith("+") for s in plan[:2] for p in s.patterns)  # as written
    assert {p.rule_id[-1] for p in plan[2].patterns} == {"+", "-"}              # both ways
    assert len(plan[1].patterns) == 77   # the attention forms (75), the GELU and its GEMM epilogue
    gate = without_ruleset(plan, "attention")
    assert gate[1].phase.rulesets == ("fusion",) and len(gate[1].patterns) == 2


def test_unknown_ruleset_and_engine_are_one_line_errors():
    rulesets = load_rulesets(("handwritten",))
    with pytest.raises(GraphoptError, match="unknown ruleset.*'nope'.*loaded: attention, canonical, fusion"):
        plan_schedule(rulesets, only=("nope",))
    with pytest.raises(GraphoptError, match="unknown engine 'magic'"):
        plan_schedule(rulesets, schedule=[("x", "magic", ("canonical",))])


def test_rulesets_no_phase_names_join_the_search(tmp_path):
    path = tmp_path / "mine.rules"
    path.write_text("rule relu-split:\n    inputs X:(a,b)\n"
                    "    add(relu(X), neg(relu(neg(X))))  ==  X\n    reason \"x = relu(x) - relu(-x)\"\n")
    plan = plan_schedule(load_rulesets(("handwritten", str(path))))
    assert plan[-1].phase.engine == "backtracking" and "mine" in plan[-1].phase.rulesets
    only = plan_schedule(load_rulesets(("handwritten", str(path))), only=("mine",))
    assert [len(s.patterns) for s in only] == [0, 0, 1]  # X -> ... matches everything: not used


def test_a_user_rule_file_is_applied(tmp_path):
    """A rule written by a user in the text format is verified when loaded and applied."""
    path = tmp_path / "mine.rules"
    path.write_text("# a user's rule\nrule relu-split:\n    inputs X:(a,b)\n"
                    "    add(relu(X), neg(relu(neg(X))))  ==  X\n    reason \"x = relu(x) - relu(-x)\"\n")

    class N(torch.nn.Module):
        def forward(self, x):
            y = x @ x.transpose(0, 1)
            return torch.relu(y) + -torch.relu(-y)

    x = torch.randn(8, 8)
    fast = graphopt.optimize(N(), (x,), rules=("default", "handwritten", str(path)))
    from graphopt.rulelang import load_rule_file
    rule = load_rule_file(path).rules[0]
    assert fast.report.applied.get(rule.id + "+") == 1, fast.report
    assert not fast.report.fallbacks
    torch.testing.assert_close(fast(x), N()(x))
    plain = graphopt.optimize(N(), (x,))
    assert not plain.report.fallbacks, plain.report   # not applied, and not applied then rolled back
    assert rule.id + "+" not in plain.report.applied


def test_a_false_user_rule_is_refused_with_its_counterexample(tmp_path):
    path = tmp_path / "wrong.rules"
    path.write_text("rule relu-is-identity:\n    inputs X:(a,b)\n    relu(X)  ==  X\n")
    with pytest.raises(GraphoptError, match=r"wrong.rules:1.*relu-is-identity.*differs"):
        graphopt.optimize(torch.nn.ReLU(), (torch.randn(3, 3),), rules=("default", str(path)))


def test_every_phase_is_reported():
    from graphopt.models import example
    model, inputs = example("gpt2", seq_len=16, layers=1)
    rep = graphopt.optimize(model, inputs, lint=True).report
    phases = rep.to_json()["phases"]
    assert list(phases) == ["canonicalise", "fuse", "search"]
    assert phases["fuse"]["applied"] >= 2 and "fuse: greedy over attention, fusion" in str(rep)


def test_schedule_option_changes_what_runs():
    from graphopt.models import example
    model, inputs = example("gpt2", seq_len=16, layers=1)
    search_only = [Phase("search", "backtracking", ("generated",))]
    rep = graphopt.optimize(model, inputs, schedule=search_only, rulesets=("generated",)).report
    assert not rep.fallbacks, rep   # not fused, and not fused then rolled back
    assert rep.attention["blocks"] == 1 and rep.attention["fused"] == 0, rep
    assert list(rep.to_json()["phases"]) == ["search"]
    assert DEFAULT_SCHEDULE[0].name == "canonicalise"


# -- found in review: the expansion and aliases never change what is computed -------------------

class _ReadThenWrite(torch.nn.Module):
    """A bias-free linear reads a buffer that is then updated in place; the double negation
    is rewritten, so the optimised graph (with the linear expanded) is what runs."""

    def __init__(self, form="linear-of-sum"):
        super().__init__()
        self.form = form
        self.register_buffer("h", torch.zeros(1, 16))
        self.w = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        F = torch.nn.functional
        if self.form == "linear-of-sum":
            y = F.linear(self.h + x, self.w)
        else:                                   # the expanded linear reads the buffer itself
            y = F.linear(self.h, self.w) + F.linear(x, self.w)
        self.h.mul_(0.5).add_(1.0)
        return -(-y)


@pytest.mark.parametrize("capture, form", [
    ("dynamo", "linear-of-sum"),
    ("export", "linear-of-sum"),
    ("dynamo", "sum-of-linears"),
    ("export", "sum-of-linears"),
])
def test_expanded_linear_keeps_its_place_before_a_later_write(capture, form):
    model, ref = _ReadThenWrite(form), _ReadThenWrite(form)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, 16)
    fast = graphopt.optimize(model, (x,), capture=capture)
    assert not fast.report.fallbacks, fast.report   # the rewritten graph runs, not the original
    assert fast.report.applied, fast.report
    model.h.zero_()
    ref.h.zero_()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fast(x), ref(x))


def test_a_clone_written_through_a_view_of_its_source_is_no_alias():
    class M(torch.nn.Module):
        def forward(self, x):
            x = x * 2.0
            y = x.clone()
            x[:, 0].zero_()
            return y + 1.0

    x = torch.randn(4, 4)
    fast = graphopt.optimize(M(), (x,), verify=False)
    torch.testing.assert_close(fast(x), M()(x))


def test_one_dimensional_linear_stays_a_call_and_the_rest_is_optimized():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, v, x):
            return torch.nn.functional.linear(v, self.w), -(-x)

    m, v, x = M(), torch.randn(16), torch.randn(3, 3)
    fast = graphopt.optimize(m, (v, x))
    assert not fast.report.fallbacks, fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(v, x), m(v, x))


def test_a_graph_only_expanded_is_left_as_it_was():
    g = graphopt.Graph()
    g.add_input("X", (2, 3, 4, 5))
    g.outputs = [g.add("permute", "X", perm=(0, 2, 3, 1))]
    from cost_models import get_cost_model
    from graphopt.pipeline import transform
    from graphopt.report import GraphReport
    assert transform(g, [], get_cost_model("roofline", device="cpu"), Options(), GraphReport()) is None
