"""Parallel operators: a tensor sharded over the ranks of a process group, and the collectives.

These ops describe one program run by ``world`` ranks at once (SPMD, as Megatron-LM and
GSPMD run a tensor-parallel model).  Their IR shapes are what *one rank* holds: ``shard``
divides an axis by ``world``, ``all_gather`` multiplies it back.  Their array semantics
(``compute``) are the whole group's: every array carries a leading axis of size ``world``,
the value each rank holds stacked in rank order.  Registry ops that are not parallel compute
the same thing on every rank, which on stacked arrays is their batched evaluation, so a
sharding rule such as::

    matmul(X, W)  ==  all_gather(matmul(X, shard(W, axis=-1, world=2)), axis=-1, world=2)

is checked by :func:`graphopt.parallel.rules.verify_parallel_rule` by evaluating both sides on
stacked arrays, in the float, fingerprint and Z3 domains like every rule.  ``lower`` is what
one rank runs: torch.distributed's functional collectives (which Dynamo and inductor trace),
on the default process group unless ``group`` is given.
"""
from __future__ import annotations

import numpy as np

from ..dims import Dim
from ..errors import ShapeError
from .base import AttrSpec, OpDef, norm_axis, numel_int, register

SPMD_DOC = " Semantics over all ranks: arrays carry a leading axis of size world (one entry per rank)."


def _world(attrs) -> int:
    w = attrs["world"]
    if w < 1:
        raise ShapeError(f"world must be >= 1, got {w}")
    return w


def _resize(name: str, shapes, dtypes, attrs, grow: bool):
    (s,) = shapes
    w = _world(attrs)
    ax = norm_axis(name, attrs["axis"], len(s))
    out = list(s)
    if grow:
        out[ax] = Dim.of(s[ax]) * w
    else:
        part = Dim.of(s[ax]).divide(w)
        if part is None:
            raise ShapeError(f"{name}: axis {attrs['axis']} of size {s[ax]} does not split into {w} equal parts")
        out[ax] = part
    return [(tuple(out), dtypes[0])]


def _chunk_per_rank(x, axis: int, world: int):
    """Stacked x -> stacked: rank r keeps its chunk r along ``axis`` (negative, per-rank axes)."""
    axis = axis if axis < 0 else axis + 1
    size = x.shape[axis] // world
    idx = [slice(None)] * x.ndim
    parts = []
    for r in range(world):
        idx[0] = r
        idx[axis] = slice(r * size, (r + 1) * size)
        parts.append(x[tuple(idx)])
    return np.stack(parts)


def _sum_ranks(dom, x):
    total = dom.mod(np.sum(x, axis=0, keepdims=True))
    return np.broadcast_to(total, x.shape).copy()


def _gather(x, axis: int):
    whole = np.concatenate(list(x), axis=axis)
    return np.stack([whole] * x.shape[0])


def _lower_shard(t, a):
    from ..parallel import collectives
    return [collectives.take_shard(t[0], a["axis"], a["world"])]


def _lower_all_reduce(t, a):
    from ..parallel import collectives
    return [collectives.all_reduce(t[0], a["world"])]


def _lower_all_gather(t, a):
    from ..parallel import collectives
    return [collectives.all_gather(t[0], a["axis"], a["world"])]


def _lower_reduce_scatter(t, a):
    from ..parallel import collectives
    return [collectives.reduce_scatter(t[0], a["axis"], a["world"])]


def _lower_partial(t, a):
    from ..parallel import collectives
    return [collectives.partial(t[0], a["world"])]


AXIS_WORLD = {"axis": AttrSpec("int", -1), "world": AttrSpec("int", 2)}

shard = register(OpDef(
    name="shard", arity=1, algebraic=True, spmd=True, attrs=AXIS_WORLD,
    doc="A replicated tensor cut into world equal parts along an axis; rank r keeps part r "
        "(no communication: each rank slices what it already has)." + SPMD_DOC,
    infer=lambda s, d, a: _resize("shard", s, d, a, grow=False),
    compute=lambda dom, x, a: [_chunk_per_rank(x[0], a["axis"], a["world"])],
    lower=_lower_shard,
    flops=lambda ins, outs, a: 0,
))

all_reduce = register(OpDef(
    name="all_reduce", arity=1, algebraic=True, spmd=True, attrs={"world": AttrSpec("int", 2)},
    doc="The sum of every rank's tensor, on every rank (torch.distributed all_reduce, SUM)." + SPMD_DOC,
    infer=lambda s, d, a: (_world(a), [(s[0], d[0])])[1],
    compute=lambda dom, x, a: [_sum_ranks(dom, x[0])],
    lower=_lower_all_reduce,
    flops=lambda ins, outs, a: numel_int(ins[0]),
))

all_gather = register(OpDef(
    name="all_gather", arity=1, algebraic=True, spmd=True, attrs=AXIS_WORLD,
    doc="Every rank's tensor concatenated in rank order along an axis, on every rank "
        "(torch.distributed all_gather_into_tensor)." + SPMD_DOC,
    infer=lambda s, d, a: _resize("all_gather", s, d, a, grow=True),
    compute=lambda dom, x, a: [_gather(x[0], a["axis"])],
    lower=_lower_all_gather,
    flops=lambda ins, outs, a: 0,
))

reduce_scatter = register(OpDef(
    name="reduce_scatter", arity=1, algebraic=True, spmd=True, attrs=AXIS_WORLD,
    doc="The sum of every rank's tensor, cut into world parts along an axis; rank r keeps "
        "part r (torch.distributed reduce_scatter_tensor, SUM)." + SPMD_DOC,
    infer=lambda s, d, a: _resize("reduce_scatter", s, d, a, grow=False),
    compute=lambda dom, x, a: [_chunk_per_rank(_sum_ranks(dom, x[0]), a["axis"], a["world"])],
    lower=_lower_reduce_scatter,
    flops=lambda ins, outs, a: numel_int(ins[0]),
))

partial = register(OpDef(
    name="partial", arity=1, algebraic=True, spmd=True, attrs={"world": AttrSpec("int", 2)},
    doc="A replicated tensor as a partial sum: rank 0 keeps it, the other ranks hold zeros "
        "(a bias added by every rank of a row-split layer, counted once by the all-reduce)." + SPMD_DOC,
    infer=lambda s, d, a: (_world(a), [(s[0], d[0])])[1],
    compute=lambda dom, x, a: [np.concatenate([x[0][:1], x[0][1:] * 0])],
    lower=_lower_partial,
    flops=lambda ins, outs, a: 0,
))
