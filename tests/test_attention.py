"""First slice of attention fusion: unmasked scaled dot-product attention becomes
sdpa through hand-written rules that pass the same verifier; forms where fusing
would change results are left alone."""
import pytest
import torch

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
    code = "\n".join(gm.code for gm in fast.graph_modules)
    assert "'sdpa'" in code


@pytest.mark.parametrize("model", [
    Plain(dim=-2),        # softmax over the other axis: not attention
    Plain(leak=True),     # the attention weights are used elsewhere
], ids=["softmax-other-dim", "weights-used-elsewhere"])
def test_not_fused_when_it_would_change_results(model):
    qkv = _qkv()
    fast = graphopt.optimize(model, qkv)
    assert not _fused(fast.report)
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
    assert not _fused(fast.report)
    with torch.no_grad():
        torch.testing.assert_close(fast(*qkv), model(*qkv), rtol=1e-5, atol=1e-5)


def test_attention_rules_are_listed_and_verified(cli):
    from pathlib import Path
    lib = Path(__file__).resolve().parent.parent / "substitutions" / "handwritten.json"
    listing = cli("rules", "list", str(lib), "--op", "sdpa")
    assert listing.returncode == 0 and "sdpa(Q, K, V, s, is_causal=True)" in listing.stdout
    verify = cli("rules", "verify", str(lib), "--dtype", "float32")
    assert verify.returncode == 0 and ", 0 failed" in verify.stdout
