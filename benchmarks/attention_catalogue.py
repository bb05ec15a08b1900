"""PyTorch's catalogue of attention forms, as plain module code, through graphopt (and
inductor, for comparison).

The installed torch's SDPA pattern pass (``torch/_inductor/fx_passes/fuse_attention.py``)
knows 30 attention patterns; registered for inference in fp32 with the batch-of-one
variants, they are 40 forms.  Each form below is written here afresh as a module with a
constant scale (dropout at ``p=0``, as inference runs it), on the input shapes that pass
uses (q/k/v ``(2, 4, 8, 16)``, ``(1, 4, 8, 16)`` for the batch-of-one variants; masks as
inputs).  Per form: whether graphopt fused every attention block into SDPA (counted from
the outside with torch.profiler after a warm-up call: no softmax kernel ran, an SDPA
kernel did), outputs equal to eager on the example and on fresh inputs, and graphopt's
reason where it left a block alone.

    python benchmarks/attention_catalogue.py [--capture dynamo|export] [--inductor] [FORM ...]

``--inductor`` also compiles each form with ``torch.compile`` (inductor) and reads its
``fuse_attention`` counter.  One JSON line per form, then a summary line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

aten = torch.ops.aten
SCALE = 0.25          # the constant scale of the forms that multiply
INV_SCALE = 4.0       # ... and of those that divide


def _bhtd(x):
    """(B, T, H, D) inputs laid out as (B, H, T, D) by a permute (BERT-style forms)."""
    return x.permute(0, 2, 1, 3)


def _neg_fill(x):
    return torch.full((), float("-inf"), dtype=x.dtype, device=x.device)


class Form(torch.nn.Module):
    """One catalogue entry: ``fn(q, k, v, *masks)`` with its example inputs."""

    def __init__(self, name, fn, inputs, lower_precision=False):
        super().__init__()
        self.name, self.fn, self.example = name, fn, inputs
        self.lower_precision = lower_precision   # casts the weights to fp16 between the matmuls

    def forward(self, *args):
        return self.fn(*args)


# -- the forms, as module code (numbers follow the pass's pattern numbers) --------------------

def f1(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1).matmul(v)


def f2(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(SCALE).softmax(dim=-1).matmul(v)


def f3(q, k, v):
    w = torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1)
    return F.dropout(w, p=0.0).matmul(v)


def f4(q, k, v):
    w = torch.matmul(q, k.transpose(-2, -1)).mul(SCALE).softmax(dim=-1)
    return F.dropout(w, p=0.0).matmul(v)


def f5(q, k, v, mask):
    w = torch.softmax(q @ k.transpose(-2, -1) / INV_SCALE + mask, dim=-1)
    return w @ v


def f6(q, k, v, mask):
    w = torch.softmax(q @ k.transpose(-2, -1) / INV_SCALE + mask, dim=-1)
    return torch.dropout(w, 0.0, True) @ v


def _half_weights(q, k, v, pre_scale, drop):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    if pre_scale:
        q = q / INV_SCALE
        s = q @ k.transpose(-2, -1)
    else:
        s = q @ k.transpose(-2, -1) / INV_SCALE
    w = torch.softmax(s.to(torch.float32), dim=-1)
    if drop:
        w = torch.dropout(w, 0.0, True)
    w = w.to(torch.float16)
    return w @ v.to(w.dtype)


def f7(q, k, v):
    return _half_weights(q, k, v, pre_scale=False, drop=True)


def f8(q, k, v):
    return _half_weights(q, k, v, pre_scale=False, drop=False)


def f9(q, k, v):
    return _half_weights(q, k, v, pre_scale=True, drop=True)


def f10(q, k, v):
    return _half_weights(q, k, v, pre_scale=True, drop=False)


def f11(q, k, v):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    return torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1).matmul(v)


def f12(q, k, v):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    w = torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1)
    return F.dropout(w, p=0.0).matmul(v)


def f13(q, k, v):           # 3-D (batch*heads, T, d), no scale
    w = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(F.dropout(w, p=0.0), v)


def f14(q, k, v, mask):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    return (torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE) + mask).softmax(dim=-1).matmul(v)


def _padding_fill(q, k, v, mask, pre_scale):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    if pre_scale:
        s = q.div(INV_SCALE) @ k.transpose(-2, -1)
    else:
        s = (q @ k.transpose(-2, -1)).div(INV_SCALE)
    drop = (mask == 0).view((q.size(0), 1, 1, k.size(-2))).expand_as(s)
    return torch.softmax(s.masked_fill(drop, _neg_fill(q)), dim=-1)


def f15(q, k, v, mask):
    return _padding_fill(q, k, v, mask, False) @ _bhtd(v)


def f16(q, k, v, mask):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    w = (torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE) + mask).softmax(dim=-1)
    return F.dropout(w, 0.0).to(dtype=q.dtype).matmul(v)


def f17(q, k, v, mask):
    return F.dropout(_padding_fill(q, k, v, mask, False), 0.0) @ _bhtd(v)


def f18(q, k, v, keep):     # GPT-2 style, boolean causal keep-mask input; returns key and value
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    s = s.div(torch.full([], INV_SCALE, dtype=s.dtype, device=s.device))
    s = torch.where(keep, s, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device))
    return F.dropout(s.softmax(dim=-1), 0.0).matmul(v), k, v


def f19(q, k, v, keep, mask):
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    s = s.div(torch.full([], INV_SCALE, dtype=s.dtype, device=s.device))
    s = torch.where(keep, s, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device))
    w = (s + mask).softmax(dim=-1).type(v.dtype)
    return F.dropout(w, 0.0).matmul(v)


def f20(q, k, v, mask):
    return F.dropout(_padding_fill(q, k, v, mask, True), 0.0) @ _bhtd(v)


def _t5(q, k, v, mask, cast):
    """T5's attention: no scale, ``.float().softmax(-1).type_as(q)``.  ``cast``: what happens
    to the scores first: "back" (``type_as(q)``: patterns 21/22), "twice" (``float()`` then
    ``type_as(q)``: 23), None (nothing: 25-27)."""
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    if mask is not None:
        s = s + mask
    if cast == "back":
        s = s.type_as(q)
    elif cast == "twice":
        s = s.float().type_as(q)
    return F.dropout(s.float().softmax(dim=-1).type_as(q), 0.0).matmul(v), k, v


def f21(q, k, v, mask):
    return _t5(q, k, v, mask, "back")[0]


def f22(q, k, v, mask):
    return _t5(q, k, v, mask, "back")


def f23(q, k, v):
    return _t5(q, k, v, None, "twice")


def f24(q, k, v, mask):     # MBart: 3-D bmm on (batch*heads) views, no scale
    b, h, t, d = q.shape
    s = torch.bmm(q.view(b * h, -1, d), k.reshape(b * h, -1, d).transpose(1, 2))
    s = (s.view(b, h, t, -1) + mask).view(b * h, t, -1)
    w = F.softmax(s, dim=-1)
    return torch.bmm(w, v.reshape(b * h, -1, d)).view(b, h, t, d)


def f25(q, k, v, mask):
    return _t5(q, k, v, mask, None)[0]


def f26(q, k, v, mask):
    return _t5(q, k, v, mask, None)


def f27(q, k, v):
    return _t5(q, k, v, None, None)


def f28(q, k, v):           # pattern 4 on non-contiguous q/k/v
    return f4(q, k, v)


def f29(q, k, v, mask):     # SDPA's math decomposition: sqrt(scale) on q and on k^T, _safe_softmax
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    s = aten.mul.Scalar(q, SCALE ** 0.5) @ aten.mul.Scalar(k.transpose(-2, -1), SCALE ** 0.5)
    return aten._safe_softmax(s + mask, -1) @ v


def f30(q, k, v):
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    s = aten.mul.Scalar(q, SCALE ** 0.5) @ aten.mul.Scalar(k.transpose(-2, -1), SCALE ** 0.5)
    return aten._safe_softmax(s, -1) @ v


def catalogue(seed: int = 0) -> list:
    """The 40 forms with example inputs drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def qkv(shape=(2, 4, 8, 16)):
        return tuple(r(*shape) for _ in range(3))

    def pad(b, n):                       # 0/1 key-padding mask, every row keeping its first key
        m = (torch.rand(b, n, generator=g) > 0.3).float()
        m[:, 0] = 1
        return m

    def additive(*shape):                # 0 / -1e9, never a whole row masked
        m = torch.zeros(*shape).masked_fill(torch.rand(*shape, generator=g) < 0.3, -1e9)
        m[..., 0] = 0
        return m

    causal = torch.ones(8, 8, dtype=torch.bool).tril().view(1, 1, 8, 8)
    bs1 = (1, 4, 8, 16)
    noncontig = tuple(r(2, 16, 6, 8).transpose(1, 2) for _ in range(3))
    out = [
        Form("1", f1, qkv()), Form("2", f2, qkv()), Form("3", f3, qkv()), Form("4", f4, qkv()),
        Form("5", f5, qkv() + (additive(1, 1, 8, 8),)), Form("6", f6, qkv() + (additive(1, 1, 8, 8),)),
        Form("7", f7, qkv(), True), Form("8", f8, qkv(), True),
        Form("9", f9, qkv(), True), Form("10", f10, qkv(), True),
        Form("11", f11, qkv()), Form("12", f12, qkv()),
        Form("13", f13, qkv((16, 32, 32))),
        Form("14", f14, qkv() + (additive(2, 1, 1, 4),)),
        Form("15", f15, qkv() + (pad(2, 4),)),
        Form("16", f16, qkv() + (additive(2, 1, 1, 4),)),
        Form("16_bs1", f16, qkv(bs1) + (additive(1, 1, 1, 4),)),
        Form("17", f17, qkv() + (pad(2, 4),)),
        Form("18", f18, qkv() + (causal[..., :4, :4].expand(2, 8, 4, 4).contiguous(),)),
        Form("18_bs1", f18, qkv(bs1) + (causal[..., :4, :4].contiguous(),)),
        Form("19", f19, qkv() + (causal.expand(2, 4, 8, 8).contiguous(), additive(2, 4, 8, 8))),
        Form("20", f20, qkv() + (pad(2, 4),)),
        Form("21", f21, qkv() + (additive(2, 1, 1, 4),)), Form("21_bs1", f21, qkv(bs1) + (additive(1, 1, 1, 4),)),
        Form("22", f22, qkv() + (additive(2, 1, 1, 4),)), Form("22_bs1", f22, qkv(bs1) + (additive(1, 1, 1, 4),)),
        Form("23", f23, qkv()), Form("23_bs1", f23, qkv(bs1)),
        Form("24", f24, qkv() + (additive(1, 1, 8, 8),)),
        Form("25", f25, qkv() + (additive(2, 1, 1, 4),)), Form("25_bs1", f25, qkv(bs1) + (additive(1, 1, 1, 4),)),
        Form("26", f26, qkv() + (additive(2, 1, 1, 4),)), Form("26_bs1", f26, qkv(bs1) + (additive(1, 1, 1, 4),)),
        Form("27", f27, qkv()), Form("27_bs1", f27, qkv(bs1)),
        Form("28", f28, noncontig),
        Form("29", f29, qkv((2, 8, 4, 16)) + (additive(1, 1, 8, 8),)),
        Form("29_bs1", f29, qkv((1, 8, 4, 16)) + (additive(1, 1, 8, 8),)),
        Form("30", f30, qkv((2, 8, 4, 16))), Form("30_bs1", f30, qkv((1, 8, 4, 16))),
    ]
    assert len(out) == 40
    return out


def kernels(fn, args) -> dict:
    """Softmax and SDPA kernels that ran in one call, after a warm-up call."""
    with torch.no_grad():
        fn(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(*args)
    ev = {e.key: e.count for e in prof.key_averages()}
    return {"softmax": ev.get("aten::_softmax", 0) + ev.get("aten::_safe_softmax", 0),
            "sdpa": sum(v for k, v in ev.items() if k.startswith("aten::_scaled_dot_product"))}


def _max_diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def run_form(form: Form, capture: str = "dynamo", inductor: bool = False) -> dict:
    import graphopt
    row = {"form": form.name}
    t = time.perf_counter()
    fast = graphopt.optimize(form, form.example, capture=capture)
    row["optimize_s"] = round(time.perf_counter() - t, 2)
    rep = fast.report
    row["attention"] = rep.attention
    row["reasons"] = rep.attention_reasons if hasattr(rep, "attention_reasons") else []
    row["fallbacks"] = rep.fallbacks
    fresh = catalogue(seed=1)[[f.name for f in catalogue()].index(form.name)].example
    with torch.no_grad():
        row["diff"] = max(_max_diff(fast(*form.example), form(*form.example)), _max_diff(fast(*fresh), form(*fresh)))
    row["kernels"] = kernels(fast, form.example)
    row["fused"] = row["kernels"]["softmax"] == 0 and row["kernels"]["sdpa"] > 0 and row["diff"] < 1e-4
    if inductor:
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            torch.compile(form)(*form.example)
        row["inductor_fused"] = counters["inductor"]["fuse_attention"] > 0
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("forms", nargs="*", help="form names (default: all 40)")
    ap.add_argument("--capture", default="dynamo", choices=("dynamo", "export"))
    ap.add_argument("--inductor", action="store_true", help="also count inductor's fusions")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    forms = [f for f in catalogue() if not args.forms or f.name in args.forms]
    fused = ind = 0
    for form in forms:
        try:
            row = run_form(form, args.capture, args.inductor)
        except Exception as e:  # noqa: BLE001  a crash is a result to report, not the end of the sweep
            row = {"form": form.name, "error": f"{type(e).__name__}: {str(e)[:300]}", "fused": False}
        fused += row["fused"]
        ind += row.get("inductor_fused", False)
        print(json.dumps(row), flush=True)
    summary = {"forms": len(forms), "graphopt_fused": fused, "capture": args.capture}
    if args.inductor:
        summary["inductor_fused"] = ind
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
