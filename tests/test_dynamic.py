"""Dynamic shapes: graphs whose sizes are symbolic (a prompt of any length, a growing KV cache)
are optimised as they are: symbolic sizes through import, matching, rewriting and export,
masks built from the sizes proved causal (or all-kept) for every size, runtime masks fused as
SDPA's ``attn_mask``, verification at several sizes, one graph for every length."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import graphopt
from graphopt.dims import Dim, size_hints, solve
from graphopt.masks import MaskAnalysis, classify
from graphopt.optimize import LAST_REPORTS

transformers = pytest.importorskip("transformers")


# -- sizes ----------------------------------------------------------------------------

def test_symbolic_dim_arithmetic():
    s, t = Dim.sym("s0"), Dim.sym("s1")
    assert str((s + 1) * (t * 2)) == "2s0*s1+2s1"
    assert (s * 12).divide(4) == s * 3 and (s * t * 4).divide(s * 2) == t * 2
    assert (s + 12).divide(4) is None and (s + 1).divide(s) is None
    assert Dim.parse("a+2c").substitute({"a": 3, "c": s}) == s * 2 + 3
    with size_hints({"s0": 40}):
        assert (s * 12).hint() == 480
    with pytest.raises(TypeError):
        _ = s < 3      # a symbolic size is not ordered against a number


def test_rule_symbols_unify_with_symbolic_sizes_only_for_every_size():
    s = Dim.sym("s0")
    binding, unsolved = solve([(Dim.parse("b*h"), s * 12), (Dim.parse("h"), 12)])
    assert binding == {"h": 12, "b": s} and not unsolved
    assert solve([(Dim.parse("a+64"), s)]) is None            # s0 - 64 is not a size for every s0
    assert solve([(Dim.parse("a+c"), s + 64), (Dim.parse("c"), 64)])[0] == {"c": 64, "a": s}
    assert solve([(Dim.parse("a"), s), (Dim.parse("a"), 5)]) is None


def test_a_size_condition_that_holds_at_the_example_only_is_counted():
    from graphopt.dims import refused
    s = Dim.sym("s0")
    with size_hints({"s0": 100}):
        assert solve([(Dim.parse("a+64"), s)]) is None          # 100 - 64 > 0, but not for every s0
        assert solve([(Dim.parse("a+128"), s)]) is None         # fails at the example too: not counted
        assert refused() == {"a+64 = s0"}
    assert refused() == set()


# -- masks read symbolically -----------------------------------------------------------

def _captured(fn, *example):
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm
    torch.compile(fn, backend=backend, dynamic=True)(*example)
    return graphs[0]


def _kinds(fn, *example) -> set:
    gm = _captured(fn, *example)
    analysis = MaskAnalysis(gm)
    return {classify(v) for v in analysis.values.values()} - {None}


def _triu_full(x):
    t = x.shape[-1]
    return x + torch.triu(torch.full((t, t), float("-inf")), diagonal=1)


def _tril_bool(x):
    t = x.shape[-1]
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return x.masked_fill(~keep, float("-inf"))


def _arange_compare(x):
    t = x.shape[-1]
    i = torch.arange(t)
    return torch.where(i[None, :] <= i[:, None], x, -1e9)


def _causal_at_five_only(x):
    t = x.shape[-1]
    i = torch.arange(t)
    return torch.where(i[None, :] <= i[:, None] + (t - 5), x, -1e9)


def _one_query_sees_all(x):
    past = x.shape[-1] - 1            # a decode step: query at position `past`
    q = torch.arange(1) + past
    k = torch.arange(past + 1)
    keep = k[None, :] <= q[:, None]
    return torch.where(keep, torch.zeros(()), -1e9) + x[..., :1, :]


def _written_after(x):
    t = x.shape[-1]
    m = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
    v = m[None]
    m[:, :1] = 0.0            # an in-place write after the view was taken: not causal any more
    return x + v


def _negative_gather(x):
    t = x.shape[-1]
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool))
    p = torch.arange(t) - 1   # index -1 reads the last row
    return torch.where(keep[p[:, None], p[None, :]], x, -1e9)


def _float_tril(x):
    t = x.shape[-1]
    m = torch.tril(torch.full((t, t), True, dtype=torch.float32))   # 1.0 / 0.0, not a boolean mask
    return x + m


@pytest.mark.parametrize("fn", [_written_after, _negative_gather, _float_tril])
def test_masks_that_only_look_causal_are_not_proved(fn):
    """The mask that reaches the scores (the operand of the last add/where) is not proved."""
    gm = _captured(fn, torch.randn(2, 5, 5))
    from graphopt.masks import mask_facts
    facts = mask_facts(gm)
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    used = [a for a in last.all_input_nodes if a.op != "placeholder"]
    assert used and not any(facts.get(a) for a in used), (facts, last.format_node())


@pytest.mark.parametrize("fn", [_triu_full, _tril_bool, _arange_compare])
def test_masks_from_sizes_are_proved_causal(fn):
    assert "causal" in _kinds(fn, torch.randn(2, 5, 5))


def test_a_mask_causal_only_at_the_example_size_is_not_proved():
    assert _kinds(_causal_at_five_only, torch.randn(2, 5, 5)) == set()


def test_a_decode_step_that_sees_every_key_is_proved_unmasked():
    assert "zeros" in _kinds(_one_query_sees_all, torch.randn(2, 1, 6))


# -- attention with a symbolic length ----------------------------------------------------

class Attention(torch.nn.Module):
    """Multi-head self-attention written out, with the mask built one of several ways."""

    def __init__(self, mask: str, heads: int = 2, d: int = 8):
        super().__init__()
        self.mask, self.heads, self.d = mask, heads, d
        self.qkv = torch.nn.Linear(heads * d, 3 * heads * d, bias=False)

    def forward(self, x, keep=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        if self.mask == "triu":
            s = s + torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        elif self.mask == "arange":
            i = torch.arange(t)
            s = torch.where(i[None, :] <= i[:, None], s, torch.finfo(s.dtype).min)
        elif self.mask == "shifted":         # causal at t == 5 only
            i = torch.arange(t)
            s = torch.where(i[None, :] <= i[:, None] + (t - 5), s, torch.finfo(s.dtype).min)
        elif self.mask == "padding":          # a runtime key-padding mask (B, T) of booleans
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)


def _compile_and_run(model, lengths, with_keep=False):
    torch._dynamo.reset()    # (Dynamo's cache is per code object: every test compiles anew)
    LAST_REPORTS.clear()
    torch.manual_seed(0)
    compiled = torch.compile(model, backend="graphopt", dynamic=True)
    for t in lengths:
        x = torch.randn(2, t, 16)
        args = (x,)
        if with_keep:
            keep = torch.ones(2, t, dtype=torch.bool)
            keep[0, : t // 2] = False      # left padding on the first row
            args = (x, keep)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    return list(LAST_REPORTS)


@pytest.mark.parametrize("mask", ["triu", "arange"])
def test_causal_attention_of_any_length_is_one_fused_graph(mask):
    # (Dynamo compiles a length of 1 on its own: it specialises sizes 0 and 1; the symbolic
    # graph is verified at 1 all the same)
    reports = _compile_and_run(Attention(mask).eval(), [5, 7, 13, 30, 2])
    assert len(reports) == 1, [str(r) for r in reports]   # one graph for every length
    rep = reports[0]
    assert not rep.fallbacks, rep
    assert rep.attention["fused"] == rep.attention["causal"] == 1, rep
    sizes = rep.to_json()["symbolic_sizes"][0]
    assert sizes["symbols"] and any(k.startswith("causal") for k in sizes["proved"]), sizes
    verified = [b for b in sizes["verified_at"]]
    assert any(set(b.values()) == {1} for b in verified) and len(verified) >= 4, verified
    assert "symbolic:" in str(rep) and "verified at" in str(rep)


def test_a_mask_not_provable_for_every_size_stays_explicit():
    reports = _compile_and_run(Attention("shifted").eval(), [5, 7, 9])
    assert len(reports) == 1 and not reports[0].fallbacks, [str(r) for r in reports]
    a = reports[0].attention
    assert a["fused"] == a["masked"] == 1 and a["causal"] == 0, a


def test_a_runtime_padding_mask_is_fused_as_attn_mask():
    reports = _compile_and_run(Attention("padding").eval(), [6, 9, 14], with_keep=True)
    assert len(reports) == 1 and not reports[0].fallbacks, [str(r) for r in reports]
    a = reports[0].attention
    assert a["fused"] == a["masked"] == 1, a


def test_torch_export_with_symbolic_sizes_is_fused_causal():
    """torch.export's ATen graph with a symbolic length (``dynamic=True``: every axis
    ``Dim.AUTO``): the mask's aten calls are read symbolically too."""
    model = Attention("arange").eval()
    fast = graphopt.optimize(model, (torch.randn(2, 6, 16),), capture="export", dynamic=True)
    rep = fast.report
    assert not rep.fallbacks and rep.attention["fused"] == rep.attention["causal"] == 1, rep
    assert rep.to_json()["symbolic_sizes"], rep
    for t in (3, 9, 40):
        x = torch.randn(2, t, 16)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert fast.stats()["optimized"] == 3, fast.stats()


def test_verification_at_other_sizes_keeps_the_original(monkeypatch):
    """An optimised graph that is right at the example's size only is caught by the trials at
    other sizes, and the original graph is kept."""
    import importlib
    go = importlib.import_module("graphopt.optimize")
    real_export = go.FxFrontend.export

    def wrong_elsewhere(self, imp, graph):
        fast = real_export(self, imp, graph)
        hint = next(x for x in self.example_inputs if isinstance(x, torch.Tensor)).shape[1]

        class Skewed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = fast

            def forward(self, *args):
                out = self.inner(*args)
                t = next(a for a in args if isinstance(a, torch.Tensor)).shape[1]
                return out if t == hint else tuple(o + 1 for o in out)
        return Skewed()
    monkeypatch.setattr(go.FxFrontend, "export", wrong_elsewhere)
    reports = _compile_and_run(Attention("triu").eval(), [5, 7])
    assert reports and "verification failed" in (reports[0].fallbacks or [""])[0], [str(r) for r in reports]


# -- Hugging Face models: prompts of every length, generation with the dynamic cache -----

def _hf(arch):
    kw = dict(n_layer=2, n_embd=64, n_head=4) if arch == "gpt2" else dict(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128)
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=100, attn_implementation="eager", **kw)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _kernels(fn) -> Counter:
    with profile() as p:
        fn()
    names = Counter(e.name for e in p.events())
    return Counter({"softmax": sum(v for k, v in names.items() if k in ("aten::softmax", "aten::_softmax")),
                    "sdpa": names["aten::scaled_dot_product_attention"]})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompts_of_every_length_run_fused_in_two_graphs(arch):
    model = _hf(arch)
    LAST_REPORTS.clear()
    compiled = torch.compile(model, backend="graphopt")
    lengths = [16, 24, 40, 57, 96, 130]
    with torch.no_grad():
        for t in lengths:
            ids = torch.randint(0, 100, (1, t))
            got = compiled(ids, use_cache=False).logits
            torch.testing.assert_close(got, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        ids = torch.randint(0, 100, (1, 77))
        counts = _kernels(lambda: compiled(ids, use_cache=False))
    assert len(LAST_REPORTS) == 2, [str(r) for r in LAST_REPORTS]   # the first length, then all others
    for rep in LAST_REPORTS:
        assert not rep.fallbacks and rep.attention["fused"] == rep.attention["causal"] == 2, rep
    assert counts == Counter({"sdpa": 2}), counts


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_with_the_dynamic_cache_is_fused_at_every_step(arch):
    model = _hf(arch)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    model.forward = torch.compile(model.forward, backend="graphopt")
    LAST_REPORTS.clear()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=20, do_sample=False)     # compiles
        counts = _kernels(lambda: model.generate(ids, max_new_tokens=20, do_sample=False))
        got = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, expected)
    steps = got.shape[1] - ids.shape[1]     # (fewer than 20 when an end-of-text token came)
    assert counts == Counter({"sdpa": 2 * steps}), counts        # 2 layers per step, no softmax
    assert len(LAST_REPORTS) <= 3 and all(not r.fallbacks for r in LAST_REPORTS), [str(r) for r in LAST_REPORTS]
    decode = LAST_REPORTS[-1].to_json()["symbolic_sizes"]
    assert decode and decode[0]["proved"].get("zeros"), decode   # one query sees every cached key


# -- ONNX with dynamic axes ---------------------------------------------------------------

def test_an_onnx_export_with_dynamic_axes_is_fused_and_keeps_them(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    import numpy as np

    from graphopt.models import Logits
    from graphopt.optimize_onnx import onnx_report, optimize_onnx
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, attn_implementation="eager")
    model = Logits(transformers.GPT2LMHeadModel(cfg).eval()).eval()
    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(0, 100, (1, 16)),), str(path), dynamo=True, opset_version=23,
                          dynamic_shapes=({1: torch.export.Dim("seq")},), verbose=False)
    out = optimize_onnx(str(path))
    report = onnx_report(out)
    assert not report["fallbacks"], report
    assert [n.op_type for n in out.graph.node].count("Attention") == 2
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][1] == "seq"
    onnx.checker.check_model(out, full_check=True)
    sizes = report["symbolic_sizes"][0]
    assert sizes["symbols"] == {"seq": 128} and len(sizes["verified_at"]) >= 4, sizes
    a, b = ort.InferenceSession(str(path)), ort.InferenceSession(out.SerializeToString())
    for t in (1, 7, 33):
        ids = np.random.default_rng(t).integers(0, 100, (1, t)).astype(np.int64)
        np.testing.assert_allclose(b.run(None, {"input_ids": ids})[0], a.run(None, {"input_ids": ids})[0],
                                   rtol=1e-4, atol=1e-5)
