"""Guards: conditions on the *value* of a rule input, for rules that hold only then.

Most rules hold for every value of their inputs.  A few hold only for inputs of
a known form: an additive attention mask that is the standard causal mask can
be replaced by SDPA's ``is_causal=True``, one that is all zeros can be dropped,
and a chain of elementwise ops is GELU only when its scalars are GELU's
(``eq:0.044715``).
A rule input may name a guard; the matcher then binds it only to a constant
(a folded literal, never a graph input) whose value passes :meth:`Guard.check`,
and the verifier draws that input from :meth:`Guard.sample` instead of the
usual random values.  Each guard is defined once, here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# an additive mask entry at or below this excludes its key: exp(MASKED + score - max)
# is exactly 0 in every float dtype for any score of a real model (|score| < 1e8)
MASKED = -1e9


def _causal_keep(t: int, n: int) -> np.ndarray:
    """Query i sees keys j <= i (SDPA's ``is_causal``: aligned at the top left)."""
    return np.tril(np.ones((t, n), dtype=bool))


def masked_below(dtype) -> float:
    """The largest additive mask entry that still excludes its key exactly in ``dtype``:
    -1e9, or half the lowest float16 (a float16 model's masks hold -65504, and a score of
    a real model is far below 32752 in size)."""
    import torch
    return max(MASKED, torch.finfo(dtype).min / 2)


def _check_causal(value) -> bool:
    import torch
    if value.dim() < 2 or not value.dtype.is_floating_point:
        return False
    keep = torch.from_numpy(_causal_keep(value.shape[-2], value.shape[-1]))
    return bool(torch.where(keep, value == 0, value <= masked_below(value.dtype)).all())


def _sample_causal(shape, rng) -> np.ndarray:
    keep = _causal_keep(shape[-2], shape[-1])
    masked = np.where(rng.random(shape) < 0.5, -np.inf, np.finfo(np.float32).min)
    return np.where(keep, 0.0, masked)


def _check_zeros(value) -> bool:
    return bool(value.dtype.is_floating_point and (value == 0).all())


def _check_masking(value) -> bool:
    return bool(value.numel() == 1 and value.dtype.is_floating_point
                and float(value.reshape(())) <= masked_below(value.dtype))


@dataclass(frozen=True)
class Guard:
    name: str
    doc: str
    check: Callable    # torch tensor -> bool
    sample: Callable   # (shape, numpy Generator) -> float64 array that passes check


GUARDS = {g.name: g for g in (
    Guard("causal", "an additive mask: 0 where key j <= query i, at most -1e9 (or -inf) elsewhere",
          _check_causal, _sample_causal),
    Guard("zeros", "an additive mask that is 0 everywhere (nothing masked)",
          _check_zeros, lambda shape, rng: np.zeros(shape)),
    Guard("masking", "a scalar that masks a score out of a softmax: at most -1e9 (or half the "
          "dtype's lowest), such as the dtype's lowest value a model clamps the scores at",
          _check_masking, lambda shape, rng: np.full(shape, float(np.finfo(np.float32).min))),
)}


def _equals(value: float) -> Guard:
    """``eq:<number>``: a scalar constant equal to the number as the constant's own dtype
    holds it (0.044715 is 0.044677734375 in bfloat16), e.g. the 0.044715 of GELU's tanh
    approximation: the guard compares at the precision the model computes in."""
    def check(t) -> bool:
        import torch
        if not (t.numel() == 1 and t.dtype.is_floating_point):
            return False
        rounded = float(torch.tensor(value, dtype=t.dtype))
        return abs(float(t.reshape(())) - rounded) <= 1e-6 * max(1.0, abs(value))
    return Guard(f"eq:{value!r}", f"a scalar equal to {value!r}", check, lambda shape, rng: np.full(shape, value))


def get_guard(name: str) -> Guard:
    from .errors import ShapeError
    if isinstance(name, str) and name.startswith("eq:"):
        try:
            return _equals(float(name[3:]))
        except ValueError:
            raise ShapeError(f"guard {name!r}: not a number after 'eq:'") from None
    try:
        return GUARDS[name]
    except KeyError:
        raise ShapeError(f"unknown guard {name!r} (known: {', '.join(sorted(GUARDS))}, eq:<number>)") from None


__all__ = ["GUARDS", "Guard", "get_guard", "MASKED", "masked_below"]
