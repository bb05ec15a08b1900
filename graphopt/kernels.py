"""GEMMs whose schedule is chosen by measurement, on the CPU.

The CPU's GEMM library (oneDNN for bf16) picks its blocking from the shape alone, and
for some of the shapes LLMs use it runs far below its own rate on other shapes.  On a
2-core Xeon with AMX (bf16, M=1024): ``(1024, 3072) @ (3072, 768)`` took 4.3-4.9 ms as
one call and 2.5-3.1 ms as two calls of 512 rows; the 50,257-wide vocabulary product
took 68 ms as one call and 37 ms as 13 calls of 4096 columns written into one output;
GELU as oneDNN's epilogue of ``(1024, 768) @ (768, 3072)`` took 3.6 ms, the GEMM and
then the GELU kernel 5.1 ms.  Another machine, thread count or library version has
other such shapes, so nothing here is a fixed rule: :func:`gemm` computes
``x @ w (+ b) (, GELU)`` with one of a few schedules that compute the same products,

* ``plain``: the library's call as written (``mm`` / ``addmm``, then ``gelu``);
* ``rows2``, ``rows4``: the rows in 2 or 4 blocks, each written into its part of one output;
* ``cols4096``, ``cols8192``: the columns in blocks, written into one output (for a large
  output also ``-touched``: its pages faulted in by one sequential write first);
* ``onednn``, ``onednn-rows2``: oneDNN's linear with the GELU as its epilogue
  (``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU fusion calls);

times each once on the first call of a shape (median of a few runs after a warm-up, on
the real operands), checks that its output equals the plain call's within the dtype's
rounding, and uses the fastest for that shape from then on (:func:`chosen` lists them);
row counts up to the same power of two share one choice (:func:`rows_bucket`).

Only plain eager CPU tensors with no autograd take a measured schedule, and only GEMMs
of at least :data:`MIN_MACS` multiply-adds; under tracing (Dynamo, torch.export, fx),
with gradients, on other devices, or with ``GRAPHOPT_GEMM=plain`` in the environment,
:func:`gemm` is the plain call, which is what a tracer records.

Example:
    >>> x, w = torch.randn(4, 8), torch.randn(8, 3)
    >>> torch.allclose(gemm(x, w, torch.ones(3)), x @ w + 1)
    True
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

MIN_MACS = 1 << 27          # smaller GEMMs take the plain call (timing them costs more than it saves)
ROUNDS = 3                  # timed runs per schedule after one warm-up (fewer for long GEMMs)
PRUNE = 1.5                 # a schedule this many times slower than the fastest in the first round: not timed again
# the largest difference from the plain call a schedule may show, relative to the output's
# largest magnitude: the products are the same, only the order of the sums within the
# library's blocks and the rounding of the epilogue may differ
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}

_CHOICE: dict = {}          # key of a shape -> (name, schedule, {name: median ms})
_RECORDERS: list = []       # open recording() dicts: every measured GEMM run is noted in each


def gemm(x, w, bias=None, gelu: bool = False):
    """``x @ w`` (+ ``bias``) (then GELU, tanh approximation), x of rank >= 2 (its leading
    axes are flattened into the rows), w of rank 2, bias of shape ``(n,)``.

    Recorded as one call when traced with fx proxies (``handle_torch_function``).
    """
    args = (x, w, bias)
    if torch.overrides.has_torch_function(args):
        return torch.overrides.handle_torch_function(gemm, args, x, w, bias, gelu)
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    schedule = _schedule(x2, w, bias, gelu) if _measurable(x2, w, bias) else _plain
    out = schedule(x2, w, bias, gelu)
    return out if x.dim() == 2 else out.reshape(*lead, n)


@contextlib.contextmanager
def recording():
    """Note the measured GEMMs run inside: yields ``{description: {"schedule", "ms",
    "plain_ms"}}`` (``"1024x768 @ 768x3072 +bias +GELU"``), filled as they run; the
    optimizer's report lists those its verification ran (none when the model's parameters
    require grad: with autograd the plain call runs)."""
    seen: dict = {}
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)


def describe(key, rows: int | None = None) -> str:
    """A choice's key as text: ``"1024x768 @ 768x3072 +bias +GELU"`` (bf16 and so on after;
    ``rows``: the call's own row count, else the bucket's, :func:`rows_bucket`)."""
    dtype, m, k, n, bias, gelu = key[:6]
    m = rows or m
    return (f"{m}x{k} @ {k}x{n}{' +bias' if bias else ''}{' +GELU' if gelu else ''} "
            f"{str(dtype).replace('torch.', '')}")


def chosen() -> dict:
    """The schedules chosen so far in this process: ``{(dtype, rows bucket, k, n, bias, gelu,
    threads): (name, {schedule: median ms})}``."""
    return {key[:-1]: (name, times) for key, (name, _, times) in _CHOICE.items()}


def _measurable(x, w, bias) -> bool:
    if torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting():
        return False        # traced: the plain call is what gets recorded (is_compiling() would also
                            # be True while a torch.compile backend, graphopt's verification, runs)
    ts = (x, w) if bias is None else (x, w, bias)
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in ts):
        return False        # fake, functional or other subclass tensors: a tracer runs this
    if w.dim() != 2 or x.shape[0] * x.shape[1] * w.shape[1] < MIN_MACS:
        return False        # (before the rest: most GEMMs of a decode step end here)
    if os.environ.get("GRAPHOPT_GEMM", "") == "plain":
        return False
    if x.device.type != "cpu" or x.dtype not in _TOLERANCE:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))  # out= has no autograd


# -- the schedules --------------------------------------------------------------------

def _plain(x, w, bias, gelu):
    y = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    return F.gelu(y, approximate="tanh") if gelu else y


def _into(out, x, w, bias, gelu):
    """One block of the output: ``out`` (a view of it) = x @ w (+ bias) (, GELU)."""
    if bias is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(bias, x, w, out=out)
    if gelu:
        torch.ops.aten.gelu_(out, approximate="tanh")


def _output(x, w, touch: bool):
    """The output; ``touch``: its pages are faulted in by one sequential write first (a GEMM
    that writes fresh memory in blocks faults its pages from every thread at once, which on
    some machines costs more than the write).  (Transparent huge pages for it, by madvise,
    made the vocabulary GEMM alone faster, 34 ms instead of 57, and GPT-2-small's forward
    slower, 264 ms instead of 216: not done.)"""
    out = x.new_empty(x.shape[0], w.shape[1])
    return out.zero_() if touch else out


def _rows(x, w, bias, gelu, parts: int):
    out = _output(x, w, False)
    step = -(-x.shape[0] // parts)
    for i in range(0, x.shape[0], step):
        _into(out[i:i + step], x[i:i + step], w, bias, gelu)
    return out


def _cols(x, w, bias, gelu, width: int, touch: bool = False):
    out = _output(x, w, touch)
    for j in range(0, w.shape[1], width):
        _into(out[:, j:j + width], x, w[:, j:j + width], None if bias is None else bias[j:j + width], gelu)
    return out


def _onednn(x, w, bias, gelu):
    return torch.ops.mkldnn._linear_pointwise(x, w.t(), bias, "gelu" if gelu else "none", [],
                                              "tanh" if gelu else "")


def _onednn_rows2(x, w, bias, gelu):
    h = -(-x.shape[0] // 2)
    return torch.cat([_onednn(x[:h], w, bias, gelu), _onednn(x[h:], w, bias, gelu)])


def _candidates(m: int, n: int, dtype, gelu: bool) -> dict:
    out = {"plain": _plain}
    for parts in (2, 4):
        if m >= 128 * parts:
            out[f"rows{parts}"] = functools.partial(_rows, parts=parts)
    for width in (4096, 8192):
        if n >= 2 * width:
            out[f"cols{width}"] = functools.partial(_cols, width=width)
            if m * n >= 1 << 24:    # a large output: also with its pages faulted in first
                out[f"cols{width}-touched"] = functools.partial(_cols, width=width, touch=True)
    if gelu and dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available():
        out["onednn"] = _onednn
        if m >= 256:
            out["onednn-rows2"] = _onednn_rows2
    return out


def rows_bucket(m: int) -> int:
    """The row counts that share one measurement: up to the next power of two (a model
    served at every prompt length measures a handful of row counts, not one per length;
    every schedule computes the same products for any row count)."""
    return 1 << max(0, (m - 1).bit_length())


def _schedule(x, w, bias, gelu):
    m, k, n = x.shape[0], x.shape[1], w.shape[1]
    key = (x.dtype, rows_bucket(m), k, n, bias is not None, gelu, torch.get_num_threads(), w.stride())
    hit = _CHOICE.get(key)
    if hit is None:
        hit = _CHOICE[key] = _measure(x, w, bias, gelu, _candidates(m, n, x.dtype, gelu))
    for seen in _RECORDERS:
        name, _, ms = hit
        seen[describe(key, m)] = {"schedule": name, "ms": round(ms.get(name, 0.0), 3),
                               "plain_ms": round(ms.get("plain", 0.0), 3)}
    return hit[1]


def _measure(x, w, bias, gelu, candidates: dict):
    """Time every schedule on the real operands; keep those equal to the plain call.  A first
    run of each checks it (and builds what the library builds on a first call); then one timed
    round of all, and further rounds for those within :data:`PRUNE` times the fastest of it
    (a GEMM of over 25 ms gets 2 rounds in all, one of over 100 ms 1)."""
    with torch.no_grad():
        ref = _plain(x, w, bias, gelu)
        scale = ref.abs().max().item() or 1.0
        tol = _TOLERANCE[x.dtype] * scale
        ok = {}
        for name, fn in candidates.items():
            try:
                y = fn(x, w, bias, gelu)
            except (RuntimeError, NotImplementedError):
                continue        # this build cannot run it (no oneDNN, a dtype it lacks)
            if y.shape == ref.shape and bool(((y - ref).abs().max() <= tol).item()):
                ok[name] = fn
            del y
        times = {name: [_timed(fn, x, w, bias, gelu)] for name, fn in ok.items()}
        fastest = min((v[0] for v in times.values()), default=0.0)
        rounds = 1 if fastest > 100 else 2 if fastest > 25 else ROUNDS
        for _ in range(rounds - 1):
            for name, fn in ok.items():
                if times[name][0] <= PRUNE * fastest:
                    times[name].append(_timed(fn, x, w, bias, gelu))
    med = {name: statistics.median(v) for name, v in times.items()}
    best = min(med, key=med.get) if med else "plain"
    return best, ok.get(best, _plain), med


def _timed(fn, x, w, bias, gelu) -> float:
    t = time.perf_counter()
    fn(x, w, bias, gelu)
    return (time.perf_counter() - t) * 1e3
