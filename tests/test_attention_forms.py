"""The attention forms models really use, through both capture paths: PyTorch's own SDPA
pattern catalogue (benchmarks/attention_catalogue.py, written here as plain module code),
the forms of the Hugging Face zoo (no scale, ALiBi, multi-query broadcast, 3-D bmm views),
and the blocks SDPA cannot compute exactly, which are left alone with their reason."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt import explain
from graphopt.dims import Dim, same_size, shape_of, unify

ROOT = Path(__file__).resolve().parent.parent


def _catalogue():
    spec = importlib.util.spec_from_file_location("attention_catalogue", ROOT / "benchmarks" / "attention_catalogue.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CAT = _catalogue()
FORMS = [f.name for f in CAT.catalogue()]
LOWER_PRECISION = {"7", "8", "9", "10"}   # cast the weights to float16 between the matmuls


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("name", FORMS)
def test_catalogue_form(name, capture):
    """Every form of the catalogue is fused (no softmax kernel runs, an SDPA kernel does,
    outputs equal on the example and on fresh inputs), but the four that cast the weights to
    float16 between the matmuls, which are left alone with that reason."""
    form = next(f for f in CAT.catalogue() if f.name == name)
    row = CAT.run_form(form, capture)
    assert row["diff"] < 1e-4, row
    assert not row["fallbacks"], row
    if name in LOWER_PRECISION:
        assert not row["fused"] and row["kernels"]["sdpa"] == 0, row
        assert row["reasons"] == {explain.LOWER_CAST: 1}, row
    else:
        assert row["fused"] and row["attention"]["fused"] == row["attention"]["blocks"] == 1, row
        assert row["reasons"] == {}, row


def test_catalogue_summary_counts_from_the_outside():
    """The benchmark's verdict comes from the kernels that ran, not from graphopt's report:
    a form graphopt is told not to fuse (no attention ruleset) counts as not fused."""
    form = next(f for f in CAT.catalogue() if f.name == "1")
    fast = graphopt.optimize(form, form.example, rulesets=["canonical", "generated"])
    assert CAT.kernels(fast, form.example) == {"softmax": 1, "sdpa": 0}


# -- the forms SDPA cannot compute exactly: left alone, with the reason per block -------------

class SoftCapped(torch.nn.Module):
    """Gemma 2's logit soft-capping: tanh(scores / cap) * cap before the softmax."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        s = torch.tanh(s / 50.0) * 50.0
        return s.softmax(-1) @ v


class Sinks(torch.nn.Module):
    """gpt-oss's attention sinks: one extra logit per head joins the softmax, then is dropped."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(4))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        sink = self.sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[-2], 1)
        both = torch.cat([s, sink], dim=-1)
        p = both.softmax(-1)[..., :-1]
        return p @ v


class SinkDroppedWrong(Sinks):
    """A near miss of the sink form: the first key's column is dropped, not the sink's."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        sink = self.sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[-2], 1)
        p = torch.cat([s, sink], dim=-1).softmax(-1)[..., 1:]
        return p @ torch.cat([v[..., :1, :], v], dim=-2)[..., 1:, :].contiguous()


class ZeroOneMask(torch.nn.Module):
    """openai-gpt: ``w * b + -1e4 * (1 - b)`` with b a 0/1 causal buffer: masked scores are -1e4."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.ones(12, 12).tril()[None, None])

    def forward(self, q, k, v):
        w = q @ k.transpose(-2, -1) * 0.25
        b = self.bias[:, :, : w.size(-2), : w.size(-1)]
        w = w * b + -1e4 * (1 - b)
        return w.softmax(-1) @ v


class ReturnsWeights(torch.nn.Module):
    """The attention weights are an output too (output_attentions)."""

    def forward(self, q, k, v):
        w = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return w @ v, w


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, 12, 16, generator=g) for _ in range(3))


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("model, reason", [
    (SoftCapped(), explain.SOFT_CAP),
    (SinkDroppedWrong(), explain.SINKS),
    (ZeroOneMask(), explain.SCORES_TIMES_TENSOR),
    (ReturnsWeights(), explain.RETURNED),
])
def test_blocks_sdpa_cannot_compute_are_left_alone_with_the_reason(model, reason, capture):
    inputs = _qkv()
    fast = graphopt.optimize(model, inputs, capture=capture)
    rep = fast.report
    assert not rep.fallbacks, rep
    assert rep.attention["blocks"] == 1 and rep.attention["fused"] == 0, rep
    assert rep.attention_reasons == {reason: 1}, rep
    assert f"not fused      1 block(s): {reason}" in str(rep)
    with torch.no_grad():
        for got, want in zip(_flat(fast(*_qkv(1))), _flat(model(*_qkv(1)))):
            torch.testing.assert_close(got, want)


def _flat(x):
    return x if isinstance(x, tuple) else (x,)


def test_a_router_softmax_is_not_an_attention_block():
    """A mixture-of-experts gate (softmax over expert logits, no @ V) is not counted."""
    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(16, 4, bias=False)

        def forward(self, x):
            w = self.gate(x).softmax(-1)
            return x * w.sum(-1, keepdim=True)

    fast = graphopt.optimize(Router(), (torch.randn(3, 16),))
    assert fast.report.attention["blocks"] == 0 and fast.report.attention_reasons == {}


# -- runtime masks keep eager's answer, even where a query sees no key ------------------------

class BoolKeep(torch.nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) / 4.0
        s = torch.where(keep, s, torch.full((), self.fill, dtype=s.dtype))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, float("-inf")])
def test_boolean_runtime_mask_with_a_query_that_sees_no_key(fill, capture):
    """A keep-mask computed at run time is fused as SDPA's explicit mask; a query row with
    every key dropped gets eager's answer (uniform weights for the lowest float, NaN for
    -inf), not SDPA's zeros."""
    q, k, v = _qkv()
    keep = torch.rand(2, 4, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., 0] = True
    model = BoolKeep(fill)
    fast = graphopt.optimize(model, (q, k, v, keep), capture=capture)
    assert fast.report.attention["fused"] == fast.report.attention["masked"] == 1, fast.report
    dead = keep.clone()
    dead[0, 1, 5] = False          # query 5 of head 1 sees nothing
    with torch.no_grad():
        want, got = model(q, k, v, dead), fast(q, k, v, dead)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(want[0, 1, 5]).all() == (fill == float("-inf"))


# -- the zoo's forms on small Hugging Face models ----------------------------------------------

transformers = pytest.importorskip("transformers")


def _causal_lm(arch, **kw):
    from graphopt.models import Logits
    torch.manual_seed(0)
    base = dict(vocab_size=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    cfg = transformers.AutoConfig.for_model(arch, **base, **kw)
    return Logits(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval())


ZOO = {
    # arch: (config, fused blocks expected as (causal, masked, gqa))
    "bloom": (dict(n_layer=2, hidden_size=64, n_head=4), (0, 2, 0)),         # ALiBi by baddbmm, 3-D views
    "falcon": (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4), (2, 0, 2)),  # one K/V head
    "gpt_neo": (dict(num_layers=2, hidden_size=64, num_heads=4, attention_types=[[["global", "local"], 1]],
                     max_position_embeddings=128), (0, 2, 0)),             # no scale
    "mpt": (dict(n_layers=2, d_model=64, n_heads=4, expansion_ratio=2), (0, 2, 0)),   # ALiBi
    "gpt_oss": (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"]), (2, 0, 0)),  # sinks, row max
    "granite_swa": (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64), None),                     # sinks through the log-sum-exp
    "xglm": (dict(num_layers=2, d_model=64, attention_heads=4, ffn_dim=64), (2, 0, 0)),  # clamped scores
    "xlm": (dict(n_layers=2, emb_dim=64, n_heads=4, causal=True), None),   # scores.masked_fill_(...)
}


DYNAMO_ONLY = {"xlm"}     # torch.export stops at XLM's data-dependent `lengths.max().item()`


@pytest.mark.parametrize("arch, capture", [(a, c) for a in sorted(ZOO) for c in ("dynamo", "export")
                                           if not (c == "export" and a in DYNAMO_ONLY)])
def test_zoo_architecture_is_fused(arch, capture):
    kw, expect = ZOO[arch]
    model = _causal_lm(arch, **kw)
    ids = torch.randint(1, 128, (2, 19))
    fast = graphopt.optimize(model, (ids,), capture=capture)
    att = fast.report.attention
    assert not fast.report.fallbacks, fast.report
    assert att["blocks"] == att["fused"] == 2, fast.report
    if expect is not None:
        assert (att["causal"], att["masked"], att["gqa"]) == expect, fast.report
    with torch.no_grad():
        other = torch.randint(1, 128, (2, 19))
        torch.testing.assert_close(fast(other), model(other), rtol=1e-4, atol=1e-4)


def test_t5_encoder_decoder_every_block_fused():
    """T5: no scale, a relative position bias added to the scores, a float upcast around the
    softmax; encoder, decoder self- and cross-attention."""
    class Seq2Seq(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, dec):
            return self.m(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                attn_implementation="eager")
    model = Seq2Seq(transformers.T5ForConditionalGeneration(cfg).eval())
    ids, dec = torch.randint(2, 128, (2, 19)), torch.randint(2, 128, (2, 11))
    fast = graphopt.optimize(model, (ids, dec))
    att = fast.report.attention
    assert not fast.report.fallbacks and att["blocks"] == att["fused"] == 6, fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, dec), model(ids, dec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gpt2_fuses_gelu_and_proves_causal(dtype):
    """GPT-2 in bf16/fp16: the written-out GELU's constants are compared at the model's
    precision, and the float16 causal mask (-65504) is proved causal."""
    model = _causal_lm("gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=64).to(dtype)
    ids = torch.randint(1, 128, (1, 19))
    fast = graphopt.optimize(model, (ids,))
    rep = fast.report
    assert rep.attention["fused"] == rep.attention["causal"] == 2, rep
    assert any("gelu_tanh" in r for r in rep.rewrites.values()), rep


# -- product dims (b*h), what the 3-D rules need ----------------------------------------------

def test_product_dims_parse_evaluate_and_solve():
    d = Dim.parse("h*b")
    assert str(d) == "b*h" and d.symbols == ("b", "h") and d.evaluate({"b": 2, "h": 3}) == 6
    assert unify([(Dim.parse("b*h"), 8), (Dim.parse("b"), 2)]) == {"b": 2, "h": 4}
    assert unify([(Dim.parse("b*h"), 7), (Dim.parse("b"), 2)]) is None      # 7 is not 2 * h
    assert same_size(shape_of(["b*h", "t"]), shape_of(["b", "h", "t"]))
    assert not same_size(shape_of(["b*h", "t"]), shape_of(["b", "t", "t"]))


def test_a_3d_rule_is_refused_when_the_merged_axis_is_split_back_another_way():
    """The lift rules match a (b*h, t, n) view split back as (b, h, t, n) of the very tensors
    merged; split back as (h, b, t, n) (a near miss: the same sizes, another order) they must
    not apply, and the result stays the model's."""
    class SplitOtherWay(torch.nn.Module):
        def forward(self, q, k, v, mask):
            b, h, t, d = q.shape
            q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
            s = torch.bmm(q3, k3.transpose(1, 2)).view(h, b, t, t) + mask
            return torch.bmm(s.softmax(-1).view(b * h, t, t), v3)

    q, k, v = _qkv()
    mask = torch.randn(4, 2, 12, 12)              # (h, b, t, t)
    model = SplitOtherWay()
    fast = graphopt.optimize(model, (q, k, v, mask))
    assert not fast.report.fallbacks, fast.report
    assert "lift-scores-matmul" not in _rule_names(fast.report), fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(*_qkv(2), mask), model(*_qkv(2), mask))


def _rule_names(report) -> list:
    from graphopt.schedule import load_rulesets
    names = {r.id: r.name for rules in load_rulesets(("handwritten",)).values() for r in rules}
    return [names.get(k[:-1], k) for k in report.applied]


def test_unscaled_attention_gets_scale_one():
    class NoScale(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    q, k, v = _qkv()
    fast = graphopt.optimize(NoScale(), (q, k, v))
    assert fast.report.attention["fused"] == 1
    code = "\n".join(gm.code for gm in fast.graph_modules)
    assert "scale = 1.0" in code, code
    with torch.no_grad():
        torch.testing.assert_close(fast(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=1.0))


# -- attention sinks: an extra logit per query row, dropped after the softmax ----------------

class GptOssSinks(torch.nn.Module):
    """gpt-oss / DeepSeek-V4 / MiMo: a causal mask, the sinks, the row maximum taken off
    (``max(dim).values``), a softmax with ``dtype=``, the sink column sliced off."""

    def __init__(self, heads=4, t=12):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads))
        mask = torch.full((t, t), float("-inf")).triu(1)
        self.register_buffer("mask", mask[None, None])

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25 + self.mask
        sink = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        both = torch.cat([s, sink], dim=-1)
        both = both - both.max(dim=-1, keepdim=True).values
        p = F.softmax(both, dim=-1, dtype=both.dtype)[..., :-1]
        return torch.matmul(F.dropout(p, p=0.0, training=False).to(v.dtype), v)


class TokenSinks(torch.nn.Module):
    """Inkling2: a sink per query token and head, projected from the input."""

    def __init__(self, heads=4):
        super().__init__()
        self.proj = torch.nn.Linear(16, heads, bias=False)

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / 4.0
        sink = self.proj(q.mean(1)).transpose(1, 2).unsqueeze(-1)     # (b, h, t, 1)
        return F.softmax(torch.cat([s, sink], dim=-1).float(), dim=-1)[..., :-1] @ v


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("model, causal", [(Sinks(), 0), (GptOssSinks(), 1), (TokenSinks(), 0)])
def test_attention_sinks_are_fused(model, causal, capture):
    """The sink only adds e^z to the softmax's denominator: fused as SDPA rescaled by its
    log-sum-exp (no softmax kernel runs, one SDPA kernel does), outputs equal on fresh inputs."""
    fast = graphopt.optimize(model, _qkv(), capture=capture)
    rep = fast.report
    assert not rep.fallbacks, rep
    assert rep.attention["fused"] == rep.attention["blocks"] == rep.attention["sink"] == 1, rep
    assert rep.attention["causal"] == causal, rep
    assert "1 with a sink" in str(rep)
    with torch.no_grad():
        torch.testing.assert_close(fast(*_qkv(1)), model(*_qkv(1)))
        assert CAT.kernels(fast, _qkv(2)) == {"softmax": 0, "sdpa": 1}


def test_attention_sinks_in_bfloat16():
    model = GptOssSinks().to(torch.bfloat16)
    inputs = tuple(x.to(torch.bfloat16) for x in _qkv())
    fast = graphopt.optimize(model, inputs)
    assert fast.report.attention["fused"] == fast.report.attention["sink"] == 1, fast.report
    fresh = tuple(x.to(torch.bfloat16) for x in _qkv(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(*fresh).float(), model(*fresh).float(), atol=2e-2, rtol=2e-2)


def test_sink_attention_kernel_paths_agree_with_eager():
    """Both kernels of sdpa_sink (the CPU flash kernel's log-sum-exp, the extra key through
    public SDPA, used on other devices) against the eager definition, masked and causal,
    including a row whose keys are all masked."""
    from graphopt.ops.attention import sink_attention
    q, k, v = _qkv()
    z = torch.randn(1, 4, 1, 1).expand(2, 4, 12, 1)
    mask = torch.zeros(12, 12).masked_fill(torch.rand(12, 12) < 0.3, float("-inf"))
    mask[3] = float("-inf")

    def eager(m):
        s = q @ k.transpose(-2, -1) * 0.25 + m
        return torch.cat([s, z], -1).softmax(-1)[..., :-1] @ v

    causal = torch.full((12, 12), float("-inf")).triu(1)
    for kw, m in (({"mask": mask}, mask), ({"is_causal": True}, causal)):
        want = eager(m)
        torch.testing.assert_close(sink_attention(q, k, v, z, 0.25, **kw), want)
        torch.testing.assert_close(sink_attention(q[0], k[0], v[0], z[0], 0.25, **kw), want[0])  # 3-D: extra key
        per_head = z[0, :, :1]                                     # (h, 1, 1): one sink per head
        torch.testing.assert_close(sink_attention(q, k, v, per_head, 0.25, **kw), want)


def test_row_maximum_taken_off_before_a_softmax_is_the_same_softmax():
    """MiMo's blocks without a sink: ``s - s.max(-1, keepdim=True).values`` then softmax."""
    class Shifted(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) * 0.25
            s = s - s.amax(-1, keepdim=True)
            return s.softmax(-1) @ v

    model = Shifted()
    fast = graphopt.optimize(model, _qkv())
    assert fast.report.attention["fused"] == 1, fast.report
    assert "softmax(bsub(X, amax(X, axis=-1)))  ->  softmax(X)" in str(fast.report)
    torch.testing.assert_close(fast(*_qkv(1)), model(*_qkv(1)))


def test_max_whose_indices_are_read_stays_as_it_is():
    """``max(dim)`` is modelled as its values only when nothing reads the indices."""
    class ArgToo(torch.nn.Module):
        def forward(self, x):
            m = x.max(dim=-1, keepdim=True)
            return x - m.values, m.indices

    model = ArgToo()
    x = torch.randn(3, 5)
    fast = graphopt.optimize(model, (x,))
    for got, want in zip(fast(torch.randn(3, 5) + 1), model(torch.randn(3, 5) + 1)):
        assert got.shape == want.shape
    y = torch.randn(3, 5)
    for got, want in zip(fast(y), model(y)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("index, part, left", [
    ((Ellipsis, slice(None, -1)), 0, 6), ((Ellipsis, slice(2, None)), 1, 2),
    ((slice(None), slice(None, 3)), 0, 3), ((slice(None), slice(-3, None)), 1, 4)])
def test_a_slice_of_one_axis_is_a_part_of_split(index, part, left):
    from graphopt.frontends.fx import import_fx

    class Sliced(torch.nn.Module):
        def forward(self, x):
            return x[index] * 2.0

    gm = torch.fx.symbolic_trace(Sliced())
    imp = import_fx(gm, (torch.randn(4, 7),))
    at = [k for k, n in enumerate(imp.graph.nodes) if n.op == "split"]
    assert len(at) == 1 and imp.graph.nodes[at[0]].attr_dict["left"] == left
    (scaled,) = [n for n in imp.graph.nodes if n.op == "smul"]
    assert scaled.inputs[0] == f"%{at[0]}.{part}"


# -- in-place writes, clamped scores, sinks through the log-sum-exp ----------------------------

class InPlaceMasked(torch.nn.Module):
    """XLM: ``scores.masked_fill_(mask, min)`` as a statement on a fresh Q K^T, then read."""

    def __init__(self, read_before=False):
        super().__init__()
        self.read_before = read_before

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q / 4.0, k.transpose(2, 3))
        before = scores * 2.0 if self.read_before else None       # a read of the unmasked scores
        mask = (keep == 0).view(q.shape[0], 1, 1, -1).expand_as(scores)
        scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(scores), v)
        return out if before is None else (out, before)


def _keep(seed):
    keep = torch.ones(2, 12)
    keep[seed % 2, 5 + seed:] = 0
    return keep


@pytest.mark.parametrize("capture", ["dynamo", "export"])
def test_scores_written_in_place_are_read_as_the_functional_call(capture):
    model = InPlaceMasked()
    fast = graphopt.optimize(model, (*_qkv(), _keep(0)), capture=capture)
    assert fast.report.attention["fused"] == fast.report.attention["masked"] == 1, fast.report
    torch.testing.assert_close(fast(*_qkv(1), _keep(1)), model(*_qkv(1), _keep(1)))


def test_scores_read_before_the_in_place_write_keep_their_old_value():
    """A near miss: the unmasked scores are read before the write, so the write stays a
    write (not fused) and the early read still sees the unmasked values."""
    model = InPlaceMasked(read_before=True)
    fast = graphopt.optimize(model, (*_qkv(), _keep(0)))
    assert fast.report.attention["fused"] == 0, fast.report
    for got, want in zip(fast(*_qkv(1), _keep(1)), model(*_qkv(1), _keep(1))):
        torch.testing.assert_close(got, want)


class Clamped(torch.nn.Module):
    """XGLM: the masked scores clamped at the dtype's lowest value before the softmax."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25 + self.mask
        s = torch.max(s, torch.full((), torch.finfo(s.dtype).min))
        return s.softmax(-1) @ v


def test_scores_clamped_after_a_causal_mask_are_fused():
    low = torch.finfo(torch.float32).min
    model = Clamped(torch.full((12, 12), low).triu(1))
    fast = graphopt.optimize(model, _qkv())
    assert fast.report.attention["fused"] == fast.report.attention["causal"] == 1, fast.report
    torch.testing.assert_close(fast(*_qkv(1)), model(*_qkv(1)))


def test_scores_clamped_after_a_mask_that_hides_a_whole_row_are_left_alone():
    """A near miss: query 0 sees no key, so the clamp makes its weights uniform (not NaN, not
    0): no rule may drop the clamp, and the output is eager's."""
    low = torch.finfo(torch.float32).min
    mask = torch.full((12, 12), low).triu(1)
    mask[0] = float("-inf")
    model = Clamped(mask)
    fast = graphopt.optimize(model, _qkv())
    assert fast.report.attention["fused"] == 0, fast.report
    torch.testing.assert_close(fast(*_qkv(1)), model(*_qkv(1)))


class LseSinks(torch.nn.Module):
    """Granite-SWA: plain attention, then the output times sigmoid(logsumexp(scores) - sink)."""

    def __init__(self, t=12):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(4))
        self.register_buffer("mask", torch.full((t, t), float("-inf")).triu(1)[None, None])

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25 + self.mask
        scale = (torch.logsumexp(s, dim=-1) - self.sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
        out = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32), v)
        return out * scale.unsqueeze(-1)


@pytest.mark.parametrize("capture", ["dynamo", "export"])
def test_sinks_through_the_log_sum_exp_are_fused(capture):
    model = LseSinks()
    fast = graphopt.optimize(model, _qkv(), capture=capture)
    att = fast.report.attention
    assert att["fused"] == att["sink"] == att["causal"] == 1, fast.report
    torch.testing.assert_close(fast(*_qkv(1)), model(*_qkv(1)))
    assert CAT.kernels(fast, _qkv(2)) == {"softmax": 0, "sdpa": 1}
