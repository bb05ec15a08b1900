"""graphopt.kernels: GEMM schedules chosen by measurement, each equal to the plain call."""
import time

import pytest
import torch
import torch.nn.functional as F

from graphopt import kernels


@pytest.fixture
def fresh(monkeypatch):
    """An empty choice table, and every GEMM large enough to be measured."""
    monkeypatch.setattr(kernels, "_CHOICE", {})
    monkeypatch.setattr(kernels, "MIN_MACS", 1)
    monkeypatch.setattr(kernels, "PRUNE", float("inf"))     # time every schedule
    monkeypatch.delenv("GRAPHOPT_GEMM", raising=False)
    return kernels


def _operands(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(k, n, generator=g) * 0.1).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def _reference(x, w, b, gelu):
    y = x.double() @ w.double() + (0 if b is None else b.double())
    return F.gelu(y, approximate="tanh") if gelu else y


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_every_schedule_computes_the_product(dtype, tol, gelu, bias):
    """Rows and columns in blocks that do not divide the sizes (7 rows in 3, 11 columns by 4),
    the oneDNN epilogue: each is x @ w (+ b) (, GELU) of float64 within the dtype's rounding."""
    x, w, b = _operands(7, 5, 11, dtype)
    b = b if bias else None
    ref = _reference(x, w, b, gelu)
    schedules = {"plain": kernels._plain,
                 "rows3": lambda *a: kernels._rows(*a, parts=3),
                 "cols4": lambda *a: kernels._cols(*a, width=4)}
    if gelu and torch.backends.mkldnn.is_available():
        schedules["onednn"] = kernels._onednn
        schedules["onednn-rows2"] = kernels._onednn_rows2
    for name, fn in schedules.items():
        y = fn(x, w, b, gelu)
        assert y.shape == (7, 11) and y.dtype == dtype, name
        err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < tol, (name, err)


def test_the_first_call_of_a_shape_measures_then_reuses(fresh):
    x, w, b = _operands(600, 16, 20000, torch.float32)
    out = fresh.gemm(x, w, b, gelu=True)
    assert torch.allclose(out.double(), _reference(x, w, b, True), atol=1e-4)
    (key, (name, times)), = fresh.chosen().items()
    assert key[:6] == (torch.float32, kernels.rows_bucket(600), 16, 20000, True, True) and kernels.rows_bucket(600) == 1024
    # rows in 2 and 4 (600 rows), columns in 4096 (20000 wide), oneDNN's epilogue where it exists
    assert {"plain", "rows2", "rows4", "cols4096"} <= set(times) and name in times
    calls = []
    fresh._CHOICE[next(iter(fresh._CHOICE))] = ("spy", lambda *a: calls.append(a) or kernels._plain(*a), {})
    fresh.gemm(x, w, b, gelu=True)
    assert len(calls) == 1 and len(fresh.chosen()) == 1      # the choice is reused, not measured again
    x2 = torch.randn(777, 16)                                   # another prompt length, same bucket
    out = fresh.gemm(x2, w, b, gelu=True)
    assert len(calls) == 2 and len(fresh.chosen()) == 1         # no new measurement


def test_a_schedule_that_computes_something_else_is_never_chosen(fresh, monkeypatch):
    wrong = lambda x, w, b, g: torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype)  # noqa: E731  (fastest)
    monkeypatch.setattr(kernels, "_candidates", lambda *a: {"plain": kernels._plain, "wrong": wrong})
    x, w, b = _operands(64, 32, 48, torch.float32)
    out = fresh.gemm(x, w, b)
    assert torch.allclose(out, torch.addmm(b, x, w))
    name, times = next(iter(fresh.chosen().values()))
    assert name == "plain" and "wrong" not in times


def test_a_schedule_far_slower_in_the_first_round_is_timed_once(fresh, monkeypatch):
    calls = []

    def slow(*a):
        calls.append(1)
        time.sleep(0.05)
        return kernels._plain(*a)
    monkeypatch.setattr(kernels, "PRUNE", 1.5)
    monkeypatch.setattr(kernels, "_candidates", lambda *a: {"plain": kernels._plain, "slow": slow})
    x, w, b = _operands(64, 32, 48, torch.float32)
    fresh.gemm(x, w, b)
    name, times = next(iter(fresh.chosen().values()))
    assert name == "plain" and times["slow"] >= 50 and len(calls) == 2    # checked, timed once


def test_batch_axes_are_rows():
    x, w, b = _operands(6, 5, 4, torch.float32)
    x3 = x.reshape(2, 3, 5)
    assert torch.allclose(kernels.gemm(x3, w, b), (x3 @ w + b))
    assert kernels.gemm(x3, w).shape == (2, 3, 4)


@pytest.mark.parametrize("case", ["grad", "env", "small", "compile"])
def test_plain_call_where_nothing_may_be_measured(fresh, monkeypatch, case):
    """With autograd (the blocked schedules write with out=), GRAPHOPT_GEMM=plain, a GEMM below
    MIN_MACS, or under torch.compile: the plain call, no measurement."""
    x, w, b = _operands(64, 32, 48, torch.float32)
    if case == "grad":
        w.requires_grad_(True)
        fresh.gemm(x, w, b, gelu=True).sum().backward()
        assert w.grad is not None and w.grad.shape == w.shape
    elif case == "env":
        monkeypatch.setenv("GRAPHOPT_GEMM", "plain")
        fresh.gemm(x, w, b)
    elif case == "small":
        monkeypatch.setattr(kernels, "MIN_MACS", 64 * 32 * 48 + 1)
        fresh.gemm(x, w, b)
    else:
        fn = torch.compile(lambda x, w, b: fresh.gemm(x, w, b, gelu=True), backend="eager", fullgraph=True)
        assert torch.allclose(fn(x, w, b), F.gelu(torch.addmm(b, x, w), approximate="tanh"), atol=1e-6)
    assert fresh.chosen() == {}


def test_fx_tracing_records_one_call():
    gm = torch.fx.symbolic_trace(lambda x, w, b: kernels.gemm(x, w, b, gelu=True))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls == [kernels.gemm]


def test_the_report_lists_the_schedules_its_verification_measured(fresh):
    import graphopt

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.randn(32, 96) * 0.1), torch.nn.Parameter(torch.zeros(96))

        def forward(self, x):
            return F.gelu(torch.addmm(self.b, x, self.w), approximate="tanh")

    fast = graphopt.optimize(Mlp().requires_grad_(False), (torch.randn(40, 32),))   # (with autograd: plain)
    gemms = fast.report.to_json()["gemms"]
    assert list(gemms) == ["40x32 @ 32x96 +bias +GELU float32"], gemms
    assert gemms["40x32 @ 32x96 +bias +GELU float32"]["schedule"] in fresh.chosen()[next(iter(fresh.chosen()))][1]
    assert "GEMM schedule  40x32 @ 32x96 +bias +GELU float32: " in str(fast.report)
