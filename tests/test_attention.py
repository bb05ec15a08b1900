"""First slice of attention fusion: unmasked scaled dot-product attention becomes
sdpa through hand-written rules that pass the same verifier; forms where fusing
would change results are left alone."""
import pytest
import torch
import torch.nn.functional as F
from conftest import calls_to

import graphopt


def _qkv(seed=0):
    torch.manual_seed(seed)
    return tuple(torch.randn(2, 4, 32, 16) for _ in range(3))


class Plain(torch.nn.Module):
    def __init__(self, scale_op="div", dim=-1, leak=False):
        super().__init__()
        self.scale_op, self.dim, self.leak = scale_op, dim, leak

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        s = s / 4.0 if self.scale_op == "div" else s * 0.25
        p = s.softmax(self.dim)
        out = p @ v
        return (out, p.sum()) if self.leak else out


def _fused(report) -> bool:
    return any("sdpa" in v for v in report.to_json()["rewrites"].values())


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("scale_op", ["div", "mul"])
def test_attention_becomes_sdpa(capture, scale_op):
    model, qkv = Plain(scale_op), _qkv()
    fast = graphopt.optimize(model, qkv, capture=capture)
    assert _fused(fast.report), fast.report
    assert fast.report.cost_after < fast.report.cost_before / 2  # no T x T intermediates
    with torch.no_grad():
        torch.testing.assert_close(fast(*qkv), model(*qkv), rtol=1e-5, atol=1e-5)
        other = _qkv(1)
        torch.testing.assert_close(fast(*other), model(*other), rtol=1e-5, atol=1e-5)
    assert calls_to(fast, F.scaled_dot_product_attention), fast.graph_modules[0].code


@pytest.mark.parametrize("model", [
    Plain(dim=-2),        # softmax over the other axis: not attention
    Plain(leak=True),     # the attention weights are used elsewhere
], ids=["softmax-other-dim", "weights-used-elsewhere"])
def test_not_fused_when_it_would_change_results(model):
    qkv = _qkv()
    fast = graphopt.optimize(model, qkv)
    assert not fast.report.fallbacks, fast.report   # not fused, and not fused then rolled back
    assert not _fused(fast.report), fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(*qkv), model(*qkv), rtol=1e-5, atol=1e-5)


def test_per_head_scale_is_not_fused():
    class PerHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, q, k, v):
            return ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
    model, qkv = PerHead(), _qkv()
    fast = graphopt.optimize(model, qkv)
    assert not fast.report.fallbacks, fast.report   # not fused, and not fused then rolled back
    assert not _fused(fast.report), fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(*qkv), model(*qkv), rtol=1e-5, atol=1e-5)


def test_attention_rules_are_listed_and_verified(cli):
    from pathlib import Path
    lib = Path(__file__).resolve().parent.parent / "substitutions" / "handwritten.json"
    listing = cli("rules", "list", str(lib), "--op", "sdpa")
    assert listing.returncode == 0 and "sdpa(Q, K, V, s, is_causal=True)" in listing.stdout
    verify = cli("rules", "verify", str(lib), "--dtype", "float32")
    assert verify.returncode == 0 and ", 0 failed" in verify.stdout


# --- masked, causal, grouped-query and other spellings of attention -----------------------------
#
# Hand-written modules, each optimised through both capture paths; the report's attention counts
# say what was emitted, and the result must equal the original on the example inputs and on fresh
# random ones.

B, H, T, D = 2, 4, 16, 16
CAPTURES = ["dynamo", "export"]
NEG = float("-inf")


def _inputs(seed=0, kv_heads=H, mask=None):
    """q, k, v (and a mask of the given shape, 0 / -1e9, every query keeping its own key)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, kv_heads, T, D, generator=g) for _ in range(2))
    if mask is None:
        return q, k, v
    drop = torch.rand(mask, generator=g) < 0.4
    if mask[-1] == mask[-2] == T:
        drop &= ~torch.eye(T, dtype=torch.bool)
    return q, k, v, torch.zeros(mask).masked_fill(drop, -1e9)


def _causal_bool():
    return torch.ones(T, T, dtype=torch.bool).tril()


def _code(fast) -> str:
    return "\n".join(gm.code for gm in fast.graph_modules)


def _optimize_and_check(model, capture, inputs, fresh, **expect):
    """Optimise, compare outputs on ``inputs`` and ``fresh``, check the attention counts
    (``expect`` gives the ones that matter; blocks is always 1)."""
    model.eval()
    fast = graphopt.optimize(model, inputs, capture=capture, time_limit=10)
    report = fast.report
    assert not report.fallbacks, report
    att = report.attention
    assert att["blocks"] == 1, report
    for key, want in expect.items():
        assert att[key] == want, f"attention[{key!r}] = {att[key]}, expected {want}\n{report}"
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(*fresh), model(*fresh), rtol=1e-5, atol=1e-5)
    code, sdpa = _code(fast), calls_to(fast, F.scaled_dot_product_attention)
    assert len(sdpa) == att["fused"], code
    assert sum(c.get("attn_mask") is not None for c in sdpa) == att["masked"], code
    assert sum(c.get("is_causal", False) for c in sdpa) == att["causal"], code
    return fast


class CausalMaskedFill(torch.nn.Module):
    """(a) a constant lower-triangular bool, ``masked_fill(~keep, -inf)``."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) / 4.0
        s = s.masked_fill(~_causal_bool(), NEG)
        return s.softmax(-1) @ v


class CausalAdditive(torch.nn.Module):
    """(b) an additive ``full(-inf).triu(1)`` mask."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = s + torch.full((T, T), NEG).triu(1)
        return torch.softmax(s, dim=-1) @ v


class CausalWhereFinfoMin(torch.nn.Module):
    """(c) ``torch.where(keep, scores, finfo.min)``."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) / 4.0
        s = torch.where(_causal_bool(), s, torch.finfo(s.dtype).min)
        return s.softmax(dim=-1) @ v


class ScaleFoldedIntoQ(torch.nn.Module):
    """(d) the scale applied to q before the product."""

    def forward(self, q, k, v):
        return ((q * 0.25) @ k.transpose(-2, -1)).softmax(-1) @ v


class DropoutFloat32Softmax(torch.nn.Module):
    """(f) dropout (a no-op in eval), ``softmax(dtype=float32)`` and a no-op cast back."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) / 4.0
        p = self.drop(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype))
        return p @ v


class ZeroMask(torch.nn.Module):
    """(h) an all-zero constant additive mask: nothing to mask."""

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) / 4.0 + torch.zeros(T, T)).softmax(-1) @ v


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("cls", [CausalMaskedFill, CausalAdditive, CausalWhereFinfoMin],
                         ids=["tril-masked_fill", "additive-triu", "where-finfo-min"])
def test_constant_causal_mask_becomes_is_causal(cls, capture):
    fast = _optimize_and_check(cls(), capture, _inputs(0), _inputs(1), fused=1, causal=1, masked=0, gqa=0)
    assert fast.report.cost_after < fast.report.cost_before / 2


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("cls", [ScaleFoldedIntoQ, DropoutFloat32Softmax, ZeroMask],
                         ids=["scale-folded-into-q", "dropout-eval-softmax-float32", "all-zero-mask"])
def test_unmasked_spellings_are_fused(cls, capture):
    _optimize_and_check(cls(), capture, _inputs(0), _inputs(1), fused=1, causal=0, masked=0, gqa=0)


class GroupedQuery(torch.nn.Module):
    """(e) grouped-query attention (2 key/value heads for 4 query heads), causal additive mask."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def _repeat(self, x, r):
        b, g, n, d = x.shape
        x = x[:, :, None] if self.index == "short" else x[:, :, None, :, :]
        return x.expand(b, g, r, n, d).reshape(b, g * r, n, d)

    def forward(self, q, k, v):
        r = q.shape[1] // k.shape[1]
        k, v = self._repeat(k, r), self._repeat(v, r)
        s = (q @ k.transpose(-2, -1)) * D ** -0.5
        s = s + torch.full((T, T), NEG).triu(1)
        return s.softmax(-1) @ v


@pytest.mark.parametrize("capture,index", [
    ("dynamo", "short"),
    ("export", "short"),
    ("dynamo", "long"),
    ("export", "long"),
], ids=["dynamo-x[:,:,None]", "export-x[:,:,None]", "dynamo-x[:,:,None,:,:]", "export-x[:,:,None,:,:]"])
def test_grouped_query_causal_attention(capture, index):
    fast = _optimize_and_check(GroupedQuery(index), capture, _inputs(0, kv_heads=2), _inputs(1, kv_heads=2),
                               fused=1, causal=1, masked=0, gqa=1)
    assert [c.get("enable_gqa") for c in calls_to(fast, F.scaled_dot_product_attention)] == [True], _code(fast)


class InputMask(torch.nn.Module):
    """(g) the additive mask is an input: not a constant, kept explicit."""

    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-2, -1)) / 4.0 + mask).softmax(-1) @ v


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("shape", [(B, 1, T, T), (T, T)], ids=["B1TT", "TT"])
def test_mask_input_is_kept_explicit(capture, shape):
    _optimize_and_check(InputMask(), capture, _inputs(0, mask=shape), _inputs(1, mask=shape),
                        fused=1, causal=0, masked=1, gqa=0)


# --- forms where is_causal or fusing would change results ---------------------------------------

class AlmostCausal(torch.nn.Module):
    """A causal mask with one masked entry (query 0, key 5) let through: not is_causal."""

    def forward(self, q, k, v):
        m = torch.full((T, T), NEG).triu(1)
        m[0, 5] = 0.0
        return ((q @ k.transpose(-2, -1)) / 4.0 + m).softmax(-1) @ v


class AlmostCausalBool(torch.nn.Module):
    """The bool spelling of the same: one entry above the diagonal kept."""

    def forward(self, q, k, v):
        keep = torch.ones(T, T, dtype=torch.bool).tril()
        keep[0, 5] = True
        return ((q @ k.transpose(-2, -1)) / 4.0).masked_fill(~keep, NEG).softmax(-1) @ v


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("cls", [AlmostCausal, AlmostCausalBool], ids=["additive", "masked_fill"])
def test_almost_causal_mask_is_not_is_causal(cls, capture):
    fast = _optimize_and_check(cls(), capture, _inputs(0), _inputs(1), causal=0)
    assert fast.report.attention["masked"] == fast.report.attention["fused"]  # explicit mask if fused


class PerQueryBias(torch.nn.Module):
    """A (T, 1) additive term: one value per query row, broadcast along the keys."""

    def forward(self, q, k, v):
        bias = torch.arange(T, dtype=torch.float32)[:, None] * -0.5
        return ((q @ k.transpose(-2, -1)) / 4.0 + bias).softmax(-1) @ v


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("as_input", [False, True], ids=["constant", "input"])
def test_mask_broadcasting_over_keys_is_not_fused(capture, as_input):
    if as_input:
        model, inputs, fresh = InputMask(), _inputs(0, mask=(T, 1)), _inputs(1, mask=(T, 1))
    else:
        model, inputs, fresh = PerQueryBias(), _inputs(0), _inputs(1)
    _optimize_and_check(model, capture, inputs, fresh, fused=0, causal=0, masked=0, gqa=0)


class UpcastSoftmax(torch.nn.Module):
    """Half-precision attention with the fp32 softmax upcast and the cast back (Llama's form),
    and K^T spelled as a permute of (B, T, H, D) straight to (B, H, D, T)."""

    def forward(self, q, k_bthd, v):
        T = q.shape[-2]
        s = (q @ k_bthd.permute(0, 2, 3, 1)) * 0.25
        s = s + torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp32_upcast_and_permute_forms_are_fused(capture, dtype):
    torch.manual_seed(0)
    q, v = (torch.randn(2, 4, 16, 16).to(dtype) for _ in range(2))
    k = torch.randn(2, 16, 4, 16).to(dtype)
    model = UpcastSoftmax()
    fast = graphopt.optimize(model, (q, k, v), capture=capture, time_limit=10)
    assert not fast.report.fallbacks
    assert fast.report.attention == {"blocks": 1, "fused": 1, "causal": 1, "masked": 0, "gqa": 0, "sink": 0}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(fast(q, k, v), model(q, k, v), rtol=tol, atol=tol)


def test_causal_mask_from_a_registered_buffer_is_guarded():
    """nanoGPT's mask is a registered tril buffer, sliced to T: fused with is_causal while the
    buffer is unchanged; after it changes, the original graph runs (the result follows it)."""
    from graphopt.models import example
    model, (ids,) = example("gpt2", seq_len=32, batch=1, layers=2)
    fast = graphopt.optimize(model, (ids,), time_limit=10)
    assert fast.report.attention["fused"] == fast.report.attention["causal"] == 2, fast.report
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)
        model.blocks[0].causal[5, 2] = False  # no longer the causal mask
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capture", ["dynamo", "export"])
def test_a_scale_computed_at_run_time_is_read_in_the_graph(capture):
    """A scale that is not a constant (here a 0-d input) reaches SDPA as a number read at run
    time: the plain-torch graph calls ``.item()`` on it (found by the differential fuzzer, seed 3,
    when the backend first wrote plain torch calls)."""
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, temperature):
            return torch.softmax(q @ k.transpose(-1, -2) * temperature.exp(), dim=-1) @ v

    attention, (q, k, v) = Attention(), _qkv()
    t = torch.tensor(-1.5)
    fast = graphopt.optimize(attention, (q, k, v, t), capture=capture)
    assert not fast.report.fallbacks and fast.report.attention["fused"] == 1, fast.report
    sdpa = calls_to(fast, F.scaled_dot_product_attention)
    assert len(sdpa) == 1 and isinstance(sdpa[0]["scale"], torch.fx.Node), sdpa
    with torch.no_grad():
        for temperature in (t, torch.tensor(0.25)):
            torch.testing.assert_close(fast(q, k, v, temperature), attention(q, k, v, temperature),
                                       rtol=1e-5, atol=1e-5)
