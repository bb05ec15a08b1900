"""Never a stale or wrong answer after optimize() returned: weights that change, training
through the optimised module, calls under dispatch modes, the call counters, and the
safety net's own blind spots (graphopt.runtime, graphopt.pipeline.verify_against)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import graphopt
from graphopt.pipeline import compare_outputs

transformers = pytest.importorskip("transformers")

FAST = {"time_limit": 2.0, "budget": 30}


def _llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager", **kw)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def _ops(fn, *args) -> dict:
    """Op counts of one inference call, seen from outside (torch.profiler)."""
    with torch.no_grad(), profile() as prof:
        fn(*args)
    names = [e.name for e in prof.events()]
    return {"sdpa": names.count("aten::scaled_dot_product_attention"), "softmax": names.count("aten::softmax")}


def _close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


IDS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))


# -- 1. weights are guarded like buffers --------------------------------------------------

def test_checkpoint_loaded_after_optimizing_is_used():
    model, other = _llama(0), _llama(1)
    fast = graphopt.optimize(model, (IDS,), **FAST)
    assert fast.report.attention["fused"] == 2 and fast.report.to_json()["folded_constants"] > 0
    with torch.no_grad():
        before = fast(IDS).logits
        model.load_state_dict(other.state_dict())
        after, expected = fast(IDS).logits, model(IDS).logits
    assert not _close(before, expected)        # the checkpoint does change the answer
    assert _close(after, expected)
    stats = fast.stats()
    assert stats["calls"] == 2 and stats["optimized"] == 2, stats   # re-folded, not a fallback
    assert sum(g.get("refolded", 0) for g in stats["graphs"]) >= 1
    assert _ops(fast, IDS)["sdpa"] == 2


def test_in_place_edit_and_replaced_weight_are_followed():
    model = _llama(0)
    fast = graphopt.optimize(model, (IDS,), **FAST)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(3.0)            # an in-place edit of a merged (folded) weight
        assert _close(fast(IDS).logits, model(IDS).logits)
        attn.v_proj.weight = torch.nn.Parameter(torch.randn_like(attn.v_proj.weight))  # a new tensor
        assert _close(fast(IDS).logits, model(IDS).logits)
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 5.0   # an indexed write
        assert _close(fast(IDS).logits, model(IDS).logits)
    assert fast.stats()["optimized"] == 3


def test_to_bfloat16_after_optimizing():
    model = _llama(0)
    fast = graphopt.optimize(model, (IDS,), **FAST)
    model.to(torch.bfloat16)
    with torch.no_grad():
        got, expected = fast(IDS).logits, model(IDS).logits
    assert got.dtype == torch.bfloat16
    assert _close(got.float(), expected.float(), tol=2e-2)


def test_export_capture_guards_weights_and_buffers():
    """With capture="export" the weights and buffers are attributes of the captured module:
    they are watched as well (a mask buffer found causal, a merged projection)."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
            self.register_buffer("mask", torch.triu(torch.full((6, 6), float("-inf")), 1))

        def forward(self, x):
            split = lambda t: t.view(1, 6, 2, 8).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            w = torch.softmax(q @ k.transpose(-1, -2) * 0.35 + self.mask, dim=-1)
            return (w @ v).transpose(1, 2).reshape(1, 6, 16)

    block, x = Block().eval(), torch.randn(1, 6, 16)
    fast = graphopt.optimize(block, (x,), capture="export", **FAST)
    assert fast.report.attention["causal"] == 1 and not fast.report.fallbacks
    with torch.no_grad():
        block.k.weight.mul_(2.0)
        assert _close(fast(x), block(x))
        assert fast.stats()["optimized"] == 1
        block.mask.zero_()                       # no longer causal: the fused graph must not run
        assert _close(fast(x), block(x))
        block.mask.copy_(torch.triu(torch.full((6, 6), float("-inf")), 1))
        assert _close(fast(x), block(x))         # causal again: optimised again
    stats = fast.stats()
    assert stats["optimized"] == 2 and sum(stats["original"].values()) == 1, stats
    assert any("mask" in why and "relied on" in why for why in stats["original"]), stats


class _Attention(torch.nn.Module):
    """q/k/v projections into 2 heads of 8, T=5: the scores divided by sqrt(8), or multiplied
    by a learnable temperature (which becomes SDPA's scale); optionally a causal mask buffer."""

    def __init__(self, learnable_scale: bool = False, causal_buffer: int = 0):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        if learnable_scale:
            self.temp = torch.nn.Parameter(torch.tensor(0.25))
        if causal_buffer:
            self.register_buffer("mask", torch.ones(causal_buffer, causal_buffer, dtype=torch.bool).tril())

    def forward(self, x):
        split = lambda t: t.view(2, 5, 2, 8).transpose(1, 2)  # noqa: E731
        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2)
        scores = scores * self.temp if hasattr(self, "temp") else scores / 8 ** 0.5
        if hasattr(self, "mask"):
            scores = scores.masked_fill(~self.mask[:5, :5], float("-inf"))
        return torch.softmax(scores, dim=-1) @ split(self.v(x))


def test_export_capture_follows_a_replaced_weight_and_trains():
    torch.manual_seed(0)
    block, x = _Attention(), torch.randn(2, 5, 16)
    reference = copy.deepcopy(block)
    fast = graphopt.optimize(block, (x,), capture="export", **FAST)
    assert fast.report.attention["fused"] == 1
    (fast(x) ** 2).sum().backward()
    (reference(x) ** 2).sum().backward()
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        assert _close(p.grad, q.grad), name
    block.k.weight = torch.nn.Parameter(torch.randn(16, 16))
    with torch.no_grad():
        assert _close(fast(x), block(x))
    assert fast.stats()["optimized"] == 2


# -- 2. autograd ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_gradients_equal_eager(make):
    model = make(0)
    reference = copy.deepcopy(model)
    fast = graphopt.optimize(model, (IDS,), **FAST)
    model.train(), reference.train()
    loss = fast(IDS, labels=IDS).loss
    loss.backward()
    ref_loss = reference(IDS, labels=IDS).loss
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert _close(p.grad, params[name].grad, tol=1e-4), name
    assert not fast.report.fallbacks


def test_a_training_loop_through_the_optimized_module_then_inference():
    """Optimizer steps change every weight in place: training matches eager step for step,
    and the inference graph afterwards uses the trained weights (re-folded)."""
    model = _llama(0)
    reference = copy.deepcopy(model)
    fast = graphopt.optimize(model, (IDS,), **FAST)
    model.train(), reference.train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    for _ in range(3):
        for m, opt in zip((fast, reference), optimizers):
            opt.zero_grad()
            m(IDS, labels=IDS).loss.backward()
            opt.step()
    model.eval(), reference.eval()
    with torch.no_grad():
        assert _close(fast(IDS).logits, reference(IDS).logits)
    stats = fast.stats()
    assert stats["optimized"] == stats["calls"] == 4, stats
    assert _ops(fast, IDS)["sdpa"] == 2


def test_gradient_wrt_input_and_sdpa_in_the_backward():
    """Gradients through a fused attention block reach the input and the merged weights."""
    torch.manual_seed(0)
    block, x = _Attention(), torch.randn(2, 5, 16)
    reference = copy.deepcopy(block)
    fast = graphopt.optimize(block, (x,), **FAST)
    assert fast.report.attention["fused"] == 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (fast(xa) ** 2).sum().backward()
    (reference(xb) ** 2).sum().backward()
    assert _close(xa.grad, xb.grad)
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        assert _close(p.grad, q.grad), name
    with torch.no_grad():
        assert _ops(fast, x)["sdpa"] == 1      # inference keeps the fused, folded graph


def test_train_mode_dropout_is_kept():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, q, k, v):
            return self.drop(torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)) @ v

    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))
    block = Block().train()
    fast = graphopt.optimize(block, (q, k, v), **FAST)
    assert not fast.report.fallbacks
    torch.manual_seed(5)
    got = fast(q, k, v)
    torch.manual_seed(5)
    expected = block(q, k, v)
    assert torch.equal(got, expected)
    assert fast.report.attention["fused"] == 0   # a dropout between softmax and V is no SDPA(p=0)


# -- 3. dispatch modes and the counters ---------------------------------------------------

def test_a_call_under_a_dispatch_mode_does_not_disable_the_optimized_graph():
    from torch.utils.flop_counter import FlopCounterMode
    model = _llama(0)
    fast = graphopt.optimize(model, (IDS,), **FAST)
    with torch.no_grad():
        assert _ops(fast, IDS)["sdpa"] == 2
        with FlopCounterMode(display=False) as counter:
            under_mode = fast(IDS).logits
        assert counter.get_total_flops() > 0
        assert _close(under_mode, model(IDS).logits)
        assert _ops(fast, IDS)["sdpa"] == 2       # the later plain calls run SDPA again
        assert _ops(fast, IDS)["sdpa"] == 2
    stats = fast.stats()
    assert stats["calls"] == 4 and stats["optimized"] == 3, stats
    assert [why for why in stats["original"]] == \
        ["a dispatch mode (_FlopCounterMode) was active: the model ran eagerly"], stats
    assert "calls          4: 3 ran the optimised graph; 1 the original: a dispatch mode" in str(fast.report)


def test_stats_count_fallbacks_with_their_reason():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.triu(torch.full((5, 5), float("-inf")), 1))

        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5 + self.mask, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    block = Masked().eval()
    fast = graphopt.optimize(block, (q, k, v), **FAST)
    assert fast.report.attention["causal"] == 1
    with torch.no_grad():
        fast(q, k, v)
        block.mask[0, 1] = 0.0                   # the mask is no longer causal
        for _ in range(2):
            assert _close(fast(q, k, v), block(q, k, v))
    stats = fast.stats()
    assert stats["calls"] == 3 and stats["optimized"] == 1
    assert stats["original"] == {"mask changed, and its value was relied on at optimisation time": 2}, stats


# -- 6. the safety net's blind spots ------------------------------------------------------

def test_a_difference_next_to_a_nan_in_the_original_is_caught():
    nan = float("nan")
    assert not compare_outputs([torch.tensor([nan, 1.0, 2.0])], [torch.tensor([nan, 1.0, 2.5])])[0]
    assert not compare_outputs([torch.tensor([float("inf"), 1.0])], [torch.tensor([float("inf"), 3.0])])[0]
    assert compare_outputs([torch.tensor([nan, 1.0])], [torch.tensor([nan, 1.0])])[0]


def test_a_wrong_rewrite_hidden_behind_a_nan_falls_back(monkeypatch):
    """A fused kernel that is wrong in one place, on a model whose output holds a NaN
    elsewhere: the verifier must see the difference and keep the original."""
    from graphopt.ops import get_op
    sdpa = get_op("sdpa")
    real = sdpa.lower

    def off_by_one(tensors, attrs):
        out = list(real(tensors, attrs))   # (traced into the graph: no in-place index writes)
        o = out[0]
        last = torch.ones_like(o).flatten().cumsum(0).reshape(o.shape) == o.numel()
        out[0] = o + last
        return out
    monkeypatch.setitem(sdpa.__dict__, "lower", off_by_one)   # (an OpDef is frozen)

    def attention_with_one_nan(q, k, v):
        out = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
        nan_at_first = torch.zeros_like(out)
        nan_at_first.view(-1)[0] = float("nan")
        return out + nan_at_first

    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    fast = graphopt.optimize(attention_with_one_nan, (q, k, v), **FAST)
    assert fast.report.fallbacks and "verification failed" in fast.report.fallbacks[0]
    assert "max |diff| 1 exceeds" in fast.report.fallbacks[0], fast.report.fallbacks
    monkeypatch.undo()
    torch._dynamo.reset()
    assert graphopt.optimize(attention_with_one_nan, (q, k, v), **FAST).report.attention["fused"] == 1
    assert torch.equal(torch.isnan(fast(q, k, v)), torch.isnan(attention_with_one_nan(q, k, v)))


def test_fully_masked_rows_compute_what_the_model_computes():
    def attention(q, k, v, mask):
        return torch.softmax((q @ k.transpose(-1, -2)) * 0.5 + mask, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, :] = float("-inf")              # query 1 sees no key: a NaN row in eager
    fast = graphopt.optimize(attention, (q, k, v, mask), **FAST)
    ok, _, why = compare_outputs([attention(q, k, v, mask)], [fast(q, k, v, mask)])
    assert ok, why
    other = torch.where(torch.rand(1, 1, 4, 4) < 0.3, float("-inf"), 0.0)
    ok, _, why = compare_outputs([attention(q, k, v, other)], [fast(q, k, v, other)])
    assert ok, why


def test_an_all_ones_integer_input_is_varied_by_the_verifier():
    from graphopt.optimize import _trials
    from graphopt.options import Options

    def f(ids, attention_mask):
        return ids * attention_mask

    gm = torch.fx.symbolic_trace(f)
    trials = _trials(gm, [torch.full((2, 9), 7), torch.ones(2, 9, dtype=torch.long)], Options())
    masks = [t[1] for t in trials[1:]]
    assert any((m == 0).any() for m in masks) and all(((m == 0) | (m == 1)).all() for m in masks)
    assert all((t[0] >= 0).all() and (t[0] <= 7).all() for t in trials[1:])


def test_a_mask_computed_from_an_attention_mask_input_is_verified_with_zeros():
    """A padding mask built from ``attention_mask == 0``: a rewrite that assumed no padding
    would pass on the all-ones example; the varied trials must refute it."""
    model = _llama(0)
    ones = torch.ones_like(IDS)
    fast = graphopt.optimize(model, (IDS, ones), **FAST)
    padded = ones.clone()
    padded[0, :3] = 0
    with torch.no_grad():
        ok, _, why = compare_outputs([model(IDS, attention_mask=padded).logits],
                                     [fast(IDS, padded).logits])
    assert ok, why


# -- found by a review of the guard ---------------------------------------------------------

def test_a_learnable_scale_written_as_a_number_still_gets_its_gradient():
    torch.manual_seed(0)
    block, x = _Attention(learnable_scale=True), torch.randn(2, 5, 16)
    reference = copy.deepcopy(block)
    fast = graphopt.optimize(block, (x,), **FAST)
    assert fast.report.attention["fused"] == 1
    fast(x).sum().backward()
    reference(x).sum().backward()
    assert block.temp.grad is not None and _close(block.temp.grad, reference.temp.grad)
    assert any("temp" in why and "gradients" in why for why in fast.stats()["original"]), fast.stats()
    with torch.no_grad():
        assert _ops(fast, x)["sdpa"] == 1       # inference still runs the fused graph


def test_the_verifier_runs_the_optimized_graph_whatever_the_buffer_size(monkeypatch):
    """A relied-on buffer too large to copy: the trials must still run the optimised graph
    (they once ran the original on a copy of the buffer, and compared it with itself)."""
    from graphopt import runtime
    from graphopt.ops import get_op
    monkeypatch.setattr(runtime, "MAX_SNAPSHOT_NUMEL", 0)
    sdpa = get_op("sdpa")
    real = sdpa.lower
    monkeypatch.setitem(sdpa.__dict__, "lower", lambda t, a: [real(t, a)[0] + 1.0])
    torch.manual_seed(0)
    block, x = _Attention(causal_buffer=8).eval(), torch.randn(2, 5, 16)
    fast = graphopt.optimize(block, (x,), **FAST)
    assert fast.report.fallbacks and "verification failed" in fast.report.fallbacks[0], fast.report
    with torch.no_grad():
        assert _close(fast(x), block(x))


def test_export_capture_of_tied_weights_untied_later():
    model = _gpt2(0)
    model.config.use_cache = False             # (torch.export cannot return a DynamicCache)
    assert model.lm_head.weight is model.transformer.wte.weight
    fast = graphopt.optimize(model, (IDS,), capture="export", **FAST)
    with torch.no_grad():
        model.transformer.wte.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        assert _close(fast(IDS).logits, model(IDS).logits)
    assert any("one tensor with" in why for why in fast.stats()["original"]), fast.stats()


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(64, 4, bias=False)
        self.drop = torch.nn.Dropout(0.5)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return self.drop(self.b(self.a(x))) + self.count


def test_export_capture_refold_under_autocast_and_inference_mode():
    """A refold happens at the first call after a change, whatever mode that call is in:
    the folded constants are still computed as at optimisation time."""
    torch.manual_seed(0)
    mlp, x = _Mlp().eval(), torch.randn(3, 16)
    fast = graphopt.optimize(mlp, (x,), capture="export", **FAST)
    assert fast.report.to_json()["folded_constants"] >= 1, fast.report   # b(a(x)) = x @ (A^T B^T)
    with torch.no_grad():
        mlp.a.weight.mul_(1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        fast(x)
    with torch.inference_mode():
        mlp.a.weight.mul_(0.5)
        fast(x)
    xg = x.clone().requires_grad_()
    for p in mlp.parameters():
        p.requires_grad_(False)
    out = fast(xg)
    out.sum().backward()                        # no inference tensor in the way
    expected = mlp.b(mlp.a(x)) + mlp.count
    assert _close(out.detach(), expected.detach())


def test_export_capture_notices_train_mode_and_a_replaced_written_buffer():
    torch.manual_seed(0)
    mlp, x = _Mlp().eval(), torch.randn(3, 16)
    fast = graphopt.optimize(mlp, (x,), capture="export", **FAST)
    with torch.no_grad():
        mlp.count.zero_()
        assert _close(fast(x), mlp(x) - 1)      # (each call counts)
        mlp.train()
        torch.manual_seed(1)
        got = fast(x)
        torch.manual_seed(1)
        expected = mlp(x)
        assert _close(got, expected - 1)        # the same dropout mask; one count fewer
        assert ((got - (mlp.count - 1)) == 0).float().mean() > 0.2   # dropout did run
        mlp.eval()
        mlp.count = torch.zeros(())
        fast(x)
        assert mlp.count.item() == 1            # the new buffer is the one written
    assert any("train/eval" in why for why in fast.stats()["original"]), fast.stats()
