"""Sweep of Hugging Face architectures (the configs of sweep_hf_zoo.py: 2 layers, d=64,
random weights) through what happens *after* ``graphopt.optimize`` returned: one JSON line
per architecture with

* ``checkpoint``: max |diff| of the logits against eager after ``load_state_dict`` of
  another model's weights (and whether the answer changed at all);
* ``inplace``: the same after an in-place edit of the first layer's weights;
* ``grad``: the largest relative difference of any parameter's gradient (and of the loss)
  against eager, grad enabled (eval mode: no dropout), and whether every parameter got one;
* ``dispatch``: SDPA kernels in a plain call before and after one call under
  ``FlopCounterMode`` (torch.profiler counts, after a warm-up call);
* ``bf16``: max |diff| after ``model.to(torch.bfloat16)``, relative to the logits' scale;
* ``stats``: ``fast.stats()`` at the end.

    python benchmarks/sweep_guards.py [ARCH ...]        # default: every one of sweep_hf_zoo
"""
import copy
import json
import os
import sys
import time
import warnings

import torch
import transformers

import graphopt

sys.path.insert(0, os.path.dirname(__file__))
from sweep_hf_zoo import ARCHS, count  # noqa: E402

warnings.filterwarnings("ignore")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / max(1e-6, float(b.float().abs().max())))


def build(arch: str, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(arch, **ARCHS[arch])
    cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def sweep(arch: str) -> dict:
    row = {"arch": arch}
    start = time.monotonic()
    model, other = build(arch, 0), build(arch, 1)
    reference = copy.deepcopy(model)
    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    fast = graphopt.optimize(model, (ids,))
    row["fused"] = f"{fast.report.attention['fused']}/{fast.report.attention['blocks']}"
    row["fallbacks"] = fast.report.fallbacks
    with torch.no_grad():
        before = _logits(fast(ids))
        model.load_state_dict(other.state_dict())
        expected = _logits(model(ids))
        row["checkpoint"] = {"changed": _rel(before, expected) > 1e-3, "diff": _rel(_logits(fast(ids)), expected)}
        first = next(p for n, p in model.named_parameters() if p.dim() == 2 and ".0." in n)
        first.mul_(1.5)
        row["inplace"] = _rel(_logits(fast(ids)), _logits(model(ids)))
        model.load_state_dict(reference.state_dict())
    loss = _logits(fast(ids)).float().pow(2).mean()
    loss.backward()
    ref_loss = _logits(reference(ids)).float().pow(2).mean()
    ref_loss.backward()
    ref_grads = dict(reference.named_parameters())
    missing = [n for n, p in model.named_parameters() if p.grad is None and ref_grads[n].grad is not None]
    worst = max((_rel(p.grad, ref_grads[n].grad) for n, p in model.named_parameters()
                 if p.grad is not None and ref_grads[n].grad is not None), default=0.0)
    row["grad"] = {"loss": _rel(loss, ref_loss), "worst_param": worst, "missing": len(missing)}
    from torch.utils.flop_counter import FlopCounterMode
    sdpa_before = count(fast, ids)["sdpa"]
    with torch.no_grad(), FlopCounterMode(display=False):
        fast(ids)
    row["dispatch"] = {"sdpa_before": sdpa_before, "sdpa_after": count(fast, ids)["sdpa"]}
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    with torch.no_grad():
        row["bf16"] = _rel(_logits(fast(ids)), _logits(reference(ids)))
    row["stats"] = {k: v for k, v in fast.stats().items() if k != "graphs"}
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def main(archs) -> None:
    for arch in archs:
        try:
            row = sweep(arch)
        except Exception as e:  # noqa: BLE001  (a row says what broke; the sweep goes on)
            row = {"arch": arch, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        torch._dynamo.reset()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ARCHS))
