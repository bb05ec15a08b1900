"""graphopt.optimize and the torch.compile backend on small GPT-2 and Llama models."""
import json

import pytest
import torch

import graphopt
from graphopt.models import GPT, GPTConfig, Llama, LlamaConfig

SMALL_GPT = GPTConfig(vocab=100, n_layer=2, n_head=4, d_model=64, max_seq=64)
SMALL_LLAMA = LlamaConfig(vocab=100, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq=64)


def _model(kind):
    torch.manual_seed(0)
    model = (GPT(SMALL_GPT) if kind == "gpt2" else Llama(SMALL_LLAMA)).eval()
    return model, (torch.randint(0, 100, (2, 24)),)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_optimized_model_computes_the_same(kind, capture):
    model, inputs = _model(kind)
    fast = graphopt.optimize(model, inputs, capture=capture, time_limit=20)
    rep = fast.report
    assert rep.graphs and not rep.fallbacks, rep
    assert rep.applied, "some rule should apply"
    with torch.no_grad():
        _close(fast(*inputs), model(*inputs))
        other = (torch.randint(0, 100, (2, 24)),)
        _close(fast(*other), model(*other))
    assert rep.cost_after < rep.cost_before


def test_llama_projections_are_merged():
    """q/k/v and gate/up share their input: the merge rule (TASO Fig. b) fires and
    the concatenated weights are computed once (folded)."""
    model, inputs = _model("llama")
    rep = graphopt.optimize(model, inputs, time_limit=20).report
    merges = {k: v for k, v in rep.to_json()["rewrites"].items() if "concat" in v}
    assert merges, rep.to_json()["rewrites"]
    # 2 layers x (q,k,v: 2 merges + gate,up: 1 merge) at least
    assert sum(rep.applied[k] for k in merges) >= 6, (dict(rep.applied), rep.to_json()["phases"]["search"])
    assert sum(g.folded for g in rep.graphs) >= 6, (dict(rep.applied), rep.to_json()["phases"]["search"])


@pytest.mark.parametrize("search", ["backtracking", "egraph"])
def test_scale_moves_to_the_smaller_operand(search):
    """(q @ k^T) / sqrt(d) -> (q * (1/sqrt(d))) @ k^T: the canonical form of the division,
    then a generated rule moves the scale onto an operand, smaller than the product.  (In
    GPT-2 the attention ruleset fuses this into SDPA first, scale and all.)  The e-graph may
    reach it through a form between the two: it names the rule of the last step."""
    class Scores(torch.nn.Module):
        def forward(self, q, k):
            return (q @ k.transpose(-1, -2)) / 8.0

    q, k = torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    rep = graphopt.optimize(Scores(), (q, k), search=search).report
    rewrites = rep.to_json()["rewrites"].values()
    assert "sdiv(X, s)  ->  smul(X, recip(s))" in rewrites
    moved = [t for t in rewrites if "matmul(" in t and "smul(" in t.split("->")[1]]
    assert moved, list(rewrites)
    if search == "backtracking":
        assert any(t.startswith("smul(matmul(") for t in moved), moved
    assert rep.cost_after < rep.cost_before


def test_search_is_deterministic():
    model, inputs = _model("llama")
    a = graphopt.optimize(model, inputs, time_limit=30).report
    b = graphopt.optimize(model, inputs, time_limit=30).report
    assert a.applied == b.applied and a.cost_after == b.cost_after


def test_user_module_is_not_modified():
    model, inputs = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt.optimize(model, inputs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_rule_falls_back(tmp_path):
    """A false rule (dropping a division) passes the matcher; verification catches the
    difference and the original graph is used."""
    bad = {"format": "graphopt-rules", "schema_version": 1, "rules": [{
        "inputs": [{"name": "X", "shape": ["a", "b"]}, {"name": "Y", "shape": ["b", "c"]},
                   {"name": "s", "shape": []}],
        "src": {"nodes": [{"op": "matmul", "inputs": ["X", "Y"]}, {"op": "sdiv", "inputs": ["%0", "s"]}],
                "outputs": ["%1"]},
        "dst": {"nodes": [{"op": "matmul", "inputs": ["X", "Y"]}], "outputs": ["%0"]}}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    model, inputs = _model("gpt2")
    fast = graphopt.optimize(model, inputs, rules=(str(path),), cost_model="roofline")
    rep = fast.report
    assert rep.graphs[0].applied, "the false rule is cheaper, so the search applies it"
    assert rep.fallbacks and "verification failed" in rep.fallbacks[0]
    assert not rep.applied  # a fallen-back graph reports no applied rules
    with torch.no_grad():
        _close(fast(*inputs), model(*inputs))


def test_torch_compile_backend_and_inductor(monkeypatch):
    """The backend is registered at import; each compile below runs it afresh (no code cached
    and no report left by an earlier test), rewrites the graph without a fallback and, with
    ``inductor``, hands the result to inductor."""
    from torch._inductor import compile_fx as inductor
    from graphopt.optimize import LAST_REPORTS
    assert "graphopt" in torch._dynamo.list_backends(exclude_tags=())
    real, to_inductor = inductor.compile_fx, []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, *a, **k: to_inductor.append(gm) or real(gm, *a, **k))
    model, inputs = _model("gpt2")
    try:
        with torch.no_grad():
            ref = model(*inputs)
            for options in (None, {"inductor": True}):
                torch._dynamo.reset()
                LAST_REPORTS.clear()
                _close(torch.compile(model, backend="graphopt", options=options)(*inputs), ref)
                assert LAST_REPORTS, "the graphopt backend was not called"
                for rep in LAST_REPORTS:
                    assert rep.graphs and rep.applied and not rep.fallbacks, rep
                assert len(to_inductor) == (len(LAST_REPORTS) if options else 0), (options, to_inductor)
    finally:
        torch._dynamo.reset()


def test_graph_breaks_and_unknown_ops():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            y = (x @ self.w) / 4.0
            if y.sum() > 0:                 # data-dependent control flow: a graph break
                y = torch.special.erf(y)    # an op the registry does not know
            print("", end="")               # another graph break
            return torch.cumsum(y, -1) @ self.w.t()
    model, x = Odd(), torch.randn(3, 8)
    fast = graphopt.optimize(model, (x,))
    assert len(fast.report.graphs) >= 2
    assert not fast.report.fallbacks, fast.report   # the unknown op stays opaque: no failure
    with torch.no_grad():
        for t in (x, -x):
            _close(fast(t), model(t))


def test_bad_options():
    model, inputs = _model("gpt2")
    with pytest.raises(graphopt.GraphoptError, match="unknown graphopt option"):
        graphopt.optimize(model, inputs, speed="max")
    with pytest.raises(graphopt.GraphoptError, match="alpha"):
        graphopt.optimize(model, inputs, alpha=0.9)
    with pytest.raises(graphopt.GraphoptError, match="unknown capture"):
        graphopt.optimize(model, inputs, capture="trace")
