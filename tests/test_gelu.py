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
