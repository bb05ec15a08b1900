"""GPT-2's GELU written out (8 elementwise kernels) becomes one GELU kernel, through a
rule whose scalar inputs are guarded to be GELU's constants."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import calls_to

import graphopt


class NewGelu(torch.nn.Module):
    """HF's NewGELUActivation, as GPT-2 writes it; ``b`` other than 0.044715 is not GELU."""

    def __init__(self, b=0.044715):
        super().__init__()
        self.b = b

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + self.b * torch.pow(x, 3.0))))


def _gelu_applied(report) -> int:
    return sum(n for k, n in report.applied.items() if "gelu_tanh" in report.rewrites.get(k, ""))


@pytest.mark.parametrize("capture", ["dynamo", "export"])
def test_written_out_gelu_becomes_one_kernel(capture):
    model, x = NewGelu(), torch.randn(4, 32, 64)
    fast = graphopt.optimize(model, (x,), capture=capture)
    assert _gelu_applied(fast.report) == 1, fast.report
    assert [c.get("approximate") for c in calls_to(fast, F.gelu)] == ["tanh"]
    with torch.no_grad():
        for t in (x, torch.randn(4, 32, 64) * 3):
            torch.testing.assert_close(fast(t), model(t), rtol=1e-5, atol=1e-5)


def test_other_constants_are_not_gelu():
    model, x = NewGelu(b=0.05), torch.randn(4, 32, 64)
    fast = graphopt.optimize(model, (x,))
    assert not fast.report.fallbacks, fast.report   # not rewritten, and not rewritten then rolled back
    assert _gelu_applied(fast.report) == 0, fast.report
    assert not calls_to(fast, F.gelu)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_guarded_scalar_rule_is_listed(cli):
    from pathlib import Path
    lib = Path(__file__).resolve().parent.parent / "substitutions" / "handwritten.json"
    out = cli("rules", "list", str(lib), "--op", "gelu_tanh")
    assert out.returncode == 0 and "B eq:0.044715" in out.stdout


class Conv1DMlp(torch.nn.Module):
    """GPT-2's MLP: Conv1D (x.view(-1, k), torch.addmm, .view back), the written-out GELU,
    Conv1D; ``leak`` also returns the GEMM's output before the GELU."""

    def __init__(self, d=32, leak=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(d, 4 * d, generator=g) * 0.1)
        self.b1 = torch.nn.Parameter(torch.randn(4 * d, generator=g) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(4 * d, d, generator=g) * 0.1)
        self.b2 = torch.nn.Parameter(torch.randn(d, generator=g) * 0.1)
        self.gelu, self.leak = NewGelu(), leak

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, x.size(-1)), self.w1).view(*x.shape[:-1], -1)
        y = torch.addmm(self.b2, self.gelu(h).view(-1, h.size(-1)), self.w2).view(x.shape)
        return (y, h) if self.leak else y


def _gemm_calls(fast) -> list:
    from graphopt import kernels
    return [n.args for gm in fast.graph_modules for n in gm.graph.nodes
            if n.op == "call_function" and n.target is kernels.gemm]


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_becomes_the_gemms_epilogue(capture, dtype):
    model, x = Conv1DMlp().to(dtype), torch.randn(2, 9, 32).to(dtype)
    fast = graphopt.optimize(model, (x,), capture=capture)
    calls = _gemm_calls(fast)
    assert [len(c) > 3 and c[3] for c in calls] == [True, False], fast.report   # c_fc+GELU, c_proj
    assert not calls_to(fast, F.gelu)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        for t in (x, torch.randn(2, 9, 32).to(dtype) * 3):
            torch.testing.assert_close(fast(t), model(t), rtol=tol, atol=tol)


def test_epilogue_keeps_a_gemm_output_that_is_read_elsewhere():
    model, x = Conv1DMlp(leak=True), torch.randn(2, 9, 32)
    fast = graphopt.optimize(model, (x,))
    with torch.no_grad():
        for got, want in zip(fast(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_through_the_epilogue():
    """Gradients through the fused GEMM+GELU are eager's (the plain call runs under autograd)."""
    model, x = Conv1DMlp(), torch.randn(2, 9, 32)
    fast = graphopt.optimize(model, (x,))
    assert any(len(c) > 3 and c[3] for c in _gemm_calls(fast))
    fast(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)
